"""Transposing permutation kernels: exact copies, forward and VJP, against the jnp references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import TransposeConfig

from _modes import MODES

# (T, C, R, perm kind): T not a multiple of the token tiles; C < R is a ragged side (padding rows);
# R covers the block sides J·K of K ∈ {16, 32, 64, 128, 256}.
CASES = [
    (45, 40, 48, "random"),      # K=16, 3 blocks, 8 padding rows
    (64, 64, 64, "reversed"),    # K=32
    (37, 128, 128, "identity"),  # K=64
    (100, 250, 256, "random"),   # K=128, 2 blocks, 6 padding rows
    (33, 512, 512, "random"),    # K=256
    (130, 1000, 1024, "random"),  # K=256, 4 blocks
]
DTYPES = [jnp.float32, jnp.bfloat16]


def _perm(rng, r, kind):
    return {"random": rng.permutation(r), "identity": np.arange(r), "reversed": np.arange(r)[::-1]}[kind].astype(np.int32)


def _data(t, c, r, kind, dtype, seed=0):
    rng = np.random.default_rng(seed + r)
    x = jnp.asarray(rng.normal(size=(t, c)), jnp.float32).astype(dtype)
    z = jnp.asarray(rng.normal(size=(r, t)), jnp.float32).astype(dtype)
    return x, z, jnp.asarray(_perm(rng, r, kind)), rng


def _np_scatter(x, idx):
    x = np.asarray(x, np.float64)
    out = np.zeros((len(idx), x.shape[0]))
    out[np.asarray(idx)[:x.shape[1]]] = x.T
    return out


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,c,r,kind", CASES)
def test_transpose_scatter_forward_and_vjp(t, c, r, kind, dtype, interpret):
    x, _, idx, rng = _data(t, c, r, kind, dtype)
    y, vjp = jax.vjp(lambda x: pk.transpose_scatter(x, idx, interpret=interpret), x)
    assert y.shape == (r, t) and y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float64), _np_scatter(x, idx))  # independent numpy formula
    y_ref, vjp_ref = jax.vjp(lambda x: pk.transpose_scatter_reference(x, idx), x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32).astype(dtype)
    (dx,), (dx_ref,) = vjp(g), vjp_ref(g)
    assert dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(dx_ref))
    # the cotangent of a permutation is the inverse permutation: dx[t, c] = g[idx[c], t]
    np.testing.assert_array_equal(np.asarray(dx), np.asarray(g)[np.asarray(idx)[:c]].T)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t,c,r,kind", CASES)
def test_gather_transpose_forward_and_vjp(t, c, r, kind, dtype, interpret):
    _, z, idx, rng = _data(t, c, r, kind, dtype)
    y, vjp = jax.vjp(lambda z: pk.gather_transpose(z, idx, c, interpret=interpret), z)
    assert y.shape == (t, c) and y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(z)[np.asarray(idx)[:c]].T)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32).astype(dtype)
    (dz,) = vjp(g)
    (dz_ref,) = jax.vjp(lambda z: pk.gather_transpose_reference(z, idx, c), z)[1](g)
    np.testing.assert_array_equal(np.asarray(dz), np.asarray(dz_ref))
    np.testing.assert_array_equal(np.asarray(dz, np.float64), _np_scatter(g, idx))  # dropped rows get 0


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("cfg", [TransposeConfig(16, 16, 1, 1), TransposeConfig(128, 32, 4, 1),
                                 TransposeConfig(32, 128, 8, 2)])
def test_every_tile_configuration_gives_the_same_copy(cfg, interpret):
    x, z, idx, _ = _data(77, 250, 256, "random", jnp.bfloat16)
    got = pk.transpose_scatter(x, idx, interpret=interpret, config=cfg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pk.transpose_scatter_reference(x, idx)))
    got = pk.gather_transpose(z, idx, 250, interpret=interpret, config=cfg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(pk.gather_transpose_reference(z, idx, 250)))


def test_roundtrip_and_leading_dims():
    x = jax.random.normal(jax.random.key(0), (2, 5, 64))
    idx = jax.random.permutation(jax.random.key(1), 64).astype(jnp.int32)
    f = pk.transpose_scatter(x, idx, interpret=True)
    assert f.shape == (64, 10)
    back = pk.gather_transpose(f, idx, interpret=True).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(back), np.asarray(x))


def test_bad_arguments_name_the_offending_value():
    x = jnp.ones((8, 40))
    with pytest.raises(ValueError, match="multiple of 16"):
        pk.transpose_scatter(x, jnp.arange(40, dtype=jnp.int32))
    with pytest.raises(ValueError, match="40 columns but idx only 32"):
        pk.transpose_scatter(x, jnp.arange(32, dtype=jnp.int32))
    with pytest.raises(ValueError, match="1-D integer"):
        pk.transpose_scatter(x, jnp.arange(48, dtype=jnp.float32))
    with pytest.raises(ValueError, match="floating"):
        pk.transpose_scatter(jnp.ones((8, 40), jnp.int32), jnp.arange(48, dtype=jnp.int32))
    with pytest.raises(ValueError, match="num_out=49"):
        pk.gather_transpose(jnp.ones((48, 8)), jnp.arange(48, dtype=jnp.int32), 49)
    with pytest.raises(ValueError, match=r"\(R=48, T\)"):
        pk.gather_transpose(jnp.ones((40, 8)), jnp.arange(48, dtype=jnp.int32))
    with pytest.raises(ValueError, match="block_t=24"):
        pk.transpose_scatter(x, jnp.arange(48, dtype=jnp.int32), config=TransposeConfig(block_t=24))
    with pytest.raises(TypeError, match="TransposeConfig"):
        pk.transpose_scatter(x, jnp.arange(48, dtype=jnp.int32), config={"block_t": 64})
