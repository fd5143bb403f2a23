"""Hugging Face interop without torch: export → import round trips, transformers' own files
(tests/fixtures/hf_llama_*, made by tests/fixtures/make_hf_fixtures.py) against the logits transformers
computed, POET starting from an imported model, the ``--export-hf`` command, and bad folders.

The same exports loaded by transformers itself: tests/test_hf_transformers.py (needs torch).
"""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj
from poetjax.export import export_hf
from poetjax.models import hf
from poetjax.models.llama import Llama, LlamaConfig, from_hf
from poetjax.run_config import ConfigError, load_config
from poetjax.testing import assert_close

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
CFG = LlamaConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_heads=4, num_layers=2, max_seq_len=32)
VARIANTS = {"mha": {}, "gqa": dict(num_kv_heads=2), "tied": dict(tie_embeddings=True),
            "gqa_tied_stacked": dict(num_kv_heads=1, tie_embeddings=True, scan_layers=True),
            "bf16": dict(num_kv_heads=2, dtype="bfloat16", param_dtype="bfloat16")}


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _tokens(vocab, b=2, t=9, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def _random_norms(model):
    for path, var in nnx.iter_graph(model):
        if path and path[-1] == "scale":
            var[...] = (1.0 + 0.1 * jax.random.normal(jax.random.key(len(path)), var[...].shape)).astype(var[...].dtype)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_then_import_gives_identical_logits(variant, tmp_path):
    cfg = dataclasses.replace(CFG, **VARIANTS[variant])
    model = _random_norms(Llama(cfg, rngs=nnx.Rngs(0)))
    files = export_hf(model, cfg, str(tmp_path))
    assert sorted(os.path.basename(f) for f in files) == ["config.json", "model.safetensors"]
    conf = json.load(open(tmp_path / "config.json"))
    assert conf["architectures"] == ["LlamaForCausalLM"] and conf["torch_dtype"] == cfg.param_dtype
    assert conf["num_key_value_heads"] == cfg.kv_heads and conf["tie_word_embeddings"] == cfg.tie_embeddings
    chosen = ("max_seq_len", "scan_layers", "dtype", "param_dtype")  # ours to choose, not in config.json
    back = from_hf(str(tmp_path), **{k: getattr(cfg, k) for k in chosen})
    assert back.cfg == cfg
    tokens = _tokens(cfg.vocab_size)
    # the same numbers in the same program: bit-identical, not merely close
    np.testing.assert_array_equal(np.asarray(_logits(back, tokens)), np.asarray(_logits(model, tokens)))


def test_poet_model_is_merged_on_export(tmp_path):
    cfg = dataclasses.replace(CFG, num_kv_heads=2, num_layers=1)  # one layer: eager poetize/merge are slow
    model = pj.poetize(Llama(cfg, rngs=nnx.Rngs(0)), pj.POETConfig(block_size=8), rngs=nnx.Rngs(1))
    for _, layer in pj.poet_layers(model):  # rotations far from the identity
        for name in ("theta_in", "theta_out"):
            var = getattr(layer, name)
            var[...] = 0.05 * jax.random.normal(jax.random.key(hash(name) % 97), var[...].shape)
    tokens = _tokens(cfg.vocab_size)
    export_hf(model, cfg, str(tmp_path))
    back = from_hf(str(tmp_path), max_seq_len=cfg.max_seq_len)
    plain_before = Llama(cfg, rngs=nnx.Rngs(0))
    assert float(jnp.max(jnp.abs(_logits(model, tokens) - _logits(plain_before, tokens)))) > 1e-3  # rotations matter
    assert_close(_logits(back, tokens), _logits(model, tokens), jnp.float32, "value", "exported POET model")


def test_large_export_is_sharded_with_an_hf_index(tmp_path):
    cfg = dataclasses.replace(CFG, num_kv_heads=2)
    model = _random_norms(Llama(cfg, rngs=nnx.Rngs(0)))
    out = str(tmp_path / "hf")
    export_hf(model, cfg, out, max_shard_bytes=40_000)
    index = json.load(open(os.path.join(out, hf.INDEX)))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not os.path.exists(os.path.join(out, hf.WEIGHTS))
    from safetensors.numpy import load_file

    stored = {}
    for shard in shards:
        tensors = load_file(os.path.join(out, shard))
        assert sum(t.nbytes for t in tensors.values()) <= 40_000 or len(tensors) == 1
        assert all(index["weight_map"][n] == shard for n in tensors)
        stored.update(tensors)
    assert set(stored) == set(index["weight_map"]) == set(hf.hf_shapes(cfg))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values())
    # HF layout: (out, in) projections, (V, D) embedding
    np.testing.assert_array_equal(stored["model.layers.1.self_attn.k_proj.weight"],
                                  np.asarray(model.layers[1].attn.k_proj.kernel[...]).T)
    np.testing.assert_array_equal(stored["model.embed_tokens.weight"], np.asarray(model.embed.embedding[...]))
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(_logits(from_hf(out, max_seq_len=32), tokens)),
                                  np.asarray(_logits(model, tokens)))
    # exporting again unsharded leaves no stale shard or index behind (transformers would read them)
    export_hf(model, cfg, out)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == [hf.WEIGHTS]


# ----------------------------------------------------------------------------------------------------
# transformers' own files (tests/fixtures, made by make_hf_fixtures.py)

@pytest.mark.parametrize("name,kv_heads,tied", [("hf_llama_mha", 4, False), ("hf_llama_gqa_tied", 2, True)])
def test_transformers_checkpoint_gives_transformers_logits(name, kv_heads, tied):
    folder = os.path.join(FIXTURES, name)
    model = from_hf(folder)
    assert (model.cfg.kv_heads, model.cfg.tie_embeddings) == (kv_heads, tied)
    assert (model.cfg.rope_theta, model.cfg.norm_eps, model.cfg.max_seq_len) == (500.0, 1e-5, 64)
    ids, expected = np.load(os.path.join(folder, "input_ids.npy")), np.load(os.path.join(folder, "logits.npy"))
    assert np.abs(expected).max() > 0.5  # logits of a size where float32 agreement means something
    assert_close(_logits(model, jnp.asarray(ids)), expected, jnp.float32, "value", f"{name} vs transformers")


def test_poet_keep_starts_from_the_imported_function(tmp_path):
    folder = os.path.join(FIXTURES, "hf_llama_gqa_tied")
    ids, expected = np.load(os.path.join(folder, "input_ids.npy")), np.load(os.path.join(folder, "logits.npy"))
    cfg = load_config(None, [f"model.init_from=hf:{folder}", "poet.init=keep", "poet.block_size=16",
                             "data.seq_len=32"])
    m = cfg.model  # the shape came from the checkpoint's config.json
    assert (m.hidden_size, m.num_layers, m.num_kv_heads, m.tie_embeddings, m.vocab_size) == (32, 2, 2, True, 64)
    from poetjax.train.steps import build_model

    imported = from_hf(folder)
    poet = build_model(cfg)
    assert len(pj.poet_layers(poet)) == 7 * m.num_layers
    before = _logits(imported, jnp.asarray(ids))
    assert_close(_logits(poet, jnp.asarray(ids)), before, jnp.float32, "same", "logits after poetize(keep)")
    assert_close(before, expected, jnp.float32, "value", "imported model vs transformers")


def test_init_from_config_errors_name_the_field():
    folder = os.path.join(FIXTURES, "hf_llama_mha")
    with pytest.raises(ConfigError, match=r"model.hidden_size=64 does not match .* \(32 in .*config.json\)"):
        load_config(None, [f"model.init_from=hf:{folder}", "poet.init=keep", "model.hidden_size=64",
                           "data.seq_len=32"])
    with pytest.raises(ConfigError, match="poet.init='normalized' would replace the weights of model.init_from"):
        load_config(None, [f"model.init_from=hf:{folder}", "data.seq_len=32"])
    with pytest.raises(ConfigError, match="model.init_from='hf:nowhere': nowhere: no such folder"):
        load_config(None, ["model.init_from=hf:nowhere", "poet.init=keep"])
    cfg = load_config(None, [f"model.init_from=hf:{folder}", "optimizer.name=adamw", "model.max_seq_len=32",
                             "data.seq_len=32"])  # max_seq_len may be chosen; adamw needs no init
    assert (cfg.model.max_seq_len, cfg.model.hidden_size) == (32, 32)


# ----------------------------------------------------------------------------------------------------
# bad folders: one-line errors that name the file or the field

def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    conf = json.load(open(path))
    conf.update(changes)
    json.dump(conf, open(path, "w"))


def _drop_tensor(folder, name):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path)


BAD = {
    "no config.json": (lambda d: os.remove(os.path.join(d, "config.json")), r"no config\.json"),
    "another model_type": (lambda d: _edit_config(d, model_type="mistral"), "model_type='mistral'"),
    "another architecture": (lambda d: _edit_config(d, architectures=["LlamaForSequenceClassification"]),
                             "architectures=.*LlamaForSequenceClassification"),
    "rope_scaling": (lambda d: _edit_config(d, rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling="),
    "rope_type": (lambda d: _edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}),
                  "rope_parameters.rope_type='llama3'"),
    "attention bias": (lambda d: _edit_config(d, attention_bias=True), "attention_bias=True"),
    "hidden_act": (lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act='gelu'"),
    "shape vs config": (lambda d: _edit_config(d, intermediate_size=40),
                        r"model\.safetensors: model\.layers\.\d\.mlp\.\w+_proj\.weight has shape \((48, 32|32, 48)\), "
                        r"but config\.json gives"),
    "missing tensor": (lambda d: _drop_tensor(d, "model.layers.1.self_attn.v_proj.weight"),
                       r"tensor model\.layers\.1\.self_attn\.v_proj\.weight is missing"),
    "no weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")), r"no model\.safetensors"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_folder_gives_one_line_error_naming_file_or_field(case, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(FIXTURES, "hf_llama_mha"), folder)
    damage, pattern = BAD[case]
    damage(folder)
    with pytest.raises(hf.HFError, match=pattern) as e:
        from_hf(folder)
    assert "\n" not in str(e.value)
    if "config.json" in pattern or case == "rope_scaling":  # config-level problems name the file too
        assert "config.json" in str(e.value)


# ----------------------------------------------------------------------------------------------------
# python train.py ... --export-hf DIR

def test_export_hf_cli_writes_the_trained_run_with_its_tokenizer(uninterrupted, tmp_path, data_cache, capsys):
    from _runs import RESUME, TINY, state_like, tiny
    from tokenizers import Tokenizer

    from poetjax.checkpoint import Checkpointer
    from poetjax.data import prepare_from_config
    from poetjax.data.tokenizer import EOS
    from poetjax.train import steps as core
    from poetjax.train.cli import main as cli_main

    out_dir = os.path.dirname(uninterrupted.run_dir)
    out = str(tmp_path / "hf")
    base = ["--config", TINY, f"out_dir={out_dir}", f"data.cache_dir={data_cache}", "name=full", *RESUME]
    assert cli_main([*base, "--export-hf", out]) == 0
    assert "exported step 30" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    cfg = tiny(out_dir, data_cache, "name=full", *RESUME)
    run_tok = prepare_from_config(cfg.data, cfg.model.vocab_size, log=lambda m: None).tokenizer()
    text = "To be, or not to be: that is the question."
    assert Tokenizer.from_file(os.path.join(out, "tokenizer.json")).encode(text).ids == \
        run_tok.encode_batch([text])[0]
    eos = run_tok.tok.token_to_id(EOS)
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["eos_token"] == EOS
    assert json.load(open(os.path.join(out, "generation_config.json"))) == {"eos_token_id": eos}
    conf = json.load(open(os.path.join(out, "config.json")))
    assert (conf["eos_token_id"], conf["bos_token_id"], conf["hidden_size"]) == (eos, None, cfg.model.hidden_size)
    state, _ = Checkpointer(uninterrupted.checkpoint_dir).restore(30, state_like(cfg))
    trained = nnx.merge(core.split_model(core.build_model(cfg))[0], state.params, state.frozen)
    tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.model.vocab_size)
    assert_close(from_hf(out, max_seq_len=cfg.model.max_seq_len)(tokens), trained(tokens), jnp.float32, "value")
