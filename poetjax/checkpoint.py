"""Checkpoints of a run with orbax — the only module that imports orbax.

A checkpoint at step s is the directory ``<dir>/<s>/`` holding two orbax items:

* ``state``: the whole ``TrainState`` pytree (trainable params, frozen W0/permutations, optimizer state,
  step, merge count, PRNG key data) — enough to continue bit-for-bit;
* ``meta`` (JSON): the step, the data position, the merge count, the run config, the data identity and
  the *signature* of the state (every leaf's path, shape and dtype).

``restore`` reads ``meta`` first and refuses, naming the first difference, when the signature does not
match the state the current config builds; an unreadable step raises ``CheckpointError`` with the step
and the other steps on disk. Nothing here ever deletes a checkpoint except orbax's ``keep`` rotation
while saving.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (unreadable, incomplete or written by a different run)."""


def state_signature(state: Any) -> list[list]:
    """[[path, shape, dtype], …] of every leaf of ``state`` (arrays or ShapeDtypeStructs)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return [[jax.tree_util.keystr(p), list(np.shape(x)), str(np.dtype(x.dtype))] for p, x in leaves]


def _first_difference(saved: list, now: list) -> str:
    saved_map = {s[0]: s for s in saved}
    now_map = {s[0]: s for s in now}
    for path, *spec in now:
        if path not in saved_map:
            return f"{path} {spec} is not in the checkpoint"
        if saved_map[path][1:] != spec:
            return f"{path}: checkpoint has shape/dtype {saved_map[path][1:]}, the current model {spec}"
    for path, *spec in saved:
        if path not in now_map:
            return f"the checkpoint has {path} {spec}, which the current model lacks"
    return "leaf order differs"


def committed_steps(directory: str) -> list[int]:
    """The complete checkpoint steps in ``directory`` (ascending; [] when it does not exist), without
    creating anything: orbax writes a step under a temporary name and renames it to the step number
    when it is complete."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


class Checkpointer:
    """Save/restore ``TrainState`` + JSON meta under ``directory`` (created if missing)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = False):
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=opts)

    # -- inventory -----------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed checkpoint steps, ascending (orbax never lists a half-written step)."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # -- save ----------------------------------------------------------------------------------
    def save(self, step: int, state: Any, meta: dict) -> None:
        meta = dict(meta, step=int(step), signature=state_signature(state))
        self._mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                           meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- restore -------------------------------------------------------------------------------
    def _broken(self, step: int, err: Exception) -> CheckpointError:
        others = [s for s in self.steps() if s != step]
        hint = (f" Other checkpoints on disk: {others}; move {os.path.join(self.directory, str(step))} out of the "
                f"way to resume from step {others[-1]} (nothing was deleted).") if others else " Nothing was deleted."
        return CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable or incomplete "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).{hint}")

    def read_meta(self, step: int) -> dict:
        if step not in self.steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory} (steps on disk: {self.steps()})")
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:
            raise self._broken(step, e) from e
        if not isinstance(meta, dict) or "signature" not in meta or meta.get("step") != step:
            raise self._broken(step, ValueError("meta is missing or does not describe this step"))
        return meta

    def restore(self, step: int, like: Any, shardings: Any = None) -> tuple[Any, dict]:
        """(state shaped like ``like``, meta) of ``step``; ``like`` may hold arrays or ShapeDtypeStructs.

        The restored arrays are laid out as ``shardings`` (a pytree of ``jax.sharding.Sharding`` shaped
        like ``like``) when given, else as ``like``'s own arrays are. The layout at save time does not
        matter: a checkpoint written on one device mesh restores onto any other (each device reads only
        its shards).
        """
        meta = self.read_meta(step)
        now = state_signature(like)
        if meta["signature"] != now:
            raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match the model/optimizer of "
                                  f"the current config: {_first_difference(meta['signature'], now)}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        if shardings is not None:
            target = jax.tree.map(lambda t, s: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=s), target, shardings)
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise self._broken(step, e) from e
        state = restored.state
        if hasattr(state, "step") and int(np.asarray(state.step)) != step:
            raise self._broken(step, ValueError(f"stored state is at step {int(np.asarray(state.step))}"))
        return state, meta
