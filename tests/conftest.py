"""Test setup: 8 forced CPU devices so sharding tests can build real meshes."""
import os

# Must happen before jax is imported anywhere. The 8 CPU devices meet in
# XLA's collectives; on a loaded 2-core machine (two pytest workers) a
# participant can reach the rendezvous later than XLA's default 40 s, and
# XLA then aborts the whole process: wait longer instead.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    " --xla_cpu_collective_timeout_seconds=600")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests build the same small programs in fresh jit objects (a new
# Trainer per run); the persistent cache turns those recompiles into loads.
jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "alignax-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "notebooks: executes the Colab notebooks (needs [notebooks])")
