"""Default kernel configurations, by kernel and block size.

``TABLE`` holds configurations chosen by measurement on a GPU: run
``python benchmarks/layer_bench.py --sweep`` (``benchmarks/kernel_sweep.py``) on the target GPU, which times a small grid of tiles, warps
and stages per kernel and prints the best ones as a ``TABLE`` literal to paste here (with the device
and date in the comment). Block sizes missing from the table use the heuristics below, which are
reasoned guesses, not measurements.

Keys: ``(kernel, block_size)`` with kernel one of "rotate_fwd" (gather → rotate, and rotate →
scatter), "rotate_bwd" (the mirror rotation by Rᵀ), "reduce" (dR over tokens) — each also as
"<kernel>/chunked", the tiles for chunked index vectors (``--sweep --sweep-chunk C``) — "loop_bwd/chunked"
(the token-loop kernel, ``LoopConfig``, for the backward rotations with dR folded in; used for chunked
vectors only, and only when present), "cayley" (and
"cayley/<precision>", tiles for one product precision, e.g. "cayley/bf16"); values: the fields of the
matching config dataclass in ``pallas_kernels._common``.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels._common import (BlockMatmulConfig, CayleyConfig, LoopConfig, ReduceConfig, RotateConfig,
                                    check_block_size, fit_cayley, fit_loop, fit_reduce, fit_rotate, supports_chunk)

# Measured defaults (read-only data: the kernels look entries up, nothing assigns them at run time); each entry's
# comment names the device, the date and the sweep that chose it (see the module docstring).
# NVIDIA H100 80GB HBM3 (gpu), jax 0.11.2, 2026-11-23, python benchmarks/layer_bench.py --sweep
TABLE: dict[tuple[str, int], dict] = {
    ('rotate_fwd', 256): {'block_t': 64, 'block_k': 16, 'block_n': 0, 'num_warps': 8, 'num_stages': 4},  # 1.093 ms
    ('rotate_bwd', 256): {'block_t': 32, 'block_k': 32, 'block_n': 0, 'num_warps': 8, 'num_stages': 3},  # 1.129 ms
    ('reduce', 256): {'block_t': 32, 'block_m': 128, 'block_n': 128, 'num_chunks': 0, 'num_warps': 4,
                      'num_stages': 3},  # 0.101 ms
    # NVIDIA H200, jax 0.11.2, 2026-12-01, layer_bench.py --sweep --sweep-kernels cayley (dense-Q kernels)
    ('cayley', 256): {'block_m': 64, 'block_k': 32, 'num_warps': 4, 'num_stages': 3},  # 0.742 ms (16+43 blocks)
    # NVIDIA H200, jax 0.11.2, 2026-12-02, layer_bench.py --sweep --sweep-chunk 64 (T=16384, width 4096, bf16;
    # rotate_*: the gathering + the scattering kernel together; reduce: re-gathering x, as the chunked path does)
    ('rotate_fwd/chunked', 256): {'block_t': 128, 'block_k': 64, 'block_n': 128, 'num_warps': 4,
                                  'num_stages': 3},  # 0.277 ms
    ('rotate_bwd/chunked', 256): {'block_t': 128, 'block_k': 64, 'block_n': 128, 'num_warps': 4,
                                  'num_stages': 3},  # 0.275 ms
    ('reduce/chunked', 256): {'block_t': 32, 'block_m': 64, 'block_n': 64, 'num_chunks': 0, 'num_warps': 4,
                              'num_stages': 3},  # 0.123 ms
    # NVIDIA H200, jax 0.11.2, 2026-12-02, layer_bench.py --sweep --sweep-chunk 64 --sweep-kernels loop_fwd,loop_bwd
    # (T=16384, width 4096, bf16; loop_fwd has since been deleted): the two backward rotations with dR folded in.
    ('loop_bwd/chunked', 256): {'block_t': 64, 'block_n': 64, 'block_p': 64, 'num_chunks': 0, 'waves': 2,
                                'num_warps': 4, 'num_stages': 3},  # 0.478 ms
}


def _rotate_heuristic(block_size: int) -> RotateConfig:
    # One program owns block_t tokens × the whole block when it fits in registers: the x tile is then
    # read once and R[j] once per token tile (both dominate L2 traffic at K = 256); the float32
    # accumulator is block_t × K, i.e. 64 registers per thread at 8 warps for 64 × 256.
    block_n = 0 if block_size <= 256 else 256
    warps = 4 if block_size <= 64 else 8
    return fit_rotate(RotateConfig(block_t=64, block_k=32, block_n=block_n, num_warps=warps, num_stages=3),
                      block_size)


def _reduce_heuristic(block_size: int) -> ReduceConfig:
    return fit_reduce(ReduceConfig(block_t=64, block_m=64, block_n=64, num_chunks=0, num_warps=4, num_stages=3),
                      block_size)


def _cayley_heuristic(block_size: int) -> CayleyConfig:
    return fit_cayley(CayleyConfig(block_m=64, block_k=32, num_warps=4, num_stages=2), block_size)


def _lookup(kernel: str, block_size: int, default):
    entry = TABLE.get((kernel, block_size))
    return default if entry is None else dataclasses.replace(default, **entry)


def _loop_lookup(kernel: str, block_size: int) -> LoopConfig | None:
    entry = TABLE.get((kernel, block_size))
    return None if entry is None else fit_loop(LoopConfig(**entry), block_size)


def block_matmul_config(block_size: int, chunk: int = 1) -> BlockMatmulConfig:
    """The default configuration of the fused permutation + block-diagonal kernels for this K (and for
    index vectors chunked in runs of ``chunk``, see ``pallas_kernels.block_matmul``)."""
    check_block_size(block_size)
    chunked = supports_chunk(chunk)

    def lookup(kernel, default):
        cfg = _lookup(kernel, block_size, default)
        return _lookup(f"{kernel}/chunked", block_size, cfg) if chunked else cfg

    # With chunked index vectors (runs of ≥ 16 columns) a gathered read costs about what a contiguous one
    # does, so the dR reduction gathers again instead of the gathering kernel also writing the gathered
    # operand (saves one write per side); and the backward rotations run the token-loop kernel, dR folded
    # in, where TABLE has tiles for it ("loop_bwd/chunked").
    cfg = BlockMatmulConfig(
        forward=lookup("rotate_fwd", _rotate_heuristic(block_size)),
        backward=lookup("rotate_bwd", _rotate_heuristic(block_size)),
        reduce=lookup("reduce", _reduce_heuristic(block_size)),
        save_gathered=not chunked,
        backward_loop=_loop_lookup("loop_bwd/chunked", block_size) if chunked else None)
    return cfg.validate(block_size)


def cayley_config(block_size: int, precision: str | None = None) -> CayleyConfig:
    """The default configuration of the Cayley–Neumann kernels for this K (with ``precision`` given, the
    tiles measured for it — TABLE key "cayley/<precision>" — else those of "cayley", and that precision)."""
    check_block_size(block_size)
    cfg = _lookup("cayley", block_size, _cayley_heuristic(block_size))
    if precision is not None:
        cfg = _lookup(f"cayley/{precision}", block_size, dataclasses.replace(cfg, precision=precision))
    return cfg.validate(block_size)


# The transposing permutations (pallas_kernels.transpose_perm) do not depend on K: one entry, key 0.
# NVIDIA H200, jax 0.11.2, 2026-12-01, layer_bench.py --perm-sweep (T=16384, D=4096, bf16): scatter 0.087 ms,
# gather 0.079 ms (3.1 / 3.4 TB/s; a plain copy ran at 3.0 TB/s in the same run)
TRANSPOSE_TABLE: dict[str, int] = {"block_t": 128, "block_c": 128, "num_warps": 8}


def transpose_config() -> "TransposeConfig":
    """The default tiles of ``transpose_scatter`` / ``gather_transpose`` (``TRANSPOSE_TABLE`` overrides)."""
    from pallas_kernels.transpose_perm import TransposeConfig
    return dataclasses.replace(TransposeConfig(), **TRANSPOSE_TABLE).validate()
