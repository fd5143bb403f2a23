"""How far a run's rotations are from orthogonal, and what that costs the block-Gram gradient.

    python benchmarks/gram_newton.py --config CONFIG [key=value ...]     (the run's own config and overrides)

Restores the run's newest checkpoint (take it just before a merge, e.g. ``train.stop_after=199`` with
``optimizer.merge_interval=200``, where the generators are largest) and, for every POET layer and side,
reports ‖Q‖₂, ‖RᵀR − I‖₂ and the relative error ‖Z − R⁻ᵀ‖_F / ‖R⁻ᵀ‖_F of every ``POETConfig.gram_correction``:
Newton–Schulz after n = 0 … 3 steps (``poetjax.cayley.inverse_transpose``; float32-exact products) and the
float32 batched solve ("solve"), against a float64 inverse on the host. The block-Gram backward's dR is
G·Z, so this is the relative error of its dR for any G. The maxima over layers are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from poetjax import POETLinear  # noqa: E402
from poetjax.cayley import HIGHEST, inverse_transpose, mask_generators, skew_from_packed  # noqa: E402
from poetjax.checkpoint import Checkpointer  # noqa: E402
from poetjax.models.llama import layer_view  # noqa: E402
from poetjax.run_config import load_config  # noqa: E402
from poetjax.train import steps as core  # noqa: E402
from poetjax.train.optimizers import make_optimizer  # noqa: E402

STEPS = (0, 1, 2, 3)


def side_report(theta, layout, r) -> dict:
    q = np.asarray(skew_from_packed(mask_generators(theta.astype(jnp.float32), layout)), np.float64)
    r32 = r.astype(jnp.float32)
    r64 = np.asarray(r32, np.float64)
    eye = np.eye(r64.shape[-1])
    want = np.swapaxes(np.linalg.inv(r64), -1, -2)
    out = {"q_norm": float(np.max(np.linalg.norm(q, 2, axis=(-2, -1)))),
           "orth_err": float(np.max(np.linalg.norm(np.swapaxes(r64, -1, -2) @ r64 - eye, 2, axis=(-2, -1))))}
    with jax.default_matmul_precision("highest"):
        for n in STEPS:
            z = np.asarray(inverse_transpose(r32, n, precision=HIGHEST), np.float64)
            out[f"newton{n}"] = float(np.linalg.norm(z - want) / np.linalg.norm(want))
        z = np.asarray(jnp.swapaxes(jnp.linalg.solve(r32, jnp.broadcast_to(jnp.eye(r32.shape[-1]), r32.shape)), -1, -2),
                       np.float64)
        out["solve"] = float(np.linalg.norm(z - want) / np.linalg.norm(want))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.out_dir, cfg.name, "checkpoints")
    with Checkpointer(ckpt_dir) as ckpt:
        step = ckpt.steps()[-1]
        model = core.build_model(cfg)
        graphdef, like = core.init_state(model, make_optimizer(cfg), core.run_keys(cfg.seed)[2])
        del model
        state, _ = ckpt.restore(step, like)
    model = layer_view(nnx.merge(graphdef, state.params, state.frozen))
    rows = []
    for path, lay in nnx.iter_graph(model):
        if not isinstance(lay, POETLinear) or lay.config.variant == "fs":
            continue
        r_in, r_out = lay.rotation_blocks()
        for side, theta, layout, r in (("in", lay.theta_in[...], lay.layout_in, r_in),
                                       ("out", lay.theta_out[...], lay.layout_out, r_out)):
            rec = {"layer": "/".join(map(str, path)), "side": side, **side_report(theta, layout, r)}
            rows.append(rec)
            print(json.dumps(rec), flush=True)
    keys = ["q_norm", "orth_err"] + [f"newton{n}" for n in STEPS] + ["solve"]
    print(f"\nstep {step} of {ckpt_dir}: maxima over {len(rows)} layer sides")
    print("  " + "  ".join(f"{k:>10s}" for k in keys))
    print("  " + "  ".join(f"{max(r[k] for r in rows):10.2e}" for k in keys))


if __name__ == "__main__":
    main()
