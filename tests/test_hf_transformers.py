"""Our Hugging Face exports and imports against transformers itself (torch + transformers; skipped where
they are not installed, as on CI). On the GPU machine:

    python -m pytest -q -s -rs tests/test_hf_transformers.py

* a tiny run of ours is trained, written with ``train.py --export-hf``, loaded by
  ``AutoModelForCausalLM``/``AutoTokenizer`` and compared with our logits, and transformers generates text
  from it (printed with ``-s``);
* the fixtures (tests/fixtures/hf_llama_*): transformers still computes the stored logits, our import
  matches it, and our re-export of the imported model loads back into transformers with the same logits;
* a GQA + tied model of ours, exported in several shards with an index, loads in transformers; a model
  that transformers shards itself loads in ours.

transformers runs on the CPU in float32; our side computes float32 matmuls at full precision (on a GPU,
JAX's default would use TF32, and so would POET's default Cayley products), so the float32 tolerance
applies.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from poetjax.export import export_hf  # noqa: E402
from poetjax.models.llama import Llama, LlamaConfig, from_hf  # noqa: E402
from poetjax.testing import assert_close  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


def _ours(model, ids) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(jnp.asarray(np.asarray(ids), jnp.int32)).astype(jnp.float32))


def _theirs(folder_or_model, ids) -> np.ndarray:
    model = folder_or_model
    if isinstance(model, str):
        model = transformers.AutoModelForCausalLM.from_pretrained(model).float().eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def test_trained_run_exported_with_export_hf_loads_and_generates_in_transformers(tmp_path, data_cache, capsys):
    from _runs import TINY, tiny

    from poetjax.data import prepare_from_config
    from poetjax.train.cli import main as cli_main
    from poetjax.train.export import restore_trained
    from poetjax.train.loop import run

    # float32-exact POET products on a GPU too (XLA path, no TF32 pass in the Cayley series), so the trained
    # model and transformers can be held to the float32 tolerance
    overrides = ["name=hf", "train.steps=40", "logging.diagnostics_interval=0", "poet.exec.impl=xla",
                 "poet.exec.cayley_precision=highest"]
    cfg = tiny(tmp_path, data_cache, *overrides)
    run(cfg)
    out = str(tmp_path / "hf_export")
    assert cli_main(["--config", TINY, f"out_dir={tmp_path}", f"data.cache_dir={data_cache}", *overrides,
                     "--export-hf", out]) == 0
    exported = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{exported.strip()}")

    model = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    prompt = "ROMEO:\nWhat say you, my lord"
    ids = tok(prompt, return_tensors="pt").input_ids
    ours_tok = prepare_from_config(cfg.data, cfg.model.vocab_size, log=lambda m: None).tokenizer()
    assert ids[0].tolist() == ours_tok.encode_batch([prompt])[0]  # the run's tokenizer, unchanged

    trained = restore_trained(cfg)[0]  # the POET model in the checkpoint, before any export
    assert_close(_theirs(model, ids), _ours(trained, ids), jnp.float32, "value", "transformers vs our trained model")
    assert_close(_theirs(model, ids), _ours(from_hf(out), ids), jnp.float32, "value", "transformers vs from_hf")

    with torch.no_grad():  # greedy (a briefly trained model mostly repeats its likeliest token) and sampled
        generated = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
        torch.manual_seed(0)
        sampled = model.generate(ids, max_new_tokens=24, do_sample=True, top_k=50, pad_token_id=tok.eos_token_id)
    texts = [tok.decode(g[ids.shape[1]:]) for g in (generated[0], sampled[0])]
    with capsys.disabled():
        print(f"transformers generated from {prompt!r}: greedy {texts[0]!r}, sampled {texts[1]!r}")
    assert generated.shape[1] > ids.shape[1] and sampled.shape[1] > ids.shape[1] and all(texts)
    # the whole generated sequence: both models give the same logits, so the greedy choices are ours too
    assert_close(_theirs(model, generated), _ours(trained, generated), jnp.float32, "value", "on generated text")


@pytest.mark.parametrize("name", ["hf_llama_mha", "hf_llama_gqa_tied"])
def test_fixture_round_trip_through_transformers(name, tmp_path):
    folder = os.path.join(FIXTURES, name)
    ids, stored = np.load(os.path.join(folder, "input_ids.npy")), np.load(os.path.join(folder, "logits.npy"))
    theirs = _theirs(folder, ids)
    assert_close(theirs, stored, jnp.float32, "value", f"this transformers vs the stored {name} logits")
    ours = from_hf(folder)
    assert_close(_ours(ours, ids), theirs, jnp.float32, "value", f"from_hf({name}) vs transformers")
    export_hf(ours, ours.cfg, str(tmp_path))  # and back: HF → ours → HF
    assert_close(_theirs(str(tmp_path), ids), theirs, jnp.float32, "value", f"{name} re-exported by us")


def test_sharded_gqa_tied_export_loads_in_transformers(tmp_path):
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_heads=8, num_kv_heads=2,
                      num_layers=3, max_seq_len=64, rope_theta=1000.0, norm_eps=1e-5, tie_embeddings=True,
                      init_std=0.1)
    model = Llama(cfg, rngs=nnx.Rngs(0))
    export_hf(model, cfg, str(tmp_path), max_shard_bytes=60_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 3
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    theirs = _theirs(str(tmp_path), ids)
    assert np.abs(theirs).max() > 0.5
    assert_close(theirs, _ours(model, ids), jnp.float32, "value", "transformers vs our GQA+tied model")


def test_transformers_sharded_save_loads_in_ours(tmp_path):
    torch.manual_seed(0)
    conf = transformers.LlamaConfig(vocab_size=80, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=32,
                                    initializer_range=0.1, bos_token_id=None, eos_token_id=None)
    hf_model = transformers.LlamaForCausalLM(conf).to(torch.float32).eval()
    hf_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    ids = np.random.default_rng(1).integers(0, conf.vocab_size, (2, 16))
    ours = from_hf(str(tmp_path))
    assert (ours.cfg.num_heads, ours.cfg.kv_heads, ours.cfg.num_layers, ours.cfg.max_seq_len) == (6, 3, 2, 32)
    assert_close(_ours(ours, ids), _theirs(hf_model, ids), jnp.float32, "value", "from_hf of a sharded save")
