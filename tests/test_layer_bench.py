"""benchmarks/layer_bench.py on CPU: with chunked permutations every implementation agrees with the feature-major one."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import layer_bench  # noqa: E402


def test_tiny_chunked_run_checks_every_implementation(tmp_path, capsys):
    out = tmp_path / "layers.jsonl"
    layer_bench.main(["--tiny", "--impls", "pallas_f,pallas,xla,weight", "--perm-chunk", "16",
                      "--variants", "fast", "--no-cayley", "--out", str(out)])
    text = capsys.readouterr().out
    assert "MISMATCH" not in text and "FAILED" not in text, text
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    layers = {r["impl"]: r for r in recs if r.get("kind") == "layer" and r["variant"] == "fast"}
    assert set(layers) == {"pallas_f", "pallas", "xla", "weight"}
    # every implementation after the first was checked against it before timing, and matched
    assert all(layers[i]["matches_xla"] is True for i in ("pallas", "xla", "weight"))
    assert all(layers[i]["perm_chunk"] == 16 for i in layers)
