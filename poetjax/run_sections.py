"""The sections of a run config other than the model and POET (``poetjax.run_config.RunConfig`` holds them):
data, optimizer, schedule, train loop, checkpoints, mesh and logging. Frozen, typed, checked when built."""

from __future__ import annotations

import dataclasses

from poetjax.data.sources import ENCODING_ERRORS
from poetjax.lie import GENERATOR_UPDATES

OPTIMIZERS = ("poet", "adamw", "muon")
MOMENT_DTYPES = ("float32", "bfloat16")
PROGRESS_MODES = ("auto", "bar", "lines", "none")
DISTRIBUTED_MODES = ("auto", "on", "off")


def require(cond: bool, msg: str):
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
        require(bool(self.source), "source must not be empty")
        require(bool(self.tokenizer), "tokenizer must not be empty")
        require(self.vocab_size >= 0, f"vocab_size must be >= 0, got vocab_size={self.vocab_size!r}")
        require(self.seq_len > 0, f"seq_len must be > 0, got seq_len={self.seq_len!r}")
        require(0.0 < self.valid_fraction < 1.0, f"valid_fraction must be in (0, 1), got {self.valid_fraction!r}")
        require(self.max_chars >= 0, f"max_chars must be >= 0, got max_chars={self.max_chars!r}")
        require(self.encoding_errors in ENCODING_ERRORS,
               f"encoding_errors must be one of {ENCODING_ERRORS}, got encoding_errors={self.encoding_errors!r}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer choice and its hyperparameters (the POET reparameterization itself is the ``poet`` section).

    name:           "poet" (POET-X generators + AdamW on the rest), "adamw" or "muon" (baselines: the
                    same model, every Linear trained directly).
    lr:             peak learning rate of all directly trained parameters (embedding, norms, lm_head; for
                    adamw every parameter; for muon the Adam-trained ones).
    poet_lr:        peak learning rate of the POET generators (before poet_scale).
    poet_scale:     multiplier of the generators' learning rate (reference default 0.5).
    muon_lr:        peak learning rate of muon's hidden 2-D matrices.
    weight_decay:   decoupled weight decay of ≥2-D directly trained parameters.
    b1, b2, eps:    Adam constants of every Adam in the run (POET's eps is added to sqrt(v) before bias
                    correction, as the reference does).
    max_grad_norm:  global-norm clipping threshold (0 = off); for poet with the post-merge warm-up.
    clip_warmup_steps: steps during which poet ramps the clip threshold after each merge (spec §7.3).
    generator_moment_dtype: storage of the generators' Adam moments ("float32" | "bfloat16": half the
                    generators' optimizer state; the update itself is computed in float32 either way).
    generator_update: the generators' rule (``poetjax.lie``): "adam" (POETAdamW), "momentum" (Nesterov
                    momentum in the Lie algebra) or "ns" (that momentum Newton–Schulz-orthogonalized per
                    block, Muon-style: poet_lr × poet_scale is then each step's rotation angle).
    generator_momentum: the momentum coefficient of "momentum" and "ns".
    carry_moment:   keep that momentum across merges, re-expressed in the new blocks (else zeroed).
    max_angle:      cap of each block's rotation angle per step, in radians (0 = no cap).
    alternate_sides: odd steps update only the input-side generators, even steps the output side.
    """

    name: str = "poet"
    lr: float = 1e-2
    poet_lr: float = 1e-2
    poet_scale: float = 0.5
    muon_lr: float = 0.02
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    max_grad_norm: float = 1.0
    clip_warmup_steps: int = 2000
    generator_moment_dtype: str = "float32"
    generator_update: str = "adam"
    generator_momentum: float = 0.95
    carry_moment: bool = False
    max_angle: float = 0.0
    alternate_sides: bool = False

    def __post_init__(self):
        require(self.name in OPTIMIZERS, f"name must be one of {OPTIMIZERS}, got name={self.name!r}")
        for f in ("lr", "poet_lr", "poet_scale", "muon_lr", "eps"):
            require(getattr(self, f) > 0, f"{f} must be > 0, got {f}={getattr(self, f)!r}")
        for f in ("b1", "b2"):
            require(0.0 <= getattr(self, f) < 1.0, f"{f} must be in [0, 1), got {f}={getattr(self, f)!r}")
        require(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        require(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 = off), got {self.max_grad_norm!r}")
        require(self.clip_warmup_steps >= 0, f"clip_warmup_steps must be >= 0, got {self.clip_warmup_steps!r}")
        require(self.generator_moment_dtype in MOMENT_DTYPES, f"generator_moment_dtype must be one of "
               f"{MOMENT_DTYPES}, got generator_moment_dtype={self.generator_moment_dtype!r}")
        require(self.generator_update in GENERATOR_UPDATES, f"generator_update must be one of {GENERATOR_UPDATES}, "
                f"got generator_update={self.generator_update!r}")
        require(0.0 <= self.generator_momentum < 1.0,
                f"generator_momentum must be in [0, 1), got generator_momentum={self.generator_momentum!r}")
        require(not (self.carry_moment and self.generator_update == "adam"),
                "carry_moment keeps the momentum of generator_update=momentum or ns, not of adam")
        require(self.max_angle >= 0, f"max_angle must be >= 0 (0 = no cap), got max_angle={self.max_angle!r}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup from 0, then cosine decay to min_lr_ratio × peak at train.steps (spec §7.2)."""

    warmup_steps: int = 50
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        require(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")


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
            require(getattr(self, f) > 0, f"{f} must be > 0, got {f}={getattr(self, f)!r}")
        for f in ("eval_interval", "eval_batches", "stop_after"):
            require(getattr(self, f) >= 0, f"{f} must be >= 0, got {f}={getattr(self, f)!r}")
        require(self.batch_size % self.microbatches == 0,
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
        require(self.interval >= 0, f"interval must be >= 0, got interval={self.interval!r}")
        require(self.keep > 0, f"keep must be > 0, got keep={self.keep!r}")
        require(self.resume_step >= 0, f"resume_step must be >= 0, got resume_step={self.resume_step!r}")


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
            require(v == -1 or v > 0, f"{f} must be a positive number of devices or -1 (the rest), got {f}={v!r}")
        require(not (self.data == -1 and self.fsdp == -1), "at most one of data and fsdp may be -1 (the rest)")
        require(self.min_shard_size >= 0, f"min_shard_size must be >= 0, got {self.min_shard_size!r}")
        require(self.distributed in DISTRIBUTED_MODES,
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
        require(self.progress in PROGRESS_MODES, f"progress must be one of {PROGRESS_MODES}, got {self.progress!r}")
        require(self.diagnostics_interval >= 0,
               f"diagnostics_interval must be >= 0 (0 = off), got diagnostics_interval={self.diagnostics_interval!r}")
        require(0 <= self.diagnostics_budget < 1,
               f"diagnostics_budget must be in [0, 1) (0 = no limit), got diagnostics_budget={self.diagnostics_budget!r}")
