"""The LLaMA model: a float64 numpy reference forward, causality, RoPE, poetize(keep), remat, dtypes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax.models.llama import Llama, LlamaConfig, apply_rope, count_params, llama_param_formula, rope_tables
from poetjax.testing import assert_close


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


CFG = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_heads=4, num_layers=2, max_seq_len=32)


def _tokens(b=2, t=9, vocab=61, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def _reference_logits(model: Llama, tokens: np.ndarray) -> np.ndarray:
    """LLaMA written out in float64 numpy: per-head loops, an explicit causal softmax, and RoPE as a
    complex rotation of the pairs (x_i, x_{i+E/2}) — a different route from the model's rotate-half.
    Query head h reads key/value head h // (H/G) (grouped-query attention); a tied model's output layer
    is the embedding table."""
    cfg = model.cfg
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    e = cfg.head_dim
    group = cfg.num_heads // cfg.kv_heads
    out_kernel = p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]

    def rms(x, g):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * g

    def rope(x, pos):  # x (T, E)
        inv = 1.0 / cfg.rope_theta ** (np.arange(0, e, 2) / e)
        z = (x[:, : e // 2] + 1j * x[:, e // 2:]) * np.exp(1j * pos[:, None] * inv[None, :])
        return np.concatenate([z.real, z.imag], axis=-1)

    out = []
    for seq in np.asarray(tokens):
        t = len(seq)
        pos = np.arange(t, dtype=np.float64)
        x = p["embed"]["embedding"][seq]
        for i in range(cfg.num_layers):
            lp = p["layers"][i]
            h = rms(x, lp["input_norm"]["scale"])
            att = np.zeros_like(x)
            for hd in range(cfg.num_heads):
                sl, kv = slice(hd * e, (hd + 1) * e), slice(hd // group * e, (hd // group + 1) * e)
                q = rope((h @ lp["attn"]["q_proj"]["kernel"])[:, sl], pos)
                k = rope((h @ lp["attn"]["k_proj"]["kernel"])[:, kv], pos)
                v = (h @ lp["attn"]["v_proj"]["kernel"])[:, kv]
                for ti in range(t):
                    s = np.array([q[ti] @ k[si] for si in range(ti + 1)]) / np.sqrt(e)
                    w = np.exp(s - s.max())
                    att[ti, sl] = (w / w.sum()) @ v[: ti + 1]
            x = x + att @ lp["attn"]["o_proj"]["kernel"]
            h = rms(x, lp["post_attn_norm"]["scale"])
            g = h @ lp["mlp"]["gate_proj"]["kernel"]
            x = x + ((g / (1 + np.exp(-g))) * (h @ lp["mlp"]["up_proj"]["kernel"])) @ lp["mlp"]["down_proj"]["kernel"]
        out.append(rms(x, p["norm"]["scale"]) @ out_kernel)
    return np.stack(out)


# grouped-query attention (2 query heads per key/value head, or 4: multi-query) and a tied output layer
GQA_TIED = {"gqa": dict(num_kv_heads=2), "mqa": dict(num_kv_heads=1), "tied": dict(tie_embeddings=True),
            "gqa_tied": dict(num_kv_heads=2, tie_embeddings=True)}


@pytest.mark.parametrize("variant", ["mha", *GQA_TIED])
def test_forward_matches_float64_reference(variant):
    cfg = dataclasses.replace(CFG, **GQA_TIED.get(variant, {}))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    assert count_params(model) == llama_param_formula(cfg)
    # non-trivial norm gains so they are exercised too
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "scale":
            var[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(len(path)), var[...].shape)
    tokens = _tokens()
    assert_close(_logits(model, tokens), _reference_logits(model, tokens), jnp.float32, "value", "llama logits")


def test_init_statistics_and_param_count():
    model = Llama(CFG, rngs=nnx.Rngs(0))
    assert count_params(model) == llama_param_formula(CFG)
    k = np.asarray(model.layers[0].mlp.up_proj.kernel[...])
    assert abs(k.std() - CFG.init_std) < 0.1 * CFG.init_std and abs(k.mean()) < 0.1 * CFG.init_std
    np.testing.assert_array_equal(np.asarray(model.norm.scale[...]), 1.0)


@pytest.mark.parametrize("poet", [False, True])
def test_causality_gradient_to_later_positions_is_exactly_zero(poet):
    model = Llama(CFG, rngs=nnx.Rngs(0))
    if poet:
        pj.poetize(model, pj.POETConfig(block_size=16), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (1, 8, CFG.hidden_size))
    t = 4
    graphdef, state = nnx.split(model)
    jac = jax.jit(jax.jacrev(lambda x: nnx.merge(graphdef, state).forward_embeddings(x)[0, t]))(x)  # (V, 1, T, D)
    jac = np.asarray(jac)
    assert np.all(jac[:, :, t + 1:] == 0.0)  # exactly, not approximately
    assert all(np.abs(jac[:, :, s]).max() > 0 for s in range(t + 1))  # and every earlier position matters


def test_rope_depends_only_on_relative_position():
    e = 32
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, e))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, e))
    cos, sin = rope_tables(jnp.arange(64), e, 10000.0)

    def score(m, n):
        qm = apply_rope(q, cos[m:m + 1], sin[m:m + 1])
        kn = apply_rope(k, cos[n:n + 1], sin[n:n + 1])
        return float(jnp.sum(qm * kn))

    for m, n in [(5, 2), (9, 9), (3, 7)]:
        for shift in (1, 17, 40):
            assert_close(score(m + shift, n + shift), score(m, n), jnp.float32, "value", f"q·k at {m},{n} +{shift}")
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # it does depend on the offset
    qm = apply_rope(q, cos[7:8], sin[7:8])
    assert_close(jnp.linalg.norm(qm), jnp.linalg.norm(q), jnp.float32, "value", "rotation keeps the norm")
    np.testing.assert_array_equal(np.asarray(apply_rope(q, cos[:1], sin[:1])), np.asarray(q))  # position 0: identity


@pytest.mark.parametrize("block_size,variant", [(16, "mha"), (32, "mha"), (16, "gqa_tied")])  # 32 divides neither 48 nor 80
def test_poetize_keep_leaves_logits_unchanged(block_size, variant):
    cfg = dataclasses.replace(CFG, **GQA_TIED.get(variant, {}))
    model = Llama(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens()
    before = _logits(model, tokens)
    pj.poetize(model, pj.POETConfig(block_size=block_size, init="keep"), rngs=nnx.Rngs(1))
    converted = [p for p, _ in pj.poet_layers(model)]
    assert len(converted) == 7 * CFG.num_layers and not any("lm_head" in map(str, p) for p in converted)
    assert isinstance(model.lm_head, nnx.Linear) if not cfg.tie_embeddings else not hasattr(model, "lm_head")
    assert_close(_logits(model, tokens), before, jnp.float32, "same", "logits after poetize(keep)")


@pytest.mark.parametrize("policy", ["dots_saveable"])
def test_remat_changes_neither_loss_nor_gradients(policy):
    tokens = _tokens()
    loss = lambda m: jnp.mean(m(tokens) ** 2)
    plain = Llama(CFG, rngs=nnx.Rngs(0))
    remat = Llama(LlamaConfig(**{**CFG.__dict__, "remat": policy}), rngs=nnx.Rngs(0))
    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(plain)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(remat)
    assert_close(l1, l0, jnp.float32, "same", "loss")
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        assert_close(a, b, jnp.float32, "same", "gradient")


def test_bf16_compute_keeps_fp32_storage():
    cfg16 = LlamaConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
    model16 = Llama(cfg16, rngs=nnx.Rngs(0))
    model32 = Llama(CFG, rngs=nnx.Rngs(0))
    tokens = _tokens()
    out16 = _logits(model16, tokens)
    assert out16.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model16, nnx.Param))} == {jnp.dtype(jnp.float32)}
    assert_close(out16.astype(jnp.float32), _logits(model32, tokens), jnp.bfloat16, "value", "bf16 logits")
    pj.poetize(model16, pj.POETConfig(block_size=16), rngs=nnx.Rngs(1))
    assert _logits(model16, tokens).dtype == jnp.bfloat16
    assert model16.layers[0].attn.q_proj.theta_in[...].dtype == jnp.float32  # generators stay fp32


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="num_heads=5"):
        LlamaConfig(hidden_size=48, num_heads=5)
    with pytest.raises(ValueError, match="remat"):
        LlamaConfig(remat="sometimes")
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        LlamaConfig(hidden_size=48, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="init_from='runs/x'"):
        LlamaConfig(init_from="runs/x")
    with pytest.raises(ValueError, match="max_seq_len=32"):
        Llama(CFG, rngs=nnx.Rngs(0))(_tokens(t=33))


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_the_embedding_gradient_is_the_count_weighted_sum_of_its_rows_cotangents(param_dtype):
    """embedding_lookup: the rows of the table in its dtype, and a gradient in that dtype that sums every
    occurrence's cotangent into its row (against a float64 add.at reference), with frequent tokens repeated
    many times as on real text; the model's error for float tokens."""
    from poetjax.models.llama import embedding_lookup

    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((40, 16)), param_dtype)
    tokens = jnp.asarray(np.where(rng.random((4, 64)) < 0.5, 3, rng.integers(0, 40, (4, 64))), jnp.int32)
    g = rng.standard_normal((4, 64, 16))
    rows, vjp = jax.vjp(lambda t: embedding_lookup(t, tokens), table)
    np.testing.assert_array_equal(np.asarray(rows, np.float64), np.asarray(table, np.float64)[np.asarray(tokens)])
    (grad,) = vjp(jnp.asarray(g, param_dtype))
    assert grad.dtype == param_dtype
    expected = np.zeros((40, 16))
    rows_g = np.asarray(jnp.asarray(g, param_dtype), np.float64).reshape(-1, 16)
    np.add.at(expected, np.asarray(tokens).reshape(-1), rows_g)
    assert_close(grad, expected, param_dtype, "grad", "embedding gradient")
    with pytest.raises(ValueError, match="tokens must be integers"):
        Llama(CFG, rngs=nnx.Rngs(0))(jnp.ones((1, 4), jnp.float32))
