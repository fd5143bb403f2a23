"""Shared Cayley maps (``ExecConfig.cayley_scope``, ``poetjax.layers.CayleyScopeHook``): one batched map
for many layers' blocks computes the same rotations, losses and gradients as per-layer maps, and really
does use fewer maps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax import cayley, ops
from poetjax import perms as pm
from poetjax.layers import compute_rotations
from poetjax.models import Llama, LlamaConfig, stack_layers
from poetjax.models.llama import rope_tables
from poetjax.testing import assert_close, poet_config
from poetjax.train.steps import loss_fn, split_model

from _reference import randomize_generators

CFG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_heads=4, num_layers=3, max_seq_len=16)


@pytest.fixture(autouse=True)
def _float32_exact_matmuls():
    """float32 comparisons: a GPU would otherwise run float32 matmuls in TF32 (CPUs are exact anyway)."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_rotation_group_equals_separate_maps_with_leading_axes_and_mixed_block_sizes(impl):
    k16 = [cayley.block_layout(40, 16), cayley.block_layout(64, 16)]
    k8 = cayley.block_layout(20, 8)
    keys = jax.random.split(jax.random.key(0), 3)
    thetas = [0.1 * jax.random.normal(keys[0], (3, k16[0].num_blocks, k16[0].num_packed)),  # stacked (L=3)
              0.1 * jax.random.normal(keys[1], (k16[1].num_blocks, k16[1].num_packed)),
              0.1 * jax.random.normal(keys[2], (2, k8.num_blocks, k8.num_packed))]
    layouts = [k16[0], k16[1], k8]
    if impl == "pallas":  # the kernels' block sizes; K=8 falls back to XLA inside
        layouts_ok = [cayley.block_layout(40, 16), cayley.block_layout(64, 16)]
        layouts, thetas = layouts_ok, thetas[:2]

    def grouped(ts):
        rs = cayley.rotation_group(list(zip(ts, layouts)), impl=impl, precision="highest")
        return sum(jnp.sum(jnp.sin(r) * (i + 1)) for i, r in enumerate(rs)), rs

    def apart(ts):
        rs = [cayley.rotations(t, lay, impl="xla") for t, lay in zip(ts, layouts)]
        return sum(jnp.sum(jnp.sin(r) * (i + 1)) for i, r in enumerate(rs)), rs

    (_, got), g_got = jax.value_and_grad(grouped, has_aux=True)(thetas)
    (_, want), g_want = jax.value_and_grad(apart, has_aux=True)(thetas)
    for t, lay, a, b in zip(thetas, layouts, got, want):
        assert a.shape == (*t.shape[:-1], lay.block_size, lay.block_size)
        assert_close(a, b, jnp.float32, what="R")
    for a, b in zip(g_got, g_want):
        assert_close(a, b, jnp.float32, "grad", what="dθ")
    # the ragged tail of the 40-wide layout stays the identity outside its corner, in every stacked slice
    tail = layouts[0].tail
    np.testing.assert_array_equal(np.asarray(got[0][:, -1, tail:, tail:]),
                                  np.broadcast_to(np.eye(16 - tail), (3, 16 - tail, 16 - tail)))


def test_the_backward_of_a_shared_map_gathers_the_cotangents_in_one_concatenation():
    """The map's output is split among its items; the backward must join their cotangents with one
    concatenation, not sum one zero-padded full-size copy per item (4 ms of a llama_60m step, BENCHMARKS.md)."""
    layouts = [cayley.block_layout(32, 8), cayley.block_layout(48, 8), cayley.block_layout(16, 8)]
    thetas = [jnp.zeros((lay.num_blocks, lay.num_packed)) for lay in layouts]

    def loss(ts):
        return sum(jnp.sum(jnp.sin(r)) for r in cayley.rotation_group(list(zip(ts, layouts)), impl="xla"))

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(thetas))
    assert "pad[" not in jaxpr and "concatenate[" in jaxpr


def _model(scope, *, scan, remat="none", variant="fast", compute="activations"):
    cfg = LlamaConfig(**{**CFG.__dict__, "remat": remat})
    model = Llama(cfg, rngs=nnx.Rngs(params=jax.random.key(0)))
    pj.poetize(model, poet_config(block_size=8, variant=variant, cayley_scope=scope, impl="xla",
                                    cayley_precision="highest", compute=compute, quant_group_size=8),
               rngs=nnx.Rngs(params=jax.random.key(1)))
    randomize_generators(model, 0.3)
    return stack_layers(model) if scan else model


def _loss_and_grads(model, tokens):
    graphdef, params, frozen = split_model(model)
    loss, g = jax.value_and_grad(lambda p: loss_fn(graphdef, p, frozen, tokens))(params)
    return loss, {str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(g)[0]}


@pytest.mark.parametrize("scan,compute", [(False, "activations"), (True, "activations"), (False, "weight"),
                                          (True, "weight")])
def test_a_model_wide_step_pads_nothing(scan, compute):
    """The gradient of a model whose layers share one map holds no pad: every piece the map (or the batched
    kernels) is cut into returns its cotangent through one concatenation (the old slices wrote 8 GiB of
    zero-padded copies per llama_60m step; BENCHMARKS.md, "The shared map's backward")."""
    model = _model("model", scan=scan, compute=compute)
    graphdef, params, frozen = split_model(model)
    tokens = jnp.zeros((2, 9), jnp.int32)
    text = jax.jit(jax.grad(lambda p: loss_fn(graphdef, p, frozen, tokens))).lower(params).as_text()
    assert "dot_general" in text and "stablehlo.pad" not in text


@pytest.mark.parametrize("scan,remat,variant", [(False, "none", "fast"), (True, "full", "fast"),
                                                (True, "none", "mem"), (False, "full", "mem")])
def test_every_scope_gives_the_same_loss_and_gradients(scan, remat, variant):
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, CFG.vocab_size)
    ref_loss, ref_g = _loss_and_grads(_model("linear", scan=scan, remat=remat, variant=variant), tokens)
    for scope in ("block", "model", "auto"):
        loss, g = _loss_and_grads(_model(scope, scan=scan, remat=remat, variant=variant), tokens)
        assert_close(loss, ref_loss, jnp.float32, "same", what=f"{scope} loss")
        assert g.keys() == ref_g.keys()
        theta_grads = [k for k in g if "theta" in k]
        assert theta_grads and all(np.abs(g[k]).max() > 0 for k in theta_grads)
        for k in g:
            assert_close(g[k], ref_g[k], jnp.float32, "same", what=f"{scope} grad {k}")


@pytest.mark.parametrize("scan,remat,variant", [(False, "none", "fast"), (True, "full", "fast"),
                                                (True, "none", "xq")])
def test_kernels_formed_together_give_the_same_loss_and_gradients_as_each_layers_own(scan, remat, variant):
    """The weight form under scope "model" forms every layer's W_eff before the layers run, one batched
    product per shape (``shared_call_args``; a uint8 base, POET-XQ, forms its own inside each layer); per
    layer ("linear") each forms its own, and the activations path never forms one. All three are the same
    function (the batched products may round differently from one product per layer: value/grad tolerances,
    not "same")."""
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, CFG.vocab_size)
    kw = dict(scan=scan, remat=remat, variant=variant)
    ref_loss, ref_g = _loss_and_grads(_model("linear", compute="weight", **kw), tokens)
    act_loss, act_g = _loss_and_grads(_model("linear", **kw), tokens)
    loss, g = _loss_and_grads(_model("model", compute="weight", **kw), tokens)
    assert_close(loss, ref_loss, jnp.float32, what="loss, kernels formed together")
    assert_close(loss, act_loss, jnp.float32, what="loss against the activations path")
    assert g.keys() == ref_g.keys() == act_g.keys()
    assert all(np.abs(g[k]).max() > 0 for k in g if "theta" in k)
    for k in g:
        assert_close(g[k], ref_g[k], jnp.float32, "grad", what=f"grad {k}, kernels formed together")
        assert_close(g[k], act_g[k], jnp.float32, "grad", what=f"grad {k} against the activations path")


@pytest.mark.parametrize("scan", [False, True])
def test_the_models_kernels_come_from_two_batched_products(scan):
    """Forming W_eff takes two products (one per side); under scope "model" they are batched over every layer
    of the model, whatever its shape (the three projection shapes here): 2 in all, where rotating the
    activations takes 2 per layer (both models share one Cayley map, and each projection keeps its one dense
    product)."""
    tokens = jnp.zeros((1, 4), jnp.int32)

    def dots(model):  # dot_generals in the lowered forward pass
        return jax.jit(lambda m: m(tokens)).lower(model).as_text().count("dot_general")

    rotating, together = dots(_model("model", scan=scan)), dots(_model("model", scan=scan, compute="weight"))
    shapes = {(lay.in_features, lay.out_features) for _, lay in pj.poet_layers(_model("linear", scan=False))}
    assert len(shapes) == 3
    layers_traced = 1 if scan else CFG.num_layers  # a scan traces its body once
    assert rotating - together == 2 * 7 * layers_traced - 2, (rotating, together)


def test_tiled_kernels_match_each_layers_own_in_float64():
    """``ops.tiled_weights_from_blocks`` of groups of several shapes against ``weight_from_blocks`` of each
    layer, in float64 (the same products regrouped: equal to rounding), and its VJP against the per-layer
    one's."""
    with jax.enable_x64(True):
        k, groups = 4, []
        for g, (n, m, n_l) in enumerate(((8, 8, 3), (8, 12, 2), (12, 8, 1), (10, 7, 2))):  # the last padded
            keys = jax.random.split(jax.random.key(g), 4)
            n_p, m_p = -(-n // k) * k, -(-m // k) * k
            w0 = jax.random.normal(keys[0], (n_l, n_p, m_p), jnp.float64)
            r_in = jax.random.normal(keys[1], (n_l, n_p // k, k, k), jnp.float64)
            r_out = jax.random.normal(keys[2], (n_l, m_p // k, k, k), jnp.float64)
            ps = [ops.LayerPerms(*pm.input_permutation(kk, n, n_p, k, 1), *pm.output_permutation(kk, m, m_p, k, 1))
                  for kk in jax.random.split(keys[3], n_l)]
            groups.append((w0, r_in, r_out, jax.tree.map(lambda *x: jnp.stack(x), *ps)))

        def tiled(rs):
            return ops.tiled_weights_from_blocks([(w, ri, ro, p) for (w, _, _, p), (ri, ro) in zip(groups, rs)])

        def each(rs):
            return [jax.vmap(ops.weight_from_blocks)(w, ri, ro, p) for (w, _, _, p), (ri, ro) in zip(groups, rs)]

        rs = [(ri, ro) for _, ri, ro, _ in groups]
        for a, b in zip(tiled(rs), each(rs)):
            assert a.shape == b.shape
            assert_close(a, b, jnp.float64, "same", what="tiled kernels")
        cot = [jax.random.normal(jax.random.key(9 + i), w.shape, jnp.float64) for i, w in enumerate(each(rs))]
        g_tiled = jax.vjp(tiled, rs)[1](cot)[0]
        g_each = jax.vjp(each, rs)[1](cot)[0]
        for a, b in zip(jax.tree.leaves(g_tiled), jax.tree.leaves(g_each)):
            assert_close(a, b, jnp.float64, "same", what="tiled kernels' VJP")


@pytest.mark.parametrize("scan", [False, True])
def test_scope_sets_how_many_cayley_maps_a_forward_pass_traces(monkeypatch, scan):
    calls = []
    real = cayley._blocks_from_masked

    def spy(theta, *args):
        calls.append(theta.shape[0])
        return real(theta, *args)

    monkeypatch.setattr(cayley, "_blocks_from_masked", spy)
    tokens = jnp.zeros((1, 4), jnp.int32)
    blocks_per_layer = None
    for scope, expect in (("linear", 7 * (1 if scan else 3)), ("block", 1 if scan else 3), ("model", 1)):
        calls.clear()
        model = _model(scope, scan=scan)
        jax.eval_shape(lambda m: m(tokens), model)
        assert len(calls) == expect, (scope, calls)
        if scope == "model":  # one map holds every block of every layer
            per_layer = sum(lay.theta_in.shape[-2] + lay.theta_out.shape[-2]
                            for _, lay in pj.poet_layers(model))
            assert calls == [per_layer * (CFG.num_layers if scan else 1)]
            blocks_per_layer = per_layer
    assert blocks_per_layer is not None


def test_shared_rotations_are_the_layers_own_and_provided_ones_are_used():
    model = _model("linear", scan=False)
    x = jax.random.normal(jax.random.key(3), (2, 5, CFG.hidden_size))
    block = model.layers[0]
    rots = compute_rotations(block)
    assert set(rots) == {"attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
                         "mlp/up_proj", "mlp/down_proj"}
    lay = block.attn.q_proj
    own_in, own_out = lay.rotation_blocks(precision=lay.config.exec.cayley_precision)
    assert_close(rots["attn/q_proj"][0], own_in, jnp.float32, "same", what="R_in")
    assert_close(rots["attn/q_proj"][1], own_out, jnp.float32, "same", what="R_out")
    y = lay(x)
    assert_close(lay(x, rotations=rots["attn/q_proj"]), y, jnp.float32, "same", what="shared-map output")
    # provided blocks are really what the layer uses: identity rotations give x · W_s-as-dense
    eye = (jnp.broadcast_to(jnp.eye(8), rots["attn/q_proj"][0].shape),
           jnp.broadcast_to(jnp.eye(8), rots["attn/q_proj"][1].shape))
    y_eye = lay(x, rotations=eye)
    w_plain = pj.ops.effective_kernel(lay.base_weight(), *eye, lay.perms)
    assert_close(y_eye, x @ w_plain, jnp.float32, what="identity-rotation output")
    assert rel_diff(y_eye, y) > 1e-2  # and differs from the real rotations'
    # the block passes them per projection (what the model's hook hands it)
    cos, sin = rope_tables(jnp.arange(5), CFG.head_dim, CFG.rope_theta)
    args = {p: {"rotations": r} for p, r in rots.items()}
    assert_close(block(x, cos, sin, args), block(x, cos, sin), jnp.float32, "same", what="block with shared maps")
    with pytest.raises(ValueError, match="POET-FS layer maps its own"):
        pj.POETLinear(16, 16, config=pj.POETConfig(family="fs", block_size=0.5), rngs=nnx.Rngs(0))(
            x[..., :16], rotations=eye)
    # a kernel formed elsewhere is used as is: the layer's own effective kernel gives its own output
    w = lay.effective_kernel()
    assert_close(lay(x, kernel=w), y, jnp.float32, what="output from a provided kernel")
    assert_close(lay(x, kernel=jnp.zeros_like(w)), jnp.zeros_like(y), jnp.float32, "same", what="zero kernel")
    with pytest.raises(ValueError, match=r"kernel= must be the layer's W_eff \(32, 32\) .*got shape \(32, 40\)"):
        lay(x, kernel=jnp.zeros((32, 40)))
    with pytest.raises(ValueError, match="without rotations=.* and rotations="):
        lay(x, kernel=w, rotations=eye)


def rel_diff(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fs_layers_map_their_own_blocks_under_any_scope():
    tokens = jax.random.randint(jax.random.key(4), (1, 6), 0, CFG.vocab_size)
    losses = []
    for scope in ("linear", "model"):
        model = Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(0)))
        pj.poetize(model, poet_config(block_size=0.5, variant="fs", cayley_scope=scope),
                   rngs=nnx.Rngs(params=jax.random.key(1)))
        assert compute_rotations(model) == {}
        losses.append(_loss_and_grads(model, tokens)[0])
    assert_close(losses[1], losses[0], jnp.float32, "same", what="fs loss")


def test_cayley_scope_is_validated():
    with pytest.raises(ValueError, match="cayley_scope must be one of .*got cayley_scope='layers'"):
        poet_config(cayley_scope="layers")


def test_auto_scope_is_model_only_for_float_fast():
    from poetjax.layers import cayley_scope
    got = {}
    for variant in ("fast", "mem", "xq", "xq_mem"):
        model = Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(0)))
        pj.poetize(model, poet_config(block_size=8, variant=variant, quant_group_size=8),
                   rngs=nnx.Rngs(params=jax.random.key(1)))
        got[variant] = cayley_scope(model)
    assert got == {"fast": "model", "mem": "block", "xq": "block", "xq_mem": "block"}
    assert cayley_scope(Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(0)))) == "linear"  # no POET layers


def test_the_model_knows_nothing_of_poet_and_poetize_installs_the_hook():
    """LLaMA imports no POET module; its generic ``block_hook`` slot is empty until ``poetize`` (or
    ``build_poetized``) fills it with the configured scope, and "linear" leaves it empty."""
    import ast
    import inspect

    from poetjax.layers import CayleyScopeHook
    from poetjax.models import llama

    tree = ast.parse(inspect.getsource(llama))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("poetjax") and not m.startswith("poetjax.models")}
    model = Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(0)))
    assert model.block_hook is None
    pj.poetize(model, poet_config(block_size=8, cayley_scope="block"), rngs=nnx.Rngs(params=jax.random.key(1)))
    assert model.block_hook == CayleyScopeHook("block")
    built = pj.build_poetized(lambda: Llama(CFG, rngs=nnx.Rngs(params=jax.random.key(0))),
                              poet_config(block_size=8, cayley_scope="linear"), key=jax.random.key(1))
    assert built.block_hook is None
