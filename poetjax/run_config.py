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

from poetjax.config import VARIANTS, ExecConfig, POETConfig
from poetjax.models.llama import LlamaConfig
from poetjax.run_sections import (CheckpointConfig, DataConfig, LoggingConfig, MeshConfig, OptimizerConfig,
                                  ScheduleConfig, TrainConfig, require)


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A training run. Outputs go to ``<out_dir>/<name>/``."""

    name: str = "default"
    seed: int = 0
    out_dir: str = "runs"
    model: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    # The default job's small model takes smaller blocks and merges more often than POETConfig's defaults, and a run
    # picks its compute by backend ("auto": the weight form with one CPU device, POET-X's activations otherwise).
    poet: POETConfig = dataclasses.field(default_factory=lambda: POETConfig(block_size=32, merge_interval=100,
                                                                          exec=ExecConfig(compute="auto")))
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    def __post_init__(self):
        require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
               f"name must be a plain directory name, got name={self.name!r}")
        m, p = self.model, self.poet
        if self.data.seq_len > m.max_seq_len:
            raise ConfigError(f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
        if self.optimizer.name == "poet":
            kv = m.kv_heads * m.head_dim  # k_proj/v_proj's out-dimension
            smallest = min(m.hidden_size, m.intermediate_size, kv)
            if p.block_size > smallest:
                raise ConfigError(
                    f"poet.block_size={p.block_size} does not fit the model: it must be <= every projection "
                    f"dimension (model.hidden_size={m.hidden_size}, model.intermediate_size={m.intermediate_size}"
                    + (f", key/value width model.num_kv_heads x head dim = {kv})" if kv < m.hidden_size else ")"))
            if p.quantized:  # every projection's padded in-dimension must split into whole groups
                for what, dim in (("model.hidden_size", m.hidden_size), ("model.intermediate_size", m.intermediate_size)):
                    padded = -(-dim // p.block_size) * p.block_size
                    if padded % p.quant_group_size:
                        raise ConfigError(
                            f"poet.quant_group_size={p.quant_group_size} does not divide {what}={dim} "
                            f"(padded to {padded} by poet.block_size={p.block_size}); a uint8 base needs whole groups")
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
        if self.optimizer.name == "poet" and self.optimizer.generator_update == "ns" and p.cayley != "exact":
            # Newton–Schulz steps keep every generator's angle large; the series shrinks such rotations and each
            # merge bakes that into W0 (largest σ change 0.408 at poet_lr 2e-2, RESULTS.md "Generator levers")
            raise ConfigError(f"optimizer.generator_update=ns needs poet.cayley=exact (got poet.cayley="
                              f"{p.cayley!r}): with the series, merges move the singular values")
        if m.init_from and self.optimizer.name == "poet" and p.init != "keep":
            raise ConfigError(f"poet.init={p.init!r} would replace the weights of model.init_from="
                              f"{m.init_from!r}; use poet.init=keep to start POET from the loaded model")

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


# Keys of earlier versions: where they live now (None: removed, with the reason).
_POET_KEYS = ("block_size", "merge_interval", "num_terms", "cayley", "init", "quant_group_size", "perm_chunk")
_EXEC_KEYS = ("impl", "compute", "cayley_precision", "cayley_scope")
MOVED: dict[str, str | None] = {
    **{f"optimizer.{k}": f"poet.{k}" for k in _POET_KEYS},
    **{f"optimizer.{k}": f"poet.exec.{k}" for k in _EXEC_KEYS},
    "optimizer.variant": "poet.family (bs | fs), poet.memory (fast | mem) and poet.base (float | uint8): "
                         "variant=mem is poet.memory=mem, fs is poet.family=fs, xq is poet.base=uint8, "
                         "xq_mem is poet.memory=mem poet.base=uint8",
    "optimizer.layout": None,
}
_REMOVED_WHY = {"optimizer.layout": "the activation layout follows from poet.exec.impl and poet.perm_chunk"}


def _unknown_key(key: str, valid: Sequence[str]) -> ConfigError:
    if key in MOVED:
        where = MOVED[key]
        if where is None:
            return ConfigError(f"config key '{key}' was removed: {_REMOVED_WHY[key]}")
        return ConfigError(f"config key '{key}' has moved: use {where}")
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f"; did you mean '{(prefix + '.' if prefix else '') + close[0]}'?" if close else ""
    where = f"'{prefix}'" if prefix else "the top level"
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys in {where}: {', '.join(valid)})")


def _build(cls, data: dict, prefix: str, from_cli_keys: set[str], base=None):
    """``cls`` from ``data``; keys ``data`` leaves out keep ``base``'s values (a section's default instance)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if k not in fields:
            raise _unknown_key(key, list(fields))
        tp = hints[k]
        if _is_config(tp):
            if base is not None:
                sub = getattr(base, k)
            elif fields[k].default_factory is not dataclasses.MISSING:
                sub = fields[k].default_factory()
            else:
                sub = fields[k].default
            kwargs[k] = _build(tp, v, key + ".", from_cli_keys, sub)
        else:
            kwargs[k] = _coerce(v, tp, key, key in from_cli_keys)
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
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
    return diff(_deep_merge(RunConfig().to_dict(), migrate_saved(saved)), cfg.to_dict())


def migrate_saved(saved: dict) -> dict:
    """A config dict written by an earlier version in today's layout: the POET fields of ``optimizer``
    moved to ``poet``/``poet.exec``, ``variant`` split into family/memory/base, ``layout`` dropped."""
    opt = saved.get("optimizer")
    if not isinstance(opt, dict) or not any(f"optimizer.{k}" in MOVED for k in opt):
        return saved
    opt = dict(opt)
    poet, exec_ = {}, {}
    for k in _POET_KEYS:
        if k in opt:
            poet[k] = opt.pop(k)
    for k in _EXEC_KEYS:
        if k in opt:
            exec_[k] = opt.pop(k)
    if "variant" in opt:
        poet.update(VARIANTS[opt.pop("variant")])
    opt.pop("layout", None)
    return {**saved, "optimizer": opt, "poet": {**poet, "exec": exec_}}


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
