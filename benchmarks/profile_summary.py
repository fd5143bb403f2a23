"""Where a compiled step spends its device time: a profiler trace summed by source location.

    python benchmarks/profile_summary.py TRACE_DIR HLO.txt [--steps N] [--top 30]

``train_bench.py --profile DIR`` writes both inputs (the trace of N steps and the compiled step's HLO text)
and calls ``summarize``. Every device event (a kernel; on a CPU, a thunk) that carries an ``hlo_op`` stat
is charged to that HLO instruction, and the instruction to the innermost frame of its source stack that
lies in this repository (``poetjax/ops.py:block_rotate_rows``), else to its op name's primitive, marked
"[bwd]" when autodiff's transpose made it (the backward pass). Printed:
milliseconds per step by source location and by kernel name, each with its share of the total, and how
much of the device time went to short kernels (under ``SHORT_US`` each), the sign of a launch-bound step.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys

_REPO_DIRS = ("poetjax/", "pallas_kernels/", "benchmarks/", "train.py")
SHORT_US = 20.0  # a kernel this short costs about as much to launch as to run


def _table(text: str, title: str) -> dict[int, str]:
    """One of the HLO text's id tables (FileNames, FunctionNames, FileLocations, StackFrames)."""
    m = re.search(rf"^{title}\n((?:\d+ .*\n)+)", text, re.M)
    if not m:
        return {}
    return {int(i): v for i, v in re.findall(r"^(\d+) (.*)$", m.group(1), re.M)}


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """{instruction name: "file:function" of the innermost repository frame (else the primitive)}."""
    files = {i: v.strip('"') for i, v in _table(hlo_text, "FileNames").items()}
    funcs = {i: v.strip('"') for i, v in _table(hlo_text, "FunctionNames").items()}
    locs = {}
    for i, v in _table(hlo_text, "FileLocations").items():
        f = re.search(r"file_name_id=(\d+)", v)
        fn = re.search(r"function_name_id=(\d+)", v)
        locs[i] = (files.get(int(f.group(1)), "?") if f else "?", funcs.get(int(fn.group(1)), "?") if fn else "?")
    frames = {}
    for i, v in _table(hlo_text, "StackFrames").items():
        loc = re.search(r"file_location_id=(\d+)", v)
        par = re.search(r"parent_frame_id=(\d+)", v)
        frames[i] = (int(loc.group(1)) if loc else 0, int(par.group(1)) if par else 0)

    def label(frame_id: int) -> str | None:
        seen = set()
        while frame_id and frame_id not in seen and frame_id in frames:
            seen.add(frame_id)
            loc, parent = frames[frame_id]
            path, func = locs.get(loc, ("?", "?"))
            for d in _REPO_DIRS:
                at = path.rfind(d)
                if at >= 0:
                    return f"{path[at:]}:{func}"
            frame_id = parent
        return None

    # Instructions by computation; a fusion (or call) without a repository frame of its own takes the first
    # one found among the instructions of the computations it calls.
    own, calls, bwd, comp_label, comp = {}, {}, {}, {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head and not line.startswith(" "):
            comp = head.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if not m:
            continue
        name = m.group(1)
        sf = re.search(r"stack_frame_id=(\d+)", line)
        op = re.search(r'op_name="([^"]*)"', line)
        lab = label(int(sf.group(1))) if sf else None
        own[name] = lab or ("op:" + op.group(1).split("/")[-1] if op else None)
        bwd[name] = bool(op) and "transpose(" in op.group(1)  # autodiff's transpose: the backward pass
        calls[name] = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)
        if lab and comp and comp not in comp_label:
            comp_label[comp] = lab
    out = {}
    for name, lab in own.items():
        if lab is None or lab.startswith("op:"):
            lab = next((comp_label[c] for c in calls[name] if c in comp_label), lab)
        out[name] = (lab or f"op:{name}") + (" [bwd]" if bwd[name] else "")
    return out


def device_events(xplane_path: str):
    """(kernel name, hlo_op or None, duration ns) of the device planes' events (host CPU thunks if no
    device plane has any)."""
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(xplane_path)
    dev, host = [], []
    for plane in pd.planes:
        target = dev if plane.name.startswith("/device:") else host
        if target is host and not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            for e in line.events:
                stats = dict(e.stats)
                op = stats.get("hlo_op")
                if target is host and op is None:
                    continue
                target.append((e.name, op, float(e.duration_ns)))
    return dev or host


def trace(run_once, calls: int, out_dir: str) -> None:
    """Run ``run_once()`` (which must block until its work is done) once untraced, then ``calls`` times under
    the profiler, writing the trace into out_dir."""
    import jax

    os.makedirs(out_dir, exist_ok=True)
    run_once()
    with jax.profiler.trace(out_dir):
        for _ in range(calls):
            run_once()


def summarize(trace_dir: str, hlo_text: str, steps: int, top: int = 40, out=sys.stdout, unit: str = "step") -> dict:
    """The trace under trace_dir, charged to source locations of ``hlo_text``, per ``unit`` (``steps`` of them
    traced); printed to ``out`` (None: not printed) and returned (``print_summary`` prints it again)."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb under {trace_dir!r}")
    events = device_events(paths[-1])
    src = hlo_sources(hlo_text)
    by_src, by_kernel = collections.Counter(), collections.Counter()
    # A kernel of a fusion is usually named after it ("gemm_fusion_dot.4" → gemm_fusion_dot_4): the fallback
    # when its hlo_op is a command buffer (CUDA graph) or missing.
    by_kernel_name = {k.replace(".", "_"): v for k, v in src.items()}
    for name, op, ns in events:
        lab = src.get(op) if op and not op.startswith("command_buffer") else None
        by_src[lab or by_kernel_name.get(name) or f"kernel:{name[:60]}"] += ns
        by_kernel[name[:80]] += ns
    per = 1e6 * max(steps, 1)  # ns → ms per step
    short = [ns for _, _, ns in events if ns < SHORT_US * 1e3]
    summary = {"unit": unit, "traced": steps, "events": len(events), "total_ms": sum(by_src.values()) / per,
               "short_events": len(short), "short_ms": sum(short) / per,
               "by_source_ms": {k: v / per for k, v in by_src.most_common(top)},
               "by_kernel_ms": {k: v / per for k, v in by_kernel.most_common(top)}}
    if out is not None:
        print_summary(summary, out)
    return summary


def print_summary(summary: dict, out=sys.stdout) -> None:
    total, unit = summary["total_ms"], summary["unit"]
    print(f"\n== device time per {unit}: {total:.3f} ms over {summary['traced']} traced {unit}s "
          f"({summary['events']} events)", file=out)
    if "short_ms" in summary:
        print(f"   kernels under {SHORT_US:g} µs: {summary['short_events']} events, {summary['short_ms']:.3f} ms per "
              f"{unit} ({100 * summary['short_ms'] / max(total, 1e-12):.1f}%)", file=out)
    for title, key in (("by source (innermost repository frame, else the HLO primitive)", "by_source_ms"),
                       ("by kernel", "by_kernel_ms")):
        print(f"-- {title}", file=out)
        for name, ms in summary[key].items():
            print(f"  {ms:9.3f} ms  {100 * ms / max(total, 1e-12):5.1f}%  {name}", file=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace_dir")
    ap.add_argument("hlo")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    with open(args.hlo) as f:
        summarize(args.trace_dir, f.read(), args.steps, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
