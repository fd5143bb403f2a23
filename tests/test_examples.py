"""The README's example runs and learns."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_poetize_mlp_example_learns():
    spec = importlib.util.spec_from_file_location("poetize_mlp", os.path.join(ROOT, "examples", "poetize_mlp.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    losses = mod.main(steps=120, verbose=False)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
