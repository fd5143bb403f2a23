"""Training: the functional core (``steps``), optimizers, and the main loop (``loop.run``)."""

from poetjax.train.optimizers import lr_schedules, make_optimizer
from poetjax.train.steps import (TrainState, build_model, init_state, loss_fn, make_diagnostics_step, make_eval_step,
                                 make_merge_step, make_train_step, reference_spectra, run_keys, split_model,
                                 token_losses)

__all__ = ["TrainState", "build_model", "init_state", "loss_fn", "lr_schedules", "make_diagnostics_step",
           "make_eval_step", "make_merge_step", "make_optimizer", "make_train_step", "reference_spectra", "run_keys",
           "split_model", "token_losses"]
