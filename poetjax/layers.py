"""POETLinear: a Flax NNX module holding the POET-X state; the math lives in ``poetjax.ops``.

State of one layer (N in, M out, K block size; I, O blocks; Np, Mp padded sizes; P = K(K−1)/2):

  w0            FrozenWeight (Np, Mp)   W_s, the frozen base weight, stored pre-permuted
                                        (base "uint8", POET-XQ: no w0 but w0_codes (Np, Mp) uint8,
                                        w0_scale (Np/G, Mp) float32, w0_zero (Np/G, Mp) uint8, all
                                        FrozenWeight: W_s group-quantized, ``poetjax.quant``)
  theta_in      Generator    (I, P)     packed skew generators of the input-side blocks (float32)
  theta_out     Generator    (O, P)     same for the output side
                                        (family "fs": Np = N, Mp = M, theta_in (1, Ki(Ki−1)/2) and
                                        theta_out (1, Ko(Ko−1)/2) for the two index subsets, poetjax.fs)
  perm_in …     Permutation  int32      the index vectors of ``poetjax.perms``
  bias          Param        (M,)       optional; added after the output permutation, so it lives in
                                        the layer's own output coordinates and no merge ever moves it

FrozenWeight is not a Param: ``nnx.grad``/``nnx.Optimizer(wrt=nnx.Param)`` never see it. Generator is a
Param subclass, so optimizers can select the generators by type (or by their names, see
``poetjax.optim``). Permutations are array values: a merge changes values, never shapes, so nothing
recompiles.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from poetjax import fs, ops, quant
from poetjax.cayley import block_layout, rotation_group, rotation_pair
from poetjax.config import POETConfig
from poetjax.initializers import base_weight
from poetjax.perms import check_chunk, input_permutation, output_permutation


class FrozenWeight(nnx.Variable):
    """The frozen base weight W0 (never differentiated, never in the optimizer)."""


class Generator(nnx.Param):
    """Packed skew-symmetric generators θ (trainable)."""


class Permutation(nnx.Variable):
    """int32 index buffers of the block permutations."""


GENERATOR_NAMES = ("theta_in", "theta_out")


def path_keys(path) -> tuple:
    """A pytree path as a tuple of plain keys (dict keys, sequence indices, attribute names)."""
    out = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
        else:
            out.append(str(k))
    return tuple(out)


def _draw_perms(key: jax.Array, family: str, chunk: int, layouts: tuple) -> ops.LayerPerms:
    """A layer's permutations for its (input, output) ``layouts`` (``block_layout`` or ``fs.subset_layout``)."""
    layout_in, layout_out = layouts
    k_in, k_out = jax.random.split(key)
    # BS: sorted inside blocks (same POET up to relabeling, cheaper gathers; poetjax.perms). FS rotates one
    # subset whose size need not divide the dimension, and its order there is irrelevant: no sorting.
    blk_in = None if family == "fs" else layout_in.block_size
    blk_out = None if family == "fs" else layout_out.block_size
    p_in, p_in_inv = input_permutation(k_in, layout_in.dim, layout_in.padded, blk_in, chunk)
    p_out, p_out_inv = output_permutation(k_out, layout_out.dim, layout_out.padded, blk_out, chunk)
    return ops.LayerPerms(p_in, p_in_inv, p_out, p_out_inv)


@functools.partial(jax.jit, static_argnames=("init", "scale", "family", "chunk", "layouts"))
def _initial_base(key_w, key_p, kernel, *, init, scale, family, chunk, layouts):
    """(W_s, permutations) of a new layer, one program per layer shape and setting: under an enclosing trace
    (a model's abstract build) its operations stay out of that trace, and a host build makes one call per
    layer instead of one per operation (BENCHMARKS.md, "Time to result, the abstract build and the layers'
    first arrays")."""
    shape = (layouts[0].dim, layouts[1].dim)
    w = base_weight(init, key_w, shape, kernel=kernel, scale=scale)
    perms = _draw_perms(key_p, family, chunk, layouts)
    return ops.store_base_weight(w, perms), perms


def _next_key(rngs: nnx.Rngs) -> jax.Array:
    """``rngs.params()``: the stream's key folded with its count, and the count advanced. Written out
    because flax's own update (``count[...] += 1``) asks the count for its sharding, and for a traced count
    jax builds an error message whose cost grows with the traced program: a large share of a model's abstract
    build (BENCHMARKS.md, "Time to result, the abstract build and the layers' first arrays")."""
    stream = rngs.params
    count = stream.count[...]
    stream.count.set_value(count + 1)
    return jax.random.fold_in(stream.key[...], count)


class POETLinear(nnx.Module):
    """y = x · W_eff (+ bias) with W_eff = R · W0 · P, computed input-centrically (POET-X)."""

    def __init__(self, in_features: int, out_features: int, *, config: POETConfig, use_bias: bool = False,
                 rngs: nnx.Rngs, kernel: jax.Array | None = None, bias: jax.Array | None = None,
                 dtype=None, param_dtype=jnp.float32, precision=None):
        if not isinstance(config, POETConfig):
            raise TypeError(f"config must be a POETConfig, got {type(config).__name__}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.config = config
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision
        # POET-FS: one rotated index subset per side instead of blocks (poetjax.fs).
        layout = fs.subset_layout if config.family == "fs" else block_layout
        self.layout_in = layout(self.in_features, config.block_size, name="in_features")
        self.layout_out = layout(self.out_features, config.block_size, name="out_features")

        if config.perm_chunk > 1:  # clear errors naming the layer's side, before any permutation is drawn
            check_chunk(config.perm_chunk, self.in_features, self.layout_in.block_size, "in_features")
            check_chunk(config.perm_chunk, self.out_features, self.layout_out.block_size, "out_features")
        if config.quantized:
            quant.check_group_size(self.layout_in.padded, config.quant_group_size,
                                   what=f"POETLinear({self.in_features}→{self.out_features}, "
                                        f"block_size={config.block_size})")
        key_w, key_p = _next_key(rngs), _next_key(rngs)
        w_s, perms = _initial_base(key_w, key_p, kernel, init=config.init, scale=config.init_scale,
                                   family=config.family, chunk=config.perm_chunk,
                                   layouts=(self.layout_in, self.layout_out))
        self._store_base(w_s, init=True)
        self._set_perms(perms, init=True)
        self.theta_in = Generator(jnp.zeros((self.layout_in.num_blocks, self.layout_in.num_packed), jnp.float32))
        self.theta_out = Generator(jnp.zeros((self.layout_out.num_blocks, self.layout_out.num_packed),
                                             jnp.float32))
        if use_bias:
            b = jnp.zeros((self.out_features,), param_dtype) if bias is None else jnp.asarray(bias, param_dtype)
            if b.shape != (self.out_features,):
                raise ValueError(f"bias shape {b.shape} does not match out_features={self.out_features}")
            self.bias = nnx.Param(b)
        else:
            self.bias = None

    # -- base weight --------------------------------------------------------------------------
    def _store_base(self, w_NpxMp: jax.Array, init: bool = False) -> None:
        """Store W_s: cast to param_dtype, or (POET-XQ) quantized to uint8 codes + scale + zero."""
        if self.config.quantized:
            qw = quant.quantize(w_NpxMp, self.config.quant_group_size)
            for name, value in zip(("w0_codes", "w0_scale", "w0_zero"), qw):
                if init:
                    setattr(self, name, FrozenWeight(value))
                else:
                    getattr(self, name).set_value(value)
        elif init:
            self.w0 = FrozenWeight(w_NpxMp.astype(self.param_dtype))
        else:
            self.w0.set_value(w_NpxMp.astype(self.w0[...].dtype))

    @property
    def base(self) -> jax.Array | quant.QuantizedWeight:
        """W_s as stored: the (Np, Mp) array, or the QuantizedWeight of POET-XQ."""
        if self.config.quantized:
            return quant.QuantizedWeight(self.w0_codes[...], self.w0_scale[...], self.w0_zero[...])
        return self.w0[...]

    def base_weight(self, dtype=jnp.float32) -> jax.Array:
        """W_s (Np, Mp) as a float array in ``dtype`` (dequantized for POET-XQ)."""
        base = self.base
        if isinstance(base, quant.QuantizedWeight):
            return quant.dequantize(base, dtype)
        return base.astype(dtype)

    # -- permutations -------------------------------------------------------------------------
    def _set_perms(self, perms: ops.LayerPerms, init: bool = False):
        for name, value in perms._asdict().items():
            if init:
                setattr(self, name, Permutation(value))
            else:
                getattr(self, name).set_value(value)

    @property
    def perms(self) -> ops.LayerPerms:
        return ops.LayerPerms(self.perm_in[...], self.perm_in_inv[...], self.perm_out[...],
                              self.perm_out_inv[...])

    # -- math ---------------------------------------------------------------------------------
    def rotation_blocks(self, *, exact: bool | None = None, impl: str = "xla",
                        precision: str = "highest") -> tuple[jax.Array, jax.Array]:
        """(R_in (I, K, K), R_out (O, K, K)) in float32 from the current generators.

        ``exact`` overrides ``config.cayley`` (True: exact Cayley, False: Neumann series); ``impl``
        "pallas" uses the fused Cayley kernel (merges and ``effective_kernel`` keep XLA); ``precision`` of
        the series' products ("highest" | "default" | "bf16"; the forward pass passes
        ``config.exec.cayley_precision``).
        """
        k = self.config.num_terms
        exact = self.config.cayley == "exact" if exact is None else exact
        return rotation_pair(self.theta_in[...], self.layout_in, self.theta_out[...], self.layout_out, k,
                             exact=exact, impl=impl, precision=precision)

    def plan(self, tokens: int = 0) -> ops.LayerPlan:
        """The ``LayerPlan`` of a call on ``tokens`` tokens (0: unknown; its impl is the Cayley map's)."""
        c = self.config
        return ops.resolve_plan(c.exec, memory=c.memory, block_size=c.block_size, quantized=c.quantized,
                                perm_chunk=c.perm_chunk, tokens=tokens, n=self.in_features, m=self.out_features)

    def training_cayley_args(self) -> tuple:
        """(num_terms, exact, impl, precision) of the forward pass's Cayley map: layers with equal
        arguments can share one map (``compute_rotations``)."""
        c = self.config
        return (c.num_terms, c.cayley == "exact", self.plan().impl, c.exec.cayley_precision)

    def __call__(self, x: jax.Array, *, rotations: tuple[jax.Array, jax.Array] | None = None,
                 kernel: jax.Array | None = None) -> jax.Array:
        """``rotations``: (R_in, R_out) of this layer's generators mapped elsewhere (a Cayley map shared by many
        layers, ``compute_rotations``; the model's ``CayleyScopeHook`` passes them) instead of mapping its own.
        ``kernel``: this layer's W_eff (N, M), formed elsewhere from those rotations (``shared_call_args``: the
        weight form of many layers in one batched product); the call is then x · kernel (+ bias)."""
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"POETLinear expects inputs (..., {self.in_features}); got shape {tuple(x.shape)}")
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        if self.config.family == "fs" and (rotations is not None or kernel is not None):
            raise ValueError("a POET-FS layer maps its own subset rotations; got "
                             + ("rotations=" if rotations is not None else "kernel="))
        if kernel is not None:
            if rotations is not None or kernel.shape != (self.in_features, self.out_features):
                raise ValueError(f"kernel= must be the layer's W_eff ({self.in_features}, {self.out_features}) "
                                 f"without rotations=; got shape {tuple(kernel.shape)}"
                                 + (" and rotations=" if rotations is not None else ""))
            y = jnp.matmul(x.astype(dtype), kernel.astype(dtype), precision=self.precision)
        elif self.config.family == "fs":
            r_in, r_out = self.rotation_blocks()
            y = fs.fs_linear(x.astype(dtype), self.w0[...], r_in, r_out, self.perms, precision=self.precision)
        else:
            if rotations is None:
                _, _, impl, precision = self.training_cayley_args()
                rotations = self.rotation_blocks(impl=impl, precision=precision)
            r_in, r_out = rotations
            plan = self.plan(math.prod(x.shape[:-1]))
            y = ops.poet_x_linear(x.astype(dtype), self.base, r_in, r_out, self.perms, plan,
                                  precision=self.precision)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y

    def effective_kernel(self, *, exact: bool | None = None) -> jax.Array:
        """Dense (N, M) float32 kernel with layer(x) == x @ kernel (+ bias)."""
        r_in, r_out = self.rotation_blocks(exact=exact)
        kernel_fn = fs.effective_kernel if self.config.family == "fs" else ops.effective_kernel
        return kernel_fn(self.base_weight(), r_in, r_out, self.perms)

    def merge_and_reinit(self, key: jax.Array) -> None:
        """Fold the rotations into W0, draw new permutations, zero the generators (spec §6).

        For POET-FS the new permutations carry the new index subsets (``poetjax.fs.index_subsets``).

        The merge is computed in float32 and cast back to W0's storage dtype once; POET-XQ dequantizes
        W_s in float32, merges, stores the result under the new permutations and re-quantizes it (new
        scales and zero points: the groups now hold different entries), spec §9.4.
        """
        kernel = self.effective_kernel()
        perms = _draw_perms(key, self.config.family, self.config.perm_chunk, (self.layout_in, self.layout_out))
        self._store_base(ops.store_base_weight(kernel, perms))
        self._set_perms(perms)
        self.theta_in.set_value(jnp.zeros_like(self.theta_in[...]))
        self.theta_out.set_value(jnp.zeros_like(self.theta_out[...]))

    @property
    def num_generator_params(self) -> int:
        """Free generator parameters of this layer (masked tail entries excluded)."""
        return self.layout_in.num_params + self.layout_out.num_params


# -- shared Cayley maps ---------------------------------------------------------------------------
# The rotation blocks of many POET layers computed in one batched Cayley–Neumann map (cayley.rotation_group)
# and passed to the layers' calls as an argument. Pure bookkeeping: the blocks are the same function of the
# same generators, so values and gradients are those of per-layer maps (tests/test_cayley_scope.py).


def _shared_layers(module: nnx.Module) -> list[tuple[str, POETLinear]]:
    """("a/b/c" path, layer) of every block-stochastic POET layer under ``module`` (POET-FS maps its own)."""
    return [("/".join(map(str, path)), node) for path, node in nnx.iter_graph(module)
            if isinstance(node, POETLinear) and node.config.family != "fs"]


def compute_rotations(module: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{path: (R_in, R_out)} for every POET-BS layer under ``module``, from as few Cayley maps as possible
    (one per distinct ``training_cayley_args``, normally one). Stacked layers give stacked blocks
    (L, I, K, K): all L slices are mapped in the same call."""
    groups: dict[tuple, list[tuple[str, POETLinear]]] = {}
    for path, lay in _shared_layers(module):
        groups.setdefault(lay.training_cayley_args(), []).append((path, lay))
    out = {}
    for (k, exact, impl, precision), members in groups.items():
        items = []
        for _, lay in members:
            items += [(lay.theta_in[...], lay.layout_in), (lay.theta_out[...], lay.layout_out)]
        blocks = rotation_group(items, k, exact=exact, impl=impl, precision=precision)
        for j, (path, _) in enumerate(members):
            out[path] = (blocks[2 * j], blocks[2 * j + 1])
    return out


def shared_call_args(module: nnx.Module, tokens: int) -> dict[str, dict[str, jax.Array | tuple]]:
    """{path: keyword arguments of the layer's call on ``tokens`` tokens} for every POET-BS layer under
    ``module``: its rotation blocks from the shared Cayley maps (``compute_rotations``), or, for a layer in the
    weight form (its plan's body "weight", memory "fast", a float base (a uint8 base is for memory: it
    dequantizes its own); a known compute dtype), its kernel W_eff. The kernels of all such layers of one
    block size, dtype and precision are formed together (``ops.tiled_weights_from_blocks``): two batched
    products for the whole model, the same numbers as each layer forming its own up to rounding."""
    rotations = compute_rotations(module)
    layers = dict(_shared_layers(module))
    args, groups = {}, {}
    for path, (r_in, r_out) in rotations.items():
        lay = layers[path]
        plan = lay.plan(tokens)
        if plan.body != "weight" or plan.memory != "fast" or lay.config.quantized or lay.dtype is None:
            args[path] = {"rotations": (r_in, r_out)}
            continue
        shape = (lay.in_features, lay.out_features, r_in.shape, r_out.shape)
        groups.setdefault((r_in.shape[-1], jnp.dtype(lay.dtype), lay.precision), {}).setdefault(shape, []).append(path)

    def cat(arrays, nd):  # every member's (…, *last nd axes) flattened and concatenated along one axis
        flat = [a.reshape(-1, *a.shape[a.ndim - nd:]) for a in arrays]
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=0)

    for (_, dtype, precision), by_shape in groups.items():
        operands = []
        for paths in by_shape.values():
            members = [layers[p] for p in paths]
            operands.append((cat([jax.lax.stop_gradient(lay.base_weight(dtype)) for lay in members], 2),
                             cat([rotations[p][0].astype(dtype) for p in paths], 3),
                             cat([rotations[p][1].astype(dtype) for p in paths], 3),
                             ops.LayerPerms(*(cat([getattr(lay.perms, f) for lay in members], 1)
                                              for f in ops.LayerPerms._fields))))
        for paths, w in zip(by_shape.values(), ops.tiled_weights_from_blocks(operands, precision)):
            lead = rotations[paths[0]][0].shape[:-3]  # () or the stacked layers' (L,)
            parts = jax.lax.split(w, [math.prod(lead)] * len(paths)) if len(paths) > 1 else [w]  # (see rotation_group)
            for path, part in zip(paths, parts):
                args[path] = {"kernel": part.reshape(*lead, *w.shape[1:])}
    return args


def resolve_scope(config: POETConfig) -> str:
    """``config.exec.cayley_scope`` resolved: "linear" | "block" | "model". "auto" is "model" for the fast
    memory mode and "block" for mem and for a uint8 base (whose point is memory: a model-wide map keeps
    every layer's blocks and residuals alive, about 8.7 GB at Llama-8B by count). POET-FS maps per layer."""
    if config.family == "fs":
        return "linear"
    if config.exec.cayley_scope != "auto":
        return config.exec.cayley_scope
    return "model" if config.memory == "fast" and not config.quantized else "block"


def cayley_scope(module: nnx.Module) -> str:
    """The scope the model's block hook applies (``CayleyScopeHook``): "linear" when it has none."""
    hook = getattr(module, "block_hook", None)
    return hook.scope if isinstance(hook, CayleyScopeHook) else "linear"


@dataclasses.dataclass(frozen=True)
class CayleyScopeHook:
    """A model's block hook (``poetjax.models.Llama.block_hook``, installed by ``poetize``) that shares Cayley
    maps: scope "block" maps all POET layers of a block in one call inside the block (so inside its remat);
    "model" maps every layer's once before the layers run (``prepare``), and each block rotates with its
    slice (stacked layers: the scan slices the (L, …) blocks like the weights). The blocks reach each layer
    as its call's ``rotations`` argument, or, in the weight form, the kernels formed from them as its
    ``kernel`` argument (``shared_call_args``; the block's per-projection call arguments)."""

    scope: str

    def prepare(self, layers: nnx.Module, tokens: int):
        if self.scope != "model":
            return None
        args = shared_call_args(layers, tokens)
        if not isinstance(layers, nnx.List):
            return args  # one stacked block: paths inside it, arrays with a leading layer axis
        per_layer = [{} for _ in range(len(layers))]
        for path, a in args.items():
            i, _, inner = path.partition("/")
            per_layer[int(i)][inner] = a
        return per_layer

    def wrap(self, run: Callable) -> Callable:
        def run_shared(block, x, cos, sin, args):
            if self.scope == "block":
                args = shared_call_args(block, math.prod(x.shape[:-1]))
            return run(block, x, cos, sin, args or {})

        return run_shared


def install_scope_hook(model: nnx.Module, config: POETConfig) -> None:
    """Give a model with a ``block_hook`` slot the ``CayleyScopeHook`` of ``config`` (none for "linear")."""
    if hasattr(model, "block_hook"):
        scope = resolve_scope(config)
        model.block_hook = None if scope == "linear" else CayleyScopeHook(scope)
