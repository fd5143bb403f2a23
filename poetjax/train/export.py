"""Export a run's checkpoint as plain LLaMA weights: ``python train.py [--config F] [k=v ...] --export [PATH]``,
or as a Hugging Face folder: ``python train.py [--config F] [k=v ...] --export-hf [DIR]``.

The run is named by its config, exactly as for training (the same ``--config`` and overrides). The
newest checkpoint (or ``checkpoint.resume_step``) is restored; for a POET run every ``POETLinear`` is
replaced by an ``nnx.Linear`` holding its merged kernel W_eff = R·W0·P (``poetjax.export.export_plain``),
so the file holds exactly the parameter tree of the plain ``Llama`` of ``model.*`` (embedding, norms,
every projection's ``kernel``, lm_head) and loads with ``poetjax.export.load_weights``. Baseline runs
(adamw/muon) are written as they are. The file is ``.npz`` (or ``.safetensors`` with the package).

``--export-hf`` writes the same merged weights as a ``LlamaForCausalLM`` folder with the run's tokenizer
(``poetjax.export.export_hf``): transformers' ``AutoModelForCausalLM``/``AutoTokenizer`` load it.

As a check, the written file is loaded into a fresh plain ``Llama`` (for ``--export-hf`` through
``poetjax.models.llama.from_hf``) and its logits on random tokens are compared with the trained model's;
the largest difference is reported.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from poetjax.checkpoint import Checkpointer, CheckpointError
from poetjax.data import prepare_from_config
from poetjax.data.sources import resolve_path
from poetjax.data.tokenizer import HFTokenizer
from poetjax.export import SPECIAL_ROLES, export_hf, load_weights, save_weights
from poetjax.models.llama import Llama, from_hf
from poetjax.run_config import RunConfig, diff_saved
from poetjax.train import steps as core
from poetjax.train.optimizers import make_optimizer

# Config keys that change the trained function or the parameter tree: a checkpoint written with other
# values cannot be exported under this config (model.remat/attention compute the same function).
_FUNCTION_KEYS = ("model.", "optimizer.", "seed")
_FREE_KEYS = ("model.remat", "model.attention")


def restore_trained(cfg: RunConfig) -> tuple[nnx.Module, int, str]:
    """(trained model, its step, run dir): the run's newest checkpoint (or ``checkpoint.resume_step``),
    refused when it was trained with another model or optimizer config."""
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    ckpt_dir = cfg.checkpoint.dir or os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"no checkpoints to export: {ckpt_dir} does not exist (train the run first, with "
                              f"the same --config and overrides)")
    with Checkpointer(ckpt_dir) as ckpt:
        on_disk = ckpt.steps()
        if not on_disk:
            raise CheckpointError(f"no checkpoints to export in {ckpt_dir}")
        step = cfg.checkpoint.resume_step or on_disk[-1]
        meta = ckpt.read_meta(step)
        bad = [(k, a, b) for k, a, b in diff_saved(meta.get("config", {}), cfg)
               if any(k.startswith(p) for p in _FUNCTION_KEYS) and k not in _FREE_KEYS]
        if bad:
            listed = "; ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (now)" for k, a, b in bad[:6])
            raise CheckpointError(f"checkpoint step {step} in {ckpt_dir} was trained with another model or "
                                  f"optimizer config — {listed}; export with the run's own settings")
        model = core.build_model(cfg)
        graphdef, like = core.init_state(model, make_optimizer(cfg), core.run_keys(cfg.seed)[2])
        del model
        state, _ = ckpt.restore(step, like)
    return nnx.merge(graphdef, state.params, state.frozen), step, run_dir


def _report(cfg: RunConfig, trained, plain, step: int, run_dir: str, out_path: str, check_tokens: int) -> str:
    t = min(check_tokens, cfg.model.max_seq_len)
    tokens = jax.random.randint(jax.random.key(cfg.seed), (2, t), 0, cfg.model.vocab_size)
    delta = float(jnp.max(jnp.abs(plain(tokens).astype(jnp.float32) - trained(tokens).astype(jnp.float32))))
    n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(plain, nnx.Param)))
    what = "merged POET weights" if cfg.optimizer.name == "poet" else f"{cfg.optimizer.name} weights"
    return (f"exported step {step} of {run_dir} ({what}, {n_params / 1e6:.3f}M parameters of the plain LLaMA) "
            f"to {out_path}; max |logit difference| of the reloaded plain model on 2x{t} tokens: {delta:.2e}")


def export_run(cfg: RunConfig, out_path: str | None = None, *, print_fn: Callable[[str], None] = print,
               check_tokens: int = 32) -> str:
    """Write the run's merged weights to ``out_path`` (default ``<run dir>/export_step<N>.npz``); return it."""
    trained, step, run_dir = restore_trained(cfg)
    out_path = out_path or os.path.join(run_dir, f"export_step{step}.npz")
    save_weights(trained, out_path)  # export_plain first for a POET model
    plain = load_weights(Llama(cfg.model, rngs=nnx.Rngs(0)), out_path)
    print_fn(_report(cfg, trained, plain, step, run_dir, out_path, check_tokens))
    return out_path


def _special_tokens(cfg: RunConfig, tokenizer) -> dict[str, str] | None:
    """The special tokens named in a tokenizer_config.json beside a user's ``data.tokenizer`` file (as in
    a Hugging Face folder the run started from); None (the default: our BPE's end-of-text) otherwise."""
    if cfg.data.tokenizer == "bpe":
        return None
    beside = os.path.join(os.path.dirname(resolve_path(cfg.data.tokenizer)), "tokenizer_config.json")
    if not os.path.isfile(beside):
        return None
    with open(beside) as f:
        conf = json.load(f)
    roles = {}
    for role in SPECIAL_ROLES:
        token = conf.get(role)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tokenizer.tok.token_to_id(token) is not None:
            roles[role] = token
    return roles


def export_hf_run(cfg: RunConfig, out_dir: str | None = None, *, print_fn: Callable[[str], None] = print,
                  check_tokens: int = 32) -> str:
    """Write the run as a Hugging Face folder (default ``<run dir>/hf_step<N>``) with the run's tokenizer."""
    trained, step, run_dir = restore_trained(cfg)
    out_dir = out_dir or os.path.join(run_dir, f"hf_step{step}")
    tokenizer = prepare_from_config(cfg.data, cfg.model.vocab_size, log=lambda m: None).tokenizer()
    note = ""
    if not isinstance(tokenizer, HFTokenizer):
        note = f"; the {tokenizer.kind} tokenizer is not converted, add it to the folder yourself"
        tokenizer = None
    export_hf(trained, cfg.model, out_dir, tokenizer=tokenizer,
              special_tokens=None if tokenizer is None else _special_tokens(cfg, tokenizer))
    plain = from_hf(out_dir, max_seq_len=cfg.model.max_seq_len)
    print_fn(_report(cfg, trained, plain, step, run_dir, out_dir, check_tokens) + note)
    return out_dir
