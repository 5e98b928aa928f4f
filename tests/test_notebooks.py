"""Both notebooks run top to bottom in tiny mode (nbclient), so they cannot rot."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["clair_data", "quickstart"])
def test_notebook_runs_in_tiny_mode(name, tmp_path, monkeypatch):
    monkeypatch.setenv("APO_JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("APO_JAX_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    resources = {"metadata": {"path": str(ROOT)}}
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources)
    client.execute()
    cells = [c for c in nb.cells if c.cell_type == "code"]
    outputs = "".join(o.get("text", "") for c in cells for o in c.get("outputs", []))
    if name == "clair_data":
        assert "'revised': 5" in outputs and "jaccard_mean" in outputs
    else:
        assert "positive control" in outputs and "Held-out accuracy" in outputs
