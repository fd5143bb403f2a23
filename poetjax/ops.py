"""The POET-X linear layer as pure functions (POET spec §5), XLA path.

Shape legend: T tokens (any leading batch dims), N in-features, M out-features, K block size,
I = ⌈N/K⌉ input blocks, O = ⌈M/K⌉ output blocks, Np = I·K, Mp = O·K (padded sizes).

Input-centric forward, y = x · W_effᵀ without ever forming W_eff:

    u = x[..., perm_in]          (T, Np)  gather (+ zero padding)
    a = blockdiag(R_in) applied  (T, Np)  a[..., i, :] = u[..., i, :] @ R_in[i]
    h = a @ W_s                  (T, Mp)  the only dense matmul; W_s is frozen (no dW)
    z = blockdiag(R_out) applied (T, Mp)
    y = z[..., perm_out]         (T, M)   gather (− padding)

W_s (Np, Mp) is the frozen base weight stored pre-permuted ("permutation reduction", spec §5.1): the
two inner permutations of R·W0·P are folded into it at every merge. The effective (N, M) kernel is
W_eff = A[perm_in_inv][:, perm_out] with A = blockdiag(R_in) · W_s · blockdiag(R_out).

Variants: "fast" differentiates through the factored computation (keeps u and h for the backward);
"mem" wraps the body in ``jax.checkpoint`` with a policy that saves nothing, so only its inputs — the
layer input x, the small rotation blocks, the index vectors, and W_s by reference — are kept and
u, a, h are recomputed in the backward pass (one extra dense matmul).

Implementations (``impl``): "xla" is the jnp code below; "pallas" runs the same equations through the
fused kernels of ``pallas_kernels`` — the input gather happens inside the loads of the input rotation
(``permuted_block_matmul``), the output gather inside the stores of the output rotation
(``block_matmul_permuted``), and their backward kernels do the inverse permutations and the dR
reductions — with the dense matmul left to XLA. "auto" picks Pallas on a GPU when the kernels support
the block size (see ``resolve_impl``). Both variants exist for both implementations.

POET-XQ: W_s may be a ``poetjax.quant.QuantizedWeight`` (uint8 codes + per-group scale/zero) instead
of an array. The dense matmul h = a @ Ŵ then dequantizes on the fly — XLA: ``quant.quantized_matmul``,
whose backward re-dequantizes; Pallas: ``pallas_kernels.qmatmul``, which dequantizes tiles inside the
matmul kernel — so no layer keeps a float copy of its base weight as a residual.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from poetjax.cayley import HIGHEST
from poetjax.config import COMPUTES, IMPLS, LAYOUTS
from poetjax.perms import full_input_index, full_output_index, permute, permute_rows
from poetjax.quant import QuantizedWeight, dequantize, quantized_matmul


class LayerPerms(NamedTuple):
    """The four int32 index vectors of one layer (see ``poetjax.perms``)."""

    perm_in: jax.Array       # (Np,)
    perm_in_inv: jax.Array   # (N,)
    perm_out: jax.Array      # (M,)
    perm_out_inv: jax.Array  # (Mp,)


def block_rotate(x_TxD: jax.Array, r_BxKxK: jax.Array, *, precision=None) -> jax.Array:
    """Right-multiply the last axis by blockdiag(R): out[..., j, :] = x[..., j, :] @ R[j].

    A reshape (free) and one batched contraction; the (D, D) block-diagonal matrix is never formed.
    """
    nb, k, _ = r_BxKxK.shape
    lead = x_TxD.shape[:-1]
    x_TxBxK = x_TxD.reshape(*lead, nb, k)
    y = jnp.einsum("...bk,bkc->...bc", x_TxBxK, r_BxKxK, precision=precision)
    return y.reshape(*lead, nb * k)


def block_rotate_rows(x_DxT: jax.Array, r_BxKxK: jax.Array, *, precision=None) -> jax.Array:
    """``block_rotate`` on feature-major activations: out[j·K:(j+1)·K] = R[j]ᵀ @ x[j·K:(j+1)·K] for (D, T)
    x, i.e. the transpose of ``block_rotate(x.T, r)``. One batched product with the blocks as batch."""
    nb, k, _ = r_BxKxK.shape
    t = x_DxT.shape[1]
    y = jnp.einsum("bkc,bkt->bct", r_BxKxK, x_DxT.reshape(nb, k, t), precision=precision)
    return y.reshape(nb * k, t)


def _base_matmul(a_TxNp, w0_NpxMp, precision, interpret=None):
    """h = a @ W_s; W_s an array or a QuantizedWeight (interpret None: XLA, else the Pallas kernel)."""
    if not isinstance(w0_NpxMp, QuantizedWeight):
        return jnp.matmul(a_TxNp, w0_NpxMp, precision=precision)
    if interpret is None:
        return quantized_matmul(a_TxNp, *w0_NpxMp, precision)
    return pk.qmatmul(a_TxNp, *w0_NpxMp, interpret=interpret)


def _poet_x_body(x, w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms: LayerPerms, precision):
    u = permute(x, perms.perm_in, perms.perm_in_inv)
    a = block_rotate(u, r_in_IxKxK, precision=precision)
    h = _base_matmul(a, w0_NpxMp, precision)
    z = block_rotate(h, r_out_OxKxK, precision=precision)
    return permute(z, perms.perm_out, perms.perm_out_inv)


_poet_x_mem_body = jax.checkpoint(_poet_x_body, policy=jax.checkpoint_policies.nothing_saveable,
                                  static_argnums=(5,))


def resolve_impl(impl: str, block_size: int, *, quantized: bool = False) -> str:
    """"xla" or "pallas" for a layer of this block size; "pallas" with an unsupported block size is a
    ValueError. Decided at trace time, so a model built on one machine runs on another.

    "auto" picks the path measured fastest (BENCHMARKS.md runs 4 and 6): Pallas on a GPU when the kernels
    support the block size, XLA elsewhere. ``quantized`` (POET-XQ): "auto" stays on XLA, the only path
    measured for it (the qmatmul kernel's speed is unmeasured).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got impl={impl!r}")
    if impl == "pallas":
        pk.check_block_size(block_size)
        return impl
    if impl == "auto":
        use = not quantized and jax.default_backend() == "gpu" and pk.supports_block_size(block_size)
        return "pallas" if use else "xla"
    return impl


def _poet_x_pallas_body(x, w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms: LayerPerms, precision, interpret, chunk):
    a = pk.permuted_block_matmul(x, perms.perm_in, r_in_IxKxK, interpret=interpret, chunk=chunk)
    h = _base_matmul(a, w0_NpxMp, precision, interpret)
    return pk.block_matmul_permuted(h, perms.perm_out, r_out_OxKxK, inv_perm=perms.perm_out_inv,
                                    interpret=interpret, chunk=chunk)


_poet_x_pallas_mem_body = jax.checkpoint(_poet_x_pallas_body, policy=jax.checkpoint_policies.nothing_saveable,
                                         static_argnums=(5, 6, 7))


def _base_matmul_t(a_NpxT, w0_NpxMp, precision, interpret=None):
    """hᵀ (Mp, T) = W_sᵀ @ aᵀ: the dense matmul on feature-major activations (a transposed operand costs
    XLA's GEMM nothing). POET-XQ's quantized matmuls take token-major operands: transposed around them."""
    if isinstance(w0_NpxMp, QuantizedWeight):
        return _base_matmul(a_NpxT.T, w0_NpxMp, precision, interpret).T
    return jax.lax.dot_general(w0_NpxMp, a_NpxT, (((0,), (0,)), ((), ())), precision=precision)


def _poet_x_features_body(x, w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms: LayerPerms, precision, interpret):
    """The POET-X layer on feature-major activations (see LAYOUTS); interpret None: XLA's row gathers of
    transposed arrays, else the transposing permutation kernels of ``pallas_kernels.transpose_perm``."""
    lead, n = x.shape[:-1], x.shape[-1]
    m = perms.perm_out.shape[0]
    x2 = x.reshape(-1, n)
    if interpret is None:
        u_t = permute_rows(x2.T, perms.perm_in, perms.perm_in_inv)            # (Np, T)
    else:
        u_t = pk.transpose_scatter(x2, full_input_index(perms.perm_in, perms.perm_in_inv), interpret=interpret)
    a_t = block_rotate_rows(u_t, r_in_IxKxK, precision=precision)
    h_t = _base_matmul_t(a_t, w0_NpxMp, precision, interpret)                  # (Mp, T)
    z_t = block_rotate_rows(h_t, r_out_OxKxK, precision=precision)
    if interpret is None:
        y = permute_rows(z_t, perms.perm_out, perms.perm_out_inv).T           # (T, M)
    else:
        y = pk.gather_transpose(z_t, full_output_index(perms.perm_out, perms.perm_out_inv), m,
                                interpret=interpret)
    return y.reshape(*lead, m)


_poet_x_features_mem_body = jax.checkpoint(_poet_x_features_body, policy=jax.checkpoint_policies.nothing_saveable,
                                           static_argnums=(5, 6))


def _poet_w_body(x, w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms: LayerPerms, precision):
    """compute="weight": form W_eff from the blocks (two block products and two permutations of an (N, M)
    array), then one dense matmul; its VJP is the dense layer's (dx and dW_eff) followed by the blocks'
    (dR_in, dR_out from dW_eff). Cheaper than rotating the activations once T ≫ N, M."""
    if isinstance(w0_NpxMp, QuantizedWeight):
        w0_NpxMp = dequantize(w0_NpxMp, x.dtype)
    w = weight_from_blocks(w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms, precision)
    return jnp.matmul(x, w, precision=precision)


_poet_w_mem_body = jax.checkpoint(_poet_w_body, policy=jax.checkpoint_policies.nothing_saveable,
                                  static_argnums=(5,))


# compute="auto" forms W_eff in the mem flavour once the layer sees at least this many tokens per unit of its
# wider side (T ≥ WEIGHT_TOKENS_PER_WIDTH · max(N, M)); the fast flavour keeps rotating activations. See
# resolve_compute for the measurements behind both.
WEIGHT_TOKENS_PER_WIDTH = 1


def resolve_compute(compute: str, tokens: int, n: int, m: int, variant: str = "fast") -> str:
    """"activations" or "weight" for a layer of N → M features applied to ``tokens`` tokens.

    "activations": POET-X, input-centric: rotate the activations, never form W_eff (no dW matmul; passes
    over (T, N) and (T, M) arrays). "weight": POET's weight-centric form: W_eff from the blocks, then a
    dense matmul (passes over the (N, M) weight, plus the dW matmul: three dense matmuls like a dense
    layer instead of two). Both compute the same function (the same products, rounded to the compute dtype
    at different places).

    "auto" (decided at trace time from the static shapes): "weight" for the mem flavour when
    T ≥ WEIGHT_TOKENS_PER_WIDTH · max(N, M), else "activations". Measured on the H200 (BENCHMARKS.md run
    7, fwd+bwd, b=256): mem/weight ÷ mem/activations = 0.82 (T=16384, 4096²), 0.94 (16384, 4096→11008),
    0.81 / 0.93 / 0.86 (T=8192: 2048², 2048→5632, 5632→2048), 1.80 / 2.61 (T=1024: 4096², 4096→14336):
    the mem flavour recomputes the whole rotated forward on activations, but only W_eff on weights. In
    the fast flavour "weight" won only at T=8192, 2048² (0.90) and lost by 1.07–1.27 at the other T ≥ N
    shapes, so "auto" keeps POET-X there. Under data parallelism "weight" all-reduces a W_eff-sized
    gradient per layer (POET-X reduces only the generators'): keep "activations" there.
    """
    if compute not in COMPUTES:
        raise ValueError(f"compute must be one of {COMPUTES}, got compute={compute!r}")
    if compute != "auto":
        return compute
    if variant == "mem" and tokens >= WEIGHT_TOKENS_PER_WIDTH * max(n, m):
        return "weight"
    return "activations"


# What layout="auto" resolves to, per implementation (see resolve_layout).
AUTO_LAYOUT = {"xla": "tokens", "pallas": "features"}
# ... and for Pallas with chunked permutations the kernels can index one run at a time (pk.supports_chunk).
CHUNKED_PALLAS_LAYOUT = "tokens"


def resolve_layout(layout: str, impl: str, perm_chunk: int = 1) -> str:
    """"tokens" or "features" for a resolved ``impl`` ("xla" | "pallas").

    "tokens": the activations stay (T, D) and the permutations are gathers along the contiguous axis
    (XLA: ``jnp.take``; Pallas: fused into the loads/stores of the block-rotation kernels).
    "features": the input permutation also transposes to (Dp, T), the block rotations and the dense
    matmul run there, and the output permutation transposes back, so every permutation moves whole rows
    (XLA: a transpose and a row gather; Pallas: one transposing kernel, ``pallas_kernels.transpose_perm``).
    Same numbers either way (the same products in the same dtype).

    "auto" with Pallas and chunked permutations (``perm_chunk`` with a power-of-two factor ≥ 16, see
    ``POETConfig.perm_chunk``): "tokens", whose kernels then load and store whole contiguous runs, so no
    transposing pass is needed at all (``CHUNKED_PALLAS_LAYOUT``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got layout={layout!r}")
    if layout != "auto":
        return layout
    if impl == "pallas" and pk.supports_chunk(perm_chunk):
        return CHUNKED_PALLAS_LAYOUT
    return AUTO_LAYOUT[impl]


def poet_x_linear(x: jax.Array, w0_NpxMp: jax.Array | QuantizedWeight, r_in_IxKxK: jax.Array, r_out_OxKxK: jax.Array,
                  perms: LayerPerms, *, variant: str = "fast", precision=None, impl: str = "xla",
                  layout: str = "auto", compute: str = "activations", perm_chunk: int = 1) -> jax.Array:
    """y (..., M) = x (..., N) · W_eff for the POET-X layer; computed in x's dtype.

    W_s and the rotation blocks are cast to x's dtype (the blocks are computed in float32 first; the
    Pallas kernels cast them inside and return their cotangents in float32). W_s never receives a
    gradient: it is not differentiated even if the caller's transformation would allow it, because it
    is stop-gradient'ed here. ``impl``: "xla", "pallas" or "auto" (see ``resolve_impl``).
    A ``QuantizedWeight`` W_s (POET-XQ) is kept in uint8 and dequantized inside the matmul.
    ``layout``: "tokens", "features" or "auto" (see ``resolve_layout``). ``compute``: "activations"
    (POET-X), "weight" (form W_eff, then one dense matmul) or "auto" (see ``resolve_compute``).
    ``perm_chunk``: the permutations move runs of this many coordinates (``poetjax.perms``; the layer's
    ``POETConfig.perm_chunk``); the token-major Pallas kernels then index one run per tile. Other paths
    ignore it (they are correct for any permutation).
    """
    if variant not in ("fast", "mem"):
        raise ValueError(f"variant must be 'fast' or 'mem', got variant={variant!r}")
    dtype = x.dtype
    if isinstance(w0_NpxMp, QuantizedWeight):
        w0 = jax.tree.map(jax.lax.stop_gradient, w0_NpxMp)
    else:
        w0 = jax.lax.stop_gradient(w0_NpxMp).astype(dtype)
    impl = resolve_impl(impl, r_in_IxKxK.shape[-1], quantized=isinstance(w0_NpxMp, QuantizedWeight))
    layout = resolve_layout(layout, impl, perm_chunk)
    tokens = math.prod(x.shape[:-1])
    compute = resolve_compute(compute, tokens, x.shape[-1], perms.perm_out.shape[0], variant)
    if compute == "weight":
        body = _poet_w_body if variant == "fast" else _poet_w_mem_body
        return body(x, w0, r_in_IxKxK.astype(dtype), r_out_OxKxK.astype(dtype), perms, precision)
    if layout == "features":
        body = _poet_x_features_body if variant == "fast" else _poet_x_features_mem_body
        # impl "pallas" without a GPU: the interpreter (correct everywhere, slow; for tests).
        interpret = pk.default_interpret() if impl == "pallas" else None
        return body(x, w0, r_in_IxKxK.astype(dtype), r_out_OxKxK.astype(dtype), perms, precision, interpret)
    if impl == "pallas":
        body = _poet_x_pallas_body if variant == "fast" else _poet_x_pallas_mem_body
        return body(x, w0, r_in_IxKxK, r_out_OxKxK, perms, precision, pk.default_interpret(), perm_chunk)
    r_in = r_in_IxKxK.astype(dtype)
    r_out = r_out_OxKxK.astype(dtype)
    body = _poet_x_body if variant == "fast" else _poet_x_mem_body
    return body(x, w0, r_in, r_out, perms, precision)


def weight_from_blocks(w0_NpxMp: jax.Array, r_in_IxKxK: jax.Array, r_out_OxKxK: jax.Array, perms: LayerPerms,
                       precision=None) -> jax.Array:
    """W_eff (N, M) = P_in · blockdiag(R_in) · W_s · blockdiag(R_out) · P_out in the operands' dtype
    (differentiable; the permutations' VJPs are inverse gathers, ``poetjax.perms``)."""
    nb, k, _ = r_in_IxKxK.shape
    # Left-multiply by blockdiag(R_in): row block i becomes R_in[i] @ W_s[i·K:(i+1)·K, :].
    a = jnp.einsum("ikc,icm->ikm", r_in_IxKxK, w0_NpxMp.reshape(nb, k, -1), precision=precision)
    a = block_rotate(a.reshape(nb * k, -1), r_out_OxKxK, precision=precision)
    a = permute_rows(a, perms.perm_in_inv, perms.perm_in)       # (N, Mp): rows back to input order
    return permute(a, perms.perm_out, perms.perm_out_inv)       # (N, M)


def effective_kernel(w0_NpxMp: jax.Array, r_in_IxKxK: jax.Array, r_out_OxKxK: jax.Array,
                     perms: LayerPerms) -> jax.Array:
    """The dense (N, M) kernel W_eff with layer(x) == x @ W_eff, in float32 (float32-exact products)."""
    f32 = jnp.float32
    return weight_from_blocks(w0_NpxMp.astype(f32), r_in_IxKxK.astype(f32), r_out_OxKxK.astype(f32), perms,
                              precision=HIGHEST)


def store_base_weight(kernel_NxM: jax.Array, perms: LayerPerms) -> jax.Array:
    """W_s (Np, Mp) such that with identity rotations the layer computes x @ kernel (spec §6 step 3).

    W_s[i, c] = kernel[π[i], σ⁻¹[c]] on the real coordinates, 0 on the padding.
    """
    w = jnp.take(kernel_NxM, perms.perm_in, axis=0, mode="fill", fill_value=0)
    return jnp.take(w, perms.perm_out_inv, axis=1, mode="fill", fill_value=0)
