"""benchmarks/profile_summary.py: a trace's device time charged to the repository's source locations."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import profile_summary  # noqa: E402

from poetjax import ops  # noqa: E402


def test_trace_is_charged_to_repository_frames_and_the_backward_is_marked(tmp_path):
    r = jax.random.normal(jax.random.key(0), (4, 64, 64))
    x = jax.random.normal(jax.random.key(1), (512, 256))

    def loss(x, r):
        return jnp.sum(jnp.sin(ops.block_rotate(x, r)))

    step = jax.jit(jax.grad(loss, argnums=1)).lower(x, r).compile()
    step(x, r).block_until_ready()
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            out = step(x, r)
        out.block_until_ready()
    src = profile_summary.hlo_sources(step.as_text())
    assert "poetjax/ops.py:block_rotate" in src.values()
    assert "poetjax/ops.py:block_rotate [bwd]" in src.values()
    with open(os.devnull, "w") as sink:
        res = profile_summary.summarize(str(tmp_path), step.as_text(), steps=2, out=sink)
    assert res["total_ms"] > 0
    rotate = sum(ms for k, ms in res["by_source_ms"].items() if k.startswith("poetjax/ops.py:block_rotate"))
    assert 0 < rotate <= res["total_ms"] + 1e-9
    assert sum(res["by_kernel_ms"].values()) <= res["total_ms"] * (1 + 1e-9)
    assert 0 <= res["short_events"] <= res["events"] and 0 <= res["short_ms"] <= res["total_ms"] * (1 + 1e-9)
