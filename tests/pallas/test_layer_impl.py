"""impl="pallas" vs impl="xla" on whole POET layers: same numbers (forward and gradients), plumbing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import pallas_kernels as pk
import poetjax as pj
from poetjax import ops
from poetjax.testing import assert_close

from _modes import MODES

# (N, M, K, variant, dtype); the first is ragged on both sides (padded input and output blocks)
CASES = [(40, 50, 16, "fast", jnp.float32), (64, 96, 32, "mem", jnp.bfloat16)]


def _run(n, m, k, variant, dtype, impl, layout="auto"):
    # float32-exact Cayley products: this compares implementations, and one-pass TF32 products (the
    # training default on a GPU) round differently in XLA and in the kernel (2e-4 apart on an H200)
    cfg = pj.POETConfig(block_size=k, variant=variant, init="normalized_gaussian", impl=impl, layout=layout,
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
@pytest.mark.parametrize("impl,layout", [("pallas", "tokens"), ("pallas", "features"), ("xla", "features")])
@pytest.mark.parametrize("n,m,k,variant,dtype", CASES)
def test_pallas_layer_matches_xla(n, m, k, variant, dtype, impl, layout, interpret, monkeypatch):
    """Every implementation and layout against XLA on token-major activations."""
    if impl == "xla" and not interpret:
        pytest.skip("no kernel involved: the interpret run covers it")
    monkeypatch.setattr(pk, "default_interpret", lambda: interpret)
    got = _run(n, m, k, variant, dtype, impl, layout)
    want = _run(n, m, k, variant, dtype, "xla", "tokens")
    assert got[0].dtype == want[0].dtype == dtype
    for name, a, b, kind in zip(("y", "dθ_in", "dθ_out", "dx"), got, want, ("value", "grad", "grad", "grad")):
        # bf16: the kernels sum dR in float32 where XLA rounds it to bf16 first; both within tolerance
        assert_close(a.astype(jnp.float32), b.astype(jnp.float32), dtype, kind, what=f"pallas vs xla {name}")


def test_poetize_passes_impl_and_layers_can_override():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(32, 48, rngs=rngs)
            self.down = nnx.Linear(48, 32, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.relu(self.up(x)))

    model = pj.poetize(MLP(nnx.Rngs(0)), pj.POETConfig(block_size=16, impl="pallas"), rngs=nnx.Rngs(1))
    assert [lay.impl for _, lay in pj.poet_layers(model)] == ["pallas", "pallas"]
    lay = pj.POETLinear(32, 48, config=pj.POETConfig(block_size=16, impl="pallas"), rngs=nnx.Rngs(0), impl="xla")
    assert lay.impl == "xla"
    assert pj.POETLinear(32, 48, config=pj.POETConfig(block_size=16), rngs=nnx.Rngs(0)).impl == "auto"


def test_impl_validation_and_resolution(monkeypatch):
    with pytest.raises(ValueError, match="impl must be one of .*got impl='triton'"):
        pj.POETConfig(impl="triton")
    with pytest.raises(ValueError, match="impl must be one of .*got impl='cuda'"):
        pj.POETLinear(32, 48, config=pj.POETConfig(block_size=16), rngs=nnx.Rngs(0), impl="cuda")
    with pytest.raises(ValueError, match="block_size=20 is not supported by the Pallas kernels"):
        ops.resolve_impl("pallas", 20)
    assert ops.resolve_impl("xla", 20) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert ops.resolve_impl("auto", 256) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert ops.resolve_impl("auto", 256) == "pallas"   # auto follows the measurements: Pallas on a GPU
    assert ops.resolve_impl("auto", 20) == "xla"  # kernels need a multiple of 16: fall back
    assert pk.default_interpret() is False


def test_pallas_impl_runs_with_unsupported_block_size_only_when_asked():
    lay = pj.POETLinear(40, 40, config=pj.POETConfig(block_size=20, impl="pallas"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block_size=20 is not supported"):
        lay(jnp.ones((2, 40)))
    lay = pj.POETLinear(40, 40, config=pj.POETConfig(block_size=20, impl="auto"), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(lay(jnp.ones((2, 40))), jnp.ones((2, 40)) @ lay.effective_kernel(), rtol=1e-5)


def test_layout_validation_and_resolution():
    with pytest.raises(ValueError, match="layout must be one of .*got layout='rows'"):
        pj.POETConfig(layout="rows")
    with pytest.raises(ValueError, match="layout must be one of"):
        ops.resolve_layout("rows", "xla")
    assert ops.resolve_layout("auto", "pallas") == ops.AUTO_LAYOUT["pallas"]
    assert ops.resolve_layout("auto", "xla") == ops.AUTO_LAYOUT["xla"]
    assert ops.resolve_layout("features", "xla") == "features"
    # chunked permutations whose runs hold a 16-wide tile: the token-major kernels (no transposes)
    assert ops.resolve_layout("auto", "pallas", 16) == ops.resolve_layout("auto", "pallas", 48) == "tokens"
    assert ops.resolve_layout("auto", "pallas", 8) == ops.AUTO_LAYOUT["pallas"]
    assert ops.resolve_layout("auto", "xla", 64) == ops.AUTO_LAYOUT["xla"]
    assert ops.resolve_layout("features", "pallas", 64) == "features"
    with pytest.raises(ValueError, match="cayley_precision must be one of"):
        pj.POETConfig(cayley_precision="tf32")


def test_layer_passes_its_cayley_precision_and_xq_auto_stays_on_xla(monkeypatch):
    from poetjax import layers
    seen = []
    real = layers.rotation_pair

    def spy(*args, **kw):
        seen.append(kw["precision"])
        return real(*args, **kw)

    monkeypatch.setattr(layers, "rotation_pair", spy)
    for prec in ("highest", "default", "bf16"):
        lay = pj.POETLinear(32, 48, config=pj.POETConfig(block_size=16, cayley_precision=prec), rngs=nnx.Rngs(0))
        lay(jnp.ones((2, 32)))
    lay.effective_kernel()  # merges and effective kernels: float32-exact
    assert seen == ["highest", "default", "bf16", "highest"]
    calls = []
    real_resolve = ops.resolve_impl
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(ops, "resolve_impl", lambda *a, **kw: calls.append(real_resolve(*a, **kw)) or "xla")
    xq = pj.POETLinear(32, 48, config=pj.POETConfig(block_size=16, variant="xq", quant_group_size=16),
                       rngs=nnx.Rngs(0))
    xq(jnp.ones((2, 32)))
    assert calls and set(calls) == {"xla"}  # "auto" resolves to XLA for XQ, even on a GPU
    assert real_resolve("auto", 16) == "pallas"  # float layers don't
