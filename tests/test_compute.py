"""``compute="weight"`` (W_eff formed from the blocks, then one dense matmul) against the dense reference
R·W0·P built another way (tests/_reference.py), forward and gradients, for every variant; the auto rule;
and agreement with the activations path (POET-X) in bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax import ops
from poetjax.run_config import RunConfig
from poetjax.testing import assert_close, poet_config

from _reference import dense_effective, grads_against_dense

SHAPES = [(32, 48, 16), (40, 50, 16), (24, 17, 8)]  # (N, M, K); the last two ragged


@pytest.fixture(autouse=True)
def _float32_exact_matmuls():
    """float32 comparisons: a GPU would otherwise run float32 matmuls in TF32 (CPUs are exact anyway)."""
    with jax.default_matmul_precision("highest"):
        yield


def _layer(n, m, k, *, variant="fast", compute="weight", dtype=None, seed=0):
    cfg = poet_config(variant, block_size=k, init="keep", compute=compute, quant_group_size=8,
                      cayley_precision="highest")  # float32-exact on a GPU too
    kernel = jax.random.normal(jax.random.key(seed + 100), (n, m)) / np.sqrt(n)
    lay = pj.POETLinear(n, m, config=cfg, rngs=nnx.Rngs(seed), kernel=kernel, dtype=dtype)
    lay.theta_in[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), lay.theta_in.shape)
    lay.theta_out[...] = 0.1 * jax.random.normal(jax.random.key(seed + 2), lay.theta_out.shape)
    return lay


def _dense_of(lay, gens):
    # the reference needs the true (unpermuted) W0: the XQ variants store a dequantized copy of it
    w_true = jnp.take(jnp.take(lay.base_weight(), lay.perm_in_inv[...], axis=0), lay.perm_out[...], axis=1)
    return dense_effective(gens["theta_in"][...], gens["theta_out"][...], w_true, lay.perm_in[...],
                           lay.perm_out[...], lay.config.block_size)


@pytest.mark.parametrize("n,m,k", SHAPES)
@pytest.mark.parametrize("variant", ["fast", "mem", "xq", "xq_mem"])
def test_weight_compute_matches_dense_reference(n, m, k, variant):
    if variant.startswith("xq") and n % 8:
        pytest.skip("XQ needs the group size to divide the padded in-dimension")
    lay = _layer(n, m, k, variant=variant)
    x = jax.random.normal(jax.random.key(8), (3, 5, n))
    g = jax.random.normal(jax.random.key(9), (3, 5, m))
    gens = nnx.state(lay, pj.Generator)
    assert_close(lay(x), x @ _dense_of(lay, gens), jnp.float32, what=f"{variant} weight-compute output")
    grads_against_dense(lay, lambda gens: _dense_of(lay, gens), x, g, what=variant)


def test_weight_and_activations_agree_in_bf16_and_weight_never_rotates_activations(monkeypatch):
    n, m, k = 64, 96, 16
    x = jax.random.normal(jax.random.key(3), (4, 16, n)).astype(jnp.bfloat16)
    outs = {}
    for compute in ("activations", "weight"):
        lay = _layer(n, m, k, compute=compute, dtype=jnp.bfloat16)
        graphdef, gens, rest = nnx.split(lay, pj.Generator, ...)
        loss = lambda gens: jnp.sum(nnx.merge(graphdef, gens, rest)(x).astype(jnp.float32) ** 2)
        outs[compute] = (lay(x), jax.grad(loss)(gens))
    assert outs["weight"][0].dtype == jnp.bfloat16
    assert_close(outs["weight"][0], outs["activations"][0], jnp.bfloat16, what="bf16 output")
    for name in ("theta_in", "theta_out"):
        assert_close(outs["weight"][1][name][...], outs["activations"][1][name][...], jnp.bfloat16, "grad",
                     what=f"bf16 d{name}")
    calls = []
    monkeypatch.setattr(ops, "block_rotate_rows", lambda *a, **kw: calls.append(a) or a[0])
    real_rotate = ops.block_rotate
    monkeypatch.setattr(ops, "block_rotate", lambda a, r, **kw: calls.append(a.shape) or real_rotate(a, r, **kw))
    _layer(n, m, k, compute="weight")(x.astype(jnp.float32))
    assert calls == [(n, m)]  # one block product on the (Np, Mp) weight (plus the R_in einsum), none on x


def test_auto_compute_rule_and_errors(monkeypatch):
    ratio = ops.WEIGHT_TOKENS_PER_WIDTH

    def body(compute, tokens, n, m, memory="fast"):
        return ops.resolve_plan(pj.ExecConfig(impl="xla", compute=compute), memory=memory, block_size=8,
                                tokens=tokens, n=n, m=m).body

    # one CPU device (this process): the weight form once the layer sees max(N, M) tokens, in either memory mode
    for memory in ("fast", "mem"):
        assert body("auto", ratio * 100, 100, 60, memory) == "weight"
        assert body("auto", ratio * 100 - 1, 100, 60, memory) == "xla"
        assert body("auto", ratio * 100 - 1, 60, 100, memory) == "xla"
        assert body("auto", 0, 100, 60, memory) == "xla"  # tokens unknown (the Cayley map's plan)
    assert body("activations", 10 ** 9, 8, 8, "mem") == "xla"
    assert body("weight", 1, 8, 8) == "weight"
    with pytest.raises(ValueError, match="compute must be one of .*got compute='w'"):
        pj.ExecConfig(compute="w")
    with pytest.raises(ValueError, match="memory must be one of .*got memory='slow'"):
        ops.resolve_plan(pj.ExecConfig(), memory="slow", block_size=8)
    assert pj.POETConfig().exec.compute == "activations"  # POET-X unless asked; a run's default is "auto":
    assert RunConfig().poet.exec.compute == "auto"
    # the layer decides from its input's token count
    seen = []
    for variant in ("mem", "xq_mem", "fast"):
        lay = _layer(16, 16, 8, compute="auto", variant=variant)
        seen += [lay.plan(2).body, lay.plan(ratio * 16).body]
        assert_close(lay(jnp.ones((ratio * 16, 16))), jnp.ones((ratio * 16, 16)) @ lay.effective_kernel(),
                     jnp.float32, what=f"{variant} auto-compute output")
    assert seen == ["xla", "weight"] * 3
    # several CPU devices (data parallelism: the weight form would all-reduce W_eff-sized gradients), or a GPU:
    # POET-X's activations whatever the token count
    monkeypatch.setattr(ops.jax, "device_count", lambda: 8)
    assert body("auto", 10 ** 9, 100, 60, "fast") == body("auto", 10 ** 9, 100, 60, "mem") == "xla"
    monkeypatch.setattr(ops.jax, "device_count", lambda: 1)
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    assert body("auto", 10 ** 9, 100, 60, "fast") == body("auto", 10 ** 9, 100, 60, "mem") == "xla"
