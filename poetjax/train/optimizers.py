"""Optimizers of a run, all pure optax transforms over the trainable parameters (``nnx.Param``).

* ``poet``:  ``poetjax.poet_optimizer`` — Adam with poet_lr × poet_scale on the generators, AdamW on the
  embedding, norms and lm_head, global-norm clipping with the post-merge warm-up (spec §7.3).
* ``adamw``: ``optax.adamw`` on every parameter of the plain model (decay on ≥2-D leaves).
* ``muon``:  ``optax.contrib.muon``: Newton–Schulz orthogonalized momentum on the hidden 2-D matrices
  (the seven projections of every layer), Adam on the embedding, lm_head and norms.

Every learning rate follows the same warmup + cosine multiplier (``poetjax.warmup_cosine_schedule``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

from poetjax.optim import warmup_cosine_schedule
from poetjax.optim import poet_optimizer
from poetjax.run_config import RunConfig

# Parameters that muon leaves to Adam even though they are 2-D (the embedding table and the output layer).
MUON_EXCLUDE = ("embed", "lm_head")


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def muon_dimension_numbers(params):
    """MuonDimensionNumbers for hidden (in, out) kernels, None (→ Adam) for everything else."""

    def spec(path, leaf):
        names = _path_names(path)
        if leaf.ndim == 2 and not any(n in MUON_EXCLUDE for n in names):
            return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
        return None

    return jax.tree_util.tree_map_with_path(spec, params)


def _decay_mask(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def lr_schedules(cfg: RunConfig) -> dict[str, optax.Schedule]:
    """Peak-scaled schedules of the run: "lr" for directly trained parameters, plus "poet_lr"/"muon_lr"."""
    s, n = cfg.schedule, cfg.train.steps
    make = lambda peak: warmup_cosine_schedule(peak, n, s.warmup_steps, s.min_lr_ratio)
    o = cfg.optimizer
    return {"lr": make(o.lr), "poet_lr": make(o.poet_lr), "muon_lr": make(o.muon_lr)}


def make_optimizer(cfg: RunConfig) -> optax.GradientTransformation:
    o = cfg.optimizer
    sched = lr_schedules(cfg)
    clip = o.max_grad_norm if o.max_grad_norm > 0 else None
    if o.name == "poet":
        return poet_optimizer(cfg.poet, sched["lr"], o.weight_decay, poet_learning_rate=sched["poet_lr"],
                              poet_scale=o.poet_scale, b1=o.b1, b2=o.b2, eps=o.eps,
                              generator_update=o.generator_update, generator_momentum=o.generator_momentum,
                              carry_moment=o.carry_moment, max_angle=o.max_angle, alternate=o.alternate_sides,
                              max_grad_norm=clip, clip_warmup_steps=o.clip_warmup_steps,
                              generator_mu_dtype=jnp.dtype(o.generator_moment_dtype))
    if o.name == "adamw":
        tx = optax.adamw(sched["lr"], b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=_decay_mask)
    elif o.name == "muon":
        tx = optax.contrib.muon(sched["muon_lr"], adam_learning_rate=sched["lr"], adam_b1=o.b1, adam_b2=o.b2,
                                weight_decay=o.weight_decay, weight_decay_mask=_decay_mask,
                                adam_weight_decay=o.weight_decay,
                                muon_weight_dimension_numbers=muon_dimension_numbers)
    else:  # RunConfig validation makes this unreachable
        raise ValueError(f"unknown optimizer.name={o.name!r}")
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
