"""Plot the spectral diagnostics of one or more training runs side by side (PNG).

    python benchmarks/plot_diagnostics.py runs/tiny_adamw runs/tiny_poet --out docs/diagnostics.png

Each argument is a run directory (or its metrics.jsonl) written by ``train.py`` with
``logging.diagnostics_interval`` > 0. The figure (``poetjax.plots.plot_diagnostics``): singular-value
trajectories of one layer per run, SVD entropy, spectral drift since step 0, phase-probe cosines and the
loss.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories or metrics.jsonl files")
    ap.add_argument("--labels", nargs="+", help="one legend label per run (default: name and optimizer)")
    ap.add_argument("--layer", help="layer path of the singular-value panels, e.g. layers/0/mlp/up_proj "
                                    "(default: the first MLP projection)")
    ap.add_argument("--title", help="figure title")
    ap.add_argument("--out", default="diagnostics.png", help="output PNG (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.labels and len(args.labels) != len(args.runs):
        ap.error(f"--labels has {len(args.labels)} entries for {len(args.runs)} runs")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poetjax.plots import plot_diagnostics, read_run

    labels = args.labels or [None] * len(args.runs)
    runs = [read_run(p, label) for p, label in zip(args.runs, labels)]
    fig = plot_diagnostics(runs, args.out, layer=args.layer, title=args.title)
    plt.close(fig)
    print(args.out)
    return args.out


if __name__ == "__main__":
    main()
