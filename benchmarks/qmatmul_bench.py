"""POET-XQ layer benchmark: the uint8 base-weight matmul, Pallas (dequantize inside the kernel) vs XLA.

Two tables, both forward + backward with bf16 activations, timed as in BENCHMARK_PROTOCOL.md (jit, two
warm-ups, median of 7 repeats of a 20-call loop) and with the compiled temporaries of each program:

* matmul: (y, dx) of y = x @ W for the frozen weight — dense bf16 W (no dW: W is frozen), XLA on the
  uint8 weight (``poetjax.quant.quantized_matmul``: dequantize, then cuBLAS; the backward dequantizes
  again), and the Pallas kernel (``pallas_kernels.qmatmul``: dequantizes tiles in registers);
* layer: the whole POET layer (y, dx, dθ_in, dθ_out) — POET-X fast with a bf16 W0, and XQ fast / mem with
  impl xla and pallas (pallas also runs the rotations through the block kernels).

Before timing, every quantized result is checked against the dense bf16 result on the dequantized weight.

    python benchmarks/qmatmul_bench.py                 # the default shapes (a few minutes on the H100)
    python benchmarks/qmatmul_bench.py --tiny          # seconds, runs on CPU (Pallas in interpret mode)
    python benchmarks/qmatmul_bench.py --out results.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from layer_bench import (Recorder, compile_fn, device_line, make_inputs, poet_fn, short_error,  # noqa: E402
                         time_ms)
import pallas_kernels as pk  # noqa: E402
from poetjax import quant  # noqa: E402
from poetjax.testing import rel_err, tolerance  # noqa: E402

# (T, N, M, block size): Llama-8B (4096, 14336) and Llama-34B (8192, 22016) projections.
CASES = [(t, n, m, 256) for t in (2048, 16384) for n, m in ((4096, 4096), (4096, 14336), (14336, 4096),
                                                             (8192, 22016), (22016, 8192))]
TINY_CASES = [(100, 64, 96, 32)]


def matmul_fns(interpret: bool):
    def dense(x, w, g):
        y, vjp = jax.vjp(lambda x: x @ w, x)
        return y, vjp(g)[0]

    def xla(x, codes, scale, zero, g):
        y, vjp = jax.vjp(lambda x: quant.quantized_matmul(x, codes, scale, zero), x)
        return y, vjp(g)[0]

    def pallas(x, codes, scale, zero, g):
        y, vjp = jax.vjp(lambda x: pk.qmatmul(x, codes, scale, zero, interpret=interpret), x)
        return y, vjp(g)[0]

    return dense, xla, pallas


def run_case(case, group, rec, args, interpret):
    t, n, m, k = case
    label = f"T={t} {n}->{m} b={k} G={group}"
    d = make_inputs(t, n, m, k)
    qw = quant.quantize(d["w0"].astype(jnp.float32), group)
    w_hat = quant.dequantize(qw, jnp.bfloat16)  # the weight both sides compute with
    dense, xla, pallas = matmul_fns(interpret)
    results = {}
    rows = [("dense bf16 W", dense, (d["x"], w_hat, d["g"])),
            ("xq xla", xla, (d["x"], *qw, d["g"])),
            ("xq pallas", pallas, (d["x"], *qw, d["g"]))]
    for name, fn, fargs in rows:
        try:
            compiled, temp = compile_fn(fn, *fargs)
            out = compiled(*fargs)
            if name != rows[0][0]:
                err = max(rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) for a, b in zip(out, results["ref"]))
                if err > tolerance(jnp.bfloat16, "value"):
                    raise AssertionError(f"relative error {err:.2e} vs the dense matmul on Ŵ")
            else:
                results["ref"] = out
            ms = time_ms(compiled, fargs, args.repeats, args.inner)
            rec.add(kind="matmul", case=label, method=name, ms=ms, temp_bytes=temp, device=device_line())
            print(f"matmul {label:<34} {name:<14} {ms:9.3f} ms  temp {temp or 0:>12,} B", flush=True)
        except Exception as e:  # noqa: BLE001 — report and go on
            rec.add(kind="matmul", case=label, method=name, error=short_error(e))
            print(f"matmul {label:<34} {name:<14} FAILED {short_error(e)}", flush=True)
    layer_rows = [("poet fast bf16", "fast", "xla", d["w0"]), ("xq xla", "fast", "xla", qw),
                  ("xq_mem xla", "mem", "xla", qw), ("xq pallas", "fast", "pallas", qw),
                  ("xq_mem pallas", "mem", "pallas", qw)]
    for name, variant, impl, w0 in layer_rows:
        try:
            fn = poet_fn(d["lin"], d["lout"], variant, impl)
            fargs = (d["x"], w0, d["th_in"], d["th_out"], d["perms"], d["g"])
            compiled, temp = compile_fn(fn, *fargs)
            ms = time_ms(compiled, fargs, args.repeats, args.inner)
            rec.add(kind="layer", case=label, method=name, ms=ms, temp_bytes=temp, device=device_line())
            print(f"layer  {label:<34} {name:<14} {ms:9.3f} ms  temp {temp or 0:>12,} B", flush=True)
        except Exception as e:  # noqa: BLE001
            rec.add(kind="layer", case=label, method=name, error=short_error(e))
            print(f"layer  {label:<34} {name:<14} FAILED {short_error(e)}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--group", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    interpret = pk.default_interpret()
    cases, group = (TINY_CASES, 32) if args.tiny else (CASES, args.group)
    if args.tiny:
        args.repeats, args.inner = 2, 2
    rec = Recorder(args.out or None)
    print(f"# {device_line()}; Pallas {'interpret' if interpret else 'Triton'}", flush=True)
    for case in cases:
        run_case(case, group, rec, args, interpret)
    print(f"\n{'kind':<8}{'case':<36}{'method':<16}{'ms':>10}{'vs first':>10}{'temp MiB':>10}")
    first = {}
    for r in rec.rows:
        key = (r["kind"], r["case"])
        if "error" in r:
            print(f"{r['kind']:<8}{r['case']:<36}{r['method']:<16}  FAILED {r['error'][:60]}")
            continue
        first.setdefault(key, r["ms"])
        print(f"{r['kind']:<8}{r['case']:<36}{r['method']:<16}{r['ms']:>10.3f}{r['ms'] / first[key]:>9.2f}x"
              f"{(r['temp_bytes'] or 0) / 2 ** 20:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
