"""The notebooks in ``colabs/``: each ``.ipynb`` is the jupytext rendering of its ``.py`` and runs top to bottom.

Each notebook is executed with ``SALIENCY_JAX_QUICK=1`` (the config's ``:runlocal`` variant) by nbclient on an
ipykernel started from this interpreter (a kernelspec written into ``tmp_path``, so nothing has to be installed by
hand), in a temporary working directory.
"""

from __future__ import annotations

import base64
import json
import pathlib
import re
import sys

import pytest

jupytext = pytest.importorskip("jupytext")
nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO / "colabs"
NOTEBOOK_PY = COLABS / "distraction_digits.py"
NOTEBOOK = COLABS / "distraction_digits.ipynb"
METHODS_NOTEBOOK = COLABS / "saliency_methods.ipynb"
KERNEL_NAME = "saliency_jax_test_python3"
RUNLOCAL_ARMS = ["baseline", "0-occlusion"]  # experiments/configs/distraction_digits.py, get_config("runlocal").


def _cells(notebook):
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in notebook.cells]


def _tagged(notebook, tag):
    cells = [c for c in notebook.cells if tag in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, got {len(cells)}"
    return cells[0]


def _png_outputs(cell):
    return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
            if o.get("output_type") in ("display_data", "execute_result") and "image/png" in o.get("data", {})]


def _png_size(png):
    """(width, height) in pixels of a PNG, read from its IHDR chunk."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


def _execute_quick(notebook, tmp_path, monkeypatch):
    """Runs ``notebook`` (in place) with SALIENCY_JAX_QUICK=1 on a kernel of this interpreter; returns its cwd.

    Raises CellExecutionError (with the traceback) if any cell fails.
    """
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
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name=KERNEL_NAME,
                                     resources={"metadata": {"path": str(run_dir)}})
    client.execute()
    return run_dir


@pytest.mark.parametrize("name", ["distraction_digits", "saliency_methods"])
def test_ipynb_is_the_jupytext_rendering_of_the_py(name):
    notebook_py, notebook = COLABS / f"{name}.py", COLABS / f"{name}.ipynb"
    from_py = jupytext.read(notebook_py)
    committed = nbformat.read(notebook, as_version=4)
    assert _cells(committed) == _cells(from_py), (
        f"{notebook} is out of sync with {notebook_py}: run `jupytext --to ipynb {notebook_py.relative_to(REPO)}`")
    assert committed.metadata["kernelspec"]["name"] == "python3"
    assert "QUICK = False" in _tagged(committed, "parameters").source  # The full comparison is the default.


@pytest.mark.parametrize("name", ["distraction_digits", "saliency_methods"])
def test_committed_notebook_is_executed_with_its_figures(name):
    """Committed executed (the full run, so that it reads on the repository's web page), in order, without errors,
    with its figures, and small."""
    path = COLABS / f"{name}.ipynb"
    committed = nbformat.read(path, as_version=4)
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path}: execute it top to bottom"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert sum(len(_png_outputs(c)) for c in code) >= 1
    assert path.stat().st_size < 600_000, f"{path} is {path.stat().st_size} bytes: keep the figures small"


@pytest.mark.parametrize("name", ["distraction_digits", "saliency_methods"])
def test_colab_badge_and_install_cell(name, tmp_path, monkeypatch):
    """The "Open in Colab" badge opens this notebook; the install cell (run as on Colab, with pip and git recorded)
    installs the package without dependencies, then its dependencies other than jax with jax pinned to the
    installed version."""
    notebook = nbformat.read(COLABS / f"{name}.ipynb", as_version=4)
    title = notebook.cells[0].source
    badge = re.search(r"\]\((https://colab\.research\.google\.com/github/([^)]+))\)", title)
    assert badge and "colab-badge.svg" in title and badge.group(2).endswith(f"/blob/main/colabs/{name}.ipynb")
    install = [c for c in notebook.cells if c.cell_type == "code" and "REPO_URL" in c.source]
    assert len(install) == 1
    source = install[0].source
    url = re.search(r'REPO_URL = "([^"]+)"  # @param \{type:"string"\}', source)
    assert url and url.group(1).startswith("https://github.com/")
    assert badge.group(2).startswith(url.group(1).removeprefix("https://github.com/") + "/")

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    calls = []
    import subprocess

    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(list(args)))
    namespace = {"IN_COLAB": True, "sys": sys}
    exec(source.replace('"/content/saliency_jax"', repr(str(repo))), namespace)
    import importlib.metadata

    assert calls[0][-4:] == ["install", "-q", "--no-deps", str(repo)]
    second = calls[1]
    assert second[second.index("-c") + 1] == str(repo / "colab_constraints.txt")
    pins = (repo / "colab_constraints.txt").read_text().splitlines()
    assert f"jax=={importlib.metadata.version('jax')}" in pins
    requirements = second[second.index("-c") + 2:]
    assert requirements and "flax>=0.11" in requirements
    assert not [r for r in requirements if re.match(r"jax(lib)?\b", r)]


@pytest.mark.slow  # 35-55 s on 2 cores; .ci/run executes both notebooks from the installed wheel
def test_digits_notebook_runs_top_to_bottom_quick(tmp_path, monkeypatch):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    run_dir = _execute_quick(notebook, tmp_path, monkeypatch)

    # The quick switch selected the :runlocal variant, and everything was written under the working directory.
    workdir = run_dir / "runs" / "digits_runlocal"
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["arms"] == RUNLOCAL_ARMS
    assert metrics["config"]["num_steps"] == 12
    for arm in RUNLOCAL_ARMS:
        assert 0.0 <= metrics["summary"][arm]["classification"]["accuracy"] <= 1.0
        assert (workdir / arm / "seed0" / "metrics.jsonl").exists()

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]

    # The report's tables, as markdown, without the figure links (the figures are shown as images).
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(markdown) == 1
    report = (workdir / "report.md").read_text()
    assert markdown[0] == re.sub(r"!\[[^]]*\]\([^)]*\)\n?", "", report) and "![" in report
    assert "## Random Erasing of every test image" in markdown[0] and "| baseline" in markdown[0]

    # The experiment's two figures, byte for byte.
    pngs = [p for c in notebook.cells if c.cell_type == "code" and "exploration" not in c.metadata.get("tags", [])
            for p in _png_outputs(c)]
    assert pngs == [(workdir / "saliency_maps.png").read_bytes(), (workdir / "training_curves.png").read_bytes()]

    # The exploration cell drew one figure: 5 rows of 32x32 digits x 5 columns (input, Grad-CAM, 3 fills).
    exploration = _png_outputs(_tagged(notebook, "exploration"))
    assert len(exploration) == 1
    width, height = _png_size(exploration[0])
    assert width > 300 and height > 300, (width, height)


# Appended to the saliency-methods notebook before it runs: reports what the notebook computed, and the vanilla
# gradient recomputed here with plain jax.grad of the predicted class's logit (|d S_c / d I|, min-max per image).
_METHODS_PROBE = """\
import json as _json
import jax.numpy as _jnp
_logits = model.apply(variables, _jnp.asarray(images), train=False)
_rows = _jnp.arange(NUM_EXAMPLES)
_g = jax.grad(lambda x: _jnp.sum(model.apply(variables, x, train=False)[_rows, targets]))(_jnp.asarray(images))
_a = np.abs(np.asarray(_g[..., 0], np.float64))
_a = (_a - _a.min(axis=(1, 2), keepdims=True)) / np.ptp(_a, axis=(1, 2), keepdims=True)
print(_json.dumps({
    "quick": QUICK, "num_masks": NUM_MASKS, "workdir": str(WORKDIR.resolve()),
    "maps": [[k, list(np.shape(v)), float(np.min(v)), float(np.max(v)), bool(np.all(np.isfinite(v)))]
             for k, v in maps.items()],
    "gradient_error": float(np.max(np.abs(_a - np.asarray(maps["gradient"])))),
    "labels": np.asarray(labels).tolist(),
    "source_labels": [int(test_source[i]["label"]) for i in range(NUM_EXAMPLES)],
    "predictions": np.asarray(predictions).tolist(),
    "argmax": np.asarray(_jnp.argmax(_logits, -1)).tolist(),
}))
"""
METHODS = ["gradient", "guided backprop", "Grad-CAM (conv3)", "Grad-CAM++ (conv3)", "EB (conv2)", "cEB (conv2)",
           "RISE"]


@pytest.mark.slow  # 35-55 s on 2 cores; .ci/run executes both notebooks from the installed wheel
def test_saliency_methods_notebook_runs_top_to_bottom_quick(tmp_path, monkeypatch):
    notebook = nbformat.read(METHODS_NOTEBOOK, as_version=4)
    headings = [c.source.split("\n")[0] for c in notebook.cells if c.cell_type == "markdown"]
    assert sum(h.startswith("### ") for h in headings) == len(METHODS)  # One markdown cell per method.
    notebook.cells.append(nbformat.v4.new_code_cell(_METHODS_PROBE, metadata={"tags": ["probe"]}))
    run_dir = _execute_quick(notebook, tmp_path, monkeypatch)

    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    probe = json.loads("".join(o["text"] for o in _tagged(notebook, "probe").outputs if o["output_type"] == "stream"))

    # The quick switch: the :runlocal config's baseline arm, trained under the working directory.
    assert probe["quick"] is True and probe["num_masks"] == 200
    workdir = run_dir / "runs" / "digits_runlocal" / "baseline" / "seed0"
    assert pathlib.Path(probe["workdir"]) == workdir.resolve()
    config = json.loads((workdir / "config.json").read_text())
    assert config["num_steps"] == 12 and config["schemes"] == []
    assert (workdir / "metrics.jsonl").exists()

    # Six test images in order, with the model's own argmax as prediction; every method gave [6, 32, 32] in [0, 1].
    assert probe["labels"] == probe["source_labels"]
    assert probe["predictions"] == probe["argmax"]
    assert [m[0] for m in probe["maps"]] == METHODS
    for name, shape, lo, hi, finite in probe["maps"]:
        assert shape == [6, 32, 32] and finite and 0.0 <= lo <= hi <= 1.0, (name, shape, lo, hi, finite)
    assert probe["gradient_error"] < 1e-4

    # The figure: one PNG of 6 rows x 8 columns (the input and the seven methods).
    pngs = _png_outputs(_tagged(notebook, "figure"))
    assert len(pngs) == 1
    width, height = _png_size(pngs[0])
    assert width > 600 and height > 450 and width > height, (width, height)
    assert [p for c in notebook.cells for p in _png_outputs(c)] == pngs  # No other figure.
