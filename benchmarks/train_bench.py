"""End-to-end training-step benchmark (BENCHMARK_PROTOCOL.md, "End-to-end benchmark").

    python benchmarks/train_bench.py --config configs/llama_1b.yaml --methods adamw,poet_fast,poet_mem \
        --batch 8 --seq 1024 [--steps 8] [--out results.jsonl] [key=value ...]

For every method, in a fresh subprocess (so that peak memory is the method's own): build the model of
the config with bf16 parameters (``model.param_dtype=bfloat16``, bf16 compute; POET generators and their
Adam state stay float32), jit the run's train step (``poetjax.train.steps.make_train_step``, donated
state, compiled with ``train.py``'s options: ``poetjax.train.ahead.train_options``), run 2 warm-up steps
after compilation, then time ``--steps`` steps on random tokens and report tokens/s from the median step
and the device's peak bytes in use. Methods:

  adamw       the dense baseline on the same JAX model (optax.adamw, moments in the parameter dtype)
  poet_fast   POET-X, memory fast           poet_mem   POET-X, memory mem
  poet_xq     POET-XQ (uint8 W0), fast      poet_xq_mem  POET-XQ, mem
  (append ``+key=value`` overrides for that method alone, e.g. ``poet_fast+poet.exec.impl=xla``,
  ``poet_fast+poet.exec.cayley_scope=linear`` or ``adamw+model.remat=none``; for XQ,
  ``+poet.exec.impl=pallas`` also runs the dense matmul through the dequantizing ``qmatmul`` kernel)

Every method also reports where its memory goes: bytes of the frozen base weights (W0, or XQ's codes +
scales + zero points), the permutation indices, the trainable parameters and the optimizer state (the
state the step keeps between steps), the compiled step's temporary bytes (``memory_analysis``), and the
device's peak. The breakdown is printed before the step is compiled, so a method that runs out of
memory still leaves it (with the error) in the table: that is the record of why it does not fit.

``--abstract`` builds nothing: it traces the model and state abstractly and AOT-compiles the step for
the local backend (e.g. the llama_34b shapes on a CPU host, to time compilation); it reports compile
time, the breakdown and the compiled temporaries, but no step time.

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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # profile_summary

from profile_summary import print_summary  # noqa: E402  (stdlib only at import)


def _method_overrides(method: str) -> list[str]:
    method, *extra = method.split("+")
    for kv in extra:
        if "=" not in kv:
            raise ValueError(f"method {method!r}: '+{kv}' is not a key=value override")
    return _base_overrides(method) + extra


METHODS = {"adamw": ["optimizer.name=adamw"],
           "poet_fast": ["optimizer.name=poet"],
           "poet_mem": ["optimizer.name=poet", "poet.memory=mem"],
           "poet_xq": ["optimizer.name=poet", "poet.base=uint8"],
           "poet_xq_mem": ["optimizer.name=poet", "poet.memory=mem", "poet.base=uint8"]}


def _base_overrides(method: str) -> list[str]:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)} "
                         f"(with +key=value overrides)")
    return list(METHODS[method])


def memory_breakdown(state) -> dict:
    """Bytes of what a train state holds between steps, by category."""
    import jax

    def nbytes(tree, keep=lambda name: True):
        return sum(int(x.size) * x.dtype.itemsize for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
                   if keep(str(getattr(p[-1], "key", p[-1]))))

    return {"frozen_w0_bytes": nbytes(state.frozen, lambda n: not n.startswith("perm")),
            "perm_bytes": nbytes(state.frozen, lambda n: n.startswith("perm")),
            "trainable_bytes": nbytes(state.params), "opt_state_bytes": nbytes(state.opt_state)}


def _gib(b) -> str:
    return f"{b / 2 ** 30:.2f}"


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


def _slug(method: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in method)


def profile_steps(compiled, state, tokens, out_dir: str, steps: int = 3) -> dict:
    """Trace ``steps`` more steps into out_dir, save the step's HLO beside the trace, and return the device
    time by source location (``benchmarks/profile_summary.py``; the parent prints it)."""
    import jax

    from profile_summary import summarize, trace

    hlo = compiled.as_text()
    box = [state]

    def one():
        box[0], m = compiled(box[0], tokens)
        jax.block_until_ready(m["loss"])

    trace(one, steps, out_dir)
    with open(os.path.join(out_dir, "step.hlo.txt"), "w") as f:
        f.write(hlo)
    return summarize(out_dir, hlo, steps, out=None)


def run_one(args, method: str) -> dict:
    """Runs inside the child process: build, compile, time one method."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from poetjax.run_config import load_config
    from poetjax.train.ahead import compiler_options, train_options
    from poetjax.train.optimizers import make_optimizer
    from poetjax.train.steps import build_model, init_state, make_train_step

    overrides = [f"train.batch_size={args.batch}", f"data.seq_len={args.seq}", "model.param_dtype=bfloat16",
                 "model.dtype=bfloat16", f"model.max_seq_len={max(args.seq, 1)}"]
    overrides += list(args.overrides) + _method_overrides(method)  # the method's own overrides win
    cfg = load_config(args.config, overrides)
    dev = jax.devices()[0]
    t0 = time.perf_counter()
    tx = make_optimizer(cfg)
    if args.abstract:
        from flax import nnx

        graphdef = nnx.graphdef(nnx.eval_shape(lambda: build_model(cfg)))
        state = jax.eval_shape(lambda: init_state(build_model(cfg), tx, jax.random.key(cfg.seed))[1])
        tokens = jax.ShapeDtypeStruct((args.batch, args.seq + 1), jnp.int32)
    else:
        model = build_model(cfg)
        graphdef, state = init_state(model, tx, jax.random.key(cfg.seed))
        del model
        tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, cfg.model.vocab_size,
                                    jnp.int32)
    build_s = time.perf_counter() - t0
    breakdown = memory_breakdown(state)
    if not args.abstract:
        breakdown["after_build_bytes_in_use"] = (dev.memory_stats() or {}).get("bytes_in_use", 0)
    print("BREAKDOWN " + json.dumps(breakdown), flush=True)
    step = make_train_step(graphdef, tx)
    t0 = time.perf_counter()
    options = compiler_options(train_options(cfg.model.hidden_size))
    compiled = step.lower(state, tokens).compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    ma = compiled.memory_analysis()
    breakdown["step_temp_bytes"] = int(getattr(ma, "temp_size_in_bytes", 0) or 0)
    print("BREAKDOWN " + json.dumps(breakdown), flush=True)
    n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.frozen))
    res = {"method": method, "config": args.config, "batch": args.batch, "seq": args.seq, "compile_s": compile_s,
           "build_s": build_s, "trainable_params": n_train, "frozen_params": n_frozen, **breakdown,
           "device": dev.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    if args.abstract:
        return {**res, "abstract": True}
    # The executable's first call runs (compilation was timed above); time_steps adds 2 warm-up steps.
    state, m, _, med = time_steps(compiled, state, tokens, args.steps)
    stats = dev.memory_stats() or {}
    if args.profile:
        res["profile"] = profile_steps(compiled, state, tokens, os.path.join(args.profile, _slug(method)))
    return {**res, "step_ms": med * 1e3, "tokens_per_s": args.batch * args.seq / med,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30, "peak_bytes": stats.get("peak_bytes_in_use", 0),
            "loss": float(m["loss"])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--methods", default="adamw,poet_fast,poet_mem")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--timeout", type=int, default=600, help="seconds per method")
    ap.add_argument("--out", default="")
    ap.add_argument("--abstract", action="store_true", help="trace + AOT-compile only (no device memory needed)")
    ap.add_argument("--profile", default="", help="trace 3 more steps per method into DIR/<method> and print the "
                                                   "device time by source location (profile_summary.py); "
                                                   "turns XLA's CUDA graphs off for those methods")
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
               "--seq", str(args.seq), "--steps", str(args.steps), "--child", method,
               *(["--abstract"] if args.abstract else []),
               *(["--profile", os.path.abspath(args.profile)] if args.profile else []), *args.overrides]
        print(f"== {method}: {' '.join(cmd[1:])}", flush=True)
        env = dict(os.environ)
        if args.profile:  # CUDA graphs hide which HLO op a kernel belongs to: off for profiled methods
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=").strip()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                lines = [l for l in p.stderr.strip().splitlines()
                         if l.strip() and not l.startswith(("For simplicity", "-----", "  "))]
                err = (lines or ["no output"])[-1]
                res = {"method": method, "error": err[-300:]}
                # the last memory breakdown the child got to print: what it held when it failed
                known = [l for l in p.stdout.splitlines() if l.startswith("BREAKDOWN ")]
                if known:
                    res.update(json.loads(known[-1][len("BREAKDOWN "):]))
            else:
                res = json.loads(line[len("RESULT "):])
        except subprocess.TimeoutExpired as e:
            res = {"method": method, "error": f"timed out after {args.timeout} s"}
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            known = [l for l in out.splitlines() if l.startswith("BREAKDOWN ")]
            if known:
                res.update(json.loads(known[-1][len("BREAKDOWN "):]))
        if "profile" in res:
            print_summary(res["profile"])
        print("   " + json.dumps({k: v for k, v in res.items() if k != "profile"}), flush=True)
        results.append(res)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({**res, "command": " ".join(sys.argv)}) + "\n")

    base = next((r for r in results if r["method"] == "adamw" and "error" not in r), None)
    print(f"\n{args.config}, batch {args.batch} x {args.seq}")
    w = max([20] + [len(r["method"]) + 2 for r in results])
    print(f"{'method':<{w}}{'step ms':>10}{'tokens/s':>12}{'vs adamw':>10}{'peak GiB':>10}{'trainable':>14}")
    for r in results:
        if "error" in r:
            print(f"{r['method']:<{w}}  FAILED: {r['error'][:90]}")
        elif "step_ms" not in r:
            print(f"{r['method']:<{w}}  compiled in {r['compile_s']:.1f} s (abstract; built in {r['build_s']:.1f} s)")
        else:
            ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
            print(f"{r['method']:<{w}}{r['step_ms']:>10.1f}{r['tokens_per_s']:>12.0f}{ratio:>10}{r['peak_gib']:>10.2f}"
                  f"{r['trainable_params'] / 1e6:>13.1f}M")
    print("\nmemory by category, GiB (state kept between steps; temporaries of the compiled step; device peak)")
    print(f"{'method':<{w}}{'frozen W0':>11}{'perms':>8}{'trainable':>11}{'opt state':>11}{'step temp':>11}{'peak':>8}")
    for r in results:
        if "frozen_w0_bytes" not in r:
            continue
        temp = _gib(r["step_temp_bytes"]) if "step_temp_bytes" in r else "-"
        peak = _gib(r["peak_bytes"]) if "peak_bytes" in r else "-"
        print(f"{r['method']:<{w}}{_gib(r['frozen_w0_bytes']):>11}{_gib(r['perm_bytes']):>8}"
              f"{_gib(r['trainable_bytes']):>11}{_gib(r['opt_state_bytes']):>11}{temp:>11}{peak:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
