"""The functional training core: a pytree state and pure, jitted step functions.

The model lives as ``(graphdef, params, frozen)`` from ``nnx.split``: ``params`` are the trainable
``nnx.Param`` leaves (POET generators, embedding, norms, lm_head; every weight for the baselines),
``frozen`` is the rest (POET's W0 and permutations). Both are ``nnx.State`` trees of plain arrays, so
the whole ``TrainState`` is an ordinary pytree: it can be jitted with ``donate_argnums``, given
``in_shardings``/``out_shardings``, checkpointed by orbax, and compared leaf by leaf.

* ``make_train_step(graphdef, tx)``: state, tokens (B, L+1) → state, metrics (loss, grad_norm, lr).
* ``make_eval_step(graphdef)``: params, frozen, tokens, weights (B,) → (Σ weighted token NLL, Σ tokens).
* ``make_merge_step(graphdef)``: POET merge-then-reinitialize of every layer (``poetjax.merge``) and the
  reset of the generators' Adam state (``poetjax.optim.reset_generator_state``), one compiled program
  reused by every merge (the permutations are values).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from poetjax.merge import merge as merge_model
from poetjax.models.llama import Llama
from poetjax.optim import reset_generator_state
from poetjax.run_config import RunConfig
from poetjax.surgery import build_poetized, poetize


class TrainState(NamedTuple):
    params: Any         # nnx.State of arrays: the trainable nnx.Param leaves
    frozen: Any         # nnx.State of arrays: everything else (W0, permutations); never differentiated
    opt_state: Any      # optax state over ``params``
    step: jax.Array     # int32 (): completed optimizer steps
    merges: jax.Array   # int32 (): merges done
    key: jax.Array      # uint32 raw key data of the run's PRNG stream (merge permutations)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(model init key, POET conversion key, training-stream key), all derived from the run seed."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)


def build_model(cfg: RunConfig) -> nnx.Module:
    """The run's LLaMA; for ``optimizer.name == "poet"`` every projection is a POETLinear.

    POET-XQ (variant xq/xq_mem) never builds the float model: ``poetjax.surgery.build_poetized`` converts
    layer by layer from an abstract model, so a model whose float weights would not fit the device can
    still be built in its quantized form.
    """
    k_model, k_poet, _ = run_keys(cfg.seed)
    if cfg.optimizer.name == "poet" and cfg.poet.quantized:
        return build_poetized(lambda: Llama(cfg.model, rngs=nnx.Rngs(params=k_model)), cfg.poet, key=k_poet)
    model = Llama(cfg.model, rngs=nnx.Rngs(params=k_model))
    if cfg.optimizer.name == "poet":
        poetize(model, cfg.poet, rngs=nnx.Rngs(params=k_poet))
    return model


def split_model(model: nnx.Module):
    """(graphdef, params, frozen) with ``params``/``frozen`` as nnx.State trees of plain arrays."""
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.as_pure(params), nnx.as_pure(frozen)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, key: jax.Array):
    """(graphdef, TrainState at step 0). ``key`` is a typed PRNG key."""
    graphdef, params, frozen = split_model(model)
    state = TrainState(params=params, frozen=frozen, opt_state=tx.init(params), step=jnp.zeros([], jnp.int32),
                       merges=jnp.zeros([], jnp.int32), key=jax.random.key_data(key))
    return graphdef, state


def token_losses(graphdef, params, frozen, tokens_BxL1: jax.Array) -> jax.Array:
    """Next-token negative log-likelihood (B, L) in float32."""
    model = nnx.merge(graphdef, params, frozen)
    logits = model(tokens_BxL1[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxL1[:, 1:])


def loss_fn(graphdef, params, frozen, tokens_BxL1: jax.Array) -> jax.Array:
    return jnp.mean(token_losses(graphdef, params, frozen, tokens_BxL1))


def make_train_step(graphdef, tx: optax.GradientTransformation, *, microbatches: int = 1,
                    lr_schedule: Callable | None = None, jit: bool = True, donate: bool = True):
    """``train_step(state, tokens (B, L+1) int32) -> (state, metrics)``.

    With ``microbatches = m`` the batch is split into m equal chunks whose gradients are averaged (a
    ``lax.scan``), giving the same update as the whole batch at 1/m of the activation memory.
    """

    grad_fn = jax.value_and_grad(lambda p, f, t: loss_fn(graphdef, p, f, t))

    def grads_of(params, frozen, tokens):
        if microbatches == 1:
            return grad_fn(params, frozen, tokens)
        b = tokens.shape[0]
        chunks = tokens.reshape(microbatches, b // microbatches, *tokens.shape[1:])
        zero = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

        def body(carry, chunk):
            loss_sum, g_sum = carry
            loss, g = grad_fn(params, frozen, chunk)
            return (loss_sum + loss, jax.tree.map(lambda a, x: a + x.astype(jnp.float32), g_sum, g)), None

        (loss, g), _ = jax.lax.scan(body, (jnp.zeros([], jnp.float32), zero), chunks)
        g = jax.tree.map(lambda x, p: (x / microbatches).astype(p.dtype), g, params)
        return loss / microbatches, g

    def train_step(state: TrainState, tokens):
        loss, grads = grads_of(state.params, state.frozen, tokens)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    if not jit:
        return train_step
    return jax.jit(train_step, donate_argnums=(0,) if donate else ())


def make_eval_step(graphdef, *, jit: bool = True):
    """``eval_step(params, frozen, tokens (B, L+1), weights (B,)) -> (Σ NLL, Σ tokens)`` in float32."""

    def eval_step(params, frozen, tokens, weights):
        nll = token_losses(graphdef, params, frozen, tokens)
        w = weights.astype(jnp.float32)[:, None]
        return jnp.sum(nll * w), jnp.sum(w) * nll.shape[1]

    return jax.jit(eval_step) if jit else eval_step


def make_merge_step(graphdef, *, jit: bool = True, donate: bool = True):
    """``merge_step(state) -> state``: fold every POET layer's rotations into W0 with fresh permutations,
    zero the generators and their Adam moments/bias-correction count. The key of merge n is split off the
    state's stream, so a resumed run draws the same permutations."""

    def merge_step(state: TrainState) -> TrainState:
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        model = nnx.merge(graphdef, state.params, state.frozen)
        merge_model(model, sub)
        _, params, frozen = split_model(model)
        return state._replace(params=params, frozen=frozen, opt_state=reset_generator_state(state.opt_state),
                              merges=state.merges + 1, key=jax.random.key_data(key))

    if not jit:
        return merge_step
    return jax.jit(merge_step, donate_argnums=(0,) if donate else ())
