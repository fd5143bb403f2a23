"""Permutations as int32 index arrays (POET spec §0, §12.1).

"Apply p" is the gather ``x[..., p]``. Its VJP is the gather of the cotangent with the inverse index,
never a scatter-add (measured much slower on a GPU: docs/benchmark_log.md, run 1).

One side of a POET layer may also change length: the input side pads D real coordinates up to the
J·K coordinates of its blocks, the output side drops the padding again. Both are gathers with an
out-of-range index that reads 0 (``mode="fill"``), so one primitive covers permute, permute+pad and
permute+crop:

  input side  (D → Dp): ``perm_in``  (Dp,) = [π, D, …, D],  ``perm_in_inv``  (D,)  = π⁻¹
  output side (Dp → D): ``perm_out`` (D,)  = σ,              ``perm_out_inv`` (Dp,) = [σ⁻¹, D, …, D]

so that ``u = x[..., perm_in]`` and, backward, ``g_x = g_u[..., perm_in_inv]``; ``y = z[..., perm_out]``
and ``g_z = g_y[..., perm_out_inv]`` (the padding gets a zero cotangent).

Sorted within blocks (``block_size`` given, as layers do): the block-side vectors ``perm_in`` and
``perm_out_inv`` (both of length J·K) are sorted inside every block of K. Only *which* coordinates share
a block matters to POET — the order inside a block is a relabeling to which everything is equivariant:
Q ↦ ΣᵀQΣ keeps Q skew and the Neumann series commutes with it, Adam is elementwise and sign-symmetric,
W_s is re-stored for the new permutations at every merge, θ restarts from 0. So the distribution of
the trained function is unchanged, while the kernels' gathers and scatters (which index through these
two vectors) touch increasing addresses: ~K/D of a block's entries per cache line instead of random
ones, several times fewer memory transactions per warp than a uniformly shuffled order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _index_permutation(axis: int, doc: str):
    """A permutation along ``axis`` as a gather (out-of-range indices read 0) whose VJP gathers the
    cotangent with the inverse index: f(x, idx, inv_idx)."""

    def gather(x, idx):
        return jnp.take(x, idx, axis=axis, mode="fill", fill_value=0)

    @jax.custom_vjp
    def f(x: jax.Array, idx: jax.Array, inv_idx: jax.Array) -> jax.Array:
        return gather(x, idx)

    f.defvjp(lambda x, idx, inv_idx: (gather(x, idx), inv_idx), lambda inv_idx, g: (gather(g, inv_idx), None, None))
    f.__doc__ = doc
    return f


permute = _index_permutation(-1, """``x[..., idx]`` (out-of-range indices read 0) with the backward ``g[..., inv_idx]``.

    Requires that idx and inv_idx are mutually inverse on the real coordinates (see module doc).
    """)


permute_rows = _index_permutation(0, """``x[idx]`` along the leading axis (out-of-range indices read 0) with the
    backward ``g[inv_idx]``: ``permute`` for feature-major (D, T) activations, where a permutation moves
    whole contiguous rows.""")


def full_input_index(perm_in: jax.Array, perm_in_inv: jax.Array) -> jax.Array:
    """The (Dp,) permutation of range(Dp) that sends input column n to its row perm_in_inv[n] of the
    blocked basis, and the Dp − D padding columns to the padding rows (``pallas_kernels.transpose_scatter``)."""
    if perm_in_inv.shape[0] == perm_in.shape[0]:
        return perm_in_inv
    return jnp.argsort(perm_in).astype(jnp.int32)  # stable: the first D entries are perm_in_inv


def full_output_index(perm_out: jax.Array, perm_out_inv: jax.Array) -> jax.Array:
    """The (Dp,) permutation of range(Dp) whose first D entries are perm_out (output column i reads row
    perm_out[i] of the blocked basis) and whose rest are the padding rows (``pallas_kernels.gather_transpose``)."""
    if perm_out.shape[0] == perm_out_inv.shape[0]:
        return perm_out
    return jnp.argsort(perm_out_inv).astype(jnp.int32)  # stable: the first D entries are perm_out


def _sort_within_blocks(idx: jax.Array, block_size: int | None) -> jax.Array:
    """Sort every run of ``block_size`` entries of a (J·K,) index (padding values, the largest, stay last)."""
    if block_size is None:
        return idx
    if idx.shape[0] % block_size:
        raise ValueError(f"index length {idx.shape[0]} is not a multiple of block_size={block_size}")
    return jnp.sort(idx.reshape(-1, block_size), axis=1).reshape(-1)


def check_chunk(chunk: int, dim: int, block_size: int | None, name: str = "dim") -> None:
    """ValueError unless ``chunk`` (features that move together) divides ``dim`` and the block size."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"perm_chunk must be a positive int, got perm_chunk={chunk!r}")
    if dim % chunk:
        raise ValueError(f"perm_chunk={chunk} does not divide {name}={dim}")
    if block_size is not None and block_size % chunk:
        raise ValueError(f"perm_chunk={chunk} does not divide block_size={block_size}")


def _chunked_permutation(key: jax.Array, dim: int, chunk: int) -> jax.Array:
    """A uniformly random permutation of the ``dim // chunk`` runs of ``chunk`` consecutive coordinates,
    each run kept in order: π[q·c + i] = c·ρ[q] + i (c = 1: a uniformly random permutation of dim)."""
    if chunk == 1:
        return jax.random.permutation(key, dim).astype(jnp.int32)
    rho = jax.random.permutation(key, dim // chunk).astype(jnp.int32)
    return (rho[:, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]).reshape(-1)


def input_permutation(key: jax.Array, dim: int, padded: int,
                      block_size: int | None = None, chunk: int = 1) -> tuple[jax.Array, jax.Array]:
    """A uniformly random π of ``dim``: (perm_in (padded,), perm_in_inv (dim,)), int32.

    With ``block_size``, perm_in is sorted inside every block (a uniformly random assignment of the
    coordinates to blocks; see the module docstring). ``chunk`` > 1 permutes runs of ``chunk``
    consecutive coordinates instead of single ones (see ``POETConfig.perm_chunk``): every block then
    reads its coordinates in contiguous runs, which memory loads can coalesce.
    """
    check_chunk(chunk, dim, block_size)
    pi = _chunked_permutation(key, dim, chunk)
    pad = jnp.full((padded - dim,), dim, jnp.int32)
    perm = _sort_within_blocks(jnp.concatenate([pi, pad]), block_size)
    return perm, jnp.argsort(perm)[:dim].astype(jnp.int32)


def output_permutation(key: jax.Array, dim: int, padded: int,
                       block_size: int | None = None, chunk: int = 1) -> tuple[jax.Array, jax.Array]:
    """A uniformly random σ of ``dim``: (perm_out (dim,), perm_out_inv (padded,)), int32.

    With ``block_size``, perm_out_inv is sorted inside every block (see the module docstring); ``chunk``
    as in ``input_permutation``.
    """
    check_chunk(chunk, dim, block_size)
    sigma = _chunked_permutation(key, dim, chunk)
    pad = jnp.full((padded - dim,), dim, jnp.int32)
    inv = _sort_within_blocks(jnp.concatenate([jnp.argsort(sigma).astype(jnp.int32), pad]), block_size)
    return jnp.argsort(inv)[:dim].astype(jnp.int32), inv
