"""Tree surgery: ``poetize`` swaps every ``nnx.Linear`` of a model for a ``POETLinear``; ``build_poetized``
builds a model already converted, one layer at a time (for models too large to exist in float first)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import jax
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


def _is_converted_kernel(targets: frozenset):
    def match(path, _value) -> bool:
        return len(path) >= 2 and path[-1] == "kernel" and tuple(path[:-1]) in targets
    return match


@functools.lru_cache(maxsize=None)
def _layer_initializer(n: int, m: int, config: POETConfig, use_bias: bool, dtype, param_dtype, precision):
    """key → a new POETLinear (n → m), its state computed by one jitted program per distinct layer shape."""

    def make(key):
        return POETLinear(n, m, config=config, use_bias=use_bias, rngs=nnx.Rngs(params=key), dtype=dtype,
                          param_dtype=param_dtype, precision=precision)

    graphdef = nnx.graphdef(nnx.eval_shape(make, jax.random.key(0)))
    init_state = jax.jit(lambda key: nnx.state(make(key)))
    return lambda key: nnx.merge(graphdef, init_state(key))


def build_poetized(make_model: Callable[[], nnx.Module], config: POETConfig, *, key: jax.Array,
                   exclude: Sequence[str] | None = None, verbose: bool = False) -> nnx.Module:
    """``make_model()`` with its Linears already converted, without ever building the float model.

    For models too large to exist in float first (a 34B LLaMA is 79 GB in bf16; POET-XQ stores it in
    ~40 GB): the model is traced abstractly (``nnx.eval_shape``); its unconverted state (embedding,
    norms, excluded Linears, biases) comes from its own initializers in one jitted program whose unused
    outputs — the converted kernels — XLA drops; each converted Linear becomes a POETLinear whose W0 is
    drawn from N(0, init_std²) and transformed by ``config.init`` (what ``poetize`` does with a freshly
    initialized Linear's kernel) inside one jitted program per layer shape, so at most one layer's float
    weight exists at a time. Layer i (nnx graph order) uses ``fold_in(key, i)``.

    Same distribution as ``poetize(make_model(), config)`` for a normally initialized model, not the same
    numbers (the kernels come from other keys).
    """
    if not isinstance(config, POETConfig):
        raise TypeError(f"config must be a POETConfig, got {type(config).__name__}")
    exclude = tuple(config.exclude if exclude is None else exclude)
    model = nnx.eval_shape(make_model)
    targets = [(p, m) for p, m in iter_modules(model, nnx.Linear) if not _is_excluded(p, exclude)]
    if not targets:
        raise ValueError(f"build_poetized found no nnx.Linear to convert (exclude={exclude})")
    drop = _is_converted_kernel(frozenset(p for p, _ in targets))
    rest = jax.jit(lambda: nnx.split(make_model(), drop, ...)[2])()
    nnx.update(model, rest)
    for i, (path, lin) in enumerate(targets):
        init = _layer_initializer(lin.in_features, lin.out_features, config, lin.bias is not None, lin.dtype,
                                  lin.param_dtype, lin.precision)
        new = init(jax.random.fold_in(key, i))
        if lin.bias is not None:
            new.bias[...] = lin.bias[...]
        _set_child(model, path, new)
        if verbose:
            print(f"build_poetized: {_path_str(path)} ({lin.in_features}→{lin.out_features})")
    return model
