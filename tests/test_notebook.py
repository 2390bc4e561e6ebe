"""notebooks/quickstart.ipynb runs end to end (nbclient, a fresh kernel, CPU)."""
import os
import re

import nbformat
import pytest
from nbclient import NotebookClient

import tiny   # tests/tiny.py

pytestmark = pytest.mark.slow   # processes / loops: the full suite only (tests/README.md)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(monkeypatch):
    nb = nbformat.read(os.path.join(ROOT, "notebooks", "quickstart.ipynb"), as_version=4)
    # The kernel inherits this environment: one CPU device, as a Colab CPU runtime has (and
    # no 8-way partitioned programs to compile); the compilation cache is the session's.
    monkeypatch.setenv("XLA_FLAGS", tiny.xla_flags(1))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}})
    client.execute()
    outputs = ["".join(o.get("text", "") for o in cell.get("outputs", [])) for cell in nb.cells
               if cell.cell_type == "code"]
    text = "\n".join(outputs)
    assert "step 30: loss" in text
    assert "a sampled caption:" in text
    grad_norm = float(re.search(r"grad_norm ([0-9.]+)", text).group(1))
    assert grad_norm > 0, text[-1000:]   # the GRPO step had informative groups and moved the policy
    images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the sampling cell displays an image grid"
