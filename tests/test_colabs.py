"""The notebooks in ``colabs/``: each ``.ipynb`` is the jupytext rendering of its ``.py`` and runs top to bottom.

The digits notebook is executed with ``SALIENCY_JAX_QUICK=1`` (the config's ``:runlocal`` variant) by nbclient on an
ipykernel started from this interpreter (a kernelspec written into ``tmp_path``, so nothing has to be installed by
hand), in a temporary working directory.
"""

from __future__ import annotations

import base64
import json
import pathlib
import sys

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_PY = REPO / "colabs" / "distraction_digits.py"
NOTEBOOK = REPO / "colabs" / "distraction_digits.ipynb"
KERNEL_NAME = "saliency_jax_test_python3"
RUNLOCAL_ARMS = ["baseline", "0-occlusion"]  # experiments/configs/distraction_digits.py, get_config("runlocal").


def _cells(notebook):
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in notebook.cells]


def _tagged(notebook, tag):
    cells = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r} in {NOTEBOOK}, got {len(cells)}"
    return cells[0]


def _png_outputs(cell):
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


def test_ipynb_is_the_jupytext_rendering_of_the_py():
    from_py = jupytext.read(NOTEBOOK_PY)
    committed = nbformat.read(NOTEBOOK, as_version=4)
    assert _cells(committed) == _cells(from_py), (
        f"{NOTEBOOK} is out of sync with {NOTEBOOK_PY}: run `jupytext --to ipynb {NOTEBOOK_PY.relative_to(REPO)}`")
    assert committed.metadata["kernelspec"]["name"] == "python3"
    for cell in committed.cells:  # Committed outputs-free.
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
    assert "QUICK = False" in _tagged(committed, "parameters").source  # The full comparison is the default.


def test_digits_notebook_runs_top_to_bottom_quick(tmp_path, monkeypatch):
    kernel_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True)
    (kernel_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "saliency_jax test kernel", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SALIENCY_JAX_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # The kernel's inline backend turns plt.show() into a PNG.
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(run_dir)}})
    client.execute()  # Raises CellExecutionError (with the traceback) if any cell fails.

    # The quick switch selected the :runlocal variant, and everything was written under the working directory.
    workdir = run_dir / "runs" / "digits_runlocal"
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["arms"] == RUNLOCAL_ARMS
    assert metrics["config"]["num_steps"] == 12
    for arm in RUNLOCAL_ARMS:
        assert 0.0 <= metrics["summary"][arm]["clean"]["accuracy"] <= 1.0
        assert (workdir / arm / "seed0" / "metrics.jsonl").exists()

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]

    # The report's tables, as markdown, without the figure links (the figures are shown as images).
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(markdown) == 1
    assert markdown[0] == (workdir / "report.md").read_text().split("## Figures")[0]
    assert "## Random Erasing of every test image" in markdown[0] and "| baseline" in markdown[0]

    # The experiment's two figures, byte for byte.
    pngs = [p for c in notebook.cells if c.cell_type == "code" and "exploration" not in c.metadata.get("tags", [])
            for p in _png_outputs(c)]
    assert pngs == [(workdir / "saliency_maps.png").read_bytes(), (workdir / "training_curves.png").read_bytes()]

    # The exploration cell drew one figure: 5 rows of 32x32 digits x 5 columns (input, Grad-CAM, 3 fills).
    exploration = _png_outputs(_tagged(notebook, "exploration"))
    assert len(exploration) == 1
    assert exploration[0][:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(exploration[0][16:20], "big"), int.from_bytes(exploration[0][20:24], "big")
    assert width > 300 and height > 300, (width, height)
