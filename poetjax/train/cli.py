"""``python train.py [--config FILE.yaml] [key=value ...]`` — see README "Training"."""

from __future__ import annotations

import argparse
import signal
import sys

from poetjax.run_config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="train.py", description="Pretrain a LLaMA model with POET-X (or an AdamW/Muon baseline). With no "
        "arguments: the default job, a small POET model on the shipped Tiny Shakespeare corpus, on CPU.")
    ap.add_argument("--config", help="YAML file of overrides (may name a 'base:' file)")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("--prepare-only", action="store_true",
                    help="tokenize data.source into data.cache_dir and exit (e.g. to carry the shards elsewhere)")
    ap.add_argument("--export", nargs="?", const="", metavar="PATH",
                    help="write the run's newest checkpoint (or checkpoint.resume_step) as plain LLaMA weights "
                         "(.npz or .safetensors; POET rotations merged) to PATH (default "
                         "<run dir>/export_step<N>.npz) and exit")
    ap.add_argument("--export-hf", nargs="?", const="", metavar="DIR",
                    help="write the run's newest checkpoint (or checkpoint.resume_step) as a Hugging Face "
                         "LlamaForCausalLM folder with the run's tokenizer (POET rotations merged) to DIR "
                         "(default <run dir>/hf_step<N>) and exit; transformers loads it as it is")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optimizer.lr=1e-3")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0

    # Heavy imports after the config is known to be valid: a bad key fails in well under a second.
    from poetjax.checkpoint import CheckpointError, committed_steps
    from poetjax.data import DataError
    from poetjax.models.hf import HFError
    from poetjax.train.loop import TrainingDiverged, checkpoint_dir, run
    from poetjax.train.signals import exit_status

    try:
        if args.export_hf is not None:
            from poetjax.train.export import export_hf_run

            export_hf_run(cfg, args.export_hf or None)
            return 0
        if args.export is not None:
            from poetjax.train.export import export_run

            export_run(cfg, args.export or None)
            return 0
        if args.prepare_only:
            from poetjax.data import prepare_from_config

            data = prepare_from_config(cfg.data, cfg.model.vocab_size, log=lambda m: print(m, file=sys.stderr))
            print(data.folder)
            return 0
        result = run(cfg)
    except (ConfigError, DataError, CheckpointError, HFError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # outside the training loop (poetjax.train.signals), or before run()
        print(interrupted_message(getattr(e, "signum", signal.SIGINT), checkpoint_dir(cfg), committed_steps),
              file=sys.stderr)
        return exit_status(getattr(e, "signum", signal.SIGINT))
    # A SIGTERM/SIGINT stop has written its checkpoint; the status says the job is not finished.
    return exit_status(result.stopped_by) if result.stopped_by is not None else 0


def interrupted_message(signum: int, ckpt_dir: str, committed_steps) -> str:
    """What an interrupt outside the training loop leaves: nothing trained is lost there (the loop
    checkpoints its last step), so the newest checkpoint on disk, or none, is the whole story."""
    name = signal.Signals(signum).name
    steps = committed_steps(ckpt_dir)
    if not steps:
        return (f"interrupted ({name}) before training started: no checkpoint exists in {ckpt_dir}, and nothing "
                f"was trained, so nothing was lost; the same command starts the run from step 0")
    return (f"interrupted ({name}) outside the training steps: checkpoint step {steps[-1]} in {ckpt_dir} holds "
            f"all training so far, so nothing trained was lost; the same command resumes from it")
