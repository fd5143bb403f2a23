"""The POET optimizer as optax transforms (POET spec §7).

* ``poet_adamw``: the reference's POETAdamW update rule for one parameter group — eps added to √v
  *before* bias correction, decoupled weight decay applied to the already-updated parameter. Its state
  keeps two counters: ``step`` (completed updates, drives the learning-rate schedule, never reset) and
  ``count`` (Adam's bias-correction t, reset with the moments at every merge for the generators).
* ``poet_optimizer``: generators (labelled "poet") get Adam with lr × poet_scale and no weight decay;
  every other trainable parameter ("base": embeddings, norms, lm_head, unconverted Linears) gets AdamW
  with decay on ≥2-D leaves only. The frozen W0 is not a Param, so it never reaches the optimizer.
* ``reset_generator_state``: zeroes the generators' moments and bias-correction count; the training
  loop calls it through ``poetjax.merge_and_reset`` on the merge step itself, so each inner loop starts
  with θ = 0 and fresh moments (the reference's README loop is one step out of line, spec §12.7).
* ``poet_clip_schedule``: the post-merge gradient-clip warm-up of spec §7.3, for
  ``clip_by_global_norm_schedule`` (dtype-preserving, threshold by completed-step count).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from poetjax.config import POETConfig
from poetjax.layers import GENERATOR_NAMES, Generator, path_keys
from poetjax.lie import (GENERATOR_UPDATES, CarriedLieMomentumState, LieMomentumState, alternate_sides,
                         clip_block_angle, lie_momentum)

POET_LABEL = "poet"
BASE_LABEL = "base"

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


class PoetAdamState(NamedTuple):
    step: jax.Array   # completed updates (learning-rate schedule); never reset
    count: jax.Array  # Adam bias-correction t; reset at merges for the generators
    mu: optax.Updates
    nu: optax.Updates


def _lr_at(lr: ScalarOrSchedule, step):
    return lr(step) if callable(lr) else lr


def poet_adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
               weight_decay: float = 0.0, mask: Any = None, mu_dtype=None) -> optax.GradientTransformation:
    """POETAdamW for one group:  p ← p − lr·√(1−β2ᵗ)/(1−β1ᵗ)·m/(√v+eps);  then p ← p − lr·wd·p.

    ``mask`` (a tree of bools or a callable of the params) selects the leaves that decay.
    """

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), mu_dtype or jnp.result_type(p))
        return PoetAdamState(step=jnp.zeros([], jnp.int32), count=jnp.zeros([], jnp.int32),
                             mu=jax.tree.map(zeros, params), nu=jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: (b1 * m + (1 - b1) * g).astype(m.dtype), state.mu, grads)
        nu = jax.tree.map(lambda v, g: (b2 * v + (1 - b2) * jnp.square(g)).astype(v.dtype), state.nu, grads)
        lr = _lr_at(learning_rate, state.step)
        t = count.astype(jnp.float32)
        step_size = lr * jnp.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        updates = jax.tree.map(
            lambda m, v, g: (-step_size * m.astype(jnp.float32)
                             / (jnp.sqrt(v.astype(jnp.float32)) + eps)).astype(jnp.result_type(g)),
            mu, nu, grads)
        if weight_decay:
            if params is None:
                raise ValueError("poet_adamw with weight_decay needs params in update()")
            decay = mask(params) if callable(mask) else mask
            if decay is None:
                decay = jax.tree.map(lambda _: True, params)
            # Decoupled decay of the already-updated parameter: p' = (p + u)(1 − lr·wd).
            updates = jax.tree.map(
                lambda u, p, d: (u - lr * weight_decay * (p + u)).astype(u.dtype) if d else u,
                updates, params, decay)
        return updates, PoetAdamState(step=state.step + 1, count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init, update)


def param_labels(params) -> Any:
    """"poet" for generator leaves (by Variable type or by name), "base" for everything else.

    Works on nnx.State with Variable leaves (what ``tx.init`` sees) and on pure arrays (``tx.update``).
    """

    def label(path, leaf):
        if isinstance(leaf, Generator) or any(str(k) in GENERATOR_NAMES for k in path_keys(path)):
            return POET_LABEL
        return BASE_LABEL

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _decay_mask(params):
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def poet_clip_schedule(max_norm: float, merge_interval: int, warmup_steps: int = 2000, ramp_steps: int = 10,
                       min_ratio: float = 0.1) -> Callable[[jax.Array], jax.Array]:
    """Global-norm clip threshold at ``step`` completed optimizer steps (spec §7.3).

    During the first ``warmup_steps`` steps, for ``ramp_steps`` steps after each merge the threshold
    ramps linearly from min_ratio·C; otherwise it is C.
    """
    if merge_interval <= 0:
        raise ValueError(f"merge_interval must be > 0, got merge_interval={merge_interval!r}")

    def schedule(step):
        s = jnp.asarray(step, jnp.int32)
        off = s % merge_interval
        ramp = (s >= merge_interval) & (s <= warmup_steps) & (off < ramp_steps)
        ramped = max_norm * (min_ratio + (1.0 - min_ratio) * off.astype(jnp.float32) / ramp_steps)
        return jnp.where(ramp, ramped, jnp.float32(max_norm))

    return schedule


class ClipState(NamedTuple):
    count: jax.Array  # completed optimizer steps


def clip_by_global_norm_schedule(max_norm: ScalarOrSchedule) -> optax.GradientTransformation:
    """Global-norm clipping whose threshold may follow a schedule of the completed-step count.

    The norm and the scale are computed in float32 and every leaf keeps its own dtype (bf16 gradients
    stay bf16), which ``inject_hyperparams(clip_by_global_norm)`` does not do with a float32 threshold.
    """

    def init(params):
        del params
        return ClipState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        limit = jnp.asarray(max_norm(state.count) if callable(max_norm) else max_norm, jnp.float32)
        norm = optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), updates))
        scale = jnp.where(norm > limit, limit / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny), 1.0)
        updates = jax.tree.map(lambda g: (g.astype(jnp.float32) * scale).astype(g.dtype), updates)
        return updates, ClipState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def warmup_cosine_schedule(peak: float, total_steps: int, warmup_steps: int = 0,
                           min_ratio: float = 0.1) -> Callable[[jax.Array], jax.Array]:
    """The reference's LambdaLR: linear warmup from 0, then cosine down to min_ratio·peak (spec §7.2)."""
    if total_steps <= 0 or warmup_steps < 0 or warmup_steps > total_steps:
        raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps > 0, got "
                         f"{warmup_steps=}, {total_steps=}")

    def schedule(step):
        s = jnp.asarray(step, jnp.float32)
        warm = s / max(warmup_steps, 1)
        p = jnp.clip((s - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
        cos = min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * p))
        return peak * jnp.where(s < warmup_steps, warm, cos)

    return schedule


def poet_optimizer(config: POETConfig, learning_rate: ScalarOrSchedule, weight_decay: float = 0.0, *,
                   poet_learning_rate: ScalarOrSchedule | None = None, poet_scale: float = 0.5,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, max_grad_norm: float | None = None,
                   clip_warmup_steps: int = 2000, mu_dtype=None, generator_mu_dtype=None,
                   generator_update: str = "adam", generator_momentum: float = 0.95, carry_moment: bool = False,
                   max_angle: float = 0.0, alternate: bool = False) -> optax.GradientTransformation:
    """The POET optimizer: Adam (lr × poet_scale, no decay) on generators, AdamW on the rest.

    config:             the layers' POETConfig (its merge_interval times the post-merge clip warm-up).
    learning_rate:      base learning rate (float or schedule of the completed-step count).
    poet_learning_rate: the generators' learning rate before poet_scale (default: learning_rate).
    poet_scale:         multiplier of the generators' learning rate (reference default 0.5).
    b1, b2, eps:        Adam constants of both groups (eps is added to sqrt(v) before bias correction).
    max_grad_norm:      if set, global-norm clipping over all trainable params with the post-merge
                        warm-up of ``poet_clip_schedule`` (over the first ``clip_warmup_steps`` steps).
    mu_dtype:           storage dtype of both moments of every group (None: each parameter's dtype).
    generator_mu_dtype: storage dtype of the generators' moments only (overrides mu_dtype for them; e.g.
                        bfloat16 halves the generators' optimizer state, measured in BENCHMARKS.md).
    generator_update:   the generators' rule (``poetjax.lie``): "adam" (POETAdamW), "momentum" (Nesterov
                        momentum ``generator_momentum`` in the Lie algebra) or "ns" (that momentum
                        Newton–Schulz-orthogonalized per block: the learning rate is then the step's angle).
    carry_moment:       keep the momentum of "momentum"/"ns" across merges, re-expressed in the new blocks
                        (``poetjax.lie.carry_moments``); otherwise a merge zeroes it.
    max_angle:          if > 0, cap each block's step at this rotation angle (``poetjax.lie.clip_block_angle``).
    alternate:          odd steps update only the input-side generators, even steps the output side.
    """
    if not isinstance(config, POETConfig):
        raise TypeError(f"config must be a POETConfig, got {type(config).__name__}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got weight_decay={weight_decay!r}")
    if not poet_scale > 0:
        raise ValueError(f"poet_scale must be > 0, got poet_scale={poet_scale!r}")
    plr = learning_rate if poet_learning_rate is None else poet_learning_rate
    scale = poet_scale
    gen_lr = (lambda s: plr(s) * scale) if callable(plr) else plr * scale
    if generator_update not in GENERATOR_UPDATES:
        raise ValueError(f"generator_update must be one of {GENERATOR_UPDATES}, got generator_update={generator_update!r}")
    if carry_moment and generator_update == "adam":
        raise ValueError("carry_moment keeps the momentum of generator_update='momentum' or 'ns'; "
                         "got generator_update='adam'")
    if generator_update == "adam":
        gen = [poet_adamw(gen_lr, b1, b2, eps, 0.0, mu_dtype=generator_mu_dtype or mu_dtype)]
    else:
        gen = [lie_momentum(generator_momentum, orthogonalize=generator_update == "ns", carry=carry_moment),
               optax.scale_by_learning_rate(gen_lr)]
    if max_angle:
        gen.append(clip_block_angle(max_angle))
    if alternate:
        gen.append(alternate_sides())
    tx = optax.partition(
        {POET_LABEL: gen[0] if len(gen) == 1 else optax.chain(*gen),
         BASE_LABEL: poet_adamw(learning_rate, b1, b2, eps, weight_decay,
                                mask=_decay_mask, mu_dtype=mu_dtype)},
        param_labels)
    if max_grad_norm is not None:
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got max_grad_norm={max_grad_norm!r}")
        clip = clip_by_global_norm_schedule(poet_clip_schedule(max_grad_norm, config.merge_interval,
                                                               clip_warmup_steps))
        tx = optax.chain(clip, tx)
    return tx


def _is_partition(x) -> bool:
    return isinstance(x, optax.transforms.PartitionState)


_GENERATOR_STATES = (PoetAdamState, LieMomentumState, CarriedLieMomentumState)


def reset_generator_state(opt_state, carry: Callable[[Any], Any] | None = None):
    """Pure: the optimizer state with the generators' moments (and Adam's bias-correction count) zeroed, as
    a merge needs them; a carried momentum (``carry_moment``) is mapped by ``carry`` instead (the merge
    passes ``poetjax.lie.carry_moments`` of its permutations; None keeps it as it is).

    Finds every ``optax.partition`` state and resets the generator states under its "poet" label; the
    learning-rate step counters and every other group's state are kept.
    """

    def reset_adam(node):
        if isinstance(node, PoetAdamState):
            return node._replace(count=jnp.zeros_like(node.count), mu=jax.tree.map(jnp.zeros_like, node.mu),
                                 nu=jax.tree.map(jnp.zeros_like, node.nu))
        if isinstance(node, LieMomentumState):
            return node._replace(mu=jax.tree.map(jnp.zeros_like, node.mu))
        if isinstance(node, CarriedLieMomentumState) and carry is not None:
            return node._replace(mu=carry(node.mu))
        return node

    def reset_partition(node):
        if not _is_partition(node) or POET_LABEL not in node.inner_states:
            return node
        inner = dict(node.inner_states)
        inner[POET_LABEL] = jax.tree.map(reset_adam, inner[POET_LABEL],
                                         is_leaf=lambda x: isinstance(x, _GENERATOR_STATES))
        return node._replace(inner_states=inner)

    found = []
    jax.tree.map(lambda n: found.append(n) if _is_partition(n) else None, opt_state, is_leaf=_is_partition)
    if not found:
        raise ValueError("reset_generator_state: no optax.partition state found; was the optimizer built "
                         "with poet_optimizer?")
    return jax.tree.map(reset_partition, opt_state, is_leaf=_is_partition)
