"""Tree surgery: ``poetize`` swaps every ``nnx.Linear`` of a model for a ``POETLinear``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from flax import nnx

from poetjax.config import POETConfig
from poetjax.layers import POETLinear


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def _is_excluded(path, exclude: Sequence[str]) -> bool:
    # Same rule as the reference: a (lower-cased) name filter on the qualified module path.
    name = _path_str(path).lower()
    return any(e.lower() in name for e in exclude)


def _set_child(model: nnx.Module, path, new) -> None:
    parent = model
    for p in path[:-1]:
        parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    last = path[-1]
    if isinstance(last, int):
        parent[last] = new
    else:
        setattr(parent, last, new)


def iter_modules(model: nnx.Module, kind: type) -> Iterator[tuple[tuple, nnx.Module]]:
    """(path, module) for every sub-module of type ``kind``, in nnx's deterministic graph order."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, kind):
            yield tuple(path), node


def poet_layers(model: nnx.Module) -> list[tuple[tuple, POETLinear]]:
    return list(iter_modules(model, POETLinear))


def poetize(model: nnx.Module, config: POETConfig, *, rngs: nnx.Rngs, exclude: Sequence[str] | None = None,
            verbose: bool = False) -> nnx.Module:
    """Replace every ``nnx.Linear`` whose path contains none of ``exclude`` by a ``POETLinear``.

    The new layer's W0 comes from the Linear's kernel by ``config.init`` ("keep" leaves the model's
    function unchanged); its bias, dtype, param_dtype and precision are carried over. Dimensions that
    the block size does not divide get a smaller last block (``poetjax.cayley``). Mutates ``model`` in
    place and returns it.
    """
    if not isinstance(config, POETConfig):
        raise TypeError(f"config must be a POETConfig, got {type(config).__name__}")
    exclude = tuple(config.exclude if exclude is None else exclude)
    targets = [(p, m) for p, m in iter_modules(model, nnx.Linear) if not _is_excluded(p, exclude)]
    if not targets:
        raise ValueError(f"poetize found no nnx.Linear to convert (exclude={exclude})")
    for path, lin in targets:
        new = POETLinear(lin.in_features, lin.out_features, config=config, use_bias=lin.bias is not None,
                         rngs=rngs, kernel=lin.kernel[...],
                         bias=None if lin.bias is None else lin.bias[...],
                         dtype=lin.dtype, param_dtype=lin.param_dtype, precision=lin.precision)
        _set_child(model, path, new)
        if verbose:
            print(f"poetize: {_path_str(path)} ({lin.in_features}→{lin.out_features})")
    return model
