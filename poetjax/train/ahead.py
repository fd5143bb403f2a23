"""A run's programs compiled side by side, on worker threads, before their first call.

Compiled on first call, a cold run pays the train step's, the diagnostics', the merge's and the eval
step's compile times one after the other. XLA compiles with the GIL released, so ``Ahead`` lowers each
program on a worker thread as soon as it is submitted (from the state's shapes alone), compiles them side
by side once ``release`` is called (or a program is first called), and the run waits only for the program
it calls next (BENCHMARKS.md, "Time to result").

Why the compiles wait for ``release``: a small program's compile waits for a large one under way, so a
state built while the train step compiles has each of its own small programs (initializers, the state's
maker) wait for it; on the CPU that made building llama_60m's stacked model take 13.2 s instead of 3.5 s.
The run releases the compiles once its state is built.

The programs that run once in hundreds of steps (merge, diagnostics) are compiled with ``RARE_OPTIONS``:
no GPU autotuning, which buys them little; their outputs are the same up to rounding (autotuning picks among
kernels of the same computation).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


RARE_OPTIONS = {"xla_gpu_autotune_level": 0}


class Ahead:
    """``submit(program, *specs)`` → a callable that runs ``program`` compiled for ``specs`` (shapes,
    dtypes, shardings): lowered on a worker at once, compiled there after ``release()``; its first call
    releases the compiles and waits for its own. A lowering or compile error is raised at that first call.
    Use as a context manager: leaving it drops the compiles not started (and all of them if never released)
    and waits for those under way (a run leaves no thread behind, and its cache entries are written)."""

    def __init__(self, workers: int | None = None, start: float | None = None):
        workers = workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poetjax-compile")
        self._t0 = time.perf_counter() if start is None else start  # a time.perf_counter() value
        self._released, self._closed = threading.Event(), False
        self.compiles: dict[str, tuple[float, float]] = {}  # name → (seconds after start, seconds compiling)

    def __enter__(self) -> "Ahead":
        return self

    def __exit__(self, *exc) -> None:
        if not self._released.is_set():  # held compiles give up rather than compile for a run that has ended
            self._closed = True
            self._released.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def release(self) -> None:
        """Let the submitted programs' compiles start (their lowering does not wait for this)."""
        self._released.set()

    def submit(self, program: Callable, *specs: Any, options: dict | None = None,
               after: Callable | None = None, name: str = "") -> Callable:
        """``program``: a ``jax.jit`` function (anything without ``lower``, e.g. a test's wrapper, is
        returned unchanged and compiles on its first call as usual). ``options``: XLA compiler options of
        this program. ``after``: a callable returned by ``submit`` whose compile this one waits for (so
        that two programs with the same matrix shapes do not autotune at the same time). ``name``: the
        key of this compile in ``compiles``: (seconds from ``start`` (default: this ``Ahead``'s creation)
        to the compile's end, seconds the lowering and compile took)."""
        if not hasattr(program, "lower"):
            return program
        before: Future | None = getattr(after, "future", None)

        def build():
            t0 = time.perf_counter()
            lowered = program.lower(*specs)
            lowering = time.perf_counter() - t0
            self._released.wait()
            if before is not None:
                before.result()
            if self._closed:
                raise RuntimeError(f"Ahead left before compiling {name or program}")
            t1 = time.perf_counter()
            compiled = lowered.compile(compiler_options=options)
            t2 = time.perf_counter()
            if name:
                self.compiles[name] = (t2 - self._t0, lowering + t2 - t1)
            return compiled

        future = self._pool.submit(build)

        def call(*args):
            self._released.set()
            return future.result()(*args)  # a done future answers at once

        call.future = future
        return call
