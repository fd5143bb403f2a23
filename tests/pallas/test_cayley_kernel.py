"""Fused Cayley–Neumann kernel: forward and VJP against the jnp reference, float64 and invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import CayleyConfig
from poetjax.testing import assert_close, rel_err, tolerance

from _modes import MODES


def _theta(nb, k, seed=0, scale=0.3):
    # entries ~ N(0, (scale/√K)²): ‖Q‖₂ ≈ 2·scale, inside the series' domain like a trained generator
    return scale / np.sqrt(k) * jax.random.normal(jax.random.key(seed), (nb, k * (k - 1) // 2))


def _fwd_vjp(fn, theta, seed=1):
    r, vjp = jax.vjp(fn, theta)
    g = jax.random.normal(jax.random.key(seed), r.shape)
    return r, vjp(g)[0]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("k,nb", [(16, 3), (32, 2), (64, 2), (128, 2), (256, 2)])
def test_matches_reference(k, nb, interpret):
    theta = _theta(nb, k, seed=k)
    r, dt = jax.jit(lambda t: _fwd_vjp(lambda t: pk.cayley_neumann(t, k, interpret=interpret), t))(theta)
    r_ref, dt_ref = _fwd_vjp(lambda t: pk.cayley_neumann_reference(t, k), theta)
    assert r.shape == (nb, k, k) and r.dtype == jnp.float32
    assert_close(r, r_ref, jnp.float32, "value", what=f"R K={k}")
    assert_close(dt, dt_ref, jnp.float32, "value", what=f"dθ K={k}")


@pytest.mark.parametrize("interpret", MODES)
def test_small_tiles_against_float64_and_orthogonality(interpret):
    """4×4 tiles per block (pairs above, on and below the diagonal), leading batch dims."""
    k = 64
    theta = _theta(6, k, seed=3, scale=0.25).reshape(2, 3, -1)
    cfg = CayleyConfig(block_m=16, block_k=16)
    r = np.asarray(jax.jit(lambda t: pk.cayley_neumann(t, k, interpret=interpret, config=cfg))(theta))
    assert r.shape == (2, 3, k, k)
    rows, cols = np.triu_indices(k, 1)
    th = np.asarray(theta, np.float64).reshape(6, -1)
    q = np.zeros((6, k, k))
    q[:, rows, cols] = th
    q = q - np.swapaxes(q, 1, 2)
    q2 = q @ q
    want = np.eye(k) + 2 * q + 2 * q2 + 2 * q2 @ q + q2 @ q2
    assert_close(r.reshape(6, k, k), want, jnp.float32, "value", what="R vs float64")
    # ‖RᵀR − I‖₂ ≤ 2‖Q‖₂⁴ + ‖Q‖₂⁸ (R = C·(I − Q⁴) with C the exact Cayley transform)
    for rb, qb in zip(r.reshape(6, k, k).astype(np.float64), q):
        qn = np.linalg.norm(qb, 2)
        assert np.linalg.norm(rb.T @ rb - np.eye(k), 2) <= 2 * qn ** 4 + qn ** 8 + 1e-5


def test_zero_generators_give_identity():
    r = jax.jit(lambda t: pk.cayley_neumann(t, 32, interpret=True))(jnp.zeros((2, 496)))
    np.testing.assert_array_equal(r, np.broadcast_to(np.eye(32, dtype=np.float32), (2, 32, 32)))


def test_other_num_terms_use_the_reference():
    theta = _theta(2, 16, seed=5)
    for terms in (1, 2, 5):
        r, dt = _fwd_vjp(lambda t: pk.cayley_neumann(t, 16, terms, interpret=True), theta)
        r_ref, dt_ref = _fwd_vjp(lambda t: pk.cayley_neumann_reference(t, 16, terms), theta)
        np.testing.assert_array_equal(r, r_ref)
        np.testing.assert_array_equal(dt, dt_ref)
    # and the reference's series differ between numbers of terms (the argument is not ignored)
    assert not np.allclose(pk.cayley_neumann_reference(theta, 16, 1), pk.cayley_neumann_reference(theta, 16, 3))


def test_bf16_generators_compute_in_float32():
    theta = _theta(2, 16, seed=6).astype(jnp.bfloat16)
    r, dt = jax.jit(lambda t: _fwd_vjp(lambda t: pk.cayley_neumann(t, 16, interpret=True), t))(theta)
    r_ref, _ = _fwd_vjp(lambda t: pk.cayley_neumann_reference(t, 16), theta)
    assert r.dtype == jnp.float32 and dt.dtype == jnp.bfloat16
    assert_close(r, r_ref, jnp.float32, "value", what="R from bf16 θ")


def test_errors_quote_the_values():
    with pytest.raises(ValueError, match=r"theta must have shape \(\.\.\., 120\) for block_size=16, got \(2, 100\)"):
        pk.cayley_neumann(jnp.zeros((2, 100)), 16)
    with pytest.raises(ValueError, match="block_size=24 is not supported"):
        pk.cayley_neumann(jnp.zeros((2, 276)), 24)
    with pytest.raises(ValueError, match="num_terms must be an int ≥ 0, got num_terms=-1"):
        pk.cayley_neumann(jnp.zeros((2, 120)), 16, -1)
    with pytest.raises(ValueError, match="CayleyConfig.block_m=48 must be a power of two"):
        pk.cayley_neumann(jnp.zeros((2, 120)), 16, config=CayleyConfig(block_m=48))
    with pytest.raises(ValueError, match="CayleyConfig.precision='fp8' must be one of"):
        pk.cayley_neumann(jnp.zeros((2, 120)), 16, config=CayleyConfig(block_m=16, block_k=16, precision="fp8"))


@pytest.mark.parametrize("interpret", MODES)
def test_bf16_products_stay_within_bf16_of_the_float32_series(interpret):
    """precision="bf16": product operands rounded to bfloat16, float32 sums. R − I (the part the rounding
    touches: I + 2Q is exact) and dθ within bf16 tolerances of the float32 reference, and measurably not
    float32 (the rounding happens, in the interpreter too)."""
    k, nb = 64, 3
    theta = _theta(nb, k, seed=11)
    cfg = CayleyConfig(block_m=32, block_k=32, precision="bf16")
    r, dt = jax.jit(lambda t: _fwd_vjp(lambda t: pk.cayley_neumann(t, k, interpret=interpret, config=cfg), t))(theta)
    r_ref, dt_ref = _fwd_vjp(lambda t: pk.cayley_neumann_reference(t, k), theta)
    eye = np.eye(k, dtype=np.float32)
    assert_close(r - eye, r_ref - eye, jnp.bfloat16, "value", what="R − I, bf16 products")
    assert_close(dt, dt_ref, jnp.bfloat16, "grad", what="dθ, bf16 products")
    assert rel_err(r - eye, r_ref - eye) > tolerance(jnp.float32, "grad")
    assert rel_err(dt, dt_ref) > tolerance(jnp.float32, "grad")


def test_tuning_keeps_tiles_per_precision(monkeypatch):
    from pallas_kernels import tuning
    base = tuning.cayley_config(256)
    assert tuning.cayley_config(256, "bf16") == dataclasses.replace(base, precision="bf16")
    monkeypatch.setitem(tuning.TABLE, ("cayley/bf16", 256), {"block_m": 128, "block_k": 64, "num_warps": 8})
    cfg = tuning.cayley_config(256, "bf16")
    assert (cfg.block_m, cfg.block_k, cfg.num_warps, cfg.precision) == (128, 64, 8, "bf16")
    assert tuning.cayley_config(256, "tf32") == dataclasses.replace(base, precision="tf32")
    with pytest.raises(ValueError, match="CayleyConfig.precision='fp8' must be one of"):
        tuning.cayley_config(256, "fp8")
