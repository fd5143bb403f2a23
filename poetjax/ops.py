"""The POET-X linear layer as pure functions (POET spec §5).

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

Memory modes: "fast" differentiates through the factored computation (keeps u and h for the backward);
"mem" wraps the body in one ``jax.checkpoint`` that saves nothing, so only its inputs (the layer input x,
the small rotation blocks, the index vectors, and W_s by reference) are kept and u, a, h are recomputed in
the backward pass (one extra dense matmul).

``resolve_plan`` turns a layer's ``ExecConfig`` and static shapes into a ``LayerPlan``: which of four
bodies computes it (XLA on token-major activations, the token-major or the feature-major Pallas kernels,
or forming W_eff first) and whether the kernels run in Pallas's interpreter. Nothing here reads
module-level state at trace time.

POET-XQ: W_s may be a ``poetjax.quant.QuantizedWeight`` (uint8 codes + per-group scale/zero) instead
of an array. The dense matmul h = a @ Ŵ then dequantizes on the fly (XLA: ``quant.quantized_matmul``,
whose backward re-dequantizes; Pallas: ``pallas_kernels.qmatmul``, which dequantizes tiles inside the
matmul kernel), so no layer keeps a float copy of its base weight as a residual.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

import pallas_kernels as pk
from poetjax.cayley import HIGHEST
from poetjax.config import MEMORIES, ExecConfig
from poetjax.perms import full_input_index, full_output_index, permute, permute_rows
from poetjax.quant import QuantizedWeight, dequantize, quantized_matmul


class LayerPerms(NamedTuple):
    """The four int32 index vectors of one layer (see ``poetjax.perms``)."""

    perm_in: jax.Array       # (Np,)
    perm_in_inv: jax.Array   # (N,)
    perm_out: jax.Array      # (M,)
    perm_out_inv: jax.Array  # (Mp,)


def block_rotate(x_TxD: jax.Array, r_JxKxK: jax.Array, *, precision=None) -> jax.Array:
    """Right-multiply the last axis by blockdiag(R): out[..., j, :] = x[..., j, :] @ R[j].

    A reshape (free) and one batched contraction; the (D, D) block-diagonal matrix is never formed.
    """
    nb, k, _ = r_JxKxK.shape
    lead = x_TxD.shape[:-1]
    x_TxJxK = x_TxD.reshape(*lead, nb, k)
    y = jnp.einsum("...bk,bkc->...bc", x_TxJxK, r_JxKxK, precision=precision)
    return y.reshape(*lead, nb * k)


def block_rotate_rows(x_DxT: jax.Array, r_JxKxK: jax.Array, *, precision=None) -> jax.Array:
    """``block_rotate`` on feature-major activations: out[j·K:(j+1)·K] = R[j]ᵀ @ x[j·K:(j+1)·K] for (D, T)
    x, i.e. the transpose of ``block_rotate(x.T, r)``. One batched product with the blocks as batch."""
    nb, k, _ = r_JxKxK.shape
    t = x_DxT.shape[1]
    y = jnp.einsum("bkc,bkt->bct", r_JxKxK, x_DxT.reshape(nb, k, t), precision=precision)
    return y.reshape(nb * k, t)


def _base_matmul(a_TxNp, w0_NpxMp, precision, interpret=None):
    """h = a @ W_s; W_s an array or a QuantizedWeight (interpret None: XLA, else the Pallas kernel)."""
    if not isinstance(w0_NpxMp, QuantizedWeight):
        return jnp.matmul(a_TxNp, w0_NpxMp, precision=precision)
    if interpret is None:
        return quantized_matmul(a_TxNp, *w0_NpxMp, precision)
    return pk.qmatmul(a_TxNp, *w0_NpxMp, interpret=interpret)


def _base_matmul_t(a_NpxT, w0_NpxMp, precision, interpret):
    """hᵀ (Mp, T) = W_sᵀ @ aᵀ: the dense matmul on feature-major activations (a transposed operand costs
    XLA's GEMM nothing). POET-XQ's quantized matmul takes token-major operands: transposed around it."""
    if isinstance(w0_NpxMp, QuantizedWeight):
        return _base_matmul(a_NpxT.T, w0_NpxMp, precision, interpret).T
    return jax.lax.dot_general(w0_NpxMp, a_NpxT, (((0,), (0,)), ((), ())), precision=precision)


class LayerPlan(NamedTuple):
    """How one POET-X layer call runs, resolved once at trace time from its ``ExecConfig`` and static shapes
    (``resolve_plan``). Every plan computes the same function.

    body:      "xla" (token-major XLA ops), "pallas_tokens" (token-major Pallas kernels that gather inside
               their loads and stores), "pallas_features" (the Pallas transposing permutations, the block
               rotations and the dense matmul on feature-major (D, T) activations) or "weight" (form W_eff,
               then one dense matmul).
    impl:      "xla" or "pallas": also the implementation of the layer's Cayley map.
    memory:    "fast" or "mem" (the body under one ``jax.checkpoint`` that saves nothing).
    interpret: the Pallas kernels run in the interpreter (no GPU); None for XLA.
    chunk:     the permutations' run length (``POETConfig.perm_chunk``); the token-major kernels index by it.
    """

    body: str
    impl: str
    memory: str
    interpret: bool | None
    chunk: int


# compute="auto" forms W_eff with one CPU device once the layer sees at least this many tokens per unit of its
# wider side: T ≥ WEIGHT_TOKENS_PER_WIDTH · max(N, M) (BENCHMARKS.md, "Current defaults and why").
WEIGHT_TOKENS_PER_WIDTH = 1


def resolve_plan(exec_cfg: ExecConfig, *, memory: str, block_size: int, quantized: bool = False,
                 perm_chunk: int = 1, tokens: int = 0, n: int = 0, m: int = 0) -> LayerPlan:
    """The ``LayerPlan`` of a POET-BS layer with these static properties, applied to ``tokens`` tokens of
    N → M features (0: unknown, as for the Cayley map alone; compute "auto" then rotates activations).

    impl "auto": Pallas on a GPU when the kernels support the block size, XLA elsewhere; a uint8 base
    (POET-XQ) stays on XLA, the only path measured for it. impl "pallas" with an unsupported block size is
    a ValueError. Pallas runs token-major when the permutations move runs the kernels can index one at a
    time (``pallas_kernels.supports_chunk``), feature-major otherwise. compute "auto": "weight" in a process with
    one CPU device when T ≥ WEIGHT_TOKENS_PER_WIDTH · max(N, M) (there a step is mostly the cost of its many
    small operations, and the weight form has fewer), "activations" otherwise: on GPUs, and under data
    parallelism, where the weight form would all-reduce a W_eff-sized gradient per layer. The measurements
    behind these rules are in BENCHMARKS.md.
    """
    if not isinstance(exec_cfg, ExecConfig):
        raise TypeError(f"exec_cfg must be an ExecConfig, got {type(exec_cfg).__name__}")
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got memory={memory!r}")
    impl = exec_cfg.impl
    if impl == "pallas":
        pk.check_block_size(block_size)
    elif impl == "auto":
        gpu = jax.default_backend() == "gpu"
        impl = "pallas" if not quantized and gpu and pk.supports_block_size(block_size) else "xla"
    compute = exec_cfg.compute
    if compute == "auto":
        one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
        weight = one_cpu and tokens > 0 and tokens >= WEIGHT_TOKENS_PER_WIDTH * max(n, m)
        compute = "weight" if weight else "activations"
    if compute == "weight":
        body = "weight"
    elif impl == "xla":
        body = "xla"
    else:
        body = "pallas_tokens" if pk.supports_chunk(perm_chunk) else "pallas_features"
    interpret = pk.default_interpret() if impl == "pallas" else None
    return LayerPlan(body, impl, memory, interpret, perm_chunk)


def _xla_body(x, w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms: LayerPerms, precision, plan: LayerPlan):
    dtype = x.dtype
    u = permute(x, perms.perm_in, perms.perm_in_inv)
    a = block_rotate(u, r_in_IxKxK.astype(dtype), precision=precision)
    h = _base_matmul(a, w0_NpxMp, precision)
    z = block_rotate(h, r_out_OxKxK.astype(dtype), precision=precision)
    return permute(z, perms.perm_out, perms.perm_out_inv)


def _pallas_tokens_body(x, w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms: LayerPerms, precision, plan: LayerPlan):
    """The kernels cast the float32 blocks inside and return their cotangents in float32."""
    a = pk.permuted_block_matmul(x, perms.perm_in, r_in_IxKxK, interpret=plan.interpret, chunk=plan.chunk)
    h = _base_matmul(a, w0_NpxMp, precision, plan.interpret)
    return pk.block_matmul_permuted(h, perms.perm_out, r_out_OxKxK, inv_perm=perms.perm_out_inv,
                                    interpret=plan.interpret, chunk=plan.chunk)


def _pallas_features_body(x, w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms: LayerPerms, precision, plan: LayerPlan):
    """The input permutation also transposes to (Np, T) (one Pallas kernel, ``pallas_kernels.transpose_perm``),
    so every permutation moves whole rows; the block rotations and the dense matmul run there and the output
    permutation transposes back."""
    dtype = x.dtype
    lead, n = x.shape[:-1], x.shape[-1]
    m = perms.perm_out.shape[0]
    u_t = pk.transpose_scatter(x.reshape(-1, n), full_input_index(perms.perm_in, perms.perm_in_inv),
                               interpret=plan.interpret)                       # (Np, T)
    a_t = block_rotate_rows(u_t, r_in_IxKxK.astype(dtype), precision=precision)
    h_t = _base_matmul_t(a_t, w0_NpxMp, precision, plan.interpret)            # (Mp, T)
    z_t = block_rotate_rows(h_t, r_out_OxKxK.astype(dtype), precision=precision)
    y = pk.gather_transpose(z_t, full_output_index(perms.perm_out, perms.perm_out_inv), m,
                            interpret=plan.interpret)                          # (T, M)
    return y.reshape(*lead, m)


def _weight_body(x, w0_NpxMp, r_in_IxKxK, r_out_OxKxK, perms: LayerPerms, precision, plan: LayerPlan):
    """Form W_eff from the blocks (two block products and two permutations of an (N, M) array), then one dense
    matmul; its VJP is the dense layer's (dx and dW_eff) followed by the blocks' (dR_in, dR_out from dW_eff)."""
    dtype = x.dtype
    if isinstance(w0_NpxMp, QuantizedWeight):
        w0_NpxMp = dequantize(w0_NpxMp, dtype)
    w = weight_from_blocks(w0_NpxMp, r_in_IxKxK.astype(dtype), r_out_OxKxK.astype(dtype), perms, precision)
    return jnp.matmul(x, w, precision=precision)


_BODIES = {"xla": _xla_body, "pallas_tokens": _pallas_tokens_body, "pallas_features": _pallas_features_body,
           "weight": _weight_body}


def poet_x_linear(x: jax.Array, w0_NpxMp: jax.Array | QuantizedWeight, r_in_IxKxK: jax.Array, r_out_OxKxK: jax.Array,
                  perms: LayerPerms, plan: LayerPlan, *, precision=None) -> jax.Array:
    """y (..., M) = x (..., N) · W_eff for the POET-X layer, by ``plan`` (``resolve_plan``); computed in x's dtype.

    W_s is cast to x's dtype (a ``QuantizedWeight`` W_s, POET-XQ, stays uint8 and is dequantized inside the
    matmul) and never receives a gradient: it is stop-gradient'ed here. The rotation blocks come in float32.
    """
    if not isinstance(plan, LayerPlan):
        raise TypeError(f"plan must be a LayerPlan (poetjax.ops.resolve_plan), got {type(plan).__name__}")
    if isinstance(w0_NpxMp, QuantizedWeight):
        w0 = jax.tree.map(jax.lax.stop_gradient, w0_NpxMp)
    else:
        w0 = jax.lax.stop_gradient(w0_NpxMp).astype(x.dtype)
    body = functools.partial(_BODIES[plan.body], precision=precision, plan=plan)
    if plan.memory == "mem":
        body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
    return body(x, w0, r_in_IxKxK, r_out_OxKxK, perms)


def _kernel_order(a_NpxMp: jax.Array, perms: LayerPerms) -> jax.Array:
    """blockdiag(R_in) · W_s · blockdiag(R_out) (Np, Mp) → W_eff (N, M): rows and columns back to the layer's
    own order (the permutations' VJPs are inverse gathers, ``poetjax.perms``)."""
    a = permute_rows(a_NpxMp, perms.perm_in_inv, perms.perm_in)  # (N, Mp)
    return permute(a, perms.perm_out, perms.perm_out_inv)        # (N, M)


def weight_from_blocks(w0_NpxMp: jax.Array, r_in_IxKxK: jax.Array, r_out_OxKxK: jax.Array, perms: LayerPerms,
                       precision=None) -> jax.Array:
    """W_eff (N, M) = P_in · blockdiag(R_in) · W_s · blockdiag(R_out) · P_out in the operands' dtype
    (differentiable)."""
    nb, k, _ = r_in_IxKxK.shape
    # Left-multiply by blockdiag(R_in): row block i becomes R_in[i] @ W_s[i·K:(i+1)·K, :].
    a = jnp.einsum("ikc,icm->ikm", r_in_IxKxK, w0_NpxMp.reshape(nb, k, -1), precision=precision)
    return _kernel_order(block_rotate(a.reshape(nb * k, -1), r_out_OxKxK, precision=precision), perms)


def tiled_weights_from_blocks(groups: list[tuple[jax.Array, jax.Array, jax.Array, LayerPerms]],
                              precision=None) -> list[jax.Array]:
    """``weight_from_blocks`` of every layer of ``groups`` at once, one block size K for all: each group
    (w0 (L, Np, Mp), r_in (L, I, K, K), r_out (L, O, K, K), permutations (L, Np) etc.) gives W_eff (L, N, M).

    Tile (i, o) of blockdiag(R_in) · W_s · blockdiag(R_out) is R_in[i] · W_s[i, o] · R_out[o], so the K × K
    tiles of all layers, whatever their shapes, go through one batched product per side: two matrix products
    of one shape for the whole model, where a product per side and layer shape gave each its own GEMM for
    XLA to autotune on a GPU (BENCHMARKS.md, "Time to result, the model's kernels in two products"). Memory:
    besides the tiles of W_s, each side's blocks are repeated once per tile (each repeat as large as the W_s it
    multiplies), transient, as the concatenated W_s of all layers already was."""
    k = groups[0][1].shape[-1]
    dims = [(r_in.shape[0], r_in.shape[1], r_out.shape[1]) for _, r_in, r_out, _ in groups]  # (L, I, O)
    tiles, lefts, rights = [], [], []
    for (w0, r_in, r_out, _), (n_l, n_i, n_o) in zip(groups, dims):
        tiles.append(w0.reshape(n_l, n_i, k, n_o, k).transpose(0, 1, 3, 2, 4).reshape(-1, k, k))
        lefts.append(jnp.broadcast_to(r_in[:, :, None], (n_l, n_i, n_o, k, k)).reshape(-1, k, k))
        rights.append(jnp.broadcast_to(r_out[:, None], (n_l, n_i, n_o, k, k)).reshape(-1, k, k))

    def cat(arrays):
        return arrays[0] if len(arrays) == 1 else jnp.concatenate(arrays)

    a = jnp.einsum("tkc,tcm->tkm", cat(lefts), cat(tiles), precision=precision)
    a = jnp.einsum("tkm,tmc->tkc", a, cat(rights), precision=precision)
    parts = jax.lax.split(a, [math.prod(d) for d in dims]) if len(dims) > 1 else [a]
    out = []
    for part, (_, _, _, perms), (n_l, n_i, n_o) in zip(parts, groups, dims):
        a_l = part.reshape(n_l, n_i, n_o, k, k).transpose(0, 1, 3, 2, 4).reshape(n_l, n_i * k, n_o * k)
        out.append(jax.vmap(_kernel_order)(a_l, perms))
    return out


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
