"""Weight-update coverage of POET-FS vs POET-BS (POET spec §8.4, [POET-X] Fig. 1), as a PNG.

    python benchmarks/coverage_plot.py [--dim 64] [--merges 100] [--out docs/coverage.png]

A dim×dim layer runs ``--merges`` inner loops of one step each (T_m = 1) through its own merges
(``poetjax.coverage.coverage_run``); each entry's count is how many times its row was rotated by R plus
how many times its column was rotated by P (2·merges at most). Prints a summary table and writes
heatmaps of the counts plus their histograms. CPU is enough (a few seconds per configuration).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import poetjax as pj  # noqa: E402
from poetjax.coverage import coverage_run, coverage_stats  # noqa: E402

# (label, POETConfig fields): the spec's FS b=1/8 vs BS b=8 pair, plus FS at the papers' usual b=1/2.
CONFIGS = [
    ("POET-FS b=1/8", {"family": "fs", "block_size": 0.125}),
    ("POET-FS b=1/2", {"family": "fs", "block_size": 0.5}),
    ("POET-BS b=8", {"block_size": 8}),
]


def run(dim: int, merges: int, seed: int) -> list[tuple[str, int, np.ndarray]]:
    out = []
    for i, (label, fields) in enumerate(CONFIGS):
        layer = pj.POETLinear(dim, dim, config=pj.POETConfig(**fields), rngs=nnx.Rngs(seed))
        cov = coverage_run(layer, merges, jax.random.fold_in(jax.random.key(seed), i))
        out.append((label, layer.num_generator_params, np.asarray(cov.touches)))
    return out


def plot(results, dim: int, merges: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vmax = 2 * merges
    fig, axes = plt.subplots(2, len(results), figsize=(4.4 * len(results), 8.4), layout="constrained",
                             gridspec_kw={"height_ratios": [1.15, 1]})
    for col, (label, params, counts) in enumerate(results):
        ax = axes[0, col]
        im = ax.imshow(counts, vmin=0, vmax=vmax, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{label}  ({params} params)\nmean {counts.mean():.1f}, min {counts.min()}, "
                     f"max {counts.max()}", fontsize=10)
        ax.set_xlabel("column j (output coordinate)")
        if col == 0:
            ax.set_ylabel("row i (input coordinate)")
        ax = axes[1, col]
        bins = np.arange(0, vmax + 2) - 0.5
        ax.hist(counts.ravel(), bins=bins, color=f"C{col}", label="entries", zorder=3)
        ax.axvline(vmax, color="k", ls=":", lw=1, label=f"maximum {vmax}")
        ax.axvline(counts.mean(), color="r", ls="--", lw=0.8, label=f"mean {counts.mean():.1f}")
        ax.set_xlim(-2, vmax + 5)
        ax.set_xlabel("times the entry was changed")
        if col == 0:
            ax.set_ylabel("number of entries")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8, loc="best")
    fig.colorbar(im, ax=list(axes[0]), shrink=0.9, label="times changed (row by R + column by P)")
    fig.suptitle(f"Weight-update coverage of a {dim}×{dim} layer after {merges} merges (T_m = 1)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--merges", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/coverage.png")
    args = ap.parse_args()
    results = run(args.dim, args.merges, args.seed)
    print(f"| config | generator params | min | max | mean | std | entries at 2·merges |")
    print("|---|---|---|---|---|---|---|")
    for label, params, counts in results:
        s = coverage_stats(counts)
        at_max = float(np.mean(counts == 2 * args.merges))
        print(f"| {label} | {params} | {s['min']:.0f} | {s['max']:.0f} | {s['mean']:.2f} | {s['std']:.2f} | "
              f"{at_max:.1%} |")
    plot(results, args.dim, args.merges, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
