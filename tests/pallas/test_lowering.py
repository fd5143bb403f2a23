"""Every kernel, forward and backward, lowers to Triton for CUDA on a machine without a GPU.

Cross-lowering catches what the interpreter cannot (non-power-of-two arrays, primitives Triton lacks,
gathers) so that CI fails before a kernel reaches the GPU. It does not compile to PTX: Triton's own
limits (registers, shared memory) still need a GPU run (``-m gpu``).
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import pallas_kernels as pk
import poetjax as pj
from poetjax.testing import poet_config
from pallas_kernels import BlockMatmulConfig
from pallas_kernels._common import TRITON_CALL_TARGET, lower_for_gpu

S = jax.ShapeDtypeStruct


def _fwd_bwd(fn):
    def f(*args):
        *primals, g = args
        y, vjp = jax.vjp(fn, *primals)
        return y, vjp(g)
    return f


def _count(txt):
    return txt.count(TRITON_CALL_TARGET)


@pytest.mark.parametrize("k,dtype", [(16, jnp.float32), (64, jnp.bfloat16), (96, jnp.bfloat16), (256, jnp.bfloat16),
                                     (512, jnp.bfloat16)])
@pytest.mark.parametrize("save", [True, False])
def test_block_matmul_kernels_lower_to_triton(k, dtype, save):
    nb, t = 3, 1000  # 1000 tokens: not a multiple of any token tile
    d, n = nb * k, nb * k - 5
    cfg = pk.tuning.block_matmul_config(k)
    cfg = BlockMatmulConfig(cfg.forward, cfg.backward, cfg.reduce, save_gathered=save)
    f = _fwd_bwd(lambda x, r: pk.permuted_block_matmul(x, perm, r, config=cfg))
    perm = jnp.zeros((d,), jnp.int32)  # values do not matter for lowering (closed-over constant)
    txt = lower_for_gpu(f, S((t, n), dtype), S((nb, k, k), jnp.float32), S((t, d), dtype))
    assert _count(txt) == 3, "forward, dx and dR kernels"
    inv = jnp.zeros((d,), jnp.int32)
    f = _fwd_bwd(lambda h, r: pk.block_matmul_permuted(h, perm[:n], r, inv_perm=inv, config=cfg))
    txt = lower_for_gpu(f, S((t, d), dtype), S((nb, k, k), jnp.float32), S((t, n), dtype))
    assert _count(txt) == 3, "forward, dh and dR kernels"


@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("k,chunk", [(256, 64), (64, 16), (96, 48)])
def test_chunked_block_matmul_kernels_lower_to_triton(k, chunk, save):
    """With a chunked index, the gathering and scattering kernels (and, without a saved gathered operand,
    the dR reduction) take their one-index-per-tile form."""
    nb, t = 3, 1000
    d = nb * k
    perm = jnp.arange(d, dtype=jnp.int32)  # chunked for every chunk; values otherwise do not matter
    cfg = dataclasses.replace(pk.tuning.block_matmul_config(k, chunk), save_gathered=save,
                              backward_loop=None)   # the separate kernels (the loop ones: the next test)
    reduce = "block_grad_partials" + ("" if save else "_chunked")
    f = _fwd_bwd(lambda x, r: pk.permuted_block_matmul(x, perm, r, chunk=chunk, config=cfg))
    txt = lower_for_gpu(f, S((t, d), jnp.bfloat16), S((nb, k, k), jnp.float32), S((t, d), jnp.bfloat16))
    assert _count(txt) == 3
    for name in ("gather_rotate_chunked", "rotate_t_scatter_chunked", reduce + '"'):
        assert name in txt, name
    f = _fwd_bwd(lambda h, r: pk.block_matmul_permuted(h, perm, r, inv_perm=perm, chunk=chunk, config=cfg))
    txt = lower_for_gpu(f, S((t, d), jnp.bfloat16), S((nb, k, k), jnp.float32), S((t, d), jnp.bfloat16))
    assert _count(txt) == 3
    for name in ("rotate_scatter_chunked", "gather_rotate_t_chunked", reduce + '"'):
        assert name in txt, name


@pytest.mark.parametrize("k,chunk", [(256, 64), (64, 16), (96, 48)])
def test_loop_block_matmul_kernels_lower_to_triton(k, chunk):
    """With a token-loop config, each side is two kernels: the forward rotation and the backward (loop)
    rotation that also writes the dR partials (no separate reduction)."""
    nb, t = 3, 1000
    d = nb * k
    perm = jnp.arange(d, dtype=jnp.int32)
    loop = pk.LoopConfig(block_t=64, block_n=min(64, k & -k), block_p=min(64, k & -k))
    cfg = dataclasses.replace(pk.tuning.block_matmul_config(k, chunk), backward_loop=loop)
    for f, names in (
            (lambda x, r: pk.permuted_block_matmul(x, perm, r, chunk=chunk, config=cfg),
             ("gather_rotate_chunked", "rotate_loop_t_scatter_reduce_chunked")),
            (lambda h, r: pk.block_matmul_permuted(h, perm, r, inv_perm=perm, chunk=chunk, config=cfg),
             ("rotate_scatter_chunked", "gather_rotate_loop_t_reduce_chunked"))):
        txt = lower_for_gpu(_fwd_bwd(f), S((t, d), jnp.bfloat16), S((nb, k, k), jnp.float32), S((t, d), jnp.bfloat16))
        assert _count(txt) == 2
        for name in names:
            assert name + '"' in txt, name


@pytest.mark.parametrize("k,precision", [(16, None), (128, None), (256, None), (512, None), (256, "bf16"),
                                         (64, "bf16")])
def test_cayley_kernels_lower_to_triton(k, precision):
    cfg = pk.tuning.cayley_config(k, precision)
    f = _fwd_bwd(lambda th: pk.cayley_neumann(th, k, config=cfg))
    txt = lower_for_gpu(f, S((43, k * (k - 1) // 2), jnp.float32), S((43, k, k), jnp.float32))
    assert _count(txt) == 5, "Q, Q², R, N and dθ kernels"


# Triton calls of one layer's forward + backward. Both: one Cayley map for the blocks of both sides
# (cayley.rotation_pair), 3 kernels forward + 2 backward.
# tokens: rotations fwd (2) + bwd (2 × 2); mem recomputes both forward rotations (the recomputed output
# one is not read, but XLA keeps the custom call). features: the two transposing permutations forward and
# their two mirrors backward; mem recomputes the input one (the block rotations and the matmul are XLA).
LAYER_TRITON_CALLS = {("tokens", "fast"): 11, ("tokens", "mem"): 13, ("features", "fast"): 9,
                      ("features", "mem"): 10}


@pytest.mark.parametrize("layout", ["tokens", "features"])
@pytest.mark.parametrize("variant", ["fast", "mem"])
def test_poet_layer_lowers_to_triton(variant, layout, monkeypatch):
    """A whole POET layer with impl='pallas' and native kernels, forward and backward: token-major with
    chunked permutations (runs of 16), feature-major with uniform ones."""
    monkeypatch.setattr(pk, "default_interpret", lambda: False)
    chunk = 16 if layout == "tokens" else 1
    cfg = poet_config(variant, block_size=32, impl="pallas", perm_chunk=chunk)
    lay = pj.POETLinear(80, 96, config=cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert lay.plan(100).body == f"pallas_{layout}"
    graphdef, gens, rest = nnx.split(lay, pj.Generator, ...)

    def loss(gens, x):
        return jnp.sum(nnx.merge(graphdef, gens, rest)(x).astype(jnp.float32) ** 2)

    txt = lower_for_gpu(jax.grad(loss, argnums=(0, 1)), gens, S((2, 50, 80), jnp.bfloat16))
    assert _count(txt) == LAYER_TRITON_CALLS[(layout, variant)]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transpose_kernels_lower_to_triton(dtype):
    """Forward and VJP of both transposing permutations, 1000 tokens (not a multiple of any tile), a
    ragged side (250 of 256 rows)."""
    idx = jnp.zeros((256,), jnp.int32)  # values do not matter for lowering
    f = _fwd_bwd(lambda x: pk.transpose_scatter(x, idx))
    assert _count(lower_for_gpu(f, S((1000, 250), dtype), S((256, 1000), dtype))) == 2
    f = _fwd_bwd(lambda z: pk.gather_transpose(z, idx, 250))
    assert _count(lower_for_gpu(f, S((256, 1000), dtype), S((1000, 250), dtype))) == 2
