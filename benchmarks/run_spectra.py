"""Singular values of every transformer weight of finished runs, at step 0 and at their last checkpoint.

    python benchmarks/run_spectra.py runs/quality/adamw_1e-3 runs/quality/poet_b256 [...] --out spectra.png

For each run directory (as written by ``train.py``: ``config.yaml`` + ``checkpoints/``) the model of the
run's config is built from its seed (step 0: the exact initial weights) and the newest checkpoint is
restored. For POET runs the effective weights R_out·W0·R_in are used, so the comparison with a plain
AdamW/Muon run is like for like. Writes ``<run>/spectra.npz`` (``init/<path>``, ``final/<path>``
singular values, descending) and one figure: the spectra of two representative weights (step 0 dashed)
and each run's normalized SVD entropy per projection type (mean over layers, step 0 vs final), with the
largest relative change of any singular value printed per run.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_spectra(run_dir: str) -> dict[str, np.ndarray]:
    """{"init/<path>": s, "final/<path>": s} for every linear kernel of the run (float32, descending).

    Computed on the host CPU whatever the default backend: the model is built and the state restored there,
    where an accelerator would compile each of the many small eager ops of building the state first, and
    LAPACK's SVDs of these few hundred-wide matrices take milliseconds."""
    import jax

    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        return _run_spectra(run_dir)


def _run_spectra(run_dir: str) -> dict[str, np.ndarray]:
    from flax import nnx

    from poetjax.checkpoint import Checkpointer, CheckpointError
    from poetjax.diagnostics import linear_kernels, singular_values
    from poetjax.run_config import load_config
    from poetjax.train import steps as core
    from poetjax.train.optimizers import make_optimizer

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    model = core.build_model(cfg)
    out = {f"init/{k}": np.asarray(singular_values(w)) for k, w in linear_kernels(model).items()
           if "lm_head" not in k}
    graphdef, like = core.init_state(model, make_optimizer(cfg), core.run_keys(cfg.seed)[2])
    del model
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            raise CheckpointError(f"{run_dir} has no checkpoint to read the final weights from")
        state, _ = ckpt.restore(step, like)
    trained = nnx.merge(graphdef, state.params, state.frozen)
    out.update({f"final/{k}": np.asarray(singular_values(w)) for k, w in linear_kernels(trained).items()
                if "lm_head" not in k})
    np.savez(os.path.join(run_dir, "spectra.npz"), step=step, **out)
    return out


def projection_type(path: str) -> str:
    return path.rstrip("/").split("/")[-1] if "/" in path else path


def largest_change(spectra: dict[str, np.ndarray]) -> float:
    """The largest relative change of any singular value of any weight from step 0 to the end."""
    keys = [k[len("init/"):] for k in spectra if k.startswith("init/")]
    return max(float(np.max(np.abs(spectra[f"final/{k}"] - spectra[f"init/{k}"]) / spectra[f"init/{k}"]))
               for k in keys)


def summarize(name: str, spectra: dict[str, np.ndarray]) -> str:
    count = sum(k.startswith("init/") for k in spectra)
    return (f"{name}: {count} weights; largest relative change of a singular value from step 0: "
            f"{largest_change(spectra):.3g}")


def plot(runs: dict[str, dict[str, np.ndarray]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poetjax.diagnostics import svd_entropy

    first = next(iter(runs.values()))
    keys = sorted(k[len("init/"):] for k in first if k.startswith("init/"))
    # Two representative weights: an attention and an MLP projection of the middle layer.
    mid = sorted({k.split("/")[1] for k in keys if k.startswith("layers/")}, key=int)
    mid = mid[len(mid) // 2] if mid else None
    picks = [k for k in keys if mid is not None and k.startswith(f"layers/{mid}/") and
             projection_type(k) in ("q_proj", "down_proj")] or keys[:2]
    types = sorted({projection_type(k) for k in keys})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, axes = plt.subplots(1, len(picks) + 1, figsize=(6 * (len(picks) + 1), 4.5))
    for ax, key in zip(axes, picks):
        for i, (name, sp) in enumerate(runs.items()):
            c = colors[i % len(colors)]
            ax.plot(sp[f"init/{key}"], ls="--", lw=1, color=c, alpha=0.6)
            ax.plot(sp[f"final/{key}"], lw=1.3, color=c, label=name)
        ax.set(xlabel="index (descending)", ylabel="singular value", yscale="log",
               title=f"Singular values of {key}\n(dashed: step 0, solid: end of training)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes[-1]
    width = 0.8 / max(len(runs), 1)
    x = np.arange(len(types))
    for i, (name, sp) in enumerate(runs.items()):
        def mean_entropy(when, t):
            return float(np.mean([svd_entropy(sp[f"{when}/{k}"]) for k in keys if projection_type(k) == t]))
        init = [mean_entropy("init", t) for t in types]
        final = [mean_entropy("final", t) for t in types]
        ax.bar(x + i * width, final, width, color=colors[i % len(colors)], label=f"{name} (end)")
        ax.scatter(x + i * width, init, marker="_", s=120, color="k", zorder=3,
                   label="step 0" if i == 0 else None)
    ax.set_xticks(x + width * (len(runs) - 1) / 2, types, rotation=30)
    lo = min(float(np.min([svd_entropy(s) for k, s in sp.items() if "/" in k])) for sp in runs.values())
    ax.set(ylabel="normalized SVD entropy (mean over layers)", ylim=(max(0.0, lo - 0.02), 1.0),
           title="SVD entropy per projection type")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run directories (each with config.yaml and checkpoints/)")
    ap.add_argument("--out", default="spectra.png")
    args = ap.parse_args(argv)
    runs = {}
    for run_dir in args.runs:
        name = os.path.basename(os.path.normpath(run_dir))
        try:
            runs[name] = run_spectra(run_dir)
        except (OSError, ValueError, RuntimeError) as e:  # e.g. a run stopped before its final checkpoint
            print(f"{name}: skipped ({type(e).__name__}: {e})", flush=True)
            continue
        print(summarize(name, runs[name]), flush=True)
    if not runs:
        print("no run had a checkpoint to read", file=sys.stderr)
        return 1
    plot(runs, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
