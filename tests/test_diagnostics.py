"""Diagnostics vs numpy/float64, spectrum preservation, phase probing, and plain-model export."""

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


def test_spectrum_stats_on_plain_and_poet_models():
    plain = Tiny(rngs=nnx.Rngs(0))
    stats = dg.spectrum_stats(plain)
    assert set(stats) == {"blocks/0/up", "blocks/0/down", "blocks/1/up", "blocks/1/down", "lm_head"}
    poet = pj.poetize(Tiny(rngs=nnx.Rngs(0)), pj.POETConfig(block_size=8, init="keep"), rngs=nnx.Rngs(1))
    stats_p = dg.spectrum_stats(poet)
    for k in stats:
        assert_close(stats_p[k]["singular_values"], stats[k]["singular_values"], jnp.float32)


@pytest.mark.parametrize("ext", [".npz"])
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
