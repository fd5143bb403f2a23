"""Hugging Face LLaMA checkpoints: ``config.json`` ↔ ``LlamaConfig``, tensor names ↔ our parameter paths,
and (sharded) safetensors files through the ``safetensors`` package's numpy API.

A Hugging Face model folder holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000k-of-0000n.safetensors`` listed in ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: file}}``). HF stores a linear layer's
weight as (out, in); ours is the (in, out) kernel, so projections and lm_head are transposed on the way
in and out, the embedding (V, D) and the norm gains are not:

    model.embed_tokens.weight                          embed/embedding                      (V, D)
    model.layers.{l}.input_layernorm.weight            layers/l/input_norm/scale            (D,)
    model.layers.{l}.self_attn.{q,k,v,o}_proj.weight   layers/l/attn/{q,k,v,o}_proj/kernel  transposed
    model.layers.{l}.post_attention_layernorm.weight   layers/l/post_attn_norm/scale        (D,)
    model.layers.{l}.mlp.{gate,up,down}_proj.weight    layers/l/mlp/{gate,up,down}_proj/kernel  transposed
    model.norm.weight                                  norm/scale                           (D,)
    lm_head.weight                                     lm_head/kernel (absent when tied)    transposed

Both of HF's config spellings are read: transformers 4 (``rope_theta``, ``rope_scaling``, ``torch_dtype``)
and 5 (``rope_parameters``, ``dtype``); the 4 spelling is written, which both versions load. Anything
that would change the function and that our LLaMA does not compute (another model type, RoPE scaling,
biases, another activation, quantized weights) is refused with an error naming the field.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poetjax.models.llama import DTYPES, Llama, LlamaConfig

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# HF's default shard size (save_pretrained's max_shard_size="5GB"): an 8B bf16 export is 4 files, and
# no more than one shard's tensors are on the host at a time.
MAX_SHARD_BYTES = 5 * 10**9

# fields of LlamaConfig that config.json determines (the rest — dtypes, remat, layout — are ours to choose)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "num_layers",
                "rope_theta", "norm_eps", "tie_embeddings")


class HFError(ValueError):
    """A Hugging Face folder we cannot read or write; the message names the file and field."""


# ----------------------------------------------------------------------------------------------------
# config.json

def _read_config(folder: str) -> tuple[str, dict]:
    path = os.path.join(folder, CONFIG)
    if not os.path.isdir(folder):
        raise HFError(f"{folder}: no such folder (expected a Hugging Face model folder with a {CONFIG})")
    if not os.path.isfile(path):
        raise HFError(f"{folder}: no {CONFIG}, so this is not a Hugging Face model folder")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(data, dict):
        raise HFError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return path, data


def _rope_theta(path: str, c: dict) -> float:
    """RoPE's base from either spelling; a scaled or otherwise non-default RoPE is refused."""
    if c.get("rope_scaling") is not None:
        raise HFError(f"{path}: rope_scaling={c['rope_scaling']!r} is not supported (plain RoPE only)")
    rp = c.get("rope_parameters")
    if rp is None:
        return float(c.get("rope_theta", 10000.0))
    if not isinstance(rp, dict) or "rope_theta" not in rp:
        raise HFError(f"{path}: rope_parameters={rp!r} is not supported (plain RoPE only)")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default":
        raise HFError(f"{path}: rope_parameters.rope_type={kind!r} is not supported (plain RoPE only)")
    extra = sorted(set(rp) - {"rope_type", "type", "rope_theta"})
    if extra:
        raise HFError(f"{path}: rope_parameters has {extra}, which plain RoPE does not use; not supported")
    return float(rp["rope_theta"])


def config_fields(folder: str) -> dict:
    """The LlamaConfig fields (``SHAPE_FIELDS`` and max_seq_len) of the checkpoint in ``folder``."""
    path, c = _read_config(folder)
    model_type = c.get("model_type")
    if model_type != "llama":
        raise HFError(f"{path}: model_type={model_type!r} is not supported (only 'llama': LlamaForCausalLM)")
    archs = c.get("architectures")
    if archs is not None and "LlamaForCausalLM" not in archs:
        raise HFError(f"{path}: architectures={archs!r} is not supported (only LlamaForCausalLM)")
    if c.get("hidden_act", "silu") != "silu":
        raise HFError(f"{path}: hidden_act={c['hidden_act']!r} is not supported (only 'silu': SwiGLU)")
    for name in ("attention_bias", "mlp_bias"):
        if c.get(name, False):
            raise HFError(f"{path}: {name}={c[name]!r} is not supported (projections without bias only)")
    if c.get("quantization_config") is not None:
        raise HFError(f"{path}: quantization_config is set; quantized checkpoints are not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in c]
    if missing:
        raise HFError(f"{path}: missing {missing[0]}")
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and heads and head_dim * heads != c["hidden_size"]:
        raise HFError(f"{path}: head_dim={head_dim} with num_attention_heads={heads} does not give "
                      f"hidden_size={c['hidden_size']}; only head_dim = hidden_size / num_attention_heads is supported")
    kv = c.get("num_key_value_heads") or heads
    fields = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                  num_heads=heads, num_kv_heads=0 if kv == heads else kv, num_layers=c["num_hidden_layers"],
                  rope_theta=_rope_theta(path, c), norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                  tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                  max_seq_len=c.get("max_position_embeddings", 2048))
    try:
        LlamaConfig(**fields)
    except ValueError as e:
        raise HFError(f"{path}: {e}") from None
    return fields


def hf_config(cfg: LlamaConfig, *, dtype: str, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> dict:
    """The config.json of ``cfg`` (transformers 4 spelling, which transformers 5 also reads)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------------
# names and shapes

_LAYER = {  # our path inside a layer → (HF name inside layer l, transposed)
    ("input_norm", "scale"): ("input_layernorm.weight", False),
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", True),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", True),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", True),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", True),
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", False),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", True),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", True),
}
_TOP = {
    ("embed", "embedding"): ("model.embed_tokens.weight", False),
    ("norm", "scale"): ("model.norm.weight", False),
    ("lm_head", "kernel"): ("lm_head.weight", True),
}
# tensors some HF checkpoints carry that hold no weights of the function (older saves kept RoPE's table)
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF tensor name → its (out, in) shape, in HF's order, for a LlamaForCausalLM of ``cfg``."""
    d, f, v, kv = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.kv_heads * cfg.head_dim
    layer = {"input_layernorm.weight": (d,), "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
             "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
             "post_attention_layernorm.weight": (d,), "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
             "mlp.down_proj.weight": (d, f)}
    out = {"model.embed_tokens.weight": (v, d)}
    for l in range(cfg.num_layers):
        out.update({f"model.layers.{l}.{k}": s for k, s in layer.items()})
    out["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def _leaf_names(path: tuple, stacked_layers: int) -> tuple[list[str], bool]:
    """(HF names, transposed) of our Param leaf at ``path``: one name, or one per layer for a stacked
    (``scan_layers``) leaf with ``stacked_layers`` layers."""
    key = tuple(str(p) for p in path)
    try:
        if key[0] != "layers":
            return [_TOP[key][0]], _TOP[key][1]
        if stacked_layers:
            name, t = _LAYER[key[1:]]
            return [f"model.layers.{l}.{name}" for l in range(stacked_layers)], t
        name, t = _LAYER[key[2:]]
        return [f"model.layers.{key[1]}.{name}"], t
    except KeyError:
        raise HFError(f"{'/'.join(key)} is not a parameter of a plain LLaMA (a POET layer? "
                      f"poetjax.export.export_hf merges them first)") from None


def _param_leaves(model: Llama) -> list[tuple[tuple, object]]:
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in p), leaf)
            for p, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]]


# ----------------------------------------------------------------------------------------------------
# writing

def hf_tensors(model: Llama, dtype) -> dict[str, Callable[[], np.ndarray]]:
    """HF name → a function giving that tensor as a host array of ``dtype`` (computed when called, so a
    writer holds one shard at a time), for a plain Llama (no POET layers; ``poetjax.export`` merges them)."""
    cfg = model.cfg
    out = {}
    for path, leaf in _param_leaves(model):
        stacked = cfg.scan_layers and path[0] == "layers"
        names, transposed = _leaf_names(path, cfg.num_layers if stacked else 0)
        for l, name in enumerate(names):
            def get(leaf=leaf, l=l, transposed=transposed, stacked=stacked):
                x = leaf[l] if stacked else leaf
                return np.asarray((x.T if transposed else x).astype(dtype))
            out[name] = get
    return out


def _shard_plan(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into consecutive groups of at most ``max_shard_bytes`` (a larger tensor
    alone), as HF's ``save_pretrained`` shards."""
    shards, current, used = [], [], 0
    for name, n in sizes.items():
        if current and used + n > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += n
    return shards + [current] if current else shards


def save_llama(model: Llama, folder: str, *, cfg: LlamaConfig | None = None, dtype: str | None = None,
               max_shard_bytes: int = MAX_SHARD_BYTES, bos_token_id: int | None = None,
               eos_token_id: int | None = None) -> list[str]:
    """Write a plain Llama as a HF LlamaForCausalLM folder: config.json and the weights, one
    ``model.safetensors`` or, past ``max_shard_bytes``, shards with their index. ``dtype`` (default the
    model's param_dtype) is the stored dtype. Returns the files written."""
    from safetensors.numpy import save_file

    cfg = cfg or model.cfg
    dtype = dtype or cfg.param_dtype
    if dtype not in DTYPES:
        raise HFError(f"dtype must be one of {DTYPES}, got dtype={dtype!r}")
    if max_shard_bytes <= 0:
        raise HFError(f"max_shard_bytes must be > 0, got max_shard_bytes={max_shard_bytes!r}")
    np_dtype = jnp.dtype(dtype)
    expected = hf_shapes(cfg)
    getters = hf_tensors(model, np_dtype)
    if set(getters) != set(expected):
        extra, missing = sorted(set(getters) - set(expected)), sorted(set(expected) - set(getters))
        raise HFError(f"the model does not match cfg: tensors missing {missing[:3]}, unexpected {extra[:3]}")
    for path, leaf in _param_leaves(model):
        stacked = model.cfg.scan_layers and path[0] == "layers"
        names, transposed = _leaf_names(path, model.cfg.num_layers if stacked else 0)
        shape = tuple(leaf.shape[1:] if stacked else leaf.shape)
        want = expected[names[0]]
        if (shape[::-1] if transposed else shape) != want:
            raise HFError(f"{'/'.join(map(str, path))}: shape {shape} does not fit cfg ({names[0]} is {want})")
    os.makedirs(folder, exist_ok=True)
    for old in os.listdir(folder):  # stale weights of an earlier export would shadow or mix with these
        if old in (WEIGHTS, INDEX) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", old):
            os.remove(os.path.join(folder, old))
    sizes = {name: int(np.prod(shape)) * np_dtype.itemsize for name, shape in expected.items()}
    plan = _shard_plan(sizes, max_shard_bytes)
    files = [WEIGHTS] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                                              for i in range(len(plan))]
    for file, names in zip(files, plan):
        save_file({n: getters[n]() for n in names}, os.path.join(folder, file), metadata={"format": "pt"})
    written = [os.path.join(folder, f) for f in files]
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {n: f for f, names in zip(files, plan) for n in names}}
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump(index, f, indent=2)
        written.append(os.path.join(folder, INDEX))
    with open(os.path.join(folder, CONFIG), "w") as f:
        json.dump(hf_config(cfg, dtype=np_dtype.name, bos_token_id=bos_token_id, eos_token_id=eos_token_id),
                  f, indent=2)
    return [os.path.join(folder, CONFIG)] + written


# ----------------------------------------------------------------------------------------------------
# reading

def weight_map(folder: str) -> dict[str, str]:
    """HF tensor name → the path of the safetensors file holding it."""
    from safetensors import safe_open

    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                wm = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise HFError(f"{index}: not a safetensors index (no weight_map): {e}") from None
        for file in sorted(set(wm.values())):
            if not os.path.isfile(os.path.join(folder, file)):
                raise HFError(f"{index}: lists {file}, which is not in {folder}")
        return {name: os.path.join(folder, file) for name, file in wm.items()}
    single = os.path.join(folder, WEIGHTS)
    if not os.path.isfile(single):
        other = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json") if os.path.isfile(os.path.join(folder, f))]
        hint = f" (found {other[0]}: only safetensors weights are read; convert with save_pretrained)" if other else ""
        raise HFError(f"{folder}: no {WEIGHTS} or {INDEX}{hint}")
    with safe_open(single, framework="np") as f:
        return {name: single for name in f.keys()}


def load_llama(folder: str, **overrides) -> Llama:
    """A Llama holding the checkpoint in ``folder`` (see ``poetjax.models.llama.from_hf``). Every tensor's
    name and shape are checked against config.json before any is read."""
    from safetensors import safe_open

    fields = config_fields(folder)
    bad = sorted(set(overrides) & set(SHAPE_FIELDS))
    if bad:
        raise HFError(f"from_hf: {bad[0]} comes from {os.path.join(folder, CONFIG)} and cannot be overridden")
    try:
        cfg = LlamaConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as e:
        raise HFError(f"from_hf: {e}") from None
    wm = weight_map(folder)
    expected = hf_shapes(cfg)
    if cfg.tie_embeddings:  # some tied checkpoints also store the (identical) output layer
        wm = {n: p for n, p in wm.items() if n != "lm_head.weight"}
    missing = [n for n in expected if n not in wm]
    if missing:
        raise HFError(f"{folder}: tensor {missing[0]} is missing from the weight files "
                      f"({len(missing)} of {len(expected)} missing) although {CONFIG} needs it")
    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(p, framework="np")) for p in sorted(set(wm.values()))}
        for name, p in wm.items():
            if name not in expected:
                if _IGNORED.fullmatch(name):
                    continue
                raise HFError(f"{p}: unexpected tensor {name} (not part of a LlamaForCausalLM of {CONFIG})")
            shape = tuple(handles[p].get_slice(name).get_shape())
            if shape != expected[name]:
                raise HFError(f"{p}: {name} has shape {shape}, but {CONFIG} gives {expected[name]}")

        def read(name: str, transposed: bool) -> np.ndarray:
            x = handles[wm[name]].get_tensor(name)
            return x.T if transposed else x

        abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
        graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
        pure = nnx.to_pure_dict(params)
        layers = cfg.num_layers if cfg.scan_layers else 0

        def fill(path, leaf):
            path = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
            names, transposed = _leaf_names(path, layers if path[0] == "layers" else 0)
            arrays = [read(n, transposed) for n in names]
            x = np.stack(arrays) if layers and path[0] == "layers" else arrays[0]
            return jnp.asarray(x, leaf.dtype)

        nnx.replace_by_pure_dict(params, jax.tree_util.tree_map_with_path(fill, pure))
    if jax.tree.leaves(rest):
        raise HFError(f"from_hf: the model has non-parameter state {jax.tree.structure(rest)}; cannot fill it")
    return nnx.merge(graphdef, params, rest)


def shape_diff(a: LlamaConfig, b: LlamaConfig) -> list[tuple[str, object, object]]:
    """(field, a's value, b's value) for each of ``SHAPE_FIELDS`` where two configs give different models
    (num_kv_heads compares the head counts it means: 0 and num_heads are the same)."""
    value = lambda c, name: c.kv_heads if name == "num_kv_heads" else getattr(c, name)
    return [(n, value(a, n), value(b, n)) for n in SHAPE_FIELDS if value(a, n) != value(b, n)]
