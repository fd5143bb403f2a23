"""Diagnostics vs numpy/float64, spectrum preservation, phase probing, and plain-model export."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax import diagnostics as dg
from poetjax.cayley import neumann_orthogonality_bound, skew_from_packed
from poetjax.export import export_plain, load_weights, save_weights
from poetjax.testing import assert_close

from test_layer import _layer
from test_poetize import Tiny


def _np_entropy(s):
    p = s ** 2 / np.sum(s ** 2)
    return -np.sum(p * np.log(p)) / np.log(len(s))


@pytest.mark.parametrize("shape", [(3, 24, 16), (2, 16, 40)])
def test_gram_singular_values_match_a_float64_svd(shape):
    """The Gram form (eigenvalues of the smaller KᵀK or KKᵀ) gives the singular values of tall and wide
    kernels, descending; well-conditioned here, so the squared condition number stays inside float32."""
    k = np.random.default_rng(1).standard_normal(shape)
    s = dg.gram_singular_values(jnp.asarray(k, jnp.float32))
    assert s.shape == shape[:-2] + (min(shape[-2:]),)
    assert_close(s, np.linalg.svd(k, compute_uv=False), jnp.float32)


def test_logged_spectra_take_the_svd_on_a_cpu_and_the_gram_form_on_a_gpu():
    """The choice is made per lowering platform, so a CPU never runs the Gram path and a GPU never the SVD."""
    import re

    from pallas_kernels._common import lower_for_gpu

    x = jax.ShapeDtypeStruct((3, 24, 16), jnp.float32)
    calls = lambda txt: set(re.findall(r"custom_call @(\w+)", txt))
    cpu = calls(jax.jit(dg._logged_singular_values).trace(x).lower(lowering_platforms=("cpu",)).as_text())
    gpu = calls(lower_for_gpu(dg._logged_singular_values, x))
    assert any("gesdd" in c for c in cpu) and not any("syevd" in c for c in cpu), cpu
    assert any("syevd" in c for c in gpu) and not any("gesvd" in c or "gesdd" in c for c in gpu), gpu


def test_singular_values_entropy_norm_vs_numpy():
    k = np.random.default_rng(0).standard_normal((3, 24, 16))
    s_ref = np.linalg.svd(k, compute_uv=False)
    s = dg.singular_values(jnp.asarray(k, jnp.float32))
    assert_close(s, s_ref, jnp.float32)
    assert_close(dg.svd_entropy(s), np.array([_np_entropy(x) for x in s_ref]), jnp.float32)
    assert_close(dg.spectral_norm(jnp.asarray(k, jnp.float32)), s_ref[:, 0], jnp.float32)
    assert abs(float(dg.svd_entropy(jnp.ones(8))) - 1.0) < 1e-6  # flat spectrum
    assert abs(float(dg.svd_entropy(jnp.array([1.0, 0, 0, 0])))) < 1e-6  # rank one


def _dense_rotation(layer, side):
    if side == "in":
        return np.asarray(dg.rotate_input_side(layer, jnp.eye(layer.in_features)), np.float64)
    return np.asarray(dg.rotate_output_side(layer, jnp.eye(layer.out_features)), np.float64)


def test_orthogonality_error_vs_dense():
    lay, _ = _layer(40, 50, 16, scale=0.3)
    e_in, e_out = dg.orthogonality_errors(nnx.Sequential(lay))["layers/0"]
    for e, side, d in ((e_in, "in", 40), (e_out, "out", 50)):
        r = _dense_rotation(lay, side)
        ref = np.linalg.norm(r @ r.T - np.eye(d)) / np.sqrt(d)
        assert ref > 1e-3 and abs(float(e) - ref) / ref < 1e-4
    # the dense rotations are the layer's: x·R·W0·P == layer(x)
    w0 = np.asarray(lay.w0[...])[np.asarray(lay.perm_in_inv[...])][:, np.asarray(lay.perm_out[...])]
    x = np.random.default_rng(1).standard_normal((3, 40))
    assert_close(lay(jnp.asarray(x, jnp.float32)),
                 x @ _dense_rotation(lay, "in") @ w0 @ _dense_rotation(lay, "out"), jnp.float32)


def test_exact_cayley_spectrum_equals_w0_and_neumann_within_bound():
    for cayley in ("exact", "neumann"):
        cfg = pj.POETConfig(block_size=16, cayley=cayley, init="normalized")
        lay = pj.POETLinear(48, 32, config=cfg, rngs=nnx.Rngs(0))
        s0 = dg.singular_values(lay.effective_kernel())
        lay.theta_in[...] = 0.05 * jax.random.normal(jax.random.key(1), lay.theta_in.shape)
        lay.theta_out[...] = 0.05 * jax.random.normal(jax.random.key(2), lay.theta_out.shape)
        drift = float(dg.spectral_drift(s0, dg.singular_values(lay.effective_kernel())))
        if cayley == "exact":
            assert drift < 1e-5
        else:
            qn = max(float(jnp.linalg.norm(q, 2)) for t in (lay.theta_in[...], lay.theta_out[...])
                     for q in skew_from_packed(t))
            e = neumann_orthogonality_bound(qn)
            # σ(R W P) ∈ σ(W)·[(1−e)^{1/2}, (1+e)^{1/2}]² → relative drift ≤ e (+ fp32 rounding)
            assert 1e-7 < drift <= e + 1e-5, (drift, e)


def test_phase_probe_tracks_accumulated_rotation_across_merges():
    lay, _ = _layer(32, 48, 16, scale=0.05)
    model = nnx.Sequential(lay)
    probes = dg.PhaseProbe.init(model, jax.random.key(0))
    v_in, v_out = np.asarray(probes["layers/0"].v_in), np.asarray(probes["layers/0"].v_out)
    r_total, p_total = np.eye(32), np.eye(48)
    for i in range(3):
        r_cur, p_cur = _dense_rotation(lay, "in"), _dense_rotation(lay, "out")
        cos_in, cos_out = dg.PhaseProbe.cosines(probes, model)["layers/0"]
        # x ↦ x·R_cur·R_k⋯R_1  and  x ↦ x·P_1⋯P_k·P_cur
        assert abs(float(cos_in) - v_in @ (r_cur @ r_total) @ v_in) < 1e-5
        assert abs(float(cos_out) - v_out @ (p_total @ p_cur) @ v_out) < 1e-5
        probes = dg.PhaseProbe.advance(probes, model)
        r_total, p_total = r_cur @ r_total, p_total @ p_cur
        pj.merge(model, jax.random.key(10 + i))
        lay.theta_in[...] = 0.05 * jax.random.normal(jax.random.key(20 + i), lay.theta_in.shape)
        lay.theta_out[...] = 0.05 * jax.random.normal(jax.random.key(30 + i), lay.theta_out.shape)
    # ‖Q‖ < 1 keeps the Neumann rotations near-orthogonal, so the cosine is a real cosine that moved
    assert -1.0 < float(cos_in) < 0.999 and -1.0 < float(cos_out) < 0.999


def test_phase_probes_drawn_in_numpy_are_the_traced_draw():
    """``init_numpy`` (the trainer's fresh state, on the host) gives ``init``'s probes as numpy arrays: the
    same numbers up to rounding, unit vectors, each carried image a copy of its probe."""
    model = pj.poetize(Tiny(rngs=nnx.Rngs(0)), pj.POETConfig(block_size=8), rngs=nnx.Rngs(1))
    traced = jax.jit(lambda k: dg.PhaseProbe.init(model, k))(jax.random.key(4))
    host = dg.PhaseProbe.init_numpy(model, jax.random.key(4))
    assert set(host) == set(traced) and len(host) == 4
    for name, p in host.items():
        for field in p._fields:
            x = getattr(p, field)
            assert isinstance(x, np.ndarray) and x.dtype == np.float32
            assert_close(x, getattr(traced[name], field), jnp.float32, "same", what=f"{name}.{field}")
        assert_close(np.linalg.norm(p.v_in), 1.0, jnp.float32, "same", what=name)
        assert p.w_in is not p.v_in and np.array_equal(p.w_in, p.v_in)
    firsts = [p.v_in[0] for p in host.values()]
    assert len(set(firsts)) == len(firsts)  # every layer draws its own


def test_spectrum_stats_on_plain_and_poet_models():
    plain = Tiny(rngs=nnx.Rngs(0))
    stats = dg.spectrum_stats(plain)
    assert set(stats) == {"blocks/0/up", "blocks/0/down", "blocks/1/up", "blocks/1/down", "lm_head"}
    poet = pj.poetize(Tiny(rngs=nnx.Rngs(0)), pj.POETConfig(block_size=8, init="keep"), rngs=nnx.Rngs(1))
    stats_p = dg.spectrum_stats(poet)
    for k in stats:
        assert_close(stats_p[k]["singular_values"], stats[k]["singular_values"], jnp.float32)


@pytest.mark.parametrize("ext", [".npz", ".safetensors"])
def test_export_round_trip_logits(tmp_path, ext):
    model = pj.poetize(Tiny(rngs=nnx.Rngs(0)), pj.POETConfig(block_size=8), rngs=nnx.Rngs(1))
    for _, layer in pj.poet_layers(model):
        layer.theta_in[...] = 0.1 * jax.random.normal(jax.random.key(0), layer.theta_in.shape)
        layer.theta_out[...] = 0.1 * jax.random.normal(jax.random.key(1), layer.theta_out.shape)
    tokens = jnp.arange(16).reshape(2, 8) % 11
    ref = model(tokens)
    plain = export_plain(model)
    assert not pj.poet_layers(plain) and pj.poet_layers(model)  # the POET model is left intact
    assert float(jnp.max(jnp.abs(plain(tokens) - ref))) <= 1e-5
    path = save_weights(model, str(tmp_path / f"w{ext}"))
    fresh = load_weights(Tiny(rngs=nnx.Rngs(123)), path)
    assert float(jnp.max(jnp.abs(fresh(tokens) - ref))) <= 1e-5
    with pytest.raises(ValueError, match="do not match"):
        load_weights(nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0))), path)


# ----------------------------------------------------------------------------------------------------
# model_diagnostics, summaries and the trainer's jitted diagnostics step

def test_spectral_drift_modes_vs_numpy():
    rng = np.random.default_rng(3)
    s_ref = np.sort(rng.uniform(1e-3, 2.0, 12))[::-1]
    s = s_ref * (1 + rng.uniform(-0.01, 0.01, 12))
    # the reference in float64 from the float32-rounded inputs: the drift is a difference of nearby values
    s_ref, s = (x.astype(np.float32).astype(np.float64) for x in (s_ref, s))
    each = np.max(np.abs(s - s_ref) / s_ref)
    rel_max = np.max(np.abs(s - s_ref)) / s_ref[0]
    assert_close(dg.spectral_drift(jnp.asarray(s_ref, jnp.float32), jnp.asarray(s, jnp.float32)), each, jnp.float32)
    assert_close(dg.spectral_drift(jnp.asarray(s_ref, jnp.float32), jnp.asarray(s, jnp.float32), relative_to="max"),
                 rel_max, jnp.float32)
    with pytest.raises(ValueError, match="relative_to=.*'sum'"):
        dg.spectral_drift(jnp.ones(3), jnp.ones(3), relative_to="sum")


def test_sampled_ranks_spread_over_the_spectrum():
    r = dg.sampled_ranks(64, 16)
    assert len(r) == 16 and r[0] == 0 and r[-1] == 63 and np.all(np.diff(r) > 0)
    assert list(dg.sampled_ranks(5, 16)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="n > 0 and k > 0"):
        dg.sampled_ranks(0, 4)


def _w0_true(layer):
    """The unpermuted (N, M) base of a POET layer, in float64."""
    w = np.asarray(layer.w0[...], np.float64)
    return w[np.asarray(layer.perm_in_inv[...])][:, np.asarray(layer.perm_out[...])]


def _np_stats(w, s_ref=None):
    s = np.linalg.svd(w, compute_uv=False)
    out = {"singular_values": s, "svd_entropy": _np_entropy(s), "spectral_norm": s[0]}
    if s_ref is not None:
        out["drift"] = np.max(np.abs(s - s_ref)) / s_ref[0]
    return out


def _random_generators(model, seed, scale=0.05):
    for i, (_, layer) in enumerate(pj.poet_layers(model)):
        k1, k2 = jax.random.split(jax.random.key(1000 * seed + i))
        layer.theta_in[...] = scale * jax.random.normal(k1, layer.theta_in.shape)
        layer.theta_out[...] = scale * jax.random.normal(k2, layer.theta_out.shape)


def test_model_diagnostics_vs_float64_dense_matrices():
    """Every logged quantity recomputed in float64 from dense R, W0, P (whose product is the layer, see
    test_orthogonality_error_vs_dense), across a merge, on a model with POET and plain layers."""
    model = pj.poetize(Tiny(rngs=nnx.Rngs(0)), pj.POETConfig(block_size=8), rngs=nnx.Rngs(1))
    s0 = {k: np.linalg.svd(np.asarray(v, np.float64), compute_uv=False) for k, v in dg.linear_kernels(model).items()}
    probes = dg.PhaseProbe.init(model, jax.random.key(5))
    totals = {n: (np.eye(l.in_features), np.eye(l.out_features)) for n, l in
              ((dg.path_name(p), l) for p, l in pj.poet_layers(model))}
    _random_generators(model, 1)
    for n, l in ((dg.path_name(p), l) for p, l in pj.poet_layers(model)):  # what advance folds in
        totals[n] = (_dense_rotation(l, "in") @ totals[n][0], totals[n][1] @ _dense_rotation(l, "out"))
    probes = dg.PhaseProbe.advance(probes, model)
    pj.merge(model, jax.random.key(2))
    _random_generators(model, 2)
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * 1.5  # a plain layer whose spectrum moved

    out = dg.model_diagnostics(model, probes=probes, s_ref={k: jnp.asarray(v, jnp.float32) for k, v in s0.items()},
                               num_sv=5)
    assert set(out) == {"blocks/0/up", "blocks/0/down", "blocks/1/up", "blocks/1/down", "lm_head"}
    ref = _np_stats(np.asarray(model.lm_head.kernel[...], np.float64), s0["lm_head"])
    assert_close(out["lm_head"]["drift"], 0.5, jnp.float32)  # every σ scaled by 1.5
    assert "orth_in" not in out["lm_head"] and "cos_in" not in out["lm_head"]
    for key in ("singular_values", "svd_entropy", "spectral_norm", "drift"):
        assert_close(out["lm_head"][key], ref[key], jnp.float32, what=key)
    for path, layer in pj.poet_layers(model):
        name = dg.path_name(path)
        d = out[name]
        r, p, w0 = _dense_rotation(layer, "in"), _dense_rotation(layer, "out"), _w0_true(layer)
        ref = _np_stats(r @ w0 @ p, s0[name])
        for key in ("singular_values", "svd_entropy", "spectral_norm"):
            assert_close(d[key], ref[key], jnp.float32, what=f"{name} {key}")
        assert_close(d["sv"], ref["singular_values"][dg.sampled_ranks(len(ref["singular_values"]), 5)],
                     jnp.float32, what="sampled σ")
        # drifts are differences of nearby σ: compare with an absolute margin of fp32 SVD rounding
        s_w0 = np.linalg.svd(w0, compute_uv=False)
        assert abs(float(d["drift"]) - ref["drift"]) < 1e-5 and ref["drift"] > 1e-4
        merge_drift = np.max(np.abs(ref["singular_values"] - s_w0)) / s_w0[0]
        assert abs(float(d["merge_drift"]) - merge_drift) < 1e-5 and merge_drift > 1e-6
        for key, rot, dim in (("orth_in", r, layer.in_features), ("orth_out", p, layer.out_features)):
            e = np.linalg.norm(rot @ rot.T - np.eye(dim)) / np.sqrt(dim)
            assert abs(float(d[key]) - e) <= 1e-4 * e, (key, float(d[key]), e)
        v_in, v_out = np.asarray(probes[name].v_in, np.float64), np.asarray(probes[name].v_out, np.float64)
        r_tot, p_tot = totals[name]
        assert abs(float(d["cos_in"]) - v_in @ (r @ r_tot) @ v_in) < 1e-5
        assert abs(float(d["cos_out"]) - v_out @ (p_tot @ p) @ v_out) < 1e-5


def test_fs_rotations_and_probe_vs_dense_subset_rotation():
    from poetjax.fs import index_subsets

    lay, _ = _layer(24, 40, 0.5, variant="fs", scale=0.1)
    g_in, g_out = (np.asarray(g[0], np.float64) for g in lay.rotation_blocks())
    s_in, s_out = (np.asarray(s) for s in index_subsets(lay.perms, g_in.shape[0], g_out.shape[0]))
    dense = []
    for g, s, dim in ((g_in, s_in, 24), (g_out, s_out, 40)):
        sel = np.eye(dim)[:, s]  # D(S)
        dense.append(np.eye(dim) + sel @ (g - np.eye(len(s))) @ sel.T)
    r, p = dense
    assert_close(_dense_rotation(lay, "in"), r, jnp.float32)
    assert_close(_dense_rotation(lay, "out"), p, jnp.float32)
    model = nnx.Sequential(lay)
    probes = dg.PhaseProbe.init(model, jax.random.key(0))
    cos_in, cos_out = dg.PhaseProbe.cosines(probes, model)["layers/0"]
    v_in, v_out = np.asarray(probes["layers/0"].v_in), np.asarray(probes["layers/0"].v_out)
    assert abs(float(cos_in) - v_in @ r @ v_in) < 1e-5 and abs(float(cos_out) - v_out @ p @ v_out) < 1e-5
    d = dg.model_diagnostics(model)["layers/0"]
    assert_close(d["singular_values"], np.linalg.svd(r @ _w0_true(lay) @ p, compute_uv=False), jnp.float32)


def test_summarize_and_json_record():
    import json

    model = pj.poetize(Tiny(rngs=nnx.Rngs(0)), pj.POETConfig(block_size=8), rngs=nnx.Rngs(1))
    _random_generators(model, 3)
    diag = dg.model_diagnostics(model, probes=dg.PhaseProbe.init(model, jax.random.key(1)))
    rec = json.loads(json.dumps(dg.diagnostics_record(diag, exclude=("lm_head",))))
    layers, groups = rec["layers"], rec["groups"]
    assert set(groups) == {"up", "down", "lm_head", "all"}
    blocks = [k for k in layers if k != "lm_head"]
    for g, members in (("up", ["blocks/0/up", "blocks/1/up"]), ("all", blocks)):
        for key in dg.SUMMARY_MEAN:
            assert groups[g][key] == pytest.approx(np.mean([float(diag[m][key]) for m in members]), rel=1e-6)
        for key in ("merge_drift", "orth_in", "orth_out"):
            assert groups[g][key] == pytest.approx(np.max([float(diag[m][key]) for m in members]), rel=1e-6)
    assert set(groups["lm_head"]) == {"svd_entropy", "spectral_norm"}  # a plain layer, no reference given
    assert len(layers["blocks/0/up"]["sv"]) == 16 and "singular_values" not in layers["blocks/0/up"]


def test_trainer_diagnostics_step_compiles_once_and_probes_follow_merges():
    from _runs import TINY

    from poetjax import distributed as dist
    from poetjax.train import sharded
    from poetjax.run_config import load_config
    from poetjax.train import steps as core
    from poetjax.train.optimizers import make_optimizer

    cfg = load_config(TINY, ["model.num_layers=1"])
    tx = make_optimizer(cfg)
    # built as the trainer builds it: on the (one-device) mesh, so the programs' outputs carry its sharding
    graphdef, state, _ = sharded.init_train_state(cfg, tx, dist.mesh_from_config(cfg.mesh))
    diag = core.make_diagnostics_step(graphdef)
    s_ref, d_ref = core.reference_spectra(diag, state)
    merge = core.make_merge_step(graphdef, donate=False)
    d0 = diag(state, s_ref)
    # the step-0 record that comes with the reference spectra is the model's diagnostics, drift 0 included
    for path, d in jax.device_get(d0).items():
        assert set(d) == set(d_ref[path])
        for k, v in d.items():
            np.testing.assert_array_equal(d_ref[path][k], v, err_msg=f"{path} {k}")  # same program, same inputs

    # what training does to the generators, without compiling a train step (the test suite's time)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state.params)
    leaves = [jax.device_put(0.05 * jax.random.normal(jax.random.key(i), x.shape, x.dtype), x.sharding)
              if "theta" in jax.tree_util.keystr(p) else x for i, (p, x) in enumerate(leaves)]
    state = state._replace(params=jax.tree_util.tree_unflatten(treedef, leaves))
    before = diag(state, s_ref)
    merged = merge(state)
    after = diag(merged, s_ref)
    assert diag.program._cache_size() == 1  # reference spectra, step 0, before and after the merge: one program
    q = "layers/0/attn/q_proj"
    assert float(d0[q]["drift"]) == 0 and float(d0[q]["cos_in"]) == pytest.approx(1.0, abs=1e-6)
    assert float(before[q]["orth_in"]) > 0 and float(after[q]["orth_in"]) == 0  # rotations folded into W0
    assert float(before[q]["cos_in"]) < 1 - 1e-6
    for name in before:
        if "lm_head" in name:
            continue
        # the merge moves the rotations into W0 and the probes: the accumulated rotation is unchanged
        for key in ("cos_in", "cos_out", "spectral_norm"):
            assert abs(float(after[name][key]) - float(before[name][key])) < 1e-5, (name, key)
    # the merged state's probes are what PhaseProbe.advance gives on the pre-merge model
    ref = dg.PhaseProbe.advance(state.probe, nnx.merge(graphdef, state.params, state.frozen))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), merged.probe, ref)


def test_diagnostics_interval_is_validated():
    from poetjax.run_config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"diagnostics_interval must be >= 0 .*-5"):
        load_config(None, ["logging.diagnostics_interval=-5"])
    with pytest.raises(ConfigError, match=r"diagnostics_budget must be in \[0, 1\) .*1.5"):
        load_config(None, ["logging.diagnostics_budget=1.5"])


# ----------------------------------------------------------------------------------------------------
# export of the real (tiny) LLaMA, in the library and through the CLI

def test_export_poet_llama_loads_into_plain_llama_with_identical_logits(tmp_path):
    from _runs import TINY

    from poetjax.models.llama import Llama
    from poetjax.run_config import load_config
    from poetjax.train import steps as core

    cfg = load_config(TINY, [])
    model = core.build_model(cfg)  # the POET LLaMA of the trainer
    _random_generators(model, 4)
    pj.merge(model, jax.random.key(3))  # W0 ≠ its initial value and fresh permutations
    _random_generators(model, 5)
    tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, cfg.model.vocab_size)
    ref = model(tokens).astype(jnp.float32)
    plain_tree = nnx.to_pure_dict(nnx.state(Llama(cfg.model, rngs=nnx.Rngs(1)), nnx.Param))
    exported = nnx.to_pure_dict(nnx.state(export_plain(model), nnx.Param))
    assert jax.tree.structure(exported) == jax.tree.structure(plain_tree)
    assert jax.tree.map(jnp.shape, exported) == jax.tree.map(jnp.shape, plain_tree)
    fresh = load_weights(Llama(cfg.model, rngs=nnx.Rngs(7)), save_weights(model, str(tmp_path / "llama.npz")))
    out = fresh(tokens).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(ref))) > 0.1  # logits of a size where an absolute 1e-5 means something
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-5
    assert_close(out, ref, jnp.float32)


def test_export_cli_writes_the_trained_checkpoint_as_a_plain_llama(uninterrupted, tmp_path, data_cache, capsys):
    from _runs import RESUME, TINY, state_like, tiny

    from poetjax.checkpoint import Checkpointer
    from poetjax.models.llama import Llama
    from poetjax.train import steps as core
    from poetjax.train.cli import main as cli_main

    out_dir = os.path.dirname(uninterrupted.run_dir)
    base = ["--config", TINY, f"out_dir={out_dir}", f"data.cache_dir={data_cache}", "name=full", *RESUME]
    path = str(tmp_path / "exported.npz")
    assert cli_main([*base, "--export", path]) == 0
    printed = capsys.readouterr().out
    assert "exported step 30" in printed and path in printed
    cfg = tiny(out_dir, data_cache, "name=full", *RESUME)
    state, _ = Checkpointer(uninterrupted.checkpoint_dir).restore(30, state_like(cfg))
    graphdef = core.split_model(core.build_model(cfg))[0]
    trained = nnx.merge(graphdef, state.params, state.frozen)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.model.vocab_size)
    plain = load_weights(Llama(cfg.model, rngs=nnx.Rngs(0)), path)
    assert float(jnp.max(jnp.abs(plain(tokens) - trained(tokens)))) <= 1e-5
    # another model shape than the checkpoint's is refused with the differing key named
    assert cli_main([*base, "model.hidden_size=32", "--export", str(tmp_path / "bad.npz")]) == 1
    assert "model.hidden_size" in capsys.readouterr().err and not os.path.exists(tmp_path / "bad.npz")
