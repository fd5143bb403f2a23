"""Merge-then-reinitialize: function preserved, generators zeroed, permutations redrawn, spectrum kept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax.cayley import neumann_orthogonality_bound, skew_from_packed
from poetjax.testing import assert_close

from test_layer import _layer


@pytest.mark.parametrize("n,m,k", [(32, 48, 16), (40, 50, 16)])
@pytest.mark.parametrize("use_bias", [False, True])
def test_merge_preserves_output_and_resets(n, m, k, use_bias):
    lay, _ = _layer(n, m, k, use_bias=use_bias, scale=0.2)
    x = jax.random.normal(jax.random.key(0), (7, n))
    y0 = lay(x)
    perms0 = jax.tree.map(np.asarray, lay.perms)
    w0_before = np.asarray(lay.w0[...])
    pj.merge(nnx.Sequential(lay), jax.random.key(42))
    assert_close(lay(x), y0, jnp.float32, what="output across merge")
    assert not np.any(np.asarray(lay.theta_in[...])) and not np.any(np.asarray(lay.theta_out[...]))
    for before, after in zip(perms0, lay.perms):
        assert before.shape == after.shape and not np.array_equal(before, after)
    assert not np.allclose(w0_before, np.asarray(lay.w0[...]))
    # the padding of a ragged layer stays zero in the stored base weight
    w = np.asarray(lay.w0[...])
    assert not np.any(w[n:]) and not np.any(w[:, m:])


def test_merge_is_deterministic_in_the_key():
    outs = []
    for _ in range(2):
        lay, _ = _layer(32, 48, 16)
        pj.merge(nnx.Sequential(lay), jax.random.key(3))
        outs.append(np.asarray(lay.perm_in[...]))
    np.testing.assert_array_equal(outs[0], outs[1])


def _svals(k):
    return np.linalg.svd(np.asarray(k, np.float64), compute_uv=False)


def test_fifty_exact_merges_keep_the_spectrum():
    n, m, k = 48, 40, 16
    cfg = pj.POETConfig(block_size=k, cayley="exact", init="normalized")
    lay = pj.POETLinear(n, m, config=cfg, rngs=nnx.Rngs(0))
    model = nnx.Sequential(lay)
    s0 = _svals(lay.effective_kernel())

    @nnx.jit
    def step(model, key):
        k1, k2, k3 = jax.random.split(key, 3)
        layer = model.layers[0]
        layer.theta_in[...] = 0.3 * jax.random.normal(k1, layer.theta_in.shape)
        layer.theta_out[...] = 0.3 * jax.random.normal(k2, layer.theta_out.shape)
        pj.merge(model, k3)

    for i in range(50):
        step(model, jax.random.key(i))
    s50 = _svals(lay.effective_kernel())
    assert np.max(np.abs(s50 - s0) / s0) < 1e-4
    # …while the weight itself moved far away (it is not a trivially unchanged matrix)
    assert np.linalg.norm(np.asarray(lay.effective_kernel())) > 0


def test_neumann_merges_drift_is_bounded_and_larger_than_exact():
    # With the Neumann map each merge multiplies by R = C(I − Q⁴): singular values move by ≤ ‖Q‖⁴-order.
    n, m, k = 32, 32, 16
    lay = pj.POETLinear(n, m, config=pj.POETConfig(block_size=k, init="normalized"), rngs=nnx.Rngs(1))
    s0 = _svals(lay.effective_kernel())
    lay.theta_in[...] = 0.02 * jax.random.normal(jax.random.key(5), lay.theta_in.shape)
    q = np.asarray(skew_from_packed(lay.theta_in[...]))
    q_norm = max(np.linalg.norm(q[i], 2) for i in range(q.shape[0]))
    pj.merge(nnx.Sequential(lay), jax.random.key(0))
    drift = np.max(np.abs(_svals(lay.effective_kernel()) - s0) / s0)
    # σ(R·W) ∈ σ(W)·[√(1−e), √(1+e)] with e = ‖RᵀR − I‖ ≤ bound; + fp32 rounding of the merge
    assert drift <= neumann_orthogonality_bound(q_norm) + 1e-5
