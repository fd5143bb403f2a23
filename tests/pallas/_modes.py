"""Shared pieces of the kernel tests: run modes and index vectors.

Every correctness test runs twice: in Pallas's interpreter (any machine, CI) and natively on a GPU
(marked ``gpu``; skipped unless jax's default backend is a GPU). On the H100:
``python -m pytest -q -m gpu tests/pallas``.
"""

import jax
import numpy as np
import pytest

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (jax.default_backend() != 'gpu')")

# The ``interpret`` argument of the kernels.
MODES = [pytest.param(True, id="interpret"),
         pytest.param(False, id="gpu", marks=[pytest.mark.gpu, needs_gpu])]


def input_perm(rng, n: int, d: int, kind: str = "random") -> np.ndarray:
    """A (d,) index of ``permuted_block_matmul``: a permutation of range(n), then d − n padding values n."""
    base = {"random": rng.permutation(n), "identity": np.arange(n), "reversed": np.arange(n)[::-1]}[kind]
    return np.concatenate([base, np.full(d - n, n)]).astype(np.int32)


def output_perm(rng, m: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """perm (m,) = m distinct columns of range(d); inv (d,) with inv[perm[q]] = q, m elsewhere."""
    perm = rng.choice(d, m, replace=False).astype(np.int32)
    inv = np.full(d, m, np.int32)
    inv[perm] = np.arange(m)
    return perm, inv
