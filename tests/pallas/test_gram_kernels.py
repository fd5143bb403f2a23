"""The block-Gram layer's kernels against their jnp references, forward and VJP, in the interpreter and
natively on a GPU: ``block_gram`` (G[j] = a[:, idx_j]ᵀ · b[:, idx_j], both operands gathered in the loads)
and ``rotated_weight`` (W_eff = P_in · blockdiag(R_in) · W_s · blockdiag(R_out) · P_out in one pass), plus
their lowering to Triton and their errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import ReduceConfig, WeightConfig
from pallas_kernels._common import TRITON_CALL_TARGET, lower_for_gpu
from poetjax.perms import input_permutation, output_permutation
from poetjax.testing import assert_close

from _modes import MODES

S = jax.ShapeDtypeStruct

# (T, width or (N, M), K, chunk): ragged widths (padding indices), a token count no tile divides, chunked runs
GRAM_CASES = [(100, 80, 32, 1), (64, 96, 32, 1), (300, 256, 64, 16), (37, 64, 16, 1)]
WEIGHT_CASES = [(80, 48, 32, 1), (64, 96, 32, 1), (128, 192, 64, 16), (40, 24, 16, 1)]


def _index(n, k, chunk, seed):
    nb = -(-n // k)
    perm, _ = input_permutation(jax.random.key(seed), n, nb * k, k, chunk)
    return perm


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t,n,k,chunk", GRAM_CASES)
def test_block_gram_forward_and_vjp_match_reference(t, n, k, chunk, dtype, interpret):
    keys = jax.random.split(jax.random.key(t + n), 3)
    a = jax.random.normal(keys[0], (t, n)).astype(dtype)
    b = jax.random.normal(keys[1], (t, n)).astype(dtype)
    idx = _index(n, k, chunk, seed=k)
    cfg = ReduceConfig(block_t=32, block_m=16, block_n=16)  # several tiles per block and several token chunks
    got = pk.block_gram(a, b, idx, k, interpret=interpret, chunk=chunk, config=cfg)
    want = pk.block_gram_reference(a, b, idx, k)
    assert got.dtype == jnp.float32 and got.shape == (idx.shape[0] // k, k, k)
    assert_close(got, want, jnp.float32, what="block Gram")
    # padding coordinates read 0, so their rows and columns of G are exactly 0
    pad = np.asarray(idx) >= n
    assert not np.any(np.asarray(got).reshape(-1, k)[pad])
    dg = jax.random.normal(keys[2], got.shape)
    f = lambda a, b: jnp.sum(pk.block_gram(a, b, idx, k, interpret=interpret, chunk=chunk, config=cfg) * dg)
    r = lambda a, b: jnp.sum(pk.block_gram_reference(a, b, idx, k) * dg)
    for got_g, want_g, name in zip(jax.grad(f, (0, 1))(a, b), jax.grad(r, (0, 1))(a, b), "ab"):
        assert_close(got_g, want_g, dtype, "grad", what=f"d{name}")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,m,k,chunk", WEIGHT_CASES)
def test_rotated_weight_forward_and_vjp_match_reference(n, m, k, chunk, dtype, interpret):
    ni, no = -(-n // k), -(-m // k)
    keys = jax.random.split(jax.random.key(n * m), 6)
    rows, _ = input_permutation(keys[0], n, ni * k, k, chunk)
    _, cols = output_permutation(keys[1], m, no * k, k, chunk)
    w_s = jax.random.normal(keys[2], (ni * k, no * k)).astype(dtype)
    r_in = jax.random.normal(keys[3], (ni, k, k)) / np.sqrt(k)
    r_out = jax.random.normal(keys[4], (no, k, k)) / np.sqrt(k)
    cfg = WeightConfig(block_m=16, block_k=16, block_n=16)  # several row, contraction and column tiles
    got = pk.rotated_weight(w_s, r_in, r_out, rows, cols, n, m, interpret=interpret, chunk=chunk, config=cfg)
    want = pk.rotated_weight_reference(w_s, r_in, r_out, rows, cols, n, m)
    assert got.dtype == dtype and got.shape == (n, m)
    assert_close(got, want, dtype, what="rotated weight")
    dw = jax.random.normal(keys[5], (n, m)).astype(dtype)
    f = lambda *p: jnp.sum((pk.rotated_weight(*p, rows, cols, n, m, interpret=interpret, chunk=chunk,
                                              config=cfg) * dw).astype(jnp.float32))
    r = lambda *p: jnp.sum((pk.rotated_weight_reference(*p, rows, cols, n, m) * dw).astype(jnp.float32))
    for got_g, want_g, name in zip(jax.grad(f, (0, 1, 2))(w_s, r_in, r_out), jax.grad(r, (0, 1, 2))(w_s, r_in, r_out),
                                   ("w_s", "r_in", "r_out")):
        assert_close(got_g, want_g, jnp.float32, "grad", what=f"d{name}")


def test_rotated_weight_reference_is_the_dense_sandwich():
    """The reference against explicit matrices: Π · blockdiag(R_in) · W_s · blockdiag(R_out) · Σ."""
    n, m, k = 40, 24, 16
    ni, no = 3, 2
    keys = jax.random.split(jax.random.key(0), 5)
    rows, _ = input_permutation(keys[0], n, ni * k, k)
    _, cols = output_permutation(keys[1], m, no * k, k)
    w_s = jax.random.normal(keys[2], (ni * k, no * k))
    r_in, r_out = jax.random.normal(keys[3], (ni, k, k)), jax.random.normal(keys[4], (no, k, k))
    bd = lambda r: jax.scipy.linalg.block_diag(*r)
    a = bd(r_in) @ w_s @ bd(r_out)
    rows_m = jax.nn.one_hot(rows, n).T          # (n, ni·k): row p of A goes to row rows[p]
    cols_m = jax.nn.one_hot(cols, m)            # (no·k, m): column c goes to column cols[c]
    want = jnp.matmul(jnp.matmul(rows_m, a, precision="highest"), cols_m, precision="highest")
    assert_close(pk.rotated_weight_reference(w_s, r_in, r_out, rows, cols, n, m), want, jnp.float32)


@pytest.mark.parametrize("k,chunk", [(256, 64), (64, 1), (96, 16)])
def test_gram_kernels_lower_to_triton(k, chunk):
    t, nb = 1000, 3
    d = nb * k
    idx = jnp.arange(d, dtype=jnp.int32)  # chunked for every chunk; values do not matter for lowering
    txt = lower_for_gpu(lambda a, b: pk.block_gram(a, b, idx, k, chunk=chunk), S((t, d - 5), jnp.bfloat16),
                        S((t, d - 5), jnp.bfloat16))
    assert txt.count(TRITON_CALL_TARGET) == 1
    assert ("block_grad_partials_chunked" in txt) == (chunk >= 16)
    txt = lower_for_gpu(lambda w, a, b: pk.rotated_weight(w, a, b, idx, idx, d - 5, d - 3, chunk=chunk),
                        S((d, d), jnp.bfloat16), S((nb, k, k), jnp.float32), S((nb, k, k), jnp.float32))
    assert txt.count(TRITON_CALL_TARGET) == 1


def test_gram_kernel_errors_name_the_value():
    a = jnp.zeros((8, 32))
    idx = jnp.arange(32, dtype=jnp.int32)
    with pytest.raises(ValueError, match="multiple of block_size=16"):
        pk.block_gram(a, a, idx[:24], 16, interpret=True)
    with pytest.raises(ValueError, match="one shape and dtype"):
        pk.block_gram(a, a.astype(jnp.bfloat16), idx, 16, interpret=True)
    with pytest.raises(ValueError, match="not 16-chunked"):
        pk.block_gram(a, a, idx[::-1], 16, interpret=True, chunk=16)
    r = jnp.zeros((2, 16, 16))
    with pytest.raises(ValueError, match=r"w_s must be a floating \(32, 32\)"):
        pk.rotated_weight(jnp.zeros((32, 16)), r, r, idx, idx, 32, 32, interpret=True)
    with pytest.raises(ValueError, match="m=40"):
        pk.rotated_weight(jnp.zeros((32, 32)), r, r, idx, idx, 32, 40, interpret=True)
    with pytest.raises(TypeError, match="WeightConfig"):
        pk.rotated_weight(jnp.zeros((32, 32)), r, r, idx, idx, 32, 32, interpret=True, config=ReduceConfig())
