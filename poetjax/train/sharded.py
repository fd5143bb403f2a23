"""The training programs on a device mesh: the state built in place with the sharding rules of
``poetjax.distributed``, and the functions of ``poetjax.train.steps`` jitted with those shardings."""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from poetjax.distributed import batch_sharding, place, replicated, state_shardings
from poetjax.train import steps as core


def _state_maker(cfg, tx: optax.GradientTransformation, graphdef):
    key = core.run_keys(cfg.seed)[2]

    def make(params, frozen, probe):
        return core.init_state(nnx.merge(graphdef, params, frozen), tx, key, probe=probe)[1]
    return make


def train_state_spec(cfg, tx: optax.GradientTransformation, mesh: Mesh):
    """(graphdef, the state as ``jax.ShapeDtypeStruct``s with their shardings, the shardings) of
    ``init_train_state``'s fresh state, by tracing only (a fraction of a second): what the run's programs
    compile for while the state itself is built (``poetjax.train.loop``)."""
    graphdef, params, frozen = core.split_model(nnx.eval_shape(lambda: core.build_model(cfg)))
    key = core.run_keys(cfg.seed)[2]
    probe = jax.eval_shape(lambda p, f: core.initial_probes(nnx.merge(graphdef, p, f), key), params, frozen)
    abstract = jax.eval_shape(_state_maker(cfg, tx, graphdef), params, frozen, probe)
    shardings = state_shardings(graphdef, abstract, mesh, min_shard_size=cfg.mesh.min_shard_size)
    spec = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, spec, shardings


def state_program(cfg, tx: optax.GradientTransformation, graphdef, shardings):
    """``(params, frozen, probe) -> TrainState`` laid out as ``shardings``, jitted (the model's arrays
    donated): the fresh state's optimizer state and step counters made beside the built model's arrays and
    the phase probes (drawn on the host)."""
    return jax.jit(_state_maker(cfg, tx, graphdef), out_shardings=shardings, donate_argnums=(0, 1))


def init_train_state(cfg, tx: optax.GradientTransformation, mesh: Mesh, model: nnx.Module | None = None,
                     shardings=None, program=None):
    """(graphdef, TrainState laid out on ``mesh``, its shardings) of a fresh run of ``cfg`` (a RunConfig);
    the same graphdef and shardings as ``train_state_spec``.

    The model is built as on one device (``poetjax.train.steps.build_model``, so every mesh starts from
    bit-identical weights) and then split over the mesh; the optimizer state is created inside one jit
    with sharded outputs, so (e.g. AdamW's moments of a large baseline) it never exists whole anywhere.
    The model itself must fit one device (an 8B model's W0 in bf16 is 16 GB). ``model``: that model, if the
    caller built it already (``train.py`` times the two parts of the build apart); ``shardings``: the state's,
    if known already (``train_state_spec``'s), else derived here; ``program``: ``state_program``'s, if compiled
    already (``train.py`` compiles it ahead, before the run's other programs).
    """
    model = core.build_model(cfg) if model is None else model
    # Drawn on the host: drawn inside the state's program, each layer's probe was cut from its shape's batch at
    # a constant offset, a kernel per layer, most of that program's GPU compile (BENCHMARKS.md, "Time to
    # result, the probes drawn on the host").
    probe = core.initial_probes(model, core.run_keys(cfg.seed)[2], on_host=True)
    graphdef, params, frozen = core.split_model(model)
    make = _state_maker(cfg, tx, graphdef)
    if shardings is None:
        shardings = state_shardings(graphdef, jax.eval_shape(make, params, frozen, probe), mesh,
                                    min_shard_size=cfg.mesh.min_shard_size)
    params, frozen = place(params, shardings.params), place(frozen, shardings.frozen)
    state = (program or state_program(cfg, tx, graphdef, shardings))(params, frozen, place(probe, shardings.probe))
    return graphdef, state, shardings


def make_sharded_train_step(graphdef, tx: optax.GradientTransformation, shardings, mesh: Mesh, *,
                            microbatches: int = 1, lr_schedule=None, donate: bool = True):
    """``train_step(state, tokens (B, S+1)) -> (state, metrics)`` with the state laid out as ``shardings``
    (``state_shardings``), tokens as ``batch_sharding`` and the metrics replicated."""
    # jitted by core.make_train_step itself, so a wrapper of it (tests poison one step) still sees every call
    return core.make_train_step(graphdef, tx, microbatches=microbatches, lr_schedule=lr_schedule, donate=donate,
                                in_shardings=(shardings, batch_sharding(mesh)),
                                out_shardings=(shardings, replicated(mesh)), mesh=mesh)


def make_sharded_eval_step(graphdef, shardings, mesh: Mesh):
    """``eval_step(params, frozen, tokens (B, S+1), weights (B,)) -> (Σ NLL, Σ tokens)``, replicated."""
    step = core.under_mesh(core.make_eval_step(graphdef, jit=False), mesh)
    return jax.jit(step, in_shardings=(shardings.params, shardings.frozen, batch_sharding(mesh),
                                       batch_sharding(mesh, 1)),
                   out_shardings=replicated(mesh))


def make_sharded_merge_step(graphdef, shardings, mesh: Mesh, *, donate: bool = True):
    """``merge_step(state) -> state`` with the state laid out as ``shardings``.

    The merge gathers W0 with new permutations along both axes, which is a data-dependent shuffle of a
    sharded array; it runs on whole (all-gathered) W0s, on every device alike with the same key, and
    each device keeps its shard of the result. One all-gather of the frozen weights per merge, i.e.
    the traffic of one forward pass every ``merge_interval`` steps.
    """
    merge = core.make_merge_step(graphdef, jit=False)
    whole = jax.tree.map(lambda _: replicated(mesh), shardings.frozen)

    def merge_step(state):
        state = state._replace(frozen=jax.lax.with_sharding_constraint(state.frozen, whole))
        return merge(state)

    return jax.jit(merge_step, in_shardings=(shardings,), out_shardings=shardings,
                   donate_argnums=(0,) if donate else ())
