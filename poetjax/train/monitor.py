"""What a run shows and writes: a progress line, metrics JSONL, and a loss/perplexity plot."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import TextIO


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt_rate(tokens_per_s: float) -> str:
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


class Progress:
    """step/total, a bar, loss, tokens/s and ETA on stderr.

    mode "bar" rewrites one line (``\\r``), "lines" prints one line per update (logs, CI), "none" is silent,
    "auto" picks "bar" on a terminal.
    """

    def __init__(self, total: int, start: int = 0, mode: str = "auto", stream: TextIO | None = None, width: int = 24):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        self.mode = mode
        self.total = total
        self.width = width
        self.start_step = start
        self._t0 = None
        self._steps_timed = 0
        self._time = 0.0
        self.val_ppl = None
        self._dirty = False

    def rate_sample(self, steps: int, seconds: float) -> None:
        """Account ``steps`` steps that took ``seconds`` (compile-free intervals only)."""
        self._steps_timed += steps
        self._time += seconds

    def steps_per_s(self) -> float:
        return self._steps_timed / self._time if self._time > 0 else float("nan")

    def update(self, step: int, loss: float, tokens_per_step: int) -> None:
        if self.mode == "none":
            return
        sps = self.steps_per_s()
        eta = (self.total - step) / sps if sps == sps and sps > 0 else float("nan")
        frac = step / self.total
        filled = int(self.width * frac)
        bar = "#" * filled + "." * (self.width - filled)
        ppl = f" | val ppl {self.val_ppl:.2f}" if self.val_ppl is not None else ""
        tps = _fmt_rate(sps * tokens_per_step) if sps == sps else "--"
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f} | {tps} tok/s | "
                f"ETA {_fmt_time(eta)}{ppl}")
        if self.mode == "bar":
            self.stream.write("\r" + line + "\x1b[K")
            self._dirty = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar."""
        if self._dirty:
            self.stream.write("\n")
            self._dirty = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False


class MetricsLog:
    """Append-only JSONL of dicts (each has "step"); on resume, lines beyond the restored step (and a
    finished run's final evaluation, which is redone) are dropped so the file reads like one run."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if resume_step is None:
            open(path, "w").close()
        elif os.path.exists(path):
            keep = [r for r in read_jsonl(path) if r.get("step", 0) <= resume_step and not r.get("final")]
            with open(path, "w") as f:
                for r in keep:
                    f.write(json.dumps(r) + "\n")

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed process
                    continue
    return out


def plot_curves(metrics_path: str, out_path: str, title: str, unigram_ppl: float | None = None) -> str:
    """Training loss, validation loss (left) and validation perplexity (right, log scale) against step;
    ``unigram_ppl`` adds the unigram model's perplexity as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    rows = read_jsonl(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"], r["val_ppl"]) for r in rows if "val_loss" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    if train:
        ax1.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        s, vl, vp = zip(*val)
        ax1.plot(s, vl, "o-", label="validation loss", lw=1.5, ms=4)
        ax2.plot(s, vp, "o-", color="C1", label="validation perplexity", lw=1.5, ms=4)
        ax2.annotate(f"{vp[-1]:.2f}", (s[-1], vp[-1]), textcoords="offset points", xytext=(-10, 8), ha="right")
    if unigram_ppl is not None:
        ax2.axhline(unigram_ppl, color="gray", ls="--", lw=1, label=f"unigram model ({unigram_ppl:.1f})")
        if train:
            ax1.axhline(math.log(unigram_ppl), color="gray", ls="--", lw=1, label="unigram model")
    ax2.set_yscale("log")
    lo, hi = ax2.get_ylim()
    narrow = hi / lo < 10  # within a decade label every minor tick, else only 2·10ᵏ and 5·10ᵏ
    ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax2.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if narrow or f"{v:e}"[0] in "25" else ""))
    ax1.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax2.set(xlabel="step", ylabel="perplexity", title="validation perplexity")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


class Stopwatch:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
