"""Packed skew-symmetric generators and the Cayley–Neumann map (POET spec §4).

Shape legend: K block size, J number of blocks, P = K(K−1)/2 packed entries per block.

Packing (spec §4.1): block j's generator Q_j = −Q_jᵀ is stored as its strict upper triangle in
row-major ``triu_indices(K, 1)`` order: (0,1), (0,2), …, (0,K−1), (1,2), …  Q[r_k, c_k] = θ_k,
Q[c_k, r_k] = −θ_k. Unpacking is a gather with a constant index map and its VJP is another gather,
∂θ_k = ∂Q[r_k, c_k] − ∂Q[c_k, r_k] — no scatter anywhere.

Cayley–Neumann (spec §4.2): R = (I+Q)·Σ_{i=0..k} Qⁱ. With k = 3 this is I + 2Q + 2Q² + 2Q³ + Q⁴, the
polynomial of the papers and of the reference's GPU kernel. The reference's CPU fallback computes
I + 2Q + 2Q² + 2Q³ + 2Q⁴ instead (the Taylor truncation of the exact Cayley map): a different function
from what its GPU runs train, whose orthogonality error grows faster once ‖Q‖ > 1. We follow the papers.

Since (I+Q) and (I−Q)⁻¹ commute, R_k = C·(I − Q^{k+1}) with C the exact Cayley transform, so
RᵀR − I = −(Q^{k+1})ᵀ − Q^{k+1} + (Q^{k+1})ᵀQ^{k+1} and ‖RᵀR − I‖₂ ≤ 2‖Q‖₂^{k+1} + ‖Q‖₂^{2(k+1)}
(``neumann_orthogonality_bound``).

Ragged dimensions: a dimension D that K does not divide gets J = ⌈D/K⌉ blocks of size K whose last one
only uses its leading ``tail = D − (J−1)K`` coordinates. Its generator entries outside the tail×tail
corner are masked to zero (``block_mask``), so that block is blockdiag(R_tail, I): the padded
coordinates never mix with real ones and the rotation of the real D coordinates stays exactly
orthogonal. All blocks therefore share one shape, which keeps batched matmuls and kernels uniform.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST


class BlockLayout(NamedTuple):
    """Static block structure of one side of a POET layer."""

    dim: int          # D, the real dimension
    block_size: int   # K
    num_blocks: int   # J = ceil(D / K)
    padded: int       # J·K ≥ D
    tail: int         # size of the last block's active corner (== K when K divides D)

    @property
    def ragged(self) -> bool:
        return self.padded != self.dim

    @property
    def num_packed(self) -> int:
        return self.block_size * (self.block_size - 1) // 2

    @property
    def num_params(self) -> int:
        """Free generator parameters: (J−1)·P + tail(tail−1)/2."""
        return (self.num_blocks - 1) * self.num_packed + self.tail * (self.tail - 1) // 2


def block_layout(dim: int, block_size: int, *, name: str = "dim") -> BlockLayout:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got block_size={block_size!r}")
    if not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={dim!r}")
    if block_size > dim:
        raise ValueError(f"block_size={block_size} is larger than {name}={dim}; choose block_size <= {dim}")
    num_blocks = -(-dim // block_size)
    return BlockLayout(int(dim), int(block_size), num_blocks, num_blocks * block_size,
                       int(dim - (num_blocks - 1) * block_size))


def num_packed(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


@functools.lru_cache(maxsize=None)
def packed_pairs(block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the packed entries of a K×K block, in packing order."""
    r, c = np.triu_indices(block_size, 1)
    return r.astype(np.int32), c.astype(np.int32)


@functools.lru_cache(maxsize=None)
def _unpack_maps(block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(K·K,) gather index into θ (P = out of range → 0 on the diagonal) and the (K·K,) sign."""
    r, c = packed_pairs(block_size)
    p = len(r)
    idx = np.full((block_size, block_size), p, np.int32)
    sign = np.zeros((block_size, block_size), np.float32)
    idx[r, c] = np.arange(p)
    idx[c, r] = np.arange(p)
    sign[r, c] = 1.0
    sign[c, r] = -1.0
    return idx.reshape(-1), sign.reshape(-1)


@functools.lru_cache(maxsize=None)
def _mask_np(layout: BlockLayout) -> np.ndarray | None:
    if not layout.ragged:
        return None
    r, c = packed_pairs(layout.block_size)
    mask = np.ones((layout.num_blocks, len(r)), np.float32)
    mask[-1] = ((r < layout.tail) & (c < layout.tail)).astype(np.float32)
    return mask


def block_mask(layout: BlockLayout) -> np.ndarray | None:
    """(J, P) 0/1 mask of the generator entries that exist (None when K divides D)."""
    return _mask_np(layout)


def mask_generators(theta_JxP: jax.Array, layout: BlockLayout) -> jax.Array:
    mask = block_mask(layout)
    return theta_JxP if mask is None else theta_JxP * jnp.asarray(mask, theta_JxP.dtype)


def block_size_from_packed(p: int) -> int:
    k = int(round((1 + np.sqrt(1 + 8 * p)) / 2))
    if k * (k - 1) // 2 != p:
        raise ValueError(f"{p} packed entries do not form a strict upper triangle K(K-1)/2")
    return k


@jax.custom_vjp
def skew_from_packed(theta_JxP: jax.Array) -> jax.Array:
    """(..., P) packed generators → (..., K, K) skew-symmetric Q (gather forward, gather backward)."""
    k = block_size_from_packed(theta_JxP.shape[-1])
    if k == 1:  # 1×1 blocks have no generator entries: Q = 0 (and R = I)
        return jnp.zeros((*theta_JxP.shape[:-1], 1, 1), theta_JxP.dtype)
    idx, sign = _unpack_maps(k)
    q = jnp.take(theta_JxP, jnp.asarray(idx), axis=-1, mode="fill", fill_value=0)
    q = q * jnp.asarray(sign, theta_JxP.dtype)
    return q.reshape(*theta_JxP.shape[:-1], k, k)


def _skew_fwd(theta):
    return skew_from_packed(theta), None


def _skew_bwd(_, dq_JxKxK):
    return (packed_from_skew_grad(dq_JxKxK),)


skew_from_packed.defvjp(_skew_fwd, _skew_bwd)


def packed_from_skew_grad(dq_JxKxK: jax.Array) -> jax.Array:
    """Cotangent of the packed entries: ∂θ_k = ∂Q[r_k, c_k] − ∂Q[c_k, r_k]."""
    k = dq_JxKxK.shape[-1]
    r, c = packed_pairs(k)
    flat = dq_JxKxK.reshape(*dq_JxKxK.shape[:-2], k * k)
    return (jnp.take(flat, jnp.asarray(r * k + c), axis=-1)
            - jnp.take(flat, jnp.asarray(c * k + r), axis=-1))


def packed_from_skew(q_JxKxK: jax.Array) -> jax.Array:
    """The packed strict upper triangle of (..., K, K) matrices (inverse of ``skew_from_packed``)."""
    k = q_JxKxK.shape[-1]
    r, c = packed_pairs(k)
    return q_JxKxK.reshape(*q_JxKxK.shape[:-2], k * k)[..., jnp.asarray(r * k + c)]


@jax.custom_vjp
def bf16_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a @ b for float32 (..., K, K) operands rounded to bfloat16, accumulated and returned in float32
    (the tensor cores' native rate). Its VJP rounds the cotangent the same way, so the backward products
    run at that rate too (autodiff of a bf16 dot would hand float32 × bfloat16 products to XLA)."""
    return jnp.matmul(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(a, b):
    return bf16_matmul(a, b), (a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))


def _bf16_matmul_bwd(res, g):
    a, b = res
    g = g.astype(jnp.bfloat16)
    da = jnp.matmul(g, jnp.swapaxes(b, -1, -2), preferred_element_type=jnp.float32)
    db = jnp.matmul(jnp.swapaxes(a, -1, -2), g, preferred_element_type=jnp.float32)
    return da, db


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)

# The products of the Neumann series: float32-exact, one TF32 pass on a GPU, or bf16 operands (see
# cayley_neumann). "bf16" is a marker, not a lax precision.
CAYLEY_PRECISIONS = {"highest": HIGHEST, "default": jax.lax.Precision.DEFAULT, "bf16": "bf16"}


def cayley_neumann(q_JxKxK: jax.Array, num_terms: int = 3, *, precision=HIGHEST) -> jax.Array:
    """R = (I+Q)·Σ_{i=0..num_terms} Qⁱ for (..., K, K) matrices Q (any Q; skew-symmetric in POET).

    ``precision`` of the float32 products: HIGHEST (float32-exact) by default; DEFAULT lets a GPU use one
    TF32 pass (CPUs still compute float32), an error of ~1e-3·‖Qⁱ‖ on the i ≥ 2 terms only (I + 2Q is
    summed exactly), far below the bf16 rounding the blocks get before they rotate bf16 activations.
    "bf16" rounds the operands of every product to bfloat16 (float32 sums, ``bf16_matmul``) on every
    backend: an error of ~2⁻⁸·‖Q‖² relative to R (again only on the i ≥ 2 terms), which stays below the
    bf16 rounding of R itself (2⁻⁹ on its ≈1 diagonal) while ‖Q‖₂ ≲ 0.5 — the regime the series is
    accurate in anyway (its own orthogonality error is 2‖Q‖⁴).
    """
    if not isinstance(num_terms, int) or num_terms < 0:
        raise ValueError(f"num_terms must be an int >= 0, got num_terms={num_terms!r}")

    def _mm(a, b):
        return block_product(a, b, precision)

    eye = jnp.eye(q_JxKxK.shape[-1], dtype=q_JxKxK.dtype)
    if num_terms == 3:
        # I + 2Q + 2Q² + 2Q³ + Q⁴ = I + 2(Q + Q² + Q²·Q) + Q²·Q²: three matmuls (spec §4.2).
        q2 = _mm(q_JxKxK, q_JxKxK)
        return eye + 2.0 * (q_JxKxK + q2 + _mm(q2, q_JxKxK)) + _mm(q2, q2)
    s = eye
    for _ in range(num_terms):  # Horner: S = I + Q·S  ⇒  S = Σ_{i=0..k} Qⁱ
        s = eye + _mm(q_JxKxK, s)
    return s + _mm(q_JxKxK, s)


def block_product(a: jax.Array, b: jax.Array, precision=HIGHEST) -> jax.Array:
    """a @ b for float32 (..., K, K) blocks at a value of ``CAYLEY_PRECISIONS`` (a lax precision, or "bf16":
    operands rounded to bfloat16, float32 sums, ``bf16_matmul``)."""
    if isinstance(precision, str) and precision == "bf16":
        return bf16_matmul(a, b)
    return jnp.matmul(a, b, precision=precision)


def batched_solve(a_JxKxK: jax.Array, b_JxKxC: jax.Array) -> jax.Array:
    """X with a·X = b for every block (any leading dims): ``jnp.linalg.solve`` (LU), except on the CPU
    backend. There two LAPACK triangular solves that XLA runs concurrently (two layers, or two sides of
    one) can hang the process for good (jaxlib 0.10.2), so the CPU solves by Gauss–Jordan elimination with
    partial pivoting in plain XLA ops: K steps, each a rank-1 update of the (K, K + C) system."""
    if jax.default_backend() != "cpu":
        return jnp.linalg.solve(a_JxKxK, b_JxKxC)
    lead, k, c = a_JxKxK.shape[:-2], a_JxKxK.shape[-1], b_JxKxC.shape[-1]
    rows = jnp.arange(k)

    def eliminate(p, m_JxKxKC):
        col = jnp.where(rows >= p, jnp.abs(m_JxKxKC[:, :, p]), -1.0)            # candidates at or below p
        q = jnp.argmax(col, axis=-1)
        swap = jnp.where(rows == p, q[:, None], jnp.where(rows == q[:, None], p, rows))
        m_JxKxKC = jnp.take_along_axis(m_JxKxKC, swap[:, :, None], axis=1)      # rows p and q exchanged
        pivot = m_JxKxKC[:, p, :] / m_JxKxKC[:, p, p][:, None]
        m_JxKxKC = m_JxKxKC - m_JxKxKC[:, :, p][:, :, None] * pivot[:, None, :]  # column p zero everywhere
        return jnp.where((rows == p)[None, :, None], pivot[:, None, :], m_JxKxKC)

    m = jnp.concatenate([a_JxKxK.reshape(-1, k, k), b_JxKxC.reshape(-1, k, c)], axis=-1)
    return jax.lax.fori_loop(0, k, eliminate, m)[:, :, k:].reshape(*lead, k, c)


def cayley_exact(q_JxKxK: jax.Array) -> jax.Array:
    """R = (I+Q)(I−Q)⁻¹ = (I−Q)⁻¹(I+Q) (the factors commute), by a linear solve."""
    eye = jnp.eye(q_JxKxK.shape[-1], dtype=q_JxKxK.dtype)
    return batched_solve(eye - q_JxKxK, jnp.broadcast_to(eye + q_JxKxK, q_JxKxK.shape))


def neumann_orthogonality_bound(q_norm, num_terms: int = 3):
    """Upper bound on ‖RᵀR − I‖₂ for the Neumann map of a skew Q with ‖Q‖₂ = q_norm."""
    e = num_terms + 1
    return 2.0 * q_norm ** e + q_norm ** (2 * e)


def rotations(theta_JxP: jax.Array, layout: BlockLayout, num_terms: int = 3, *,
              exact: bool = False, impl: str = "xla", precision: str = "highest") -> jax.Array:
    """Orthogonal blocks (J, K, K) in float32 from packed generators (masked for a ragged tail).

    impl="pallas" runs the Neumann series through the fused kernel ``pallas_kernels.cayley_neumann``
    (in the interpreter when there is no GPU); the exact map always uses XLA. ``precision``: "highest"
    (float32-exact products), "default" (one TF32 pass on a GPU: see ``cayley_neumann``; the kernel's
    "tf32"; CPUs compute float32) or "bf16" (product operands rounded to bfloat16 on every backend).
    """
    theta = mask_generators(theta_JxP.astype(jnp.float32), layout)
    return _blocks_from_masked(theta, layout.block_size, num_terms, exact, impl, precision)


def _blocks_from_masked(theta, block_size, num_terms, exact, impl, precision):
    if precision not in CAYLEY_PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(CAYLEY_PRECISIONS)}, got precision={precision!r}")
    if impl == "pallas" and not exact:
        import pallas_kernels as pk  # local: keeps this module's import pure jnp
        kernel_precision = {"highest": None, "default": "tf32", "bf16": "bf16"}[precision]
        cfg = (pk.tuning.cayley_config(block_size, kernel_precision) if pk.supports_block_size(block_size)
               else None)
        return pk.cayley_neumann(theta, block_size, num_terms, interpret=pk.default_interpret(), config=cfg)
    q = skew_from_packed(theta)
    return cayley_exact(q) if exact else cayley_neumann(q, num_terms, precision=CAYLEY_PRECISIONS[precision])


def rotation_group(items, num_terms: int = 3, *, exact: bool = False, impl: str = "xla",
                   precision: str = "highest") -> list[jax.Array]:
    """``[rotations(theta, layout, …) for theta, layout in items]`` in one batched map per block size.

    Each θ may carry leading axes (e.g. the layer axis of stacked layers, (L, J, P) → (L, J, K, K)). The
    blocks of every item with the same block size are flattened and concatenated into one (ΣJ, P) map, so
    the Cayley–Neumann series of a whole POET layer, transformer block or model costs one launch of each
    kernel instead of one per side and projection (at a few dozen blocks a map is mostly launch latency;
    thousands of blocks fill the GPU). Same numbers as separate maps: every block is computed alone.
    """
    items = list(items)
    out: list = [None] * len(items)
    by_k: dict[int, list[int]] = {}
    for i, (_, layout) in enumerate(items):
        by_k.setdefault(layout.block_size, []).append(i)
    for k, idx in by_k.items():
        p = num_packed(k)
        flats = [mask_generators(items[i][0].astype(jnp.float32), items[i][1]).reshape(-1, p) for i in idx]
        both = flats[0] if len(flats) == 1 else jnp.concatenate(flats, axis=0)
        r = _blocks_from_masked(both, k, num_terms, exact, impl, precision)
        # lax.split, not slices: the transpose of a split is one concatenation, that of n slices is n
        # zero-padded full-size copies summed (4 ms of a 23 ms llama_60m step on an H100, BENCHMARKS.md)
        parts = jax.lax.split(r, [flat.shape[0] for flat in flats]) if len(flats) > 1 else [r]
        for i, part in zip(idx, parts):
            out[i] = part.reshape(*items[i][0].shape[:-1], k, k)
    return out


def rotation_pair(theta_in: jax.Array, layout_in: BlockLayout, theta_out: jax.Array, layout_out: BlockLayout,
                  num_terms: int = 3, *, exact: bool = False, impl: str = "xla",
                  precision: str = "highest") -> tuple[jax.Array, jax.Array]:
    """``(rotations(theta_in, layout_in, …), rotations(theta_out, layout_out, …))``: both sides in one
    batched map when they have the same block size (``rotation_group``)."""
    r_in, r_out = rotation_group([(theta_in, layout_in), (theta_out, layout_out)], num_terms, exact=exact,
                                 impl=impl, precision=precision)
    return r_in, r_out
