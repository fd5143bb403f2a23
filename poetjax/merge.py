"""Merge-then-reinitialize (POET spec §6) for whole models.

Every POET layer gets its own key, ``fold_in(key, layer_index)`` in nnx's deterministic graph order, so
replicas that share ``key`` draw the same permutations without any broadcast (spec §12.15).
"""

from __future__ import annotations

import jax
from flax import nnx

from poetjax.optim import reset_generator_state
from poetjax.surgery import poet_layers


def merge(model: nnx.Module, key: jax.Array) -> None:
    """Fold every POET layer's rotations into its W0, redraw its permutations, zero its generators.

    Model only: a training loop must also reset the generators' optimizer state — use
    ``merge_and_reset``. Jittable with ``nnx.jit``; repeated merges never recompile (all values).
    """
    layers = poet_layers(model)
    if not layers:
        raise ValueError("merge: the model has no POET layers (did you call poetize?)")
    for i, (_, layer) in enumerate(layers):
        layer.merge_and_reinit(jax.random.fold_in(key, i))


def merge_and_reset(model: nnx.Module, optimizer: nnx.Optimizer, key: jax.Array) -> None:
    """The merge step of a training loop: ``merge`` plus the reset of the generators' Adam moments and
    bias-correction count, done together so that one cannot happen without the other.

    Call it right after the optimizer update whose completed-step count is a multiple of
    ``merge_interval``; the next update then starts from θ = 0 with fresh moments.
    """
    merge(model, key)
    fresh = reset_generator_state(nnx.as_pure(optimizer.opt_state))
    nnx.update(optimizer.opt_state, nnx.state(fresh))
