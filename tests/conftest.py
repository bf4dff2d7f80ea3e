"""Test setup: 8 forced CPU devices so sharding tests can build real meshes."""
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
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
