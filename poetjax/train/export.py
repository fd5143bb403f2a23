"""Export a run's checkpoint as plain LLaMA weights: ``python train.py [--config F] [k=v ...] --export [PATH]``.

The run is named by its config, exactly as for training (the same ``--config`` and overrides). The
newest checkpoint (or ``checkpoint.resume_step``) is restored; for a POET run every ``POETLinear`` is
replaced by an ``nnx.Linear`` holding its merged kernel W_eff = R·W0·P (``poetjax.export.export_plain``),
so the file holds exactly the parameter tree of the plain ``Llama`` of ``model.*`` (embedding, norms,
every projection's ``kernel``, lm_head) and loads with ``poetjax.export.load_weights``. Baseline runs
(adamw/muon) are written as they are. The file is ``.npz`` (or ``.safetensors`` with the package).

As a check, the written file is loaded into a fresh plain ``Llama`` and its logits on random tokens are
compared with the trained model's; the largest difference is reported.
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from poetjax.checkpoint import Checkpointer, CheckpointError
from poetjax.export import load_weights, save_weights
from poetjax.models.llama import Llama
from poetjax.run_config import RunConfig, diff
from poetjax.train import steps as core
from poetjax.train.optimizers import make_optimizer

# Config keys that change the trained function or the parameter tree: a checkpoint written with other
# values cannot be exported under this config (model.remat/attention compute the same function).
_FUNCTION_KEYS = ("model.", "optimizer.", "seed")
_FREE_KEYS = ("model.remat", "model.attention")


def export_run(cfg: RunConfig, out_path: str | None = None, *, print_fn: Callable[[str], None] = print,
               check_tokens: int = 32) -> str:
    """Write the run's merged weights to ``out_path`` (default ``<run dir>/export_step<N>.npz``); return it."""
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
        bad = [(k, a, b) for k, a, b in diff(meta.get("config", {}), cfg.to_dict())
               if any(k.startswith(p) for p in _FUNCTION_KEYS) and k not in _FREE_KEYS]
        if bad:
            listed = "; ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (now)" for k, a, b in bad[:6])
            raise CheckpointError(f"checkpoint step {step} in {ckpt_dir} was trained with another model or "
                                  f"optimizer config — {listed}; export with the run's own settings")
        model = core.build_model(cfg)
        graphdef, like = core.init_state(model, make_optimizer(cfg), core.run_keys(cfg.seed)[2])
        del model
        state, _ = ckpt.restore(step, like)
    trained = nnx.merge(graphdef, state.params, state.frozen)
    out_path = out_path or os.path.join(run_dir, f"export_step{step}.npz")
    save_weights(trained, out_path)  # export_plain first for a POET model

    plain = load_weights(Llama(cfg.model, rngs=nnx.Rngs(0)), out_path)
    t = min(check_tokens, cfg.model.max_seq_len)
    tokens = jax.random.randint(jax.random.key(cfg.seed), (2, t), 0, cfg.model.vocab_size)
    delta = float(jnp.max(jnp.abs(plain(tokens).astype(jnp.float32) - trained(tokens).astype(jnp.float32))))
    n_params = sum(int(x.size) for x in jax.tree.leaves(nnx.state(plain, nnx.Param)))
    what = "merged POET weights" if cfg.optimizer.name == "poet" else f"{cfg.optimizer.name} weights"
    print_fn(f"exported step {step} of {run_dir} ({what}, {n_params / 1e6:.3f}M parameters of the plain LLaMA) "
             f"to {out_path}; max |logit difference| of the reloaded plain model on 2x{t} tokens: {delta:.2e}")
    return out_path
