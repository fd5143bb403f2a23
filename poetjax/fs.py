"""POET-FS, the fully stochastic primitive (POET spec §3.1), as pure functions.

Shape legend: T tokens (any leading batch dims), N in-features, M out-features, Ki = |S_in| and
Ko = |S_out| the subset sizes, Pi = Ki(Ki−1)/2, Po = Ko(Ko−1)/2 packed generator entries.

Each inner loop rotates one random index subset per side. With D(S) the (D, |S|) selection matrix of an
ordered subset S and G̃ a small orthogonal matrix (Cayley–Neumann of one packed skew generator),

    G = I + D(S)(G̃ − I)D(S)ᵀ,      (x·G)[S] = x[S]·G̃,   every other coordinate unchanged,

and the layer computes y = x · R · W0 · P with R = G(S_in, G̃_in) (N×N), P = G(S_out, G̃_out) (M×M).

Permutation reduction, as in the block-stochastic core (``poetjax.ops``): the first K entries of a
uniformly random permutation are a uniformly random ordered K-subset, so a merge draws permutations
π (of N) and σ (of M) with the core's samplers, stores W_s[i, c] = W[π[i], σ⁻¹[c]], and the subsets are
S_in = π[:Ki], S_out = σ⁻¹[:Ko] (``index_subsets``). In that permuted space S is a prefix:

    u = x[..., perm_in]                      (T, N)  gather (its VJP is the inverse gather)
    a = [u[..., :Ki] @ G̃_in , u[..., Ki:]]   (T, N)  small matmul on the prefix; the rest is copied
    h = a @ W_s                              (T, M)  the dense matmul; W_s frozen
    z = [h[..., :Ko] @ G̃_out, h[..., Ko:]]   (T, M)
    y = z[..., perm_out]                     (T, M)  gather

i.e. the core's forward with blockdiag(G̃, I) in place of the block-diagonal rotations. The
recombination is a concatenation (a copy, whose VJP is two slices): no scatter forward or backward, and
coordinates outside S pass through bit for bit.

Why not skip the two full-width gathers with the algebraic form h = x·W + ((x[..., S]·(G̃ − I))·W[S, :])
on an unpermuted W? It replaces the gather of x (T·N reads) by a second matmul of T·Ki·M
multiply-adds, +Ki/N = +50 % of the layer's FLOPs at the papers' b = 1/2; and the output side would
still need a scatter (or a one-hot matmul) to put the rotated coordinates back. The gathers cost
memory traffic only, and the core already pays the same two gathers for POET-BS.

A merge folds G̃_in, G̃_out into W0, draws new permutations (hence new subsets) from the merge key and
zeroes θ — exactly ``POETLinear.merge_and_reinit``; subsets are array values, so merges never retrace.
The backward pass is plain autodiff of this forward (like the BS "fast" variant: u and h are kept).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from poetjax.cayley import HIGHEST
from poetjax.ops import LayerPerms
from poetjax.perms import permute


class SubsetLayout(NamedTuple):
    """Static structure of one side of a POET-FS layer: a subset of ``size`` of ``dim`` coordinates.

    Exposes the fields of ``poetjax.cayley.BlockLayout`` that the layer and the Cayley map use, with
    one "block" (the rotated prefix) and no padding: the permuted space has ``dim`` coordinates.
    """

    dim: int   # D
    size: int  # K = |S|

    @property
    def block_size(self) -> int:
        return self.size

    @property
    def num_blocks(self) -> int:
        return 1

    @property
    def padded(self) -> int:
        return self.dim

    @property
    def tail(self) -> int:
        return self.size

    @property
    def ragged(self) -> bool:
        return False

    @property
    def num_packed(self) -> int:
        return self.size * (self.size - 1) // 2

    @property
    def num_params(self) -> int:
        return self.num_packed


def resolve_subset_size(block_size: int | float, dim: int, *, name: str = "dim") -> int:
    """|S| for one side: an int is an absolute size (2 ≤ K ≤ dim); a float f in (0, 1] a fraction of
    the dimension, K = round(f·dim) with halves rounded up (spec §3.1: "b = 1/2" means b_in = N/2 and
    b_out = M/2; ``1.0`` is the full dimension). K = 1 is refused: a 1×1 rotation is the identity and
    has no generator entry (exclude such a layer from ``poetize`` instead).
    """
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={dim!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, (int, float)):
        raise ValueError(f"block_size must be an int or a float fraction, got block_size={block_size!r}")
    if isinstance(block_size, float):
        if not 0.0 < block_size <= 1.0:  # also rejects nan
            raise ValueError(f"a fractional block_size must be in (0, 1], got block_size={block_size!r}")
        size = math.floor(block_size * dim + 0.5)
        if size < 2:
            raise ValueError(f"block_size={block_size!r} of {name}={dim} rounds to {size} coordinate(s); a "
                             f"subset needs at least 2 to rotate (use a fraction >= {1.5 / dim:.3g}, or "
                             f"exclude this layer)")
        return size
    if block_size < 2:
        raise ValueError(f"an FS subset needs at least 2 coordinates to rotate, got block_size={block_size!r}")
    if block_size > dim:
        raise ValueError(f"block_size={block_size} is larger than {name}={dim}; choose block_size <= {dim}")
    return block_size


def subset_layout(dim: int, block_size: int | float, *, name: str = "dim") -> SubsetLayout:
    return SubsetLayout(int(dim), resolve_subset_size(block_size, dim, name=name))


def index_subsets(perms: LayerPerms, size_in: int, size_out: int) -> tuple[jax.Array, jax.Array]:
    """The ordered subsets (S_in (Ki,), S_out (Ko,)) in the layer's own coordinates.

    Coordinate S_in[j] is rotated as row j of G̃_in, S_out[j] as column j of G̃_out.
    """
    return perms.perm_in[:size_in], perms.perm_out_inv[:size_out]


def prefix_rotate(x_TxD: jax.Array, g_KxK: jax.Array, *, precision=None) -> jax.Array:
    """[x[..., :K] @ G̃, x[..., K:]]: rotate the leading K coordinates; the others are copied exactly."""
    k = g_KxK.shape[-1]
    head = jnp.matmul(x_TxD[..., :k], g_KxK, precision=precision)
    return jnp.concatenate([head, x_TxD[..., k:]], axis=-1)


def _single(r_1xKxK: jax.Array) -> jax.Array:
    if r_1xKxK.ndim != 3 or r_1xKxK.shape[0] != 1:
        raise ValueError(f"POET-FS expects one rotation block per side, shape (1, K, K); got {r_1xKxK.shape}")
    return r_1xKxK[0]


def subset_rotate(x_TxD: jax.Array, r_1xKxK: jax.Array, perm: jax.Array, perm_inv: jax.Array, *,
                  precision=None) -> jax.Array:
    """x·G with G = I + D(S)(G̃ − I)D(S)ᵀ, S = perm[:K], in x's own coordinates (gather, prefix
    rotation, inverse gather — no scatter)."""
    u = permute(x_TxD, perm, perm_inv)
    return permute(prefix_rotate(u, _single(r_1xKxK), precision=precision), perm_inv, perm)


def fs_linear(x: jax.Array, w0_NxM: jax.Array, r_in_1xKixKi: jax.Array, r_out_1xKoxKo: jax.Array,
              perms: LayerPerms, *, precision=None) -> jax.Array:
    """y (..., M) = x (..., N) · R · W0 · P for a POET-FS layer (see the module doc); in x's dtype.

    ``w0_NxM`` is W_s, stored in the permuted space; it is stop-gradient'ed (frozen).
    """
    dtype = x.dtype
    w0 = jax.lax.stop_gradient(w0_NxM).astype(dtype)
    u = permute(x, perms.perm_in, perms.perm_in_inv)
    a = prefix_rotate(u, _single(r_in_1xKixKi).astype(dtype), precision=precision)
    h = jnp.matmul(a, w0, precision=precision)
    z = prefix_rotate(h, _single(r_out_1xKoxKo).astype(dtype), precision=precision)
    return permute(z, perms.perm_out, perms.perm_out_inv)


def effective_kernel(w0_NxM: jax.Array, r_in_1xKixKi: jax.Array, r_out_1xKoxKo: jax.Array,
                     perms: LayerPerms) -> jax.Array:
    """The dense (N, M) float32 kernel W_eff with fs_linear(x) == x @ W_eff.

    blockdiag(G̃_in, I) · W_s · blockdiag(G̃_out, I) in the permuted space, then un-permuted; rows and
    columns outside the subsets are copies of W_s.
    """
    w = w0_NxM.astype(jnp.float32)
    g_in = _single(r_in_1xKixKi).astype(jnp.float32)
    k = g_in.shape[-1]
    a = jnp.concatenate([jnp.matmul(g_in, w[:k], precision=HIGHEST), w[k:]], axis=0)
    a = prefix_rotate(a, _single(r_out_1xKoxKo).astype(jnp.float32), precision=HIGHEST)
    a = jnp.take(a, perms.perm_in_inv, axis=0)
    return jnp.take(a, perms.perm_out, axis=1)
