"""Tree surgery: ``poetize`` swaps every ``nnx.Linear`` of a model for a ``POETLinear``; ``build_poetized``
builds a model already converted, one layer at a time (for models too large to exist in float first).

Stacked layers (a LLaMA with ``scan_layers=True``): an ``nnx.Linear`` whose kernel has a leading layer
axis (L, N, M) becomes one POETLinear with a leading layer axis on every Variable; layer slice l is
converted exactly as an unstacked Linear would be, with its own key (``stacked_depth``, ``view_order``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from poetjax.config import POETConfig
from poetjax.layers import POETLinear, install_scope_hook
from poetjax.models.llama import layer_view, rngs_at  # LLaMA is the one model with a stacked layout


# Linears poetize leaves dense unless told otherwise (a name filter on the lower-cased module path, as the
# reference does): the output projection.
EXCLUDE = ("lm_head",)


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def _is_excluded(path, exclude: Sequence[str]) -> bool:
    # Same rule as the reference: a (lower-cased) name filter on the qualified module path.
    name = _path_str(path).lower()
    return any(e.lower() in name for e in exclude)


def set_child(model: nnx.Module, path, new) -> None:
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


def fold_in_each(key: jax.Array, indices: Sequence[int]) -> jax.Array:
    """``jnp.stack([jax.random.fold_in(key, i) for i in indices])`` as one vmapped hash, not one per index
    (each is its own kernel to compile on a GPU)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(indices, jnp.uint32))


def stack_trees(trees: Sequence) -> object:
    """One pytree whose leaves stack (``jnp.stack``) the leaves of ``trees`` (all of one structure)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def vmap_layers(fn: Callable, modules: Sequence[nnx.Module], *args: Sequence):
    """``fn(module, *args)`` of modules of one graph (shapes, dtypes, config) traced once under ``jax.vmap``:
    the results stacked along a leading axis, in the order of ``modules``. ``fn`` must be pure (changes it
    makes to its module are dropped); ``args`` are per-module pytrees."""
    graphdef = nnx.graphdef(modules[0])
    one = lambda state, *a: fn(nnx.merge(graphdef, state), *a)
    return jax.vmap(one)(stack_trees([nnx.state(m) for m in modules]), *[stack_trees(a) for a in args])


def map_layers(fn: Callable, modules: Sequence[nnx.Module], *args: Sequence) -> list:
    """``[fn(modules[i], *(a[i] for a in args)) for i ...]`` with one trace per structure: modules of the same
    graph (e.g. every q_proj of a model) go through ``vmap_layers`` together, so a program that visits every
    layer grows with the number of distinct layer shapes, not of layers."""
    groups: dict = {}
    for i, m in enumerate(modules):
        groups.setdefault(nnx.graphdef(m), []).append(i)
    out: list = [None] * len(modules)
    for idx in groups.values():
        res = vmap_layers(fn, [modules[i] for i in idx], *[[a[i] for i in idx] for a in args])
        for j, i in enumerate(idx):
            out[i] = jax.tree.map(lambda x: x[j], res)
    return out


def poet_layers(model: nnx.Module) -> list[tuple[tuple, POETLinear]]:
    return list(iter_modules(model, POETLinear))


def stacked_depth(module: nnx.Module) -> int:
    """0 for an ordinary layer, 1 for a layer stacked along a leading layer axis (``scan_layers``)."""
    if isinstance(module, POETLinear):
        return module.theta_in.ndim - 2
    if isinstance(module, nnx.Linear):
        return module.kernel.ndim - 2
    raise TypeError(f"stacked_depth: expected a POETLinear or nnx.Linear, got {type(module).__name__}")


def _slice_path(path: tuple, i: int) -> tuple:
    """Path in the per-layer view of slice ``i`` of the stacked module at ``path`` (a LLaMA's stacked
    ``layers`` Block: ('layers', 'attn', 'q_proj') → ('layers', i, 'attn', 'q_proj'))."""
    return tuple(path[:1]) + (i,) + tuple(path[1:])


def view_order(model: nnx.Module, kind: type, paths: Sequence[tuple], keep: Callable = lambda path: True
               ) -> list[list[int]]:
    """For each of the ``kind`` modules at ``paths`` of ``model``: the index of each of its layer slices
    (one for an unstacked module) among the ``kind`` modules of the model's per-layer view
    (``poetjax.models.layer_view``) whose path passes ``keep``, in graph order. Keys are derived from
    these indices, so a stacked model draws the same numbers as its unstacked twin."""
    view = nnx.eval_shape(layer_view, model)  # abstract: works for concrete and abstract models
    index = {p: i for i, p in enumerate(p for p, _ in iter_modules(view, kind) if keep(p))}
    out = []
    for path in paths:
        node = model
        for p in path:
            node = node[p] if isinstance(p, int) else getattr(node, p)
        if stacked_depth(node) == 0:
            out.append([index[tuple(path)]])
        else:
            n = (node.theta_in if isinstance(node, POETLinear) else node.kernel).shape[0]
            out.append([index[_slice_path(path, i)] for i in range(n)])
    return out


def _convert(lin: nnx.Linear, config: POETConfig, rngs: nnx.Rngs, kernel, bias) -> POETLinear:
    return POETLinear(lin.in_features, lin.out_features, config=config, use_bias=lin.bias is not None,
                      rngs=rngs, kernel=kernel, bias=bias, dtype=lin.dtype,
                      param_dtype=lin.param_dtype, precision=lin.precision)


# Keys a POETLinear draws from its rngs at construction: one for W0's init, one for the permutations.
_POET_DRAWS = 2


def _convert_stacked(lin: nnx.Linear, config: POETConfig, key: jax.Array, counts: Sequence[int]) -> POETLinear:
    """A stacked Linear (kernel (L, N, M)) as one POETLinear stacked the same way; slice l is built from
    ``rngs_at(key, counts[l])``, as an unstacked Linear converted at that point of the stream would be."""
    bias = None if lin.bias is None else lin.bias[...]

    def one(kernel, b, count):
        return _convert(lin, config, rngs_at(key, count), kernel, b)

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: one(lin.kernel[0], None if bias is None else bias[0], 0)))
    state = jax.vmap(lambda k, b, c: nnx.state(one(k, b, c)))(lin.kernel[...], bias,
                                                               jnp.asarray(counts, jnp.uint32))
    return nnx.merge(graphdef, state)


def poetize(model: nnx.Module, config: POETConfig, *, rngs: nnx.Rngs, exclude: Sequence[str] | None = None,
            verbose: bool = False) -> nnx.Module:
    """Replace every ``nnx.Linear`` whose path contains none of ``exclude`` (default ``EXCLUDE``) by a
    ``POETLinear``.

    The new layer's W0 comes from the Linear's kernel by ``config.init`` ("keep" leaves the model's
    function unchanged); its bias, dtype, param_dtype and precision are carried over. Dimensions that
    the block size does not divide get a smaller last block (``poetjax.cayley``). Mutates ``model`` in
    place and returns it. A model with a ``block_hook`` slot (``poetjax.models.Llama``) gets the
    ``CayleyScopeHook`` of ``config.exec.cayley_scope`` (``poetjax.layers``).
    """
    if not isinstance(config, POETConfig):
        raise TypeError(f"config must be a POETConfig, got {type(config).__name__}")
    exclude = tuple(EXCLUDE if exclude is None else exclude)
    targets = [(p, m) for p, m in iter_modules(model, nnx.Linear) if not _is_excluded(p, exclude)]
    if not targets:
        raise ValueError(f"poetize found no nnx.Linear to convert (exclude={exclude})")
    stacked = any(stacked_depth(lin) for _, lin in targets)
    if stacked:  # draw what the unstacked twin would: target t of the per-layer view at draw start + 2t
        stream = rngs.params
        key, start = stream.key[...], stream.count[...]  # may be traced (poetize under eval_shape)
        order = view_order(model, nnx.Linear, [p for p, _ in targets], keep=lambda p: not _is_excluded(p, exclude))
        total = sum(len(idx) for idx in order)
    for i, (path, lin) in enumerate(targets):
        if stacked:
            counts = [start + _POET_DRAWS * t for t in order[i]]
            if stacked_depth(lin):
                new = _convert_stacked(lin, config, key, counts)
            else:
                new = _convert(lin, config, rngs_at(key, counts[0]), lin.kernel[...],
                               None if lin.bias is None else lin.bias[...])
        else:
            new = _convert(lin, config, rngs, lin.kernel[...], None if lin.bias is None else lin.bias[...])
        set_child(model, path, new)
        if verbose:
            print(f"poetize: {_path_str(path)} ({lin.in_features}→{lin.out_features})")
    if stacked:
        stream.count[...] = start + _POET_DRAWS * total
    install_scope_hook(model, config)
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


@functools.lru_cache(maxsize=None)
def _slice_initializer(n: int, m: int, config: POETConfig, use_bias: bool, dtype, param_dtype, precision):
    """(stacked state, l, key) → the state with layer slice l set to a new POETLinear's (donated, so the
    stacked buffers are updated in place: one slice's float weight exists at a time)."""

    def make(key):
        return POETLinear(n, m, config=config, use_bias=use_bias, rngs=nnx.Rngs(params=key), dtype=dtype,
                          param_dtype=param_dtype, precision=precision)

    graphdef = nnx.graphdef(nnx.eval_shape(make, jax.random.key(0)))

    def fill(stacked, l, key):
        new = nnx.state(make(key))
        return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x, l, 0), stacked, new)

    abstract = nnx.state(nnx.eval_shape(make, jax.random.key(0)))
    return graphdef, abstract, jax.jit(fill, donate_argnums=0)


def _build_stacked(lin: nnx.Linear, config: POETConfig, keys: Sequence[jax.Array]) -> POETLinear:
    graphdef, abstract, fill = _slice_initializer(lin.in_features, lin.out_features, config, lin.bias is not None,
                                                  lin.dtype, lin.param_dtype, lin.precision)
    state = jax.tree.map(lambda a: jnp.zeros((len(keys), *a.shape), a.dtype), abstract)
    for l, key in enumerate(keys):
        state = fill(state, l, key)
    return nnx.merge(graphdef, state)


def build_poetized(make_model: Callable[[], nnx.Module], config: POETConfig, *, key: jax.Array,
                   exclude: Sequence[str] | None = None, verbose: bool = False) -> nnx.Module:
    """``make_model()`` with its Linears already converted, without ever building the float model.

    For models too large to exist in float first (a 34B LLaMA is 79 GB in bf16; POET-XQ stores it in
    ~40 GB): the model is traced abstractly (``nnx.eval_shape``); its unconverted state (embedding,
    norms, excluded Linears, biases) comes from its own initializers in one jitted program whose unused
    outputs — the converted kernels — XLA drops; each converted Linear becomes a POETLinear whose W0 is
    drawn from N(0, 0.02²) and transformed by ``config.init`` (what ``poetize`` does with a freshly
    initialized Linear's kernel) inside one jitted program per layer shape, so at most one layer's float
    weight exists at a time. Layer i (nnx graph order) uses ``fold_in(key, i)``.

    Same distribution as ``poetize(make_model(), config)`` for a normally initialized model, not the same
    numbers (the kernels come from other keys). A stacked model (``scan_layers``) gets the same numbers as
    its unstacked twin: slice l of a stacked Linear uses the key of that layer in the per-layer view.
    """
    if not isinstance(config, POETConfig):
        raise TypeError(f"config must be a POETConfig, got {type(config).__name__}")
    exclude = tuple(EXCLUDE if exclude is None else exclude)
    model = nnx.eval_shape(make_model)
    targets = [(p, m) for p, m in iter_modules(model, nnx.Linear) if not _is_excluded(p, exclude)]
    if not targets:
        raise ValueError(f"build_poetized found no nnx.Linear to convert (exclude={exclude})")
    drop = _is_converted_kernel(frozenset(p for p, _ in targets))
    rest = jax.jit(lambda: nnx.split(make_model(), drop, ...)[2])()
    nnx.update(model, rest)
    order = view_order(model, nnx.Linear, [p for p, _ in targets], keep=lambda p: not _is_excluded(p, exclude))
    for (path, lin), idx in zip(targets, order):
        if stacked_depth(lin):  # slice by slice into donated stacked buffers
            new = _build_stacked(lin, config, [jax.random.fold_in(key, i) for i in idx])
        else:
            init = _layer_initializer(lin.in_features, lin.out_features, config, lin.bias is not None, lin.dtype,
                                      lin.param_dtype, lin.precision)
            new = init(jax.random.fold_in(key, idx[0]))
        if lin.bias is not None:
            new.bias[...] = lin.bias[...]
        set_child(model, path, new)
        if verbose:
            print(f"build_poetized: {_path_str(path)} ({lin.in_features}→{lin.out_features})")
    install_scope_hook(model, config)
    return model
