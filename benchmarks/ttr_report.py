"""Where the wall-clock of train.py runs went: one row per run directory, from its timing record.

    python benchmarks/ttr_report.py RUN_DIR [RUN_DIR ...]

Columns (seconds unless noted): data, building the model (part of build), build, first diagnostics call,
first step, start to first step, the train step's and the diagnostics program's compiles (each compiled
ahead, side by side), first merge, slowest later merge, diagnostics' share of the loop (%), whole
run, the loop's median step in milliseconds (from the logged tokens/s: what the device sustained on the
run's own data, which a random-token benchmark can miss), steps, final validation perplexity. The last line
gives each run's whole-run time as a ratio to the first completed run named "adamw" among the arguments, if
there is one.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

COLUMNS = [("data", "data_s"), ("model", "model_s"), ("build", "build_s"), ("diag0", "first_diagnostics_s"),
           ("step1", "first_step_s"), ("to step1", "to_first_step_s"), ("cmp step", "compile_train_s"),
           ("cmp diag", "compile_diagnostics_s"), ("merge1", "first_merge_s"),
           ("merge max", "later_merge_max_s"), ("diag %", "diagnostics_share"), ("total", "total_s")]


def timing_of(run_dir: str) -> tuple[dict, dict, float | None]:
    """(the last timing record, the last final evaluation, the median logged step in ms) of a run directory's
    metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"{path}: no such file (is {run_dir!r} a train.py run directory?)")
    timing, final, step_ms = {}, {}, []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("tokens_per_s") and rec.get("step"):
                step_ms.append(1e3 * rec["tokens"] / rec["step"] / rec["tokens_per_s"])
            if rec.get("kind") == "timing":
                timing = rec
            elif rec.get("final"):
                final = rec
    if not timing:
        raise SystemExit(f"{path}: no timing record (the run did not finish an invocation)")
    return timing, final, (statistics.median(step_ms) if step_ms else None)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    runs = [(os.path.basename(os.path.normpath(d)), *timing_of(d)) for d in argv]
    rows = [(name, t, final) for name, t, final, _ in runs]
    w = max(12, *(len(name) + 1 for name, _, _ in rows))
    print(f"{'run':{w}s}" + "".join(f"{c:>10s}" for c, _ in COLUMNS) + f"{'step ms':>9s}{'steps':>7s}{'val ppl':>9s}")
    for name, t, final, ms in runs:
        cells = []
        for _, key in COLUMNS:
            v = t.get(key)
            cells.append("-" if v is None else f"{100 * v:.2f}" if key == "diagnostics_share" else f"{v:.1f}")
        ppl = f"{final['val_ppl']:.2f}" if final else "-"
        step_ms = "-" if ms is None else f"{ms:.1f}"
        print(f"{name:{w}s}" + "".join(f"{c:>10s}" for c in cells) + f"{step_ms:>9s}{t['step']:>7d}{ppl:>9s}")
    base = next(((n, t) for n, t, f in rows if n == "adamw" and f), None)
    if base:
        ratios = ", ".join(f"{n} {t['total_s'] / base[1]['total_s']:.2f}x" for n, t, f in rows if f)
        print(f"whole run vs adamw: {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
