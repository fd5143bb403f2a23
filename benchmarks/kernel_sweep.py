"""The kernel-tile sweep of ``layer_bench.py --sweep``: times a small grid of tiles, warps and stages per
Pallas kernel and prints the best as a ``pallas_kernels.tuning.TABLE`` literal (with the device and date)."""

from __future__ import annotations

import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels import block_matmul as bmk
from pallas_kernels._common import (CayleyConfig, LoopConfig, ReduceConfig, RotateConfig, fit_cayley, fit_loop,
                                    fit_reduce, fit_rotate)
from poetjax.perms import input_permutation

from layer_bench import Recorder, cayley_fn, compile_fn, device_line, short_error, time_ms


def _rotate_grid(k):
    for bt, (bn, warps) in itertools.product((32, 64, 128), ((0, 8), (128, 4), (128, 8))):
        yield RotateConfig(block_t=bt, block_k=32, block_n=bn, num_warps=warps, num_stages=3)
    for bk, stages in ((64, 3), (32, 2), (32, 4), (16, 4)):
        yield RotateConfig(block_t=64, block_k=bk, block_n=0, num_warps=8, num_stages=stages)


def _rotate_chunked_grid(k):
    # kernels that index one run at a time (--sweep-chunk): no per-column gathers, so larger token tiles
    # (fewer re-reads of R[j]) and deeper contraction steps are worth timing
    for bt, bk, bn, warps, stages in ((128, 64, 128, 8, 3), (128, 64, 128, 8, 4), (128, 128, 128, 8, 3),
                                      (128, 128, 128, 8, 2), (128, 64, 0, 16, 3), (128, 128, 0, 16, 2),
                                      (128, 64, 128, 4, 3), (64, 64, 0, 8, 3), (64, 128, 0, 8, 3),
                                      (128, 32, 128, 8, 3), (256, 64, 128, 16, 3), (128, 64, 0, 8, 2),
                                      (64, 64, 128, 4, 4), (256, 64, 64, 8, 3), (64, 16, 0, 8, 4)):
        yield RotateConfig(block_t=bt, block_k=bk, block_n=bn, num_warps=warps, num_stages=stages)


def _loop_grid(k):
    # (block_t, block_n, block_p, warps, stages, waves); with dR folded in a program holds a (block_n × K)
    # float32 slice of dR[j], so block_n stays small
    grid = ((64, 64, 64, 8, 3, 2), (32, 64, 64, 4, 3, 2), (64, 64, 64, 4, 3, 2), (64, 32, 64, 4, 3, 2),
            (128, 64, 64, 8, 3, 2), (64, 64, 64, 8, 3, 4), (64, 64, 64, 8, 2, 1), (64, 64, 32, 8, 3, 2),
            (32, 64, 64, 8, 4, 2), (64, 128, 64, 8, 3, 2), (32, 32, 64, 4, 3, 4))
    for bt, bn, bp, warps, stages, waves in grid:
        yield LoopConfig(block_t=bt, block_n=bn, block_p=bp, num_warps=warps, num_stages=stages, waves=waves)


def _reduce_grid(k):
    for bt, (bm, bn) in itertools.product((32, 64, 128), ((64, 64), (128, 128), (128, 64))):
        yield ReduceConfig(block_t=bt, block_m=bm, block_n=bn, num_warps=4, num_stages=3)
    for bm, warps, stages in ((128, 8, 3), (64, 4, 2), (64, 4, 4)):
        yield ReduceConfig(block_t=64, block_m=bm, block_n=bm, num_warps=warps, num_stages=stages)


def _cayley_grid(k):
    # the product kernels read dense Q/Q²/G/N tiles (contiguous, pipelined): deeper block_k pays
    for bm, bk in ((32, 32), (32, 64), (64, 32), (64, 64), (128, 32), (64, 128), (32, 128)):
        yield CayleyConfig(block_m=bm, block_k=bk, num_warps=4, num_stages=2)
    for bm, bk, warps, stages in ((64, 64, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2), (32, 64, 4, 3)):
        yield CayleyConfig(block_m=bm, block_k=bk, num_warps=warps, num_stages=stages)


def _fit(cfg, k):
    """Clamp a grid entry's tiles to block size k (the grids are written for K = 256)."""
    if isinstance(cfg, RotateConfig):
        return fit_rotate(cfg, k)
    if isinstance(cfg, ReduceConfig):
        return fit_reduce(cfg, k)
    if isinstance(cfg, LoopConfig):
        return fit_loop(cfg, k)
    return fit_cayley(cfg, k)


def _sweep_one(name, grid, build, args, rec, k):
    """Time every config of ``grid``; build(cfg) → list of (compiled, args). Returns the best config."""
    best = None
    seen = set()
    for cfg in grid:
        cfg = _fit(cfg, k)
        if cfg in seen:
            continue
        seen.add(cfg)
        try:
            total = 0.0
            for compiled, a in build(cfg):
                total += time_ms(compiled, a, args.repeats, args.inner)
            print(f"  {name:10s} {total:8.3f} ms  {cfg}", flush=True)
            rec.add(kind="sweep", kernel=name, b=k, ms=total, config=dataclasses.asdict(cfg))
            if best is None or total < best[0]:
                best = (total, cfg)
        except Exception as e:
            print(f"  {name:10s}   failed  {cfg}: {short_error(e)}")
    return best


def run_sweep(rec: Recorder, args):
    found = {}
    t, n = args.sweep_tokens, args.sweep_width
    for k in args.sweep_blocks:
        nb = n // k
        print(f"\n== sweep K={k}: T={t}, width {n} ({nb} blocks), bf16")
        keys = jax.random.split(jax.random.key(k), 4)
        x = jax.random.normal(keys[0], (t, n), jnp.float32).astype(jnp.bfloat16)
        r = (jax.random.normal(keys[1], (nb, k, k), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
        chunk = args.sweep_chunk
        perm, _ = input_permutation(keys[2], n, n, None if args.unsorted_perms else k, chunk)
        suffix = "/chunked" if chunk > 1 else ""   # TABLE keys of pallas_kernels.tuning

        interpret = pk.default_interpret()

        def pass_of(kernel):   # builder of one pass of a rotation kernel, x read or written through perm
            def one(idx, **static):
                def build(cfg):
                    def fn(x, r, p):
                        return kernel(x, r, cfg=cfg, interpret=interpret, chunk=chunk, **{idx: p}, **static)
                    return [(compile_fn(fn, x, r, perm)[0], (x, r, perm))]
                return build
            return one

        rotate, loop = pass_of(bmk._rotate), pass_of(bmk._rotate_loop)

        def both(b1, b2):
            return lambda cfg: b1(cfg) + b2(cfg)

        # forward kernels: gather → rotate (input side) and rotate → scatter (output side); the backward
        # ones are their mirrors by Rᵀ
        save = chunk == 1   # as the layers run them: chunked index vectors gather again for dR
        fwd = both(rotate("src", save=save), rotate("dst", w_out=n))
        bwd = both(rotate("dst", w_out=n, transpose_r=True), rotate("src", transpose_r=True, save=save))

        def build_reduce(cfg):
            if chunk > 1:  # the chunked path re-gathers x instead of saving it
                def fn(a, b, p):
                    return bmk._reduce(a, b, nb, k, cfg=cfg, interpret=interpret, pa=p, chunk=chunk)
                return [(compile_fn(fn, x, x, perm)[0], (x, x, perm))]

            def fn(a, b):
                return bmk._reduce(a, b, nb, k, cfg=cfg, interpret=interpret)
            return [(compile_fn(fn, x, x)[0], (x, x))]

        # the token-loop kernel: the backward pair with dR folded in (the second dR operand is x in both,
        # re-gathered at perm where the output is scattered, as the layers run them)
        loop_bwd = both(loop("dst", w_out=n, a=x), loop("src", a=x))

        rgrid = _rotate_chunked_grid if chunk > 1 else _rotate_grid
        for name, grid, build in (("rotate_fwd", rgrid(k), fwd), ("rotate_bwd", rgrid(k), bwd),
                                  ("reduce", _reduce_grid(k), build_reduce), ("loop_bwd", _loop_grid(k), loop_bwd)):
            if name in args.sweep_kernels:
                best = _sweep_one(name + suffix, grid, build, args, rec, k)
                if best:
                    found[(name + suffix, k)] = best
        # what the loop kernel replaces: the separate kernels at the table's tiles, timed in the same run
        if "loop_bwd" in args.sweep_kernels:
            table_cfg = pk.tuning.block_matmul_config(k, chunk)
            what = "rotate_bwd+2*reduce"
            try:
                ms = sum(time_ms(c, a, args.repeats, args.inner)
                         for c, a in bwd(table_cfg.backward) + 2 * build_reduce(table_cfg.reduce))
                print(f"  loop_bwd replaces {what} (the table's tiles): {ms:8.3f} ms", flush=True)
                rec.add(kind="sweep_baseline", kernel=what + suffix, b=k, ms=ms)
            except Exception as e:
                print(f"  {what} failed: {short_error(e)}")

        def build_cayley(cfg):
            out = []
            for blocks in args.sweep_cayley_blocks:
                theta = 0.3 / np.sqrt(k) * jax.random.normal(jax.random.key(blocks), (blocks, k * (k - 1) // 2))
                g = jax.random.normal(jax.random.key(blocks + 1), (blocks, k, k))
                out.append((compile_fn(cayley_fn(blocks, k, "pallas", cfg), theta, g)[0], (theta, g)))
            return out

        if "cayley" in args.sweep_kernels:
            prec = args.sweep_cayley_precision
            grid = _cayley_grid(k) if prec is None else (dataclasses.replace(c, precision=prec)
                                                         for c in _cayley_grid(k))
            name = "cayley" if prec is None else f"cayley/{prec}"
            best = _sweep_one(name, grid, build_cayley, args, rec, k)
            if best:
                found[(name, k)] = best

    print("\n== best configurations (paste into pallas_kernels/tuning.py, with device and date):")
    print(f"# {device_line()}, {time.strftime('%Y-%m-%d')}, benchmarks/layer_bench.py --sweep")
    print("TABLE: dict[tuple[str, int], dict] = {")
    for (name, k), (ms, cfg) in found.items():
        fields = _table_fields(cfg)
        print(f"    ({name!r}, {k}): {fields!r},  # {ms:.3f} ms")
    print("}")


def _table_fields(cfg) -> dict:
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "precision"}


# ----------------------------------------------------------------------------------------------
