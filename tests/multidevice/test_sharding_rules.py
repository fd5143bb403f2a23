"""The sharding rules on real meshes: W0 split over fsdp and never all-reduced (checked in the compiled
HLO of the step), everything else where the rules put it, before and after a step and a merge."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from poetjax import distributed as dist
from poetjax.run_config import load_config
from poetjax.train import sharded
from poetjax.train.optimizers import make_optimizer

from _runs import TINY

# vocab 384 keeps every trainable leaf and shard shape apart from the W0 shapes (64, 64), (64, 128),
# (128, 64) and their shards, so "an all-reduce of a W0-shaped array" means W0 (asserted below).
OVERRIDES = ["model.num_layers=1", "model.vocab_size=384", "mesh.min_shard_size=4096"]
COLLECTIVE = re.compile(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


def _collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op, [result array shapes]) of every cross-device collective in compiled HLO text."""
    out = []
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d) for _, dims in ARRAY.findall(m.group(1))]
            out.append((m.group(2), shapes))
    return out


def _leaves(tree, name):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if jax.tree_util.keystr(p).endswith(f"['{name}']")]


def _split(shape, dim, n):
    return tuple(s // n if d == dim else s for d, s in enumerate(shape))


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(TINY, OVERRIDES)
    return cfg, make_optimizer(cfg)


@pytest.mark.parametrize("mesh_shape", [(2, 4), (8, 1)])
def test_w0_is_sharded_over_fsdp_and_no_all_reduce_touches_it(setup, mesh_shape):
    cfg, tx = setup
    data, fsdp = mesh_shape
    mesh = dist.make_mesh(data, fsdp)
    graphdef, state, shardings = sharded.init_train_state(cfg, tx, mesh)
    w0s = _leaves(state.frozen, "w0")
    assert len(w0s) == 7  # q, k, v, o, gate, up, down of the one layer

    def expected_w0_spec(shape):
        # the rule: split the largest dimension that fsdp divides (here every dimension is divisible)
        if fsdp == 1:
            return P()
        dim = int(np.argmax(shape))
        return P(*["fsdp" if d == dim else None for d in range(len(shape))])

    def check_layout(st):
        for path, w in _leaves(st.frozen, "w0"):
            spec = expected_w0_spec(w.shape)
            assert w.sharding.spec == spec, (path, w.sharding.spec, spec)
            shard = w.addressable_shards[0].data.shape
            assert shard == (_split(w.shape, int(np.argmax(w.shape)), fsdp) if fsdp > 1 else w.shape), path
            # fsdp distinct pieces, each held by the `data` devices of one column of the mesh
            assert len({tuple((i.start, i.stop) for i in s.index) for s in w.addressable_shards}) == fsdp
        for name in ("theta_in", "theta_out", "perm_in", "perm_out", "scale"):
            for path, x in _leaves(st.params, name) + _leaves(st.frozen, name):
                assert x.sharding.is_fully_replicated, path
        emb = st.params["embed"]["embedding"]  # 384 x 64 >= min_shard_size: split like W0
        assert emb.sharding.spec == (P("fsdp", None) if fsdp > 1 else P())
        mu = [x for p, x in jax.tree_util.tree_flatten_with_path(st.opt_state)[0]
              if "mu" in jax.tree_util.keystr(p) and jax.tree_util.keystr(p).endswith("['embedding']")]
        assert len(mu) == 1 and mu[0].sharding.spec == emb.sharding.spec  # Adam moments follow their param
        assert st.step.sharding.is_fully_replicated and st.key.sharding.is_fully_replicated

    check_layout(state)

    tokens = jax.device_put(jax.random.randint(jax.random.key(1), (8, 33), 0, 384, jnp.int32),
                            dist.batch_sharding(mesh))
    step = sharded.make_sharded_train_step(graphdef, tx, shardings, mesh, donate=False).lower(state, tokens).compile()
    merge = sharded.make_sharded_merge_step(graphdef, shardings, mesh, donate=False).lower(state).compile()
    after_step, _ = step(state, tokens)
    after_merge = merge(after_step)
    check_layout(after_step)
    check_layout(after_merge)
    w_before = np.asarray(state.frozen["layers"][0]["attn"]["q_proj"]["w0"])
    np.testing.assert_array_equal(np.asarray(after_step.frozen["layers"][0]["attn"]["q_proj"]["w0"]), w_before)
    assert not np.array_equal(np.asarray(after_merge.frozen["layers"][0]["attn"]["q_proj"]["w0"]), w_before)

    # The compiled step: what crosses devices.
    w0_shapes = {w.shape for _, w in w0s}
    w0_pieces = w0_shapes | {w.addressable_shards[0].data.shape for _, w in w0s}
    trainable = {s for x in jax.tree.leaves(state.params) for s in (x.shape, x.addressable_shards[0].data.shape)}
    thetas = _leaves(state.params, "theta_in") + _leaves(state.params, "theta_out")
    generator_grads = {x.shape for _, x in thetas} | {(x.shape[0], 16, 16) for _, x in thetas}  # packed or (I, K, K)
    assert not ((trainable | generator_grads) & w0_pieces), "test precondition: trainable and W0 shapes differ"

    ops = _collectives(step.as_text())
    reduced = _reduced(ops)
    assert generator_grads & reduced, f"the generators' gradients must be all-reduced: {reduced}"
    assert not (reduced & w0_pieces), f"W0-shaped reductions: {reduced & w0_pieces}"
    gathered = {s for op, shapes in ops if op == "all-gather" for s in shapes}
    if fsdp > 1:
        assert w0_shapes <= gathered  # FSDP: each W0 is all-gathered where it is used
    else:
        assert not (gathered & w0_pieces)  # pure data parallel: W0 never moves
    assert not [s for op, shapes in ops if op in ("all-to-all", "collective-permute") for s in shapes
                if s in w0_pieces]
    assert not (_reduced(_collectives(merge.as_text())) & w0_pieces)


def _reduced(ops) -> set:
    return {s for op, shapes in ops if op in ("all-reduce", "reduce-scatter") for s in shapes}


def test_the_hlo_check_sees_weight_gradient_reductions_of_a_trainable_model():
    """The same check on the AdamW baseline (every projection weight trainable, same shapes as POET's
    W0s): there the weights' gradients are reduced, so the POET result above is not a blind spot."""
    cfg = load_config(TINY, OVERRIDES + ["optimizer.name=adamw"])
    tx = make_optimizer(cfg)
    mesh = dist.make_mesh(2, 4)
    graphdef, state, shardings = sharded.init_train_state(cfg, tx, mesh)
    kernels = [x for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
               if jax.tree_util.keystr(p).endswith("['kernel']") and "lm_head" not in jax.tree_util.keystr(p)]
    assert len(kernels) == 7
    pieces = {s for x in kernels for s in (x.shape, x.addressable_shards[0].data.shape)}
    step = sharded.make_sharded_train_step(graphdef, tx, shardings, mesh, donate=False)
    tokens = jax.device_put(jnp.zeros((8, 33), jnp.int32), dist.batch_sharding(mesh))
    assert _reduced(_collectives(step.lower(state, tokens).compile().as_text())) & pieces
