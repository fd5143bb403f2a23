"""configs/: every file loads and builds abstractly (nnx.eval_shape) with the spec's parameter counts;
the config system's keys, types, bases and errors."""

import dataclasses
import glob
import os

import pytest
from flax import nnx

import poetjax as pj
from poetjax.cayley import block_layout
from poetjax.models.llama import Llama, count_params, layer_view, llama_param_formula
from poetjax.run_config import ConfigError, RunConfig, load_config
from poetjax.train.cli import main as cli_main
from poetjax.train.steps import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))

# POET spec §11: (hidden, intermediate, heads, layers, total parameters in millions as printed)
SPEC = {
    "llama_20m": (256, 688, 4, 4, 19.5), "llama_35m": (384, 1024, 8, 6, 35.2),
    "llama_60m": (512, 1280, 8, 8, 56.9), "llama_130m": (768, 2048, 12, 12, 134.1),
    "llama_350m": (1024, 2736, 16, 24, 368.0), "llama_1b": (2048, 5632, 32, 24, 1364.3),
    "llama_3b": (2560, 7168, 32, 32, 2764.5), "llama_7b": (4096, 11264, 32, 32, 6839.1),
    "llama_8b": (4096, 14336, 32, 32, 8047.0), "llama_13b": (5120, 13824, 40, 40, 13015.9),
    "llama_34b": (8192, 22016, 64, 48, 39381.1),
}
# Building a POET model under eval_shape costs time quadratic in its layer count (flax traces every rng
# counter update), so configs deeper than this are converted on a prefix of their identical layers.
POET_BUILD_LAYERS = 8


def _poet_formula(cfg) -> int:
    """Σ over the seven projections of every layer of the free generator entries per side: (B−1)·K(K−1)/2
    + tail(tail−1)/2, i.e. (m + n)(b − 1)/2 when b divides both dimensions (POET spec §3.2)."""
    h, f, b = cfg.model.hidden_size, cfg.model.intermediate_size, cfg.poet.block_size
    side = lambda d: block_layout(d, b).num_params
    per_layer = 4 * (side(h) + side(h)) + 2 * (side(h) + side(f)) + (side(f) + side(h))
    return cfg.model.num_layers * per_layer


def test_every_reference_size_has_a_config():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    assert set(SPEC) <= names and "tiny" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_builds_abstractly_with_spec_parameter_counts(path):
    cfg = load_config(path)
    name = os.path.basename(path)[:-5]
    plain = nnx.eval_shape(lambda: Llama(cfg.model, rngs=nnx.Rngs(0)))
    n = count_params(plain)
    assert n == llama_param_formula(cfg.model)
    if name in SPEC:
        h, f, heads, layers, total_m = SPEC[name]
        m = cfg.model
        shape = (m.hidden_size, m.intermediate_size, m.num_heads, m.num_layers, m.vocab_size)
        assert shape == (h, f, heads, layers, 32000)
        assert round(n / 1e6, 1) == total_m
        assert m.dtype == "bfloat16"  # the GPU family computes in bf16
    assert cfg.optimizer.name == "poet"
    layers = min(cfg.model.num_layers, POET_BUILD_LAYERS)
    cut = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=layers))
    model = nnx.eval_shape(lambda: build_model(cut))
    # per-layer view (configs with scan_layers store the layers stacked: one POETLinear per projection)
    view = nnx.eval_shape(lambda: layer_view(build_model(cut)))
    assert count_params(view) == count_params(model)
    layers_ = [m for _, m in pj.poet_layers(view)]
    assert len(layers_) == 7 * layers
    assert sum(m.num_generator_params for m in layers_) == _poet_formula(cut)  # free entries
    assert count_params(model, pj.Generator) == sum(  # stored arrays: whole blocks, ragged tails masked
        (m.layout_in.num_blocks + m.layout_out.num_blocks) * m.layout_in.num_packed for m in layers_)
    assert count_params(model, pj.FrozenWeight) >= 7 * layers * cfg.model.hidden_size ** 2 // 2  # W0 present
    assert isinstance(model.lm_head, nnx.Linear) and isinstance(view.layers[0].mlp.down_proj, pj.POETLinear)


def test_llama_60m_poet_b256_has_9_66M_generator_parameters():
    cfg = load_config(os.path.join(ROOT, "configs", "llama_60m.yaml"))
    assert cfg.poet.block_size == 256
    model = nnx.eval_shape(lambda: build_model(cfg))
    n = count_params(model, pj.Generator)
    assert n == 8 * (4 * (512 + 512) + 3 * (512 + 1280)) * 255 // 2 == _poet_formula(cfg)
    assert round(n / 1e6, 2) == 9.66  # POET Table 2, BS b=256


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return str(p)


def test_defaults_are_the_default_job():
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.data.source == "data/tinyshakespeare" and cfg.optimizer.name == "poet"
    assert (cfg.poet.block_size, cfg.poet.merge_interval) == (32, 100)  # the small default model's


def test_a_partial_poet_section_keeps_the_run_defaults(tmp_path):
    path = _write(tmp_path, "p.yaml", "poet:\n  memory: mem\n  exec:\n    impl: xla\n")
    cfg = load_config(path, ["poet.exec.cayley_scope=block"])
    assert (cfg.poet.block_size, cfg.poet.merge_interval, cfg.poet.memory) == (32, 100, "mem")
    assert cfg.poet.exec == pj.ExecConfig(impl="xla", compute="auto", cayley_scope="block")


@pytest.mark.parametrize("override, match", [
    ("optimizer.block_size=64", r"'optimizer.block_size' has moved: use poet.block_size"),
    ("optimizer.impl=xla", r"'optimizer.impl' has moved: use poet.exec.impl"),
    ("optimizer.cayley_scope=block", r"'optimizer.cayley_scope' has moved: use poet.exec.cayley_scope"),
    ("optimizer.variant=xq_mem", r"'optimizer.variant' has moved: .*xq_mem is poet.memory=mem poet.base=uint8"),
    ("optimizer.layout=tokens", r"'optimizer.layout' was removed: the activation layout follows from"),
])
def test_an_old_key_names_its_new_place(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_a_checkpoint_config_of_the_old_layout_reads_as_the_same_run():
    """Configs saved before the POET fields moved (optimizer.block_size, variant, layout, …) compare equal
    to the same run in today's layout, and a real difference is still found, under its new key."""
    from poetjax.run_config import diff_saved, migrate_saved

    cfg = load_config(None, ["poet.block_size=16", "poet.memory=mem", "poet.base=uint8",
                             "poet.quant_group_size=32", "poet.exec.impl=xla"])
    old = cfg.to_dict()
    opt = dict(old["optimizer"])
    opt.update(block_size=16, merge_interval=100, variant="xq_mem", num_terms=3, cayley="neumann",
               cayley_precision="default", init="normalized", impl="xla", layout="auto", cayley_scope="auto",
               compute="auto", quant_group_size=32, perm_chunk=1)
    old = {k: v for k, v in old.items() if k != "poet"}
    old["optimizer"] = opt
    assert diff_saved(old, cfg) == []
    assert migrate_saved(old)["poet"]["base"] == "uint8"
    opt["merge_interval"] = 50
    assert diff_saved(old, cfg) == [("poet.merge_interval", 50, 100)]


def test_yaml_base_chain_and_overrides(tmp_path):
    _write(tmp_path, "recipes/base.yaml", "model:\n  hidden_size: 96\n  num_heads: 4\noptimizer:\n  lr: 1e-3\n")
    path = _write(tmp_path, "exp.yaml", "base: recipes/base.yaml\nmodel:\n  num_layers: 3\n")
    cfg = load_config(path, ["optimizer.lr=2e-4", "optimizer.max_grad_norm=0", "checkpoint.resume=false",
                             "name=exp1", "model.hidden_size=64"])
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 3 and cfg.model.num_heads == 4
    assert cfg.optimizer.lr == 2e-4 and isinstance(cfg.optimizer.lr, float)  # "1e-3"-style strings parse
    assert cfg.optimizer.max_grad_norm == 0.0 and cfg.checkpoint.resume is False and cfg.name == "exp1"
    assert load_config(path).optimizer.lr == 1e-3


@pytest.mark.parametrize("overrides, match", [
    (["optimizer.lrr=1"], r"unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'"),
    (["modle.hidden_size=1"], r"unknown config key 'modle'"),
    (["model.hidden_size=abc"], r"model.hidden_size: expected an integer, got 'abc'"),
    (["train.steps=1.5"], r"train.steps: expected an integer"),
    (["checkpoint.resume=maybe"], r"checkpoint.resume: expected true or false"),
    (["optimizer.name=sgd"], r"optimizer: name must be one of"),
    (["poet.block_size=512"], r"poet.block_size=512 does not fit the model"),
    (["poet.block_size=0"], r"block_size must be a positive int"),
    (["model.num_heads=5"], r"model: hidden_size=128 is not divisible by num_heads=5"),
    (["data.seq_len=4096"], r"data.seq_len=4096 exceeds model.max_seq_len"),
    (["train.batch_size=10", "train.microbatches=3"], r"batch_size=10 is not divisible by microbatches=3"),
    (["lr"], r"not of the form key=value"),
    (["optimizer.generator_update=sgd"], r"generator_update must be one of \('adam', 'momentum', 'ns'\)"),
    (["optimizer.carry_moment=true"], r"carry_moment keeps the momentum of generator_update=momentum or ns"),
    (["optimizer.max_angle=-1"], r"max_angle must be >= 0"),
    (["poet.init_scale=0"], r"init_scale must be > 0"),
])
def test_bad_overrides_fail_with_a_message_naming_them(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    a = _write(tmp_path, "a.yaml", "base: b.yaml\n")
    _write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    bad = _write(tmp_path, "bad.yaml", "optimizer:\n  block_sz: 8\n")
    with pytest.raises(ConfigError, match="unknown config key 'optimizer.block_sz'"):
        load_config(bad)


def test_cli_rejects_bad_config_before_running(capsys):
    assert cli_main(["optimizer.lrr=1"]) == 2
    assert "unknown config key 'optimizer.lrr'" in capsys.readouterr().err
    assert cli_main(["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "hidden_size: 64" in out and "name: tiny" in out


def _bench_module(name: str):
    """``benchmarks/<name>.py`` as a module (benchmarks/ is not a package on the test path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_rows_share_one_budget_and_schedule_and_differ_only_in_the_optimizer():
    """RESULTS.md compares rows at equal tokens: every row of benchmarks/quality.py must resolve to a valid
    config whose data, model, schedule and step count are those of the quality config itself."""
    q = _bench_module("quality")
    path = os.path.join(ROOT, q.DEFAULT_CONFIG)
    base = load_config(path)
    assert base.model.hidden_size == 512 and base.model.num_layers == 8  # LLaMA-60M
    for row in q.ROWS:
        cfg = load_config(path, q.row_overrides(row))
        for section in ("model", "data", "schedule", "train"):
            assert getattr(cfg, section) == getattr(base, section), (row, section)
        assert cfg.optimizer.name in ("adamw", "muon", "poet"), row
    assert q.row_overrides("x:optimizer.lr=3e-3;optimizer.name=adamw") == ["optimizer.lr=3e-3", "optimizer.name=adamw"]
    with pytest.raises(SystemExit, match="unknown row 'nope'"):
        q.row_overrides("nope")
    grid = "lever_ns+optimizer.poet_lr=5e-3"  # a named row with one more override, which wins
    assert q.row_overrides(grid) == q.ROWS["lever_ns"] + ["optimizer.poet_lr=5e-3"]
    assert load_config(path, q.row_overrides(grid)).optimizer.poet_lr == 5e-3
    assert q.row_name(grid) == "lever_ns_poet_lr5e-3" and q.row_name("x:optimizer.lr=1") == "x"
    with pytest.raises(SystemExit, match="'poet_lr' is not key=value"):
        q.row_overrides("lever_ns+poet_lr")


def test_quality_refuses_a_row_whose_folder_already_holds_a_run(tmp_path):
    """A row whose folder holds an earlier run would stop at its checkpoints while its old metrics stood in the
    table as a new result: the call must stop before anything runs, naming the folder."""
    q = _bench_module("quality")
    (tmp_path / "adamw_1e-3").mkdir()
    (tmp_path / "adamw_1e-3" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit, match=r"adamw_1e-3 already holds a run"):
        q.main(["--rows", "lever_ns,adamw_1e-3", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adamw_1e-3"]  # nothing was started


def test_run_spectra_reads_the_initial_and_the_checkpointed_weights(uninterrupted):
    """benchmarks/run_spectra.py (the spectrum column of RESULTS.md): its step-0 and final singular values
    against float64 SVDs of the effective kernels of the rebuilt model and of the restored last checkpoint,
    and its largest relative change against one computed from those."""
    import numpy as np

    from poetjax.checkpoint import Checkpointer
    from poetjax.diagnostics import linear_kernels
    from poetjax.testing import assert_close
    from poetjax.train import steps as core
    from poetjax.train.optimizers import make_optimizer

    rs = _bench_module("run_spectra")
    spectra = rs.run_spectra(uninterrupted.run_dir)
    cfg = load_config(os.path.join(uninterrupted.run_dir, "config.yaml"))
    graphdef, like = core.init_state(core.build_model(cfg), make_optimizer(cfg), core.run_keys(cfg.seed)[2])
    with Checkpointer(uninterrupted.checkpoint_dir) as ckpt:
        state, _ = ckpt.restore(ckpt.latest_step(), like)
    kernels = {"init": linear_kernels(core.build_model(cfg)),
               "final": linear_kernels(nnx.merge(graphdef, state.params, state.frozen))}
    names = sorted(k for k in kernels["init"] if "lm_head" not in k)
    assert names and sorted(spectra) == sorted(f"{when}/{k}" for when in kernels for k in names)
    ref = {f"{when}/{k}": np.linalg.svd(np.asarray(kernels[when][k], np.float64), compute_uv=False)
           for when in kernels for k in names}
    for key, s in ref.items():
        assert_close(spectra[key], s, np.float32, what=key)
    change = max(np.max(np.abs(ref[f"final/{k}"] - ref[f"init/{k}"]) / ref[f"init/{k}"]) for k in names)
    assert rs.largest_change(spectra) == pytest.approx(change, rel=0.01)
    assert 0 < change < 0.05  # POET keeps the spectrum up to the Cayley–Neumann truncation
