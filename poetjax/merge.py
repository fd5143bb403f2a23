"""Merge-then-reinitialize (POET spec §6) for whole models.

Every POET layer gets its own key, ``fold_in(key, layer_index)`` in nnx's deterministic graph order (of
the per-layer view, for a model with stacked layers), so replicas that share ``key`` draw the same
permutations without any broadcast (spec §12.15).
"""

from __future__ import annotations

import jax
from flax import nnx

from poetjax.layers import POETLinear
from poetjax.optim import reset_generator_state
from poetjax.surgery import poet_layers, stacked_depth, view_order


def _merge_stacked(layer: POETLinear, keys_L: jax.Array) -> None:
    """``merge_and_reinit`` of every slice of a stacked layer, one slice at a time (a ``fori_loop`` that
    updates the stacked buffers in place), so only one slice's float kernel exists at once."""
    graphdef, state = nnx.split(layer)

    def body(l, st):
        one = nnx.merge(graphdef, jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, l, 0, keepdims=False), st))
        one.merge_and_reinit(keys_L[l])
        new = nnx.state(one)
        return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x.astype(s.dtype), l, 0), st, new)

    nnx.update(layer, jax.lax.fori_loop(0, keys_L.shape[0], body, state))


def merge(model: nnx.Module, key: jax.Array) -> None:
    """Fold every POET layer's rotations into its W0, redraw its permutations, zero its generators.

    Model only: a training loop must also reset the generators' optimizer state — use
    ``merge_and_reset``. Jittable with ``nnx.jit``; repeated merges never recompile (all values).
    """
    layers = poet_layers(model)
    if not layers:
        raise ValueError("merge: the model has no POET layers (did you call poetize?)")
    # layer i of the per-layer view gets fold_in(key, i): a stacked model merges like its unstacked twin
    for (_, layer), idx in zip(layers, view_order(model, POETLinear, [p for p, _ in layers])):
        if stacked_depth(layer):
            _merge_stacked(layer, jax.numpy.stack([jax.random.fold_in(key, i) for i in idx]))
        else:
            layer.merge_and_reinit(jax.random.fold_in(key, idx[0]))


def merge_and_reset(model: nnx.Module, optimizer: nnx.Optimizer, key: jax.Array) -> None:
    """The merge step of a training loop: ``merge`` plus the reset of the generators' Adam moments and
    bias-correction count, done together so that one cannot happen without the other.

    Call it right after the optimizer update whose completed-step count is a multiple of
    ``merge_interval``; the next update then starts from θ = 0 with fresh moments.
    """
    merge(model, key)
    fresh = reset_generator_state(nnx.as_pure(optimizer.opt_state))
    nnx.update(optimizer.opt_state, nnx.state(fresh))
