"""Fused permutation + block-diagonal kernels: forward and VJP against the jnp reference and float64."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import BlockMatmulConfig, LoopConfig, ReduceConfig, RotateConfig
from poetjax.testing import assert_close

from _modes import MODES, input_perm, output_perm

# (T, N, K, perm kind): T is never a multiple of every token tile; N < J·K means padded indices.
CASES = [
    (45, 40, 16, "random"),     # 3 blocks, 8 padding columns
    (64, 64, 32, "reversed"),
    (37, 128, 64, "identity"),
    (100, 250, 128, "random"),  # 2 blocks, 6 padding columns
    (33, 512, 256, "random"),
]


def _inputs(t, n, k, dtype, seed=0):
    nb = -(-n // k)
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (t, n), jnp.float32).astype(dtype)
    r = jax.random.normal(keys[1], (nb, k, k), jnp.float32) / np.sqrt(k)
    return x, r, keys[2], keys[3]


def _vjp(f, *args, key):
    y, vjp = jax.vjp(f, *args)
    g = jax.random.normal(key, y.shape, jnp.float32).astype(y.dtype)
    return (y, *vjp(g))


def _check(got, want, dtype, what):
    for name, a, b in zip(("y", "d_in", "dR"), got, want):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert_close(a.astype(jnp.float32), b.astype(jnp.float32), dtype, "value", what=f"{what} {name}")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("t,n,k,kind", CASES)
def test_gather_rotate_matches_reference(t, n, k, kind, interpret):
    x, r, kg, _ = _inputs(t, n, k, jnp.float32)
    perm = jnp.asarray(input_perm(np.random.default_rng(k), n, r.shape[0] * k, kind))
    got = jax.jit(lambda x, r: _vjp(lambda x, r: pk.permuted_block_matmul(x, perm, r, interpret=interpret),
                                    x, r, key=kg))(x, r)
    want = _vjp(lambda x, r: pk.permuted_block_matmul_reference(x, perm, r), x, r, key=kg)
    _check(got, want, jnp.float32, f"permuted_block_matmul K={k}")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("t,n,k,kind", CASES)
def test_rotate_gather_matches_reference(t, n, k, kind, interpret):
    nb = -(-n // k)
    h, r, kg, _ = _inputs(t, nb * k, k, jnp.float32)
    perm, inv = map(jnp.asarray, output_perm(np.random.default_rng(k), n, nb * k))
    if k == 64:  # one case computes inv_perm inside from perm
        inv = None
    got = jax.jit(lambda h, r: _vjp(
        lambda h, r: pk.block_matmul_permuted(h, perm, r, inv_perm=inv, interpret=interpret), h, r, key=kg))(h, r)
    want = _vjp(lambda h, r: pk.block_matmul_permuted_reference(h, perm, r), h, r, key=kg)
    _check(got, want, jnp.float32, f"block_matmul_permuted K={k}")


@pytest.mark.parametrize("interpret", MODES)
def test_bf16_within_tolerance(interpret):
    """bf16 activations and R (as a POET layer feeds them), float32 accumulation and dR."""
    t, k = 50, 64
    n = 3 * k - 7
    x, r, kg, _ = _inputs(t, n, k, jnp.bfloat16, seed=1)
    r = r.astype(jnp.bfloat16)
    rng = np.random.default_rng(1)
    perm = jnp.asarray(input_perm(rng, n, 3 * k))
    p_out, inv = map(jnp.asarray, output_perm(rng, n, 3 * k))
    h = jax.random.normal(jax.random.key(5), (t, 3 * k)).astype(jnp.bfloat16)

    def both(x, h, r, fn_in, fn_out):
        return (_vjp(fn_in, x, r, key=kg), _vjp(fn_out, h, r, key=kg))

    got = jax.jit(lambda x, h, r: both(
        x, h, r, lambda x, r: pk.permuted_block_matmul(x, perm, r, interpret=interpret),
        lambda h, r: pk.block_matmul_permuted(h, p_out, r, inv_perm=inv, interpret=interpret)))(x, h, r)
    want = both(x, h, r, lambda x, r: pk.permuted_block_matmul_reference(x, perm, r),
                lambda h, r: pk.block_matmul_permuted_reference(h, p_out, r))
    assert got[0][0].dtype == jnp.bfloat16 and got[0][2].dtype == jnp.bfloat16  # cotangents keep r's dtype
    _check(got[0], want[0], jnp.bfloat16, "bf16 permuted_block_matmul")
    _check(got[1], want[1], jnp.bfloat16, "bf16 block_matmul_permuted")


# Small tiles so that every code path runs: several column tiles (the gathered copy is then written by
# the first one only), token chunks that do not divide the token tiles, save_gathered on and off.
CONFIGS = [
    BlockMatmulConfig(forward=RotateConfig(block_t=16, block_k=16, block_n=16),
                      backward=RotateConfig(block_t=32, block_k=16, block_n=16),
                      reduce=ReduceConfig(block_t=16, block_m=16, block_n=32, num_chunks=3), save_gathered=True),
    BlockMatmulConfig(forward=RotateConfig(block_t=32, block_k=32, block_n=0),
                      backward=RotateConfig(block_t=16, block_k=16, block_n=0),
                      reduce=ReduceConfig(block_t=32, block_m=32, block_n=16, num_chunks=1), save_gathered=False),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=["save-coltiles-chunks", "nosave"])
def test_configs_against_float64(cfg, interpret):
    """Both kernels, leading batch dims, padded indices, against an explicit float64 computation."""
    t, n, k = 70, 80, 32  # 3 blocks, 16 padding columns
    nb, d = 3, 96
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 35, n))
    r = rng.standard_normal((nb, k, k)) / np.sqrt(k)
    g = rng.standard_normal((2, 35, d))
    perm = input_perm(rng, n, d)

    def blockdiag(m):
        out = np.zeros((d, d))
        for j in range(nb):
            out[j * k:(j + 1) * k, j * k:(j + 1) * k] = m[j]
        return out

    sel = np.zeros((n, d))  # x @ sel = x[..., perm] with padding zeros
    sel[perm[perm < n], np.nonzero(perm < n)[0]] = 1.0
    a = sel @ blockdiag(r)
    xt = x.reshape(t, n)
    want = (x @ a, g @ a.T, np.stack([((xt @ sel)[:, j * k:(j + 1) * k]).T @ g.reshape(t, d)[:, j * k:(j + 1) * k]
                                      for j in range(nb)]))
    f = lambda x, r: pk.permuted_block_matmul(x, jnp.asarray(perm), r, interpret=interpret, config=cfg)
    got = jax.jit(lambda x, r, g: (lambda y, vjp: (y, *vjp(g)))(*jax.vjp(f, x, r)))(
        *(jnp.asarray(v, jnp.float32) for v in (x, r, g)))
    for name, a_, b_ in zip(("y", "dx", "dR"), got, want):
        assert_close(a_, b_, jnp.float32, "value", what=f"permuted_block_matmul {name}")

    # output side: (h · blockdiag(R))[..., p] with M = 80 of the 96 columns kept
    p_out, inv = output_perm(rng, n, d)
    h = rng.standard_normal((2, 35, d))
    go = rng.standard_normal((2, 35, n))
    pick = np.zeros((d, n))
    pick[p_out, np.arange(n)] = 1.0
    b = blockdiag(r) @ pick
    ht = h.reshape(t, d)
    gz = go.reshape(t, n) @ pick.T
    want = (h @ b, go @ b.T, np.stack([ht[:, j * k:(j + 1) * k].T @ gz[:, j * k:(j + 1) * k] for j in range(nb)]))
    f = lambda h, r: pk.block_matmul_permuted(h, jnp.asarray(p_out), r, inv_perm=jnp.asarray(inv),
                                              interpret=interpret, config=cfg)
    got = jax.jit(lambda h, r, g: (lambda y, vjp: (y, *vjp(g)))(*jax.vjp(f, h, r)))(
        *(jnp.asarray(v, jnp.float32) for v in (h, r, go)))
    for name, a_, b_ in zip(("y", "dh", "dR"), got, want):
        assert_close(a_, b_, jnp.float32, "value", what=f"block_matmul_permuted {name}")


def test_inverse_index():
    perm, inv = output_perm(np.random.default_rng(0), 20, 32)
    np.testing.assert_array_equal(pk.inverse_index(jnp.asarray(perm), 32), inv)


def test_no_tokens():
    r = jnp.ones((2, 16, 16))
    y = pk.permuted_block_matmul(jnp.zeros((0, 30)), jnp.arange(32, dtype=jnp.int32), r, interpret=True)
    assert y.shape == (0, 32)


def test_input_errors_quote_the_values():
    x = jnp.ones((4, 30))
    r = jnp.ones((2, 16, 16))
    with pytest.raises(ValueError, match="perm has length 30, expected 32"):
        pk.permuted_block_matmul(x, jnp.arange(30, dtype=jnp.int32), r, interpret=True)
    with pytest.raises(ValueError, match=r"r must have shape \(J, K, K\), got \(2, 16, 8\)"):
        pk.permuted_block_matmul(x, jnp.arange(32, dtype=jnp.int32), jnp.ones((2, 16, 8)), interpret=True)
    with pytest.raises(ValueError, match="block_size=24 is not supported"):
        pk.permuted_block_matmul(x, jnp.arange(48, dtype=jnp.int32), jnp.ones((2, 24, 24)), interpret=True)
    with pytest.raises(ValueError, match=r"h must be a floating array \(\.\.\., 32\)"):
        pk.block_matmul_permuted(x, jnp.arange(30, dtype=jnp.int32), r, interpret=True)
    with pytest.raises(ValueError, match="perm must be a 1-D integer array"):
        pk.permuted_block_matmul(x, jnp.ones((32,)), r, interpret=True)
    bad = BlockMatmulConfig(forward=RotateConfig(block_k=64))
    with pytest.raises(ValueError, match="block_k=64 does not divide block_size=16"):
        pk.permuted_block_matmul(x, jnp.arange(32, dtype=jnp.int32), r, interpret=True, config=bad)


# Chunked index vectors (poetjax.perms with perm_chunk): (T, N, M, K, chunk). N, M < J·K: padded runs.
CHUNK_CASES = [
    (45, 96, 80, 32, 16),     # output side: one padding run of 16
    (70, 192, 160, 64, 32),   # input side exact, output side one padding run of 32
    (40, 192, 144, 96, 48),   # chunk not a power of two: tiles of 16 inside runs of 48
    (33, 512, 512, 256, 64),
    (30, 64, 64, 32, 8),      # runs narrower than a tile: the column-by-column path
]


def _chunked_perms(n, m, k, c, seed=0):
    from poetjax.cayley import block_layout
    from poetjax.perms import input_permutation, output_permutation
    k1, k2 = jax.random.split(jax.random.key(seed))
    p_in, _ = input_permutation(k1, n, block_layout(n, k).padded, k, c)
    p_out, inv = output_permutation(k2, m, block_layout(m, k).padded, k, c)
    return np.asarray(p_in), np.asarray(p_out), np.asarray(inv)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("t,n,m,k,c", CHUNK_CASES)
def test_chunked_kernels_match_reference(t, n, m, k, c, save, interpret):
    """Both kernels told chunk=c (one index per tile), forward and VJP, against the jnp reference."""
    p_in, p_out, inv = map(jnp.asarray, _chunked_perms(n, m, k, c))
    cfg = pk.tuning.block_matmul_config(k)
    cfg = BlockMatmulConfig(cfg.forward, cfg.backward, cfg.reduce, save_gathered=save)
    _check_both_sides(t, n, k, c, p_in, p_out, inv, cfg, interpret, seed=c, what="chunked")


def _check_both_sides(t, n, k, c, p_in, p_out, inv, cfg, interpret, seed, what):
    """permuted_block_matmul (input side, x of width n) and block_matmul_permuted (output side), told chunk=c
    and run with cfg: forward and VJP against the jnp reference."""
    x, r_in, kg, kh = _inputs(t, n, k, jnp.float32, seed=seed)
    got = jax.jit(lambda x, r: _vjp(lambda x, r: pk.permuted_block_matmul(
        x, p_in, r, interpret=interpret, config=cfg, chunk=c), x, r, key=kg))(x, r_in)
    want = _vjp(lambda x, r: pk.permuted_block_matmul_reference(x, p_in, r), x, r_in, key=kg)
    _check(got, want, jnp.float32, f"{what} permuted_block_matmul K={k} c={c}")
    nb = inv.shape[0] // k
    h, r_out, _, _ = _inputs(t, nb * k, k, jnp.float32, seed=seed + 1)
    got = jax.jit(lambda h, r: _vjp(lambda h, r: pk.block_matmul_permuted(
        h, p_out, r, inv_perm=inv, interpret=interpret, config=cfg, chunk=c), h, r, key=kh))(h, r_out)
    want = _vjp(lambda h, r: pk.block_matmul_permuted_reference(h, p_out, r), h, r_out, key=kh)
    _check(got, want, jnp.float32, f"{what} block_matmul_permuted K={k} c={c}")


def _loop_config(k, c):
    """Token-loop kernels for the backward rotations (dR folded in), small tiles and 3 token chunks so that several
    programs share each block and stage 2 sums partials; pieces narrower than the block."""
    tile = min(32, k & -k)
    loop = LoopConfig(block_t=16, block_n=tile, block_p=min(16, tile), num_chunks=3, num_warps=4)
    base = pk.tuning.block_matmul_config(k, c)
    return dataclasses.replace(base, backward_loop=loop)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("t,n,m,k,c", CHUNK_CASES + [(37, 100, 90, 32, 1)])
def test_loop_kernels_match_reference(t, n, m, k, c, interpret):
    """The token-loop kernels (backward rotations with dR in the same pass), chunked and
    (c = 1) column by column, forward and VJP against the jnp reference."""
    if c == 1:
        rng = np.random.default_rng(t)
        nb_in, nb_out = -(-n // k), -(-m // k)
        p_in = jnp.asarray(input_perm(rng, n, nb_in * k))
        p_out, inv = map(jnp.asarray, output_perm(rng, m, nb_out * k))
    else:
        p_in, p_out, inv = map(jnp.asarray, _chunked_perms(n, m, k, c))
    _check_both_sides(t, n, k, c, p_in, p_out, inv, _loop_config(k, c), interpret, seed=c + 7, what="loop")


@pytest.mark.parametrize("interpret", MODES)
def test_loop_backward_alone_matches_reference(interpret):
    """Whatever save_gathered says, with the backward on the loop kernel the forward's residual must be x, not
    the gathered copy."""
    t, n, m, k, c = 33, 512, 512, 256, 64
    p_in, _, _ = map(jnp.asarray, _chunked_perms(n, m, k, c))
    base = _loop_config(k, c)
    for save in (True, False):
        cfg = dataclasses.replace(base, save_gathered=save)
        x, r_in, kg, _ = _inputs(t, n, k, jnp.float32, seed=3)
        got = jax.jit(lambda x, r: _vjp(lambda x, r: pk.permuted_block_matmul(
            x, p_in, r, interpret=interpret, config=cfg, chunk=c), x, r, key=kg))(x, r_in)
        want = _vjp(lambda x, r: pk.permuted_block_matmul_reference(x, p_in, r), x, r_in, key=kg)
        _check(got, want, jnp.float32, f"loop backward only, save_gathered={save}")


def test_chunk_tile():
    from pallas_kernels.block_matmul import chunk_tile
    assert [chunk_tile(c, 32) for c in (8, 16, 48, 64, 256)] == [0, 16, 16, 32, 32]
    assert chunk_tile(256, 256) == 256


def test_unchunked_index_with_chunk_is_an_error():
    """A concrete index vector that is not chunk-chunked is refused, naming the run; so is a bad chunk."""
    k, n = 32, 64
    x = jnp.ones((4, n))
    r = jnp.ones((2, k, k))
    p_in, _, _ = _chunked_perms(n, n, k, 16)
    pk.permuted_block_matmul(x, jnp.asarray(p_in), r, interpret=True, chunk=16)  # fine
    with pytest.raises(ValueError, match=r"perm is not 32-chunked: its run \d"):
        pk.permuted_block_matmul(x, jnp.asarray(p_in[::-1].copy()), r, interpret=True, chunk=32)
    shifted = np.concatenate([p_in[1:], p_in[:1]])
    with pytest.raises(ValueError, match="perm is not 16-chunked"):
        pk.permuted_block_matmul(x, jnp.asarray(shifted), r, interpret=True, chunk=16)
    with pytest.raises(ValueError, match="chunk=24 does not divide the length 64 of perm"):
        pk.permuted_block_matmul(x, jnp.asarray(p_in), r, interpret=True, chunk=24)
    with pytest.raises(ValueError, match="chunk must be a positive int, got chunk=0"):
        pk.permuted_block_matmul(x, jnp.asarray(p_in), r, interpret=True, chunk=0)
    _, p_out, inv = _chunked_perms(n, 48, k, 16)
    bad_inv = np.asarray(inv).copy()
    bad_inv[[0, 1]] = bad_inv[[1, 0]]
    with pytest.raises(ValueError, match=r"inv_perm is not 16-chunked: its run 0"):
        pk.block_matmul_permuted(jnp.ones((4, 64)), jnp.asarray(p_out), r, inv_perm=jnp.asarray(bad_inv),
                                 interpret=True, chunk=16)
