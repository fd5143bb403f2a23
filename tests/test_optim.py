"""poet_optimizer: the POETAdamW rule, what it updates, the merge-step reset, and that training works."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import poetjax as pj
from poetjax.optim import param_labels, poet_adamw
from poetjax.testing import assert_close

from test_poetize import Tiny


def test_poet_adamw_matches_reference_rule():
    lr, b1, b2, eps, wd = 0.1, 0.9, 0.999, 1e-6, 0.05
    p = np.array([1.0, -2.0, 3.0])
    tx = poet_adamw(lr, b1, b2, eps, wd)
    params = jnp.asarray(p, jnp.float32)
    state = tx.init(params)
    m = v = np.zeros(3)
    rng = np.random.default_rng(0)
    for t in range(1, 4):
        g = rng.standard_normal(3)
        upd, state = tx.update(jnp.asarray(g, jnp.float32), state, params)
        params = optax.apply_updates(params, upd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        p = p - step * m / (np.sqrt(v) + eps)  # eps before bias correction
        p = p - lr * wd * p  # decoupled decay of the updated parameter
        np.testing.assert_allclose(np.asarray(params), p, rtol=1e-5)


def test_labels_by_type_and_by_name():
    model = Tiny(rngs=nnx.Rngs(0))
    pj.poetize(model, pj.POETConfig(block_size=8), rngs=nnx.Rngs(1))
    st = nnx.state(model, nnx.Param)
    typed = param_labels(st)  # Variables (what tx.init sees)
    pure = param_labels(nnx.as_pure(st))  # arrays (what tx.update sees)
    assert jax.tree.leaves(typed) == jax.tree.leaves(pure)
    flat = {jax.tree_util.keystr(p): l for p, l in jax.tree_util.tree_flatten_with_path(pure)[0]}
    assert {l for k, l in flat.items() if "theta" in k} == {"poet"}
    assert {l for k, l in flat.items() if "theta" not in k} == {"base"}


# POET-BS (the default) and POET-FS at b = 1/2: the same training loop must work for both.
VARIANTS = {"bs": {}, "fs": {"family": "fs", "block_size": 0.5}}


def _setup(merge_interval=4, lr=1e-2, **fields):
    model = Tiny(rngs=nnx.Rngs(0))
    cfg = pj.POETConfig(**{"block_size": 8, **fields}, merge_interval=merge_interval)
    pj.poetize(model, cfg, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(model, pj.poet_optimizer(cfg, lr, weight_decay=0.01, max_grad_norm=1.0), wrt=nnx.Param)
    return model, opt, cfg


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@nnx.jit
def _train_step(model, opt, tokens):
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    opt.update(model, grads)
    return loss


def test_update_touches_only_generators_and_ordinary_params():
    model, opt, _ = _setup()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 9)))
    frozen0 = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Any(pj.FrozenWeight, pj.Permutation))))
    params0 = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    _train_step(model, opt, tokens)
    frozen1 = nnx.to_pure_dict(nnx.state(model, nnx.Any(pj.FrozenWeight, pj.Permutation)))
    params1 = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, frozen0, jax.tree.map(np.asarray, frozen1))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), params0, params1)
    assert changed["blocks"][0]["up"]["theta_in"] and changed["embed"]["embedding"] and changed["lm_head"]["kernel"]


def _poet_adam_states(opt):
    pure = nnx.as_pure(opt.opt_state)
    return jax.tree.leaves(pure, is_leaf=lambda x: isinstance(x, optax.transforms.PartitionState))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_generator_moments_zero_right_after_merge_step(variant):
    model, opt, cfg = _setup(**VARIANTS[variant])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 9)))
    merge_step = nnx.jit(pj.merge_and_reset)
    for step in range(1, cfg.merge_interval + 1):
        _train_step(model, opt, tokens)
    part = next(n for n in _poet_adam_states(opt) if isinstance(n, optax.transforms.PartitionState))
    gen = part.inner_states["poet"].inner_state
    assert float(jnp.abs(gen.mu["blocks"][0]["up"]["theta_in"]).sum()) > 0 and int(gen.count) == 4
    base_mu_before = np.asarray(part.inner_states["base"].inner_state.mu["lm_head"]["kernel"])
    merge_step(model, opt, jax.random.key(0))
    part = next(n for n in _poet_adam_states(opt) if isinstance(n, optax.transforms.PartitionState))
    gen = part.inner_states["poet"].inner_state
    assert all(float(jnp.abs(l).sum()) == 0 for l in jax.tree.leaves((gen.mu, gen.nu)))
    assert int(gen.count) == 0 and int(gen.step) == 4  # bias correction restarts; the lr schedule does not
    np.testing.assert_array_equal(np.asarray(part.inner_states["base"].inner_state.mu["lm_head"]["kernel"]),
                                  base_mu_before)
    assert not np.any(np.asarray(model.blocks[0].up.theta_in[...]))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tiny_model_training_loss_halves(variant):
    # A learnable task: the next token is (token + 1) mod 11.
    model, opt, cfg = _setup(merge_interval=25, lr=2e-2, **VARIANTS[variant])
    rng = np.random.default_rng(0)
    merge_step = nnx.jit(pj.merge_and_reset)
    losses = []
    for step in range(1, 201):
        start = rng.integers(0, 11, (16, 1))
        tokens = jnp.asarray((start + np.arange(12)) % 11)
        losses.append(float(_train_step(model, opt, tokens)))
        if step % cfg.merge_interval == 0:
            merge_step(model, opt, jax.random.fold_in(jax.random.key(0), step))
    assert np.mean(losses[-10:]) <= 0.5 * np.mean(losses[:5]), (losses[:5], losses[-10:])


def test_clip_schedule_matches_spec():
    sched = pj.poet_clip_schedule(1.0, merge_interval=20, warmup_steps=100)
    expected = {0: 1.0, 5: 1.0, 19: 1.0, 20: 0.1, 21: 0.19, 29: 0.91, 30: 1.0, 40: 0.1, 100: 0.1, 101: 1.0,
                120: 1.0}
    for s, v in expected.items():
        assert abs(float(sched(s)) - v) < 1e-6, (s, float(sched(s)), v)


def test_warmup_cosine_schedule():
    sched = pj.warmup_cosine_schedule(1.0, total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert float(sched(0)) == 0.0 and abs(float(sched(5)) - 0.5) < 1e-6
    assert abs(float(sched(10)) - 1.0) < 1e-6 and abs(float(sched(60)) - 0.55) < 1e-6
    assert abs(float(sched(110)) - 0.1) < 1e-6


def test_reset_needs_a_partition_state():
    with pytest.raises(ValueError, match="partition"):
        pj.reset_generator_state(optax.adam(1e-3).init({"a": jnp.zeros(2)}))


def test_scheduled_clip_matches_global_norm_clipping_and_keeps_dtypes():
    from poetjax.optim import clip_by_global_norm_schedule
    grads = {"a": jnp.asarray([3.0, 4.0], jnp.bfloat16), "b": jnp.asarray([[12.0]], jnp.float32)}  # norm 13
    tx = clip_by_global_norm_schedule(lambda s: jnp.where(s == 0, 1.0, 100.0))
    st = tx.init(grads)
    out, st = tx.update(grads, st)
    assert out["a"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out["b"]), [[12.0 / 13.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["a"], np.float32), [3 / 13, 4 / 13], rtol=1e-2)
    out2, _ = tx.update(grads, st)  # second step: threshold 100 > 13 → unchanged
    np.testing.assert_array_equal(np.asarray(out2["b"]), np.asarray(grads["b"]))


def test_poet_optimizer_with_bf16_params_and_clipping():
    model = Tiny(rngs=nnx.Rngs(0))
    cfg = pj.POETConfig(block_size=8)
    pj.poetize(model, cfg, rngs=nnx.Rngs(1))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda p: p if p.ndim == 2 and p.shape[1] > 20 else p.astype(jnp.bfloat16), params)
    tx = pj.poet_optimizer(cfg, 1e-3, 0.1, max_grad_norm=0.5)
    st = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    upd, _ = jax.jit(tx.update)(grads, st, params)
    for u, p in zip(jax.tree.leaves(upd), jax.tree.leaves(params)):
        assert u.dtype == p.dtype


def test_generator_moments_in_bfloat16_only_for_generators():
    """generator_mu_dtype stores the generators' two moments in bf16 (half their optimizer state), leaves
    every other group's moments alone, and the first update equals the float32 one within bf16 rounding
    of the moments (m₁ = (1−β1)g, v₁ = (1−β2)g²: the update is ±lr·g/|g| up to that rounding)."""
    model = Tiny(rngs=nnx.Rngs(0))
    cfg = pj.POETConfig(block_size=8)
    pj.poetize(model, cfg, rngs=nnx.Rngs(1))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape, p.dtype), params)
    labels = param_labels(params)
    outs = {}
    for name, dt in (("f32", None), ("bf16", jnp.bfloat16)):
        tx = pj.poet_optimizer(cfg, 1e-3, generator_mu_dtype=dt)
        st = tx.init(params)
        states = _poet_adam_states_of(st)
        for label, s in states.items():
            want = jnp.bfloat16 if (dt is not None and label == "poet") else jnp.float32
            assert {x.dtype for x in jax.tree.leaves((s.mu, s.nu))} == {jnp.dtype(want)}, (name, label)
        outs[name] = jax.jit(tx.update)(grads, st, params)[0]
    for u32, u16, lab in zip(jax.tree.leaves(outs["f32"]), jax.tree.leaves(outs["bf16"]), jax.tree.leaves(labels)):
        if lab == "poet":
            assert_close(u16, u32, jnp.bfloat16, what="generator update with bf16 moments")
        else:
            np.testing.assert_array_equal(np.asarray(u16), np.asarray(u32))


def _poet_adam_states_of(opt_state) -> dict:
    from poetjax.optim import PoetAdamState
    part = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.transforms.PartitionState))
    part = next(p for p in part if isinstance(p, optax.transforms.PartitionState))
    return {label: next(x for x in jax.tree.leaves(s, is_leaf=lambda x: isinstance(x, PoetAdamState))
                        if isinstance(x, PoetAdamState)) for label, s in part.inner_states.items()}


def test_generator_moment_dtype_is_validated():
    from poetjax.run_config import OptimizerConfig
    with pytest.raises(ValueError, match="generator_moment_dtype must be one of .*got generator_moment_dtype='fp8'"):
        OptimizerConfig(generator_moment_dtype="fp8")
