"""Shared pieces of the Pallas kernels: block configurations, compiler params, validation, lowering helpers.

Block configurations are frozen dataclasses (hashable, so they can be static arguments of ``jit`` and
``custom_vjp``). Every tile is a power of two ≥ 16 that divides what it tiles: Triton's ``dot`` needs
operands of at least 16×16 and every in-kernel array must have a power-of-two size. Defaults come from
``pallas_kernels.tuning`` (a small table a GPU sweep fills) and fall back to the heuristics below.

Everything here imports on a machine without a GPU; nothing touches a device at import time.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Streaming multiprocessors of an H100 SXM: used only to size grids (how many token chunks the
# two-stage reductions split into); any GPU works with any value.
NUM_SMS = 132

PRECISIONS = ("tf32x3", "ieee", "tf32", "bf16")
MIN_TILE = 16


def default_interpret() -> bool:
    """Whether callers that do not choose should run the kernels in Pallas's interpreter: yes unless
    the default backend is a GPU. Looked up at call (trace) time, never at import."""
    return jax.default_backend() != "gpu"


def is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


def supports_block_size(block_size: int) -> bool:
    """True when the kernels can run blocks of this size (a multiple of 16: tiles are powers of two ≥ 16)."""
    return isinstance(block_size, int) and block_size >= MIN_TILE and block_size % MIN_TILE == 0


def check_block_size(block_size: int) -> None:
    if not supports_block_size(block_size):
        raise ValueError(
            f"block_size={block_size!r} is not supported by the Pallas kernels: it must be a multiple of "
            f"{MIN_TILE} (Triton dots need power-of-two tiles of at least {MIN_TILE}); use impl='xla'")


def chunk_tile(chunk: int, cap: int) -> int:
    """The run width the kernels index by for a ``chunk``-chunked index vector (``pallas_kernels.block_matmul``):
    the largest power of two dividing chunk, capped at cap; 0 when that is narrower than a Triton dot allows
    (chunk = 1 included: then they index column by column)."""
    w = min(chunk & -chunk, cap)
    return w if w >= MIN_TILE else 0


def supports_chunk(chunk: int) -> bool:
    """True when the kernels can index a ``chunk``-chunked vector one run at a time (runs of ≥ 16 columns)."""
    return chunk_tile(chunk, MIN_TILE) > 0


def max_tile(block_size: int, cap: int) -> int:
    """The largest power of two ≤ cap that divides block_size (≥ 16 for supported block sizes)."""
    t = block_size & -block_size  # largest power-of-two divisor
    return min(t, cap)


def check_tile(owner: str, name: str, value: int, block_size: int | None) -> None:
    if not is_pow2(value) or value < MIN_TILE:
        raise ValueError(f"{owner}.{name}={value!r} must be a power of two ≥ {MIN_TILE}")
    if block_size is not None and block_size % value:
        raise ValueError(f"{owner}.{name}={value} does not divide block_size={block_size}")


def check_launch(owner: str, num_warps: int, num_stages: int) -> None:
    if num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{owner}.num_warps={num_warps!r} must be one of 1, 2, 4, 8, 16")
    if not isinstance(num_stages, int) or not 1 <= num_stages <= 8:
        raise ValueError(f"{owner}.num_stages={num_stages!r} must be an int in [1, 8]")


@dataclasses.dataclass(frozen=True)
class RotateConfig:
    """Tiles of the token × block rotation kernels (out[t, j·K + c] = Σ_k in[t, j·K + k]·R[j, k, c]).

    block_t: tokens per program; block_k: rows of R (the contraction) per loop step;
    block_n: output columns per program (0 = the whole block, K).
    """

    block_t: int = 64
    block_k: int = 32
    block_n: int = 0
    num_warps: int = 8
    num_stages: int = 3

    def validate(self, block_size: int | None = None) -> "RotateConfig":
        check_tile("RotateConfig", "block_t", self.block_t, None)
        check_tile("RotateConfig", "block_k", self.block_k, block_size)
        if self.block_n:
            check_tile("RotateConfig", "block_n", self.block_n, block_size)
        check_launch("RotateConfig", self.num_warps, self.num_stages)
        return self

    def n_tile(self, block_size: int) -> int:
        """Output columns per program: block_n, or the whole block — its largest power-of-two divisor when
        K is not a power of two (Triton arrays must be; e.g. K = 96 runs 3 tiles of 32)."""
        return self.block_n or max_tile(block_size, block_size)


def token_chunks(num_tokens: int, block_t: int, num_chunks: int, per_chunk: int, waves: int) -> int:
    """How many token chunks a two-stage reduction splits into: num_chunks when given, else enough for about
    ``waves`` programs per SM with per_chunk programs per chunk; never more than the token tiles."""
    tiles = max(1, -(-num_tokens // block_t))
    if num_chunks:
        return min(num_chunks, tiles)
    return max(1, min(tiles, -(-waves * NUM_SMS // per_chunk)))


@dataclasses.dataclass(frozen=True)
class ReduceConfig:
    """Tiles of the two-stage token reduction dR[j] = Σ_t a[t, j-block]ᵀ · b[t, j-block].

    Stage 1 (kernel): every program owns a (block_m × block_n) tile of one block's dR and loops over the
    block_t-token tiles of one token chunk, accumulating in float32 registers; stage 2 (XLA) sums the
    ``num_chunks`` partial results. No program ever adds into memory another program writes.
    num_chunks = 0 picks enough chunks to give about two programs per SM.
    """

    block_t: int = 64
    block_m: int = 64
    block_n: int = 64
    num_chunks: int = 0
    num_warps: int = 4
    num_stages: int = 3

    def validate(self, block_size: int | None = None) -> "ReduceConfig":
        check_tile("ReduceConfig", "block_t", self.block_t, None)
        check_tile("ReduceConfig", "block_m", self.block_m, block_size)
        check_tile("ReduceConfig", "block_n", self.block_n, block_size)
        if not isinstance(self.num_chunks, int) or self.num_chunks < 0:
            raise ValueError(f"ReduceConfig.num_chunks={self.num_chunks!r} must be an int ≥ 0 (0 = automatic)")
        check_launch("ReduceConfig", self.num_warps, self.num_stages)
        return self

    def chunks(self, num_tokens: int, num_blocks: int, block_size: int) -> int:
        per_chunk = num_blocks * (block_size // self.block_m) * (block_size // self.block_n)
        return token_chunks(num_tokens, self.block_t, self.num_chunks, per_chunk, waves=2)


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Tiles of the token-loop rotation kernel, which can also fold the dR reduction into the pass.

    A program owns block_n output columns of one block j and loops over the block_t-token tiles of one
    token chunk. Per tile it loads the input's whole block row (bt × K) in block_p-wide pieces, multiplies
    them by the matching (block_p × block_n) pieces of R[j] (re-read per tile), and stores the (bt × block_n)
    result. With a reduction it also loads the (bt × block_n) tile of the second dR operand at the output's
    columns and accumulates its product with the pieces — a (block_n × K) float32 slice of dR[j] per
    program — which stage 2 (XLA) sums over the chunks. num_chunks = 0 picks enough chunks for about ``waves`` programs per SM.
    """

    block_t: int = 64
    block_n: int = 64
    block_p: int = 64
    num_chunks: int = 0
    waves: int = 2
    num_warps: int = 8
    num_stages: int = 3

    def validate(self, block_size: int | None = None) -> "LoopConfig":
        check_tile("LoopConfig", "block_t", self.block_t, None)
        check_tile("LoopConfig", "block_n", self.block_n, block_size)
        check_tile("LoopConfig", "block_p", self.block_p, block_size)
        if not isinstance(self.num_chunks, int) or self.num_chunks < 0:
            raise ValueError(f"LoopConfig.num_chunks={self.num_chunks!r} must be an int ≥ 0 (0 = automatic)")
        if not isinstance(self.waves, int) or self.waves < 1:
            raise ValueError(f"LoopConfig.waves={self.waves!r} must be an int ≥ 1")
        check_launch("LoopConfig", self.num_warps, self.num_stages)
        return self

    def chunks(self, num_tokens: int, num_blocks: int, block_size: int) -> int:
        return token_chunks(num_tokens, self.block_t, self.num_chunks, num_blocks * (block_size // self.block_n),
                            self.waves)


@dataclasses.dataclass(frozen=True)
class BlockMatmulConfig:
    """Everything the fused permutation + block-diagonal kernels need, forward and backward.

    forward:  the rotation that reads (or writes) through the permutation;
    backward: the mirror rotation by Rᵀ that produces the input cotangent;
    reduce:   the dR reduction over tokens;
    save_gathered: the kernel that gathers also writes the gathered operand (x[..., perm] in the
        forward of ``permuted_block_matmul``, g[..., inv_perm] in the backward of
        ``block_matmul_permuted``) so that the dR reduction reads it contiguously instead of gathering
        a second time. Costs one contiguous write (and, in the forward, keeps that array as a residual).
    backward_loop: when set, each backward rotation runs the token-loop kernel and computes dR in the
        same pass (``reduce`` and ``save_gathered`` are then unused: the second dR operand is read at
        the output's columns, re-gathered where it is x).
    """

    forward: RotateConfig = RotateConfig()
    backward: RotateConfig = RotateConfig()
    reduce: ReduceConfig = ReduceConfig()
    save_gathered: bool = True
    backward_loop: LoopConfig | None = None

    def validate(self, block_size: int | None = None) -> "BlockMatmulConfig":
        self.forward.validate(block_size)
        self.backward.validate(block_size)
        self.reduce.validate(block_size)
        if not isinstance(self.save_gathered, bool):
            raise ValueError(f"BlockMatmulConfig.save_gathered={self.save_gathered!r} must be a bool")
        loop = self.backward_loop
        if loop is not None:
            if not isinstance(loop, LoopConfig):
                raise TypeError(f"BlockMatmulConfig.backward_loop must be a LoopConfig or None, "
                                f"got {type(loop).__name__}")
            loop.validate(block_size)
        return self


@dataclasses.dataclass(frozen=True)
class CayleyConfig:
    """Tiles of the Cayley–Neumann kernels: every K×K product is tiled in square block_m × block_m tiles
    (square so that a program can also write the transposed tile of a symmetric or skew result),
    block_k deep.

    precision: how the float32 products run on the GPU: "tf32x3" (three TF32 tensor-core passes,
    float32-accurate to ~1e-6), "ieee" (exact float32 on CUDA cores, slower), "tf32" (one pass,
    ~1e-3: not accurate enough for the tests), "bf16" (operands rounded to bfloat16, float32 sums: the
    tensor cores' full rate; ~4e-3·‖Q‖ relative on the Q², Q³, Q⁴ terms). Interpret mode computes exact
    float32, except that "bf16" rounds the operands there too (the same numbers as on the GPU).
    """

    block_m: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 2
    precision: str = "tf32x3"

    def validate(self, block_size: int | None = None) -> "CayleyConfig":
        for name in ("block_m", "block_k"):
            check_tile("CayleyConfig", name, getattr(self, name), block_size)
        check_launch("CayleyConfig", self.num_warps, self.num_stages)
        if self.precision not in PRECISIONS:
            raise ValueError(f"CayleyConfig.precision={self.precision!r} must be one of {PRECISIONS}")
        return self


def fit_rotate(cfg: RotateConfig, block_size: int) -> RotateConfig:
    """Shrink tiles that do not divide a (smaller) block size (block_n = K is spelled 0)."""
    block_n = max_tile(block_size, cfg.block_n) if cfg.block_n else 0
    return dataclasses.replace(cfg, block_k=max_tile(block_size, cfg.block_k),
                               block_n=0 if block_n == block_size else block_n)


def fit_loop(cfg: LoopConfig, block_size: int) -> LoopConfig:
    return dataclasses.replace(cfg, block_n=max_tile(block_size, cfg.block_n),
                               block_p=max_tile(block_size, cfg.block_p))


def fit_reduce(cfg: ReduceConfig, block_size: int) -> ReduceConfig:
    return dataclasses.replace(cfg, block_m=max_tile(block_size, cfg.block_m),
                               block_n=max_tile(block_size, cfg.block_n))


def fit_cayley(cfg: CayleyConfig, block_size: int) -> CayleyConfig:
    return dataclasses.replace(cfg, block_m=max_tile(block_size, cfg.block_m),
                               block_k=max_tile(block_size, cfg.block_k))


def compiler_params(cfg) -> plt.CompilerParams:
    """Triton compiler params, always explicit: with none, jax 0.10.2 would pick Mosaic GPU (JAX_NOTES §2c)."""
    return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def dot_precision(dtype, precision: str, interpret: bool):
    """The ``precision`` argument of in-kernel dots: None (native MMA) for 16-bit inputs; for float32
    inputs exact float32 in interpret mode, the configured algorithm on the GPU."""
    if jnp.dtype(dtype) != jnp.float32:
        return None
    if interpret:
        return lax.Precision.HIGHEST
    if precision == "tf32x3":
        return lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    if precision == "ieee":
        return lax.Precision.HIGHEST
    if precision == "tf32":
        return lax.Precision.DEFAULT
    raise ValueError(f"precision={precision!r} must be one of {PRECISIONS}")


def dot(a, b, dims, precision, interpret: bool):
    """In-kernel product with a float32 result. The interpreter runs on XLA:CPU, which has no
    bf16 × bf16 → f32 dot: there the operands are widened first, which gives the same numbers (products
    of 16-bit floats are exact in float32, and both sum in float32)."""
    if interpret and a.dtype != jnp.float32:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        precision = lax.Precision.HIGHEST
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


# dimension numbers of in-kernel products
NT = (((1,), (0,)), ((), ()))    # a @ b
NN_T = (((1,), (1,)), ((), ()))  # a @ bᵀ
TN = (((0,), (0,)), ((), ()))    # aᵀ @ b


def tile_cols(idx_ref, start, size, run):
    """The columns idx[start : start + size] of one tile. run = 0: one load per column, shape (size,).
    run = w > 0 (a chunked vector, runs of w consecutive values at multiples of w): one load per run —
    shape (size,) when the tile lies in one run, else (size // w, w), each row a contiguous range."""
    if not run:
        return idx_ref[pl.ds(start, size)]
    w = min(run, size)
    if w == size:
        return pl.multiple_of(idx_ref[start], w) + jnp.arange(size)
    starts = pl.multiple_of(idx_ref[pl.ds(start, size // w, stride=w)], w)
    return starts[:, None] + jnp.arange(w)[None, :]


def tile_mask(row_ok, cols, width):
    """row_ok (bt, 1) and cols < width, broadcast to the tile's index shape ((bt, size) or (bt, q, w))."""
    if cols.ndim == 1:
        ok = row_ok if width is None else row_ok & (cols < width)[None, :]
        return jnp.broadcast_to(ok, (row_ok.shape[0], cols.shape[0]))
    ok = row_ok[:, :, None] if width is None else row_ok[:, :, None] & (cols < width)[None]
    return jnp.broadcast_to(ok, (row_ok.shape[0], *cols.shape))


def load_tile(ref, rows, row_ok, cols, width=None):
    """ref[rows, cols] as a (bt, size) tile, 0 where a row is past T or a column index ≥ width."""
    mask = tile_mask(row_ok, cols, width)
    if cols.ndim == 1:
        return plt.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0)
    tile = plt.load(ref.at[rows[:, None, None], cols[None]], mask=mask, other=0)
    return tile.reshape(rows.shape[0], cols.size)


def store_tile(ref, rows, row_ok, cols, value, width=None):
    """ref[rows, cols] = value (bt, size), skipping rows past T and column indices ≥ width."""
    mask = tile_mask(row_ok, cols, width)
    if cols.ndim == 1:
        plt.store(ref.at[rows[:, None], cols[None, :]], value, mask=mask)
    else:
        plt.store(ref.at[rows[:, None, None], cols[None]], value.reshape(rows.shape[0], *cols.shape), mask=mask)


def check_index_vector(name: str, idx, length: int | None = None) -> None:
    if idx.ndim != 1 or not jnp.issubdtype(idx.dtype, jnp.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got shape {tuple(idx.shape)} dtype {idx.dtype}")
    if length is not None and idx.shape[0] != length:
        raise ValueError(f"{name} has length {idx.shape[0]}, expected {length}")


def abstract_gpu_ctx(device_kind: str = "NVIDIA H100 80GB HBM3"):
    """Context in which ``jit(f).trace(...).lower(lowering_platforms=("cuda",))`` works without a GPU.

    jax 0.11 refuses to lower for CUDA on a host without GPUs unless an abstract GPU device is in
    scope (JAX_NOTES §2b); on 0.10.2 it is harmless.
    """
    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    if abstract_device is None:  # older jax: nothing needed
        return contextlib.nullcontext()
    dev = abstract_device(device_kind=device_kind, num_cores=None, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=dev))


def lower_for_gpu(fn, *args) -> str:
    """StableHLO text of ``jit(fn)`` lowered for CUDA (args may be ShapeDtypeStructs); no GPU needed."""
    with abstract_gpu_ctx():
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


TRITON_CALL_TARGET = "__gpu$xla.gpu.triton"
