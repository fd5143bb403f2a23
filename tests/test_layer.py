"""POETLinear: factored path vs dense effective weight, gradients, variants, no scatter, input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax import ops
from poetjax.testing import assert_close, poet_config, rel_err, tolerance

from _reference import dense_effective, grads_against_dense

SHAPES = [(32, 48, 16), (64, 64, 32), (40, 50, 16), (24, 17, 8), (48, 20, 20)]  # (N, M, K); some ragged


def _layer(n, m, k, *, use_bias=False, variant="fast", seed=0, scale=0.1, kernel=None, init="keep"):
    cfg = poet_config(variant, block_size=k, init=init)
    if kernel is None:
        kernel = jax.random.normal(jax.random.key(seed + 100), (n, m)) / np.sqrt(n)
    lay = pj.POETLinear(n, m, config=cfg, use_bias=use_bias, rngs=nnx.Rngs(seed), kernel=kernel)
    lay.theta_in[...] = scale * jax.random.normal(jax.random.key(seed + 1), lay.theta_in.shape)
    lay.theta_out[...] = scale * jax.random.normal(jax.random.key(seed + 2), lay.theta_out.shape)
    if use_bias:
        lay.bias[...] = jax.random.normal(jax.random.key(seed + 3), (m,))
    return lay, kernel


@pytest.mark.parametrize("n,m,k", SHAPES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_forward_equals_dense_effective_weight(n, m, k, use_bias):
    lay, w0 = _layer(n, m, k, use_bias=use_bias)
    x = jax.random.normal(jax.random.key(7), (2, 3, 5, n))  # (B, S, N)-style batch dims
    dense = dense_effective(lay.theta_in[...], lay.theta_out[...], w0, lay.perm_in[...], lay.perm_out[...], k)
    b = lay.bias[...] if use_bias else 0.0
    y = lay(x)
    assert y.shape == (2, 3, 5, m)
    assert_close(y, x @ lay.effective_kernel() + b, jnp.float32, what="layer vs x @ effective_kernel")
    assert_close(lay.effective_kernel(), dense, jnp.float32, what="effective_kernel vs dense R·W0·P")
    assert_close(y, x @ dense + b, jnp.float32, what="layer vs dense")


@pytest.mark.parametrize("n,m,k", SHAPES)
def test_gradients_match_dense_and_variants_agree(n, m, k):
    grads = {}
    for variant in ("fast", "mem"):
        lay, w0 = _layer(n, m, k, variant=variant)
        x = jax.random.normal(jax.random.key(8), (4, 6, n))
        g = jax.random.normal(jax.random.key(9), (4, 6, m))
        gf = grads_against_dense(lay, lambda gens: dense_effective(gens["theta_in"][...], gens["theta_out"][...], w0,
                                                                   lay.perm_in[...], lay.perm_out[...], k),
                                 x, g, what=variant)
        grads[variant] = gf
    for a, b in zip(grads["fast"], grads["mem"]):
        assert_close(a, b, jnp.float32, "same", what="fast vs mem gradient")


def test_zero_generators_is_plain_linear():
    lay, w0 = _layer(32, 48, 16, scale=0.0)
    x = jax.random.normal(jax.random.key(0), (5, 32))
    assert_close(lay(x), x @ w0, jnp.float32)


def test_mem_variant_saves_no_activation_sized_residual():
    n, m, k, t = 64, 64, 16, 512
    lay, _ = _layer(n, m, k)
    r_in, r_out = lay.rotation_blocks()
    x = jax.random.normal(jax.random.key(0), (t, n))

    def residual_sizes(variant):
        plan = ops.resolve_plan(pj.ExecConfig(impl="xla"), memory=variant, block_size=k, tokens=t, n=n, m=m)
        f = lambda x, a, b: ops.poet_x_linear(x, lay.w0[...], a, b, lay.perms, plan)
        _, vjp = jax.vjp(f, x, r_in, r_out)
        return sorted(int(np.prod(l.shape)) for l in jax.tree.leaves(vjp) if hasattr(l, "shape"))

    big = t * n
    fast, mem = residual_sizes("fast"), residual_sizes("mem")
    # fast keeps u and h (and more); mem keeps only x among token-sized arrays
    assert sum(s >= big for s in fast) >= 2, fast
    assert sum(s >= big for s in mem) == 1, mem


@pytest.mark.parametrize("variant,k", [("fast", 16), ("mem", 16), ("fs", 0.5)])
def test_backward_has_no_scatter(variant, k):
    lay, _ = _layer(40, 50, k, variant=variant)
    graphdef, gens, rest = nnx.split(lay, pj.Generator, ...)
    x = jnp.ones((3, 40))

    def loss(gens, x):
        return jnp.sum(nnx.merge(graphdef, gens, rest)(x) ** 2)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(gens, x))
    assert "gather" in jaxpr  # the permutations are there …
    assert "scatter" not in jaxpr  # … and neither they nor the skew packing backprop through a scatter


@pytest.mark.parametrize("variant,k", [("fast", 32), ("fs", 0.5)])
def test_bf16_close_to_fp32(variant, k):
    lay, w0 = _layer(64, 96, k, variant=variant)
    x = jax.random.normal(jax.random.key(0), (16, 64))
    ref = lay(x)
    lay16 = pj.POETLinear(64, 96, config=lay.config, rngs=nnx.Rngs(0), kernel=w0, dtype=jnp.bfloat16,
                          param_dtype=jnp.bfloat16)
    lay16.theta_in[...] = lay.theta_in[...]
    lay16.theta_out[...] = lay.theta_out[...]
    y = lay16(x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and lay16.theta_in[...].dtype == jnp.float32
    assert rel_err(y.astype(jnp.float32), ref) < tolerance(jnp.bfloat16)


def test_wrong_input_size_is_a_clear_error():
    lay, _ = _layer(32, 48, 16)
    with pytest.raises(ValueError, match=r"\(\.\.\., 32\).*\(4, 31\)"):
        lay(jnp.ones((4, 31)))


def test_generator_param_count():
    lay, _ = _layer(40, 50, 16)  # in: 16,16,8   out: 16,16,16,2
    p16, p8, p2 = 120, 28, 1
    assert lay.num_generator_params == (2 * p16 + p8) + (3 * p16 + p2)


@pytest.mark.parametrize("impl,body,c,k", [("xla", "xla", 4, 16), ("pallas", "pallas_features", 4, 16),
                                           ("pallas", "pallas_tokens", 16, 32)])
def test_chunked_permutations_layer_matches_dense_and_survives_a_merge(impl, body, c, k):
    """perm_chunk=c: the layer still equals x @ W_eff of the dense reference (forward and gradients), on
    every path — with c=16 the plan runs the token-major Pallas kernels, which index one run per tile —
    and a merge (which redraws chunked permutations) leaves its output unchanged."""
    n, m = 64, 48
    cfg = poet_config(block_size=k, init="keep", perm_chunk=c, impl=impl, cayley_precision="highest")
    w0 = jax.random.normal(jax.random.key(100), (n, m)) / np.sqrt(n)
    lay = pj.POETLinear(n, m, config=cfg, rngs=nnx.Rngs(0), kernel=w0, precision=jax.lax.Precision.HIGHEST)
    lay.theta_in[...] = 0.1 * jax.random.normal(jax.random.key(1), lay.theta_in.shape)
    lay.theta_out[...] = 0.1 * jax.random.normal(jax.random.key(2), lay.theta_out.shape)
    assert lay.plan(24).body == body
    runs = np.asarray(lay.perm_in[...]).reshape(-1, c)
    assert (np.diff(runs, axis=1) == 1).all()
    x = jax.random.normal(jax.random.key(8), (4, 6, n))
    g = jax.random.normal(jax.random.key(9), (4, 6, m))
    grads_against_dense(lay, lambda gens: dense_effective(gens["theta_in"][...], gens["theta_out"][...], w0,
                                                          lay.perm_in[...], lay.perm_out[...], k),
                        x, g, what=f"chunked {body}")
    y0 = lay(x)
    dense = dense_effective(lay.theta_in[...], lay.theta_out[...], w0, lay.perm_in[...], lay.perm_out[...], k)
    assert_close(y0, x @ dense, jnp.float32, what=f"chunked {body} forward vs dense")
    before = np.asarray(lay.perm_in[...])
    pj.merge(nnx.Sequential(lay), jax.random.key(42))
    assert not np.array_equal(np.asarray(lay.perm_in[...]), before)
    assert (np.diff(np.asarray(lay.perm_in[...]).reshape(-1, c), axis=1) == 1).all()
    assert_close(lay(x), y0, jnp.float32, what="output across a merge with chunked permutations")


def test_perm_chunk_from_the_run_config_reaches_every_layer(tmp_path):
    import os

    from poetjax.run_config import load_config
    from poetjax.train.steps import build_model

    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.yaml")
    model = build_model(load_config(tiny, ["poet.perm_chunk=4"]))
    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, pj.POETLinear)]
    assert layers
    for lay in layers:
        assert lay.config.perm_chunk == 4
        perm = np.asarray(lay.perm_in[...])
        assert (np.diff(perm.reshape(*perm.shape[:-1], -1, 4), axis=-1) == 1).all()
    with pytest.raises(ValueError, match="perm_chunk must be a positive int"):
        load_config(tiny, ["poet.perm_chunk=0"])


def test_perm_chunk_errors_name_the_values():
    with pytest.raises(ValueError, match="perm_chunk must be a positive int, got perm_chunk=0"):
        pj.POETConfig(perm_chunk=0)
    with pytest.raises(ValueError, match="perm_chunk=4 is only defined for family='bs'"):
        pj.POETConfig(perm_chunk=4, family="fs", block_size=0.5)
    with pytest.raises(ValueError, match="perm_chunk=8 does not divide out_features=20"):
        pj.POETLinear(32, 20, config=pj.POETConfig(block_size=16, perm_chunk=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="perm_chunk=8 does not divide block_size=12"):
        pj.POETLinear(48, 48, config=pj.POETConfig(block_size=12, perm_chunk=8), rngs=nnx.Rngs(0))


def test_layer_draws_its_keys_as_the_rngs_stream_does():
    """POETLinear draws W0's and the permutations' keys itself (layers._next_key, not flax's update): the
    same keys and the same advanced count as ``rngs.params()``, eagerly and under a trace, so that a layer
    built after it draws what it would otherwise."""
    from poetjax.layers import _next_key

    def draws(rngs, own: bool):
        keys = [(_next_key(rngs) if own else rngs.params()) for _ in range(3)]
        return jnp.stack([jax.random.key_data(k) for k in keys]), rngs.params.count[...]

    for run in (lambda f: f(), lambda f: jax.jit(f)()):
        (k_own, c_own), (k_flax, c_flax) = (run(lambda own=own: draws(nnx.Rngs(params=5), own))
                                            for own in (True, False))
        np.testing.assert_array_equal(k_own, k_flax)
        assert int(c_own) == int(c_flax) == 3
    rngs = nnx.Rngs(params=5)
    pj.POETLinear(16, 24, config=poet_config("fast", block_size=8), rngs=rngs)
    assert int(rngs.params.count[...]) == 2  # one key for W0, one for the permutations
