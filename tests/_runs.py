"""Helpers shared by the training and checkpoint tests."""

import os

from poetjax.run_config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
# The resume setting: 2k = 30 steps of the tiny config (merges every 10 steps), checkpoints every 5.
RESUME = ["train.steps=30", "checkpoint.interval=5", "train.log_interval=1"]


def tiny(out_dir, data_cache, *overrides, config=TINY):
    """The tiny config writing under ``out_dir``, quiet, with the session's data cache."""
    return load_config(config, [f"out_dir={out_dir}", f"data.cache_dir={data_cache}", "logging.progress=none",
                                "logging.plot=false", *overrides])


def state_like(cfg):
    """A fresh TrainState of ``cfg`` (a restore target)."""
    from poetjax.train import steps as core
    from poetjax.train.optimizers import make_optimizer

    return core.init_state(core.build_model(cfg), make_optimizer(cfg), core.run_keys(cfg.seed)[2])[1]
