"""Packing of skew generators and the Cayley–Neumann map against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poetjax import cayley
from poetjax.testing import assert_close, rel_err, tolerance


def _np_skew(theta, k):
    q = np.zeros(theta.shape[:-1] + (k, k))
    r, c = np.triu_indices(k, 1)
    q[..., r, c] = theta
    q[..., c, r] = -theta
    return q


def _np_poly(q, num_terms):
    eye = np.eye(q.shape[-1])
    s = sum(np.linalg.matrix_power(q, i) for i in range(num_terms + 1))
    return (eye + q) @ s


@pytest.mark.parametrize("k", [2, 3, 16])
def test_skew_roundtrip_and_order(k):
    rng = np.random.default_rng(k)
    theta = rng.standard_normal((3, k * (k - 1) // 2)).astype(np.float32)
    q = np.asarray(cayley.skew_from_packed(jnp.asarray(theta)))
    np.testing.assert_array_equal(q, _np_skew(theta, k).astype(np.float32))  # row-major triu order
    np.testing.assert_array_equal(q, -np.swapaxes(q, -1, -2))
    np.testing.assert_array_equal(np.asarray(cayley.packed_from_skew(jnp.asarray(q))), theta)


def test_skew_vjp_is_upper_minus_lower():
    k = 5
    theta = jnp.asarray(np.random.default_rng(0).standard_normal((2, 10)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, k, k)), jnp.float32)
    g = jax.grad(lambda t: jnp.sum(w * cayley.skew_from_packed(t)))(theta)
    r, c = np.triu_indices(k, 1)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w)[:, r, c] - np.asarray(w)[:, c, r], rtol=1e-6)
    # and the reference scatter-based construction agrees
    def scatter_skew(t):
        u = jnp.zeros((2, k, k)).at[:, r, c].set(t)
        return u - jnp.swapaxes(u, -1, -2)
    g_ref = jax.grad(lambda t: jnp.sum(w * scatter_skew(t)))(theta)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6)


@pytest.mark.parametrize("num_terms", [1, 2, 3, 5])
def test_neumann_matches_polynomial(num_terms):
    rng = np.random.default_rng(num_terms)
    q = _np_skew(0.1 * rng.standard_normal((4, 28)), 8)
    got = np.asarray(cayley.cayley_neumann(jnp.asarray(q, jnp.float32), num_terms))
    assert_close(got, _np_poly(q, num_terms), jnp.float32)


def test_default_is_papers_polynomial_not_reference_fallback():
    q = _np_skew(0.3 * np.random.default_rng(0).standard_normal((2, 120)), 16)
    eye = np.eye(16)
    q2 = q @ q
    papers = eye + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2
    fallback = papers + q2 @ q2  # the reference's CPU fallback has 2·Q⁴
    got = np.asarray(cayley.cayley_neumann(jnp.asarray(q, jnp.float32)))
    assert_close(got, papers, jnp.float32)
    assert np.linalg.norm(got - fallback) > 100 * np.linalg.norm(got - papers)


def test_exact_cayley_is_orthogonal():
    q = _np_skew(np.random.default_rng(0).standard_normal((6, 496)), 32)  # ‖Q‖ well above 1
    r = np.asarray(cayley.cayley_exact(jnp.asarray(q, jnp.float32)), np.float64)
    err = np.abs(np.swapaxes(r, -1, -2) @ r - np.eye(32)).max()
    assert err < 1e-6 * 10, err  # fp32 solve of a well-conditioned (I − Q): ‖I−Q‖⁻¹ ≤ 1
    # and it is the Cayley transform: R(I − Q) = I + Q
    np.testing.assert_allclose(r @ (np.eye(32) - q), np.eye(32) + q, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_batched_solve_matches_float64_numpy_and_pivots(dtype):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((2, 3, 24, 24))
    a[0, 0] = np.eye(24)[rng.permutation(24)]   # zeros on the diagonal: only pivoting solves it
    b = rng.standard_normal((2, 3, 24, 5))
    with jax.enable_x64(dtype == jnp.float64):
        x = jax.jit(cayley.batched_solve)(jnp.asarray(a, dtype), jnp.asarray(b, dtype))
        assert x.dtype == dtype and x.shape == b.shape
        assert_close(x, np.linalg.solve(a, b), dtype, "grad", what="batched solve")


def test_cpu_solves_run_no_lapack_call():
    """Two LAPACK triangular solves that XLA runs concurrently can hang a CPU process (jaxlib 0.10.2): the
    CPU form of the solve is plain XLA ops, so no program of ours holds a LAPACK custom call."""
    q = jnp.asarray(np.random.default_rng(0).standard_normal((4, 8, 8)), jnp.float32)
    two = lambda q, g: (cayley.batched_solve(q + 3 * jnp.eye(8), g), cayley.cayley_exact(q - jnp.swapaxes(q, 1, 2)))
    hlo = jax.jit(jax.grad(lambda q: sum(jnp.sum(t) for t in two(q, q)))).lower(q).compile().as_text()
    assert "custom_call_target=\"lapack" not in hlo


def test_neumann_orthogonality_error_within_bound_and_shrinks():
    rng = np.random.default_rng(3)
    k = 32
    base = _np_skew(rng.standard_normal((8, k * (k - 1) // 2)), k)
    base /= np.linalg.norm(base, ord=2, axis=(-2, -1), keepdims=True)  # unit operator norm per block
    errs = []
    for s in [0.4, 0.2, 0.1]:
        q = s * base
        r = _np_poly(q, 3)  # float64 so the measured error is the polynomial's, not rounding
        err = np.linalg.norm(np.swapaxes(r, -1, -2) @ r - np.eye(k), ord=2, axis=(-2, -1)).max()
        assert err <= cayley.neumann_orthogonality_bound(s, 3) * (1 + 1e-9)
        errs.append(err)
        # the float32 implementation agrees with the float64 polynomial
        assert_close(np.asarray(cayley.cayley_neumann(jnp.asarray(q, jnp.float32))), r, jnp.float32)
    # error is O(‖Q‖⁴): halving ‖Q‖ divides it by ≈16 (at least by 12)
    assert errs[0] / errs[1] > 12 and errs[1] / errs[2] > 12, errs


@pytest.mark.parametrize("num_terms", [2, 3])
def test_neumann_map_scales_each_rotation_plane_by_one_minus_its_angle_power(num_terms):
    """Why a merge can move a spectrum: for a skew Q with eigenvalues ±iθ the truncated series scales each
    plane by |1 − (iθ)^(k+1)| (k = num_terms), so with θ near 1 the merged R is far from orthogonal and the
    singular values it bakes into W0 shrink (BENCHMARKS.md, series E: Newton–Schulz steps over 200 steps)."""
    rng = np.random.default_rng(num_terms)
    k = 16
    q = _np_skew(rng.standard_normal(k * (k - 1) // 2), k)
    for theta_max in (0.3, 0.9):
        qs = q * theta_max / np.linalg.norm(q, ord=2)
        theta = np.abs(np.linalg.eigvals(qs).imag)  # each angle twice (a plane has two eigenvalues)
        expected = np.sort(np.abs(1 - (1j * theta) ** (num_terms + 1)))[::-1]
        sigma = np.linalg.svd(_np_poly(qs, num_terms), compute_uv=False)
        np.testing.assert_allclose(sigma, expected, rtol=1e-10)
        assert_close(np.linalg.svd(np.asarray(cayley.cayley_neumann(jnp.asarray(qs, jnp.float32), num_terms)),
                                   compute_uv=False), expected, jnp.float32)


def test_ragged_layout_and_mask():
    lay = cayley.block_layout(688, 256)
    assert (lay.num_blocks, lay.padded, lay.tail) == (3, 768, 176)
    theta = jnp.asarray(np.random.default_rng(0).standard_normal((3, 256 * 255 // 2)), jnp.float32) * 0.01
    r = np.asarray(cayley.rotations(theta, lay, 3))
    # the last block acts only on its first 176 coordinates
    np.testing.assert_array_equal(r[-1, 176:, 176:], np.eye(80))
    np.testing.assert_array_equal(r[-1, :176, 176:], 0)
    np.testing.assert_array_equal(r[-1, 176:, :176], 0)
    assert lay.num_params == 2 * (256 * 255 // 2) + 176 * 175 // 2
    g = jax.grad(lambda t: jnp.sum(cayley.rotations(t, lay, 3) ** 3))(theta)
    assert np.count_nonzero(np.asarray(g)[-1]) <= 176 * 175 // 2


@pytest.mark.parametrize("dim,k", [(10, 0), (10, -1), (10, 11)])
def test_layout_errors(dim, k):
    with pytest.raises(ValueError, match="block_size"):
        cayley.block_layout(dim, k)


def test_tolerance_helper():
    assert tolerance(jnp.float32) == 1e-5
    with pytest.raises(ValueError, match="int32"):
        tolerance(jnp.int32)


def test_block_size_one_is_identity():
    lay = cayley.block_layout(5, 1)
    theta = jnp.zeros((5, 0), jnp.float32)
    np.testing.assert_array_equal(np.asarray(cayley.rotations(theta, lay, 3)), np.ones((5, 1, 1)))
    g = jax.grad(lambda t: jnp.sum(cayley.rotations(t, lay, 3)))(theta)
    assert g.shape == (5, 0)


@pytest.mark.parametrize("n,m,k", [(40, 50, 16), (64, 64, 32), (48, 40, 16)])
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_rotation_pair_is_two_maps_in_one(n, m, k, impl):
    """Both sides' blocks in one batched map (ragged tails masked per side) equal two separate maps,
    forward and gradient, and each side's real coordinates rotate orthogonally."""
    lin, lout = cayley.block_layout(n, k), cayley.block_layout(m, k)
    th_in = 0.1 * jax.random.normal(jax.random.key(0), (lin.num_blocks, lin.num_packed))
    th_out = 0.1 * jax.random.normal(jax.random.key(1), (lout.num_blocks, lout.num_packed))

    def pair(a, b):
        r_in, r_out = cayley.rotation_pair(a, lin, b, lout, impl=impl, precision="highest")
        return jnp.sum(r_in ** 3) + jnp.sum(jnp.sin(r_out))

    def apart(a, b):
        return (jnp.sum(cayley.rotations(a, lin, impl="xla") ** 3)
                + jnp.sum(jnp.sin(cayley.rotations(b, lout, impl="xla"))))

    got_in, got_out = cayley.rotation_pair(th_in, lin, th_out, lout, impl=impl)
    assert got_in.shape == (lin.num_blocks, k, k) and got_out.shape == (lout.num_blocks, k, k)
    assert_close(got_in, cayley.rotations(th_in, lin), jnp.float32, what="R_in")
    assert_close(got_out, cayley.rotations(th_out, lout), jnp.float32, what="R_out")
    g_pair = jax.grad(pair, argnums=(0, 1))(th_in, th_out)
    g_apart = jax.grad(apart, argnums=(0, 1))(th_in, th_out)
    for a, b in zip(g_pair, g_apart):
        assert_close(a, b, jnp.float32, "grad", what="dθ")
    if lout.ragged:  # the padded corner of the last output block stays the identity
        tail = lout.tail
        np.testing.assert_array_equal(np.asarray(got_out[-1, tail:, tail:]), np.eye(k - tail))


def test_rotation_pair_with_different_block_sizes_and_precision_errors():
    lin, lout = cayley.block_layout(32, 16), cayley.block_layout(48, 8)  # different K (FS-like): two maps
    th_in = 0.1 * jax.random.normal(jax.random.key(0), (2, lin.num_packed))
    th_out = 0.1 * jax.random.normal(jax.random.key(1), (6, lout.num_packed))
    r_in, r_out = cayley.rotation_pair(th_in, lin, th_out, lout)
    assert r_in.shape == (2, 16, 16) and r_out.shape == (6, 8, 8)
    assert_close(r_out, cayley.rotations(th_out, lout), jnp.float32, "same", what="R_out")
    with pytest.raises(ValueError, match="precision must be one of .*got precision='tf16'"):
        cayley.rotations(th_in, lin, precision="tf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        cayley.rotation_pair(th_in, lin, th_in, lin, precision="fast")


def test_default_precision_series_stays_within_its_error_bound():
    """precision="default" (one TF32 pass on a GPU; float32 on CPU): the blocks stay orthogonal within
    the Neumann bound plus TF32 rounding, and equal the float32 series to 1e-3 relative."""
    k = 64
    lay = cayley.block_layout(4 * k, k)
    th = 0.3 / np.sqrt(k) * jax.random.normal(jax.random.key(3), (4, lay.num_packed))
    r_hi = cayley.rotations(th, lay, precision="highest")
    r_lo = cayley.rotations(th, lay, precision="default")
    assert float(jnp.linalg.norm(r_lo - r_hi) / jnp.linalg.norm(r_hi)) < 1e-3
    q_norm = float(jnp.max(jnp.linalg.norm(cayley.skew_from_packed(th), ord=2, axis=(-2, -1))))
    err = float(jnp.max(jnp.linalg.norm(jnp.swapaxes(r_lo, -1, -2) @ r_lo - jnp.eye(k), ord=2, axis=(-2, -1))))
    assert err <= cayley.neumann_orthogonality_bound(q_norm) + 1e-3


def test_bf16_precision_series_rounds_products_only_and_stays_within_bf16():
    """precision="bf16" (every backend): the products' operands rounded to bfloat16. R − I and dθ within bf16
    tolerances of the float32-exact series, measurably different from it (also on CPU), and R equal to a
    float64 evaluation of the same rounded products; I + 2Q is exact."""
    import ml_dtypes
    k = 64
    lay = cayley.block_layout(3 * k, k)
    th = 0.3 / np.sqrt(k) * jax.random.normal(jax.random.key(4), (3, lay.num_packed))
    g = jax.random.normal(jax.random.key(5), (3, k, k))

    def fwd_vjp(prec):
        r, vjp = jax.vjp(lambda t: cayley.rotations(t, lay, precision=prec), th)
        return r, vjp(g)[0]

    (r_lo, dt_lo), (r_hi, dt_hi) = fwd_vjp("bf16"), fwd_vjp("highest")
    eye = np.eye(k, dtype=np.float32)
    assert_close(r_lo - eye, r_hi - eye, jnp.bfloat16, "value", what="R − I")
    assert_close(dt_lo, dt_hi, jnp.bfloat16, "grad", what="dθ")
    assert rel_err(r_lo - eye, r_hi - eye) > tolerance(jnp.float32, "grad")
    q = np.asarray(cayley.skew_from_packed(th), np.float64)

    def bf(a):
        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)

    q2 = (bf(q) @ bf(q)).astype(np.float32)
    want = np.eye(k) + 2 * (q + q2 + bf(q2) @ bf(q)) + bf(q2) @ bf(q2)
    assert_close(r_lo, want, jnp.float32, "same", what="R vs float64 of the rounded products")


def test_bf16_matmul_vjp_is_the_rounded_transpose_products():
    a = jax.random.normal(jax.random.key(0), (2, 32, 32))
    b = jax.random.normal(jax.random.key(1), (2, 32, 32))
    g = jax.random.normal(jax.random.key(2), (2, 32, 32))
    y, vjp = jax.vjp(cayley.bf16_matmul, a, b)
    da, db = vjp(g)
    assert y.dtype == da.dtype == db.dtype == jnp.float32
    hi = jax.lax.Precision.HIGHEST
    assert_close(y, jnp.matmul(a, b, precision=hi), jnp.bfloat16, "value", what="y")
    assert_close(da, jnp.matmul(g, jnp.swapaxes(b, -1, -2), precision=hi), jnp.bfloat16, "grad", what="da")
    assert_close(db, jnp.matmul(jnp.swapaxes(a, -1, -2), g, precision=hi), jnp.bfloat16, "grad", what="db")
    # the cotangent is rounded too: da equals the product of the rounded operands exactly in float32 sums
    bf = jnp.bfloat16
    exact = jnp.matmul(g.astype(bf).astype(jnp.float32), jnp.swapaxes(b, -1, -2).astype(bf).astype(jnp.float32),
                       precision=hi)
    assert_close(da, exact, jnp.float32, "same", what="da vs rounded operands")
