"""tutorial.ipynb: it runs top to bottom, offline, on the CPU, and its committed outputs are the ones it computes.

Two tests:

* `test_committed_notebook_is_a_complete_run` (fast, nothing executed): the committed file was saved from one
  top-to-bottom run in one kernel (execution counts 1, 2, 3, ...), carries no error output and at least
  MIN_IMAGES plots, so that it renders with its outputs on a code host.
* `test_notebook_executes_and_reproduces_its_outputs` (about 3-4 minutes on a 2-core machine): executes a copy of
  the notebook with nbclient (kernel `python3`, working directory = repository root, never overwriting the
  committed file), fails if any cell raises, then compares every code cell's outputs with the committed ones.

What is compared, and why that is robust but still catches a stale notebook:

* The text a cell shows: its stdout (concatenated: how the kernel splits a stream into chunks depends on timing)
  plus the `text/plain` of its results and displays (e.g. `<Figure size 648x288 with 1 Axes>`). stderr is left
  out: warnings differ between library versions and are not part of what the notebook teaches.
* Text is compared exactly except for numbers. Integers must be equal. Floats must agree to
  `rel 1e-4 / abs 1e-6`: that lets through only the rounding-level values the notebook prints on purpose
  (e.g. "max |diff| = 1.3e-15", which depends on the CPU's instruction set), while any printed accuracy, loss,
  correlation or parameter count that changed by one unit of its last printed digit fails. The notebook is
  deterministic by construction (one thread, fixed seeds, float64 training, no timings printed, train.py's
  timing fields dropped), so on the same software stack a fresh run prints the same text.
* Plots: each cell must produce the same number of images as committed. The pixels are not compared (PNG bytes
  change with the matplotlib/freetype version); their data come from the text-checked computations.
* Source listings: the cells tagged `source-listing` print lines of mpvg.py (the code that computes each equation,
  with the function it sits in, never a line number). For them only the listing's skeleton is compared: the
  equation headers, the function names and the code, each line without its trailing comment and alignment. So an
  edit of mpvg.py that moves lines or rewords comments does not make the notebook stale; an edit of a listed line's
  code, or one that moves an equation to another function, does. Those cells may call `show_equations` only
  (checked), so the lenient comparison never covers a computed number.
* The data source is pinned: the run sets MPVG_TUTORIAL_DATA to an empty folder, so the notebook takes its
  generated-task path (the committed outputs were produced that way) even on a machine with CIFAR-100 in ./data.
  The real-image section reads only photographs shipped inside scikit-image and matplotlib (no download).

Any edit of a code cell's output-producing logic, of what mpvg.py computes or of train.py's checkpoint format shows
up as a mismatch: re-execute the notebook in place and commit it (from the repository root, one thread):
OMP_NUM_THREADS=1 MPVG_TUTORIAL_DATA=/nonexistent jupyter execute --inplace tutorial.ipynb
"""
import ast
import importlib.util
import math
import os
import re
from pathlib import Path
from unittest import mock

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial.ipynb"
MIN_IMAGES = 6
CELL_TIMEOUT_S = 600
REL_TOL, ABS_TOL = 1e-4, 1e-6
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
LISTING_TAG = "source-listing"


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def shown_text(cell):
    """What a reader sees of the cell's output as text: stdout, then every text/plain, in order."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data") and "text/plain" in out.data:
            parts.append(out.data["text/plain"] + "\n")
    return "".join(parts)


def is_listing(cell):
    return LISTING_TAG in cell.get("metadata", {}).get("tags", [])


def listing_skeleton(text):
    """A source listing without what a behaviour-neutral edit of mpvg.py changes: trailing comments, alignment."""
    return "\n".join(" ".join(re.sub(r"\s#.*$", "", line).split()) for line in text.splitlines())


def compared_text(cell):
    return listing_skeleton(shown_text(cell)) if is_listing(cell) else shown_text(cell)


def n_images(cell):
    return sum(1 for out in cell.get("outputs", []) if out.output_type in ("execute_result", "display_data")
               and any(k.startswith("image/") for k in out.data))


def texts_match(committed, fresh):
    """True when the texts are equal, numbers compared as described in the module docstring."""
    a_words, b_words = NUMBER.split(committed), NUMBER.split(fresh)
    a_nums, b_nums = NUMBER.findall(committed), NUMBER.findall(fresh)
    if a_words != b_words or len(a_nums) != len(b_nums):
        return False
    for a, b in zip(a_nums, b_nums):
        if re.fullmatch(r"[-+]?\d+", a) and re.fullmatch(r"[-+]?\d+", b):
            if a != b:
                return False
        elif not math.isclose(float(a), float(b), rel_tol=REL_TOL, abs_tol=ABS_TOL):
            return False
    return True


def test_number_comparison_is_strict_enough():
    assert texts_match("diff = 1.3e-15, acc 86.2%", "diff = 4.4e-16, acc 86.2%")
    assert not texts_match("acc 86.2%", "acc 86.3%")
    assert not texts_match("corr -0.37", "corr +0.37")
    assert not texts_match("5,717,416 params", "5,717,417 params")
    assert not texts_match("layer 1: 0.50", "layer 2: 0.50")


def test_listing_comparison_ignores_only_comments_and_alignment():
    committed = ("Eq. (1)\n  VisionTransformer.forward_features     x = x + self.pos_embed      # Eq. (1)/(8)\n")
    assert texts_match(listing_skeleton(committed), listing_skeleton(
        "Eq. (1)\n  VisionTransformer.forward_features  x = x + self.pos_embed  # Eq. (1)/(8); LaPE skips it\n"))
    for changed in ["Eq. (2)\n  VisionTransformer.forward_features     x = x + self.pos_embed      # Eq. (1)/(8)\n",
                    "Eq. (1)\n  Block.forward                          x = x + self.pos_embed      # Eq. (1)/(8)\n",
                    "Eq. (1)\n  VisionTransformer.forward_features     x = x - self.pos_embed      # Eq. (1)/(8)\n",
                    "Eq. (1)\n"]:
        assert not texts_match(listing_skeleton(committed), listing_skeleton(changed)), changed


def test_listing_cells_only_list_source():
    """The lenient listing comparison must never cover a cell that prints a computed number."""
    listings = [c for c in code_cells(nbformat.read(NOTEBOOK, as_version=4)) if is_listing(c)]
    assert listings, f"no code cell is tagged {LISTING_TAG!r}"
    for cell in listings:
        calls = ast.parse(cell.source).body
        assert all(isinstance(st, ast.Expr) and isinstance(st.value, ast.Call)
                   and getattr(st.value.func, "id", None) == "show_equations" for st in calls), cell.source


def test_committed_notebook_is_a_complete_run():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = code_cells(nb)
    counts = [c.execution_count for c in cells]
    assert counts == list(range(1, len(cells) + 1)), (
        f"tutorial.ipynb was not saved from one top-to-bottom run (execution counts {counts}); re-execute it")
    errors = [i for i, c in enumerate(cells) if any(o.output_type == "error" for o in c.outputs)]
    assert not errors, f"committed tutorial.ipynb has error outputs in code cells {errors}"
    images = sum(n_images(c) for c in cells)
    assert images >= MIN_IMAGES, f"committed tutorial.ipynb carries {images} plots, expected at least {MIN_IMAGES}"
    silent = [i for i, c in enumerate(cells) if not c.outputs]
    assert len(silent) <= len(cells) // 2, f"too many code cells without outputs: {silent}"


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """The notebook executed now, into a copy: (committed, fresh) notebooks."""
    if importlib.util.find_spec("skimage") is None:
        pytest.fail("the tutorial's real-image section needs scikit-image: pip install -r requirements-test.txt")
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tmp = tmp_path_factory.mktemp("tutorial")
    no_data = tmp / "no-data"
    no_data.mkdir()
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    env = {"MPVG_TUTORIAL_DATA": str(no_data), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        with mock.patch.dict(os.environ, env):
            client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"a cell of tutorial.ipynb raised:\n{e}")
    except Exception as e:
        if type(e).__name__ == "NoSuchKernel":
            pytest.fail("no 'python3' Jupyter kernel: `pip install ipykernel` (requirements-test.txt) installs it")
        raise
    finally:
        nbformat.write(nb, tmp / "tutorial.executed.ipynb")   # for a look after a failure
    return committed, nb, tmp / "tutorial.executed.ipynb"


def test_notebook_executes_and_reproduces_its_outputs(fresh_run):
    committed, fresh, where = fresh_run
    old, new = code_cells(committed), code_cells(fresh)
    assert len(old) == len(new)
    stale = []
    for i, (a, b) in enumerate(zip(old, new)):
        if not texts_match(compared_text(a), compared_text(b)) or n_images(a) != n_images(b):
            stale.append(f"code cell {i} (source starts {b.source.splitlines()[0][:60]!r}):\n"
                         f"--- committed ({n_images(a)} images)\n{shown_text(a)[-1500:]}\n"
                         f"--- fresh run ({n_images(b)} images)\n{shown_text(b)[-1500:]}")
    assert not stale, (f"tutorial.ipynb's committed outputs differ from a fresh run (saved at {where}); "
                       f"re-execute the notebook and commit it.\n\n" + "\n\n".join(stale))
