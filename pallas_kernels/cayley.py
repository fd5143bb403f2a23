"""Fused Cayley–Neumann map from packed skew generators to orthogonal blocks (POET spec §4), Pallas/Triton.

Legend: J blocks, K block size, P = K(K−1)/2 packed entries per block.

    θ (J, P) → Q (skew, built inside the loads) → R = I + 2Q + 2Q² + 2Q³ + Q⁴ (J, K, K), float32.

Packing (spec §4.1): row-major strict upper triangle, Q[r, c] = θ[p(r, c)] and Q[c, r] = −θ[p(r, c)] for
r < c with p(r, c) = r(2K − r − 1)/2 + (c − r − 1).

Forward, three kernels (grid-wide dependencies separate them):
  0. Q — the skew construction: every program loads one Q tile from θ through that index map (masked on
     the diagonal; each θ entry is read twice, once per triangle) and stores it dense, so that the product
     kernels read Q with contiguous, pipelined tile loads (reading it through the index map inside their
     loops ran the products at a fraction of the tensor cores' rate, docs/benchmark_log.md run 1).
  1. Q² — symmetric (Q² = (Qᵀ)²), so only tiles I ≤ J are computed and each is also stored transposed.
  2. R — with S = I + 2Q² + Q⁴ symmetric and A = 2Q + 2Q³ skew (Q³ = Q²·Q, Q⁴ = Q²·Q²), the program
     of tile (I, J), I ≤ J, writes R[I, J] = S + A and R[J, I] = (S − A)ᵀ: half of the products.
Q and Q² are kept as the residuals for the backward (as the reference's kernel does).

Backward (spec §4.3), with G = ∂L/∂R and, since Qᵀ = −Q and (Q²)ᵀ = Q²:
    N  = Qᵀ G + G Qᵀ = −(Q G + G Q)
    dQ = 2(G + N) + (Q² − 2Q) N + (2G + N) Q²
    dθ[p(r, c)] = dQ[r, c] − dQ[c, r]
  3. N — a plain tiled product kernel;
  4. dθ — the program of tile pair (I, J), I ≤ J, computes dQ[I, J] and dQ[J, I] and writes
     dQ[I, J] − dQ[J, I]ᵀ to the packed entries with r < c (every entry written exactly once).

Other numbers of Neumann terms (num_terms ≠ 3) use the jnp reference (autodiff), as the spec allows.
All arithmetic is float32; on the GPU the products use ``CayleyConfig.precision`` (TF32×3 by default;
"bf16" rounds the product operands to bfloat16 — the sums, and the I + 2Q part of R, stay float32).
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import CayleyConfig, check_block_size, compiler_params, dot, dot_precision

_NT = (((1,), (0,)), ((), ()))
from pallas_kernels.tuning import cayley_config


# ----------------------------------------------------------------------------------------------
# Reference (plain jnp)
# ----------------------------------------------------------------------------------------------

def num_packed(block_size: int) -> int:
    return block_size * (block_size - 1) // 2


def skew_reference(theta_JxP, block_size: int):
    """(..., P) → (..., K, K) skew-symmetric Q (a gather by a constant index map)."""
    r, c = np.triu_indices(block_size, 1)
    idx = np.zeros((block_size, block_size), np.int32)
    sign = np.zeros((block_size, block_size), np.float32)
    idx[r, c] = idx[c, r] = np.arange(len(r))
    sign[r, c], sign[c, r] = 1.0, -1.0
    q = jnp.take(theta_JxP, jnp.asarray(idx.reshape(-1)), axis=-1) * jnp.asarray(sign.reshape(-1), theta_JxP.dtype)
    return q.reshape(*theta_JxP.shape[:-1], block_size, block_size)


def cayley_neumann_reference(theta, block_size: int, num_terms: int = 3):
    """R = (I + Q)·Σ_{i=0..num_terms} Qⁱ from packed θ (..., P); (..., K, K) float32."""
    q = skew_reference(theta.astype(jnp.float32), block_size)
    eye = jnp.eye(block_size, dtype=jnp.float32)
    mm = functools.partial(jnp.matmul, precision=lax.Precision.HIGHEST)
    s = eye
    for _ in range(num_terms):  # Horner: S ← I + Q·S gives Σ_{i=0..k} Qⁱ
        s = eye + mm(q, s)
    return s + mm(q, s)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

def _packed_index(rows, cols, k):
    """p(min, max) of the (rows × cols) positions; rows (m, 1), cols (1, n) int32."""
    lo = jnp.minimum(rows, cols)
    hi = jnp.maximum(rows, cols)
    return lax.div(lo * (2 * k - lo - 1), 2) + hi - lo - 1


def _q_tile(theta_ref, b, r0, c0, m, n, k):
    """Q[b, r0:r0+m, c0:c0+n] in float32, loaded from the packed θ."""
    rows = r0 + jnp.arange(m)[:, None]
    cols = c0 + jnp.arange(n)[None, :]
    off_diag = jnp.broadcast_to(rows != cols, (m, n))
    p = jnp.maximum(_packed_index(rows, cols, k), 0)
    v = plt.load(theta_ref.at[b, p], mask=off_diag, other=0.0)
    return jnp.where(rows < cols, v, -v)


def _tile(ref, b, r0, c0, m, n):
    return ref[b, pl.ds(r0, m), pl.ds(c0, n)]


def _skew_kernel(theta_ref, q_ref, *, k, bm, bk, mm):
    del bk, mm
    i, j, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q_ref[b, pl.ds(i * bm, bm), pl.ds(j * bm, bm)] = _q_tile(theta_ref, b, i * bm, j * bm, bm, bm, k)


def _square_kernel(q_ref, q2_ref, *, k, bm, bk, mm):
    i, j, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(i <= j)
    def _():
        def body(s, acc):
            a = _tile(q_ref, b, i * bm, s * bk, bm, bk)
            c = _tile(q_ref, b, s * bk, j * bm, bk, bm)
            return acc + mm(a, c)

        acc = lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bm), jnp.float32))
        q2_ref[b, pl.ds(i * bm, bm), pl.ds(j * bm, bm)] = acc

        @pl.when(i < j)
        def _():
            q2_ref[b, pl.ds(j * bm, bm), pl.ds(i * bm, bm)] = acc.T


def _cayley_kernel(q_ref, q2_ref, r_ref, *, k, bm, bk, mm):
    i, j, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    @pl.when(i <= j)
    def _():
        def body(s, carry):
            a3, a4 = carry
            q2_is = _tile(q2_ref, b, i * bm, s * bk, bm, bk)
            q_sj = _tile(q_ref, b, s * bk, j * bm, bk, bm)
            q2_sj = _tile(q2_ref, b, s * bk, j * bm, bk, bm)
            a3 = a3 + mm(q2_is, q_sj)
            a4 = a4 + mm(q2_is, q2_sj)
            return a3, a4

        zeros = jnp.zeros((bm, bm), jnp.float32)
        q3, q4 = lax.fori_loop(0, k // bk, body, (zeros, zeros))
        q = _tile(q_ref, b, i * bm, j * bm, bm, bm)
        q2 = _tile(q2_ref, b, i * bm, j * bm, bm, bm)
        eye = ((i * bm + jnp.arange(bm))[:, None] == (j * bm + jnp.arange(bm))[None, :]).astype(jnp.float32)
        sym = eye + 2.0 * q2 + q4     # symmetric part of R
        skew = 2.0 * (q + q3)         # skew part of R
        r_ref[b, pl.ds(i * bm, bm), pl.ds(j * bm, bm)] = sym + skew

        @pl.when(i < j)
        def _():
            r_ref[b, pl.ds(j * bm, bm), pl.ds(i * bm, bm)] = (sym - skew).T


def _n_kernel(q_ref, g_ref, n_ref, *, k, bm, bk, mm):
    """N = −(Q G + G Q), tile (i, j)."""
    i, j, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def body(s, acc):
        q_is = _tile(q_ref, b, i * bm, s * bk, bm, bk)
        g_sj = _tile(g_ref, b, s * bk, j * bm, bk, bm)
        g_is = _tile(g_ref, b, i * bm, s * bk, bm, bk)
        q_sj = _tile(q_ref, b, s * bk, j * bm, bk, bm)
        acc = acc + mm(q_is, g_sj)
        return acc + mm(g_is, q_sj)

    acc = lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bm), jnp.float32))
    n_ref[b, pl.ds(i * bm, bm), pl.ds(j * bm, bm)] = -acc


def _dtheta_kernel(q_ref, q2_ref, g_ref, n_ref, dtheta_ref, *, k, p, bm, bk, mm):
    i, j, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)

    def dq_tile(x, y):
        """dQ[x-tile, y-tile] = 2(G + N) + (Q² − 2Q) N + (2G + N) Q²."""
        def body(s, acc):
            lhs1 = _tile(q2_ref, b, x * bm, s * bk, bm, bk) - 2.0 * _tile(q_ref, b, x * bm, s * bk, bm, bk)
            rhs1 = _tile(n_ref, b, s * bk, y * bm, bk, bm)
            lhs2 = 2.0 * _tile(g_ref, b, x * bm, s * bk, bm, bk) + _tile(n_ref, b, x * bm, s * bk, bm, bk)
            rhs2 = _tile(q2_ref, b, s * bk, y * bm, bk, bm)
            acc = acc + mm(lhs1, rhs1)
            return acc + mm(lhs2, rhs2)

        acc = lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bm), jnp.float32))
        return acc + 2.0 * (_tile(g_ref, b, x * bm, y * bm, bm, bm) + _tile(n_ref, b, x * bm, y * bm, bm, bm))

    def store(d):
        rows = i * bm + jnp.arange(bm)[:, None]
        cols = j * bm + jnp.arange(bm)[None, :]
        upper = jnp.broadcast_to(rows < cols, (bm, bm))
        # Masked positions get an index past the end: never stored on the GPU, dropped by the interpreter.
        idx = jnp.where(upper, _packed_index(rows, cols, k), p)
        plt.store(dtheta_ref.at[b, idx], d, mask=upper)

    @pl.when(i < j)
    def _():
        store(dq_tile(i, j) - dq_tile(j, i).T)

    @pl.when(i == j)
    def _():
        d = dq_tile(i, i)
        store(d - d.T)


def _product(precision: str, interpret: bool):
    """The kernels' tile product (float32 tiles in, float32 result) for ``CayleyConfig.precision``:
    "bf16" rounds both operands to bfloat16 first (native MMA, float32 accumulation); the others multiply
    float32 with the algorithm of ``dot_precision``."""
    if precision == "bf16":
        return lambda a, b: dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), _NT, None, interpret)
    algo = dot_precision(jnp.float32, precision, interpret)
    return lambda a, b: lax.dot_general(a, b, _NT, precision=algo, preferred_element_type=jnp.float32)


def _call(kernel, out_shape, nb, k, cfg: CayleyConfig, interpret: bool, name: str, *args, **params):
    bm = cfg.block_m
    fn = functools.partial(kernel, k=k, bm=bm, bk=cfg.block_k, mm=_product(cfg.precision, interpret),
                           **params)
    return pl.pallas_call(fn, out_shape=out_shape, grid=(k // bm, k // bm, nb),
                          compiler_params=compiler_params(cfg), interpret=interpret, name=name)(*args)


def _forward(theta, k, cfg, interpret):
    nb = theta.shape[0]
    kk = jax.ShapeDtypeStruct((nb, k, k), jnp.float32)
    q = _call(_skew_kernel, kk, nb, k, cfg, interpret, "cayley_skew", theta)
    q2 = _call(_square_kernel, kk, nb, k, cfg, interpret, "cayley_q2", q)
    r = _call(_cayley_kernel, kk, nb, k, cfg, interpret, "cayley_neumann", q, q2)
    return r, (q, q2)


# ----------------------------------------------------------------------------------------------
# custom_vjp
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _cayley3(theta, k, cfg, interpret):
    return _forward(theta, k, cfg, interpret)[0]


def _cayley3_fwd(theta, k, cfg, interpret):
    r, (q, q2) = _forward(theta, k, cfg, interpret)
    return r, (q, q2)


def _cayley3_bwd(k, cfg, interpret, res, g):
    q, q2 = res
    nb = q.shape[0]
    g = g.astype(jnp.float32)
    n = _call(_n_kernel, jax.ShapeDtypeStruct((nb, k, k), jnp.float32), nb, k, cfg, interpret, "cayley_bwd_n",
              q, g)
    p = num_packed(k)
    dtheta = _call(_dtheta_kernel, jax.ShapeDtypeStruct((nb, p), jnp.float32), nb, k, cfg, interpret,
                   "cayley_bwd_dtheta", q, q2, g, n, p=p)
    return (dtheta,)


_cayley3.defvjp(_cayley3_fwd, _cayley3_bwd)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def cayley_neumann(theta, block_size: int, num_terms: int = 3, *, interpret: bool = False,
                   config: CayleyConfig | None = None):
    """Orthogonal blocks R = (I+Q)·Σ_{i=0..num_terms} Qⁱ (..., K, K) float32 from packed θ (..., P).

    num_terms = 3 (the papers' I + 2Q + 2Q² + 2Q³ + Q⁴) runs the fused Pallas kernels, forward and
    backward (``jax.custom_vjp``); other values use ``cayley_neumann_reference``. θ of any float dtype
    is computed in float32; its cotangent comes back in θ's dtype.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 2:
        raise ValueError(f"block_size must be an int ≥ 2, got block_size={block_size!r}")
    block_size = int(block_size)
    if isinstance(num_terms, bool) or not isinstance(num_terms, int) or num_terms < 0:
        raise ValueError(f"num_terms must be an int ≥ 0, got num_terms={num_terms!r}")
    p = num_packed(block_size)
    if theta.ndim < 1 or theta.shape[-1] != p:
        raise ValueError(f"theta must have shape (..., {p}) for block_size={block_size}, got {tuple(theta.shape)}")
    if not jnp.issubdtype(theta.dtype, jnp.floating):
        raise ValueError(f"theta must be floating point, got dtype {theta.dtype}")
    if num_terms != 3:
        return cayley_neumann_reference(theta, block_size, num_terms)
    check_block_size(block_size)
    if config is None:
        config = cayley_config(block_size)
    elif not isinstance(config, CayleyConfig):
        raise TypeError(f"config must be a CayleyConfig, got {type(config).__name__}")
    else:
        config.validate(block_size)
    lead = theta.shape[:-1]
    th = theta.reshape(-1, p).astype(jnp.float32)
    if th.shape[0] == 0:
        return jnp.zeros((*lead, block_size, block_size), jnp.float32)
    r = _cayley3(th, block_size, config, bool(interpret))
    return r.reshape(*lead, block_size, block_size)
