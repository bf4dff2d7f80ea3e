"""The one entry point: CPU, one GPU, or a Cloud TPU pod.

  python launch/tpu_train.py --config=configs/demo.py --workdir=/tmp/demo
  python launch/tpu_train.py --config=configs/demo.py --workdir=/tmp/demo \\
      --config.mesh.fsdp=4 --config.mesh.tensor=2

On a TPU pod run the same command on every host (e.g. ``gcloud compute tpus
tpu-vm ssh ... --worker=all``); ``jax.distributed.initialize()`` is called
automatically there. Elsewhere ``--multihost`` with ``--coordinator_address``,
``--num_processes`` and ``--process_id`` starts one process of a multi-process
job (on one machine: CPU collectives).
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignax import cli  # noqa: E402  (defines --debug)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics, tokenizer.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() (always on TPU pods).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None, "Compile for this TPU slice (e.g. v5p-128) on any "
    "host, write workdir/aot.json, train nothing (alignax.aot; needs [tpu]).")
_COMPILE_SLICES = flags.DEFINE_integer(
    "compile_slices", 1, "With --compile_for: slices joined over DCN (data).")
flags.mark_flags_as_required(["config", "workdir"])


def _on_tpu_pod() -> bool:
  # Cloud TPU VMs of a multi-host slice list every worker here.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def main(argv):
  del argv
  # A user's mistake prints one line and exits 2 (--debug: the traceback).
  with cli.user_errors():
    _run()


def _run():
  if _COMPILE_FOR.value:  # compile for a TPU slice, train nothing
    from alignax import aot
    sys.exit(aot.main(_CONFIG.value, _WORKDIR.value, _COMPILE_FOR.value,
                      slices=_COMPILE_SLICES.value))
  import jax  # after absl parsed XLA-related environment flags
  if _MULTIHOST.value or _on_tpu_pod():
    if _MULTIHOST.value:
      # Cross-process collectives for CPU devices (no effect on TPU/GPU).
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  # Orbax and grain log every save at INFO; keep the console to our lines.
  logging.set_verbosity(logging.WARNING)
  from alignax import train
  result = train.main(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print({k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()})


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
