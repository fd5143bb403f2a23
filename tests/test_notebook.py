"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a fresh kernel) and shows what it claims."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    folder = os.path.join(ROOT, "notebooks")
    nb = nbformat.read(os.path.join(folder, "quickstart.ipynb"), as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "store the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2  # the loss and the spectrum figures
    poet, adamw = (float(x) for x in re.search(r"drift since step 0: POET (\S+), AdamW (\S+)", text).groups())
    assert poet < 1e-4 < 1e-2 < adamw, text  # exact Cayley keeps the spectrum, AdamW moves it
    diff = float(re.search(r"max \|difference\| of the outputs: (\S+)", text).group(1))
    assert diff <= 1e-5, text
    losses = re.search(r"final loss: POET (\S+), AdamW (\S+)", text).groups()
    assert all(float(x) < 0.1 for x in losses), text  # both learned (the loss starts near 0.3)
