"""Export a POET model as a plain model: every POETLinear becomes an nnx.Linear with the merged kernel.

The result has the structure of the model before ``poetize`` (same paths, ``kernel``/``bias`` leaves), so
its parameter tree loads into the plain architecture and computes the same logits. Weights can be written
to ``.npz`` or ``.safetensors`` with our parameter paths (``save_weights``), or as a Hugging Face
``LlamaForCausalLM`` folder with its tokenizer (``export_hf``), which transformers loads as it is.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poetjax.data.tokenizer import EOS, HFTokenizer, TextTokenizer
from poetjax.layers import POETLinear
from poetjax.models import hf
from poetjax.models.llama import LlamaConfig, layer_view
from poetjax.surgery import set_child, iter_modules


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
        set_child(plain, path, _plain_linear(layer))
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
        from safetensors.numpy import save_file

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


# ----------------------------------------------------------------------------------------------------
# Hugging Face folders

SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def default_special_tokens(tokenizer: TextTokenizer) -> dict[str, str]:
    """{"eos_token": "<|endoftext|>"} when the tokenizer has our BPE's end-of-text token, else {}."""
    if isinstance(tokenizer, HFTokenizer) and tokenizer.tok.token_to_id(EOS) is not None:
        return {"eos_token": EOS}
    return {}


def _save_tokenizer(tokenizer: TextTokenizer, roles: dict[str, str], folder: str, max_len: int) -> list[str]:
    """tokenizer.json and a tokenizer_config.json that ``AutoTokenizer`` reads as a fast tokenizer."""
    tok_path = tokenizer.save(folder)
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
            "clean_up_tokenization_spaces": False, **roles}
    conf_path = os.path.join(folder, "tokenizer_config.json")
    with open(conf_path, "w") as f:
        json.dump(conf, f, indent=2)
    return [tok_path, conf_path]


def export_hf(model: nnx.Module, cfg: LlamaConfig, out_dir: str, *, tokenizer: TextTokenizer | None = None,
              special_tokens: dict[str, str] | None = None, dtype: str | None = None,
              max_shard_bytes: int = hf.MAX_SHARD_BYTES) -> list[str]:
    """Write a LLaMA (plain or POET, merged first by ``export_plain``) as a Hugging Face folder that
    ``transformers.AutoModelForCausalLM`` and ``AutoTokenizer`` load with no code of ours.

    ``cfg`` is the model's ``LlamaConfig`` (or a run config, whose ``model`` is used). The folder gets
    config.json (LlamaForCausalLM), the weights in ``dtype`` (default cfg.param_dtype) as
    model.safetensors or, past ``max_shard_bytes``, shards with an index (one shard on the host at a
    time), and with a ``tokenizer`` (a tokenizers-library one: ours or a tokenizer.json) tokenizer.json,
    tokenizer_config.json with ``special_tokens`` ({"eos_token": "<|endoftext|>"}; default
    ``default_special_tokens``), and generation_config.json when a bos or eos token is named. Returns the
    files written.
    """
    cfg = getattr(cfg, "model", cfg)
    if not isinstance(cfg, LlamaConfig):
        raise TypeError(f"cfg must be a LlamaConfig (or a RunConfig), got {type(cfg).__name__}")
    roles, ids = {}, {}
    if tokenizer is not None:
        if not isinstance(tokenizer, HFTokenizer):
            raise ValueError(f"export_hf writes tokenizers-library tokenizers (tokenizer.json); a {tokenizer.kind} "
                             f"tokenizer is not converted: pass tokenizer=None and add its files yourself")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but vocab_size={cfg.vocab_size}")
        roles = default_special_tokens(tokenizer) if special_tokens is None else dict(special_tokens)
        for role, token in roles.items():
            if role not in SPECIAL_ROLES:
                raise ValueError(f"special_tokens: unknown role {role!r}; known: {SPECIAL_ROLES}")
            ids[role] = tokenizer.tok.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"special_tokens[{role!r}]={token!r} is not in the tokenizer's vocabulary")
    elif special_tokens:
        raise ValueError("special_tokens needs a tokenizer")
    if any(True for _ in iter_modules(model, POETLinear)):
        model = export_plain(model)
    files = hf.save_llama(model, out_dir, cfg=cfg, dtype=dtype, max_shard_bytes=max_shard_bytes,
                          bos_token_id=ids.get("bos_token"), eos_token_id=ids.get("eos_token"))
    if tokenizer is not None:
        files += _save_tokenizer(tokenizer, roles, out_dir, cfg.max_seq_len)
    gen_path = os.path.join(out_dir, "generation_config.json")
    if "bos_token" in ids or "eos_token" in ids:
        gen = {k: ids[r] for k, r in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token")) if r in ids}
        with open(gen_path, "w") as f:
            json.dump(gen, f, indent=2)
        files.append(gen_path)
    elif os.path.exists(gen_path):  # an earlier export's ids do not describe this tokenizer
        os.remove(gen_path)
    return files
