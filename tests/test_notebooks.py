"""The notebooks: each `.ipynb` is the jupytext twin of its MyST `.md`, is committed with the
outputs of a run (so a reader sees the tables and figures), runs top to bottom here on CPU
without a cell raising, and falls back to a built-in paragraph without the corpus."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
FALLBACK_NOTE = "built-in paragraph"


def _client(notebook, tmp_path):
    return nbclient.NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    return str(output.get("data", {}).get("text/plain", ""))


def test_every_notebook_is_found():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_layer_map", "03_sparsity"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_the_twin_of_its_markdown(path):
    notebook = nbformat.read(path, as_version=4)
    twin = jupytext.read(path.with_suffix(".md"))
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in twin.cells
    ], f"{path.name} and its .md differ: run `jupytext --sync --execute {path.with_suffix('.md')}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_with_the_outputs_of_one_clean_run(path):
    """Every code cell ran, in order, in one kernel, none raised or warned, and the run used
    the corpus (not the fallback paragraph)."""
    code_cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1)), (
        f"{path.name} is not committed with one run's outputs: "
        f"run `jupytext --sync --execute {path.with_suffix('.md')}`"
    )
    outputs = [output for cell in code_cells for output in cell.outputs]
    assert outputs, f"{path.name} has no outputs"
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} has an error"
    assert not any(FALLBACK_NOTE in _text(o) for o in outputs), f"{path.name} ran without text"
    warnings = [_text(o) for o in outputs if "Warning" in _text(o) or "warning" in _text(o)]
    assert not warnings, f"{path.name} shows warnings: {warnings}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    _client(notebook, tmp_path).execute()  # raises CellExecutionError naming the cell


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_falls_back_without_the_corpus(path, tmp_path, monkeypatch):
    """With the corpus folder missing, the cells up to the one that picks the text run, and
    that one says it took the built-in paragraph."""
    monkeypatch.setenv("SPECATTN_DATA_DIR", str(tmp_path / "no-corpus"))
    notebook = nbformat.read(path, as_version=4)
    client = _client(notebook, tmp_path)
    with client.setup_kernel():
        for index, cell in enumerate(notebook.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError naming the cell
            if any(FALLBACK_NOTE in _text(o) for o in cell.get("outputs", [])):
                return
    pytest.fail(f"no cell of {path.name} reported the {FALLBACK_NOTE}")
