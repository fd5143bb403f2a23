"""The functional training core: a pytree state and pure, jitted step functions.

The model lives as ``(graphdef, params, frozen)`` from ``nnx.split``: ``params`` are the trainable
``nnx.Param`` leaves (POET generators, embedding, norms, lm_head; every weight for the baselines),
``frozen`` is the rest (POET's W0 and permutations). Both are ``nnx.State`` trees of plain arrays, so
the whole ``TrainState`` is an ordinary pytree: it can be jitted with ``donate_argnums``, given
``in_shardings``/``out_shardings``, checkpointed by orbax, and compared leaf by leaf.

* ``make_train_step(graphdef, tx)``: state, tokens (B, S+1) → state, metrics (loss, grad_norm, lr).
* ``make_eval_step(graphdef)``: params, frozen, tokens, weights (B,) → (Σ weighted token NLL, Σ tokens).
* ``make_merge_step(graphdef)``: POET merge-then-reinitialize of every layer (``poetjax.merge``) and the
  reset of the generators' Adam state (``poetjax.optim.reset_generator_state``), one compiled program
  reused by every merge (the permutations are values). It first advances the phase probes, so the
  probes always describe the rotation accumulated since step 0.
* ``make_diagnostics_step(graphdef)``: state, reference spectra → ``poetjax.diagnostics.model_diagnostics``
  of the current model, compiled once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from poetjax.diagnostics import PhaseProbe, diagnostic_groups, expand_diagnostics, grouped_diagnostics
from poetjax.merge import merge as merge_model
from poetjax.models.hf import SHAPE_FIELDS, shape_diff
from poetjax.models.llama import Llama, from_hf
from poetjax.lie import carry_moments
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
    probe: Any          # {layer path: diagnostics.ProbeState} of the POET layers ({} for plain models)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(model init key, POET conversion key, training-stream key), all derived from the run seed."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1), jax.random.fold_in(root, 2)


def build_model(cfg: RunConfig) -> nnx.Module:
    """The run's LLaMA; for ``optimizer.name == "poet"`` every projection is a POETLinear.

    POET-XQ (``poet.base=uint8``) and stacked models (``model.scan_layers``: the 1B–34B configs) never build
    the float model: ``poetjax.surgery.build_poetized`` converts layer by layer from an abstract model, so
    building needs no more memory than training (a float model beside its converted copy would need about
    twice the training step's), and a model whose float weights would not fit the device can still be built
    in its quantized form. Same distribution as converting a built
    float model, other numbers (see ``build_poetized``).

    ``model.init_from=hf:DIR``: the weights of that Hugging Face checkpoint (``from_hf``), converted by
    ``poetize`` for a POET run, whose ``optimizer.init=keep`` then leaves the loaded function unchanged.
    """
    k_model, k_poet, _ = run_keys(cfg.seed)
    if cfg.model.init_from:
        chosen = {f.name: getattr(cfg.model, f.name) for f in dataclasses.fields(cfg.model)
                  if f.name not in SHAPE_FIELDS}
        model = from_hf(cfg.model.init_from.removeprefix("hf:"), **chosen)
        bad = shape_diff(cfg.model, model.cfg)
        if bad:
            raise ValueError(f"model.{bad[0][0]}={bad[0][1]!r} does not match the checkpoint of model.init_from="
                             f"{cfg.model.init_from!r} ({bad[0][2]!r}); leave it unset (load_config fills it in)")
        if cfg.optimizer.name == "poet":
            poetize(model, cfg.poet, rngs=nnx.Rngs(params=k_poet))
        return model
    if cfg.optimizer.name == "poet" and (cfg.poet.quantized or cfg.model.scan_layers):
        return build_poetized(lambda: Llama(cfg.model, rngs=nnx.Rngs(params=k_model)), cfg.poet, key=k_poet)

    def make():
        model = Llama(cfg.model, rngs=nnx.Rngs(params=k_model))
        if cfg.optimizer.name == "poet":
            poetize(model, cfg.poet, rngs=nnx.Rngs(params=k_poet))
        return model

    return built_on_host(make)


def built_on_host(make: Callable[[], nnx.Module]) -> nnx.Module:
    """``make()`` run on the host's CPU when the default backend is an accelerator. A model is built op by op,
    and on a GPU every distinct initializer, permutation and gather is compiled on its own, which the host
    does many times faster (BENCHMARKS.md, "Time to result"); the arrays, left uncommitted, move to the
    devices with the state's first placement. Large models are built by ``build_poetized`` on the devices,
    layer by layer."""
    if jax.default_backend() == "cpu":
        return make()
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return make()
    with jax.default_device(cpu):
        return make()


def split_model(model: nnx.Module):
    """(graphdef, params, frozen) with ``params``/``frozen`` as nnx.State trees of plain arrays."""
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.as_pure(params), nnx.as_pure(frozen)


# fold_in constant that separates the phase probes' key from the training stream (which only splits).
PROBE_STREAM = 0x50524F42


def initial_probes(model: nnx.Module, key: jax.Array, *, on_host: bool = False) -> dict:
    """The phase probes of a fresh state (``init_state``): random unit vectors from
    ``fold_in(key, PROBE_STREAM)``, ``key`` being the training stream's key; ``on_host``: as numpy arrays
    drawn on the host's CPU (``PhaseProbe.init_numpy``)."""
    if on_host:
        return built_on_host(lambda: PhaseProbe.init_numpy(model, jax.random.fold_in(key, PROBE_STREAM)))
    return PhaseProbe.init(model, jax.random.fold_in(key, PROBE_STREAM))


def init_state(model: nnx.Module, tx: optax.GradientTransformation, key: jax.Array, probe: dict | None = None):
    """(graphdef, TrainState at step 0). ``key`` is a typed PRNG key: the training stream. ``probe``: the
    state's phase probes if drawn already (``initial_probes(model, key)``, which is the default)."""
    probe = initial_probes(model, key) if probe is None else probe
    graphdef, params, frozen = split_model(model)
    state = TrainState(params=params, frozen=frozen, opt_state=tx.init(params), step=jnp.zeros([], jnp.int32),
                       merges=jnp.zeros([], jnp.int32), key=jax.random.key_data(key), probe=probe)
    return graphdef, state


def token_losses(graphdef, params, frozen, tokens_BxS1: jax.Array) -> jax.Array:
    """Next-token negative log-likelihood (B, S) in float32."""
    model = nnx.merge(graphdef, params, frozen)
    logits = model(tokens_BxS1[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BxS1[:, 1:])


def loss_fn(graphdef, params, frozen, tokens_BxS1: jax.Array) -> jax.Array:
    return jnp.mean(token_losses(graphdef, params, frozen, tokens_BxS1))


def make_train_step(graphdef, tx: optax.GradientTransformation, *, microbatches: int = 1,
                    lr_schedule: Callable | None = None, jit: bool = True, donate: bool = True,
                    axis_name: str | None = None, in_shardings=None, out_shardings=None, mesh=None):
    """``train_step(state, tokens (B, S+1) int32) -> (state, metrics)``.

    With ``microbatches = m`` the batch is split into m equal chunks whose gradients are averaged (a
    ``lax.scan``), giving the same update as the whole batch at 1/m of the activation memory. Chunk i
    holds rows i, i + m, i + 2m, …: when the rows are split over devices, every chunk still is too.

    ``axis_name``: for ``jax.pmap``/``shard_map`` over that axis (each instance holding its part of the
    batch): the loss and gradients are ``lax.pmean``'d over it before the optimizer, so every instance
    applies the same update. Not needed under ``jax.jit`` with shardings (``poetjax.distributed``).

    ``in_shardings``/``out_shardings``: passed to ``jax.jit`` when given
    (``poetjax.train.sharded.make_sharded_train_step``). ``mesh``: the step is traced under its abstract
    mesh (``under_mesh``).
    """

    grad_fn = jax.value_and_grad(lambda p, f, t: loss_fn(graphdef, p, f, t))

    def grads_of(params, frozen, tokens):
        if microbatches == 1:
            return grad_fn(params, frozen, tokens)
        b = tokens.shape[0]
        chunks = tokens.reshape(b // microbatches, microbatches, *tokens.shape[1:]).swapaxes(0, 1)
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
        if axis_name is not None:
            loss, grads = jax.lax.pmean((loss, grads), axis_name)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
        if lr_schedule is not None:
            metrics["lr"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    train_step = under_mesh(train_step, mesh)
    if not jit:
        return train_step
    shard_kw = {k: v for k, v in (("in_shardings", in_shardings), ("out_shardings", out_shardings)) if v is not None}
    return jax.jit(train_step, donate_argnums=(0,) if donate else (), **shard_kw)


def under_mesh(fn: Callable, mesh) -> Callable:
    """``fn`` traced under ``mesh``'s abstract mesh (``fn`` itself when ``mesh`` is None), so that layers can
    state where an array must live (``jax.lax.with_sharding_constraint`` with a PartitionSpec)."""
    if mesh is None:
        return fn

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def make_eval_step(graphdef, *, jit: bool = True):
    """``eval_step(params, frozen, tokens (B, S+1), weights (B,)) -> (Σ NLL, Σ tokens)`` in float32."""

    def eval_step(params, frozen, tokens, weights):
        nll = token_losses(graphdef, params, frozen, tokens)
        w = weights.astype(jnp.float32)
        # Both sums in one reduction over the batch: on a mesh, one all-reduce instead of two.
        per_seq = jnp.stack([jnp.sum(nll, axis=1) * w, w * nll.shape[1]], axis=-1)  # (B, 2)
        total = jnp.sum(per_seq, axis=0)
        return total[0], total[1]

    return jax.jit(eval_step) if jit else eval_step


def make_merge_step(graphdef, *, jit: bool = True, donate: bool = True):
    """``merge_step(state) -> state``: fold every POET layer's rotations into W0 with fresh permutations,
    zero the generators and their Adam moments/bias-correction count. The key of merge n is split off the
    state's stream, so a resumed run draws the same permutations."""

    def merge_step(state: TrainState) -> TrainState:
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        model = nnx.merge(graphdef, state.params, state.frozen)
        probe = PhaseProbe.advance(state.probe, model)  # the rotations about to be folded into W0
        merge_model(model, sub)
        _, params, frozen = split_model(model)
        opt_state = reset_generator_state(state.opt_state, carry=lambda mu: carry_moments(mu, state.frozen, frozen))
        return state._replace(params=params, frozen=frozen, opt_state=opt_state,
                              merges=state.merges + 1, key=jax.random.key_data(key), probe=probe)

    if not jit:
        return merge_step
    return jax.jit(merge_step, donate_argnums=(0,) if donate else ())


def make_diagnostics_step(graphdef, *, num_sv: int = 16, jit: bool = True):
    """``diagnostics_step(state, s_ref) -> {layer path: {name: array}}``: ``model_diagnostics`` of the
    state's model with the phase probes and ``s_ref`` (reference spectra stacked by layer group, as
    ``reference_spectra`` returns them) for the drift. Pure: the state is not changed (nor donated), so it
    can run between a step and a merge. One compiled program (``diagnostics_step.program``) computes
    ``grouped_diagnostics``; its few stacked outputs are split per layer on the host."""
    groups = {}

    def grouped_step(state: TrainState, s_ref):
        model = nnx.merge(graphdef, state.params, state.frozen)
        if not groups:
            groups.update(diagnostic_groups(model))
        return grouped_diagnostics(model, probes=state.probe, s_ref=s_ref, num_sv=num_sv)

    program = jax.jit(grouped_step) if jit else grouped_step

    def diagnostics_step(state: TrainState, s_ref):  # .program: replaceable by its compiled form
        return expand_diagnostics(jax.device_get(diagnostics_step.program(state, s_ref)), groups)

    diagnostics_step.program, diagnostics_step.groups = program, groups
    return diagnostics_step


def reference_shapes(diagnostics_step, state: TrainState) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of ``reference_spectra``'s s_ref (one float32 array per layer group), by tracing only."""
    shapes = jax.eval_shape(diagnostics_step.program, state, None)
    return {k: jax.ShapeDtypeStruct(v["singular_values"].shape, jnp.float32) for k, v in shapes.items()}


def reference_spectra(diagnostics_step, state: TrainState,
                      shapes: dict | None = None) -> tuple[dict[str, jax.Array], dict]:
    """(s_ref, diagnostics) of ``state``: s_ref = the singular values of its linear layers stacked by layer
    group, the reference of later drifts, and the diagnostics of ``state`` itself (its "drift" is 0, the
    drift from itself), from one call of the same compiled program (the reference argument only sets
    shapes here, so no second program is compiled; ``shapes``: ``reference_shapes``, when known). The
    spectra come back as uncommitted arrays, as the placeholder was: the program's outputs carry the mesh's
    sharding, and passing those as the reference compiled a second program (seconds, at step 0 of a sharded
    run)."""
    shapes = shapes or reference_shapes(diagnostics_step, state)
    dummy = {k: jnp.ones(s.shape, s.dtype) for k, s in shapes.items()}
    grouped = jax.device_get(diagnostics_step.program(state, dummy))
    for d in grouped.values():
        d["drift"] = np.zeros_like(d["drift"])
    s_ref = {k: jnp.asarray(v["singular_values"]) for k, v in grouped.items()}
    return s_ref, expand_diagnostics(grouped, diagnostics_step.groups)
