"""The one place where numerical tolerances live (used by tests, kernels' checks and benchmarks).

``tolerance(dtype, kind)`` is a relative error bound ‖actual − expected‖ / ‖expected‖:

* "value":  a forward result computed two ways (factored vs dense, kernel vs reference);
* "grad":   gradients computed two ways (longer chains of rounding);
* "same":   the same math in a different order or schedule (e.g. fast vs mem, remat vs not).

Never loosen an entry to make a test pass: fix the code or explain the numerics.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from poetjax.config import VARIANTS, ExecConfig, POETConfig

_EXEC_FIELDS = tuple(f.name for f in dataclasses.fields(ExecConfig))


def poet_config(variant: str = "fast", **fields) -> POETConfig:
    """The POETConfig of a named variant (``poetjax.config.VARIANTS``) with ``fields``; ExecConfig's fields
    (impl, compute, …) may be given among them, for parametrized tests and benchmarks."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got variant={variant!r}")
    exec_fields = {k: fields.pop(k) for k in _EXEC_FIELDS if k in fields}
    return POETConfig(**VARIANTS[variant], **fields, exec=ExecConfig(**exec_fields))

_TABLE = {
    # dtype      value   grad    same
    "float64": (1e-12, 1e-10, 1e-13),
    "float32": (1e-5, 1e-4, 1e-6),
    "bfloat16": (2e-2, 4e-2, 1e-2),
    "float16": (3e-3, 6e-3, 2e-3),
}
_KINDS = ("value", "grad", "same")


def tolerance(dtype, kind: str = "value") -> float:
    name = jnp.dtype(dtype).name
    if name not in _TABLE:
        raise ValueError(f"no tolerance for dtype {name!r}; known: {sorted(_TABLE)}")
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got kind={kind!r}")
    return _TABLE[name][_KINDS.index(kind)]


def rel_err(actual, expected) -> float:
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shape mismatch: actual {a.shape} vs expected {e.shape}")
    denom = np.linalg.norm(e)
    return float(np.linalg.norm(a - e) / (denom if denom > 0 else 1.0))


def assert_close(actual, expected, dtype, kind: str = "value", what: str = "") -> None:
    err = rel_err(actual, expected)
    tol = tolerance(dtype, kind)
    if not np.isfinite(err) or err > tol:
        raise AssertionError(f"{what or 'result'}: relative error {err:.3e} > {tol:.1e} ({jnp.dtype(dtype).name}, {kind})")
