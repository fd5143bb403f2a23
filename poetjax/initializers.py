"""Initialization schemes of the frozen base weight W0 (POET spec §2), kernel layout (N in, M out).

A "neuron" is the weight vector feeding one output unit: a column of the (N, M) kernel (a row of
PyTorch's (M, N) weight). All functions are pure and take explicit PRNG keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from poetjax.config import INIT_SCHEMES


def normalize_neurons(kernel_NxM: jax.Array) -> jax.Array:
    """Scale every column (neuron) to unit L2 norm (the reference's ``normalize_weights``)."""
    k = kernel_NxM.astype(jnp.float32)
    norms = jnp.linalg.norm(k, axis=0, keepdims=True)
    return k / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)


# The standard deviation of fresh draws (LLaMA's initializer_range).
STD = 0.02


def mup_factor(n: int, m: int) -> float:
    """The factor that takes an (N, M) kernel with unit-norm neurons to ‖W‖₂ ≈ sqrt(M/N), the μP spectral
    condition (fan-out over fan-in; Yang, Simon & Bernstein, 2023): M random unit-norm columns of length N
    have ‖W‖₂ ≈ 1 + sqrt(M/N) (Marchenko–Pastur edge, either aspect ratio), so the factor is
    sqrt(M/N) / (1 + sqrt(M/N))."""
    r = (m / n) ** 0.5
    return r / (1.0 + r)


def base_weight(scheme: str, key: jax.Array, shape: tuple[int, int], *, kernel: jax.Array | None = None,
                scale: float = 1.0) -> jax.Array:
    """W0 (N, M) in float32 by ``scheme``, times ``scale``; ``kernel`` is the weight being converted (if any).

    Schemes that transform an existing weight ("normalized", "mup", "uniform_spectrum", "keep") draw a
    standard N(0, STD²) kernel when none is given.
    """
    return scale * _scheme_weight(scheme, key, shape, kernel)


def _scheme_weight(scheme, key, shape, kernel):
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; expected one of {INIT_SCHEMES}")
    n, m = shape
    if kernel is not None and tuple(kernel.shape) != (n, m):
        raise ValueError(f"kernel shape {tuple(kernel.shape)} does not match (in, out)={shape}")
    if scheme == "normalized_gaussian":
        return normalize_neurons(jax.random.normal(key, shape, jnp.float32))
    if scheme == "standard":
        return STD * jax.random.normal(key, shape, jnp.float32)
    if scheme == "xavier":
        return jnp.sqrt(2.0 / (n + m)) * jax.random.normal(key, shape, jnp.float32)
    if kernel is None:
        kernel = STD * jax.random.normal(key, shape, jnp.float32)
    kernel = kernel.astype(jnp.float32)
    if scheme == "keep":
        return kernel
    if scheme == "normalized":
        return normalize_neurons(kernel)
    if scheme == "mup":
        return mup_factor(n, m) * normalize_neurons(kernel)
    # uniform_spectrum: every singular value set to 1.
    u, _, vt = jnp.linalg.svd(kernel, full_matrices=False)
    return u @ vt
