"""LLaMA in Flax NNX, the reference's model family (POET spec §11).

Shape legend (docs/design.md): B batch, S sequence, D hidden, H heads, Hkv key/value heads, E = D/H head
dim, F intermediate, V vocab, L the stacked-layer axis.

    x = embed(tokens)                                       (B, S, D)
    for each layer:
        x = x + o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))), v_proj(n1(x))))   causal attention
        x = x + down_proj(silu(gate_proj(n2(x))) * up_proj(n2(x)))                       SwiGLU
    logits = lm_head(norm(x))                               (B, S, V); norm(x) · embedᵀ when tied

Attention has H query heads and Hkv = ``num_kv_heads`` key/value heads (H/Hkv query heads share one; Hkv = H
is multi-head attention, Hkv < H grouped-query attention): q_proj is D → H·E, k_proj and v_proj D → Hkv·E.
With ``tie_embeddings`` there is no lm_head: the output layer is the embedding table, transposed.

RMSNorm(x) = x / sqrt(mean(x²) + eps) · g, computed in float32 (eps 1e-6). RoPE is the HF LLaMA form
("rotate half": the head dim is split into two halves that form the (real, imaginary) pairs). Every
weight is N(0, init_std²) (0.02), norms start at 1. Every projection is an ``nnx.Linear`` named
q_proj … down_proj, so ``poetjax.poetize`` converts them, while ``lm_head`` (excluded by name) and the
embedding stay ordinary parameters. These are the numerics of Hugging Face's ``LlamaForCausalLM``;
``from_hf`` loads its checkpoints (``poetjax.models.hf``).

``dtype`` is the compute dtype (bf16 on GPU), ``param_dtype`` the storage dtype; logits come out in
the compute dtype and the loss casts them to float32. ``remat`` wraps each layer in ``nnx.remat`` with
a named policy.

Layer layouts. ``scan_layers=False`` (default): ``model.layers`` is an ``nnx.List`` of ``Block``s and the
forward pass unrolls them. ``scan_layers=True``: ``model.layers`` is one ``Block`` whose every Variable has
a leading layer axis (L, …), and the forward pass is a ``lax.scan`` over it, so XLA compiles one layer
instead of num_layers (the compile time of a 24–48 layer model drops from minutes to seconds). The two layouts
hold the same numbers: ``stack_layers``/``unstack_layers`` convert a model between them, and
``layer_view`` gives the per-layer (list) view of either, which the per-layer utilities (diagnostics,
phase probes, export) use; ``poetjax.merge`` merges a stacked POET layer one layer slice at a time.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={v!r}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a LLaMA model; field names are the ``model.*`` keys of a run config.

    dtype:       compute dtype of activations and matmuls ("float32", "bfloat16", "float16").
    param_dtype: storage dtype of the weights.
    remat:       per-layer rematerialization: "none", "full" (save only each layer's input),
                 "dots_saveable" or "dots_with_no_batch_dims_saveable" (jax.checkpoint_policies).
    attention:   implementation passed to ``jax.nn.dot_product_attention``: "xla", "cudnn" (GPU fused
                 kernel; bf16/fp16 only) or "auto" (cudnn on a GPU with a 16-bit compute dtype and a
                 head dim it supports, else xla).
    scan_layers: store the layers stacked (one Block with a leading layer axis) and run them with
                 ``lax.scan``: one layer is compiled instead of ``num_layers`` (see the module docstring).
    num_kv_heads: key/value heads Hkv; 0 means num_heads (multi-head attention), fewer is grouped-query
                 attention (num_heads must be a multiple of it).
    tie_embeddings: compute the logits with the embedding table (no lm_head).
    init_from:   "" (weights drawn from the run's seed) or "hf:DIR", a Hugging Face LLaMA checkpoint whose
                 weights the run starts from (``from_hf``); a run config then takes the shape fields from
                 DIR/config.json (``poetjax.run_config.load_config``).
    """

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 352
    num_heads: int = 4
    num_layers: int = 4
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    scan_layers: bool = False
    num_kv_heads: int = 0
    tie_embeddings: bool = False
    init_from: str = ""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "max_seq_len"):
            _positive_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim; hidden_size/num_heads = {self.head_dim}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {name}={getattr(self, name)!r}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} must be one of {DTYPES}, got {name}={getattr(self, name)!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat must be one of {REMAT_POLICIES}, got remat={self.remat!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got attention={self.attention!r}")
        for name in ("scan_layers", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {name}={getattr(self, name)!r}")
        if isinstance(self.num_kv_heads, bool) or not isinstance(self.num_kv_heads, int) or self.num_kv_heads < 0:
            raise ValueError(f"num_kv_heads must be an int >= 0 (0 = num_heads), got num_kv_heads={self.num_kv_heads!r}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if (self.init_from and not self.init_from.startswith("hf:")) or self.init_from == "hf:":
            raise ValueError(f"init_from must be '' or 'hf:DIR' (a Hugging Face checkpoint folder), got "
                             f"init_from={self.init_from!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Hkv, the number of key/value heads (``num_kv_heads``, or num_heads when that is 0)."""
        return self.num_kv_heads or self.num_heads


def llama_param_formula(cfg: LlamaConfig) -> int:
    """Parameters of the plain model: V·D (embed) + n_layers·(2D² + 2·D·Hkv·E + 3·D·F + 2D) + D (final norm) + D·V
    (lm_head, absent when tied)."""
    v, d, f, n = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    kv = cfg.kv_heads * cfg.head_dim
    return v * d + n * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d) + d + (0 if cfg.tie_embeddings else d * v)


def count_params(model: nnx.Module, kind=nnx.Param) -> int:
    """Number of scalar entries in the ``kind`` Variables of ``model`` (works under ``nnx.eval_shape``)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, kind)))


def _remat_policy(name: str):
    return {"full": None, "dots_saveable": jax.checkpoint_policies.dots_saveable,
            "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


def rope_tables(positions_T: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each (S, E) float32, for the rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions_T.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxSxHxE: jax.Array, cos_SxE: jax.Array, sin_SxE: jax.Array) -> jax.Array:
    """x·cos + rotate_half(x)·sin in float32, cast back to x's dtype; rotate_half(x) = (−x₂, x₁)."""
    x = x_BxSxHxE.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_SxE[:, None, :] + rotated * sin_SxE[:, None, :]
    return out.astype(x_BxSxHxE.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def _linear(d_in, d_out, cfg: LlamaConfig, rngs):
    return nnx.Linear(d_in, d_out, use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                      kernel_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)


def _attention_impl(cfg: LlamaConfig) -> str:
    if cfg.attention != "auto":
        return cfg.attention
    fused_ok = (jax.default_backend() == "gpu" and cfg.dtype in ("bfloat16", "float16")
                and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128)
    return "cudnn" if fused_ok else "xla"


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
        self.q_proj = _linear(d, d, cfg, rngs)
        self.k_proj = _linear(d, kv, cfg, rngs)
        self.v_proj = _linear(d, kv, cfg, rngs)
        self.o_proj = _linear(d, d, cfg, rngs)
        self.num_heads = cfg.num_heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.impl = _attention_impl(cfg)

    def __call__(self, x_BxSxD, cos_SxE, sin_SxE, proj_args=None):
        """``proj_args``: {projection name: keyword arguments of its call} (see ``Block``)."""
        pa = proj_args or {}
        b, t, _ = x_BxSxD.shape
        split = lambda y, heads: y.reshape(b, t, heads, self.head_dim)
        q = apply_rope(split(self.q_proj(x_BxSxD, **pa.get("q_proj", {})), self.num_heads), cos_SxE, sin_SxE)
        k = apply_rope(split(self.k_proj(x_BxSxD, **pa.get("k_proj", {})), self.kv_heads), cos_SxE, sin_SxE)
        v = split(self.v_proj(x_BxSxD, **pa.get("v_proj", {})), self.kv_heads)  # q (B, S, H, E); k, v (B, S, Hkv, E)
        # Hkv < H: query head h reads key/value head h // (H/Hkv), as in HF's repeat_kv
        o = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.impl)
        return self.o_proj(o.reshape(b, t, self.num_heads * self.head_dim), **pa.get("o_proj", {}))


class MLP(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, rngs)
        self.up_proj = _linear(cfg.hidden_size, cfg.intermediate_size, cfg, rngs)
        self.down_proj = _linear(cfg.intermediate_size, cfg.hidden_size, cfg, rngs)

    def __call__(self, x, proj_args=None):
        pa = proj_args or {}
        h = jax.nn.silu(self.gate_proj(x, **pa.get("gate_proj", {}))) * self.up_proj(x, **pa.get("up_proj", {}))
        return self.down_proj(h, **pa.get("down_proj", {}))


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, proj_args=None):
        """``proj_args``: {"attn/q_proj": {keyword: value}, …}, extra keyword arguments of a projection's call,
        for projections that a reparameterization replaced and that take them (see ``Llama.block_hook``);
        plain ``nnx.Linear``s take none."""
        pa = proj_args or {}
        sub = lambda prefix: {k.partition("/")[2]: v for k, v in pa.items() if k.partition("/")[0] == prefix}
        x = x + self.attn(self.input_norm(x), cos, sin, sub("attn"))
        return x + self.mlp(self.post_attn_norm(x), sub("mlp"))


def _run_block(block: Block, x, cos, sin, proj_args):
    return block(x, cos, sin, proj_args)


class Llama(nnx.Module):
    """tokens (B, S) int → logits (B, S, V) in the compute dtype."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, LlamaConfig):
            raise TypeError(f"cfg must be a LlamaConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                               embedding_init=nnx.initializers.normal(cfg.init_std), rngs=rngs)
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, cfg, rngs)
        # An optional hook around the layer stack (None: none), installed by a reparameterization of the
        # projections: ``prepare(layers, tokens)`` (tokens: the token positions each layer sees, batch included)
        # runs once before the layers, outside any remat and scan, and returns
        # per-layer values (a list for list layers, arrays with a leading layer axis for stacked ones, or
        # None); ``wrap(run)`` returns the function that runs one block, run(block, x, cos, sin, value), which
        # may call ``run`` with the block's per-projection call arguments (``Block``) as its last argument.
        # It must be hashable (it is part of the model's static structure).
        self.block_hook = None

    def __call__(self, tokens_BxS: jax.Array) -> jax.Array:
        if not jnp.issubdtype(tokens_BxS.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got dtype {tokens_BxS.dtype}")
        x_BxSxD = embedding_lookup(self.embed.embedding[...], tokens_BxS)
        return self.forward_embeddings(x_BxSxD.astype(self.embed.dtype) if self.embed.dtype else x_BxSxD)

    def forward_embeddings(self, x_BxSxD: jax.Array) -> jax.Array:
        """Logits (B, S, V) from input embeddings (the model after its embedding lookup)."""
        t = x_BxSxD.shape[-2]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.cfg.max_seq_len}")
        cos, sin = rope_tables(jnp.arange(t), self.cfg.head_dim, self.cfg.rope_theta)
        hook = self.block_hook
        run = _run_block if hook is None else hook.wrap(_run_block)
        if self.cfg.remat != "none":
            run = nnx.remat(run, policy=_remat_policy(self.cfg.remat))
        values = None if hook is None else hook.prepare(self.layers, math.prod(x_BxSxD.shape[:-1]))
        x = x_BxSxD.astype(jnp.dtype(self.cfg.dtype))
        if self.cfg.scan_layers:
            graphdef, stacked = nnx.split(self.layers)

            def body(x, xs):
                state, value = xs
                return run(nnx.merge(graphdef, state), x, cos, sin, value), None

            x, _ = jax.lax.scan(body, x, (stacked, values))
        else:
            for i, block in enumerate(self.layers):
                x = run(block, x, cos, sin, None if values is None else values[i])
        if self.cfg.tie_embeddings:
            return self.embed.attend(self.norm(x))
        return self.lm_head(self.norm(x))


def embedding_lookup(table_VxD: jax.Array, tokens: jax.Array) -> jax.Array:
    """``table[tokens]`` (…, D) in the table's own dtype: rows are gathered before any cast to the compute
    dtype, so the backward pass sums the rows' cotangents in the table's dtype (float32 for float32
    parameters). Casting the table first made that sum a bfloat16 scatter-add, in which the rows of frequent
    tokens of real text are hit hundreds of times per batch: 11 ms of a 24 ms llama_60m step on the H200
    (BENCHMARKS.md, "Where the loop's step goes"). Bfloat16 parameters keep a bfloat16 sum (no float32
    table beside them)."""
    return jnp.take(table_VxD, tokens, axis=0)


def from_hf(path: str, **overrides) -> Llama:
    """A Llama with the weights of the Hugging Face LLaMA checkpoint in folder ``path`` (``config.json`` and
    ``model.safetensors`` or a sharded index). Its shape comes from config.json; ``overrides`` set the
    other LlamaConfig fields (dtype, param_dtype, scan_layers, max_seq_len, …). Unsupported checkpoints
    (another model_type, rope_scaling, biases, another hidden_act) raise an error naming the field;
    see ``poetjax.models.hf``."""
    from poetjax.models.hf import load_llama  # the HF file format lives there

    return load_llama(path, **overrides)


def rngs_at(key: jax.Array, count) -> nnx.Rngs:
    """An ``nnx.Rngs`` whose ``params`` stream continues ``key``'s stream at draw number ``count``: its next
    ``rngs.params()`` is ``fold_in(key, count)``, what a stream with that key returns after ``count`` draws."""
    rngs = nnx.Rngs(params=key)
    rngs.params.count[...] = jnp.asarray(count, jnp.uint32)
    return rngs


def _stacked_blocks(cfg: LlamaConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose Variables are the num_layers layers' stacked along a new leading axis, with the numbers of
    the unstacked model: layer l draws the keys that ``Block`` l would draw from ``rngs`` in the list
    layout (each Block draws one key per projection), in one vmapped program."""
    stream = rngs.params
    key, start = stream.key[...], stream.count[...]
    abstract = nnx.eval_shape(lambda: Block(cfg, rngs=rngs_at(key, 0)))
    graphdef = nnx.graphdef(abstract)
    draws = sum(isinstance(node, nnx.Linear) for _, node in nnx.iter_graph(abstract))  # kernels, no biases
    counts = start + draws * jnp.arange(cfg.num_layers, dtype=jnp.uint32)
    state = jax.vmap(lambda c: nnx.state(Block(cfg, rngs=rngs_at(key, c))))(counts)
    stream.count[...] = start + draws * cfg.num_layers
    return nnx.merge(graphdef, state)


def _with_layers(model: Llama, layers, scan_layers: bool) -> Llama:
    """A new Llama sharing ``model``'s other Variables, with ``layers`` and the matching config."""
    new = nnx.merge(*nnx.split(model))
    new.cfg = dataclasses.replace(model.cfg, scan_layers=scan_layers)
    new.layers = layers
    return new


def stack_layers(model: Llama) -> Llama:
    """The same model with its layers stacked (``scan_layers=True``); ``model`` is left unchanged.

    Every layer must have the same structure (true of a plain or ``poetize``d LLaMA); the stacked arrays
    are new (the per-layer arrays are copied into them)."""
    if model.cfg.scan_layers:
        return model
    graphdefs, states = zip(*(nnx.split(b) for b in model.layers))
    for i, g in enumerate(graphdefs[1:], 1):
        if g != graphdefs[0]:
            raise ValueError(f"stack_layers: layer {i} differs in structure from layer 0; only identical "
                             "layers can be stacked")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return _with_layers(model, nnx.merge(graphdefs[0], stacked), True)


def unstack_layers(model: Llama) -> Llama:
    """The same model with one Block per layer (``scan_layers=False``): inverse of ``stack_layers``.
    The per-layer arrays are slices of the stacked ones (copies); ``model`` is left unchanged."""
    if not model.cfg.scan_layers:
        return model
    graphdef, stacked = nnx.split(model.layers)
    n = model.cfg.num_layers
    blocks = [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(n)]
    return _with_layers(model, nnx.List(blocks), False)


def layer_view(model: nnx.Module) -> nnx.Module:
    """The per-layer view of a model: ``unstack_layers`` of a stacked LLaMA, else the model itself.
    For reading (diagnostics, probes, export): changes made to the view do not reach a stacked model."""
    if isinstance(model, Llama) and model.cfg.scan_layers:
        return unstack_layers(model)
    return model
