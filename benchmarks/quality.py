"""Quality runs (issue 11): several ``train.py`` rows at one token budget, run side by side, then one table.

    python benchmarks/quality.py --rows adamw_1e-3,poet_b256 --out runs/quality [--parallel 4] \
        [--timeout 540] [--config configs/quality/gutenberg_60m.yaml] [key=value ...]

Every row is one ``python train.py --config <config> <row overrides> <extra overrides> name=<row>
out_dir=<out>`` in its own process (the command is printed, so a single row can be rerun by hand). Rows
run ``--parallel`` at a time on the same accelerator; a small model leaves most of an H100 idle between
kernel launches, so sharing it costs little per run. Side by side, the processes allocate GPU memory as
they need it instead of each preallocating an equal slice (equal slices ran out where a POET row's train
step needed more than its share: BENCHMARKS.md, series E). A row whose folder already holds a run stops
the whole call before anything starts: its old metrics would otherwise stand in the table as a new result.
A row that fails or runs past ``--timeout`` is reported as such and keeps its log and metrics.

After the runs: ``<out>/quality.md`` (the table: final validation perplexity over the whole held-out
split, tokens seen, wall time, tokens/s, seconds to the first step and of the first merge from the run's
timing record), ``<out>/quality_curves.png`` (training loss and validation
perplexity against tokens) and, with ``--spectra``, each run's singular values of every transformer
weight at step 0 and at the end (``benchmarks/run_spectra.py``: ``<out>/<row>/spectra.npz``, plotted in
``quality_spectra.png``) with the largest relative change of any of them as a table column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIG = "configs/quality/gutenberg_60m.yaml"

# The rows of RESULTS.md. Learning rates follow POET_SPEC §7.2 (POET, Tables 9/10 for LLaMA-60M: BS
# b=256 -> POET lr 1e-3, b=128 -> 2e-3) and the AdamW sweep values of the papers' grid.
ROWS: dict[str, list[str]] = {
    "adamw_5e-4": ["optimizer.name=adamw", "optimizer.lr=5e-4"],
    "adamw_1e-3": ["optimizer.name=adamw", "optimizer.lr=1e-3"],
    "adamw_2e-3": ["optimizer.name=adamw", "optimizer.lr=2e-3"],
    "muon": ["optimizer.name=muon", "optimizer.lr=1e-3", "optimizer.muon_lr=0.02"],
    # POET with the paper's LLaMA-60M base lr 1e-2 (embedding, norms, lm_head) ...
    "poet_b256": ["optimizer.name=poet", "poet.block_size=256", "optimizer.poet_lr=1e-3"],
    "poet_b128": ["optimizer.name=poet", "poet.block_size=128", "optimizer.poet_lr=2e-3"],
    "poet_b256_plr2e-3": ["optimizer.name=poet", "poet.block_size=256", "optimizer.poet_lr=2e-3"],
    # ... and with the base lr of the tuned AdamW row (1e-3).
    "poet_b256_base1e-3": ["optimizer.name=poet", "poet.block_size=256", "optimizer.poet_lr=1e-3",
                           "optimizer.lr=1e-3"],
    "poet_b256_base1e-3_plr2e-3": ["optimizer.name=poet", "poet.block_size=256", "optimizer.poet_lr=2e-3",
                                   "optimizer.lr=1e-3"],
    "poet_b128_base1e-3": ["optimizer.name=poet", "poet.block_size=128", "optimizer.poet_lr=2e-3",
                           "optimizer.lr=1e-3"],
}
# The levers of issue 26 (poetjax.lie, POETConfig.init/init_scale), each alone on the best POET row
# (poet_b256_plr2e-3), then the best combination. A learning-rate grid is a row per value, e.g.
# "lever_ns+optimizer.poet_lr=2e-2" (a later override wins).
_POET = ROWS["poet_b256_plr2e-3"]
_LEVERS = {
    "mup4": ["poet.init=mup", "poet.init_scale=4"],
    "nesterov": ["optimizer.generator_update=momentum", "optimizer.poet_lr=2e-2"],
    "nesterov_carry": ["optimizer.generator_update=momentum", "optimizer.carry_moment=true", "optimizer.poet_lr=2e-2"],
    # ns needs the exact Cayley map (RunConfig refuses the series: merges moved the spectrum, series E)
    "ns": ["optimizer.generator_update=ns", "poet.cayley=exact", "optimizer.poet_lr=1e-2"],
    "ns_cap": ["optimizer.generator_update=ns", "poet.cayley=exact", "optimizer.poet_lr=1e-2",
               "optimizer.max_angle=0.1"],
    "alternate": ["optimizer.alternate_sides=true"],
}
ROWS.update({f"lever_{name}": _POET + extra for name, extra in _LEVERS.items()})
# The best combination: Newton–Schulz with the exact Cayley map (series F in RESULTS.md: 1.023x Muon, largest
# σ change 0.011); the angle cap, alternating sides, Nesterov momentum alone and μP x4 measured worse.
ROWS["lever_best"] = ROWS["lever_ns"]


def row_overrides(row: str) -> list[str]:
    """A named row; a named row with more overrides, ``name+key=value+key=value`` (a learning-rate grid:
    ``lever_ns+optimizer.poet_lr=5e-3``); or ``name:key=value;key=value`` for an ad-hoc one."""
    if ":" in row:
        _, _, spec = row.partition(":")
        return [kv for kv in spec.split(";") if kv]
    base, *extra = row.split("+")
    if base not in ROWS:
        raise SystemExit(f"unknown row {base!r}; known: {', '.join(ROWS)} (or name:key=value;key=value)")
    bad = [kv for kv in extra if "=" not in kv]
    if bad:
        raise SystemExit(f"row {row!r}: {bad[0]!r} is not key=value")
    return list(ROWS[base]) + extra


def row_name(row: str) -> str:
    """The run's folder name: ``lever_ns+optimizer.poet_lr=5e-3`` -> ``lever_ns_poet_lr5e-3``."""
    if ":" in row:
        return row.partition(":")[0]
    base, *extra = row.split("+")
    return "".join([base] + [f"_{key.rsplit('.', 1)[-1]}{value}" for key, _, value in
                             (kv.partition("=") for kv in extra)])


def command(config: str, row: str, out: str, extra: list[str]) -> list[str]:
    return [sys.executable, "train.py", "--config", config, *row_overrides(row), *extra,
            f"name={row_name(row)}", f"out_dir={out}"]


def launch(rows: list[str], args) -> dict[str, dict]:
    env = dict(os.environ)
    if args.parallel > 1:
        env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    pending, running, done = list(rows), {}, {}
    os.makedirs(args.out, exist_ok=True)
    while pending or running:
        while pending and len(running) < args.parallel:
            row = pending.pop(0)
            cmd = command(args.config, row, args.out, args.overrides)
            log = open(os.path.join(args.out, f"{row_name(row)}.log"), "w")
            print("$ " + " ".join(cmd[1:]), flush=True)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running[row] = (proc, log, time.time())
        time.sleep(2)
        for row, (proc, log, t0) in list(running.items()):
            rc = proc.poll()
            timed_out = rc is None and time.time() - t0 > args.timeout
            if timed_out:
                proc.kill()
                rc = proc.wait()
            if rc is not None:
                log.close()
                done[row] = {"rc": rc, "timed_out": timed_out, "wall_s": time.time() - t0}
                print(f"  {row_name(row)}: {'timed out' if timed_out else f'exit {rc}'} "
                      f"after {time.time() - t0:.0f}s", flush=True)
                del running[row]
    return done


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def row_spectra(rows: list[str], args) -> dict[str, float]:
    """{row: largest relative change of a singular value from step 0} of every row with a final checkpoint,
    and their spectra plotted into ``<out>/quality_spectra.png``."""
    from benchmarks.run_spectra import largest_change, plot, run_spectra
    from poetjax.checkpoint import CheckpointError

    runs = {}
    for name in map(row_name, rows):
        try:
            runs[name] = run_spectra(os.path.join(args.out, name))
        except (OSError, CheckpointError) as e:  # a row stopped before its final checkpoint
            print(f"spectra of {name}: skipped ({e})", flush=True)
    if runs:
        plot(runs, os.path.join(args.out, "quality_spectra.png"))
    return {name: largest_change(sp) for name, sp in runs.items()}


def summarize(rows: list[str], done: dict, args, spectra: dict) -> list[dict]:
    from poetjax.run_config import load_config

    table = []
    for row in rows:
        name = row_name(row)
        cfg = load_config(args.config, row_overrides(row) + list(args.overrides))
        run_dir = os.path.join(args.out, name)
        summary = {}
        if os.path.exists(os.path.join(run_dir, "summary.json")):
            with open(os.path.join(run_dir, "summary.json")) as f:
                summary = json.load(f)
        metrics = read_metrics(run_dir)
        rates = [m["tokens_per_s"] for m in metrics if m.get("tokens_per_s")]
        status = done.get(row, {})
        table.append({
            "row": name, "overrides": " ".join(row_overrides(row)),
            "val_ppl": summary.get("val_ppl"), "step": summary.get("step", max([m["step"] for m in metrics], default=0)),
            "tokens": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len,
            "tokens_per_s": sorted(rates)[len(rates) // 2] if rates else None,
            "wall_s": status.get("wall_s"), "rc": status.get("rc"), "timed_out": status.get("timed_out", False),
            "to_first_step_s": summary.get("timing", {}).get("to_first_step_s"),
            "first_merge_s": summary.get("timing", {}).get("first_merge_s"),
            "sigma_change": spectra.get(name),
        })
    return table


def write_table(table: list[dict], args) -> str:
    lines = ["| row | overrides | val PPL | steps | tokens | tokens/s (median, shared GPU) | wall s "
             "| to first step s | first merge s | largest σ change | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    secs = lambda v: f"{v:.0f}" if v is not None else "—"
    for r in table:
        ppl = f"{r['val_ppl']:.2f}" if r["val_ppl"] else "—"
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "—"
        wall = f"{r['wall_s']:.0f}" if r["wall_s"] else "—"
        status = ("timed out" if r["timed_out"] else "ok" if r["rc"] == 0 else
                  "collected" if r["rc"] is None else f"exit {r['rc']}")
        sigma = f"{r['sigma_change']:.3g}" if r["sigma_change"] is not None else "—"
        lines.append(f"| {r['row']} | `{r['overrides']}` | {ppl} | {r['step']} | {r['tokens']:,} | {tps} | {wall} "
                     f"| {secs(r['to_first_step_s'])} | {secs(r['first_merge_s'])} | {sigma} | {status} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(table, f, indent=1)
    return text


def plot_curves(rows: list[str], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poetjax.run_config import load_config

    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        name = row_name(row)
        cfg = load_config(args.config, row_overrides(row) + list(args.overrides))
        per_step = cfg.train.batch_size * cfg.data.seq_len
        ms = read_metrics(os.path.join(args.out, name))
        tr = [(m["step"] * per_step / 1e6, m["loss"]) for m in ms if "loss" in m]
        va = [(m["step"] * per_step / 1e6, m["val_ppl"]) for m in ms if "val_ppl" in m]
        if tr:
            ax_l.plot(*zip(*tr), label=name, lw=1)
        if va:
            ax_v.plot(*zip(*va), marker="o", ms=3, label=name)
    ax_l.set(xlabel="training tokens (millions)", ylabel="training loss (nats/token)", title="Training loss")
    ax_v.set(xlabel="training tokens (millions)", ylabel="validation perplexity",
             title="Validation perplexity (held-out author)\n(periodic: eval_batches batches; last point: whole split)")
    for ax in (ax_l, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "quality_curves.png"), dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", required=True, help="comma-separated row names (see ROWS) or name:k=v;k=v")
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--parallel", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per row before it is stopped")
    ap.add_argument("--collect-only", action="store_true", help="only rebuild the table and plots from --out")
    ap.add_argument("--spectra", action="store_true",
                    help="singular values of every row's weights at step 0 and at its final checkpoint")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every row")
    args = ap.parse_args(argv)
    rows = [r for r in args.rows.split(",") if r]
    from poetjax.run_config import load_config

    for row in rows:  # unknown rows, invalid configs and earlier runs in the way fail before anything runs
        load_config(args.config, row_overrides(row) + list(args.overrides))
        run_dir = os.path.join(args.out, row_name(row))
        if not args.collect_only and os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise SystemExit(f"{run_dir} already holds a run; remove it or pick another --out (--collect-only "
                             f"rebuilds the table from it)")
    done = {} if args.collect_only else launch(rows, args)
    spectra = row_spectra(rows, args) if args.spectra else {}
    table = summarize(rows, done, args, spectra)
    plot_curves(rows, args)
    print(write_table(table, args))
    return 0 if all(r["val_ppl"] for r in table) else 1


if __name__ == "__main__":
    sys.exit(main())
