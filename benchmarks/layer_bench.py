"""Layer benchmark of BENCHMARK_PROTOCOL.md: dense vs POET-X (XLA) vs POET-X (Pallas), fast and mem.

Every case computes forward + backward and returns what the protocol asks, so XLA cannot drop work:
dense (y, dx, dW) of y = x @ W; POET-X (y, dx, dθ_in, dθ_out), the Cayley–Neumann map included. x and
W0 are bf16, generators float32, all values random and non-zero, permutations random. Timing: jit, two
warm-up calls, then the median over ≥ 7 repeats of a ≥ 20-call loop ended by ``block_until_ready``;
ratios are against the dense layer of the same run. Before timing, Pallas is checked against XLA on
the same inputs. A failing case prints its error and the run goes on. The table comes last.

    python benchmarks/layer_bench.py                 # protocol shapes, b ∈ {128, 256} (several minutes)
    python benchmarks/layer_bench.py --quick         # the headline shapes only
    python benchmarks/layer_bench.py --cases 16384x4096x4096x256,2048x2048x2048x128
    python benchmarks/layer_bench.py --sweep         # time tiles/warps/stages per kernel; print a TABLE
    python benchmarks/layer_bench.py --out results.jsonl   # also append JSON lines (one per result)
    python benchmarks/layer_bench.py --tiny          # a few seconds' smoke test that runs on CPU too
    python benchmarks/layer_bench.py --quick --impls pallas_f,pallas --perm-chunk 64   # chunked permutations

Implementations (--impls), the bodies of ``poetjax.ops.LayerPlan``: xla and pallas keep token-major
activations (XLA gathers / gathers fused into the rotation kernels; with --perm-chunk C ≥ 16 the kernels
index one run per tile); pallas_f runs the layer feature-major (the transposing kernels of
``pallas_kernels.transpose_perm``); weight forms W_eff from the blocks and runs one dense matmul.

Also times the Cayley kernel (forward + backward) against XLA's at 16 and 43 blocks of 256
(``--cayley-blocks``; a model's shared map has thousands, see ``poetjax.config.POETConfig.cayley_scope``).
Runs from a checkout without installing (the GPU box cannot install).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from poetjax import ops  # noqa: E402
from poetjax.config import ExecConfig  # noqa: E402
from poetjax.cayley import block_layout, rotation_pair, rotations  # noqa: E402
from poetjax.perms import input_permutation, output_permutation  # noqa: E402
from poetjax.testing import rel_err, tolerance  # noqa: E402

PROTOCOL_SHAPES = [(t, n, m) for t in (16384, 2048) for n, m in ((4096, 4096), (4096, 11008), (11008, 4096),
                                                                  (2048, 2048))]
QUICK_CASES = [(16384, 4096, 4096, 256), (16384, 4096, 11008, 256), (2048, 4096, 4096, 256)]
TINY_CASES = [(100, 64, 96, 32)]


# ----------------------------------------------------------------------------------------------
# Timing and output
# ----------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self, path: str | None):
        self.path = path
        self.rows = []

    def add(self, **rec):
        self.rows.append(rec)
        if self.path:  # appended and flushed per record: a run that is cut short keeps what it measured
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def compile_fn(fn, *args):
    compiled = jax.jit(fn).lower(*args).compile()
    temp = None
    try:
        mem = compiled.memory_analysis()
        temp = None if mem is None else int(mem.temp_size_in_bytes)
    except Exception:  # not every backend reports it
        pass
    return compiled, temp


def time_ms(compiled, args, repeats: int, inner: int) -> float:
    for _ in range(2):  # warm-up
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = compiled(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return 1e3 * statistics.median(times)


def profile_fn(compiled, args_, out_dir: str, calls: int = 5) -> None:
    """Trace ``calls`` calls into out_dir and print the device time per call by source location
    (``profile_summary.py``; run with XLA_FLAGS=--xla_gpu_enable_command_buffer= to see through CUDA graphs)."""
    from profile_summary import summarize, trace

    trace(lambda: jax.block_until_ready(compiled(*args_)), calls, out_dir)
    summarize(out_dir, compiled.as_text(), calls, top=20, unit="call")


def short_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


# ----------------------------------------------------------------------------------------------
# Layer cases
# ----------------------------------------------------------------------------------------------

def make_inputs(t, n, m, k, seed=0, sorted_perms=True, perm_chunk=1):
    keys = jax.random.split(jax.random.key(seed), 8)
    x = jax.random.normal(keys[0], (t, n), jnp.float32).astype(jnp.bfloat16)
    g = jax.random.normal(keys[1], (t, m), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[2], (n, m), jnp.float32) / np.sqrt(n)).astype(jnp.bfloat16)
    lin, lout = block_layout(n, k), block_layout(m, k)
    sort = k if sorted_perms else None  # POETLinear samples them sorted inside blocks (poetjax.perms)
    p_in, p_in_inv = input_permutation(keys[3], n, lin.padded, sort, perm_chunk)
    p_out, p_out_inv = output_permutation(keys[4], m, lout.padded, sort, perm_chunk)
    perms = ops.LayerPerms(p_in, p_in_inv, p_out, p_out_inv)
    w0 = ops.store_base_weight(w.astype(jnp.float32), perms).astype(jnp.bfloat16)
    p = k * (k - 1) // 2
    th_in = 0.3 / np.sqrt(k) * jax.random.normal(keys[5], (lin.num_blocks, p), jnp.float32)
    th_out = 0.3 / np.sqrt(k) * jax.random.normal(keys[6], (lout.num_blocks, p), jnp.float32)
    return dict(x=x, g=g, w=w, w0=w0, perms=perms, th_in=th_in, th_out=th_out, lin=lin, lout=lout)


def dense_fn(x, w, g):
    y, vjp = jax.vjp(lambda x, w: x @ w, x, w)
    dx, dw = vjp(g)
    return y, dx, dw


# Layer implementations timed: name → the (body, impl) of a ``poetjax.ops.LayerPlan``. "weight": W_eff formed
# from the blocks, then one dense matmul (XLA), with the Cayley map of impl "auto".
IMPLS = {"xla": ("xla", "xla"), "pallas": ("pallas_tokens", "pallas"), "pallas_f": ("pallas_features", "pallas"),
         "weight": ("weight", "auto")}


def poet_fn(lin, lout, variant, name, cayley_precision="highest", perm_chunk=1):
    body, impl = IMPLS[name]
    if impl == "auto":
        impl = ops.resolve_plan(ExecConfig(), memory=variant, block_size=lin.block_size).impl
    plan = ops.LayerPlan(body, impl, variant, pk.default_interpret() if impl == "pallas" else None, perm_chunk)

    def f(x, w0, th_in, th_out, perms, g):
        def layer(x, th_in, th_out):
            # both sides in one map, as POETLinear does (cayley.rotation_pair)
            r_in, r_out = rotation_pair(th_in, lin, th_out, lout, 3, impl=impl, precision=cayley_precision)
            return ops.poet_x_linear(x, w0, r_in, r_out, perms, plan)

        y, vjp = jax.vjp(layer, x, th_in, th_out)
        return (y, *vjp(g))
    return f


def run_layer_case(case, rec: Recorder, args, table):
    t, n, m, k = case
    label = f"T={t} {n}->{m} b={k}"
    print(f"\n== {label}", flush=True)
    try:
        d = make_inputs(t, n, m, k, sorted_perms=not args.unsorted_perms, perm_chunk=args.perm_chunk)
    except Exception as e:
        print(f"  inputs failed: {short_error(e)}")
        return
    base = dict(T=t, N=n, M=m, b=k, perm_chunk=args.perm_chunk)
    dense_ms = None
    try:
        compiled, temp = compile_fn(dense_fn, d["x"], d["w"], d["g"])
        dense_ms = time_ms(compiled, (d["x"], d["w"], d["g"]), args.repeats, args.inner)
        print(f"  dense            {dense_ms:8.3f} ms")
        if args.profile:
            profile_fn(compiled, (d["x"], d["w"], d["g"]), os.path.join(args.profile, f"{t}x{n}x{m}x{k}", "dense"))
        rec.add(kind="layer", variant="dense", impl="xla", ms=dense_ms, ratio=1.0, temp_bytes=temp, **base)
    except Exception as e:
        print(f"  dense FAILED: {short_error(e)}")
    poet_args = (d["x"], d["w0"], d["th_in"], d["th_out"], d["perms"], d["g"])
    row = {"case": label, "dense": dense_ms}
    outs = {}
    for variant in args.variants:
        for impl in args.impls:
            name = f"{variant}/{impl}"
            try:
                compiled, temp = compile_fn(poet_fn(d["lin"], d["lout"], variant, impl, args.cayley_precision,
                                                    args.perm_chunk), *poet_args)
                outs[name] = compiled(*poet_args)
                check = None
                other = f"{variant}/{args.impls[0]}"  # the first implementation listed is the reference
                if impl != args.impls[0] and other in outs:  # correctness before timing
                    errs = [rel_err(a.astype(jnp.float32), b.astype(jnp.float32))
                            for a, b in zip(outs[name], outs[other])]
                    tols = [tolerance(jnp.bfloat16, "value")] + [tolerance(jnp.bfloat16, "grad")] * 3
                    check = all(e <= tl for e, tl in zip(errs, tols))
                    print(f"  check {name} vs {other}: rel err y {errs[0]:.1e} dx {errs[1]:.1e} "
                          f"dθ_in {errs[2]:.1e} dθ_out {errs[3]:.1e} -> {'OK' if check else 'MISMATCH'}")
                ms = time_ms(compiled, poet_args, args.repeats, args.inner)
                ratio = None if dense_ms is None else ms / dense_ms
                print(f"  poet {name:12s} {ms:8.3f} ms" + ("" if ratio is None else f"  ({ratio:.2f}x dense)"))
                rec.add(kind="layer", variant=variant, impl=impl, ms=ms, ratio=ratio, temp_bytes=temp,
                        matches_xla=check, **base)
                row[name] = ms
                if args.profile:
                    profile_fn(compiled, poet_args, os.path.join(args.profile, f"{t}x{n}x{m}x{k}", variant, impl))
            except Exception as e:
                print(f"  poet {name} FAILED: {short_error(e)}")
                if args.verbose:
                    traceback.print_exc()
                rec.add(kind="layer", variant=variant, impl=impl, error=short_error(e), **base)
    table.append(row)


def print_table(table, args):
    cols = [f"{v}/{i}" for v in args.variants for i in args.impls]
    print("\n" + "=" * 100)
    print(f"{'case':28s} {'dense ms':>9s} " + " ".join(f"{c:>20s}" for c in cols))
    for row in table:
        dense = row.get("dense")
        cells = []
        for c in cols:
            ms = row.get(c)
            if ms is None:
                cells.append(f"{'—':>20s}")
            elif dense:
                cells.append(f"{ms:9.3f} ({ms / dense:5.2f}x)".rjust(20))
            else:
                cells.append(f"{ms:9.3f}".rjust(20))
        print(f"{row['case']:28s} {('—' if dense is None else f'{dense:9.3f}'):>9s} " + " ".join(cells))


# ----------------------------------------------------------------------------------------------
# Cayley
# ----------------------------------------------------------------------------------------------

def cayley_fn(nb, k, impl, config=None, precision="highest"):
    lay = block_layout(nb * k, k)
    interpret = pk.default_interpret()

    def f(theta, g):
        if impl == "xla":
            r, vjp = jax.vjp(lambda t: rotations(t, lay, 3, precision=precision), theta)
        else:
            r, vjp = jax.vjp(lambda t: pk.cayley_neumann(t, k, 3, config=config, interpret=interpret), theta)
        return r, vjp(g)[0]
    return f


def run_cayley(rec: Recorder, args, blocks=(16, 43), k=256):
    """XLA (float32-exact products, one-TF32-pass products, bf16 operands) vs the kernel (TF32×3, one TF32
    pass, bf16 operands); errors against the float32-exact XLA series. Pallas and XLA are compared at
    equal precision."""
    print("\n== Cayley–Neumann forward + backward (K=256)")
    variants = {"xla/highest": ("xla", None, "highest"), "xla/default": ("xla", None, "default"),
                "xla/bf16": ("xla", None, "bf16"),
                "pallas/tf32x3": ("pallas", pk.tuning.cayley_config(k, "tf32x3"), None),
                "pallas/tf32": ("pallas", pk.tuning.cayley_config(k, "tf32"), None),
                "pallas/bf16": ("pallas", pk.tuning.cayley_config(k, "bf16"), None)}
    for nb in blocks:
        theta = 0.3 / np.sqrt(k) * jax.random.normal(jax.random.key(nb), (nb, k * (k - 1) // 2))
        g = jax.random.normal(jax.random.key(nb + 1), (nb, k, k))
        res = {}
        for name, (impl, config, prec) in variants.items():
            try:
                compiled, _ = compile_fn(cayley_fn(nb, k, impl, config, prec or "highest"), theta, g)
                res[name] = (compiled(theta, g), time_ms(compiled, (theta, g), args.repeats, args.inner))
            except Exception as e:
                print(f"  {nb} blocks {name} FAILED: {short_error(e)}")
        if "xla/highest" not in res:
            continue
        ref, ref_ms = res["xla/highest"]
        line = []
        for name, (out, ms) in res.items():
            er, eg = rel_err(out[0], ref[0]), rel_err(out[1], ref[1])
            line.append(f"{name} {ms:.3f} ms (R {er:.0e}, dθ {eg:.0e})")
            rec.add(kind="cayley", blocks=nb, b=k, variant=name, ms=ms, ratio_to_xla_highest=ms / ref_ms,
                    err_r=er, err_dtheta=eg)
        print(f"  {nb:3d} blocks: " + " | ".join(line))
        for a, b in (("pallas/tf32x3", "xla/highest"), ("pallas/tf32", "xla/default"), ("pallas/bf16", "xla/bf16"),
                     ("pallas/bf16", "pallas/tf32")):
            if a in res and b in res:
                print(f"      {a} / {b} = {res[a][1] / res[b][1]:.2f}x")


# ----------------------------------------------------------------------------------------------
# Permutations alone (T × D bf16): copy, XLA gathers, the transposing kernels over a few tiles
# ----------------------------------------------------------------------------------------------

def _transpose_grid():
    for bt, bc, warps in ((64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (32, 128, 4), (128, 32, 4),
                          (256, 64, 8), (64, 256, 8)):
        yield pk.TransposeConfig(block_t=bt, block_c=bc, num_warps=warps, num_stages=1)


def run_perms(rec: Recorder, args, t=16384, d=4096):
    print(f"\n== permutations alone: T={t}, D={d}, bf16 (GB/s counts one read + one write of T·D·2 bytes)")
    keys = jax.random.split(jax.random.key(7), 3)
    x = jax.random.normal(keys[0], (t, d), jnp.float32).astype(jnp.bfloat16)
    xt = x.T + 0
    perm, inv = input_permutation(keys[1], d, d, 256)
    interpret = pk.default_interpret()
    nbytes = 2 * t * d * 2
    cases = {
        "copy (x + 1)": (lambda x: x + 1, (x,)),
        "xla x[:, perm]": (lambda x, p: jnp.take(x, p, axis=1), (x, perm)),
        "xla x.T (transpose)": (lambda x: x.T, (x,)),
        "xla x.T[perm] (transpose + rows)": (lambda x, p: jnp.take(x.T, p, axis=0), (x, perm)),
        "xla z[perm].T (rows + transpose)": (lambda z, p: jnp.take(z, p, axis=0).T, (xt, perm)),
    }
    grid = list(_transpose_grid()) if args.perm_sweep else [pk.tuning.transpose_config()]
    for cfg in grid:
        cases[f"transpose_scatter {cfg.block_t}x{cfg.block_c} w{cfg.num_warps}"] = (
            lambda x, p, cfg=cfg: pk.transpose_scatter(x, p, interpret=interpret, config=cfg), (x, inv))
        cases[f"gather_transpose {cfg.block_t}x{cfg.block_c} w{cfg.num_warps}"] = (
            lambda z, p, cfg=cfg: pk.gather_transpose(z, p, interpret=interpret, config=cfg), (xt, perm))
    want_s = jnp.take(x.T, perm, axis=0)
    want_g = jnp.take(xt, perm, axis=0).T
    best = {}
    for name, (fn, a) in cases.items():
        try:
            compiled, _ = compile_fn(fn, *a)
            out = compiled(*a)
            ok = ""
            if name.startswith("transpose_scatter"):
                ok = " exact" if bool(jnp.array_equal(out, want_s)) else " MISMATCH"
            elif name.startswith("gather_transpose"):
                ok = " exact" if bool(jnp.array_equal(out, want_g)) else " MISMATCH"
            ms = time_ms(compiled, a, args.repeats, args.inner)
            print(f"  {name:42s} {ms:7.3f} ms  {nbytes / ms / 1e6:7.0f} GB/s{ok}", flush=True)
            rec.add(kind="perm", name=name, ms=ms, gbps=nbytes / ms / 1e6, T=t, D=d, exact=ok.strip() or None)
            kind = name.split(" ")[0]
            if ok == " exact" and (kind not in best or ms < best[kind][0]):
                best[kind] = (ms, name)
        except Exception as e:
            print(f"  {name:42s} FAILED: {short_error(e)}")
    for kind, (ms, name) in best.items():
        print(f"  best {kind}: {name} ({ms:.3f} ms)")


# ----------------------------------------------------------------------------------------------
# Sweep: one GPU run picks the defaults of pallas_kernels/tuning.py
# ----------------------------------------------------------------------------------------------

# Small curated grids (each config costs a Triton compile of a few kernels): around the heuristics,
# varying one thing at a time plus the likely winners' neighbours.
def device_line() -> str:
    dev = jax.devices()[0]
    return f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}"


def parse_cases(text: str):
    cases = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 4:
            raise SystemExit(f"--cases wants TxNxMxb items, got {item!r}")
        cases.append(tuple(int(p) for p in parts))
    return cases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headline shapes only")
    ap.add_argument("--tiny", action="store_true", help="tiny smoke test (CPU ok: kernels run interpreted)")
    ap.add_argument("--cases", type=str, default=None, help="comma-separated TxNxMxb, e.g. 16384x4096x4096x256")
    ap.add_argument("--blocks", type=str, default="128,256", help="block sizes for the protocol shapes")
    ap.add_argument("--variants", type=str, default="fast,mem")
    ap.add_argument("--impls", type=str, default="xla,pallas_f")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--no-cayley", action="store_true")
    ap.add_argument("--cayley-blocks", type=str, default="16,43",
                    help="block counts of the Cayley timing (e.g. 154,3696: one Llama-1B block, all its layers)")
    ap.add_argument("--perms", action="store_true",
                    help="also time the permutations alone (copy, XLA gathers, transposing kernels; "
                         "with --perm-sweep over several tiles)")
    ap.add_argument("--perm-sweep", action="store_true", help="--perms over a grid of TransposeConfig tiles")
    ap.add_argument("--cayley-precision", type=str, default="highest", choices=("highest", "default", "bf16"),
                    help="products of the layers' Cayley–Neumann series (poetjax.cayley.rotations)")
    ap.add_argument("--perm-chunk", type=int, default=1,
                    help="permutations of runs of this many coordinates (POETConfig.perm_chunk) in the layer cases")
    ap.add_argument("--unsorted-perms", action="store_true",
                    help="uniformly shuffled permutations instead of the block-sorted ones layers sample")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time kernel configs and print the best as a TABLE")
    ap.add_argument("--sweep-blocks", type=str, default="256")
    ap.add_argument("--sweep-kernels", type=str, default="rotate_fwd,rotate_bwd,reduce,cayley")
    ap.add_argument("--sweep-tokens", type=int, default=16384)
    ap.add_argument("--sweep-cayley-blocks", type=str, default="16,43",
                    help="block counts the Cayley sweep sums over (shared maps: e.g. 154,3696)")
    ap.add_argument("--sweep-cayley-precision", type=str, default=None, choices=("tf32x3", "tf32", "ieee", "bf16"),
                    help="product precision the Cayley sweep times (default: the config's); the best is "
                         "reported under the TABLE key 'cayley/<precision>'")
    ap.add_argument("--sweep-width", type=int, default=4096)
    ap.add_argument("--sweep-chunk", type=int, default=1,
                    help="sweep the rotation/reduce kernels on perm_chunk-chunked index vectors (TABLE keys "
                         "'<kernel>/chunked')")
    ap.add_argument("--out", type=str, default=None, help="append JSON lines here")
    ap.add_argument("--profile", type=str, default=None,
                    help="also trace every timed layer into DIR/<case>/<variant>/<impl> and print its device time "
                         "by source location")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    args.variants = args.variants.split(",")
    args.impls = args.impls.split(",")
    for name in args.impls:
        if name not in IMPLS:
            ap.error(f"--impls: unknown implementation {name!r}; known: {', '.join(IMPLS)}")
    args.sweep_blocks = [int(b) for b in args.sweep_blocks.split(",")]
    args.sweep_kernels = args.sweep_kernels.split(",")
    args.sweep_cayley_blocks = [int(b) for b in args.sweep_cayley_blocks.split(",")]
    if args.repeats < 7 or args.inner < 20:
        print("note: the protocol asks for --repeats ≥ 7 and --inner ≥ 20")

    rec = Recorder(args.out)
    print(f"device: {device_line()}; date {time.strftime('%Y-%m-%d %H:%M')}; command: {' '.join(sys.argv)}")
    if args.tiny:
        cases = TINY_CASES
        args.repeats, args.inner = 2, 2
    elif args.cases:
        cases = parse_cases(args.cases)
    elif args.quick:
        cases = QUICK_CASES
    else:
        blocks = [int(b) for b in args.blocks.split(",")]
        cases = [(t, n, m, b) for (t, n, m) in PROTOCOL_SHAPES for b in blocks]
    rec.add(kind="meta", device=device_line(), date=time.strftime("%Y-%m-%d %H:%M"), argv=sys.argv[1:])

    if args.sweep:
        from kernel_sweep import run_sweep  # imports this module's helpers

        run_sweep(rec, args)
    table = []
    if not args.no_layers and not (args.sweep and not args.cases and not args.quick):
        for case in cases:
            run_layer_case(case, rec, args, table)
    if args.perms or args.perm_sweep:
        run_perms(rec, args, *((128, 256) if args.tiny else ()))
    if not args.no_cayley and not args.tiny:
        run_cayley(rec, args, blocks=tuple(int(b) for b in args.cayley_blocks.split(",")))
    if table:
        print_table(table, args)


if __name__ == "__main__":
    main()
