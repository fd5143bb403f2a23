"""impl="pallas" vs impl="xla" on whole POET layers: same numbers (forward and gradients), plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
import poetjax as pj
from poetjax import ops
from poetjax.testing import assert_close, poet_config

from _modes import MODES

# (N, M, K, variant, dtype); the first is ragged on both sides (padded input and output blocks)
CASES = [(40, 50, 16, "fast", jnp.float32), (64, 96, 32, "mem", jnp.bfloat16)]


def _run(n, m, k, variant, dtype, impl, chunk=1):
    # float32-exact Cayley products: this compares implementations, and one-pass TF32 products (the
    # training default on a GPU) round differently in XLA and in the kernel (2e-4 apart on an H200)
    cfg = poet_config(variant, block_size=k, init="normalized_gaussian", impl=impl, perm_chunk=chunk,
                      cayley_precision="highest")
    lay = pj.POETLinear(n, m, config=cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, use_bias=True,
                        precision=jax.lax.Precision.HIGHEST)
    lay.theta_in[...] = 0.1 * jax.random.normal(jax.random.key(1), lay.theta_in.shape)
    lay.theta_out[...] = 0.1 * jax.random.normal(jax.random.key(2), lay.theta_out.shape)
    lay.bias[...] = jax.random.normal(jax.random.key(5), (m,)).astype(dtype)
    x = jax.random.normal(jax.random.key(3), (2, 9, n)).astype(dtype)
    g = jax.random.normal(jax.random.key(4), (2, 9, m))
    graphdef, gens, rest = nnx.split(lay, pj.Generator, ...)

    def loss(gens, x):
        y = nnx.merge(graphdef, gens, rest)(x)
        return jnp.sum(y.astype(jnp.float32) * g), y

    (_, y), (dgens, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(gens, x)
    return y, dgens["theta_in"][...], dgens["theta_out"][...], dx


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("chunk", [1, 16])
@pytest.mark.parametrize("n,m,k,variant,dtype", CASES)
def test_pallas_layer_matches_xla(n, m, k, variant, dtype, chunk, interpret, monkeypatch):
    """Both Pallas bodies (feature-major for uniform permutations, token-major for chunked ones) against XLA."""
    if chunk > 1 and (n % chunk or m % chunk):
        n, m = 64, 96  # chunked permutations need the run length to divide both dimensions
    monkeypatch.setattr(pk, "default_interpret", lambda: interpret)
    got = _run(n, m, k, variant, dtype, "pallas", chunk)
    want = _run(n, m, k, variant, dtype, "xla", chunk)
    assert got[0].dtype == want[0].dtype == dtype
    for name, a, b, kind in zip(("y", "dθ_in", "dθ_out", "dx"), got, want, ("value", "grad", "grad", "grad")):
        # bf16: the kernels sum dR in float32 where XLA rounds it to bf16 first; both within tolerance
        assert_close(a.astype(jnp.float32), b.astype(jnp.float32), dtype, kind, what=f"pallas vs xla {name}")


def test_poetize_passes_the_exec_config_to_every_layer():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(32, 48, rngs=rngs)
            self.down = nnx.Linear(48, 32, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    model = pj.poetize(MLP(nnx.Rngs(0)), poet_config(block_size=16, impl="pallas"), rngs=nnx.Rngs(1))
    assert [lay.plan(8).impl for _, lay in pj.poet_layers(model)] == ["pallas", "pallas"]
    assert [lay.plan(8).interpret for _, lay in pj.poet_layers(model)] == [pk.default_interpret()] * 2
    assert pj.POETLinear(32, 48, config=pj.POETConfig(block_size=16), rngs=nnx.Rngs(0)).config.exec.impl == "auto"


def test_impl_validation_and_resolution(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of .*got impl='triton'"):
        poet_config(impl="triton")
    def plan(impl, k, quantized=False, chunk=1):
        return ops.resolve_plan(pj.ExecConfig(impl=impl), memory="fast", block_size=k, quantized=quantized,
                                perm_chunk=chunk)

    with pytest.raises(ValueError, match="block_size=20 is not supported by the Pallas kernels"):
        plan("pallas", 20)
    assert plan("xla", 20) == ops.LayerPlan("xla", "xla", "fast", None, 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert plan("auto", 256).impl == "xla"
    assert plan("pallas", 256).interpret is True  # no GPU: the interpreter
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert plan("auto", 256) == ops.LayerPlan("pallas_features", "pallas", "fast", False, 1)  # Pallas on a GPU
    assert plan("auto", 20).impl == "xla"  # kernels need a multiple of 16: fall back
    assert plan("auto", 256, quantized=True).impl == "xla"  # the uint8 base: only XLA was measured
    # chunked permutations whose runs hold a 16-wide tile: the token-major kernels (no transposes)
    assert plan("auto", 256, chunk=16).body == plan("auto", 256, chunk=48).body == "pallas_tokens"
    assert plan("auto", 256, chunk=8).body == "pallas_features"
    assert plan("xla", 256, chunk=64).body == "xla"


def test_pallas_impl_runs_with_unsupported_block_size_only_when_asked():
    lay = pj.POETLinear(40, 40, config=poet_config(block_size=20, impl="pallas"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_size=20 is not supported"):
        lay(jnp.ones((2, 40)))
    lay = pj.POETLinear(40, 40, config=poet_config(block_size=20, impl="auto"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(lay(jnp.ones((2, 40))), jnp.ones((2, 40)) @ lay.effective_kernel(), rtol=1e-5)


def test_cayley_precision_validation():
    with pytest.raises(ValueError, match="cayley_precision must be one of"):
        poet_config(cayley_precision="tf32")


def test_layer_passes_its_cayley_precision(monkeypatch):
    from poetjax import layers
    seen = []
    real = layers.rotation_pair

    def spy(*args, **kw):
        seen.append(kw["precision"])
        return real(*args, **kw)

    monkeypatch.setattr(layers, "rotation_pair", spy)
    for prec in ("highest", "default", "bf16"):
        lay = pj.POETLinear(32, 48, config=poet_config(block_size=16, cayley_precision=prec), rngs=nnx.Rngs(0))
        lay(jnp.ones((2, 32)))
    lay.effective_kernel()  # merges and effective kernels: float32-exact
    assert seen == ["highest", "default", "bf16", "highest"]
