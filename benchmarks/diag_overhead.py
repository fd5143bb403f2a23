"""Cost of the trainer's spectral diagnostics relative to training, on the current machine.

    python benchmarks/diag_overhead.py [--config F] [--rounds 5] [--steps 20] [key=value ...]

Builds the run's model and jitted steps exactly as ``train.py`` does (``poetjax.train.steps``), compiles the
train step and the diagnostics step, then alternates ``--steps`` train steps and one diagnostics call for
``--rounds`` rounds, timing each (host-synced). Reports the medians, the overhead at several intervals
(diagnostics time / (interval × step time)) and the one-off compile time of the diagnostics program.
Alternating keeps a noisy (shared) machine's load roughly equal for both.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as train.py does (see there)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="run config YAML (default: the default job)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="train steps timed per round")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from poetjax.diagnostics import diagnostics_record
    from poetjax.run_config import load_config
    from poetjax.train import steps as core
    from poetjax.train.optimizers import lr_schedules, make_optimizer

    cfg = load_config(args.config, args.overrides)
    tx = make_optimizer(cfg)
    graphdef, state = core.init_state(core.build_model(cfg), tx, core.run_keys(cfg.seed)[2])
    train = core.make_train_step(graphdef, tx, microbatches=cfg.train.microbatches,
                                 lr_schedule=lr_schedules(cfg)["lr"])
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size,
                                               (cfg.train.batch_size, cfg.data.seq_len + 1)).astype(np.int32)
    t = time.perf_counter()
    diag = core.make_diagnostics_step(graphdef)
    s_ref = jax.block_until_ready(core.reference_spectra(diag, state)[0])
    compile_s = time.perf_counter() - t
    state, m = train(state, tokens)
    jax.block_until_ready(m)
    step_s, diag_s = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            state, m = train(state, tokens)
        jax.block_until_ready(m)
        step_s.append((time.perf_counter() - t) / args.steps)
        t = time.perf_counter()
        diagnostics_record(diag(state, s_ref), tuple(cfg.poet.exclude))  # what the loop does, host copy included
        diag_s.append(time.perf_counter() - t)
    step, d = statistics.median(step_s), statistics.median(diag_s)
    out = {"step_s": step, "diag_s": d, "compile_s": compile_s,
           "overhead": {n: d / (n * step) for n in (20, 50, 100, 200)}}
    print(f"{cfg.optimizer.name}: median train step {step * 1e3:.1f} ms, median diagnostics call {d * 1e3:.1f} ms "
          f"({args.rounds} rounds; steps {[round(x * 1e3) for x in step_s]} ms, diagnostics "
          f"{[round(x * 1e3) for x in diag_s]} ms); diagnostics compile + reference spectra {compile_s:.1f} s")
    print("overhead at interval " + ", ".join(f"{n}: {v:.1%}" for n, v in out["overhead"].items()))
    return out


if __name__ == "__main__":
    main()
