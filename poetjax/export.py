"""Export a POET model as a plain model: every POETLinear becomes an nnx.Linear with the merged kernel.

The result has the structure of the model before ``poetize`` (same paths, ``kernel``/``bias`` leaves), so
its parameter tree loads into the plain architecture and computes the same logits. Weights can be written
to ``.npz`` (always available) or ``.safetensors`` (if the ``safetensors`` package is installed).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poetjax.layers import POETLinear
from poetjax.models.llama import layer_view
from poetjax.surgery import _set_child, iter_modules


def _plain_linear(layer: POETLinear) -> nnx.Linear:
    lin = nnx.Linear(layer.in_features, layer.out_features, use_bias=layer.bias is not None,
                     dtype=layer.dtype, param_dtype=layer.param_dtype, precision=layer.precision,
                     rngs=nnx.Rngs(0))  # values overwritten below
    lin.kernel[...] = layer.effective_kernel().astype(layer.param_dtype)
    if layer.bias is not None:
        lin.bias[...] = layer.bias[...]
    return lin


def export_plain(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every POETLinear replaced by an nnx.Linear holding W_eff (merged)."""
    plain = nnx.clone(layer_view(model))  # a stacked model (scan_layers) exports with one Block per layer
    layers = list(iter_modules(plain, POETLinear))
    if not layers:
        raise ValueError("export_plain: the model has no POET layers")
    for path, layer in layers:
        _set_child(plain, path, _plain_linear(layer))
    return plain


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]:
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        flat[key] = np.asarray(leaf.astype(jnp.float32) if leaf.dtype == jnp.bfloat16 else leaf)
    return flat


def save_weights(model: nnx.Module, path: str) -> str:
    """Write the (plain or POET-exported) model's Params to ``path`` (.npz or .safetensors)."""
    if any(True for _ in iter_modules(model, POETLinear)):
        model = export_plain(model)
    flat = _flat_params(model)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import save_file
        except ImportError as e:  # optional dependency
            raise ImportError("writing .safetensors needs the 'safetensors' package; use a .npz path") from e
        save_file(flat, path)
    elif path.endswith(".npz"):
        np.savez(path, **flat)
    else:
        raise ValueError(f"unknown weight file extension in {path!r}; use .npz or .safetensors")
    return path


def load_weights(model: nnx.Module, path: str) -> nnx.Module:
    """Load weights written by ``save_weights`` into a plain model of the same architecture (in place)."""
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        flat = load_file(path)
    else:
        with np.load(path) as f:
            flat = dict(f)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    expected = set(_flat_params(model))
    if set(flat) != expected:
        missing, extra = sorted(expected - set(flat)), sorted(set(flat) - expected)
        raise ValueError(f"weights in {path!r} do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")

    def fill(p, leaf):
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
        value = flat[key]
        if value.shape != leaf.shape:
            raise ValueError(f"{key}: shape {value.shape} in file vs {leaf.shape} in model")
        return jnp.asarray(value, leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, pure))
    nnx.update(model, state)
    return model
