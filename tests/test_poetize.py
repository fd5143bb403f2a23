"""poetize: which layers convert, `keep` init preserves the function, W0 never trained."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax.initializers import base_weight, mup_factor
from poetjax.testing import assert_close


class Block(nnx.Module):
    def __init__(self, d, rngs):
        self.up = nnx.Linear(d, 3 * d, rngs=rngs)
        self.down = nnx.Linear(3 * d, d, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.up(x)))


class Tiny(nnx.Module):
    def __init__(self, d=16, vocab=11, rngs=None):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for b in self.blocks:
            x = b(x)
        return self.lm_head(self.norm(x))


def test_converts_every_linear_but_excluded():
    model = Tiny(rngs=nnx.Rngs(0))
    pj.poetize(model, pj.POETConfig(block_size=8), rngs=nnx.Rngs(1))
    names = {"/".join(map(str, p)): type(m).__name__ for p, m in nnx.iter_graph(model)
             if isinstance(m, (nnx.Linear, pj.POETLinear))}
    assert names == {"blocks/0/up": "POETLinear", "blocks/0/down": "POETLinear", "blocks/1/up": "POETLinear",
                     "blocks/1/down": "POETLinear", "lm_head": "Linear"}
    model2 = Tiny(rngs=nnx.Rngs(0))
    pj.poetize(model2, pj.POETConfig(block_size=8), rngs=nnx.Rngs(1), exclude=("lm_head", "down"))
    assert isinstance(model2.blocks[0].down, nnx.Linear) and isinstance(model2.blocks[0].up, pj.POETLinear)


def test_keep_init_preserves_outputs():
    model = Tiny(rngs=nnx.Rngs(0))
    tokens = jnp.arange(12).reshape(2, 6) % 11
    before = model(tokens)
    pj.poetize(model, pj.POETConfig(block_size=8, init="keep"), rngs=nnx.Rngs(1))
    # identical up to the summation order of the permuted matmul
    assert_close(model(tokens), before, jnp.float32, "same")


def test_w0_gets_no_gradient_and_no_optimizer_state():
    model = Tiny(rngs=nnx.Rngs(0))
    pj.poetize(model, pj.POETConfig(block_size=8), rngs=nnx.Rngs(1))
    tokens = jnp.arange(12).reshape(2, 6) % 11
    grads = nnx.grad(lambda m: jnp.mean(m(tokens) ** 2))(model)
    paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(grads))[0]]
    assert any("theta_in" in p for p in paths) and not any("w0" in p or "perm" in p for p in paths)
    opt = nnx.Optimizer(model, pj.poet_optimizer(pj.POETConfig(block_size=8), 1e-3), wrt=nnx.Param)
    opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.as_pure(opt.opt_state))[0]]
    assert any("theta_in" in p for p in opt_paths) and not any("w0" in p for p in opt_paths)


@pytest.mark.parametrize("scheme", ["normalized", "mup", "normalized_gaussian", "standard", "xavier", "uniform_spectrum",
                                    "keep"])
def test_init_schemes(scheme):
    key = jax.random.key(0)
    kernel = jax.random.normal(jax.random.key(1), (24, 16)) * 3.0
    w = np.asarray(base_weight(scheme, key, (24, 16), kernel=kernel))
    if scheme in ("normalized", "normalized_gaussian"):
        np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-5)  # unit-norm neurons (columns)
    if scheme == "normalized":
        np.testing.assert_allclose(w * np.linalg.norm(np.asarray(kernel), axis=0), kernel, rtol=1e-5)
    if scheme == "uniform_spectrum":
        np.testing.assert_allclose(np.linalg.svd(w, compute_uv=False), 1.0, rtol=1e-5)
    if scheme == "keep":
        np.testing.assert_array_equal(w, kernel)
    if scheme == "standard":
        assert abs(w.std() - 0.02) < 0.004
    if scheme == "xavier":
        assert abs(w.std() - np.sqrt(2 / 40)) < 0.05


@pytest.mark.parametrize("n,m,scale", [(256, 256, 1.0), (128, 512, 4.0), (512, 128, 0.5)])
def test_mup_scheme_meets_the_spectral_condition_times_init_scale(n, m, scale):
    """"mup": unit-norm neurons times mup_factor, so ‖W0‖₂ ≈ scale · sqrt(M/N) (within the finite-size
    deviation of the Marchenko–Pastur edge: 10% at these sizes), for both aspect ratios; init_scale
    multiplies every scheme."""
    kernel = jax.random.normal(jax.random.key(1), (n, m))
    w = np.asarray(base_weight("mup", jax.random.key(0), (n, m), kernel=kernel, scale=scale), np.float64)
    assert abs(np.linalg.norm(w, 2) / (scale * np.sqrt(m / n)) - 1.0) < 0.1
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), scale * mup_factor(n, m), rtol=1e-5)
    lay = pj.POETLinear(n, m, config=pj.POETConfig(block_size=32, init="normalized", init_scale=scale),
                        rngs=nnx.Rngs(0), kernel=kernel)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(lay.effective_kernel()), axis=0), scale, rtol=1e-5)


def test_poetize_without_linears_is_an_error():
    with pytest.raises(ValueError, match="no nnx.Linear"):
        pj.poetize(nnx.Sequential(nnx.RMSNorm(4, rngs=nnx.Rngs(0))), pj.POETConfig(block_size=2), rngs=nnx.Rngs(0))
