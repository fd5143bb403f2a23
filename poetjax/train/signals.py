"""Preemption: SIGTERM and SIGINT stop a run after the step in flight, with a checkpoint.

``StopSignals`` is installed by ``poetjax.train.loop.run`` for the whole run (in the main thread only;
elsewhere it does nothing). What a signal does depends on where the run is:

* in the training loop (``armed``): the first SIGTERM or SIGINT is only recorded. The loop finishes the
  step in flight, writes the checkpoint that ``train.stop_after`` would write at that step, and ``run``
  returns with ``RunResult.stopped_by`` set; ``train.py`` then exits with 128 + the signal number (143
  for SIGTERM, 130 for SIGINT), the status of a process ended by that signal, so a scheduler or a retry
  loop sees an unfinished job and starts the same command again, which resumes;
* before the loop (data, model, restore) and after it (final evaluation, plot): the signal raises
  ``Interrupted`` at once. Nothing trained is lost there: before the loop nothing new was trained, and
  the loop's last step is always checkpointed;
* a second signal, anywhere, ends the process at once (``os._exit``, same exit status) without a
  checkpoint. A watcher thread reads the signals from ``signal.set_wakeup_fd``, so this also works
  while the main thread is blocked in a compilation or a device wait, where Python handlers cannot run.

Several processes must stop at the same step, or their checkpoint would mix steps: ``poll`` takes the
maximum of every process's signal number with one small all-reduce per step, dispatched after the step
and read one step later, so the host never waits for it; every process reads the same value at the same
step, and all stop after the step then in flight. (``multihost_utils.reached_preemption_sync_point`` only
knows SIGTERM and needs the distributed runtime; this covers SIGINT and one process alike.)
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np

from poetjax import distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGINT outside the training loop; ``signum`` says which (the exit status is 128 + it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(signum: int) -> int:
    """The shell's status of a process ended by ``signum``: 143 for SIGTERM, 130 for SIGINT."""
    return 128 + int(signum)


class StopSignals:
    """Context manager over a run: records the first SIGTERM/SIGINT, exits at once on the second (module doc)."""

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self.armed = False                # in the training loop: record, do not raise
        self._count = 0
        self._old: dict[int, object] = {}
        self._pipe: tuple[int, int] | None = None
        self._old_fd = -1
        self._mesh = None
        self._reduce = None
        self._pending = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread: leave the defaults
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for s in SIGNALS:
            self._old[s] = signal.signal(s, self._on_signal)
        threading.Thread(target=self._watch, args=(r,), name="poetjax-signals", daemon=True).start()
        return self

    def __exit__(self, *exc):
        if self._pipe is None:
            return
        for s, handler in self._old.items():
            signal.signal(s, handler)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._pipe[1])  # the watcher's read returns b"" and it ends
        self._pipe = None

    def _on_signal(self, signum, frame):
        # The Python-level handler (main thread, between bytecodes); the watcher has already counted it.
        if self.received is None:
            self.received = signum
        if not self.armed:
            raise Interrupted(signum)

    def _watch(self, fd: int):
        try:
            while data := os.read(fd, 64):
                for signum in data:
                    if signum not in SIGNALS:
                        continue
                    self._count += 1
                    name = signal.Signals(signum).name
                    if self._count > 1:
                        os.write(2, f"\nsecond signal ({name}): exiting at once, without a checkpoint\n".encode())
                        os._exit(exit_status(signum))
                    if self.armed:
                        self.received = self.received or signum
                        os.write(2, f"\n{name}: stopping after the step in flight and writing a checkpoint "
                                    f"(send it again to exit at once, without one)\n".encode())
        finally:
            os.close(fd)

    # -- the loop's side ---------------------------------------------------------------------------
    def arm(self, mesh) -> None:
        """Enter the training loop on ``mesh`` (which spans every process)."""
        self.armed = True
        if jax.process_count() > 1:
            self._mesh = mesh
            self._reduce = jax.jit(jnp.max, out_shardings=dist.replicated(mesh))

    def disarm(self) -> None:
        self.armed = False

    def _dispatch(self) -> jax.Array:
        """max over processes of the signal numbers seen (0 = none), as a replicated scalar (not waited for)."""
        n = dist.batch_shards(self._mesh)
        local = self.received or 0
        flags = dist.global_batch(lambda rows: np.full(rows.stop - rows.start, local, np.int32), (n,),
                                  dist.batch_sharding(self._mesh, 1))
        return self._reduce(flags)

    def poll(self) -> int | None:
        """After dispatching a step: the signal to stop on after it, the same on every process, or None."""
        if self._reduce is None:
            return self.received
        pending, self._pending = self._pending, self._dispatch()
        return None if pending is None else (int(pending) or None)

    def poll_now(self) -> int | None:
        """``poll`` that waits for every process (once, after the loop: a signal that came after the last poll)."""
        if self._reduce is None:
            return self.received
        return int(self._dispatch()) or None
