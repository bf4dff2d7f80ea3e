"""Executes the notebooks top to bottom; any failing cell fails the test.

Needs the ``[notebooks]`` extra (matplotlib, nbclient, ipykernel, nbformat).
The kernel is ``python3``, which jupyter_client starts with the current
interpreter, so the notebooks import the alignax under test. Run alone with

  python -m pytest -q tests/test_notebooks.py        # or: -m notebooks

and leave out of a quick run with ``-m "not notebooks"``.
"""

import os
import shutil
import tempfile

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("losses_explorer.ipynb", "quickstart.ipynb")

pytestmark = pytest.mark.notebooks


def _kernel_env():
  """The test process's environment, minus conftest's 8 forced CPU devices.

  The notebooks run as on a user's machine (one CPU device); forcing eight
  would only slow the 2-core CI down.
  """
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _remove_run_dirs(nb):
  """Deletes the quickstart's runs (it prints ``runs go to <dir>``)."""
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      for line in out.get("text", "").splitlines():
        if not line.startswith("runs go to "):
          continue
        path = line[len("runs go to "):].strip()
        if (os.path.dirname(path) == tempfile.gettempdir()
            and os.path.basename(path).startswith("alignax_quickstart_")):
          shutil.rmtree(path, ignore_errors=True)


def _figure_tags(cell):
  return [t for t in cell.get("metadata", {}).get("tags", [])
          if t.startswith("figure:")]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
  # Outputs (images, timings, temp paths) belong in notebooks/figures/, not
  # in diffs; make_figures.py regenerates them.
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nbformat.validate(nb)
  dirty = [i for i, c in enumerate(nb.cells)
           if c.cell_type == "code" and (c.outputs or c.execution_count)]
  assert not dirty, f"{name}: cells {dirty} carry outputs; clear them"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes(name):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=600,
      resources={"metadata": {"path": NOTEBOOK_DIR}})
  try:
    # Raises CellExecutionError, with the cell and its traceback, on any error.
    client.execute(env=_kernel_env())
  finally:
    _remove_run_dirs(nb)  # ~30 MB of checkpoints per run
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
  # make_figures.py takes exactly one image from every figure:<name> cell.
  tagged = [c for c in nb.cells if _figure_tags(c)]
  assert tagged, f"{name} has no figure:<name> cells"
  for cell in tagged:
    images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, (_figure_tags(cell), len(images))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_picks_the_runtime_accelerator_build(name):
  """Colab TPU / GPU / CPU runtimes get alignax's tpu / cuda12 / no extra."""
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  source = nb.cells[1].source
  assert source.startswith("# Installs alignax")
  # Only the definitions: the install itself is skipped (alignax imports).
  namespace = {}
  exec(compile(source.split("\nif importlib.util.find_spec")[0], name,
               "exec"), namespace)
  pick = namespace["accelerator_extra"]
  none = lambda *_: None
  nothing = lambda _: []
  assert pick({"COLAB_TPU_ADDR": "10.0.0.2:8470"}, none, nothing) == "tpu"
  assert pick({}, none, lambda p: ["/dev/accel0"] if "accel" in p else []
              ) == "tpu"  # a TPU VM runtime
  assert pick({}, lambda _: "/usr/bin/nvidia-smi", nothing) == "cuda12"
  assert pick({}, none, nothing) == ""
  # The extras it names exist in setup.py.
  setup = open(os.path.join(ROOT, "setup.py")).read()
  assert '"tpu": [' in setup and '"cuda12": [' in setup
  assert 'f"{checkout}[{extras}]"' in source
