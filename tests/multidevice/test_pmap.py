"""The library under ``jax.pmap``: the POET layer (forward and generator gradients) and the train and
merge steps are pure functions of explicit arrays and keys, so they run as 8 pmapped replicas, each
with its slice of the batch, and match the single-device result."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poetjax import POETConfig
from poetjax.layers import POETLinear
from poetjax.run_config import load_config
from poetjax.testing import assert_close
from poetjax.train import steps as core
from poetjax.train.optimizers import make_optimizer

from _runs import TINY

N = 8  # replicas = devices


def _replicas_agree(tree, what):
    """Every replica of a pmap output (leading axis N) holds the same values; returns replica 0."""
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        x = np.asarray(x)
        assert x.shape[0] == N, (path, x.shape)
        for r in range(1, N):
            np.testing.assert_array_equal(x[r], x[0], err_msg=f"{what}{jax.tree_util.keystr(path)} replica {r}")
    return jax.tree.map(lambda x: x[0], tree)


def test_poet_layer_forward_and_generator_grads_under_pmap():
    layer = POETLinear(64, 96, config=POETConfig(block_size=16), rngs=nnx.Rngs(params=jax.random.key(0)))
    graphdef, params, frozen = core.split_model(layer)
    # non-zero generators, so the rotations are not the identity
    params = jax.tree.map(lambda t: 0.1 * jax.random.normal(jax.random.key(t.size), t.shape, t.dtype), params)
    x = jax.random.normal(jax.random.key(1), (N * 4, 64), jnp.float32)
    target = jax.random.normal(jax.random.key(2), (N * 4, 96), jnp.float32)

    def loss(p, f, xb, tb):
        return jnp.mean((nnx.merge(graphdef, p, f)(xb) - tb) ** 2)

    def replica(p, f, xb, tb):
        y = nnx.merge(graphdef, p, f)(xb)
        l, g = jax.value_and_grad(loss)(p, f, xb, tb)
        return y, jax.lax.pmean((l, g), "batch")

    y, (l, g) = jax.pmap(replica, axis_name="batch", in_axes=(None, None, 0, 0))(
        params, frozen, x.reshape(N, 4, 64), target.reshape(N, 4, 96))
    assert len(y.sharding.device_set) == N  # it really ran on N devices
    l, g = _replicas_agree((l, g), "layer grads")

    y_ref = jax.jit(lambda p, f, xb: nnx.merge(graphdef, p, f)(xb))(params, frozen, x)
    l_ref, g_ref = jax.jit(jax.value_and_grad(loss))(params, frozen, x, target)
    assert_close(np.asarray(y).reshape(N * 4, 96), y_ref, jnp.float32, "value", "pmapped forward")
    assert_close(l, l_ref, jnp.float32, "same", "pmean'd loss")
    for name in ("theta_in", "theta_out"):
        assert np.abs(np.asarray(g_ref[name])).max() > 0
        assert_close(g[name], g_ref[name], jnp.float32, "grad", f"pmean'd grad of {name}")


def test_train_and_merge_steps_under_pmap_match_one_device():
    cfg = load_config(TINY, ["model.num_layers=1"])
    tx = make_optimizer(cfg)
    graphdef, state = core.init_state(core.build_model(cfg), tx, core.run_keys(cfg.seed)[2])
    b, ln = cfg.train.batch_size * 2, cfg.data.seq_len + 1
    batches = [jax.random.randint(jax.random.key(10 + i), (b, ln), 0, cfg.model.vocab_size, jnp.int32)
               for i in range(3)]

    step = core.make_train_step(graphdef, tx, jit=False, axis_name="batch")
    # the classic pmap layout: the state replicated along a leading device axis, the batch split along it
    pstep = jax.pmap(step, axis_name="batch")
    pmerge = jax.pmap(core.make_merge_step(graphdef, jit=False), axis_name="batch")
    ref_step = core.make_train_step(graphdef, tx, donate=False)
    ref_merge = core.make_merge_step(graphdef, donate=False)

    # three steps with a merge after the second; replicas share nothing but the inputs they are given
    stacked, ref = jax.tree.map(lambda x: jnp.broadcast_to(x, (N, *x.shape)), state), state
    for i, tokens in enumerate(batches):
        stacked, m = pstep(stacked, tokens.reshape(N, b // N, ln))
        ours, m = _replicas_agree((stacked, m), f"step {i + 1}: ")
        ref, m_ref = ref_step(ref, tokens)
        assert_close(m["loss"], m_ref["loss"], jnp.float32, "same", f"loss of step {i + 1}")
        assert_close(m["grad_norm"], m_ref["grad_norm"], jnp.float32, "grad", f"grad norm of step {i + 1}")
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(ours.params)[0], jax.tree.leaves(ref.params)):
            assert_close(x, y, jnp.float32, "grad", f"params{jax.tree_util.keystr(path)} after step {i + 1}")
        if i == 1:
            stacked = pmerge(stacked)
            ours = _replicas_agree(stacked, "merge: ")
            ref = ref_merge(ref)
            # the same key in every replica: the same fresh permutations, no broadcast needed
            for x, y in zip(jax.tree.leaves(ours.frozen), jax.tree.leaves(ref.frozen)):
                if jnp.issubdtype(x.dtype, jnp.integer):
                    np.testing.assert_array_equal(x, y)
                else:
                    assert_close(x, y, jnp.float32, "grad", "merged W0")
            assert int(ours.merges) == 1
    assert int(ours.step) == 3
