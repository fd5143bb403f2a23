"""The main job: data → model → jitted steps → loop with merges, evaluation, checkpoints and logs.

Outputs in ``<out_dir>/<name>/``: ``config.yaml`` (the resolved config), ``metrics.jsonl`` (one line per
log interval, and one before the first merge: step, loss, grad_norm, lr, tokens_per_s; one per evaluation:
val_loss, val_ppl; one per ``logging.diagnostics_interval``: "diagnostics", see
``poetjax.diagnostics.diagnostics_record``), ``curves.png``, ``summary.json`` and ``checkpoints/<step>/``.
tokens_per_s and the progress line's rate leave out compilation: the first step's and the first merge's.

Where the time before training goes: one ``{"kind": "timing", ...}`` line at the end of each invocation
(also ``summary.json``'s "timing") holds, in seconds since ``run`` began or per phase: ``data_s``
(tokenize or load the shards), ``build_s`` (model, optimizer and state on the devices; ``model_s`` of it:
building the model), ``first_step_s``, ``first_merge_s``, ``first_eval_s`` and ``first_diagnostics_s`` (each
program's first call: the wait for its compile or cache load, all started together by
``poetjax.train.ahead``, plus one run), ``to_first_step_s`` (from ``run``'s start to the first completed
step), ``later_merges`` and ``later_merge_max_s`` (the merges after the first, each timed on its own),
``diagnostics_calls``, ``diagnostics_s`` and ``diagnostics_share`` (the records after step 0's and their share
of the loop's time after the first step), ``compile_<name>_s`` and ``ready_<name>_s`` (each program compiled
ahead, ``train``, ``diagnostics``, ``merge``, ``eval``: its lowering and compile seconds, and the seconds from
``run``'s start until it was ready; the programs compile while the state is built, ``init``, the state's own
program, first) and ``total_s``; a program that did not run is left out.
``compilation_cache`` names the folder of JAX's persistent cache (``poetjax.train.xla_cache``), or is null
when it is off.

Diagnostics are taken after the optimizer step and before a merge due at the same step, so the
orthogonality errors and the drift since the last merge show the rotations about to be folded; the
spectral drift is measured against the spectra of the step-0 model (rebuilt from the seed on resume),
and the phase probes live in the ``TrainState`` (advanced by every merge, checkpointed with it).

Host syncs happen only every ``log_interval`` steps (and before evaluations and checkpoints), so the
device runs ahead of the Python loop. A non-finite loss or gradient norm stops the run with
``TrainingDiverged`` naming the step; no checkpoint is written after it, so the last good one remains.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from typing import Callable

import jax
import numpy as np

from poetjax import distributed as dist
from poetjax.checkpoint import Checkpointer, CheckpointError
from poetjax.data import BatchSampler, eval_windows, prepare_from_config, unigram_perplexity
from poetjax.diagnostics import diagnostics_record
from poetjax.run_config import ConfigError, RunConfig, diff_saved
from poetjax.surgery import EXCLUDE
from poetjax.train import sharded, steps as core
from poetjax.train.ahead import RARE_OPTIONS, Ahead, train_options
from poetjax.train.monitor import MetricsLog, Progress, Stopwatch, plot_curves
from poetjax.train.optimizers import lr_schedules, make_optimizer
from poetjax.train.signals import StopSignals
from poetjax.train.xla_cache import use_compilation_cache

# Keys that may differ between a checkpoint's config and the resuming config: bookkeeping, where files
# go, and implementation choices (remat, attention kernel, the device mesh) that compute the same
# function. train.steps moves the schedule's horizon, which is reported.
RESUME_FREE_KEYS = ("name", "out_dir", "train.steps", "train.eval_interval", "train.eval_batches", "data.cache_dir",
                    "train.compilation_cache",
                    "model.remat", "model.attention", "poet.exec.", "mesh", "mesh.",
                    "train.log_interval", "train.stop_after", "checkpoint.", "logging.")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the message names the step and the last checkpoint."""


@dataclasses.dataclass
class RunResult:
    run_dir: str
    step: int
    completed: bool                # False when stopped by train.stop_after or a signal (no final evaluation)
    val_loss: float | None
    val_ppl: float | None
    unigram_ppl: float
    losses: dict[int, float]       # step -> training loss, this invocation's steps
    metrics_path: str
    plot_path: str | None
    checkpoint_dir: str
    stopped_by: int | None = None  # the SIGTERM/SIGINT that stopped the run (with a checkpoint of `step`)


def check_resume_compatible(meta: dict, cfg: RunConfig, data_meta: dict, where: str) -> list[str]:
    """Raise CheckpointError if the checkpoint was written by a different run; return notes for allowed changes.

    A key that the checkpoint's config lacks (a field added since) counts as its default (``diff_saved``)."""
    diffs = diff_saved(meta.get("config", {}), cfg)
    bad = [d for d in diffs if not any(d[0] == k or (k.endswith(".") and d[0].startswith(k))
                                       for k in RESUME_FREE_KEYS)]
    if bad:
        listed = "; ".join(f"{k}: {a!r} (checkpoint) vs {b!r} (now)" for k, a, b in bad[:6])
        raise CheckpointError(f"{where} was written by a different run config — {listed}. Resume with the same "
                              f"settings, or start a new run with another name=...; nothing was deleted.")
    saved = meta.get("data", {})
    if saved.get("fingerprint") != data_meta["fingerprint"] or saved.get("vocab_size") != data_meta["vocab_size"]:
        raise CheckpointError(f"{where} was trained on different data or a different tokenizer than "
                              f"data.source={cfg.data.source!r} now gives; nothing was deleted.")
    return [f"note: {k} changed from {a!r} to {b!r} since the checkpoint" for k, a, b in diffs if (k, a, b) not in bad
            and k == "train.steps"]


def checkpoint_dir(cfg: RunConfig) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.out_dir, cfg.name, "checkpoints")


def check_output_paths(cfg: RunConfig) -> None:
    """ConfigError naming the key and the path when the run directory, the checkpoint directory or the
    data cache cannot be created, or the first two cannot be written; run before anything is built. (A
    read-only data cache is fine when it already holds the shards; ``prepare`` says so when it does not.)"""
    for key, path, write in (("out_dir", os.path.join(cfg.out_dir, cfg.name), True),
                             ("checkpoint.dir" if cfg.checkpoint.dir else "out_dir", checkpoint_dir(cfg), True),
                             ("data.cache_dir", cfg.data.cache_dir, False)):
        try:
            os.makedirs(path, exist_ok=True)
            if write:
                tempfile.TemporaryFile(dir=path).close()
        except OSError as e:
            raise ConfigError(f"{key}: cannot {'write to' if os.path.isdir(path) else 'create'} {path!r} "
                              f"({e.strerror or type(e).__name__})") from None


def _param_summary(state: core.TrainState, cfg: RunConfig) -> str:
    n_params = sum(int(x.size) for x in jax.tree.leaves(state.params))
    # Base weights: "w0" (float) or POET-XQ's "w0_codes" (uint8); permutations and XQ scales excluded.
    n_frozen = sum(int(x.size) for p, x in jax.tree_util.tree_flatten_with_path(state.frozen)[0]
                   if str(getattr(p[-1], "key", p[-1])) in ("w0", "w0_codes"))
    text = f"model: LLaMA {cfg.model.num_layers}x{cfg.model.hidden_size} (ffn {cfg.model.intermediate_size}, " \
           f"{cfg.model.num_heads} heads, vocab {cfg.model.vocab_size}); trainable {n_params / 1e6:.3f}M"
    if cfg.optimizer.name == "poet":
        text += (f" (POET generators + embedding/norms/lm_head), frozen W0 {n_frozen / 1e6:.3f}M; "
                 f"{cfg.poet.label}, block {cfg.poet.block_size}, merge every {cfg.poet.merge_interval}")
    else:
        text += f"; optimizer {cfg.optimizer.name}"
    return text


def run(cfg: RunConfig, *, print_fn: Callable[[str], None] = print) -> RunResult:
    """Train as configured; resumes from the run directory's newest checkpoint when there is one.

    On a mesh of several devices (``cfg.mesh``) the steps run sharded (``poetjax.distributed``); in a
    multi-host run every process calls this, each reads its rows of every batch, and only process 0
    prints and writes the metrics, plot and summary (all of them write the checkpoints together).

    The output paths are checked first (``check_output_paths``). A SIGTERM or SIGINT in the loop stops
    the run after the step in flight with a checkpoint (``RunResult.stopped_by``); outside the loop it
    raises ``poetjax.train.signals.Interrupted`` (see that module).
    """
    t_run = time.perf_counter()
    dist.initialize_distributed(cfg.mesh.distributed)  # before anything touches a device
    check_output_paths(cfg)
    with StopSignals() as signals:  # SIGTERM/SIGINT: see poetjax.train.signals
        return _run(cfg, signals, print_fn, t_run)


def _run(cfg: RunConfig, signals: StopSignals, print_fn, t_run: float) -> RunResult:
    main = jax.process_index() == 0
    warn = (lambda s: print(s, file=sys.stderr)) if main else (lambda s: None)
    # Before anything compiles: jax opens its cache at the first compilation.
    timing = {"compilation_cache": use_compilation_cache(cfg.train.compilation_cache, warn)}
    run_dir = os.path.join(cfg.out_dir, cfg.name)
    progress = Progress(cfg.train.steps, mode=cfg.logging.progress if main else "none")
    say = progress.message if cfg.logging.progress != "none" and main else (lambda s: None)
    print_fn = print_fn if main else (lambda s: None)

    # -- data ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    data = prepare_from_config(cfg.data, cfg.model.vocab_size, log=say)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {data.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
                          f"raise model.vocab_size or use a smaller tokenizer")
    train_tokens, valid_tokens = data.tokens("train"), data.tokens("valid")
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    sampler = BatchSampler(train_tokens, batch, seq_len, cfg.seed)
    list(eval_windows(valid_tokens, batch, seq_len, max_batches=1))  # fail now if valid is too short
    unigram = unigram_perplexity(train_tokens, valid_tokens, data.vocab_size)
    timing["data_s"] = time.perf_counter() - t0
    say(f"data: {data.meta['source']}: {train_tokens.size:,} train / {valid_tokens.size:,} valid tokens, "
        f"vocab {data.vocab_size}; unigram perplexity of the valid split {unigram:.2f}")

    # -- model, optimizer, state (built in place on the device mesh) ----------------------------------
    # The state's shapes and shardings come first, by tracing only, so that the run's programs compile on
    # worker threads (poetjax.train.ahead) while the state itself is built (BENCHMARKS.md, "Time to result").
    t0 = time.perf_counter()
    tx = make_optimizer(cfg)
    mesh = dist.mesh_from_config(cfg.mesh)
    dist.check_batch(batch, mesh, cfg.train.microbatches)
    graphdef, state_spec, shardings = sharded.train_state_spec(cfg, tx, mesh)
    ckpt = Checkpointer(checkpoint_dir(cfg), keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    try:
        with Ahead(start=t_run) as ahead:
            resume = resume_point(cfg, ckpt, data, say)  # first: nothing compiles for a run that cannot go on
            # The state's own program compiles first: a compile waits for those under way (BENCHMARKS.md,
            # "Time to result"), and the state is built while the others compile.
            make_state = ahead.submit(sharded.state_program(cfg, tx, graphdef, shardings), state_spec.params,
                                      state_spec.frozen, state_spec.probe, options=RARE_OPTIONS, name="init")
            programs = submit_programs(cfg, graphdef, tx, shardings, mesh, state_spec, resume, ahead, say)
            t_model = time.perf_counter()
            model = core.build_model(cfg)
            timing["model_s"] = time.perf_counter() - t_model
            _, state, _ = sharded.init_train_state(cfg, tx, mesh, model, shardings, program=make_state)
            del model  # its arrays now live in the state
            jax.block_until_ready(state)
            timing["build_s"] = time.perf_counter() - t0
            say(_param_summary(state, cfg))
            say(dist.describe(mesh))
            return _train(cfg, run_dir, ckpt, data, sampler, unigram, state, shardings, resume, programs, progress,
                          say, print_fn, mesh, signals, t_run, timing, ahead.compiles)
    finally:
        progress.close()
        ckpt.close()


@dataclasses.dataclass
class Resume:
    start: int            # the step this invocation starts from
    stop: int             # the step it stops after
    step0: int | None     # the checkpoint step it resumes from (None: a fresh run)
    where: str = ""       # that checkpoint, in words


def resume_point(cfg: RunConfig, ckpt: Checkpointer, data, say) -> Resume:
    """Where this invocation starts and stops; a CheckpointError when the run directory's checkpoints cannot
    be resumed by ``cfg`` (before anything compiles)."""
    on_disk, step0, start, where = ckpt.steps(), None, 0, ""
    if on_disk:
        if not cfg.checkpoint.resume:
            raise CheckpointError(f"{ckpt.directory} already holds checkpoints {on_disk}; set checkpoint.resume=true "
                                  f"to continue that run or choose another name=...; nothing was deleted")
        step0 = start = cfg.checkpoint.resume_step or on_disk[-1]
        later = [s for s in on_disk if s > step0]
        if later:
            raise CheckpointError(f"checkpoint.resume_step={step0} but {ckpt.directory} also holds later steps "
                                  f"{later}; move them out of the way first (nothing was deleted)")
        where = f"checkpoint step {step0} in {ckpt.directory}"
        for note in check_resume_compatible(ckpt.read_meta(step0), cfg, data.meta, where):
            say(note)
    stop = min(cfg.train.steps, cfg.train.stop_after) if cfg.train.stop_after else cfg.train.steps
    return Resume(start, stop, step0, where)


@dataclasses.dataclass
class Programs:
    train_step: Callable
    diag_step: Callable | None   # None: diagnostics off
    ref_shapes: dict | None      # the diagnostics' reference spectra's shapes
    merge_step: Callable | None  # None: not a POET run
    eval_step: Callable
    diag_every: int


def submit_programs(cfg: RunConfig, graphdef, tx, shardings, mesh, state_spec, resume: Resume, ahead: Ahead,
                    say) -> Programs:
    """The run's programs for a state of ``state_spec``; those this invocation will call start compiling
    now, side by side (``poetjax.train.ahead``): each call waits only for its own (any other compiles at its
    first call). A resumed state has the shapes and shardings of the fresh one."""
    start, stop = resume.start, resume.stop
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    diag_every = cfg.logging.diagnostics_interval
    if diag_every and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu":
        # Several (virtual) CPU devices running the SVDs' LAPACK calls at once hung XLA's CPU runtime
        # (reproduced with mesh.data=8 on 8 virtual devices); GPUs use their own solvers.
        say("diagnostics off: not supported on a mesh of several CPU devices (logging.diagnostics_interval "
            "is ignored)")
        diag_every = 0

    def reaches(interval: int) -> bool:  # a multiple of interval among the steps this invocation runs
        return bool(interval) and stop // interval > start // interval

    poet = cfg.optimizer.name == "poet"
    tokens_sharding, weights_sharding = dist.batch_sharding(mesh), dist.batch_sharding(mesh, 1)
    tokens_spec = jax.ShapeDtypeStruct((batch, seq_len + 1), np.int32, sharding=tokens_sharding)
    train_step = sharded.make_sharded_train_step(graphdef, tx, shardings, mesh, microbatches=cfg.train.microbatches,
                                                 lr_schedule=lr_schedules(cfg)["lr"])
    if start < stop:
        train_step = ahead.submit(train_step, state_spec, tokens_spec, options=train_options(cfg.model.hidden_size),
                                  name="train")
    diag_step, ref_shapes = (core.make_diagnostics_step(graphdef), None) if diag_every else (None, None)
    if diag_every:
        ref_shapes = core.reference_shapes(diag_step, state_spec)
        diag_step.program = ahead.submit(diag_step.program, state_spec, ref_shapes, options=RARE_OPTIONS,
                                          name="diagnostics")
    merge_step = sharded.make_sharded_merge_step(graphdef, shardings, mesh) if poet else None
    if poet and reaches(cfg.poet.merge_interval):
        # first called at step merge_interval: compiled after the train step, whose compile it would slow
        # (BENCHMARKS.md, "XLA's compile options for the train step")
        merge_step = ahead.submit(merge_step, state_spec, options=RARE_OPTIONS, after=train_step, name="merge")
    eval_step = sharded.make_sharded_eval_step(graphdef, shardings, mesh)
    if stop >= cfg.train.steps or reaches(cfg.train.eval_interval):  # the final evaluation, or one on the way
        eval_step = ahead.submit(eval_step, state_spec.params, state_spec.frozen, tokens_spec,
                                 jax.ShapeDtypeStruct((batch,), np.float32, sharding=weights_sharding),
                                 options=RARE_OPTIONS, after=train_step, name="eval")
    return Programs(train_step, diag_step, ref_shapes, merge_step, eval_step, diag_every)


def _train(cfg, run_dir, ckpt, data, sampler, unigram, state, shardings, resume: Resume, programs: Programs,
           progress, say, print_fn, mesh, signals, t_run, timing, compiles: dict) -> RunResult:
    """The loop of ``run`` after data, state and programs exist: resume, step, merge, evaluate, checkpoint,
    report. ``timing`` (the setup's seconds so far) gains the first calls' and goes into the logs at the end,
    with ``compiles`` (``Ahead.compiles``)."""
    main = jax.process_index() == 0
    ckpt_dir = ckpt.directory
    valid_tokens = data.tokens("valid")
    seq_len, batch = cfg.data.seq_len, cfg.train.batch_size
    start, stop, step0, where = resume.start, resume.stop, resume.step0, resume.where
    position, resumed = 0, False
    poet = cfg.optimizer.name == "poet"
    train_step, diag_step, merge_step, eval_step = (programs.train_step, programs.diag_step, programs.merge_step,
                                                    programs.eval_step)
    diag_every, ref_shapes = programs.diag_every, programs.ref_shapes
    tokens_sharding, weights_sharding = dist.batch_sharding(mesh), dist.batch_sharding(mesh, 1)
    # The step-0 spectra come from the freshly built state: the same on a resume (built from the seed).
    t0 = time.perf_counter()
    s_ref, diag0 = core.reference_spectra(diag_step, state, ref_shapes) if diag_every else (None, None)
    if diag_every:  # the diagnostics program's first call (its compile, or the wait for it); step 0's record
        timing["first_diagnostics_s"] = time.perf_counter() - t0
    if step0 is not None:
        state, meta = ckpt.restore(step0, state, shardings=shardings)
        position, resumed = int(meta["data_position"]), True
        say(f"resumed from {where} (data position {position}, {int(meta['merges'])} merges)")
    if main:
        with open(os.path.join(run_dir, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())

    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    metrics = MetricsLog(metrics_path if main else os.devnull, resume_step=start if resumed else None)
    exclude = EXCLUDE  # layers left out of the "all" summary (lm_head: never a POET layer)

    # Diagnostics every diag_every steps, stretched to a multiple of it whenever the last call cost more than
    # logging.diagnostics_budget of the loop's time since the call before (see LoggingConfig).
    diag_cost = {"s": 0.0, "calls": 0, "next": (start // diag_every + 1) * diag_every if diag_every else 0,
                 "since": None}

    def write_diagnostics(step: int):
        t0 = time.perf_counter()
        rec = diagnostics_record(diag_step(state, s_ref), exclude)
        t1 = time.perf_counter()
        cost = t1 - t0
        metrics.write({"step": step, "diagnostics": rec, "diagnostics_s": round(cost, 4)})
        diag_cost["s"] += cost
        diag_cost["calls"] += 1
        every = diag_every
        budget = cfg.logging.diagnostics_budget
        if budget and diag_cost["since"] is not None:
            t_prev, s_prev = diag_cost["since"]
            per_step = (t0 - t_prev) / max(step - s_prev, 1)  # loop seconds per step, this call excluded
            every = diag_every * max(1, math.ceil(cost / (budget * per_step * diag_every)))
        diag_cost["next"] = step + every
        diag_cost["since"] = (t1, step)

    if diag_every and not resumed:
        metrics.write({"step": 0, "diagnostics": diagnostics_record(diag0, exclude)})
    merge_interval = cfg.poet.merge_interval

    def evaluate(max_batches: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        sums = []
        for toks, w in eval_windows(valid_tokens, batch, seq_len, max_batches):
            toks = dist.global_batch(toks.__getitem__, toks.shape, tokens_sharding)  # this host's rows
            w = dist.global_batch(w.__getitem__, w.shape, weights_sharding)
            sums.append(eval_step(state.params, state.frozen, toks, w))
        # Summed on the host in float64 (one transfer per batch at the end, no eager op per batch on the mesh).
        tot, cnt = (math.fsum(float(x) for x in column) for column in zip(*sums))
        loss = tot / cnt
        timing.setdefault("first_eval_s", time.perf_counter() - t0)
        return loss, math.exp(loss)

    last_saved = start if resumed else None

    def save(step: int):
        nonlocal last_saved
        ckpt.save(step, state, {"data_position": position, "merges": int(state.merges), "config": cfg.to_dict(),
                                "data": {"fingerprint": data.meta["fingerprint"], "vocab_size": data.vocab_size,
                                         "folder": data.folder}})
        last_saved = step

    pending: list[tuple[int, dict]] = []
    losses: dict[int, float] = {}
    tokens_per_step = batch * seq_len
    watch = Stopwatch()

    def flush(step: int, timed: bool):
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        dt = watch.lap()
        n = len(pending)
        if timed:
            progress.rate_sample(n, dt)
        for (s, _), m in zip(pending, host):
            loss, gnorm = float(m["loss"]), float(m["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(gnorm)):
                pending.clear()
                ckpt.wait()
                last = (f"the last good checkpoint is step {last_saved} in {ckpt_dir}" if last_saved is not None
                        else "no checkpoint had been written yet")
                raise TrainingDiverged(f"training diverged: loss {loss} (gradient norm {gnorm}) at step {s}; "
                                       f"the run stopped and {last}")
            losses[s] = loss
        s_last, m_last = pending[-1][0], host[-1]
        rec = {"step": s_last, "loss": float(m_last["loss"]), "grad_norm": float(m_last["grad_norm"]),
               "lr": float(m_last.get("lr", float("nan"))), "epoch": round(sampler.epoch(position), 4),
               "tokens": s_last * tokens_per_step}
        if timed and dt > 0:
            rec["tokens_per_s"] = round(n * tokens_per_step / dt, 1)
        metrics.write(rec)
        progress.update(s_last, rec["loss"], tokens_per_step)
        pending.clear()

    step = start
    first_merge = True
    t_loop = None
    if start >= stop:
        say(f"nothing to train: the checkpoint is at step {start} and the run ends at step {stop}")
    t_start = time.time()
    stopped_by = None
    signals.arm(mesh)
    while step < stop:
        tokens = dist.global_batch(lambda rows: sampler.batch(position, rows), (batch, seq_len + 1), tokens_sharding)
        state, m = train_step(state, tokens)
        position += 1
        step += 1
        pending.append((step, m))
        if (sig := signals.poll()) is not None:  # stop after this step, with its checkpoint (all processes)
            stopped_by, stop = sig, step
        first = step == start + 1
        do_eval = bool(cfg.train.eval_interval) and step % cfg.train.eval_interval == 0 and step < cfg.train.steps
        do_ckpt = (bool(cfg.checkpoint.interval) and step % cfg.checkpoint.interval == 0) or step == stop
        do_diag = bool(diag_every) and step >= diag_cost["next"]
        if first or step % cfg.train.log_interval == 0 or do_eval or do_ckpt or do_diag:
            flush(step, timed=not first)
            if first:
                timing["first_step_s"] = time.time() - t_start
                timing["to_first_step_s"] = time.perf_counter() - t_run
                t_loop = time.perf_counter()  # the loop's own time starts after the first step's compile
                if diag_every:
                    diag_cost["since"] = (t_loop, step)
                say(f"compiled and ran the first step in {timing['first_step_s']:.1f}s")
        if do_diag:  # before the merge of this step (see the module doc); not counted in tokens/s
            write_diagnostics(step)
            watch.lap()
        if poet and step % merge_interval == 0:
            # Each merge is timed on its own (a sync per merge_interval steps); the first one's compile is not
            # training time: keep it out of tokens/s and the ETA.
            flush(step, timed=True)
            t_merge = time.perf_counter()
            state = merge_step(state)
            jax.block_until_ready(state)
            merge_s = time.perf_counter() - t_merge
            if first_merge:
                watch.lap()
                first_merge = False
                timing["first_merge_s"] = merge_s
                say(f"compiled and ran the first merge in {merge_s:.1f}s (not counted in tokens/s)")
            else:
                timing["later_merges"] = timing.get("later_merges", 0) + 1
                timing["later_merge_max_s"] = max(timing.get("later_merge_max_s", 0.0), merge_s)
        if do_eval:
            vl, vp = evaluate(cfg.train.eval_batches)
            metrics.write({"step": step, "val_loss": vl, "val_ppl": vp})
            progress.val_ppl = vp
            watch.lap()
        if do_ckpt:
            save(step)
            watch.lap()
    signals.disarm()
    if stopped_by is None:  # a signal after the last step's poll: that step's checkpoint is written too
        stopped_by = signals.poll_now()
    progress.close()

    def timing_record() -> dict:
        """The "timing" line of metrics.jsonl (written once, at the end of this invocation)."""
        timing["total_s"] = time.perf_counter() - t_run
        for name, (ready, seconds) in compiles.items():  # each program's compile, and when it was ready
            timing[f"compile_{name}_s"], timing[f"ready_{name}_s"] = seconds, ready
        if diag_cost["calls"] and t_loop is not None:
            loop_s = time.perf_counter() - t_loop
            timing["diagnostics_s"] = diag_cost["s"]
            timing["diagnostics_calls"] = diag_cost["calls"]
            timing["diagnostics_share"] = diag_cost["s"] / loop_s if loop_s > 0 else 0.0
        rec = {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()}
        metrics.write({"kind": "timing", "step": step, **rec})
        return rec

    completed = step >= cfg.train.steps and stopped_by is None  # a stop at the last step skips the final evaluation
    result = RunResult(run_dir, step, completed, None, None, unigram, losses, metrics_path, None, ckpt_dir,
                       stopped_by)
    if stopped_by is not None:
        ckpt.wait()  # an async save is on disk before we say so
        timing_record()
        if main:
            print(f"stopped by {signal.Signals(stopped_by).name} after step {step}: wrote checkpoint step {step} "
                  f"to {os.path.join(ckpt_dir, str(step))}; the same command resumes from it", file=sys.stderr)
        return result
    if not completed:
        timing_record()
        say(f"stopped at step {step} (train.stop_after); resume with the same command")
        return result
    vl, vp = evaluate(0)
    metrics.write({"step": step, "val_loss": vl, "val_ppl": vp, "final": True})
    timings = timing_record()  # before the plot: matplotlib's import is not the run's time
    result.val_loss, result.val_ppl = vl, vp
    if cfg.logging.plot and main:
        title = (f"{cfg.name}: LLaMA {cfg.model.num_layers}x{cfg.model.hidden_size}, {cfg.optimizer.name}"
                 + (f" ({cfg.poet.label}, b={cfg.poet.block_size})" if poet else "")
                 + f", {cfg.train.steps} steps")
        try:
            result.plot_path = plot_curves(metrics_path, os.path.join(run_dir, "curves.png"), title, unigram)
        except ImportError as e:  # a machine without matplotlib still finishes the run
            say(f"no plot: {e}")
    if main:
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"step": step, "val_loss": vl, "val_ppl": vp, "unigram_ppl": unigram,
                       "tokens_seen": step * tokens_per_step, "steps_per_s": progress.steps_per_s(),
                       "timing": timings}, f, indent=1)
    print_fn(f"final validation perplexity: {vp:.2f} (loss {vl:.4f} nats/token; unigram perplexity "
             f"{unigram:.2f}) after {step} steps -> {run_dir}")
    return result

