"""tutorial.ipynb: it runs top to bottom, offline, on the CPU, and its committed outputs are the ones it computes.

Fast tests (nothing executed):

* `test_committed_notebook_is_a_complete_run`: the committed file was saved from one top-to-bottom run in one
  kernel (execution counts 1, 2, 3, ...), carries no error output and at least MIN_IMAGES plots, so that it
  renders with its outputs on a code host.
* `test_committed_figures_are_wide_enough`: every committed plot, and the README's figure in assets/, is at least
  MIN_WIDTH_PX pixels wide (read from the PNG header), and the README shows that figure.

One execution of the notebook (about 3-4 minutes on a 2-core machine), shared by the tests below: nbclient runs a
copy of the notebook (kernel `python3`, working directory = repository root, never overwriting the committed file,
the README's figure written to a temporary folder), and fails if any cell raises.

* `test_notebook_executes_and_reproduces_its_outputs`: every code cell's outputs equal the committed ones.
* `test_every_figure_is_readable`: every plot of the fresh run is at least MIN_WIDTH_PX wide, no text in a figure
  is smaller than MIN_FONT_PT, and every heatmap has a colour bar. The figures themselves are inspected, not the
  cells' source: a probe cell (FIGURE_PROBE), run before the notebook's first cell and removed before the outputs
  are compared, records every figure `plt.show()` displays. A heatmap is an image or mesh of scalars (a 2-D array,
  mapped through a colour map: its colours mean nothing without the scale); an RGB photograph is not one.
  `test_figure_probe_has_teeth` shows the probe flags a heatmap without colour bar and small text.
* `test_front_page_figure_is_current`: the notebook's cell that draws the README's figure
  (assets/where_the_pe_enters.png) gives the committed file: byte for byte when the installed matplotlib is the one
  that wrote the committed file (its PNG names the version; the same version renders the same bytes), the same
  pixel size otherwise.

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
up as a mismatch: re-execute the notebook in place and commit it with assets/ (from the repository root, one thread):
OMP_NUM_THREADS=1 MPVG_TUTORIAL_DATA=/nonexistent jupyter execute --inplace tutorial.ipynb
"""
import ast
import base64
import importlib.util
import json
import math
import os
import re
import struct
import types
from pathlib import Path
from unittest import mock

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tutorial.ipynb"
FRONT_FIGURE = Path("assets") / "where_the_pe_enters.png"      # the README's figure, drawn by a cell of the notebook
MIN_IMAGES = 6
MIN_WIDTH_PX = 900              # every plot, at the size it is saved (the notebook's PNG)
MIN_FONT_PT = 10                # every title, label, tick label, legend and annotation in a plot
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


def png_chunks(data):
    """(type, payload) of each chunk of a PNG file's bytes; ValueError if it is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, chunks = 8, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunks.append((kind, data[pos + 8:pos + 8 + length]))
        pos += 12 + length                                           # length, type, payload, CRC
    return chunks


def png_size(data):
    """(width, height) in pixels, from the IHDR chunk that opens every PNG."""
    kind, payload = png_chunks(data)[0]
    assert kind == b"IHDR", kind
    return struct.unpack(">II", payload[:8])


def png_software(data):
    """The 'Software' text of a PNG (matplotlib writes its version there), or None."""
    texts = dict(p.split(b"\0", 1) for k, p in png_chunks(data) if k == b"tEXt")
    return texts.get(b"Software", b"").decode("latin-1") or None


def image_outputs(nb):
    """(code cell index, PNG bytes) of every plot the notebook shows."""
    return [(i, base64.b64decode(out.data["image/png"])) for i, cell in enumerate(code_cells(nb))
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


## Run in the notebook's kernel before its first cell (then removed from the notebook): every figure that plt.show()
## displays is drawn and described as one JSON line in PROBE_LOG. The notebook's own cells are unchanged.
FIGURE_PROBE = r'''
import json as _json
import matplotlib.pyplot as _plt
from matplotlib.collections import QuadMesh as _QuadMesh


def _figure_record(fig):
    fig.canvas.draw()
    mappables = [m for ax in fig.axes for m in list(ax.images) + [c for c in ax.collections if isinstance(c, _QuadMesh)]]
    colorbar_axes = {m.colorbar.ax for m in mappables if m.colorbar is not None}
    ## a heatmap: scalars (2-D array) through a colour map, outside a colour bar's own axes; RGB(A) images are 3-D
    heatmaps = [m for m in mappables if m.axes not in colorbar_axes and m.get_array() is not None
                and m.get_array().ndim == 2]
    texts = [fig._suptitle] if fig._suptitle is not None else []
    texts += [t for legend in fig.legends for t in legend.get_texts()]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        texts += [ax.title, ax._left_title, ax._right_title, *ax.texts]
        if ax.axison:
            texts += [ax.xaxis.label, ax.yaxis.label, *ax.get_xticklabels(), *ax.get_yticklabels()]
        if ax.get_legend() is not None:
            texts += ax.get_legend().get_texts()
    shown = [t for t in texts if t.get_visible() and t.get_text().strip()]
    smallest = min(shown, key=lambda t: t.get_fontsize(), default=None)
    return {"heatmaps": len(heatmaps), "heatmaps_without_colorbar": sum(m.colorbar is None for m in heatmaps),
            "min_font_pt": None if smallest is None else smallest.get_fontsize(),
            "smallest_text": None if smallest is None else smallest.get_text()}


def _probing_show(*args, _show=_plt.show, **kwargs):
    if PROBE_LOG is not None:
        with open(PROBE_LOG, "a") as f:
            for num in _plt.get_fignums():
                f.write(_json.dumps(_figure_record(_plt.figure(num))) + "\n")
    return _show(*args, **kwargs)


_plt.show = _probing_show
'''


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


def test_png_helpers_read_what_matplotlib_wrote(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(8.99, 2.5), dpi=100)
    fig.savefig(tmp_path / "narrow.png")
    plt.close(fig)
    data = (tmp_path / "narrow.png").read_bytes()
    assert png_size(data) == (899, 250)                       # one pixel short of MIN_WIDTH_PX: the check must fail
    assert png_size(data)[0] < MIN_WIDTH_PX
    assert matplotlib.__version__ in png_software(data)
    with pytest.raises(ValueError):
        png_chunks(b"GIF89a" + data[6:])


def test_committed_figures_are_wide_enough():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    narrow = [(i, png_size(data)) for i, data in image_outputs(nb) if png_size(data)[0] < MIN_WIDTH_PX]
    assert not narrow, (f"plots of tutorial.ipynb narrower than {MIN_WIDTH_PX} px, (code cell, (width, height)): "
                        f"{narrow}; widen the figure (figsize x dpi) and re-execute the notebook")
    front = ROOT / FRONT_FIGURE
    assert front.is_file(), f"{FRONT_FIGURE} is missing: re-execute tutorial.ipynb in place, it draws it"
    assert png_size(front.read_bytes())[0] >= MIN_WIDTH_PX, png_size(front.read_bytes())
    assert f"]({FRONT_FIGURE.as_posix()})" in (ROOT / "README.md").read_text(), f"README.md does not show {FRONT_FIGURE}"


def probe_namespace():
    namespace = {"PROBE_LOG": None}
    exec(FIGURE_PROBE, namespace)
    import matplotlib.pyplot as plt
    plt.show = namespace["_probing_show"].__kwdefaults__["_show"]   # exec replaced it in this process: put it back
    return namespace


def test_figure_probe_has_teeth():
    """The probe flags a heatmap without colour bar and small text; it passes a photograph and a colour-barred map."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    record = probe_namespace()["_figure_record"]
    scalars, rgb = np.random.default_rng(0).normal(size=(16, 48)), np.zeros((8, 8, 3))
    try:
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(10, 3))
        a.imshow(scalars, cmap="RdBu_r")                      # no colour bar: flagged
        fig.colorbar(b.imshow(scalars, cmap="RdBu_r"), ax=b)
        c.imshow(rgb)                                         # a photograph: no colour bar needed
        c.set_title("tiny", fontsize=7)
        r = record(fig)
        assert (r["heatmaps"], r["heatmaps_without_colorbar"], r["min_font_pt"], r["smallest_text"]) == (2, 1, 7, "tiny")
        fig, ax = plt.subplots(figsize=(10, 3))
        fig.colorbar(ax.pcolormesh(scalars), ax=ax)
        ax.set_title("a mesh with its colour bar", fontsize=11)
        r = record(fig)
        assert (r["heatmaps"], r["heatmaps_without_colorbar"]) == (1, 0) and r["min_font_pt"] >= MIN_FONT_PT, r
    finally:
        plt.close("all")


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """The notebook executed now, into a copy: the committed and fresh notebooks, the probe's figure records, and
    the folder the fresh run wrote the README's figure to."""
    if importlib.util.find_spec("skimage") is None:
        pytest.fail("the tutorial's real-image section needs scikit-image: pip install -r requirements-test.txt")
    committed = nbformat.read(NOTEBOOK, as_version=4)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tmp = tmp_path_factory.mktemp("tutorial")
    no_data, assets, probe_log = tmp / "no-data", tmp / "assets", tmp / "figures.jsonl"
    no_data.mkdir()
    nb.cells.insert(0, nbformat.v4.new_code_cell(f"PROBE_LOG = {str(probe_log)!r}\n" + FIGURE_PROBE))
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    env = {"MPVG_TUTORIAL_DATA": str(no_data), "MPVG_TUTORIAL_ASSETS": str(assets), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
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
        del nb.cells[0]                                        # the probe: not part of the notebook
        nbformat.write(nb, tmp / "tutorial.executed.ipynb")   # for a look after a failure
    figures = [json.loads(line) for line in probe_log.read_text().splitlines()] if probe_log.exists() else []
    return types.SimpleNamespace(committed=committed, fresh=nb, where=tmp / "tutorial.executed.ipynb",
                                 figures=figures, assets=assets)


def test_notebook_executes_and_reproduces_its_outputs(fresh_run):
    committed, fresh, where = fresh_run.committed, fresh_run.fresh, fresh_run.where
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


def test_every_figure_is_readable(fresh_run):
    images = image_outputs(fresh_run.fresh)
    narrow = [(i, png_size(data)) for i, data in images if png_size(data)[0] < MIN_WIDTH_PX]
    assert not narrow, f"plots narrower than {MIN_WIDTH_PX} px, (code cell, (width, height)): {narrow}"
    figures = fresh_run.figures
    assert len(figures) == len(images), (
        f"the probe saw {len(figures)} figures through plt.show() but the notebook shows {len(images)} plots: end "
        f"every plotting cell with plt.show(), so that its figure is checked")
    assert any(f["heatmaps"] for f in figures), "no heatmap found: the Fig. 2-style heatmaps are gone, or the probe is broken"
    no_bar = [i for i, f in enumerate(figures) if f["heatmaps_without_colorbar"]]
    assert not no_bar, f"plots {no_bar} (in display order) have heatmaps without a colour bar: {[figures[i] for i in no_bar]}"
    small = [(i, f["min_font_pt"], f["smallest_text"]) for i, f in enumerate(figures)
             if f["min_font_pt"] is not None and f["min_font_pt"] < MIN_FONT_PT]
    assert not small, f"text smaller than {MIN_FONT_PT} pt, (plot, size, text): {small}"


def test_front_page_figure_is_current(fresh_run):
    committed, fresh = (ROOT / FRONT_FIGURE).read_bytes(), (fresh_run.assets / FRONT_FIGURE.name).read_bytes()
    assert png_size(fresh)[0] >= MIN_WIDTH_PX, png_size(fresh)
    stale = f"re-execute tutorial.ipynb in place (it redraws {FRONT_FIGURE}) and commit both"
    assert png_size(committed) == png_size(fresh), f"{FRONT_FIGURE}: {png_size(committed)} px, fresh {png_size(fresh)}; {stale}"
    if png_software(committed) == png_software(fresh):          # the same matplotlib renders the same bytes
        assert committed == fresh, f"{FRONT_FIGURE} differs from what the notebook draws now; {stale}"
