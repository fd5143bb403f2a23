"""The whole training run as frozen, typed dataclasses; YAML files and dotted CLI overrides.

A field name equals its YAML key and its dotted CLI path: ``optimizer.block_size: 128`` in a file is
``optimizer.block_size=128`` on the command line. The dataclass defaults *are* the default job
(``python train.py`` with no arguments). A YAML file holds only overrides; ``base: other.yaml`` (a path
relative to the file) pulls in another file first, so a model-size file can sit on top of a shared
recipe. Everything is validated while the config is built — an unknown key, a value of the wrong type or
out of range, or fields that do not fit together (a POET block larger than the hidden size) — so bad
input fails before any data is read or any array is allocated.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from typing import Any, Sequence

import yaml

from poetjax.config import CAYLEY_MAPS, INIT_SCHEMES, VARIANTS, POETConfig
from poetjax.data.sources import ENCODING_ERRORS
from poetjax.models.llama import LlamaConfig

OPTIMIZERS = ("poet", "adamw", "muon")
MOMENT_DTYPES = ("float32", "bfloat16")
PROGRESS_MODES = ("auto", "bar", "lines", "none")
DISTRIBUTED_MODES = ("auto", "on", "off")


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from (see ``poetjax.data``).

    source:         a text file, a folder of text files (``.txt``/``.txt.xz``; ``train.*`` and ``valid.*``
                    files, if present, are the two splits — the shipped corpus and the Gutenberg format),
                    or ``tfds:NAME[/CONFIG]`` (needs tensorflow-datasets; only ``prepare`` uses it).
                    Relative paths are looked up from the working directory, then from the repository root.
    tokenizer:      "bpe" trains a byte-level BPE on the train split (saved beside the shards), or a path
                    to a ``tokenizer.json`` (HF tokenizers) or a SentencePiece ``.model``.
    vocab_size:     size of the trained BPE; 0 means model.vocab_size.
    seq_len:        tokens per training sequence (each sample holds seq_len + 1 tokens).
    valid_fraction: share of the text held out for validation when the source has no valid split.
    cache_dir:      where prepared shards are cached, keyed by content and tokenizer settings.
    max_chars:      read at most this many characters per split (0 = all); for quick experiments.
    encoding_errors: bytes of a local text file that are not UTF-8: "strict" stops with an error naming the
                    file and the byte offset, "replace" reads each as U+FFFD (part of the cache key).
    tfds_*:         the TFDS data_dir, split names and text feature of a ``tfds:`` source.
    """

    source: str = "data/tinyshakespeare"
    tokenizer: str = "bpe"
    vocab_size: int = 0
    seq_len: int = 128
    valid_fraction: float = 0.1
    cache_dir: str = "data/cache"
    max_chars: int = 0
    encoding_errors: str = "strict"
    tfds_data_dir: str = ""
    tfds_train_split: str = "train"
    tfds_valid_split: str = "validation"
    tfds_text_key: str = "text"

    def __post_init__(self):
        _check(bool(self.source), "source must not be empty")
        _check(bool(self.tokenizer), "tokenizer must not be empty")
        _check(self.vocab_size >= 0, f"vocab_size must be >= 0, got vocab_size={self.vocab_size!r}")
        _check(self.seq_len > 0, f"seq_len must be > 0, got seq_len={self.seq_len!r}")
        _check(0.0 < self.valid_fraction < 1.0, f"valid_fraction must be in (0, 1), got {self.valid_fraction!r}")
        _check(self.max_chars >= 0, f"max_chars must be >= 0, got max_chars={self.max_chars!r}")
        _check(self.encoding_errors in ENCODING_ERRORS,
               f"encoding_errors must be one of {ENCODING_ERRORS}, got encoding_errors={self.encoding_errors!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer choice and its hyperparameters.

    name:           "poet" (POET-X generators + AdamW on the rest), "adamw" or "muon" (baselines: the
                    same model, every Linear trained directly).
    lr:             peak learning rate of all directly trained parameters (embedding, norms, lm_head; for
                    adamw every parameter; for muon the Adam-trained ones).
    poet_lr:        peak learning rate of the POET generators (before poet_scale).
    muon_lr:        peak learning rate of muon's hidden 2-D matrices.
    weight_decay:   decoupled weight decay of ≥2-D directly trained parameters.
    max_grad_norm:  global-norm clipping threshold (0 = off); for poet with the post-merge warm-up.
    generator_moment_dtype: storage of the generators' Adam moments ("float32" | "bfloat16": half the
                    generators' optimizer state; the update itself is computed in float32 either way).
    clip_warmup_steps: steps during which poet ramps the clip threshold after each merge (spec §7.3).
    block_size … poet_scale, impl, layout, compute, cayley_precision, cayley_scope, perm_chunk: the POET fields, mapped onto ``poetjax.POETConfig`` (block_size may be a
                    fraction of each dimension for variant "fs"; impl "auto" | "xla" | "pallas"; variant
                    "xq"/"xq_mem" is POET-XQ, with W0 in uint8 groups of quant_group_size).
    """

    name: str = "poet"
    lr: float = 1e-2
    poet_lr: float = 1e-2
    muon_lr: float = 0.02
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    clip_warmup_steps: int = 2000
    block_size: int | float = 32
    merge_interval: int = 100
    variant: str = "fast"
    num_terms: int = 3
    cayley: str = "neumann"
    cayley_precision: str = "default"
    init: str = "normalized"
    poet_scale: float = 0.5
    impl: str = "auto"
    layout: str = "auto"
    cayley_scope: str = "auto"
    compute: str = "activations"
    quant_group_size: int = 256
    perm_chunk: int = 1
    generator_moment_dtype: str = "float32"

    def __post_init__(self):
        _check(self.name in OPTIMIZERS, f"name must be one of {OPTIMIZERS}, got name={self.name!r}")
        for f in ("lr", "poet_lr", "muon_lr"):
            _check(getattr(self, f) > 0, f"{f} must be > 0, got {f}={getattr(self, f)!r}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm!r}")
        _check(self.clip_warmup_steps >= 0, f"clip_warmup_steps must be >= 0, got {self.clip_warmup_steps!r}")
        _check(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got variant={self.variant!r}")
        _check(self.cayley in CAYLEY_MAPS, f"cayley must be one of {CAYLEY_MAPS}, got cayley={self.cayley!r}")
        _check(self.init in INIT_SCHEMES, f"init must be one of {INIT_SCHEMES}, got init={self.init!r}")
        _check(self.generator_moment_dtype in MOMENT_DTYPES, f"generator_moment_dtype must be one of "
               f"{MOMENT_DTYPES}, got generator_moment_dtype={self.generator_moment_dtype!r}")
        self.poet_config()  # POETConfig validates the remaining POET fields

    def poet_config(self, init_std: float = 0.02) -> POETConfig:
        return POETConfig(block_size=self.block_size, merge_interval=self.merge_interval, variant=self.variant,
                          num_terms=self.num_terms, cayley=self.cayley, cayley_precision=self.cayley_precision,
                          init=self.init, init_std=init_std,
                          poet_scale=self.poet_scale, b1=self.b1, b2=self.b2, eps=self.eps, impl=self.impl,
                          layout=self.layout, cayley_scope=self.cayley_scope, compute=self.compute,
                          quant_group_size=self.quant_group_size, perm_chunk=self.perm_chunk)


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup from 0, then cosine decay to min_lr_ratio × peak at train.steps (spec §7.2)."""

    warmup_steps: int = 50
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop.

    steps:         optimizer steps of the whole run (the schedule's horizon).
    batch_size:    sequences per optimizer step (global).
    microbatches:  split each batch into this many gradient-accumulation chunks (same update).
    eval_interval: steps between validation runs (0 = only at the end).
    eval_batches:  batches per periodic validation (0 = the whole split); the final one uses the whole split.
    log_interval:  steps between metric lines (and between host syncs).
    stop_after:    stop (with a checkpoint) once this step is reached, as a preempted job would (0 = run
                   to ``steps``); resuming then continues the same run.
    compilation_cache: JAX's persistent compilation cache folder: ``auto`` ($POETJAX_COMPILATION_CACHE, else
                   the user's cache folder, ``poetjax.train.xla_cache``), ``off``, or a folder.
    """

    steps: int = 640
    batch_size: int = 8
    microbatches: int = 1
    eval_interval: int = 160
    eval_batches: int = 0
    log_interval: int = 10
    stop_after: int = 0
    compilation_cache: str = "auto"

    def __post_init__(self):
        for f in ("steps", "batch_size", "microbatches", "log_interval"):
            _check(getattr(self, f) > 0, f"{f} must be > 0, got {f}={getattr(self, f)!r}")
        for f in ("eval_interval", "eval_batches", "stop_after"):
            _check(getattr(self, f) >= 0, f"{f} must be >= 0, got {f}={getattr(self, f)!r}")
        _check(self.batch_size % self.microbatches == 0,
               f"batch_size={self.batch_size} is not divisible by microbatches={self.microbatches}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in ``<run dir>/checkpoints`` (or ``dir``).

    interval:    steps between checkpoints (0 = only the final one).
    keep:        newest checkpoints kept on disk.
    resume:      continue from the newest checkpoint of the run directory when there is one.
    resume_step: resume from this step instead of the newest (0 = newest).
    async_save:  write in a background thread (the run waits for it before exiting).
    """

    interval: int = 320
    keep: int = 3
    resume: bool = True
    resume_step: int = 0
    async_save: bool = False
    dir: str = ""

    def __post_init__(self):
        _check(self.interval >= 0, f"interval must be >= 0, got interval={self.interval!r}")
        _check(self.keep > 0, f"keep must be > 0, got keep={self.keep!r}")
        _check(self.resume_step >= 0, f"resume_step must be >= 0, got resume_step={self.resume_step!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How the run uses devices (``poetjax.distributed``; README "Several devices and hosts").

    data:           data-parallel replicas; -1 = every device that fsdp leaves.
    fsdp:           shards of the frozen W0s and of big trainable leaves with their optimizer state; -1 =
                    every device that data leaves. The batch is split over data × fsdp devices, so
                    train.batch_size must be divisible by (data × fsdp × train.microbatches).
    min_shard_size: trainable leaves with fewer entries stay replicated under fsdp (POET's generators
                    always do: they are the all-reduced, data-parallel part).
    distributed:    "auto": start JAX's multi-process runtime (``jax.distributed.initialize``) when
                    JAX_COORDINATOR_ADDRESS is set; "on": always (cluster auto-detection, e.g. SLURM);
                    "off": never.
    """

    data: int = -1
    fsdp: int = 1
    min_shard_size: int = 1 << 16
    distributed: str = "auto"

    def __post_init__(self):
        for f in ("data", "fsdp"):
            v = getattr(self, f)
            _check(v == -1 or v > 0, f"{f} must be a positive number of devices or -1 (the rest), got {f}={v!r}")
        _check(not (self.data == -1 and self.fsdp == -1), "at most one of data and fsdp may be -1 (the rest)")
        _check(self.min_shard_size >= 0, f"min_shard_size must be >= 0, got {self.min_shard_size!r}")
        _check(self.distributed in DISTRIBUTED_MODES,
               f"distributed must be one of {DISTRIBUTED_MODES}, got distributed={self.distributed!r}")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """progress: "bar" (one self-updating stderr line), "lines" (a line per log interval), "none", or
    "auto" (bar on a terminal, lines otherwise). plot: write curves.png at the end.

    diagnostics_interval: steps between spectral diagnostics written to metrics.jsonl (0 = off): per
                    linear layer the SVD entropy, spectral norm, sampled singular values, spectral drift
                    since step 0, and for POET layers the orthogonality errors, the drift since the last
                    merge and the phase-probe cosines (``poetjax.diagnostics``), plus a summary per
                    projection type. Also written at step 0 of a fresh run. Each record costs one SVD
                    per weight matrix (and per POET base W0).
    diagnostics_budget: the largest share of the training loop's time the diagnostics may take (0 = no
                    limit): when a record cost more than this share of the time since the previous one, the
                    next comes after the smallest multiple of diagnostics_interval that keeps to it. The
                    run's timing record logs the share it got ("diagnostics_share").
    """

    progress: str = "auto"
    plot: bool = True
    diagnostics_interval: int = 100
    diagnostics_budget: float = 0.03

    def __post_init__(self):
        _check(self.progress in PROGRESS_MODES, f"progress must be one of {PROGRESS_MODES}, got {self.progress!r}")
        _check(self.diagnostics_interval >= 0,
               f"diagnostics_interval must be >= 0 (0 = off), got diagnostics_interval={self.diagnostics_interval!r}")
        _check(0 <= self.diagnostics_budget < 1,
               f"diagnostics_budget must be in [0, 1) (0 = no limit), got diagnostics_budget={self.diagnostics_budget!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run. Outputs go to ``<out_dir>/<name>/``."""

    name: str = "default"
    seed: int = 0
    out_dir: str = "runs"
    model: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
               f"name must be a plain directory name, got name={self.name!r}")
        m, o = self.model, self.optimizer
        if self.data.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if o.name == "poet":
            kv = m.kv_heads * m.head_dim  # k_proj/v_proj's out-dimension
            smallest = min(m.hidden_size, m.intermediate_size, kv)
            if o.block_size > smallest:
                raise ConfigError(
                    f"optimizer.block_size={o.block_size} does not fit the model: it must be <= every projection "
                    f"dimension (model.hidden_size={m.hidden_size}, model.intermediate_size={m.intermediate_size}"
                    + (f", key/value width model.num_kv_heads x head dim = {kv})" if kv < m.hidden_size else ")"))
            if self.poet.quantized:  # every projection's padded in-dimension must split into whole groups
                for what, dim in (("model.hidden_size", m.hidden_size), ("model.intermediate_size", m.intermediate_size)):
                    padded = -(-dim // o.block_size) * o.block_size
                    if padded % o.quant_group_size:
                        raise ConfigError(
                            f"optimizer.quant_group_size={o.quant_group_size} does not divide {what}={dim} "
                            f"(padded to {padded} by optimizer.block_size={o.block_size}); POET-XQ needs whole groups")
        if self.schedule.warmup_steps > self.train.steps:
            raise ConfigError(f"schedule.warmup_steps={self.schedule.warmup_steps} exceeds "
                              f"train.steps={self.train.steps}")
        if self.mesh.data > 0 and self.mesh.fsdp > 0:
            shards = self.mesh.data * self.mesh.fsdp * self.train.microbatches
            if self.train.batch_size % shards:
                raise ConfigError(f"train.batch_size={self.train.batch_size} is not divisible by mesh.data="
                                  f"{self.mesh.data} x mesh.fsdp={self.mesh.fsdp} x train.microbatches="
                                  f"{self.train.microbatches} = {shards}")
        if self.data.vocab_size > m.vocab_size:
            raise ConfigError(f"data.vocab_size={self.data.vocab_size} exceeds model.vocab_size={m.vocab_size}")
        if m.init_from and o.name == "poet" and o.init != "keep":
            raise ConfigError(f"optimizer.init={o.init!r} would replace the weights of model.init_from="
                              f"{m.init_from!r}; use optimizer.init=keep to start POET from the loaded model")

    @property
    def poet(self) -> POETConfig:
        return self.optimizer.poet_config(init_std=self.model.init_std)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------------
# building from nested dicts, with type checks that name the key

def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _coerce(value: Any, tp: Any, key: str, from_cli: bool) -> Any:
    """``value`` as type ``tp``; CLI values arrive as strings and are parsed by the target type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (from_cli and isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        errors = []
        for arg in args:  # first member type that accepts the value (int | float: 256 → int, 0.5 → float)
            try:
                return _coerce(value, arg, key, from_cli)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1])
    if origin is tuple:
        (elem, *_rest) = typing.get_args(tp)
        if from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, elem, key, from_cli) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r} (quote it in YAML)")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _unknown_key(key: str, valid: Sequence[str]) -> ConfigError:
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
    where = f"'{prefix}'" if prefix else "the top level"
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys in {where}: {', '.join(valid)})")


def _build(cls, data: dict, prefix: str, from_cli_keys: set[str]):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(key, names)
        tp = hints[k]
        if _is_config(tp):
            kwargs[k] = _build(tp, v, key + ".", from_cli_keys)
        else:
            kwargs[k] = _coerce(v, tp, key, key in from_cli_keys)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        section = prefix.rstrip(".") or "config"
        raise ConfigError(f"{section}: {e}") from None


# ----------------------------------------------------------------------------------------------------
# YAML files and overrides

def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """The override dict of ``path`` with its ``base:`` chain applied (bases first)."""
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"config files include each other in a cycle: {' -> '.join(_seen + (real,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a file name, got {base!r}")
    base_path = os.path.join(os.path.dirname(path), base)
    return _deep_merge(load_yaml(base_path, _seen + (real,)), data)


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["a.b=1", ...]`` → nested dict of raw strings."""
    out: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optimizer.lr=1e-3)")
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def _dotted_keys(d: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in d.items():
        if isinstance(v, dict):
            keys |= _dotted_keys(v, f"{prefix}{k}.")
        else:
            keys.add(f"{prefix}{k}")
    return keys


def from_dict(data: dict, cli_keys: set[str] | None = None) -> RunConfig:
    return _build(RunConfig, data, "", cli_keys or set())


def _hf_defaults(data: dict) -> dict:
    """``data`` with what ``model.init_from=hf:DIR`` implies: the model's shape fields (and max_seq_len) from
    DIR/config.json, and DIR/tokenizer.json as data.tokenizer, where the config does not set them. A shape
    field set to another value than the checkpoint's is an error (the weights could not load)."""
    model = data.get("model")
    init_from = model.get("init_from") if isinstance(model, dict) else None
    if not (isinstance(init_from, str) and init_from.startswith("hf:") and init_from != "hf:"):
        return data  # no checkpoint (a malformed value is reported by LlamaConfig)
    from poetjax.models import hf

    folder = init_from[3:]
    try:
        fields = hf.config_fields(folder)
    except hf.HFError as e:
        raise ConfigError(f"model.init_from={init_from!r}: {e}") from None
    out = _deep_merge(data, {"model": {**fields, **model}})
    tokenizer_json = os.path.join(folder, "tokenizer.json")
    if "tokenizer" not in (data.get("data") or {}) and os.path.isfile(tokenizer_json):
        out = _deep_merge(out, {"data": {"tokenizer": tokenizer_json}})
    return out


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config: dataclass defaults ← YAML file (with its bases) ← ``key=value`` overrides; with
    ``model.init_from=hf:DIR``, the model's shape from DIR/config.json (``_hf_defaults``)."""
    data = load_yaml(path) if path else {}
    cli = parse_overrides(overrides)
    cfg = from_dict(_hf_defaults(_deep_merge(data, cli)), _dotted_keys(cli))
    if cfg.model.init_from:
        from poetjax.models import hf
        from poetjax.models.llama import LlamaConfig

        folder = cfg.model.init_from[3:]
        bad = hf.shape_diff(cfg.model, LlamaConfig(**hf.config_fields(folder)))
        if bad:
            name, ours, theirs = bad[0]
            raise ConfigError(f"model.{name}={ours!r} does not match the checkpoint of model.init_from="
                              f"{cfg.model.init_from!r} ({theirs!r} in {os.path.join(folder, hf.CONFIG)}); "
                              f"leave model.{name} unset to take it from there")
    return cfg


def diff_saved(saved: dict, cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """``diff`` of a checkpoint's saved config against ``cfg``. A key the saved config lacks was added to
    the dataclasses after the checkpoint was written, which then computed what its default does, so it
    counts as its default."""
    return diff(_deep_merge(RunConfig().to_dict(), saved), cfg.to_dict())


def diff(a: dict, b: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a value, b value) for every leaf that differs."""
    out = []
    for k in sorted(set(a) | set(b), key=str):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append((f"{prefix}{k}", va, vb))
    return out
