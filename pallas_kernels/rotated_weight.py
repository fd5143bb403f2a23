"""The effective weight of a POET layer in one pass (POET spec §5), Pallas/Triton.

Legend: K block size, I input blocks, O output blocks, Np = I·K, Mp = O·K (padded sizes), N ≤ Np and
M ≤ Mp the real widths.

    rotated_weight(w_s, r_in, r_out, rows, cols, n, m)      W (N, M) with
        W[rows[p], cols[c]] = A[p, c],   A = blockdiag(R_in) · W_s · blockdiag(R_out)   (Np, Mp)

rows (Np,) sends row p of the blocked basis to row rows[p] of W and cols (Mp,) sends column c to column
cols[c]; values ≥ n (≥ m) mark padding, which is dropped. For a POET layer rows is ``perm_in`` and cols
is ``perm_out_inv`` (``poetjax.perms``), so W is the layer's W_eff with y = x · W_eff.

A program owns block_m rows of one K×K tile (i, j) of A: it forms R_in[i][rows] · W_s[i, j] (block_m × K,
float32, block_k-deep steps), rounds it to W_s's dtype, multiplies it by R_out[j] in block_n-wide column
tiles and stores each straight to its permuted rows and columns. W_s is read once, W once written, and no
(Np, Mp) intermediate exists. Chunked index vectors (``chunk`` = c, ``poetjax.perms`` with
``perm_chunk``) let the column stores write contiguous runs (``_common.tile_cols``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (NT, WeightConfig, check_block_size, check_index_vector, chunk_tile,
                                    compiler_params, dot, dot_precision, max_tile, store_tile, tile_cols)
from pallas_kernels.block_matmul import check_chunked_index
from pallas_kernels.tuning import weight_config


def rotated_weight_reference(w_s, r_in, r_out, rows, cols, n: int, m: int):
    """W (n, m) in w_s's dtype: A = blockdiag(R_in) · W_s · blockdiag(R_out) with the products in w_s's dtype
    summed in float32 (A's rows rounded once between the two products), then scattered by rows and cols."""
    ni, k, _ = r_in.shape
    no = r_out.shape[0]
    dt = w_s.dtype
    f32 = jnp.float32
    w = w_s.reshape(ni, k, no, k).astype(f32)
    a = jnp.einsum("ikc,icjd->ikjd", r_in.astype(dt).astype(f32), w, precision=lax.Precision.HIGHEST).astype(dt)
    a = jnp.einsum("ikjd,jde->ikje", a.astype(f32), r_out.astype(dt).astype(f32), precision=lax.Precision.HIGHEST)
    a = a.reshape(ni * k, no * k).astype(dt)
    out = jnp.zeros((n, m), dt)
    return out.at[rows[:, None], cols[None, :]].set(a, mode="drop")


def _weight_kernel(w_ref, rin_ref, rout_ref, rows_ref, cols_ref, o_ref, *, k, kp, n, m, bm, bk, bn, run, precision,
                   interpret):
    i, j, a = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # The (bm × K) rows of R_in[i] · W_s[i, j] in pieces kp wide (K's largest power-of-two divisor: in-kernel
    # arrays must have power-of-two sizes, e.g. K = 96 is three pieces of 32).
    lefts = []
    for p in range(k // kp):
        def body(s, acc, p=p):
            r_t = rin_ref[i, pl.ds(a * bm, bm), pl.ds(s * bk, bk)]
            w_t = w_ref[pl.ds(i * k + s * bk, bk), pl.ds(j * k + p * kp, kp)]
            return acc + dot(r_t, w_t, NT, precision, interpret)

        acc = lax.fori_loop(0, k // bk, body, jnp.zeros((bm, kp), jnp.float32))
        lefts.append(acc.astype(w_ref.dtype))
    rows = rows_ref[pl.ds(i * k + a * bm, bm)]
    row_ok = (rows < n)[:, None]
    for c in range(k // bn):
        tile = jnp.zeros((bm, bn), jnp.float32)
        for p, left in enumerate(lefts):
            tile = tile + dot(left, rout_ref[j, pl.ds(p * kp, kp), pl.ds(c * bn, bn)], NT, precision, interpret)
        cols = tile_cols(cols_ref, j * k + c * bn, bn, run)
        store_tile(o_ref, rows, row_ok, cols, tile.astype(o_ref.dtype), m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _rotated_weight(w_s, r_in, r_out, rows, cols, n, m, cfg, interpret, chunk):
    ni, k, _ = r_in.shape
    no = r_out.shape[0]
    dt = w_s.dtype
    kernel = functools.partial(
        _weight_kernel, k=k, kp=max_tile(k, k), n=n, m=m, bm=cfg.block_m, bk=cfg.block_k, bn=cfg.block_n, run=chunk_tile(chunk, k),
        precision=dot_precision(dt, "tf32x3", interpret), interpret=interpret)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((n, m), dt), grid=(ni, no, k // cfg.block_m),
                          compiler_params=compiler_params(cfg), interpret=interpret,
                          name="rotated_weight" + ("_chunked" if chunk_tile(chunk, k) else ""))(
        w_s, r_in.astype(dt), r_out.astype(dt), rows, cols)


def _rotated_weight_fwd(w_s, r_in, r_out, rows, cols, n, m, cfg, interpret, chunk):
    return _rotated_weight(w_s, r_in, r_out, rows, cols, n, m, cfg, interpret, chunk), (w_s, r_in, r_out, rows, cols)


def _rotated_weight_bwd(n, m, cfg, interpret, chunk, res, dw):
    # POET layers never differentiate W_eff through this (their block-Gram backward gives dR directly); any
    # other caller gets the reference's VJP in XLA.
    w_s, r_in, r_out, rows, cols = res
    _, vjp = jax.vjp(lambda w, a, b: rotated_weight_reference(w, a, b, rows, cols, n, m), w_s, r_in, r_out)
    dw_s, dr_in, dr_out = vjp(dw)
    return dw_s, dr_in, dr_out, None, None


_rotated_weight.defvjp(_rotated_weight_fwd, _rotated_weight_bwd)


def rotated_weight(w_s, r_in, r_out, rows, cols, n: int, m: int, *, interpret: bool = False,
                   config: WeightConfig | None = None, chunk: int = 1):
    """W (n, m) in w_s's dtype with W[rows[p], cols[c]] = (blockdiag(R_in) · W_s · blockdiag(R_out))[p, c].

    w_s: (I·K, O·K) float; r_in (I, K, K), r_out (O, K, K) float, cast to w_s's dtype for the products
    (float32 sums); rows (I·K,) / cols (O·K,) int32, each a permutation of range(n) / range(m) followed by
    padding values ≥ n / ≥ m. ``chunk``: cols is ``chunk``-chunked (stores of contiguous runs).
    """
    for name, r in (("r_in", r_in), ("r_out", r_out)):
        if r.ndim != 3 or r.shape[1] != r.shape[2]:
            raise ValueError(f"{name} must have shape (B, K, K), got {tuple(r.shape)}")
    k = int(r_in.shape[1])
    if r_out.shape[1] != k:
        raise ValueError(f"r_in and r_out must share the block size, got {tuple(r_in.shape)} and {tuple(r_out.shape)}")
    check_block_size(k)
    ni, no = int(r_in.shape[0]), int(r_out.shape[0])
    if w_s.shape != (ni * k, no * k) or not jnp.issubdtype(w_s.dtype, jnp.floating):
        raise ValueError(f"w_s must be a floating ({ni * k}, {no * k}) array for blocks {tuple(r_in.shape)} and "
                         f"{tuple(r_out.shape)}, got shape {tuple(w_s.shape)} dtype {w_s.dtype}")
    check_index_vector("rows", rows, ni * k)
    check_index_vector("cols", cols, no * k)
    if not 0 < n <= ni * k or not 0 < m <= no * k:
        raise ValueError(f"n={n} and m={m} must be in (0, {ni * k}] and (0, {no * k}]")
    check_chunked_index("cols", cols, chunk, m)
    cfg = weight_config(k) if config is None else config
    if not isinstance(cfg, WeightConfig):
        raise TypeError(f"config must be a WeightConfig, got {type(cfg).__name__}")
    cfg = cfg.validate(k)
    return _rotated_weight(w_s, r_in, r_out, rows.astype(jnp.int32), cols.astype(jnp.int32), int(n), int(m), cfg,
                           bool(interpret), chunk)
