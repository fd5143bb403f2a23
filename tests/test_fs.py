"""POET-FS (variant="fs"): factored layer vs the explicit dense formula of spec §3.1, gradients, merges,
pass-through of the coordinates outside the subsets, sizes and fractions, parameter count. Training, the
merge-step optimizer reset, "no recompilation", bf16 and "no scatter" run for FS in test_optim.py,
test_compile.py and test_layer.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax import fs
from poetjax.cayley import block_layout, rotations
from poetjax.testing import assert_close, rel_err, poet_config

from _reference import poly, skew_scatter
from test_layer import _layer

# (N, M, block_size): fractions, an absolute size, odd sizes, the full budget (1.0).
CASES = [(40, 24, 0.25), (20, 7, 0.5), (33, 17, 5), (12, 10, 1.0)]


def _fs_layer(n, m, block_size, **kwargs):
    """An FS layer with W0 = a known kernel (init "keep") and random generators."""
    return _layer(n, m, block_size, variant="fs", **kwargs)


def _subsets(lay):
    """S_in = the first Ki entries of the input permutation, S_out = those of the output-side inverse."""
    return (np.asarray(lay.perm_in[...])[: lay.layout_in.size],
            np.asarray(lay.perm_out_inv[...])[: lay.layout_out.size])


def _dense_primitive(theta_1xP, subset, dim, num_terms=3):
    """G = I + D(S)(G̃ − I)D(S)ᵀ as an explicit (dim, dim) matrix; G̃ from the explicit polynomial."""
    k = len(subset)
    g = poly(skew_scatter(theta_1xP, k), num_terms)[0]
    d = jax.nn.one_hot(jnp.asarray(subset), dim, dtype=jnp.float32).T  # D[:, j] = e_{S[j]}
    mm = lambda a, b: jnp.matmul(a, b, precision="highest")
    return jnp.eye(dim) + mm(mm(d, g - jnp.eye(k)), d.T)


@jax.jit
def _dense_effective(theta_in, theta_out, w0, s_in, s_out):
    n, m = w0.shape
    r, p = _dense_primitive(theta_in, s_in, n), _dense_primitive(theta_out, s_out, m)
    return jnp.matmul(jnp.matmul(r, w0, precision="highest"), p, precision="highest")


@pytest.mark.parametrize("n,m,block_size,use_bias", [c + (False,) for c in CASES] + [(24, 36, 0.5, True)])
def test_fs_forward_and_gradients_match_dense_formula(n, m, block_size, use_bias):
    lay, w0 = _fs_layer(n, m, block_size, use_bias=use_bias)
    s_in, s_out = _subsets(lay)
    assert len(set(s_in.tolist())) == len(s_in) and len(set(s_out.tolist())) == len(s_out)  # distinct
    x = jax.random.normal(jax.random.key(7), (2, 5, n))
    dense = _dense_effective(lay.theta_in[...], lay.theta_out[...], w0, s_in, s_out)
    b = lay.bias[...] if use_bias else 0.0
    y = lay(x)
    assert y.shape == (2, 5, m)
    assert_close(lay.effective_kernel(), dense, jnp.float32, what="effective_kernel vs I + D(G̃−I)Dᵀ formula")
    assert_close(y, x @ dense + b, jnp.float32, what="FS layer vs dense formula")

    # gradients w.r.t. the generators and the input, factored path vs the dense formula
    g = jax.random.normal(jax.random.key(9), (2, 5, m))
    graphdef, gens, rest = nnx.split(lay, pj.Generator, ...)

    def factored(gens, x):
        return jnp.sum(nnx.merge(graphdef, gens, rest)(x) * g)

    def dense_loss(gens, x):
        w = _dense_effective(gens["theta_in"][...], gens["theta_out"][...], w0, s_in, s_out)
        return jnp.sum(jnp.matmul(x, w, precision="highest") * g)

    gf = jax.jit(jax.grad(factored, argnums=(0, 1)))(gens, x)
    gd = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))(gens, x)
    for name, a, b in (("theta_in", gf[0]["theta_in"][...], gd[0]["theta_in"][...]),
                       ("theta_out", gf[0]["theta_out"][...], gd[0]["theta_out"][...]), ("x", gf[1], gd[1])):
        assert_close(a, b, jnp.float32, "grad", what=f"FS d{name}")


def test_subset_rotation_leaves_other_coordinates_bit_exact():
    d, k = 40, 12
    perm = jax.random.permutation(jax.random.key(0), d).astype(jnp.int32)
    perm_inv = jnp.argsort(perm).astype(jnp.int32)
    theta = 0.3 * jax.random.normal(jax.random.key(1), (1, k * (k - 1) // 2))
    g = rotations(theta, block_layout(k, k))  # (1, K, K)
    x = jax.random.normal(jax.random.key(2), (3, 7, d))
    out = fs.subset_rotate(x, g, perm, perm_inv)
    s = np.asarray(perm[:k])
    rest = np.setdiff1d(np.arange(d), s)
    np.testing.assert_array_equal(np.asarray(out)[..., rest], np.asarray(x)[..., rest])
    assert_close(out[..., s], jnp.matmul(x[..., s], g[0], precision="highest"), jnp.float32)
    assert rel_err(out[..., s], x[..., s]) > 1e-2  # …and the subset really was rotated
    # the prefix form used by the layer: tail copied exactly
    y = fs.prefix_rotate(x, g[0])
    np.testing.assert_array_equal(np.asarray(y)[..., k:], np.asarray(x)[..., k:])


def test_fs_layer_untouched_entries_are_bit_exact_copies_of_w0():
    lay, w0 = _fs_layer(24, 36, 0.5, scale=0.3)
    s_in, s_out = _subsets(lay)
    rows = np.setdiff1d(np.arange(24), s_in)
    cols = np.setdiff1d(np.arange(36), s_out)
    w = np.asarray(lay.effective_kernel())
    np.testing.assert_array_equal(w[np.ix_(rows, cols)], np.asarray(w0)[np.ix_(rows, cols)])
    assert rel_err(w[np.ix_(s_in, s_out)], np.asarray(w0)[np.ix_(s_in, s_out)]) > 1e-2


@pytest.mark.parametrize("use_bias", [False, True])
def test_fs_merge_preserves_output_and_draws_new_subsets(use_bias):
    lay, _ = _fs_layer(32, 48, 0.5, use_bias=use_bias, scale=0.2)
    x = jax.random.normal(jax.random.key(0), (7, 32))
    y0 = lay(x)
    s0 = _subsets(lay)
    w0_before = np.asarray(lay.w0[...])
    pj.merge(nnx.Sequential(lay), jax.random.key(42))
    assert_close(lay(x), y0, jnp.float32, what="FS output across merge")
    assert not np.any(np.asarray(lay.theta_in[...])) and not np.any(np.asarray(lay.theta_out[...]))
    for before, after in zip(s0, _subsets(lay)):
        assert before.shape == after.shape and set(before.tolist()) != set(after.tolist())
    assert not np.allclose(w0_before, np.asarray(lay.w0[...]))


def test_fs_subset_sizes_per_side():
    def sizes(n, m, b):
        cfg = poet_config(variant="fs", block_size=b)
        lay = nnx.eval_shape(lambda: pj.POETLinear(n, m, config=cfg, rngs=nnx.Rngs(0)))  # shapes only
        assert lay.w0.shape == (n, m) and lay.perm_in.shape == lay.perm_in_inv.shape == (n,)
        assert lay.theta_in.shape == (1, lay.layout_in.size * (lay.layout_in.size - 1) // 2)
        assert lay.theta_out.shape == (1, lay.layout_out.size * (lay.layout_out.size - 1) // 2)
        return lay.layout_in.size, lay.layout_out.size

    assert sizes(512, 1376, 0.5) == (256, 688)  # spec §3.1's example
    assert sizes(1376, 512, 0.125) == (172, 64)
    assert sizes(20, 7, 0.5) == (10, 4)  # 3.5 rounds half up
    assert sizes(12, 10, 1.0) == (12, 10)  # the float 1.0 is the full dimension
    assert sizes(12, 10, 6) == (6, 6)
    assert sizes(3, 4, 0.5) == (2, 2)


@pytest.mark.parametrize("kwargs,match", [
    ({"block_size": 0.5}, r"only defined for family='fs'.*block_size=0.5 with family='bs'"),
    ({"block_size": 0.5, "memory": "mem"}, r"block_size=0.5 with family='bs'"),
    ({"block_size": 0.5, "family": "fs", "memory": "mem"}, r"memory='mem' is only defined for family='bs'"),
    ({"block_size": 0.5, "family": "fs", "base": "uint8"}, r"base='uint8' is only defined for family='bs'"),
    ({"block_size": 1.5, "family": "fs"}, r"in \(0, 1\], got block_size=1.5"),
    ({"block_size": 0.0, "family": "fs"}, r"in \(0, 1\], got block_size=0.0"),
    ({"block_size": -0.25, "family": "fs"}, r"block_size=-0.25"),
    ({"block_size": float("nan"), "family": "fs"}, r"block_size=nan"),
    ({"block_size": 0, "family": "fs"}, r"block_size=0"),
    ({"block_size": 2.0, "family": "fs"}, r"in \(0, 1\], got block_size=2.0"),
    ({"block_size": True, "family": "fs"}, r"block_size=True"),
])
def test_fs_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pj.POETConfig(**kwargs)


def test_fs_layer_size_errors():
    with pytest.raises(ValueError, match=r"block_size=64 is larger than in_features=32"):
        pj.POETLinear(32, 128, config=poet_config(variant="fs", block_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"block_size=0.01 of out_features=20 rounds to 0 coordinate"):
        pj.POETLinear(200, 20, config=poet_config(variant="fs", block_size=0.01), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"block_size=0.5 of out_features=2 rounds to 1 coordinate"):
        pj.POETLinear(64, 2, config=poet_config(variant="fs", block_size=0.5), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"at least 2 coordinates to rotate, got block_size=1"):
        pj.POETLinear(8, 8, config=poet_config(variant="fs", block_size=1), rngs=nnx.Rngs(0))


class LlamaShapes(nnx.Module):
    """The Linear shapes of LLaMA-60M as in the POET paper (8 layers, hidden 512, intermediate 1376)."""

    def __init__(self, rngs, layers=8, hidden=512, inter=1376):
        lin = lambda a, b: nnx.Linear(a, b, use_bias=False, rngs=rngs)
        self.layers = nnx.List([
            nnx.Dict(q=lin(hidden, hidden), k=lin(hidden, hidden), v=lin(hidden, hidden), o=lin(hidden, hidden),
                     gate=lin(hidden, inter), up=lin(hidden, inter), down=lin(inter, hidden))
            for _ in range(layers)])


def test_fs_param_count_llama60m_is_8_54m():
    cfg = poet_config(variant="fs", block_size=0.5)

    def build():
        return pj.poetize(LlamaShapes(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))

    model = nnx.eval_shape(build)  # shapes only: nothing of the 25M-entry model is materialized
    gens = jax.tree.leaves(nnx.state(model, pj.Generator))
    total = sum(math.prod(g.shape) for g in gens)
    assert len(gens) == 8 * 7 * 2
    assert total == sum(layer.num_generator_params for _, layer in pj.poet_layers(model))
    # Spec §3.1 / [POET] Table 2: LLaMA-60M, POET-FS b=1/2 → 8.54M trainable POET parameters.
    assert round(total / 1e6, 2) == 8.54, total
