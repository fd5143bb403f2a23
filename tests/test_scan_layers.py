"""Stacked layers (``model.scan_layers``): the scanned model computes, trains, merges, diagnoses and
exports exactly like its unstacked twin (same numbers through ``stack_layers``), and compiles one layer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import poetjax as pj
from poetjax.diagnostics import PhaseProbe, model_diagnostics
from poetjax.export import export_plain
from poetjax.models import Llama, LlamaConfig, layer_view, stack_layers, unstack_layers
from poetjax.surgery import build_poetized
from poetjax.testing import assert_close, poet_config
from poetjax.train.steps import init_state, make_merge_step, make_train_step

from _reference import randomize_generators

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_heads=4, num_layers=3, max_seq_len=16)


def _poet_model(variant="fast", scan=False, remat="none"):
    cfg = LlamaConfig(**{**CFG.__dict__, "remat": remat})
    model = Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    pj.poetize(model, poet_config(block_size=8, variant=variant, quant_group_size=16),
               rngs=nnx.Rngs(params=jax.random.key(1)))
    randomize_generators(model, 0.2)  # non-trivial rotations
    return stack_layers(model) if scan else model


def _tokens(b=2, t=12, seed=2):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)


def _leaves(model):
    return {str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


@pytest.mark.parametrize("remat", ["none", "full"])
def test_stacked_forward_equals_unrolled(remat):
    model = _poet_model(remat=remat)
    stacked = stack_layers(model)
    assert stacked.cfg.scan_layers and stacked.layers.attn.q_proj.theta_in.shape[0] == CFG.num_layers
    assert stacked.layers.attn.q_proj.w0.shape[0] == CFG.num_layers
    toks = _tokens()
    assert_close(stacked(toks), model(toks), jnp.float32, "same", what="scanned vs unrolled logits")
    back = unstack_layers(stacked)
    assert not back.cfg.scan_layers and len(back.layers) == CFG.num_layers
    for (pa, a), (pb, b) in zip(_leaves(back).items(), _leaves(model).items()):
        assert pa == pb and np.array_equal(a, b), pa


def test_stacked_model_built_directly_matches_its_layer_slices():
    cfg = LlamaConfig(**{**CFG.__dict__, "scan_layers": True})
    model = Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    assert model.layers.mlp.up_proj.kernel.shape == (3, 32, 48)
    # layers are different draws, and the forward runs each slice in order
    k = np.asarray(model.layers.mlp.up_proj.kernel[...])
    assert not np.allclose(k[0], k[1])
    toks = _tokens()
    assert_close(model(toks), unstack_layers(model)(toks), jnp.float32, "same", what="scanned vs its view")


def test_poetize_converts_stacked_linears_slice_by_slice():
    cfg = LlamaConfig(**{**CFG.__dict__, "scan_layers": True})
    model = Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    toks = _tokens()
    y0 = model(toks)
    pj.poetize(model, pj.POETConfig(block_size=8, init="keep"), rngs=nnx.Rngs(params=jax.random.key(1)))
    q = model.layers.attn.q_proj
    assert isinstance(q, pj.POETLinear) and q.theta_in.shape == (3, 4, 28) and q.perm_in.shape == (3, 32)
    assert not np.array_equal(np.asarray(q.perm_in[0]), np.asarray(q.perm_in[1]))  # own permutations per layer
    # init="keep": the converted model computes the same function
    assert_close(model(toks), y0, jnp.float32, what="poetize keeps the function (stacked)")


def test_merge_of_stacked_model_equals_merge_of_unstacked():
    model = _poet_model()
    stacked = stack_layers(model)
    key = jax.random.key(7)
    toks = _tokens()
    y0 = model(toks)
    pj.merge(model, key)
    pj.merge(stacked, key)
    assert_close(stacked(toks), y0, jnp.float32, what="stacked output across merge")
    assert not np.any(np.asarray(stacked.layers.mlp.down_proj.theta_out[...]))
    for (pa, a), (pb, b) in zip(_leaves(unstack_layers(stacked)).items(), _leaves(model).items()):
        assert pa == pb
        if a.dtype.kind in "iu":
            np.testing.assert_array_equal(a, b, err_msg=pa)  # the same permutations were drawn
        else:
            assert_close(a, b, jnp.float32, "same", what=pa)


def test_build_poetized_stacked_equals_unstacked_xq():
    pcfg = poet_config(block_size=8, variant="xq", quant_group_size=16)
    key = jax.random.key(5)
    flat = build_poetized(lambda: Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(0))), pcfg, key=key)
    scfg = LlamaConfig(**{**CFG.__dict__, "scan_layers": True})
    stacked = build_poetized(lambda: Llama(scfg, rngs=nnx.Rngs(params=jax.random.key(0))), pcfg, key=key)
    assert stacked.layers.mlp.up_proj.w0_codes.shape == (3, 32, 48)
    a = _leaves(unstack_layers(stacked))
    b = _leaves(flat)
    for name in b:
        if "w0_" in name or "perm" in name:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_train_and_merge_steps_match_unstacked():
    """Three optimizer steps, a merge, two more: losses and final state equal for both layouts."""
    tx = pj.poet_optimizer(pj.POETConfig(block_size=8), 1e-2)
    results = []
    for scan in (False, True):
        model = _poet_model(variant="mem", scan=scan, remat="full")
        graphdef, state = init_state(model, tx, jax.random.key(3))
        step, merge = make_train_step(graphdef, tx), make_merge_step(graphdef)
        losses = []
        for i in range(5):
            state, m = step(state, _tokens(4, 13, seed=i))
            losses.append(float(m["loss"]))
            if i == 2:
                state = merge(state)
        final = nnx.merge(graphdef, state.params, state.frozen)
        results.append((losses, _leaves(layer_view(final)), state.probe))
    (l0, s0, p0), (l1, s1, p1) = results
    assert_close(np.array(l1), np.array(l0), jnp.float32, "same", what="losses")
    assert list(s0) == list(s1)
    for name in s0:
        if s0[name].dtype.kind in "iu":
            np.testing.assert_array_equal(s1[name], s0[name], err_msg=name)
        else:
            # parameters after Adam steps: gradient rounding (scan vs unrolled sums) passes through Adam's
            # normalization, so these compare at the gradients' tolerance
            assert_close(s1[name], s0[name], jnp.float32, "grad", what=name)
    assert sorted(p0) == sorted(p1)  # phase probes keyed by per-layer paths in both layouts
    for k in p0:
        assert_close(p1[k].w_in, p0[k].w_in, jnp.float32, what=f"probe {k}")


def test_diagnostics_and_export_of_stacked_model_use_per_layer_paths():
    model = _poet_model()
    stacked = stack_layers(model)
    probes = PhaseProbe.init(model, jax.random.key(0))
    d0 = model_diagnostics(model, probes=probes)
    d1 = model_diagnostics(stacked, probes=probes)
    assert sorted(d0) == sorted(d1) and "layers/2/mlp/up_proj" in d1
    for k in d0:
        for name in d0[k]:
            assert_close(d1[k][name], d0[k][name], jnp.float32, "value", what=f"{k} {name}")
    plain = export_plain(stacked)
    assert isinstance(plain.layers[1].attn.o_proj, nnx.Linear)
    toks = _tokens()
    assert_close(plain(toks), model(toks), jnp.float32, what="exported stacked model")


def test_stacked_model_compiles_one_layer():
    """The scanned step's HLO holds one layer's dots, the unrolled one L layers' (what cuts compile time)."""
    tx = optax.adam(1e-2)
    counts = {}
    for scan in (False, True):
        model = _poet_model(scan=scan)
        graphdef, state = init_state(model, tx, jax.random.key(3))
        step = make_train_step(graphdef, tx, donate=False)
        hlo = step.lower(state, _tokens(2, 13)).as_text()
        counts[scan] = hlo.count("dot_general")
    assert counts[True] * 2 < counts[False], counts


def test_scan_layers_must_be_bool_and_layers_must_match():
    with pytest.raises(ValueError, match="scan_layers"):
        LlamaConfig(scan_layers="yes")
    model = _poet_model()
    model.layers[1].attn.q_proj = nnx.Linear(32, 32, rngs=nnx.Rngs(0))  # layer 1 now differs
    with pytest.raises(ValueError, match="layer 1 differs"):
        stack_layers(model)


def test_stacked_init_and_poetize_draw_the_unstacked_numbers():
    """scan_layers is a layout choice only: building stacked and poetizing stacked give exactly the arrays
    of the unstacked model, stacked (same keys per layer)."""
    scfg = LlamaConfig(**{**CFG.__dict__, "scan_layers": True})
    pcfg = pj.POETConfig(block_size=8)
    flat = Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(0)))
    direct = Llama(scfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    for model in (flat, direct):
        pj.poetize(model, pcfg, rngs=nnx.Rngs(params=jax.random.key(1)))
    a, b = _leaves(stack_layers(flat)), _leaves(direct)
    assert list(a) == list(b)
    for name in a:
        if a[name].dtype.kind in "iu":  # the same permutations
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)
        else:  # the same draws; a vmapped normalization may round in another order
            assert_close(b[name], a[name], jnp.float32, "same", what=name)


@pytest.mark.parametrize("scan", [False, True])
def test_build_model_of_stacked_poet_runs_never_builds_the_float_model(monkeypatch, scan):
    """Stacked POET models are built layer by layer (build_poetized): no float copy of every kernel next to
    the converted W0 (a 48 GiB build peak for Llama-8B POET-X mem); list models still poetize a float model."""
    from poetjax.run_config import load_config
    from poetjax.train import steps

    calls = []
    real = steps.poetize
    monkeypatch.setattr(steps, "poetize", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    cfg = load_config("configs/tiny.yaml", [f"model.scan_layers={str(scan).lower()}", "model.num_layers=2"])
    model = steps.build_model(cfg)
    assert calls == ([] if scan else [1])
    layers = pj.poet_layers(model)
    assert len(layers) == 7 * (1 if scan else 2)
    lay = layers[0][1]
    assert lay.w0.shape[0] == (2 if scan else lay.w0.shape[0]) and np.all(np.isfinite(np.asarray(lay.w0[...])))
    # "normalized" init: every neuron (a column of the true kernel) of W0 has unit norm, in every layer slice
    w = np.asarray(lay.base_weight()) if not scan else np.asarray(lay.w0[...][1], np.float32)
    norms = np.linalg.norm(w, axis=0)[: lay.out_features]
    np.testing.assert_allclose(norms[norms > 0], 1.0, rtol=1e-5)
