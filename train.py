"""Pretrain a LLaMA model with POET-X: ``python train.py [--config configs/X.yaml] [key=value ...]``.

With no arguments this is the default job: tokenize the shipped Tiny Shakespeare corpus, train a small
POET LLaMA on CPU for a few minutes, and print the final validation perplexity. The logic lives in
``poetjax.train``; outputs go to ``runs/<name>/``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from a checkout without installing
# LAPACK calls on CPU (the diagnostics' SVDs) go through OpenBLAS from XLA's own worker threads; letting
# OpenBLAS start threads of its own oversubscribes the cores and made them ~30x slower on a 2-core VM.
# Set before numpy loads OpenBLAS; an explicit setting in the environment wins. Not with several virtual
# CPU devices (XLA_FLAGS ..._device_count): their threads call LAPACK concurrently, and single-threaded
# OpenBLAS then deadlocked a sharded run's first SVD (reproduced with mesh.data=8).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
else:
    # Virtual CPU devices run their collectives in-process: every participant of an all-reduce blocks a
    # thread of XLA's CPU pools, which have one thread per core unless NPROC says otherwise. Eight devices
    # on a 2-core machine deadlocked there (XLA aborts the process after its collective timeout), so give
    # the pools two threads per device. Read when the backend starts, so setting it here is in time.
    _count = os.environ["XLA_FLAGS"].split("xla_force_host_platform_device_count=")[1].split()[0]
    if _count.isdigit():
        os.environ.setdefault("NPROC", str(max(2 * int(_count), os.cpu_count() or 1)))

from poetjax.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
