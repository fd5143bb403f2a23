"""POET-XQ: uint8 group quantization of W0, the quantized layer, its residuals, merges and the streamed build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax import ops, quant
from poetjax.models.llama import Llama, LlamaConfig
from poetjax.surgery import build_poetized
from poetjax.testing import assert_close, rel_err, tolerance, poet_config

EPS32 = 2.0 ** -24  # unit roundoff of float32


def _weight(key, shape, pad_rows=0):
    w = 0.05 * jax.random.normal(key, shape, jnp.float32)
    return w.at[shape[0] - pad_rows:].set(0.0) if pad_rows else w


def _step_bound(w, qw):
    """|ŵ − w| ≤ s/2 per entry, plus the float32 roundoff of w/s (≤ 255·ε steps) and of (q − z)·s (≤ ε|ŵ|)."""
    s = np.asarray(quant.quantization_step(qw), np.float64)
    return s * (0.5 + 256 * EPS32) + 2 * EPS32 * np.abs(np.asarray(w, np.float64))


@pytest.mark.parametrize("shape,group,pad", [((512, 96), 256, 0), ((192, 40), 64, 17), ((64, 16), 16, 0)])
def test_dequantize_is_within_half_a_step(shape, group, pad):
    w = _weight(jax.random.key(0), shape, pad)
    qw = quant.quantize(w, group)
    assert qw.codes.dtype == jnp.uint8 and qw.zero.dtype == jnp.uint8 and qw.scale.dtype == jnp.float32
    assert qw.codes.shape == shape and qw.scale.shape == (shape[0] // group, shape[1]) and qw.group_size == group
    err = np.abs(np.asarray(quant.dequantize(qw), np.float64) - np.asarray(w, np.float64))
    assert np.all(err <= _step_bound(w, qw))
    s = np.asarray(quant.quantization_step(qw))
    assert np.max(err / s) > 0.45  # the bound is attained: rounding really happens at step s
    # asymmetric: the group's min and max land on the ends of the code range [0, 255]
    q = np.asarray(qw.codes).reshape(shape[0] // group, group, shape[1])
    real = np.asarray(w).reshape(q.shape).any(axis=1)  # groups that are not all padding
    assert np.all(q.min(axis=1)[real] == 0) and np.all(q.max(axis=1)[real] == 255)
    # s = (max − min)/255 exactly as the spec computes it
    wg = np.asarray(w).reshape(q.shape)
    want = np.maximum(wg.max(axis=1) - wg.min(axis=1), 1e-5) / 255
    np.testing.assert_allclose(np.asarray(qw.scale), want, rtol=4 * EPS32)
    if pad:  # zero padding rows stay exactly zero (q == z)
        assert not np.any(np.asarray(quant.dequantize(qw))[shape[0] - pad:])


def test_constant_groups_use_the_minimum_range():
    # An all-zero group (padding) is exact. A same-signed group cannot hold 0 in its range and clamps at
    # the top code, as in the spec's (and the reference's) formula: ŵ = 255·s; real weights never do this.
    qw = quant.quantize(jnp.concatenate([jnp.zeros((16, 3)), jnp.full((16, 3), 0.25)]), 16)
    np.testing.assert_allclose(np.asarray(qw.scale), 1e-5 / 255, rtol=1e-6)
    w = np.asarray(quant.dequantize(qw))
    assert not np.any(w[:16])
    np.testing.assert_allclose(w[16:], 1e-5, rtol=1e-6)


def test_bad_group_sizes_are_named():
    with pytest.raises(ValueError, match="stored in-dimension 96 .* quant_group_size=64; e.g. quant_group_size=32"):
        quant.quantize(jnp.zeros((96, 8)), 64)
    with pytest.raises(ValueError, match=r"POETLinear\(40→32, block_size=16\).*in-dimension 48.*quant_group_size=256"):
        pj.POETLinear(40, 32, config=poet_config(block_size=16, variant="xq"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="quant_group_size must be a positive int"):
        poet_config(variant="xq", quant_group_size=0)


def _layer(variant, n=80, m=48, k=16, group=16, impl="xla", seed=0):
    cfg = poet_config(block_size=k, variant=variant, quant_group_size=group, impl=impl)
    lay = pj.POETLinear(n, m, config=cfg, rngs=nnx.Rngs(seed))
    keys = jax.random.split(jax.random.key(seed + 1), 2)
    lay.theta_in[...] = 0.05 * jax.random.normal(keys[0], lay.theta_in.shape)
    lay.theta_out[...] = 0.05 * jax.random.normal(keys[1], lay.theta_out.shape)
    return lay


def _loss_and_grads(lay, x, g, dense: bool):
    """Σ g·layer(x) and its gradients in x, θ_in, θ_out; dense: via x @ W_eff(θ) on the dequantized W0."""
    graphdef, params, rest = nnx.split(lay, pj.Generator, ...)

    def loss(x, params):
        layer = nnx.merge(graphdef, params, rest)
        y = x @ layer.effective_kernel() if dense else layer(x)
        return jnp.sum(y * g), y

    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)
    return y, grads[0], grads[1]["theta_in"][...], grads[1]["theta_out"][...]


@pytest.mark.parametrize("variant,impl", [("xq", "xla"), ("xq_mem", "xla"), ("xq", "pallas"), ("xq_mem", "pallas")])
def test_xq_layer_matches_the_dense_formula_on_the_dequantized_weight(variant, impl):
    # N = 80 pads to 80 (5 blocks of 16), M = 48; group 16 → 5 groups per column.
    lay = _layer(variant, impl=impl)
    x = jax.random.normal(jax.random.key(7), (3, 5, 80))
    g = jax.random.normal(jax.random.key(8), (3, 5, 48))
    got = jax.jit(lambda x: _loss_and_grads(lay, x, g, dense=False))(x)
    want = jax.jit(lambda x: _loss_and_grads(lay, x, g, dense=True))(x)
    assert_close(got[0], want[0], jnp.float32, "value", what=f"{variant}/{impl} y")
    for name, a, b in zip(("dx", "dθ_in", "dθ_out"), got[1:], want[1:]):
        assert_close(a, b, jnp.float32, "grad", what=f"{variant}/{impl} {name}")


def test_xq_equals_float_poet_on_the_dequantized_weight_in_bf16():
    """In bf16 the XQ layer computes exactly what the float POET layer computes on Ŵ rounded to bf16."""
    lay = _layer("xq", n=64, m=64, group=32)
    ref = _layer("fast", n=64, m=64, group=32)
    for name in ("perm_in", "perm_in_inv", "perm_out", "perm_out_inv", "theta_in", "theta_out"):
        getattr(ref, name)[...] = getattr(lay, name)[...]
    ref.w0[...] = lay.base_weight(jnp.float32)
    x = jax.random.normal(jax.random.key(3), (9, 64), jnp.bfloat16)
    assert_close(lay(x).astype(jnp.float32), ref(x).astype(jnp.float32), jnp.bfloat16, "same")


@pytest.mark.parametrize("variant", ["xq", "xq_mem"])
def test_no_float_copy_of_the_base_weight_is_saved_for_the_backward(variant):
    lay = _layer(variant, n=64, m=64, group=32)
    graphdef, params, rest = nnx.split(lay, pj.Generator, ...)
    x = jax.random.normal(jax.random.key(1), (4, 64))
    _, vjp = jax.vjp(lambda x, p: nnx.merge(graphdef, p, rest)(x), x, params)
    saved = [(tuple(r.shape), r.dtype) for r in jax.tree.leaves(vjp)]
    assert ((64, 64), jnp.dtype(jnp.uint8)) in saved  # the codes, by reference
    assert not [s for s in saved if s[0] == (64, 64) and jnp.issubdtype(s[1], jnp.floating)], saved
    # control: plain autodiff through x @ dequantize(codes) keeps the float weight
    _, vjp = jax.vjp(lambda a: a @ quant.dequantize(lay.base, a.dtype), x)
    assert ((64, 64), jnp.dtype(jnp.float32)) in [(tuple(r.shape), r.dtype) for r in jax.tree.leaves(vjp)]


def test_merges_requantize_within_half_a_step_and_track_the_float_reference():
    """Every merge changes the layer's function by at most half a (new) quantization step per weight; over
    20 merges the deviation from an unquantized POET layer fed the same rotations grows like a random walk
    of those independent roundings, never beyond it."""
    n = m = 64
    lay = _layer("xq", n=n, m=m, group=32)
    ref = _layer("fast", n=n, m=m, group=32)
    for name in ("perm_in", "perm_in_inv", "perm_out", "perm_out_inv"):
        getattr(ref, name)[...] = getattr(lay, name)[...]
    ref.w0[...] = lay.base_weight(jnp.float32)  # both start from the same (dequantized) weight
    noise_sq = 0.0
    for i in range(20):
        keys = jax.random.split(jax.random.key(100 + i), 3)
        for layer in (lay, ref):
            layer.theta_in[...] = 0.05 * jax.random.normal(keys[0], layer.theta_in.shape)
            layer.theta_out[...] = 0.05 * jax.random.normal(keys[1], layer.theta_out.shape)
        before = lay.effective_kernel()
        lay.merge_and_reinit(keys[2])
        ref.merge_and_reinit(keys[2])
        after = lay.effective_kernel()
        stored = ops.store_base_weight(before, lay.perms)  # the float weight that was just quantized
        qw = lay.base
        step = np.asarray(quant.quantization_step(qw))
        diff = np.abs(np.asarray(ops.store_base_weight(after, lay.perms) - stored))
        assert np.all(diff <= _step_bound(stored, qw)), f"merge {i + 1}"
        noise_sq += float(np.sum(step[:n, :m] ** 2)) / 12  # E‖δ‖² of uniform rounding
        # accumulated: ‖Ŵ_k − W_k‖_F against sqrt(Σ_j E‖δ_j‖²). Orthogonal rotations keep earlier errors' norm;
        # the factor 1.5 covers the sampling spread of a sum of ~4000 squared roundings (≈2 %) and the
        # Neumann series' departure from orthogonality at θ ~ 0.05 (< 1e-4 per merge).
        dev = np.linalg.norm(np.asarray(after - ref.effective_kernel(), np.float64))
        assert dev <= 1.5 * np.sqrt(noise_sq), (i + 1, dev, np.sqrt(noise_sq))
    assert dev >= 0.5 * np.sqrt(noise_sq)  # the errors really are independent roundings, not something smaller


def _tiny_llama(seed=0):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_heads=4, num_layers=2)
    return Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(seed)))


def test_streamed_build_converts_every_projection_and_keeps_the_rest():
    config = poet_config(block_size=16, variant="xq", quant_group_size=64)
    model = build_poetized(_tiny_llama, config, key=jax.random.key(5))
    eager = _tiny_llama()
    layers = pj.poet_layers(model)
    assert len(layers) == 2 * 7 and all(l.config == config for _, l in layers)
    # the unconverted parameters are the model's own initial values (jit vs eager rounding only)
    for get in (lambda m: m.embed.embedding, lambda m: m.lm_head.kernel, lambda m: m.layers[1].input_norm.scale):
        assert_close(get(model)[...], get(eager)[...], jnp.float32, "same")
    # converted layers: W0 is the normalized gaussian (unit columns), as poetize's default init gives
    lay = model.layers[0].mlp.down_proj
    w = np.asarray(lay.base_weight())[np.asarray(lay.perm_in_inv[...])][:, np.asarray(lay.perm_out[...])]
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, atol=0.02)  # up to quantization
    # layers use different keys, and the model runs
    assert not np.array_equal(np.asarray(model.layers[0].attn.q_proj.w0_codes[...]),
                              np.asarray(model.layers[0].attn.k_proj.w0_codes[...]))
    assert model(jnp.zeros((1, 8), jnp.int32)).shape == (1, 8, 128)
