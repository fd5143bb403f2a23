"""Permutations sorted inside blocks: valid index vectors, and the same POET layer up to relabeling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poetjax import ops
from poetjax.cayley import block_layout, packed_from_skew, rotations, skew_from_packed
from poetjax.config import ExecConfig
from poetjax.perms import input_permutation, output_permutation
from poetjax.testing import assert_close


@pytest.mark.parametrize("dim,k", [(40, 16), (64, 16), (50, 8)])
def test_block_sorted_index_vectors(dim, k):
    padded = -(-dim // k) * k
    p_in, p_in_inv = map(np.asarray, input_permutation(jax.random.key(0), dim, padded, k))
    p_out, p_out_inv = map(np.asarray, output_permutation(jax.random.key(1), dim, padded, k))
    for block_side in (p_in, p_out_inv):
        assert (np.diff(block_side.reshape(-1, k), axis=1) >= 0).all()  # sorted inside blocks
        assert sorted(block_side[block_side < dim]) == list(range(dim))
        assert (block_side[dim:] == dim).all() if padded > dim else True  # padding stays last
    np.testing.assert_array_equal(p_in[p_in_inv], np.arange(dim))
    np.testing.assert_array_equal(p_out_inv[p_out], np.arange(dim))
    # without block_size: the same assignment of coordinates to blocks, unsorted
    q_in, _ = input_permutation(jax.random.key(0), dim, padded)
    assert [set(b) for b in np.asarray(q_in).reshape(-1, k)] == [set(b) for b in p_in.reshape(-1, k)]


def test_sorting_inside_blocks_is_a_relabeling():
    """Sorting a block's indices = conjugating its rotation by a permutation and permuting W_s's rows
    (input side) or columns (output side): the layer computes the same function, so POET is unchanged."""
    n, m, k = 48, 40, 16
    lin, lout = block_layout(n, k), block_layout(m, k)
    keys = jax.random.split(jax.random.key(0), 6)
    p_in, p_in_inv = input_permutation(keys[0], n, lin.padded)      # unsorted
    p_out, p_out_inv = output_permutation(keys[1], m, lout.padded)
    th_in = 0.2 * jax.random.normal(keys[2], (lin.num_blocks, k * (k - 1) // 2))
    th_out = 0.2 * jax.random.normal(keys[3], (lout.num_blocks, k * (k - 1) // 2))
    th_out = th_out * jnp.asarray(np.r_[np.ones((2, 1)), np.zeros((1, 1))])  # ragged last block: keep it 0
    w_s = jax.random.normal(keys[4], (lin.padded, lout.padded))
    x = jax.random.normal(keys[5], (7, n))

    plan = ops.resolve_plan(ExecConfig(impl="xla"), memory="fast", block_size=k)

    def layer(perms, w, t_in, t_out):
        return ops.poet_x_linear(x, w, rotations(t_in, lin), rotations(t_out, lout), perms, plan,
                                 precision=jax.lax.Precision.HIGHEST)

    def relabel(theta, order):  # θ of Σᵀ Q Σ, block by block
        q = np.asarray(skew_from_packed(theta))
        return packed_from_skew(jnp.asarray(np.stack([qb[o][:, o] for qb, o in zip(q, order)])))

    o_in = np.argsort(np.asarray(p_in).reshape(-1, k), axis=1)
    o_out = np.argsort(np.asarray(p_out_inv).reshape(-1, k), axis=1)
    s_in = (np.arange(lin.num_blocks)[:, None] * k + o_in).reshape(-1)
    s_out = (np.arange(lout.num_blocks)[:, None] * k + o_out).reshape(-1)
    sp_in = np.asarray(p_in)[s_in]
    sp_out_inv = np.asarray(p_out_inv)[s_out]
    sorted_perms = ops.LayerPerms(jnp.asarray(sp_in), jnp.asarray(np.argsort(sp_in)[:n], jnp.int32),
                                  jnp.asarray(np.argsort(sp_out_inv)[:m], jnp.int32), jnp.asarray(sp_out_inv))
    want = layer(ops.LayerPerms(p_in, p_in_inv, p_out, p_out_inv), w_s, th_in, th_out)
    got = layer(sorted_perms, w_s[s_in][:, s_out], relabel(th_in, o_in), relabel(th_out, o_out))
    assert_close(got, want, jnp.float32, "value", what="block-sorted layer vs unsorted")


@pytest.mark.parametrize("dim,k,c", [(64, 16, 4), (48, 16, 8), (40, 16, 8), (64, 16, 16)])
def test_chunked_permutations_move_whole_runs(dim, k, c):
    """perm_chunk=c: valid index vectors, sorted inside blocks, every block made of whole aligned runs of c
    consecutive coordinates (so gathers read contiguous memory), and still random: two keys give two
    assignments of runs to blocks."""
    padded = -(-dim // k) * k
    p_in, p_in_inv = map(np.asarray, input_permutation(jax.random.key(0), dim, padded, k, c))
    p_out, p_out_inv = map(np.asarray, output_permutation(jax.random.key(1), dim, padded, k, c))
    np.testing.assert_array_equal(p_in[p_in_inv], np.arange(dim))
    np.testing.assert_array_equal(p_out_inv[p_out], np.arange(dim))
    for block_side in (p_in, p_out_inv):
        assert (np.diff(block_side.reshape(-1, k), axis=1) >= 0).all()
        assert sorted(block_side[block_side < dim]) == list(range(dim))
        runs = block_side[:dim].reshape(-1, c) if padded == dim else block_side.reshape(-1, c)
        real = runs[runs[:, 0] < dim]
        assert (real[:, 0] % c == 0).all() and (np.diff(real, axis=1) == 1).all()  # aligned, consecutive
        assert (runs[runs[:, 0] >= dim] == dim).all()  # padding runs are all padding
    other, _ = input_permutation(jax.random.key(5), dim, padded, k, c)
    if dim // c > k // c:  # more runs than fit in one block: the assignment is random
        assert [set(b) for b in np.asarray(other).reshape(-1, k)] != [set(b) for b in p_in.reshape(-1, k)]


def test_chunk_one_is_the_uniform_permutation_and_bad_chunks_are_errors():
    for fn in (input_permutation, output_permutation):
        a = fn(jax.random.key(3), 40, 48, 16)
        b = fn(jax.random.key(3), 40, 48, 16, 1)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(ValueError, match="perm_chunk=3 does not divide dim=40"):
        input_permutation(jax.random.key(0), 40, 48, 16, 3)
    with pytest.raises(ValueError, match="perm_chunk=8 does not divide block_size=12"):
        output_permutation(jax.random.key(0), 48, 48, 12, 8)
    with pytest.raises(ValueError, match="perm_chunk must be a positive int, got perm_chunk=0"):
        input_permutation(jax.random.key(0), 40, 48, 16, 0)
