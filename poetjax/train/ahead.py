"""A run's programs compiled side by side, on worker threads, before their first call.

Compiled on first call, a cold run pays the train step's, the diagnostics', the merge's and the eval
step's compile times one after the other. XLA compiles with the GIL released, so ``Ahead`` lowers and
compiles each on a worker thread as soon as the state exists, and the run waits only for the program it
calls next (BENCHMARKS.md, "Time to result").

The programs that run once in hundreds of steps (state init, merge, diagnostics, evaluation) are compiled
with ``RARE_OPTIONS``: no GPU autotuning, which buys them little, and no Triton GEMM fusions (cuBLAS serves
their GEMMs; the fusions' compiles were a large share of the merge's compile, BENCHMARKS.md, "The state's
own program compiled first"; the eval step's autotuning ran on the GPU beside the first training steps and
slowed them). Their outputs are the same up to rounding (the options choose among kernels of the same
computation). The train step keeps XLA's defaults (``train_options``), except Triton GEMM fusions in models
of hidden size ≤ ``SMALL_WIDTH``: at llama_60m (512) the steps without them were no slower and compiled
faster; at Llama-1B (2048) they were slower (BENCHMARKS.md, "Current defaults and why"). An option that
``XLA_FLAGS`` sets keeps the user's value (``compiler_options``).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


RARE_OPTIONS = {"xla_gpu_autotune_level": 0, "xla_gpu_enable_triton_gemm": False}
SMALL_WIDTH = 512  # the widest hidden size measured no slower without Triton GEMM fusions


def train_options(hidden_size: int) -> dict:
    """The train step's compile options for a model of ``hidden_size``: none (XLA's defaults), or no
    Triton GEMM fusions up to ``SMALL_WIDTH``, where cuBLAS serves the small GEMMs as fast and autotuning the
    fusions is a large share of the step's compile."""
    return {"xla_gpu_enable_triton_gemm": False} if hidden_size <= SMALL_WIDTH else {}


def compiler_options(options: dict | None, xla_flags: str | None = None) -> dict:
    """``options`` less those that ``xla_flags`` (default: the ``XLA_FLAGS`` environment variable) sets:
    a flag the user passes wins over the project's choice."""
    xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    named = {f.lstrip("-").split("=", 1)[0] for f in xla_flags.split()}
    return {k: v for k, v in (options or {}).items() if k not in named}


class Ahead:
    """``submit(program, *specs)`` → a callable that runs ``program`` compiled for ``specs`` (shapes,
    dtypes, shardings), waiting on its first call for the compile started on a worker. A compile error
    is raised at that first call. Use as a context manager: leaving it drops the compiles not started and
    waits for those under way (a run leaves no thread behind, and its cache entries are written)."""

    def __init__(self, workers: int | None = None, start: float | None = None):
        workers = workers or min(4, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="poetjax-compile")
        self._t0 = time.perf_counter() if start is None else start  # a time.perf_counter() value
        self.compiles: dict[str, tuple[float, float]] = {}  # name → (seconds after start, seconds compiling)

    def __enter__(self) -> "Ahead":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def submit(self, program: Callable, *specs: Any, options: dict | None = None,
               after: Callable | None = None, name: str = "") -> Callable:
        """``program``: a ``jax.jit`` function (anything without ``lower``, e.g. a test's wrapper, is
        returned unchanged and compiles on its first call as usual). ``options``: XLA compiler options of
        this program (those ``XLA_FLAGS`` does not set: ``compiler_options``). ``after``: a callable
        returned by ``submit`` whose compile this one waits for (so that two programs with the same matrix
        shapes do not autotune at the same time, or a rare one does not slow the next one needed). ``name``: the
        key of this compile in ``compiles``: (seconds from ``start`` (default: this ``Ahead``'s creation)
        to the compile's end, seconds the lowering and compile took)."""
        if not hasattr(program, "lower"):
            return program
        before: Future | None = getattr(after, "future", None)

        def build():
            if before is not None:
                before.result()
            t0 = time.perf_counter()
            compiled = program.lower(*specs).compile(compiler_options=compiler_options(options))
            t1 = time.perf_counter()
            if name:
                self.compiles[name] = (t1 - self._t0, t1 - t0)
            return compiled

        future = self._pool.submit(build)

        def call(*args):
            return future.result()(*args)  # a done future answers at once

        call.future = future
        return call
