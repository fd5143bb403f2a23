"""POET-XQ: the frozen base weight in 8 bits, group-wise asymmetric (POET spec §9.4), pure jnp.

Shape legend: Np × Mp the stored (padded, pre-permuted) base weight W_s in our (in, out) layout,
Gq the group size, NGq = Np/Gq groups per output column.

Groups are Gq consecutive entries of one output column along the in axis — the contraction axis of the
layer's matmul. That is exactly the spec's grouping ("consecutive chunks of the row-major d_out×d_in
weight", i.e. runs along d_in within a row) written in the transposed layout, so a dequantized tile of
the matmul needs one scale row. Per group (w_min, w_max over the group):

    s = max(w_max − w_min, 1e−5) / 255
    z = clamp(−round(w_min / s), 0, 255)
    q = clamp(round(w / s) + z, 0, 255)          uint8
    ŵ = (q − z) · s

so that |ŵ − w| ≤ s/2 for every entry of a group with w_min ≤ 0 ≤ w_max (always the case for real
weights: a group of 256 same-signed entries of a centred weight does not occur; such a group would
clamp). The zero point is an integer in [0, 255] and is stored exactly as uint8; the scale is stored in
float32: a bf16 scale (8 significant bits) would carry a relative error up to 2⁻⁹, which times
|q − z| ≤ 255 is up to half a step on top of the rounding, doubling the worst-case error for 4 bytes
per 256 weights (1.6 % of the codes). Padding rows of W_s are zeros and stay exactly 0 (q = z).

Storage per weight: 1 byte of code + 5/Gq bytes of scale and zero (≈1.02 bytes at Gq = 256) instead of 2
(bf16) or 4 (float32).

``quantized_matmul`` is the XLA path of x @ Ŵ: a custom VJP whose residuals are the codes, scale and zero
themselves (references to the frozen arrays), and whose backward dequantizes again, behind an
optimization barrier so that XLA cannot reuse (CSE) the forward's dequantized copy across the whole
forward pass. So at most one layer's dequantized weight exists at a time, as a temporary.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.qmatmul import check_quantized, dequantize_reference

QMAX = 255
MIN_RANGE = 1e-5


class QuantizedWeight(NamedTuple):
    """A group-quantized (Np, Mp) weight; groups of Gq rows per column."""

    codes: jax.Array  # (Np, Mp) uint8
    scale: jax.Array  # (NGq, Mp) float32
    zero: jax.Array   # (NGq, Mp) uint8

    @property
    def group_size(self) -> int:
        return self.codes.shape[0] // self.scale.shape[0]


def check_group_size(rows: int, group_size: int, *, what: str = "weight") -> None:
    """ValueError unless ``group_size`` divides the ``rows`` of the in (contraction) axis."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"quant_group_size must be a positive int, got quant_group_size={group_size!r}")
    if rows % group_size:
        divisors = [d for d in (256, 128, 64, 32, 16) if rows % d == 0]
        hint = f"; e.g. quant_group_size={divisors[0]}" if divisors else ""
        raise ValueError(f"{what}: its stored in-dimension {rows} (in-features padded to the POET block size) is "
                         f"not a multiple of quant_group_size={group_size}{hint}")


def quantize(w_NpxMp: jax.Array, group_size: int = 256) -> QuantizedWeight:
    """Group-wise asymmetric uint8 quantization of an (Np, Mp) weight (module doc); computed in float32."""
    if w_NpxMp.ndim != 2:
        raise ValueError(f"quantize expects a 2-D weight (Np, Mp), got shape {tuple(w_NpxMp.shape)}")
    np_, mp = w_NpxMp.shape
    check_group_size(np_, group_size, what=f"weight of shape {(np_, mp)}")
    w = w_NpxMp.astype(jnp.float32).reshape(np_ // group_size, group_size, mp)
    w_min, w_max = jnp.min(w, axis=1), jnp.max(w, axis=1)
    scale = jnp.maximum(w_max - w_min, MIN_RANGE) / QMAX
    zero = jnp.clip(-jnp.round(w_min / scale), 0, QMAX)
    q = jnp.clip(jnp.round(w / scale[:, None, :]) + zero[:, None, :], 0, QMAX)
    return QuantizedWeight(q.reshape(np_, mp).astype(jnp.uint8), scale, zero.astype(jnp.uint8))


def dequantize(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """Ŵ (Np, Mp) = (codes − zero) · scale, formed in float32 and returned in ``dtype``."""
    return dequantize_reference(qw.codes, qw.scale, qw.zero, dtype)


def quantization_step(qw: QuantizedWeight) -> jax.Array:
    """The step s of every entry's group, broadcast to (Np, Mp) (for error bounds)."""
    return jnp.repeat(qw.scale, qw.group_size, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def quantized_matmul(a: jax.Array, codes: jax.Array, scale: jax.Array, zero: jax.Array, precision=None):
    """a (..., Np) @ Ŵ (Np, Mp) in a's dtype (XLA). Differentiable in ``a`` only; the backward recomputes
    Ŵ instead of saving it (module doc)."""
    return _qmm_primal(a, codes, scale, zero, precision)


def _qmm_primal(a, codes, scale, zero, precision):
    check_quantized(codes, scale, zero)
    # The dequantization depends only on frozen inputs, so XLA may schedule every layer's at the start of
    # the step and keep them all alive (measured: +one float weight per layer of temporaries). Tying it
    # to the activation makes it run when this layer runs.
    a, codes, scale, zero = jax.lax.optimization_barrier((a, codes, scale, zero))
    return jnp.matmul(a, dequantize_reference(codes, scale, zero, a.dtype), precision=precision)


def _qmm_fwd(a, codes, scale, zero, precision):
    # The empty array only carries a's dtype to the backward (residuals must be arrays).
    return _qmm_primal(a, codes, scale, zero, precision), (codes, scale, zero, jnp.zeros((0,), a.dtype))


def _qmm_bwd(precision, res, g):
    codes, scale, zero, like = res
    # The barrier ties the re-dequantization to g: it cannot run before the backward reaches this layer,
    # and XLA cannot merge it with the forward's identical dequantization (which would keep one float
    # weight per layer alive from the forward to the backward, the memory XQ exists to save).
    g, codes, scale, zero = jax.lax.optimization_barrier((g, codes, scale, zero))
    w = dequantize_reference(codes, scale, zero, like.dtype)
    return jnp.matmul(g, w.T, precision=precision).astype(like.dtype), None, None, None


quantized_matmul.defvjp(_qmm_fwd, _qmm_bwd)
