"""Merge-then-reinitialize (POET spec §6) for whole models.

Every POET layer gets its own key, ``fold_in(key, layer_index)`` in nnx's deterministic graph order (of
the per-layer view, for a model with stacked layers), so replicas that share ``key`` draw the same
permutations without any broadcast (spec §12.15).
"""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx

from poetjax.layers import Permutation, POETLinear
from poetjax.lie import carry_moments
from poetjax.optim import reset_generator_state
from poetjax.surgery import fold_in_each, poet_layers, stack_trees, stacked_depth, view_order


def _merge_slices(graphdef, state_L, keys_L: jax.Array):
    """``merge_and_reinit`` of every slice of the layer state ``state_L`` (arrays stacked along a leading
    axis), one slice at a time (a ``fori_loop`` that updates the stacked buffers in place), so only one
    slice's float kernel exists at once and the program holds one copy of the merge, not one per slice."""

    def body(l, st):
        new = _merge_one(graphdef, jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, l, 0, keepdims=False), st),
                         keys_L[l])
        return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x.astype(s.dtype), l, 0), st, new)

    return jax.lax.fori_loop(0, keys_L.shape[0], body, state_L)


def _merge_one(graphdef, state, key):
    """The state of one layer (``nnx.split``) after ``merge_and_reinit(key)``."""
    layer = nnx.merge(graphdef, state)
    layer.merge_and_reinit(key)
    return nnx.state(layer)


def merge(model: nnx.Module, key: jax.Array) -> None:
    """Fold every POET layer's rotations into its W0, redraw its permutations, zero its generators.

    Model only: a training loop must also reset the generators' optimizer state — use
    ``merge_and_reset``. Jittable with ``nnx.jit``; repeated merges never recompile (all values).

    Unstacked layers of one structure (same shapes, dtypes and config, e.g. every q_proj of a model) are
    stacked and merged under one ``jax.vmap``, so the merge program's size grows with the number of distinct
    layer shapes, not of layers; this costs a transient float32 copy of each such group's kernels. (A loop
    over the stacked group, as for stacked layers, made the SPMD partitioner all-reduce fsdp-sharded W0s.)
    """
    layers = poet_layers(model)
    if not layers:
        raise ValueError("merge: the model has no POET layers (did you call poetize?)")
    # layer i of the per-layer view gets fold_in(key, i): a stacked model merges like its unstacked twin
    groups: dict = {}
    for (_, layer), idx in zip(layers, view_order(model, POETLinear, [p for p, _ in layers])):
        graphdef, state = nnx.split(layer)
        if stacked_depth(layer):
            nnx.update(layer, _merge_slices(graphdef, state, fold_in_each(key, idx)))
        else:
            groups.setdefault(graphdef, []).append((layer, state, idx[0]))
    for graphdef, members in groups.items():
        stacked = stack_trees([st for _, st, _ in members])
        merged = jax.vmap(partial(_merge_one, graphdef))(stacked, fold_in_each(key, [i for _, _, i in members]))
        for i, (layer, _, _) in enumerate(members):
            nnx.update(layer, jax.tree.map(lambda x: x[i], merged))


def merge_and_reset(model: nnx.Module, optimizer: nnx.Optimizer, key: jax.Array) -> None:
    """The merge step of a training loop: ``merge`` plus the reset of the generators' Adam moments and
    bias-correction count (a carried momentum is re-expressed in the new blocks instead,
    ``poetjax.lie.carry_moments``), done together so that one cannot happen without the other.

    Call it right after the optimizer update whose completed-step count is a multiple of
    ``merge_interval``; the next update then starts from θ = 0 with fresh moments.
    """
    before = nnx.as_pure(nnx.state(model, Permutation))
    merge(model, key)
    after = nnx.as_pure(nnx.state(model, Permutation))
    fresh = reset_generator_state(nnx.as_pure(optimizer.opt_state),
                                  carry=lambda mu: carry_moments(mu, before, after))
    nnx.update(optimizer.opt_state, nnx.state(fresh))
