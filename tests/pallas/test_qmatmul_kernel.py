"""The quantized matmul kernel (POET-XQ): forward and VJP against the jnp reference, lowering, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from pallas_kernels import QMatmulConfig
from pallas_kernels._common import TRITON_CALL_TARGET, lower_for_gpu
from poetjax import quant
from poetjax.testing import assert_close

from _modes import MODES

S = jax.ShapeDtypeStruct

# (T, N, M, G, config): T never a multiple of the token tile; tiles smaller than, equal to and larger
# than the group; one M whose largest power-of-two divisor (16) is below block_n.
CASES = [
    (37, 256, 96, 256, None),
    (70, 192, 48, 64, QMatmulConfig(block_t=32, block_k=32, block_n=16)),
    (5, 128, 80, 16, QMatmulConfig(block_t=16, block_k=64, block_n=64)),
]


def _inputs(t, n, m, g, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    qw = quant.quantize(0.05 * jax.random.normal(keys[0], (n, m)), g)
    a = jax.random.normal(keys[1], (t, n)).astype(dtype)
    gy = jax.random.normal(keys[2], (t, m)).astype(dtype)
    return a, qw, gy


def _fwd_bwd(f, a, gy):
    y, vjp = jax.vjp(f, a)
    return y, vjp(gy)[0]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("t,n,m,g,cfg", CASES)
def test_qmatmul_matches_reference(t, n, m, g, cfg, dtype, interpret):
    a, qw, gy = _inputs(t, n, m, g, dtype)
    got = jax.jit(lambda a, gy: _fwd_bwd(lambda a: pk.qmatmul(a, *qw, interpret=interpret, config=cfg), a, gy))(a, gy)
    want = _fwd_bwd(lambda a: pk.qmatmul_reference(a, *qw), a, gy)
    # and a float64 product with the dequantized weight (the reference is not checked against itself)
    w64 = np.asarray(quant.dequantize(qw, dtype), np.float64)
    y64 = np.asarray(a, np.float64) @ w64
    da64 = np.asarray(gy, np.float64) @ w64.T
    for name, x, ref, exact in (("y", got[0], want[0], y64), ("da", got[1], want[1], da64)):
        assert x.dtype == dtype and x.shape == ref.shape
        assert_close(x.astype(jnp.float32), ref.astype(jnp.float32), dtype, "value", what=f"qmatmul {name}")
        assert_close(x.astype(jnp.float32), exact, dtype, "value", what=f"qmatmul {name} vs float64")


@pytest.mark.parametrize("interpret", MODES)
def test_qmatmul_leading_dims_and_empty(interpret):
    a, qw, _ = _inputs(6, 64, 32, 32, jnp.float32)
    y = pk.qmatmul(a.reshape(2, 3, 64), *qw, interpret=interpret)
    assert_close(y.reshape(6, 32), pk.qmatmul_reference(a, *qw), jnp.float32, "value")
    assert pk.qmatmul(jnp.zeros((0, 64)), *qw, interpret=interpret).shape == (0, 32)


def test_qmatmul_rejects_bad_inputs_with_their_shapes():
    a, qw, _ = _inputs(4, 64, 32, 32, jnp.float32)
    with pytest.raises(ValueError, match=r"a must be a floating array \(\.\.\., 64\)"):
        pk.qmatmul(a[:, :48], *qw)
    with pytest.raises(ValueError, match="codes must be a 2-D uint8"):
        pk.qmatmul(a, qw.codes.astype(jnp.int32), qw.scale, qw.zero)
    with pytest.raises(ValueError, match=r"scale must have shape \(N/Gq, M\)"):
        pk.qmatmul(a, qw.codes, qw.scale[:, :16], qw.zero)
    q24 = quant.quantize(jnp.ones((48, 32)), 24)
    with pytest.raises(ValueError, match="group size to be a multiple of 16, got group size=24"):
        pk.qmatmul(jnp.ones((2, 48)), *q24)
    with pytest.raises(ValueError, match="QMatmulConfig.block_k=24"):
        pk.qmatmul(a, *qw, config=QMatmulConfig(block_k=24))


@pytest.mark.parametrize("n,m,dtype", [(8192, 22016, jnp.bfloat16), (22016, 8192, jnp.bfloat16), (256, 96, jnp.float32)])
def test_qmatmul_lowers_to_triton(n, m, dtype):
    """Forward and backward kernels lower for CUDA at the Llama-34B shapes (T not a multiple of the tiles)."""
    t, g = 1000, 256

    def f(a, codes, scale, zero, gy):
        return _fwd_bwd(lambda a: pk.qmatmul(a, codes, scale, zero), a, gy)

    txt = lower_for_gpu(f, S((t, n), dtype), S((n, m), jnp.uint8), S((n // g, m), jnp.float32),
                        S((n // g, m), jnp.uint8), S((t, m), dtype))
    assert txt.count(TRITON_CALL_TARGET) == 2, "forward and transposed kernels"
