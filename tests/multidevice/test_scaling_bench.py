"""benchmarks/scaling_bench.py on 8 virtual devices with the tiny config (a smoke run: the program the
multi-GPU measurement runs, not its numbers)."""

import json
import math
import os
import sys

from _runs import ROOT, TINY

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import scaling_bench  # noqa: E402


def test_scaling_bench_runs_every_layout_on_1_and_8_devices(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert scaling_bench.main(["--config", TINY, "--methods", "poet_fast,adamw,poet_mem:fsdp", "--devices", "1,8",
                               "--batch-per-device", "1", "--seq", "16", "--steps", "1", "--inprocess",
                               "--out", str(out), "model.num_layers=1"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["method"], r["devices"]) for r in rows] == [
        ("poet_fast:dp", 1), ("poet_fast:dp", 8), ("adamw:fsdp", 1), ("adamw:fsdp", 8), ("poet_mem:fsdp", 1),
        ("poet_mem:fsdp", 8)]
    for r in rows:
        assert "error" not in r and math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert math.isclose(r["tokens_per_s_per_device"] * r["devices"], r["tokens_per_s"])
    eff = scaling_bench.efficiency(rows)
    assert math.isclose(eff[("adamw:fsdp", 8)], rows[3]["tokens_per_s"] / (8 * rows[2]["tokens_per_s"]))
    assert eff[("poet_fast:dp", 1)] == 1.0
    printed = capsys.readouterr().out
    assert "efficiency" in printed and "poet_mem:fsdp" in printed


def test_scaling_bench_rejects_bad_methods():
    import pytest

    with pytest.raises(ValueError, match=r"layout of 'adamw:tp' must be one of \('dp', 'fsdp'\), got 'tp'"):
        scaling_bench.parse_method("adamw:tp")
    with pytest.raises(ValueError, match=r"unknown method 'sgd'"):
        scaling_bench.parse_method("sgd")
