"""End-to-end training-step benchmark (BENCHMARK_PROTOCOL.md, "End-to-end benchmark").

    python benchmarks/train_bench.py --config configs/llama_1b.yaml --methods adamw,poet_fast,poet_mem \
        --batch 8 --seq 1024 [--steps 8] [--out results.jsonl] [key=value ...]

For every method, in a fresh subprocess (so that peak memory is the method's own): build the model of
the config with bf16 parameters (``model.param_dtype=bfloat16``, bf16 compute; POET generators and their
Adam state stay float32), jit the run's train step (``poetjax.train.steps.make_train_step``, donated
state), run 2 warm-up steps after compilation, then time ``--steps`` steps on random tokens and report
tokens/s from the median step and the device's peak bytes in use. Methods:

  adamw       the dense baseline on the same JAX model (optax.adamw, moments in the parameter dtype)
  poet_fast   POET-X, variant fast          poet_mem   POET-X, variant mem
  (append ``@impl`` to pick the POET implementation, e.g. ``poet_fast@pallas``; default auto)

A method that fails (e.g. out of memory) is reported with its error and the others still run. The table
is printed last; ``--out`` appends one JSON line per method.
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


def _method_overrides(method: str) -> list[str]:
    name, _, impl = method.partition("@")
    if name == "adamw":
        return ["optimizer.name=adamw"]
    if name in ("poet_fast", "poet_mem"):
        out = ["optimizer.name=poet", f"optimizer.variant={name.split('_')[1]}"]
        return out + ([f"optimizer.impl={impl}"] if impl else [])
    raise ValueError(f"unknown method {method!r}; expected adamw, poet_fast, poet_mem (optionally @xla/@pallas)")


def time_steps(step, state, tokens, steps: int, warmup: int = 2):
    """(state, last metrics, compile seconds, median step seconds): the first call (compilation), then
    ``warmup`` untimed steps, then ``steps`` steps timed one by one."""
    import jax
    import numpy as np

    t0 = time.perf_counter()
    state, m = step(state, tokens)
    jax.block_until_ready(m["loss"])
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, m = step(state, tokens)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = step(state, tokens)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    return state, m, compile_s, float(np.median(times))


def run_one(args, method: str) -> dict:
    """Runs inside the child process: build, compile, time one method."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from poetjax.run_config import load_config
    from poetjax.train.optimizers import make_optimizer
    from poetjax.train.steps import build_model, init_state, make_train_step

    overrides = [f"train.batch_size={args.batch}", f"data.seq_len={args.seq}", "model.param_dtype=bfloat16",
                 "model.dtype=bfloat16", f"model.max_seq_len={max(args.seq, 1)}"]
    overrides += _method_overrides(method) + list(args.overrides)
    cfg = load_config(args.config, overrides)
    dev = jax.devices()[0]
    t0 = time.perf_counter()
    model = build_model(cfg)
    tx = make_optimizer(cfg)
    graphdef, state = init_state(model, tx, jax.random.key(cfg.seed))
    del model
    step = make_train_step(graphdef, tx)
    tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, cfg.model.vocab_size, jnp.int32)
    build_s = time.perf_counter() - t0
    state, m, compile_s, med = time_steps(step, state, tokens, args.steps)
    stats = dev.memory_stats() or {}
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.frozen))
    return {"method": method, "config": args.config, "batch": args.batch, "seq": args.seq,
            "step_ms": med * 1e3, "tokens_per_s": args.batch * args.seq / med,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30, "loss": float(m["loss"]),
            "trainable_params": n_train, "frozen_params": n_frozen, "compile_s": compile_s, "build_s": build_s,
            "device": dev.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--methods", default="adamw,poet_fast,poet_mem")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per method")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args(argv)

    if args.child:  # one method, result as a JSON line on stdout
        print("RESULT " + json.dumps(run_one(args, args.child)), flush=True)
        return 0

    methods = args.methods.split(",")
    for method in methods:
        _method_overrides(method)  # validate every name before spending any time
    results = []
    for method in methods:
        cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps), "--child", method, *args.overrides]
        print(f"== {method}: {' '.join(cmd[1:])}", flush=True)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                lines = [l for l in p.stderr.strip().splitlines()
                         if l.strip() and not l.startswith(("For simplicity", "-----", "  "))]
                err = (lines or ["no output"])[-1]
                res = {"method": method, "error": err[-300:]}
            else:
                res = json.loads(line[len("RESULT "):])
        except subprocess.TimeoutExpired:
            res = {"method": method, "error": f"timed out after {args.timeout} s"}
        print("   " + json.dumps(res), flush=True)
        results.append(res)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**res, "command": " ".join(sys.argv)}) + "\n")

    base = next((r for r in results if r["method"] == "adamw" and "error" not in r), None)
    print(f"\n{args.config}, batch {args.batch} x {args.seq}")
    print(f"{'method':<20}{'step ms':>10}{'tokens/s':>12}{'vs adamw':>10}{'peak GiB':>10}{'trainable':>14}")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<20}  FAILED: {r['error'][:90]}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        print(f"{r['method']:<20}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12.0f}{ratio:>10}{r['peak_gib']:>10.2f}"
              f"{r['trainable_params'] / 1e6:>13.1f}M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
