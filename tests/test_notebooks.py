"""The notebooks: each `.ipynb` is the jupytext twin of its MyST `.md`, is committed with its
outputs stripped, and runs top to bottom (here, on CPU) without a cell raising."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_every_notebook_is_found():
    assert [p.stem for p in NOTEBOOKS] == ["01_quickstart", "02_layer_map", "03_sparsity"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_the_twin_of_its_markdown_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    twin = jupytext.read(path.with_suffix(".md"))
    assert [(c.cell_type, c.source) for c in notebook.cells] == [
        (c.cell_type, c.source) for c in twin.cells
    ], f"{path.name} and its .md differ: run `jupytext --sync {path.with_suffix('.md')}`"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the cell and its traceback
