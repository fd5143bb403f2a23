"""Multi-device scaling of the sharded training step: tokens/s per device on 1, 2, 4, 8 devices at a fixed
per-device batch, and the scaling efficiency tokens/s(n) / (n · tokens/s(1)).

    python benchmarks/scaling_bench.py --config configs/llama_1b.yaml --devices 1,2,4,8 \
        --methods poet_fast,poet_mem,adamw --batch-per-device 8 --seq 1024 [--steps 8] [--out r.jsonl] [k=v ...]

Methods as in ``train_bench.py`` (adamw, poet_fast, poet_mem, with ``+key=value`` overrides), each with
a layout after a colon: ``poet_fast:dp`` (W0 replicated, only the trainable leaves all-reduced: the
default for POET), ``poet_fast:fsdp`` (W0 split over the devices too), ``adamw:fsdp`` (the default for
AdamW: ZeRO-3, every weight and its Adam moments split) or ``adamw:dp``. Every (method, n) runs in a
fresh subprocess on the first n devices (``--inprocess`` runs them all in this process instead), with
bf16 weights and compute as in ``train_bench.py``, random tokens, 2 warm-up steps after compilation and
the median of ``--steps`` timed steps.

A CPU smoke run on 8 virtual devices (the numbers mean nothing there, the program is the same):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python benchmarks/scaling_bench.py \
        --config configs/tiny.yaml --devices 1,2,4,8 --batch-per-device 1 --seq 32 --steps 2 --inprocess
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_bench import _method_overrides, time_steps  # noqa: E402  (shared with the single-device benchmark)

LAYOUTS = ("dp", "fsdp")


def parse_method(spec: str) -> tuple[str, str]:
    """"poet_fast:fsdp" → ("poet_fast", "fsdp"); the layout defaults to dp for POET, fsdp for AdamW."""
    method, _, layout = spec.partition(":")
    _method_overrides(method)  # raises on an unknown method
    layout = layout or ("fsdp" if method.startswith("adamw") else "dp")
    if layout not in LAYOUTS:
        raise ValueError(f"layout of {spec!r} must be one of {LAYOUTS}, got {layout!r}")
    return method, layout


def measure(config: str, spec: str, n: int, batch_per_device: int, seq: int, steps: int,
            overrides=()) -> dict:
    """Build, compile and time the sharded train step of ``spec`` on the first ``n`` devices."""
    import jax
    import jax.numpy as jnp

    from poetjax import distributed as dist
    from poetjax.train import sharded
    from poetjax.run_config import load_config
    from poetjax.train.optimizers import make_optimizer

    method, layout = parse_method(spec)
    if n > jax.device_count():
        raise ValueError(f"--devices asks for {n} devices, this process has {jax.device_count()}")
    data, fsdp = (n, 1) if layout == "dp" else (1, n)
    batch = n * batch_per_device
    cfg = load_config(config, [f"train.batch_size={batch}", f"data.seq_len={seq}", f"model.max_seq_len={seq}",
                               "model.param_dtype=bfloat16", "model.dtype=bfloat16", "train.microbatches=1",
                               f"mesh.data={data}", f"mesh.fsdp={fsdp}", *_method_overrides(method),
                               *overrides])
    mesh = dist.make_mesh(data, fsdp, jax.devices()[:n])
    t0 = time.perf_counter()
    tx = make_optimizer(cfg)
    graphdef, state, shardings = sharded.init_train_state(cfg, tx, mesh)
    step = sharded.make_sharded_train_step(graphdef, tx, shardings, mesh)
    tokens = jax.device_put(jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.model.vocab_size,
                                               jnp.int32), dist.batch_sharding(mesh))
    build_s = time.perf_counter() - t0
    state, m, compile_s, med = time_steps(step, state, tokens, steps)
    dev = jax.devices()[0]
    return {"method": spec if ":" in spec else f"{method}:{layout}", "devices": n, "config": config,
            "batch_per_device": batch_per_device, "seq": seq, "step_ms": med * 1e3,
            "tokens_per_s": batch * seq / med, "tokens_per_s_per_device": batch * seq / med / n,
            "loss": float(m["loss"]), "compile_s": compile_s, "build_s": build_s, "device": dev.device_kind,
            "platform": dev.platform, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}


def efficiency(results: list[dict]) -> dict[tuple[str, int], float]:
    """{(method, n): tokens/s(n) / (n · tokens/s(1))} for every method measured on 1 device."""
    one = {r["method"]: r["tokens_per_s"] for r in results if "error" not in r and r["devices"] == 1}
    return {(r["method"], r["devices"]): r["tokens_per_s"] / (r["devices"] * one[r["method"]])
            for r in results if "error" not in r and r["method"] in one}


def table(results: list[dict]) -> str:
    eff = efficiency(results)
    lines = [f"{'method':<20}{'n':>4}{'step ms':>10}{'tok/s':>12}{'tok/s/dev':>12}{'efficiency':>12}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['method']:<20}{r['devices']:>4}  FAILED: {r['error'][:80]}")
            continue
        e = eff.get((r["method"], r["devices"]))
        lines.append(f"{r['method']:<20}{r['devices']:>4}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12.0f}"
                     f"{r['tokens_per_s_per_device']:>12.0f}{'-' if e is None else f'{e:.3f}':>12}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--methods", default="poet_fast,poet_mem,adamw")
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--batch-per-device", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=900, help="seconds per (method, n) subprocess")
    ap.add_argument("--inprocess", action="store_true", help="no subprocesses (CPU smoke runs)")
    ap.add_argument("--out", default="")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = ap.parse_args(argv)
    specs = [s for s in args.methods.split(",") if s]
    counts = [int(x) for x in args.devices.split(",") if x]
    for s in specs:
        parse_method(s)  # every name checked before any time is spent
    common = (args.batch_per_device, args.seq, args.steps, args.overrides)

    if args.child:  # one (method, n): a JSON line on stdout
        spec, n = args.child.rsplit("@n=", 1)
        print("RESULT " + json.dumps(measure(args.config, spec, int(n), *common)), flush=True)
        return 0

    results = []
    for spec in specs:
        for n in counts:
            if args.inprocess:
                res = measure(args.config, spec, n, *common)
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch-per-device",
                       str(args.batch_per_device), "--seq", str(args.seq), "--steps", str(args.steps),
                       "--child", f"{spec}@n={n}", *args.overrides]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
                    res = (json.loads(line[len("RESULT "):]) if line else
                           {"method": spec, "devices": n, "error": (p.stderr.strip().splitlines() or ["no output"])[-1]})
                except subprocess.TimeoutExpired:
                    res = {"method": spec, "devices": n, "error": f"timed out after {args.timeout} s"}
            print("   " + json.dumps(res), flush=True)
            results.append(res)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps({**res, "command": " ".join(sys.argv)}) + "\n")
    print(f"\n{args.config}, {args.batch_per_device} x {args.seq} tokens per device")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
