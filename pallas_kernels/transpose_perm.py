"""Permutations that also transpose: token-major (T, C) ↔ feature-major (R, T) activations, Pallas/Triton.

Legend: T tokens (leading dims flattened), C columns of the token-major side, R ≥ C rows of the
feature-major side, ``idx`` a permutation of range(R) (int32, length R).

    transpose_scatter(x, idx)            out (R, T),  out[idx[c], t] = x[t, c]  (rows idx[C:] get 0)
    gather_transpose(z, idx, num_out=C)  out (T, C),  out[t, c] = z[idx[c], t]

Why. A POET-X layer permutes the feature axis of its activations twice per pass (spec §5.1). On the
token-major (T, C) layout that is a gather along the contiguous axis: every warp touches ~32 scattered
2-byte elements per access, and both XLA's gather and in-kernel gathered loads ran far below the memory
bandwidth (docs/benchmark_log.md, run 1). On a feature-major (R, T) layout the same permutation moves
whole contiguous rows of T. These kernels do the permutation while changing layout, so every load and
every store is contiguous: a program owns a (block_t × block_c) tile, reads it with coalesced loads,
transposes it in registers/shared memory and writes block_c rows of block_t contiguous tokens each
(``transpose_scatter`` scatters whole rows, ``gather_transpose`` gathers whole rows). Between them, the
layer's block rotations and its dense matmul run on the feature-major layout (``poetjax.ops``), where a
block of the permuted basis is a contiguous slab of rows.

The two kernels are each other's VJP (a permutation's transpose is its inverse): the cotangent of
``transpose_scatter`` is ``gather_transpose`` of the cotangent with the same ``idx``, and vice versa, with
the rows idx[C:] (padding of a ragged last block) receiving no cotangent. A ragged side (C < R) is
handled by padding the token-major operand with R − C zero columns first (one extra pass, only then).

Both kernels only move data: results are bit-exact copies, on any backend. No program writes memory
another program writes (each output element has exactly one producer), so there is no cross-program
accumulation (JAX_NOTES pitfall 2).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import check_index_vector, check_launch, check_tile, compiler_params, max_tile


@dataclasses.dataclass(frozen=True)
class TransposeConfig:
    """Tiles of the transposing permutation kernels: block_t tokens × block_c columns per program.

    block_c is capped by the largest power of two dividing R (it must tile R exactly, so that every
    program reads a full slice of ``idx``); block_t is masked at the ragged end of T.
    """

    block_t: int = 64
    block_c: int = 64
    num_warps: int = 4
    num_stages: int = 1

    def validate(self) -> "TransposeConfig":
        check_tile("TransposeConfig", "block_t", self.block_t, None)
        check_tile("TransposeConfig", "block_c", self.block_c, None)
        check_launch("TransposeConfig", self.num_warps, self.num_stages)
        return self

    def c_tile(self, rows: int) -> int:
        return max_tile(rows, self.block_c)


def default_transpose_config() -> TransposeConfig:
    from pallas_kernels.tuning import transpose_config  # local: tuning imports this module's config
    return transpose_config()


# ----------------------------------------------------------------------------------------------
# References (plain jnp; the XLA path of poetjax.ops uses the same formulas)
# ----------------------------------------------------------------------------------------------

def transpose_scatter_reference(x_TxC, idx_R):
    """out (R, T) with out[idx[c]] = x[:, c] for c < C and zero rows at idx[C:]."""
    r, c = idx_R.shape[0], x_TxC.shape[-1]
    inv = jnp.argsort(idx_R).astype(jnp.int32)   # out row j holds column inv[j] (≥ C: a padding row)
    return jnp.take(x_TxC.T, inv, axis=0, mode="fill", fill_value=0) if c < r else jnp.take(x_TxC.T, inv, axis=0)


def gather_transpose_reference(z_RxT, idx_R, num_out: int):
    """out (T, C) with out[:, c] = z[idx[c]] for c < C = num_out."""
    return jnp.take(z_RxT, idx_R[:num_out], axis=0).T


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

def _scatter_kernel(x_ref, idx_ref, o_ref, *, t, bt, bc):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bt + jnp.arange(bt)                       # tokens
    ok = rows < t
    cols = j * bc + jnp.arange(bc)                       # columns of x (R of them after padding)
    dst = idx_ref[pl.ds(j * bc, bc)]                     # their rows in the output
    tile = plt.load(x_ref.at[rows[:, None], cols[None, :]], mask=jnp.broadcast_to(ok[:, None], (bt, bc)),
                    other=0)
    plt.store(o_ref.at[dst[:, None], rows[None, :]], tile.T, mask=jnp.broadcast_to(ok[None, :], (bc, bt)))


def _gather_kernel(z_ref, idx_ref, o_ref, *, t, c, bt, bc):
    i, j = pl.program_id(0), pl.program_id(1)
    rows = i * bt + jnp.arange(bt)                       # tokens
    ok = rows < t
    cols = j * bc + jnp.arange(bc)                       # output columns
    col_ok = cols < c
    src = idx_ref[pl.ds(j * bc, bc)]                     # the rows of z they come from
    tile = plt.load(z_ref.at[src[:, None], rows[None, :]], mask=col_ok[:, None] & ok[None, :], other=0)
    plt.store(o_ref.at[rows[:, None], cols[None, :]], tile.T, mask=ok[:, None] & col_ok[None, :])


def _transpose_scatter_call(x_TxR, idx, cfg: TransposeConfig, interpret: bool):
    t, r = x_TxR.shape
    bt, bc = cfg.block_t, cfg.c_tile(r)
    kernel = functools.partial(_scatter_kernel, t=t, bt=bt, bc=bc)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((r, t), x_TxR.dtype),
                          grid=(pl.cdiv(t, bt), r // bc), compiler_params=compiler_params(cfg),
                          interpret=interpret, name="transpose_scatter")(x_TxR, idx)


def _gather_transpose_call(z_RxT, idx, num_out: int, cfg: TransposeConfig, interpret: bool):
    r, t = z_RxT.shape
    bt, bc = cfg.block_t, cfg.c_tile(r)
    kernel = functools.partial(_gather_kernel, t=t, c=num_out, bt=bt, bc=bc)
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((t, num_out), z_RxT.dtype),
                          grid=(pl.cdiv(t, bt), pl.cdiv(num_out, bc)), compiler_params=compiler_params(cfg),
                          interpret=interpret, name="gather_transpose")(z_RxT, idx)


def _pad_columns(x_TxC, r: int):
    c = x_TxC.shape[1]
    return x_TxC if c == r else jnp.pad(x_TxC, ((0, 0), (0, r - c)))


# ----------------------------------------------------------------------------------------------
# custom_vjp: each kernel's cotangent is the other kernel
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _scatter(x_TxC, idx, cfg, interpret):
    return _transpose_scatter_call(_pad_columns(x_TxC, idx.shape[0]), idx, cfg, interpret)


def _scatter_fwd(x_TxC, idx, cfg, interpret):
    return _scatter(x_TxC, idx, cfg, interpret), (idx, x_TxC.shape[1])


def _scatter_bwd(cfg, interpret, res, g_RxT):
    idx, c = res
    return _gather_transpose_call(g_RxT, idx, c, cfg, interpret), None


_scatter.defvjp(_scatter_fwd, _scatter_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _gather(z_RxT, idx, num_out, cfg, interpret):
    return _gather_transpose_call(z_RxT, idx, num_out, cfg, interpret)


def _gather_fwd(z_RxT, idx, num_out, cfg, interpret):
    return _gather(z_RxT, idx, num_out, cfg, interpret), idx


def _gather_bwd(num_out, cfg, interpret, idx, g_TxC):
    return _transpose_scatter_call(_pad_columns(g_TxC, idx.shape[0]), idx, cfg, interpret), None


_gather.defvjp(_gather_fwd, _gather_bwd)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _config(cfg: TransposeConfig | None) -> TransposeConfig:
    if cfg is None:
        return default_transpose_config()
    if not isinstance(cfg, TransposeConfig):
        raise TypeError(f"config must be a TransposeConfig, got {type(cfg).__name__}")
    return cfg.validate()


def _check_rows(idx, what: str) -> int:
    check_index_vector("idx", idx)
    r = int(idx.shape[0])
    if r % 16:
        raise ValueError(f"{what}: idx has length {r}; the kernels need a multiple of 16 (a POET block side "
                         "J·K with K a multiple of 16)")
    return r


def transpose_scatter(x, idx, *, interpret: bool = False, config: TransposeConfig | None = None):
    """out (R, T) = the permuted transpose of x (..., C): out[idx[c], t] = x[t, c], zero rows at idx[C:].

    x: (..., C) float, leading dims flattened into T; idx: (R,) int32, a permutation of range(R), R ≥ C,
    R a multiple of 16. Differentiable in x (the cotangent is ``gather_transpose``). The kernel assumes
    ``idx`` is a permutation (every output row written once); it is not checked on device.
    """
    r = _check_rows(idx, "transpose_scatter")
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array (..., C), got shape {tuple(x.shape)} dtype {x.dtype}")
    c = x.shape[-1]
    if c > r:
        raise ValueError(f"transpose_scatter: x has {c} columns but idx only {r} entries (need C ≤ R)")
    x2 = x.reshape(-1, c)
    if x2.shape[0] == 0:
        return jnp.zeros((r, 0), x.dtype)
    return _scatter(x2, idx.astype(jnp.int32), _config(config), bool(interpret))


def gather_transpose(z, idx, num_out: int | None = None, *, interpret: bool = False,
                     config: TransposeConfig | None = None):
    """out (T, C) = the transpose of z (R, T) with permuted rows: out[t, c] = z[idx[c], t], c < C.

    z: (R, T) float; idx: (R,) int32, a permutation of range(R) (R a multiple of 16); num_out: C ≤ R
    (default R) — the rows idx[C:] are dropped. Differentiable in z (the cotangent is
    ``transpose_scatter``, zero on the dropped rows). Reshape the (T, C) result to your leading dims.
    """
    r = _check_rows(idx, "gather_transpose")
    if z.ndim != 2 or z.shape[0] != r or not jnp.issubdtype(z.dtype, jnp.floating):
        raise ValueError(f"z must be a floating (R={r}, T) array, got shape {tuple(z.shape)} dtype {z.dtype}")
    c = r if num_out is None else int(num_out)
    if not 0 < c <= r:
        raise ValueError(f"gather_transpose: num_out={num_out!r} must be in [1, {r}]")
    if z.shape[1] == 0:
        return jnp.zeros((0, c), z.dtype)
    return _gather(z, idx.astype(jnp.int32), c, _config(config), bool(interpret))
