"""Matmul with a uint8 group-quantized weight, dequantized tile by tile inside the kernel (POET-XQ, spec §9.4).

Legend: T tokens (leading dims flattened), N rows of the weight (the contraction of the forward),
M columns, Gq group size, NGq = N/Gq groups per column.

    codes (N, M) uint8, scale (NGq, M) float32, zero (NGq, M) uint8
    Ŵ[n, m] = (codes[n, m] − zero[n // Gq, m]) · scale[n // Gq, m]        (float32, then the activation dtype)
    qmatmul(a, codes, scale, zero) = a (T, N) @ Ŵ (N, M)  →  (T, M)

Groups are Gq consecutive rows of one column: the contraction axis of the forward, which is the spec's
"groups along d_in" of a PyTorch (out, in) weight written in our (in, out) layout.

Forward kernel: a program owns block_t tokens × block_n columns and loops over N in block_k steps
(block_k divides Gq, so a step lies in one group): it loads the uint8 tile and that group's scale/zero
row, dequantizes in float32, casts to a's dtype and accumulates the product in float32 registers.
Backward (d a = g @ Ŵᵀ): a program owns block_t tokens × block_n rows of Ŵ (block_n divides Gq: one
group per program) and loops over M. The weight is frozen: there is no dW, and the only residuals are
the inputs themselves (the uint8 codes and the small scale/zero), never a dequantized copy. Nothing
accumulates across grid programs (JAX_NOTES pitfall 2).

The dequantized value is formed in float32 and rounded once to the activation dtype (the spec computes
it in the activation dtype; identical for float32, one rounding fewer for bf16). ``dequantize_reference``
is the same formula in jnp and is what ``poetjax.quant`` uses.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (MIN_TILE, check_launch, check_tile, compiler_params, dot, dot_precision,
                                    max_tile)

_NT = (((1,), (0,)), ((), ()))    # a @ b
_NN_T = (((1,), (1,)), ((), ()))  # a @ bᵀ
_F32_PRECISION = "tf32x3"


@dataclasses.dataclass(frozen=True)
class QMatmulConfig:
    """Tiles of the quantized matmul (same for the forward and the backward kernel).

    block_t: tokens per program; block_k: contraction rows per loop step; block_n: output columns per
    program. On use, block_k and (backward) block_n are shrunk to divide the group size, and block_n
    (forward) to divide M; all are powers of two ≥ 16.
    """

    block_t: int = 64
    block_k: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    def validate(self) -> "QMatmulConfig":
        for name in ("block_t", "block_k", "block_n"):
            check_tile("QMatmulConfig", name, getattr(self, name), None)
        check_launch("QMatmulConfig", self.num_warps, self.num_stages)
        return self


def check_quantized(codes, scale, zero) -> int:
    """The group size Gq of a quantized weight; ValueError naming the bad shape or dtype."""
    if codes.ndim != 2 or codes.dtype != jnp.uint8:
        raise ValueError(f"codes must be a 2-D uint8 array (N, M), got shape {tuple(codes.shape)} dtype {codes.dtype}")
    n, m = codes.shape
    if scale.ndim != 2 or scale.shape[1] != m or scale.shape[0] == 0 or n % scale.shape[0]:
        raise ValueError(f"scale must have shape (N/Gq, M) for codes of shape {(n, m)}, got {tuple(scale.shape)}")
    if tuple(zero.shape) != tuple(scale.shape) or zero.dtype != jnp.uint8:
        raise ValueError(f"zero must be uint8 of scale's shape {tuple(scale.shape)}, "
                         f"got shape {tuple(zero.shape)} dtype {zero.dtype}")
    return n // scale.shape[0]


def dequantize_reference(codes_NxM, scale_NGxM, zero_NGxM, dtype=jnp.float32):
    """Ŵ (N, M) = (codes − zero) · scale per group of Gq rows, computed in float32, returned in ``dtype``."""
    g = codes_NxM.shape[0] // scale_NGxM.shape[0]
    q = codes_NxM.astype(jnp.float32).reshape(-1, g, codes_NxM.shape[1])
    z = zero_NGxM.astype(jnp.float32)[:, None, :]
    s = scale_NGxM.astype(jnp.float32)[:, None, :]
    return ((q - z) * s).reshape(codes_NxM.shape).astype(dtype)


def qmatmul_reference(a, codes, scale, zero):
    """a (..., N) @ Ŵ in a's dtype, products summed in float32 (what the kernel computes)."""
    w = dequantize_reference(codes, scale, zero, a.dtype).astype(jnp.float32)
    y = jnp.matmul(a.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(a.dtype)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

def _dequant_tile(q, z, s, dtype):
    return ((q.astype(jnp.float32) - z.astype(jnp.float32)) * s).astype(dtype)


def _fwd_kernel(a_ref, q_ref, s_ref, z_ref, o_ref, *, t, n, g, bt, bk, bn, precision, interpret):
    c, i = pl.program_id(0), pl.program_id(1)
    rows = i * bt + jnp.arange(bt)
    row_ok = (rows < t)[:, None]
    cols = c * bn + jnp.arange(bn)

    def body(step, acc):
        k0 = step * bk
        ks = k0 + jnp.arange(bk)
        at = plt.load(a_ref.at[rows[:, None], ks[None, :]], mask=jnp.broadcast_to(row_ok, (bt, bk)), other=0)
        grp = k0 // g
        w = _dequant_tile(q_ref[pl.ds(k0, bk), pl.ds(c * bn, bn)], z_ref[pl.ds(grp, 1), pl.ds(c * bn, bn)],
                          s_ref[pl.ds(grp, 1), pl.ds(c * bn, bn)], at.dtype)
        return acc + dot(at, w, _NT, precision, interpret)

    acc = lax.fori_loop(0, n // bk, body, jnp.zeros((bt, bn), jnp.float32))
    plt.store(o_ref.at[rows[:, None], cols[None, :]], acc.astype(o_ref.dtype), mask=jnp.broadcast_to(row_ok, (bt, bn)))


def _bwd_kernel(g_ref, q_ref, s_ref, z_ref, o_ref, *, t, m, g, bt, bk, bn, precision, interpret):
    r, i = pl.program_id(0), pl.program_id(1)
    rows = i * bt + jnp.arange(bt)
    row_ok = (rows < t)[:, None]
    wrows = r * bn + jnp.arange(bn)
    grp = (r * bn) // g  # bn divides Gq: the program's weight rows lie in one group

    def body(step, acc):
        k0 = step * bk
        ks = k0 + jnp.arange(bk)
        gt = plt.load(g_ref.at[rows[:, None], ks[None, :]], mask=jnp.broadcast_to(row_ok, (bt, bk)), other=0)
        w = _dequant_tile(q_ref[pl.ds(r * bn, bn), pl.ds(k0, bk)], z_ref[pl.ds(grp, 1), pl.ds(k0, bk)],
                          s_ref[pl.ds(grp, 1), pl.ds(k0, bk)], gt.dtype)
        return acc + dot(gt, w, _NN_T, precision, interpret)

    acc = lax.fori_loop(0, m // bk, body, jnp.zeros((bt, bn), jnp.float32))
    plt.store(o_ref.at[rows[:, None], wrows[None, :]], acc.astype(o_ref.dtype),
              mask=jnp.broadcast_to(row_ok, (bt, bn)))


def _launch(kernel, x, codes, scale, zero, out_cols, *, cfg, interpret, name, **static):
    t = x.shape[0]
    bt, bn = static["bt"], static["bn"]
    k = functools.partial(kernel, t=t, bt=bt, precision=dot_precision(x.dtype, _F32_PRECISION, interpret),
                          interpret=interpret, **{k: v for k, v in static.items() if k != "bt"})
    return pl.pallas_call(k, out_shape=jax.ShapeDtypeStruct((t, out_cols), x.dtype),
                          grid=(out_cols // bn, pl.cdiv(t, bt)), compiler_params=compiler_params(cfg),
                          interpret=interpret, name=name)(x, codes, scale, zero)


def _apply(x, codes, scale, zero, cfg, interpret, *, transposed: bool):
    """x @ Ŵ (forward: x is (T, N)) or x @ Ŵᵀ (transposed: x is (T, M), the backward's d a)."""
    n, m = codes.shape
    g = n // scale.shape[0]
    if transposed:
        # Output tiles over N stay inside one group (block_n divides Gq); the contraction over M only
        # needs block_k to divide M.
        bk, bn = max_tile(m, cfg.block_k), max_tile(g, cfg.block_n)
        return _launch(_bwd_kernel, x, codes, scale, zero, n, cfg=cfg, interpret=interpret, name="qmatmul_t",
                       m=m, g=g, bt=cfg.block_t, bk=bk, bn=bn)
    # block_k divides Gq (a loop step stays in one group; Gq divides N), block_n divides M.
    bk, bn = max_tile(g, cfg.block_k), max_tile(m, cfg.block_n)
    return _launch(_fwd_kernel, x, codes, scale, zero, m, cfg=cfg, interpret=interpret, name="qmatmul",
                   n=n, g=g, bt=cfg.block_t, bk=bk, bn=bn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _qmatmul(a, codes, scale, zero, cfg, interpret):
    return _apply(a, codes, scale, zero, cfg, interpret, transposed=False)


def _qmatmul_fwd(a, codes, scale, zero, cfg, interpret):
    return _apply(a, codes, scale, zero, cfg, interpret, transposed=False), (codes, scale, zero)


def _qmatmul_bwd(cfg, interpret, res, g):
    codes, scale, zero = res
    # The weight is frozen: no cotangent for codes/scale/zero (zeros, never computed).
    return _apply(g, codes, scale, zero, cfg, interpret, transposed=True), None, None, None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def qmatmul(a, codes, scale, zero, *, interpret: bool = False, config: QMatmulConfig | None = None):
    """y (..., M) = a (..., N) @ Ŵ with Ŵ dequantized inside the kernel (module doc); in a's dtype.

    Differentiable in ``a`` only (the weight is frozen): its backward runs the transposed kernel,
    re-dequantizing the tiles, so no (N, M) float copy of the weight ever exists. Needs N, M multiples
    of 16 and Gq a multiple of 16 (Triton tiles are powers of two ≥ 16).
    """
    g = check_quantized(codes, scale, zero)
    n, m = codes.shape
    for name, v in (("N", n), ("M", m), ("group size", g)):
        if v % MIN_TILE:
            raise ValueError(f"qmatmul needs {name} to be a multiple of {MIN_TILE}, got {name}={v} "
                             f"(codes {tuple(codes.shape)}, scale {tuple(scale.shape)}); use impl='xla'")
    if a.ndim < 1 or a.shape[-1] != n or not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"a must be a floating array (..., {n}) for codes of shape {(n, m)}, "
                         f"got shape {tuple(a.shape)} dtype {a.dtype}")
    cfg = (config or QMatmulConfig()).validate()
    lead = a.shape[:-1]
    a2 = a.reshape(-1, n)
    if a2.shape[0] == 0:
        return jnp.zeros((*lead, m), a.dtype)
    return _qmatmul(a2, codes, scale, zero, cfg, bool(interpret)).reshape(*lead, m)
