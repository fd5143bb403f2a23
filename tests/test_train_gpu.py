"""GPU checks of the trainer (skipped without a GPU): bf16 training of a family config, fused attention.

    python -m pytest -q tests/test_train_gpu.py      # on the GPU machine
"""

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from poetjax.models.llama import Llama, LlamaConfig
from poetjax.run_config import load_config
from poetjax.testing import assert_close
from poetjax.train.loop import run

from _runs import ROOT

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]


@pytest.mark.parametrize("attention", ["xla", "cudnn"])
def test_llama_20m_trains_in_bf16(tmp_path, data_cache, attention):
    cfg = load_config(os.path.join(ROOT, "configs", "llama_20m.yaml"), [
        f"out_dir={tmp_path}", f"data.cache_dir={data_cache}", "data.vocab_size=4096", "train.steps=60",
        "train.batch_size=16", "schedule.warmup_steps=10", "train.eval_interval=30", "train.eval_batches=4",
        "train.log_interval=10", "checkpoint.interval=30", f"model.attention={attention}", "logging.progress=lines"])
    assert cfg.model.dtype == "bfloat16"
    res = run(cfg)
    assert res.completed and res.val_ppl < res.unigram_ppl
    first, last = res.losses[1], res.losses[60]
    assert last < first - 1.0


def test_cudnn_attention_matches_xla_in_bf16():
    base = dict(vocab_size=128, hidden_size=256, intermediate_size=512, num_heads=4, num_layers=2, dtype="bfloat16")
    tokens = jnp.asarray(jax.random.randint(jax.random.key(0), (4, 256), 0, 128))
    out = {}
    for impl in ("xla", "cudnn"):
        model = Llama(LlamaConfig(**base, attention=impl), rngs=nnx.Rngs(0))
        out[impl] = nnx.jit(lambda m, t: m(t))(model, tokens).astype(jnp.float32)
    assert_close(out["cudnn"], out["xla"], jnp.bfloat16, "value", "cudnn vs xla logits")
