"""Every notebook in notebooks/ runs end to end, offline, on the demo model: executed with nbclient in a scratch
folder with VDJAX_OFFLINE=1, so the cells that download public weights skip themselves (and say so)."""
from __future__ import annotations

import os

import pytest

from conftest import ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def _outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_the_three_notebooks_are_there():
    assert NOTEBOOKS == ["convert.ipynb", "quickstart.ipynb", "train.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_offline(name, tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    # The kernel inherits this environment: offline, and this checkout's vdjax first on the path.
    monkeypatch.setenv("VDJAX_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    text = _outputs(nb)
    assert f"vdjax in {ROOT}" in text
    skipped = [c for c in nb.cells if c.cell_type == "code" and "if needs_internet(" in c.source]
    assert text.count("Skipped (VDJAX_OFFLINE=1, no internet)") == len(skipped)
    assert skipped or name == "train.ipynb"  # the real-weights path (downloads) is in the other two
    if name == "quickstart.ipynb":
        assert "frame 0 vs the input" in text
    if name == "convert.ipynb":
        assert "saved and reloaded: True" in text
    if name == "train.ipynb":
        assert (tmp_path / "runs" / "notebook_model" / "config.json").is_file()
