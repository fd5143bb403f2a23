"""``compute="gram"``: W_eff in the forward pass, dR from block Gram reductions in the backward pass
(``poetjax.ops._gram_linear``), against autodiff of the dense reference R·W0·P built another way
(tests/_reference.py): in float64 with the exact Cayley map and with the Neumann series plus the Newton
correction; in float32 through ``POETLinear`` for every variant, both implementations, ragged and chunked
shapes and a bias; across merges; and in bf16 against the activations path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax import ops
from poetjax.cayley import block_layout
from poetjax.perms import input_permutation, output_permutation
from poetjax.testing import assert_close, rel_err, tolerance

from _reference import cayley, dense_effective, grads_against_dense, poly, skew_scatter

# ‖Q‖₂ of the largest generator block just before a merge in a real run (benchmarks/gram_newton.py: 0.905 on
# llama_20m, BENCHMARKS.md "Block-Gram layer"), where ‖RᵀR − I‖₂ of the Neumann R reaches 0.89
REAL_Q_NORM = 0.9


@pytest.fixture(autouse=True)
def _float32_exact_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _problem(n, m, k, chunk, dtype, q_norm, seed=0):
    """Perms, a stored base weight and generators whose largest block has ‖Q‖₂ = q_norm."""
    keys = jax.random.split(jax.random.key(seed), 6)
    lin, lout = block_layout(n, k), block_layout(m, k)
    p_in, p_in_inv = input_permutation(keys[0], n, lin.padded, k, chunk)
    p_out, p_out_inv = output_permutation(keys[1], m, lout.padded, k, chunk)
    perms = ops.LayerPerms(p_in, p_in_inv, p_out, p_out_inv)
    w = jax.random.normal(keys[2], (n, m), dtype) / np.sqrt(n)
    thetas = []
    for key, lay in ((keys[3], lin), (keys[4], lout)):
        th = jax.random.normal(key, (lay.num_blocks, k * (k - 1) // 2), dtype)
        norms = np.linalg.norm(np.asarray(skew_scatter(th, k, lay.tail)), 2, axis=(-2, -1))
        thetas.append(th * (q_norm / norms.max()))
    return perms, w, ops.store_base_weight(w, perms), thetas, (lin, lout)


def _grad_errors(n, m, k, chunk, variant, exact, correction, q_norm, impl="xla"):
    """Relative errors of (dx, dθ_in, dθ_out) of the gram layer against autodiff of the dense reference."""
    dtype = jnp.float64
    perms, w, w0, (th_in, th_out), (lin, lout) = _problem(n, m, k, chunk, dtype, q_norm)
    keys = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(keys[0], (2, 9, n), dtype)
    ct = jax.random.normal(keys[1], (2, 9, m), dtype)
    blocks = (lambda q: cayley(q)) if exact else (lambda q: poly(q, 3))

    def layer(x, a, b):
        r_in, r_out = blocks(skew_scatter(a, k, lin.tail)), blocks(skew_scatter(b, k, lout.tail))
        y = ops.poet_x_linear(x, w0, r_in, r_out, perms, variant=variant, impl=impl, compute="gram",
                              perm_chunk=chunk, gram_correction=correction)
        return jnp.sum(y * ct)

    def dense(x, a, b):
        kernel = dense_effective(a, b, w, perms.perm_in, perms.perm_out, k, 3, exact)
        return jnp.sum(jnp.matmul(x, kernel, precision="highest") * ct)

    got = jax.grad(layer, argnums=(0, 1, 2))(x, th_in, th_out)
    want = jax.grad(dense, argnums=(0, 1, 2))(x, th_in, th_out)
    return [rel_err(a, b) for a, b in zip(got, want)]


# (N, M, K, chunk): divisible, ragged on both sides (tail blocks and padding), chunked permutations
F64_SHAPES = [(32, 48, 16, 1), (40, 50, 16, 1), (64, 32, 16, 8)]


@pytest.mark.parametrize("n,m,k,chunk", F64_SHAPES)
@pytest.mark.parametrize("variant", ["fast", "mem"])
@pytest.mark.parametrize("correction", ["none", "solve"])
def test_gram_vjp_is_exact_for_the_exact_cayley_map_float64(n, m, k, chunk, variant, correction):
    """Orthogonal R: R⁻ᵀ = R, so the block-Gram gradient equals autodiff to rounding, with or without a solve."""
    with jax.enable_x64(True):
        errs = _grad_errors(n, m, k, chunk, variant, exact=True, correction=correction, q_norm=REAL_Q_NORM)
    for name, e in zip(("dx", "dθ_in", "dθ_out"), errs):
        assert e <= tolerance(jnp.float64, "grad"), f"{name}: {e:.2e}"


@pytest.mark.parametrize("n,m,k,chunk", F64_SHAPES)
@pytest.mark.parametrize("variant", ["fast", "mem"])
def test_gram_vjp_with_neumann_and_the_default_correction_float64(n, m, k, chunk, variant):
    """The Neumann R is orthogonal only to O(‖Q‖⁴): at the ‖Q‖ of a real run the default correction (a solve)
    gives autodiff's gradient to float64 rounding, while R in place of R⁻ᵀ, or one Newton step, is not even
    within float32 tolerance."""
    default = pj.POETConfig().gram_correction
    with jax.enable_x64(True):
        errs = _grad_errors(n, m, k, chunk, variant, exact=False, correction=default, q_norm=REAL_Q_NORM)
        cheap = [_grad_errors(n, m, k, chunk, variant, exact=False, correction=c, q_norm=REAL_Q_NORM)
                 for c in ("none", "newton1")]
    for name, e in zip(("dx", "dθ_in", "dθ_out"), errs):
        assert e <= tolerance(jnp.float64, "grad"), f"{name}: {e:.2e}"
    for c, e in zip(("none", "newton1"), cheap):
        assert e[0] <= tolerance(jnp.float64, "grad")  # dx = dy·W_effᵀ needs no correction
        assert max(e[1:]) > tolerance(jnp.float32, "grad"), c


def test_each_newton_step_squares_the_error():
    with jax.enable_x64(True):
        errs = [max(_grad_errors(40, 50, 16, 1, "fast", exact=False, correction=c, q_norm=0.6)[1:])
                for c in ("none", "newton1", "newton2")]
    assert errs[0] > 1e-3 and errs[1] < errs[0] ** 2 * 10 and errs[2] < errs[1] ** 2 * 10, errs


def _layer(n, m, k, *, variant="fast", impl="xla", dtype=None, use_bias=False, chunk=1, compute="gram", seed=0,
           q_scale=0.02):
    cfg = pj.POETConfig(block_size=k, variant=variant, init="keep", compute=compute, impl=impl, quant_group_size=8,
                        perm_chunk=chunk, cayley_precision="highest")
    kernel = jax.random.normal(jax.random.key(seed + 100), (n, m)) / np.sqrt(n)
    lay = pj.POETLinear(n, m, config=cfg, rngs=nnx.Rngs(seed), kernel=kernel, dtype=dtype, use_bias=use_bias,
                        bias=jnp.linspace(-1, 1, m) if use_bias else None)
    lay.theta_in[...] = q_scale * jax.random.normal(jax.random.key(seed + 1), lay.theta_in.shape)
    lay.theta_out[...] = q_scale * jax.random.normal(jax.random.key(seed + 2), lay.theta_out.shape)
    return lay


def _dense_of(lay, gens):
    w_true = jnp.take(jnp.take(lay.base_weight(), lay.perm_in_inv[...], axis=0), lay.perm_out[...], axis=1)
    return dense_effective(gens["theta_in"][...], gens["theta_out"][...], w_true, lay.perm_in[...],
                           lay.perm_out[...], lay.config.block_size)


LAYER_CASES = [
    (32, 48, 16, 1, "fast", "xla", False), (40, 50, 16, 1, "mem", "xla", True), (48, 40, 16, 1, "xq", "xla", False),
    (40, 48, 16, 1, "xq_mem", "xla", True), (40, 50, 16, 1, "fast", "pallas", True), (64, 32, 16, 16, "mem", "pallas", False),
    (64, 96, 32, 16, "fast", "pallas", False), (64, 48, 16, 8, "fast", "xla", False),
]


@pytest.mark.parametrize("n,m,k,chunk,variant,impl,bias", LAYER_CASES)
def test_gram_layer_matches_dense_reference(n, m, k, chunk, variant, impl, bias):
    lay = _layer(n, m, k, variant=variant, impl=impl, use_bias=bias, chunk=chunk)
    x = jax.random.normal(jax.random.key(8), (3, 5, n))
    g = jax.random.normal(jax.random.key(9), (3, 5, m))
    gens = nnx.state(lay, pj.Generator)
    want = x @ _dense_of(lay, gens) + (lay.bias[...] if bias else 0)
    assert_close(lay(x), want, jnp.float32, what=f"{variant}/{impl} gram output")

    # the bias is added after W_eff: it shifts y, never the gradients of θ or x
    grads_against_dense(lay, lambda gens: _dense_of(lay, gens), x, g, what=f"{variant}/{impl}")


def test_gram_output_unchanged_across_a_merge():
    lay = _layer(40, 50, 16, variant="fast", q_scale=0.05)
    x = jax.random.normal(jax.random.key(3), (4, 40))
    before = lay(x)
    lay.merge_and_reinit(jax.random.key(11))
    assert not np.any(np.asarray(lay.theta_in[...]))
    assert_close(lay(x), before, jnp.float32, what="output across a merge")


def test_gram_agrees_with_activations_in_bf16_and_never_rotates_activations(monkeypatch):
    n, m, k = 64, 96, 16
    x = jax.random.normal(jax.random.key(3), (4, 16, n)).astype(jnp.bfloat16)
    # a random cotangent: Σ y² would be rotation-invariant, its exact dθ 0 and any relative error noise
    g = jax.random.normal(jax.random.key(4), (4, 16, m))
    outs = {}
    for compute in ("activations", "gram"):
        lay = _layer(n, m, k, compute=compute, dtype=jnp.bfloat16)
        graphdef, gens, rest = nnx.split(lay, pj.Generator, ...)
        loss = lambda gens: jnp.sum(nnx.merge(graphdef, gens, rest)(x).astype(jnp.float32) * g)
        outs[compute] = (lay(x), jax.jit(jax.grad(loss))(gens))   # jitted: XLA fuses the bf16 rounding of R
    assert outs["gram"][0].dtype == jnp.bfloat16
    assert_close(outs["gram"][0], outs["activations"][0], jnp.bfloat16, what="bf16 output")
    for name in ("theta_in", "theta_out"):
        assert_close(outs["gram"][1][name][...], outs["activations"][1][name][...], jnp.bfloat16, "grad",
                     what=f"bf16 d{name}")
    rotated = []
    real_rotate = ops.block_rotate
    monkeypatch.setattr(ops, "block_rotate", lambda a, r, **kw: rotated.append(a.shape) or real_rotate(a, r, **kw))
    lay = _layer(n, m, k)
    jax.grad(lambda x: jnp.sum(lay(x) ** 2))(x.astype(jnp.float32))
    assert rotated == [(n, m)]  # W_eff's one block product over the (Np, Mp) weight; nothing over x


def test_gram_config_errors():
    with pytest.raises(ValueError, match="gram_correction must be one of .*got gram_correction='newton9'"):
        pj.POETConfig(gram_correction="newton9")
    with pytest.raises(ValueError, match="gram_correction must be one of .*got gram_correction='lu'"):
        ops.poet_x_linear(jnp.ones((2, 16)), jnp.ones((16, 16)), jnp.ones((1, 16, 16)), jnp.ones((1, 16, 16)),
                          ops.LayerPerms(*(jnp.arange(16, dtype=jnp.int32),) * 4), compute="gram", gram_correction="lu")
    with pytest.raises(ValueError, match="compute='gram' is not available for variant='fs'"):
        pj.POETConfig(variant="fs", compute="gram", block_size=0.5)


@pytest.mark.parametrize("scan,remat,scope,variant", [(False, "none", "linear", "fast"),
                                                      (True, "dots_saveable", "model", "fast"),
                                                      (True, "full", "block", "mem"),
                                                      (False, "dots_with_no_batch_dims_saveable", "auto", "mem")])
def test_gram_llama_matches_activations_under_scan_remat_and_shared_maps(scan, remat, scope, variant):
    """A whole model: the loss and every gradient of compute="gram" equal POET-X's (activations), with stacked
    layers under lax.scan, each remat policy and each Cayley scope."""
    from poetjax.models import Llama, LlamaConfig, stack_layers
    from poetjax.train.steps import loss_fn, split_model

    from _reference import randomize_generators

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_heads=4, num_layers=2, max_seq_len=16,
                      remat=remat)
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
    out = {}
    for compute in ("activations", "gram"):
        model = Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
        pj.poetize(model, pj.POETConfig(block_size=8, variant=variant, cayley_scope=scope, impl="xla", compute=compute,
                                        cayley_precision="highest"), rngs=nnx.Rngs(params=jax.random.key(1)))
        randomize_generators(model, 0.1)
        model = stack_layers(model) if scan else model
        graphdef, params, frozen = split_model(model)
        loss, g = jax.value_and_grad(lambda p: loss_fn(graphdef, p, frozen, tokens))(params)
        out[compute] = (loss, {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(g)[0]})
    (loss_a, g_a), (loss_g, g_g) = out["activations"], out["gram"]
    assert_close(loss_g, loss_a, jnp.float32, what="loss")
    assert g_g.keys() == g_a.keys() and any("theta" in k for k in g_g)
    for k in g_g:
        assert_close(g_g[k], g_a[k], jnp.float32, "grad", what=f"grad {k}")


def test_auto_compute_never_picks_gram_before_it_is_measured():
    for variant in ("fast", "mem"):
        for tokens in (1, 10 ** 3, 10 ** 9):
            assert ops.resolve_compute("auto", tokens, 4096, 4096, variant) != "gram"
    assert ops.resolve_compute("gram", 1, 8, 8) == "gram"
