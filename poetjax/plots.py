"""Figures of the spectral diagnostics of one or more runs (POET vs AdamW/Muon side by side).

A run is ``(label, rows)``: the dicts of its ``metrics.jsonl`` (``read_run``), or records built the same
way in a notebook (``{"step": s, "loss": ...}`` and ``{"step": s, "diagnostics":
poetjax.diagnostics.diagnostics_record(...)}``). ``plot_diagnostics`` draws

* top row, one panel per run (shared y axis): the singular-value trajectories of one layer — the
  singular values at evenly spaced ranks against the step (spec §8.2: AdamW grows its large singular
  values, POET keeps them);
* bottom row: the SVD entropy averaged over the weight matrices, the largest spectral drift since step 0,
  the phase-probe cosines of the accumulated rotations (POET runs; spec §8.1) and the training loss.

matplotlib is imported inside the functions (it is a dependency of the trainer's plots, but nothing
here needs it at import time).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from poetjax.diagnostics import group_of

Run = tuple[str, list[dict]]

# The cosine band of the stable-learning phase reported by the POET paper (spec §8.1).
PAPER_COS_BAND = (0.60, 0.65)


def read_run(path: str, label: str | None = None) -> Run:
    """(label, rows) of a run directory (holding ``metrics.jsonl``) or of a metrics JSONL file.

    The default label is the run's name and optimizer from its ``config.yaml`` when there is one.
    """
    from poetjax.train.monitor import read_jsonl

    metrics = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"no metrics file at {metrics!r} (give a run directory or its metrics.jsonl)")
    rows = read_jsonl(metrics)
    if label is None:
        label = os.path.basename(os.path.dirname(os.path.abspath(metrics)))
        cfg_path = os.path.join(os.path.dirname(metrics), "config.yaml")
        if os.path.isfile(cfg_path):
            import yaml

            with open(cfg_path) as f:
                cfg = yaml.safe_load(f) or {}
            opt = cfg.get("optimizer", {})
            name = opt.get("name", "?")
            if name == "poet":
                name += f" b={opt.get('block_size')}, merge every {opt.get('merge_interval')}"
            label = f"{cfg.get('name', label)} ({name})"
    return label, rows


def diagnostics_rows(rows: list[dict]) -> list[tuple[int, dict]]:
    """[(step, diagnostics record)] in step order."""
    return sorted(((r["step"], r["diagnostics"]) for r in rows if "diagnostics" in r), key=lambda t: t[0])


def default_layer(runs: Sequence[Run]) -> str:
    """The layer whose spectrum the top row shows by default: the first MLP projection present in every
    run (else the first layer common to all runs), skipping lm_head."""
    common = None
    for _, rows in runs:
        diags = diagnostics_rows(rows)
        names = set(diags[0][1]["layers"]) if diags else set()
        common = names if common is None else common & names
    names = sorted(n for n in (common or ()) if "lm_head" not in n)
    if not names:
        raise ValueError("the runs share no layer with diagnostics (was logging.diagnostics_interval 0?)")
    mlp = [n for n in names if "mlp" in n]
    return (mlp or names)[0]


def group_series(rows: list[dict], key: str, group: str = "all") -> tuple[list[int], list[float]]:
    """(steps, values) of ``groups[group][key]`` over the diagnostics rows that have it."""
    steps, vals = [], []
    for s, d in diagnostics_rows(rows):
        v = d.get("groups", {}).get(group, {}).get(key)
        if v is not None:
            steps.append(s)
            vals.append(v)
    return steps, vals


def plot_diagnostics(runs: Sequence[Run], out_path: str | None = None, *, layer: str | None = None,
                     title: str | None = None, loss_label: str = "cross-entropy (nats/token)",
                     matrices: str = "the transformer-block matrices (lm_head excluded)"):
    """The figure described in the module doc; saved to ``out_path`` (PNG) when given. Returns the Figure.

    ``loss_label`` names the loss axis and ``matrices`` the layers the bottom row summarises (the "all"
    group of the records), for figures of other models than the trainer's LLaMA."""
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    runs = list(runs)
    if not runs:
        raise ValueError("plot_diagnostics needs at least one run")
    for label, rows in runs:
        if not diagnostics_rows(rows):
            raise ValueError(f"run {label!r} has no diagnostics records (logging.diagnostics_interval=0?)")
    layer = layer or default_layer(runs)
    n = len(runs)
    fig = plt.figure(figsize=(max(4.2 * n, 17.0), 8.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.0, 1.0])
    axes_top = top.subplots(1, n, sharey=True, squeeze=False)[0]
    cmap = colormaps["viridis"]
    for ax, (label, rows) in zip(axes_top, runs):
        diags = [(s, d["layers"][layer]["sv"]) for s, d in diagnostics_rows(rows) if layer in d["layers"]]
        if not diags:
            ax.text(0.5, 0.5, f"no diagnostics of\n{layer}", ha="center", va="center", transform=ax.transAxes)
        else:
            steps = [s for s, _ in diags]
            k = len(diags[0][1])
            for j in range(k):
                lab = "largest σ" if j == 0 else ("smallest σ" if j == k - 1 else None)
                ax.plot(steps, [sv[j] for _, sv in diags], color=cmap(j / max(k - 1, 1)), lw=1.3, label=lab)
            ax.legend(loc="best", fontsize=8)
        ax.set_yscale("log")
        ax.set(title=label, xlabel="step")
        ax.grid(alpha=0.3, which="both")
    axes_top[0].set_ylabel("singular value")
    top.suptitle(f"singular values of {layer} at evenly spaced ranks, against the step")

    ax_ent, ax_drift, ax_cos, ax_loss = bottom.subplots(1, 4)
    any_cos = False
    low_cos = 1.0
    for i, (label, rows) in enumerate(runs):
        color = f"C{i}"
        s, v = group_series(rows, "svd_entropy")
        ax_ent.plot(s, v, "o-", color=color, ms=3, lw=1.4, label=label)
        s, v = group_series(rows, "drift")
        pos = [(a, b) for a, b in zip(s, v) if b > 0]  # step 0 is exactly 0: nothing to show on a log axis
        if pos:
            ax_drift.plot(*zip(*pos), "o-", color=color, ms=3, lw=1.4, label=label)
        for side, style in (("cos_in", "-"), ("cos_out", "--")):
            s, v = group_series(rows, side)
            if v:
                any_cos = True
                low_cos = min(low_cos, min(v))
                ax_cos.plot(s, v, style, color=color, lw=1.4, label=f"{label}: {'R (input)' if side == 'cos_in' else 'P (output)'}")
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax_loss.plot(*zip(*train), color=color, lw=1.1, label=f"{label}: train")
        if val:
            ax_loss.plot(*zip(*val), "o", color=color, ms=5, mfc="none", label=f"{label}: validation")
    if not any_cos:
        ax_cos.text(0.5, 0.5, "no POET run", ha="center", va="center", transform=ax_cos.transAxes)
    elif low_cos < 0.85:  # the paper's plateau is only worth drawing once the cosines get near it
        ax_cos.axhspan(*PAPER_COS_BAND, color="gray", alpha=0.2, label="paper's plateau (0.60–0.65)")
    ax_ent.set(title="SVD entropy (mean over matrices)", xlabel="step", ylabel="normalized entropy")
    ax_drift.set(title="spectral drift since step 0 (worst matrix)", xlabel="step",
                 ylabel="max |Δσ| / σ_max at step 0")
    ax_drift.set_yscale("log")
    ax_cos.set(title="phase probe: cos(v, v·R_total) (mean)", xlabel="step", ylabel="cosine")
    ax_loss.set(title="loss", xlabel="step", ylabel=loss_label)
    for ax in (ax_ent, ax_drift, ax_cos, ax_loss):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    bottom.suptitle(f"over {matrices}")
    fig.suptitle(title or "spectral diagnostics: " + " vs ".join(label for label, _ in runs), fontsize=13)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        fig.savefig(out_path, dpi=100)
    return fig


__all__ = ["PAPER_COS_BAND", "Run", "default_layer", "diagnostics_rows", "group_of", "group_series",
           "plot_diagnostics", "read_run"]
