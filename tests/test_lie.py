"""poetjax.lie, the generator levers: Newton–Schulz on skew blocks against a float64 reference, the carried
moment against a dense re-expression in the layer's coordinates, alternating sides and the angle cap, the
orthogonal equivalence (spectrum) through merges with every lever on, and a carried moment across a
checkpoint and resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax.cayley import block_layout, mask_generators, packed_from_skew, skew_from_packed
from poetjax.lie import (CarriedLieMomentumState, LieMomentumState, newton_schulz_skew, orthogonalize_packed,
                         orthogonalize_tree, transport_side)
from poetjax.perms import input_permutation
from poetjax.testing import assert_close

from test_optim import _train_step as _step
from test_poetize import Tiny


def _random_skew(key, j, k):
    a = jax.random.normal(key, (j, k, k))
    return a - jnp.swapaxes(a, -1, -2)


def _ns_float64(q, steps=5, coeffs=(3.4445, -4.7750, 2.0315)):
    a, b, c = coeffs
    x = np.asarray(q, np.float64)
    x = x / np.linalg.norm(x, axis=(-2, -1), keepdims=True)
    for _ in range(steps):
        g = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * g + c * g @ g) @ x
    return x


def test_newton_schulz_keeps_skew_blocks_skew_and_matches_float64():
    q = _random_skew(jax.random.key(0), 3, 16)
    o = np.asarray(newton_schulz_skew(q), np.float64)
    np.testing.assert_array_equal(o, -np.swapaxes(o, -1, -2))
    assert_close(o, _ns_float64(q), jnp.float32, "value", what="NS blocks vs float64")
    s = np.linalg.svd(o, compute_uv=False)
    # Muon's quintic pushes the singular values towards [0.7, 1.2] (the smallest ones need more steps)
    assert s.max() < 1.3 and np.median(s) > 0.7, s


def test_orthogonalize_packed_keeps_a_ragged_tail_masked():
    layout = block_layout(40, 16)  # blocks of 16, 16 and a tail of 8
    theta = mask_generators(jax.random.normal(jax.random.key(1), (layout.num_blocks, layout.num_packed)), layout)
    out = orthogonalize_packed(theta)
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(theta) == 0], 0.0)
    q = np.asarray(skew_from_packed(out))
    np.testing.assert_allclose(q, -np.swapaxes(q, -1, -2), atol=0)


def test_orthogonalize_tree_batches_by_block_size_and_matches_each_leaf():
    """Leaves of two block sizes, one stacked (L, J, P) and one with a masked ragged tail: one batch per size
    gives each leaf what ``orthogonalize_packed`` gives it alone."""
    keys = jax.random.split(jax.random.key(3), 4)
    tail = block_layout(40, 16)
    tree = {"a": jax.random.normal(keys[0], (2, 120)),            # K = 16
            "b": {"stacked": jax.random.normal(keys[1], (3, 2, 28))},  # K = 8, three layers
            "c": mask_generators(jax.random.normal(keys[2], (tail.num_blocks, tail.num_packed)), tail),
            "d": jax.random.normal(keys[3], (1, 28))}
    out = orthogonalize_tree(tree)
    assert jax.tree.structure(out) == jax.tree.structure(tree)
    for got, leaf in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
        assert got.shape == leaf.shape
        alone = orthogonalize_packed(leaf.reshape(-1, leaf.shape[-1])).reshape(leaf.shape)
        assert_close(got, alone, jnp.float32, "same")
    np.testing.assert_array_equal(np.asarray(out["c"])[np.asarray(tree["c"]) == 0], 0.0)


def _dense_transport(m, old_pos2coord, new_pos2coord, k, width):
    """The reference: the moment as a full (D, D) skew matrix in the layer's coordinates, read in new blocks."""
    q = np.asarray(skew_from_packed(m), np.float64)
    full = np.zeros((width, width))
    for pos_a, c_a in enumerate(np.asarray(old_pos2coord)):
        for pos_b, c_b in enumerate(np.asarray(old_pos2coord)):
            if c_a < width and c_b < width and pos_a // k == pos_b // k:
                full[c_a, c_b] = q[pos_a // k, pos_a % k, pos_b % k]
    new = np.zeros_like(q)
    for pos_a, c_a in enumerate(np.asarray(new_pos2coord)):
        for pos_b, c_b in enumerate(np.asarray(new_pos2coord)):
            if pos_a // k == pos_b // k and c_a < width and c_b < width:
                new[pos_a // k, pos_a % k, pos_b % k] = full[c_a, c_b]
    return np.asarray(packed_from_skew(jnp.asarray(new)))


@pytest.mark.parametrize("width,k", [(40, 16), (48, 8)])
def test_a_carried_moment_is_re_expressed_in_the_new_blocks(width, k):
    layout = block_layout(width, k)
    m = mask_generators(jax.random.normal(jax.random.key(2), (layout.num_blocks, layout.num_packed)), layout)
    old, old_inv = input_permutation(jax.random.key(3), width, layout.padded, k)
    new, _ = input_permutation(jax.random.key(4), width, layout.padded, k)
    same = transport_side(m, old, old_inv, old)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(m))  # unchanged permutations: the identity
    got = transport_side(m, old, old_inv, new)
    np.testing.assert_allclose(np.asarray(got), _dense_transport(m, old, new, k, width), rtol=0, atol=1e-7)
    assert 0 < np.count_nonzero(np.asarray(got)) < np.count_nonzero(np.asarray(m))  # a projection: some survive


def _levers_setup(**levers):
    model = Tiny(rngs=nnx.Rngs(0))
    cfg = pj.POETConfig(block_size=8, merge_interval=4, cayley="exact", init="mup", init_scale=4.0)
    pj.poetize(model, cfg, rngs=nnx.Rngs(1))
    tx = pj.poet_optimizer(cfg, 1e-2, poet_learning_rate=0.05, **levers)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def _thetas(model):
    return {(i, s): np.asarray(getattr(b.up, f"theta_{s}")[...]) for i, b in enumerate(model.blocks)
            for s in ("in", "out")}


def test_alternating_sides_and_the_angle_cap():
    cap = 1e-3
    model, opt = _levers_setup(generator_update="ns", alternate=True, max_angle=cap)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 9)))
    t0 = _thetas(model)
    _step(model, opt, tokens)
    t1 = _thetas(model)
    _step(model, opt, tokens)
    t2 = _thetas(model)
    for key in t0:
        moved1, moved2 = np.any(t1[key] != t0[key]), np.any(t2[key] != t1[key])
        assert (moved1, moved2) == ((True, False) if key[1] == "in" else (False, True)), key
        for a, b in ((t0[key], t1[key]), (t1[key], t2[key])):
            dq = np.asarray(skew_from_packed(jnp.asarray(b - a)), np.float64)
            assert (2 * np.linalg.norm(dq, axis=(-2, -1)) <= cap * (1 + 1e-5)).all()


@pytest.mark.parametrize("carry", [False, True])
def test_every_lever_keeps_the_spectrum_through_merges(carry):
    """μP init ×4, NS updates, alternating sides, an angle cap, with and without the carried momentum: the
    effective kernels keep W0's singular values through three merges (exact Cayley), while they move."""
    model, opt = _levers_setup(generator_update="ns", carry_moment=carry, alternate=True, max_angle=0.2)
    layers = [lay for _, lay in pj.poet_layers(model)]
    s0 = [np.linalg.svd(np.asarray(lay.effective_kernel(), np.float64), compute_uv=False) for lay in layers]
    k0 = [np.asarray(lay.effective_kernel()) for lay in layers]
    rng = np.random.default_rng(1)
    merge = nnx.jit(pj.merge_and_reset)
    for step in range(1, 13):
        _step(model, opt, jnp.asarray(rng.integers(0, 11, (4, 9))))
        if step % 4 == 0:
            merge(model, opt, jax.random.key(step))
            kinds = (LieMomentumState, CarriedLieMomentumState)
            moments = [st for st in jax.tree.leaves(nnx.as_pure(opt.opt_state), is_leaf=lambda x: isinstance(x, kinds))
                       if isinstance(st, kinds)]
            assert len(moments) == 1
            norm = sum(float(jnp.sum(jnp.abs(m))) for st in moments for m in jax.tree.leaves(st.mu))
            assert (norm > 0) == carry  # zeroed at the merge unless carried
    for lay, s, k in zip(layers, s0, k0):
        kernel = np.asarray(lay.effective_kernel(), np.float64)
        np.testing.assert_allclose(np.linalg.svd(kernel, compute_uv=False), s, rtol=1e-4)
        assert np.linalg.norm(kernel - k) > 0.01 * np.linalg.norm(k)  # it trained


def test_a_carried_moment_survives_checkpoint_and_resume_bit_exactly(tmp_path, data_cache):
    from poetjax.checkpoint import Checkpointer
    from poetjax.train.loop import run

    from _runs import RESUME, state_like, tiny

    # merges every 10 steps: the moment carried at step 10 is checkpointed at 15, the one of step 20 comes after
    levers = ["optimizer.generator_update=ns", "poet.cayley=exact", "optimizer.carry_moment=true",
              "optimizer.alternate_sides=true", "optimizer.poet_lr=0.02", *RESUME, "train.steps=20",
              "train.eval_interval=0"]
    full = run(tiny(tmp_path, data_cache, "name=full", *levers))
    run(tiny(tmp_path, data_cache, "name=split", "train.stop_after=15", *levers))
    second = run(tiny(tmp_path, data_cache, "name=split", *levers))
    assert {s: second.losses[s] for s in range(16, 21)} == {s: full.losses[s] for s in range(16, 21)}
    like = state_like(tiny(tmp_path, data_cache, *levers))
    s_full, _ = Checkpointer(full.checkpoint_dir).restore(20, like)
    s_split, _ = Checkpointer(second.checkpoint_dir).restore(20, like)
    jax.tree.map(np.testing.assert_array_equal, s_full, s_split)
    carried = [st for st in jax.tree.leaves(s_full.opt_state, is_leaf=lambda x: isinstance(x, CarriedLieMomentumState))
               if isinstance(st, CarriedLieMomentumState)]
    assert carried and any(np.any(np.asarray(m) != 0) for st in carried for m in jax.tree.leaves(st.mu))


def test_lever_errors_name_the_value():
    cfg = pj.POETConfig(block_size=8)
    with pytest.raises(ValueError, match="generator_update must be one of .*got generator_update='sgd'"):
        pj.poet_optimizer(cfg, 1e-3, generator_update="sgd")
    with pytest.raises(ValueError, match="carry_moment keeps the momentum of generator_update='momentum' or 'ns'"):
        pj.poet_optimizer(cfg, 1e-3, carry_moment=True)
    with pytest.raises(ValueError, match="max_angle must be > 0"):
        pj.lie.clip_block_angle(0.0)


def test_newton_schulz_needs_the_exact_map():
    """ns with the Cayley–Neumann series lets merges move the spectrum (RESULTS.md): refused with a one-line
    error naming both settings; the exact map, or another generator rule with the series, is accepted."""
    from poetjax.run_config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"optimizer.generator_update=ns needs poet.cayley=exact "
                                          r"\(got poet.cayley='neumann'\)"):
        load_config(None, ["optimizer.name=poet", "optimizer.generator_update=ns"])
    assert load_config(None, ["optimizer.name=poet", "optimizer.generator_update=ns",
                              "poet.cayley=exact"]).poet.cayley == "exact"
    assert load_config(None, ["optimizer.name=poet", "optimizer.generator_update=momentum"]).poet.cayley == "neumann"
    load_config(None, ["optimizer.name=adamw", "optimizer.generator_update=ns"])  # no POET layers: nothing to keep
