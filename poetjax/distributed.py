"""Sharded POET training with jit + ``jax.sharding``: the mesh and the sharding rules (the sharded steps
that use them are ``poetjax.train.sharded``).

The SPMD partitioner is the whole distributed engine: each step is one ``jax.jit`` program whose inputs
and outputs carry ``NamedSharding``s from the rules below; XLA inserts the collectives. There is no
hand-written communication, and nothing is broadcast from a rank 0: the merge draws its permutations
from the PRNG key in the (replicated) state, so every device computes the same ones.

Mesh axes (``MESH_AXES``):

* ``data``: data-parallel replicas; the batch is split over it, the gradients are averaged over it.
* ``fsdp``: the batch is split over it too, and the big leaves are split along one dimension (FSDP /
  ZeRO-3): XLA all-gathers them where a step needs them whole and reduce-scatters their gradients.
  A "tensor" axis (splitting activations along the model dimension) would be a third name here with
  its own rules; it does not exist yet.

Sharding rules, by leaf role (``leaf_roles``: read from the Variable *types* of the model, not names):

=================  ===============================================================================
frozen W0          split over ``fsdp`` along its largest dimension that ``fsdp`` divides (replicated
                   when none does). Frozen: it has no gradient, so no collective ever reduces it; a
                   step only all-gathers it (the forward, and the backward's dx = g·W0ᵀ).
permutations       replicated (int32 index vectors, tiny; every device gathers with them).
generators θ       replicated: they are the (small) data-parallel part, all-reduced every step.
other trainable    (embedding, lm_head, norms; every weight of the AdamW/Muon baselines) split over
                   ``fsdp`` like W0 when they have at least ``min_shard_size`` entries, else replicated.
optimizer state    every leaf that mirrors a parameter (same path suffix and shape: Adam's mu, nu)
                   follows that parameter; counters and other scalars are replicated.
anything else      replicated (step, merge count, PRNG key data).
batches            (B, …) split over ("data", "fsdp") along B; B must be divisible by their product.
=================  ===============================================================================

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize()`` when the environment asks
for it; ``global_batch`` builds a global array from each process's own rows of the batch
(``process_rows``), so a host reads only its slice of the data.
"""

from __future__ import annotations

import math
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from poetjax.layers import FrozenWeight, Generator, Permutation, path_keys
from poetjax.run_sections import DISTRIBUTED_MODES

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")

# Roles of the leaves of a model state (see the module docstring).
W0, PERMUTATION, GENERATOR, TRAINABLE, OTHER = "w0", "permutation", "generator", "trainable", "other"


class MeshError(ValueError):
    """A mesh that does not fit the devices, or a batch that does not fit the mesh; the message says which."""


# ----------------------------------------------------------------------------------------------------
# the mesh

def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) with one ``-1`` resolved to the remaining devices; checked against ``num_devices``."""
    for name, v in (("data", data), ("fsdp", fsdp)):
        if v == 0 or v < -1:
            raise MeshError(f"mesh.{name} must be a positive number of devices or -1 (the rest), got {name}={v}")
    if data == -1 and fsdp == -1:
        raise MeshError("at most one of mesh.data and mesh.fsdp may be -1 (the rest of the devices)")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if num_devices % known:
            raise MeshError(f"mesh.{'fsdp' if data == -1 else 'data'}={known} does not divide the "
                            f"{num_devices} available devices")
        rest = num_devices // known
        data, fsdp = (rest, fsdp) if data == -1 else (data, rest)
    if data * fsdp > num_devices:
        raise MeshError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, but only {num_devices} "
                        f"are available ({jax.default_backend()})")
    return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh over ``devices`` (default: all devices of every process).

    When the mesh uses fewer devices than given (e.g. ``data=1, fsdp=1`` on an 8-device host), it takes
    the first ones.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(data, fsdp, len(devices))
    used = devices[:data * fsdp]
    if len(used) == len(devices) and len(devices) > 1:
        try:  # topology-aware order (NVLink / ICI neighbours adjacent) when the runtime knows it
            from jax.experimental import mesh_utils

            arr = mesh_utils.create_device_mesh((data, fsdp), devices=used)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(used, dtype=object).reshape(data, fsdp)
    else:
        arr = np.asarray(used, dtype=object).reshape(data, fsdp)
    return Mesh(arr, MESH_AXES)


def mesh_from_config(mesh_cfg, devices=None) -> Mesh:
    """``make_mesh`` from a run config's ``mesh`` section (``poetjax.run_config.MeshConfig``)."""
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, devices)


def describe(mesh: Mesh) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    procs = jax.process_count()
    return (f"mesh ({shape}) over {mesh.devices.size} {mesh.devices.flat[0].platform} device(s)"
            + (f" on {procs} processes" if procs > 1 else ""))


# ----------------------------------------------------------------------------------------------------
# multi-host entry

def distributed_requested(mode: str, environ=None) -> bool:
    """Whether ``initialize_distributed(mode)`` would start the multi-process runtime.

    "on": always (cluster auto-detection of SLURM, Open MPI, Kubernetes or Cloud TPU fills in what the
    environment does not give); "off": never; "auto": when ``JAX_COORDINATOR_ADDRESS`` is set.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"mesh.distributed must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    env = os.environ if environ is None else environ
    return mode == "on" or (mode == "auto" and bool(env.get("JAX_COORDINATOR_ADDRESS")))


def initialize_distributed(mode: str = "auto", environ=None) -> bool:
    """Start JAX's multi-process runtime if ``mode`` asks for it (see ``distributed_requested``).

    Reads ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``; what is missing is left to JAX's cluster detection. Must run before anything
    touches a device. Returns True when the runtime is (now) initialized.
    """
    if not distributed_requested(mode, environ):
        return False
    if jax.distributed.is_initialized():
        return True
    env = os.environ if environ is None else environ
    kwargs = {}
    for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if env.get(key):
            try:
                kwargs[arg] = int(env[key])
            except ValueError:
                raise MeshError(f"{key}={env[key]!r} is not an integer") from None
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    jax.distributed.initialize(**kwargs)
    return True


# ----------------------------------------------------------------------------------------------------
# sharding rules

def leaf_roles(graphdef, params, frozen) -> dict[tuple, str]:
    """{path (relative to the model) → role} for every array of the model's ``params`` and ``frozen``
    trees, from the types of the Variables that hold them (leaves may be arrays or ShapeDtypeStructs)."""
    model = nnx.merge(graphdef, params, frozen)
    roles: dict[tuple, str] = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if isinstance(var, FrozenWeight):
            role = W0
        elif isinstance(var, Permutation):
            role = PERMUTATION
        elif isinstance(var, Generator):
            role = GENERATOR
        elif isinstance(var, nnx.Param):
            role = TRAINABLE
        else:
            role = OTHER
        roles[tuple(path)] = role
    return roles


def _split_dim(shape: tuple[int, ...], n: int) -> int | None:
    """The largest dimension that ``n`` divides (the first of equals), or None."""
    best = None
    for d, size in enumerate(shape):
        if size % n == 0 and (best is None or size > shape[best]):
            best = d
    return best


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    n = mesh.shape["fsdp"]
    d = _split_dim(shape, n) if n > 1 else None
    if d is None:
        return P()
    spec = [None] * len(shape)
    spec[d] = "fsdp"
    return P(*spec)


def spec_for(role: str, shape: tuple[int, ...], mesh: Mesh, min_shard_size: int) -> P:
    """The PartitionSpec of a leaf of ``role`` and ``shape`` (the rules of the module docstring)."""
    if role == W0:
        return _fsdp_spec(shape, mesh)
    if role == TRAINABLE and math.prod(shape) >= min_shard_size:
        return _fsdp_spec(shape, mesh)
    return P()


def state_specs(graphdef, state, mesh: Mesh, *, min_shard_size: int = 1 << 16):
    """A pytree of PartitionSpecs shaped like ``state`` (a ``TrainState`` or any pytree with ``params``
    and ``frozen`` fields; leaves may be arrays or ShapeDtypeStructs)."""
    roles = leaf_roles(graphdef, state.params, state.frozen)
    by_param: dict[tuple, tuple[tuple, P]] = {}  # param path → (shape, spec), for the optimizer state

    def model_spec(path, leaf):
        key = path_keys(path)
        spec = spec_for(roles.get(key, OTHER), tuple(leaf.shape), mesh, min_shard_size)
        by_param[key] = (tuple(leaf.shape), spec)
        return spec

    params = jax.tree_util.tree_map_with_path(model_spec, state.params)
    frozen = jax.tree_util.tree_map_with_path(model_spec, state.frozen)

    def follow(path, leaf):
        # Optimizer leaves that mirror a parameter end with that parameter's path (mu['layers'][0]...).
        key = path_keys(path)
        for start in range(len(key)):
            hit = by_param.get(key[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return P()

    rest = {name: jax.tree_util.tree_map_with_path(follow, getattr(state, name))
            for name in state._fields if name not in ("params", "frozen")}
    return state._replace(params=params, frozen=frozen, **rest)


def state_shardings(graphdef, state, mesh: Mesh, *, min_shard_size: int = 1 << 16):
    """``state_specs`` as NamedShardings on ``mesh``."""
    specs = state_specs(graphdef, state, mesh, min_shard_size=min_shard_size)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over ("data", "fsdp"), every other axis whole."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shards(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, microbatches: int = 1) -> None:
    """MeshError unless every device gets whole rows of every microbatch."""
    n = batch_shards(mesh)
    if batch_size % (n * microbatches):
        what = f"microbatches={microbatches} x " if microbatches > 1 else ""
        raise MeshError(f"train.batch_size={batch_size} is not divisible by {what}the {n} batch shards of the mesh "
                        f"({', '.join(f'{a}={mesh.shape[a]}' for a in BATCH_AXES)}); change train.batch_size or "
                        f"mesh.data/mesh.fsdp")


# ----------------------------------------------------------------------------------------------------
# placing state and batches

def place(tree, shardings):
    """``tree`` (arrays that every process holds whole, with the same values) laid out as ``shardings``;
    each device receives only its shard. Works with one process or several."""

    def put(x, s):
        if len(s.device_set) == len(s.addressable_devices):  # every device is ours: a plain transfer
            return jax.device_put(x, s)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows (leading axis) of a global array that this process's devices hold under ``sharding``.

    They must be one contiguous range (true for the batch sharding of ``make_mesh``'s meshes, where each
    process owns a block of devices).
    """
    idx = sharding.addressable_devices_indices_map(tuple(global_shape))
    rows = sorted({(s[0].start or 0, global_shape[0] if s[0].stop is None else s[0].stop) for s in idx.values()})
    start, stop = rows[0][0], rows[0][1]
    for a, b in rows[1:]:
        if a > stop:
            raise MeshError(f"process {jax.process_index()} holds rows {rows} of the batch, not one contiguous range; "
                            f"build the mesh with poetjax.distributed.make_mesh")
        stop = max(stop, b)
    return slice(start, stop)


def global_batch(read_rows: Callable[[slice], np.ndarray], global_shape: tuple[int, ...],
                 sharding: NamedSharding) -> jax.Array:
    """A global (B, …) array laid out as ``sharding`` from ``read_rows(slice)`` → this process's rows.

    Each process reads only the rows its devices hold; with one process that is the whole batch.
    """
    rows = process_rows(sharding, global_shape)
    local = np.asarray(read_rows(rows))
    expected = (rows.stop - rows.start, *global_shape[1:])
    if local.shape != expected:
        raise ValueError(f"read_rows({rows}) returned shape {local.shape}, expected {expected}")
    return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


