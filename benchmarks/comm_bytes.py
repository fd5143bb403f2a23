"""Bytes each device sends per training step: POET-X vs AdamW, data parallel (DP) vs FSDP (an analysis,
not a measurement).

    python benchmarks/comm_bytes.py [--configs configs/llama_1b.yaml,configs/llama_8b.yaml] [--devices 8,64]
        [key=value ...]

The parameter counts come from the real models of the configs (built abstractly with ``nnx.eval_shape``,
nothing is allocated), split by the roles of ``poetjax.distributed.leaf_roles`` and laid out by its
rules (``spec_for`` with ``mesh.min_shard_size``). Collectives are costed as bandwidth-optimal ring
algorithms on n devices, S being the size of the whole array in bytes:

    all-reduce 2·(n−1)/n·S      all-gather (n−1)/n·S      reduce-scatter (n−1)/n·S

Per step, with G = gradient bytes of the all-reduced (replicated) trainable leaves:

    AdamW, DP     all-reduce of every weight's gradient                        2·(n−1)/n·P_all
    AdamW, FSDP   all-gather of every weight in the forward and again in the backward (ZeRO-3, as the
                  recomputation of remat and dx = g·Wᵀ need it), reduce-scatter of every gradient
                                                                               3·(n−1)/n·P_all
    POET-X, DP    all-reduce of the trainable leaves only (generators, embedding, lm_head, norms);
                  W0 is frozen: no gradient, nothing to reduce             2·(n−1)/n·P_trainable
    POET-X, FSDP  W0 all-gathered in the forward and the backward but never reduce-scattered (no
                  gradient); sharded trainable leaves (embedding, lm_head) like AdamW FSDP; generators
                  and norms all-reduced                       2·(n−1)/n·(W0 + G_repl) + 3·(n−1)/n·P_sharded
    + merge       every merge_interval steps, POET-X FSDP all-gathers W0 once more (the merge permutes
                  whole W0s): (n−1)/n·W0 / merge_interval per step, amortized.

Gradients have the dtype of their parameters (generators always float32). Activations are not
communicated in either layout (no tensor parallelism), so the batch size does not enter.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIGS = "configs/llama_1b.yaml,configs/llama_8b.yaml"


def model_leaves(cfg) -> list[tuple[str, tuple[int, ...], int]]:
    """(role, shape, bytes) of every array of the model of ``cfg``, built abstractly (no memory)."""
    import jax
    import numpy as np
    from flax import nnx

    from poetjax import distributed as dist
    from poetjax.layers import path_keys
    from poetjax.train import steps as core

    graphdef, params, frozen = core.split_model(nnx.eval_shape(lambda: core.build_model(cfg)))
    roles = dist.leaf_roles(graphdef, params, frozen)
    return [(roles[path_keys(path)], tuple(leaf.shape), int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize)
            for tree in (params, frozen) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def role_bytes(leaves, fsdp: int, min_shard_size: int) -> dict[str, int]:
    """Bytes by communication role under ``fsdp`` shards: "w0", "sharded" (trainable leaves split over
    fsdp by ``poetjax.distributed.spec_for``), "replicated" (trainable leaves all-reduced), "other"
    (permutations: never communicated)."""
    from poetjax import distributed as dist

    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": fsdp})  # spec_for only reads the axis sizes
    out = {"w0": 0, "sharded": 0, "replicated": 0, "other": 0}
    for role, shape, nbytes in leaves:
        if role == dist.W0:
            out["w0"] += nbytes
        elif role in (dist.GENERATOR, dist.TRAINABLE):
            spec = dist.spec_for(role, shape, mesh, min_shard_size)
            out["sharded" if any(a is not None for a in spec) else "replicated"] += nbytes
        else:
            out["other"] += nbytes
    return out


def step_bytes(method: str, layout: str, b: dict[str, int], n: int, merge_interval: int) -> float:
    """Bytes one device sends per step (the formulas of the module docstring)."""
    f = (n - 1) / n
    if method == "adamw":
        total = b["sharded"] + b["replicated"]
        return 2 * f * total if layout == "dp" else 3 * f * total
    if layout == "dp":
        return 2 * f * (b["sharded"] + b["replicated"])
    return 2 * f * (b["w0"] + b["replicated"]) + 3 * f * b["sharded"] + f * b["w0"] / merge_interval


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated config files")
    ap.add_argument("--devices", default="8,64", help="comma-separated device counts n")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides applied to every config")
    args = ap.parse_args(argv)

    from poetjax.run_config import load_config

    counts = [int(x) for x in args.devices.split(",")]
    print(f"{'config':<12}{'method':<8}{'layout':<6}{'trainable':>11}{'W0':>9}"
          + "".join(f"{f'n={n} GB/step':>15}" for n in counts) + f"{'vs AdamW':>10}")
    for path in args.configs.split(","):
        rows = {}
        for method in ("adamw", "poet"):
            cfg = load_config(os.path.join(ROOT, path) if not os.path.isabs(path) else path,
                              [f"optimizer.name={method}", *args.overrides])
            leaves = model_leaves(cfg)
            for layout in ("dp", "fsdp"):
                per_n = []
                for n in counts:
                    b = role_bytes(leaves, n if layout == "fsdp" else 1, cfg.mesh.min_shard_size)
                    per_n.append(step_bytes(method, layout, b, n, cfg.poet.merge_interval))
                rows[(method, layout)] = (b, per_n)
        for (method, layout), (b, per_n) in rows.items():
            base = rows[("adamw", layout)][1][-1]
            trainable = (b["sharded"] + b["replicated"]) / 1e9
            print(f"{cfg.name:<12}{method:<8}{layout:<6}{trainable:>9.2f}GB{b['w0'] / 1e9:>7.2f}GB"
                  + "".join(f"{x / 1e9:>15.3f}" for x in per_n) + f"{per_n[-1] / base:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
