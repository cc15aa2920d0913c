"""Execute every notebook in notebooks/ with a real kernel, so they cannot rot.

Each notebook runs top to bottom in an ipykernel kernel (nbclient); any cell
error fails the test. The executed copies are written under pytest's tmp dir
(never into the repository), and their outputs are checked: the plots are
there as PNG images and the cells print what the notebook is about.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

#: Text each notebook's outputs must contain (beyond "no cell failed").
EXPECTED = {
    "01-quick-tour": ["spans in", "traces from", "knhk Dataset", "the pipeline received 200 spans"],
    "02-trace-forensics": ["dominated by", "critical path", "share of the slowest 5%"],
    "03-validation-audit": ["have violations", "audit verdict", "findings by level"],
}
#: How many plots (image/png outputs) each notebook must show at least.
MIN_IMAGES = {"01-quick-tour": 3, "02-trace-forensics": 2, "03-validation-audit": 1}


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, int]:
    text, images = [], 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                data = out.get("data", {})
                images += "image/png" in data
                text.append(data.get("text/plain", ""))
                text.append(data.get("text/html", ""))
            elif out.output_type == "error":
                text.append("\n".join(out.traceback))
    return "\n".join(text), images


def test_there_are_notebooks_and_they_are_committed_without_outputs():
    names = {p.stem for p in NOTEBOOKS}
    assert set(EXPECTED) <= names, f"missing notebooks: {set(EXPECTED) - names}"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, \
                    f"{path.name}: strip the outputs before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    env_backend = os.environ.get("MPLBACKEND")
    # the kernel inherits the environment: the notebooks choose the inline backend
    os.environ.pop("MPLBACKEND", None)
    try:
        client = NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
    finally:
        if env_backend is not None:
            os.environ["MPLBACKEND"] = env_backend
    executed = tmp_path / path.name
    nbformat.write(nb, executed)
    text, images = _outputs(nb)
    for expected in EXPECTED.get(path.stem, []):
        assert expected in text, f"{path.name}: no output contains {expected!r}"
    assert images >= MIN_IMAGES.get(path.stem, 1), \
        f"{path.name}: {images} plots in the outputs (executed copy: {executed})"
