"""Re-executes the notebooks and saves their figures as PNGs (the README's).

  python notebooks/make_figures.py --full               # the README's figures
  python notebooks/make_figures.py losses_explorer.ipynb  # one notebook, as is

Each code cell tagged ``figure:<name>`` (cell metadata ``tags``) must display
exactly one image; after the notebook ran top to bottom (nbclient, kernel
``python3`` = the current interpreter, working directory ``notebooks/``)
that image is written to ``notebooks/figures/<name>.png``: the picture the
notebook shows, re-encoded with a 256-colour palette to keep the README
light. The notebooks themselves are not modified.

``--full`` runs the quickstart at the recipes' own lengths (300 pretraining
and 200 DPO steps of 16 rows, about 15 minutes on 2 CPU cores) by running
``FULL_PARAMETERS`` right after its cell tagged ``parameters``, so its
picture shows a model that learns; without it, every notebook runs with its
defaults, as CI does.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import time

import nbclient
import nbformat
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
NOTEBOOKS = ("losses_explorer.ipynb", "quickstart.ipynb")
FIGURES_DIR = os.path.join(HERE, "figures")
MAX_BYTES = 200_000  # README pictures stay small
FULL_PARAMETERS = {
    "quickstart.ipynb": "PRETRAIN_STEPS = 300\nDPO_STEPS = 200\nBATCH_SIZE = 16",
}


def execute(path: str, *, timeout: int = 1800,
            env: dict[str, str] | None = None,
            parameters: str = "") -> nbformat.NotebookNode:
  """Runs ``path`` top to bottom in its own directory; returns the result.

  ``parameters`` (code), if given, runs in a cell inserted after the cell
  tagged ``parameters`` (papermill's convention). Raises
  ``nbclient.exceptions.CellExecutionError`` (with the cell's traceback) on
  the first failing cell.
  """
  nb = nbformat.read(path, as_version=4)
  if parameters:
    tagged = [i for i, c in enumerate(nb.cells)
              if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
      raise ValueError(f"{path}: {len(tagged)} cells tagged 'parameters'; "
                       "expected one")
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(parameters))
  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=timeout,
      resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}})
  client.execute(env=dict(os.environ if env is None else env))
  return nb


def figures(nb: nbformat.NotebookNode) -> dict[str, bytes]:
  """``{name: png bytes}`` of the cells tagged ``figure:<name>``."""
  out = {}
  for cell in nb.cells:
    names = [t.split(":", 1)[1] for t in cell.get("metadata", {}).get("tags", [])
             if t.startswith("figure:")]
    if not names:
      continue
    images = [o["data"]["image/png"] for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    if len(images) != 1:
      raise ValueError(f"cell tagged figure:{names[0]} displayed "
                       f"{len(images)} images; expected exactly one")
    out[names[0]] = base64.b64decode(images[0])
  return out


def palette_png(png: bytes) -> bytes:
  """``png`` re-encoded with 256 colours (plots have few; ~4x smaller)."""
  image = Image.open(io.BytesIO(png))
  out = io.BytesIO()
  image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(
      out, format="PNG", optimize=True)
  return out.getvalue()


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("notebooks", nargs="*", default=NOTEBOOKS,
                      help="notebook file names in notebooks/ (default: all)")
  parser.add_argument("--out", default=FIGURES_DIR, help="output directory")
  parser.add_argument("--full", action="store_true",
                      help="run with FULL_PARAMETERS (the README's figures)")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  too_big = []
  for name in args.notebooks:
    start = time.perf_counter()
    parameters = FULL_PARAMETERS.get(name, "") if args.full else ""
    nb = execute(os.path.join(HERE, name), parameters=parameters)
    for fig, png in figures(nb).items():
      png = palette_png(png)
      path = os.path.join(args.out, f"{fig}.png")
      with open(path, "wb") as f:
        f.write(png)
      print(f"{name}: {path} ({len(png) / 1e3:.0f} KB)")
      if len(png) > MAX_BYTES:
        too_big.append(path)
    print(f"{name}: executed in {time.perf_counter() - start:.0f} s")
  if too_big:
    print(f"over {MAX_BYTES // 1000} KB: {too_big}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
