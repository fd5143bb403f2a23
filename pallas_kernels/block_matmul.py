"""Fused permutation + block-diagonal rotation of activations (POET spec §5.1–5.2), Pallas/Triton.

Legend: T tokens (leading dims flattened), K block size, J blocks, D = J·K; N input width, M output width.

    permuted_block_matmul(x, perm, r)            y = x[..., perm] · blockdiag(R)     (T, N) → (T, D)
    block_matmul_permuted(h, perm, r, inv_perm)  y = (h · blockdiag(R))[..., perm]   (T, D) → (T, M)

The first is the input side of a POET-X layer (gather, then rotate), the second its output side
(rotate, then gather). Index conventions are those of ``poetjax.perms``: ``permuted_block_matmul``'s perm
has length D and values ≥ N read 0 (the padding of a ragged last block); ``block_matmul_permuted``'s
perm (M,) picks M distinct columns of the D and inv_perm (D,) is its inverse, inv_perm[perm[q]] = q,
with a value ≥ M on every column that is dropped. Both must be permutations on the real coordinates:
the kernels write every output element exactly once under that assumption.

One rotation kernel does all four data passes. A program owns block_t tokens × block_n columns of one
block j and loops over the K rows of R[j] in block_k steps (a pipelined matmul); it may read its input
through an index vector (the gather happens in the loads: x[rows, perm[cols]], masked where the index
is padding or the row is past T) and may write its output through one (a scatter in the stores, each
destination written once, so no atomics):

    forward of permuted_block_matmul   gather x by perm,          rotate by R,  contiguous store
    backward dx of it                  contiguous g,              rotate by Rᵀ, store to column perm[c]
    forward of block_matmul_permuted   contiguous h,              rotate by R,  store to column inv_perm[c]
    backward dh of it                  gather g by inv_perm,      rotate by Rᵀ, contiguous store

All four index through the block-side vector (perm of ``permuted_block_matmul``, inv_perm of
``block_matmul_permuted``), one block's K entries per program. A gather along the contiguous axis costs
one memory transaction per distinct cache line a warp touches, so index vectors sorted inside each
block — as ``poetjax.perms`` samples them, which is the same POET up to relabeling — make every warp
touch a few increasing lines instead of 32 random ones. Any index order gives the same result.

Chunked index vectors (``chunk`` = c > 1, ``poetjax.perms`` with ``perm_chunk``): every aligned run of c
entries is c consecutive values starting at a multiple of c (padding runs: c values ≥ the width). Told
so, the kernels read one index per run instead of one per column: with w the largest power of two
dividing c (w ≥ 16), a tile of size columns is size // w contiguous ranges [idx[s], idx[s] + w) — indexed
as a (rows, size // w, w) array whose last axis is contiguous and starts at a multiple of w
(``pl.multiple_of``), so that Triton can vectorize its loads and stores as it does for a plain array —
and any tile size works. A ``chunk`` the vectors do not have gives wrong results (the public functions
check concrete vectors).

Storing to column perm[c] is the inverse-permutation gather (g·blockdiag(Rᵀ))[..., inv] of the spec
done in the same pass that produces g·blockdiag(Rᵀ), so no permuted copy is ever materialized. The
gathering kernels can also write the gathered operand (``save_gathered``) so that the dR reduction reads
it contiguously instead of gathering again.

dR[j] = Σ_t a[t, j-block]ᵀ · b[t, j-block] is a reduction over tokens. On a GPU, grid programs run in
parallel, so no program may accumulate into memory that another writes (JAX_NOTES pitfall 2). Stage 1
(a kernel) gives every program one (block_m × block_n) tile of one block and one chunk of tokens, over
which it loops, accumulating in float32 registers; stage 2 sums the few chunk partials in XLA.

A second rotation kernel, the token loop (``LoopConfig``; ``BlockMatmulConfig.backward_loop``), runs the
backward rotations: it gives each program block_n columns of one block and a chunk of tokens to loop over,
and also loads the second dR operand at the output's columns (x re-gathered at perm, or h) and
accumulates that program's (block_n × K) slice of dR[j] from the same loads. Per chunk the partials go to
their own slot, and XLA sums them as in stage 2 above, so each side makes one backward pass instead of a
rotation and a reduction.

Accumulation is float32; activations are stored in the input dtype; dR is float32 until it is cast to
R's dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.experimental.pallas.triton as plt
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (NN_T, NT, TN, BlockMatmulConfig, LoopConfig, ReduceConfig, RotateConfig,
                                    check_block_size, check_index_vector, chunk_tile, compiler_params, dot,
                                    dot_precision, load_tile, store_tile, tile_cols)
from pallas_kernels.tuning import block_matmul_config


# Precision of float32 data on the GPU (bf16/f16 use the native MMA; interpret mode is exact).
_F32_PRECISION = "tf32x3"


# ----------------------------------------------------------------------------------------------
# References (plain jnp; also what the tests differentiate)
# ----------------------------------------------------------------------------------------------

def _rotate_reference(x_TxD, r_JxKxK):
    nb, k, _ = r_JxKxK.shape
    lead = x_TxD.shape[:-1]
    # Products of the input dtype, summed in float32 (what the kernels compute); widening first gives
    # the same numbers and runs on every backend.
    xw = x_TxD.reshape(*lead, nb, k).astype(jnp.float32)
    rw = r_JxKxK.astype(x_TxD.dtype).astype(jnp.float32)
    y = jnp.einsum("...bk,bkc->...bc", xw, rw, precision=lax.Precision.HIGHEST)
    return y.reshape(*lead, nb * k).astype(x_TxD.dtype)


def permuted_block_matmul_reference(x, perm, r):
    """x[..., perm] · blockdiag(r) with indices ≥ N reading 0; (..., N) → (..., J·K) in x.dtype."""
    return _rotate_reference(jnp.take(x, perm, axis=-1, mode="fill", fill_value=0), r)


def block_matmul_permuted_reference(h, perm, r):
    """(h · blockdiag(r))[..., perm]; (..., J·K) → (..., M) in h.dtype."""
    return jnp.take(_rotate_reference(h, r), perm, axis=-1)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

def _split_refs(refs, *present):
    """A kernel's refs in order, None for each optional one that is absent."""
    it = iter(refs)
    return [next(it) if p else None for p in present]


def _rotate_kernel(*refs, gather, scatter, save, transpose_r, t, w_in, w_out, k, bt, bk, bn, run, precision,
                   interpret):
    x_ref, src_ref, r_ref, dst_ref, o_ref, u_ref = _split_refs(refs, True, gather, True, scatter, True, save)

    j, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = i * bt + jnp.arange(bt)
    row_ok = (rows < t)[:, None]

    def body(s, acc):
        base = j * k + s * bk
        cols = base + jnp.arange(bk)
        if gather:
            xt = load_tile(x_ref, rows, row_ok, tile_cols(src_ref, base, bk, run), w_in)
        else:
            xt = load_tile(x_ref, rows, row_ok, cols)
        if save:
            def _save():
                store_tile(u_ref, rows, row_ok, cols, xt)
            if k == bn:   # one column tile: every program saves its own rows
                _save()
            else:         # several column tiles load the same x tile; the first one saves it
                pl.when(n == 0)(_save)
        if transpose_r:   # the (block_k × block_n) tile of R[j]ᵀ is the transposed (block_n × block_k) tile of R[j]
            rt = r_ref[j, pl.ds(n * bn, bn), pl.ds(s * bk, bk)]
            dims = NN_T
        else:
            rt = r_ref[j, pl.ds(s * bk, bk), pl.ds(n * bn, bn)]
            dims = NT
        return acc + dot(xt, rt, dims, precision, interpret)

    acc = lax.fori_loop(0, k // bk, body, jnp.zeros((bt, bn), jnp.float32))
    start = j * k + n * bn
    if scatter:
        store_tile(o_ref, rows, row_ok, tile_cols(dst_ref, start, bn, run), acc.astype(o_ref.dtype), w_out)
    else:
        store_tile(o_ref, rows, row_ok, start + jnp.arange(bn), acc.astype(o_ref.dtype))


def _rotate(x, r, *, cfg: RotateConfig, interpret: bool, src=None, dst=None, w_out=None,
            transpose_r=False, save=False, chunk=1):
    """One pass of the rotation kernel; returns out (and the gathered input when ``save``)."""
    t, w_in = x.shape
    nb, k, _ = r.shape
    d = nb * k
    bt, bk, bn = cfg.block_t, cfg.block_k, cfg.n_tile(k)
    run = chunk_tile(chunk, k) if src is not None or dst is not None else 0
    width = d if dst is None else w_out
    out_shape = [jax.ShapeDtypeStruct((t, width), x.dtype)]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((t, d), x.dtype))
    args = [x] + ([src] if src is not None else []) + [r.astype(x.dtype)] + ([dst] if dst is not None else [])
    kernel = functools.partial(
        _rotate_kernel, gather=src is not None, scatter=dst is not None, save=save, transpose_r=transpose_r,
        t=t, w_in=w_in, w_out=width, k=k, bt=bt, bk=bk, bn=bn, run=run,
        precision=dot_precision(x.dtype, _F32_PRECISION, interpret), interpret=interpret)
    name = ("gather_" if src is not None else "") + "rotate" + ("_t" if transpose_r else "") + (
        "_scatter" if dst is not None else "") + ("_chunked" if run else "")
    outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(nb, k // bn, pl.cdiv(t, bt)),
                          compiler_params=compiler_params(cfg), interpret=interpret, name=name)(*args)
    return outs if save else outs[0]


def _loop_kernel(*refs, gather, scatter, t, w_in, w_out, k, bt, bp, bn, tiles, run, precision, interpret):
    """Token-loop backward rotation: out[:, cols] = in[:, block j] · R[j]ᵀ[:, n-tile] over the token tiles of
    one chunk, with dR[j][n-tile, :] += a[:, cols]ᵀ · in[:, block j] from the same loads (cols: the output's
    columns, through the scatter index where there is one)."""
    f_ref, src_ref, r_ref, dst_ref, a_ref, o_ref, dr_ref = _split_refs(
        refs, True, gather, True, scatter, True, True, True)

    n, j, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start = j * k + n * bn
    if scatter:
        out_cols, out_w = tile_cols(dst_ref, start, bn, run), w_out
    else:
        out_cols, out_w = start + jnp.arange(bn), None
    pieces = k // bp
    in_cols = [tile_cols(src_ref, j * k + p * bp, bp, run) if gather else j * k + p * bp + jnp.arange(bp)
               for p in range(pieces)]

    def r_piece(p):   # the (bp × bn) piece of R[j]ᵀ, read as the (bn × bp) piece of R[j]
        return r_ref[j, pl.ds(n * bn, bn), pl.ds(p * bp, bp)]

    def body(s, drs):
        rows = (c * tiles + s) * bt + jnp.arange(bt)
        row_ok = (rows < t)[:, None]
        acc = jnp.zeros((bt, bn), jnp.float32)
        loaded = []
        for p in range(pieces):
            fp = load_tile(f_ref, rows, row_ok, in_cols[p], w_in if gather else None)
            loaded.append(fp)
            acc = acc + dot(fp, r_piece(p), NN_T, precision, interpret)
        store_tile(o_ref, rows, row_ok, out_cols, acc.astype(o_ref.dtype), out_w)
        at = load_tile(a_ref, rows, row_ok, out_cols, out_w)
        return tuple(d + dot(at, fp, TN, precision, interpret) for d, fp in zip(drs, loaded))

    init = tuple(jnp.zeros((bn, bp), jnp.float32) for _ in range(pieces))
    drs = lax.fori_loop(0, tiles, body, init)
    for p, d in enumerate(drs):
        dr_ref[c, j, pl.ds(n * bn, bn), pl.ds(p * bp, bp)] = d


def _rotate_loop(f, r, a, *, cfg: LoopConfig, interpret: bool, src=None, dst=None, w_out=None, chunk=1):
    """The token-loop backward rotation (``_loop_kernel``): (out = in · blockdiag(Rᵀ), dR (J, K, K) float32),
    dR[j] = Σ_t a[t, out-columns of block j]ᵀ · in[t, block j] (``in`` = f read through ``src``, out
    written through ``dst``)."""
    t, w_in = f.shape
    nb, k, _ = r.shape
    d = nb * k
    bt, bn = cfg.block_t, cfg.block_n
    run = chunk_tile(chunk, k) if src is not None or dst is not None else 0
    bp = min(cfg.block_p, run) if run else cfg.block_p
    width = d if dst is None else w_out
    chunks = cfg.chunks(t, nb, k)
    tiles = pl.cdiv(pl.cdiv(t, bt), chunks)
    out_shape = [jax.ShapeDtypeStruct((t, width), f.dtype), jax.ShapeDtypeStruct((chunks, nb, k, k), jnp.float32)]
    args = [f] + ([src] if src is not None else []) + [r.astype(f.dtype)] + ([dst] if dst is not None else []) + [a]
    kernel = functools.partial(
        _loop_kernel, gather=src is not None, scatter=dst is not None,
        t=t, w_in=w_in, w_out=width, k=k, bt=bt, bp=bp, bn=bn, tiles=tiles, run=run,
        precision=dot_precision(f.dtype, _F32_PRECISION, interpret), interpret=interpret)
    name = ("gather_" if src is not None else "") + "rotate_loop_t" + (
        "_scatter" if dst is not None else "") + "_reduce" + ("_chunked" if run else "")
    outs = pl.pallas_call(kernel, out_shape=out_shape, grid=(k // bn, nb, chunks),
                          compiler_params=compiler_params(cfg), interpret=interpret, name=name)(*args)
    out, partial_sums = outs
    return out, (partial_sums[0] if chunks == 1 else jnp.sum(partial_sums, axis=0))


def _reduce_kernel(*refs, gather_a, gather_b, t, w_a, w_b, k, bt, bm, bn, tiles, run, precision, interpret):
    a_ref, pa_ref, b_ref, pb_ref, o_ref = _split_refs(refs, True, gather_a, True, gather_b, True)

    j, m, n, c = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)

    def columns(idx_ref, start, size, width):
        if idx_ref is None:
            return start + jnp.arange(size), None
        return tile_cols(idx_ref, start, size, run), width

    ia, wa = columns(pa_ref, j * k + m * bm, bm, w_a)
    ib, wb = columns(pb_ref, j * k + n * bn, bn, w_b)

    def body(s, acc):
        rows = (c * tiles + s) * bt + jnp.arange(bt)
        row_ok = (rows < t)[:, None]
        at = load_tile(a_ref, rows, row_ok, ia, wa)
        btile = load_tile(b_ref, rows, row_ok, ib, wb)
        return acc + dot(at, btile, TN, precision, interpret)

    acc = lax.fori_loop(0, tiles, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[c, j, pl.ds(m * bm, bm), pl.ds(n * bn, bn)] = acc


def _reduce(a, b, num_blocks, k, *, cfg: ReduceConfig, interpret: bool, pa=None, pb=None, chunk=1):
    """dR (J, K, K) float32 = Σ_t a[t, j-block]ᵀ b[t, j-block], a/b optionally read through pa/pb
    (``chunk``-chunked: read one run at a time, as contiguous ranges)."""
    t = a.shape[0]
    bt, bm, bn = cfg.block_t, cfg.block_m, cfg.block_n
    run = chunk_tile(chunk, k) if pa is not None or pb is not None else 0
    chunks = cfg.chunks(t, num_blocks, k)
    tiles = pl.cdiv(pl.cdiv(t, bt), chunks)
    args = [a] + ([pa] if pa is not None else []) + [b] + ([pb] if pb is not None else [])
    kernel = functools.partial(
        _reduce_kernel, gather_a=pa is not None, gather_b=pb is not None, t=t, w_a=a.shape[1], w_b=b.shape[1],
        k=k, bt=bt, bm=bm, bn=bn, tiles=tiles, run=run,
        precision=dot_precision(a.dtype, _F32_PRECISION, interpret), interpret=interpret)
    partial_sums = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((chunks, num_blocks, k, k), jnp.float32),
        grid=(num_blocks, k // bm, k // bn, chunks), compiler_params=compiler_params(cfg),
        interpret=interpret, name="block_grad_partials" + ("_chunked" if run else ""))(*args)
    return partial_sums[0] if chunks == 1 else jnp.sum(partial_sums, axis=0)


# ----------------------------------------------------------------------------------------------
# custom_vjp: gather → rotate
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _gather_rotate(x, perm, r, n_in, cfg, interpret, chunk):
    return _gather_rotate_fwd(x, perm, r, n_in, cfg, interpret, chunk)[0]


def _gather_rotate_fwd(x, perm, r, n_in, cfg, interpret, chunk):
    save = cfg.save_gathered and cfg.backward_loop is None
    out = _rotate(x, r, cfg=cfg.forward, interpret=interpret, src=perm, save=save, chunk=chunk)
    if save:
        y, u = out
        return y, (u, perm, r)
    return out, (x, perm, r)


def _gather_rotate_bwd(n_in, cfg, interpret, chunk, res, g):
    xu, perm, r = res
    nb, k, _ = r.shape
    if cfg.backward_loop is not None:   # xu = x; one pass: dx scattered to perm, dR from x re-gathered at perm
        dx, dr = _rotate_loop(g, r, xu, cfg=cfg.backward_loop, interpret=interpret, dst=perm, w_out=n_in,
                              chunk=chunk)
        return dx, None, dr.astype(r.dtype)
    # dx[:, perm[c]] = (g · blockdiag(Rᵀ))[:, c]: the gather by the inverse permutation, as a scatter-store.
    dx = _rotate(g, r, cfg=cfg.backward, interpret=interpret, dst=perm, w_out=n_in, transpose_r=True, chunk=chunk)
    if cfg.save_gathered:   # xu = u = x[:, perm], contiguous
        dr = _reduce(xu, g, nb, k, cfg=cfg.reduce, interpret=interpret)
    else:                   # xu = x: gather again
        dr = _reduce(xu, g, nb, k, cfg=cfg.reduce, interpret=interpret, pa=perm, chunk=chunk)
    return dx, None, dr.astype(r.dtype)


_gather_rotate.defvjp(_gather_rotate_fwd, _gather_rotate_bwd)


# ----------------------------------------------------------------------------------------------
# custom_vjp: rotate → gather
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _rotate_gather(h, perm, inv_perm, r, cfg, interpret, chunk):
    return _rotate_gather_fwd(h, perm, inv_perm, r, cfg, interpret, chunk)[0]


def _rotate_gather_fwd(h, perm, inv_perm, r, cfg, interpret, chunk):
    # y[:, perm[q]] ... stored as: column c of h·blockdiag(R) goes to y[:, inv_perm[c]] (dropped when ≥ M).
    y = _rotate(h, r, cfg=cfg.forward, interpret=interpret, dst=inv_perm, w_out=perm.shape[0], chunk=chunk)
    return y, (h, inv_perm, r)


def _rotate_gather_bwd(cfg, interpret, chunk, res, g):
    h, inv_perm, r = res
    nb, k, _ = r.shape
    # g_z = g[:, inv_perm] (padding reads 0), dh = g_z · blockdiag(Rᵀ), dR = Σ hᵀ g_z.
    if cfg.backward_loop is not None:   # one pass: g gathered once for both
        dh, dr = _rotate_loop(g, r, h, cfg=cfg.backward_loop, interpret=interpret, src=inv_perm, chunk=chunk)
        return dh, None, None, dr.astype(r.dtype)
    out = _rotate(g, r, cfg=cfg.backward, interpret=interpret, src=inv_perm, transpose_r=True,
                  save=cfg.save_gathered, chunk=chunk)
    if cfg.save_gathered:
        dh, gz = out
        dr = _reduce(h, gz, nb, k, cfg=cfg.reduce, interpret=interpret)
    else:
        dh = out
        dr = _reduce(h, g, nb, k, cfg=cfg.reduce, interpret=interpret, pb=inv_perm, chunk=chunk)
    return dh, None, None, dr.astype(r.dtype)


_rotate_gather.defvjp(_rotate_gather_fwd, _rotate_gather_bwd)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check_r(r) -> tuple[int, int]:
    if r.ndim != 3 or r.shape[1] != r.shape[2]:
        raise ValueError(f"r must have shape (J, K, K), got {tuple(r.shape)}")
    if not jnp.issubdtype(r.dtype, jnp.floating):
        raise ValueError(f"r must be floating point, got dtype {r.dtype}")
    check_block_size(int(r.shape[1]))
    return int(r.shape[0]), int(r.shape[1])


def _config(cfg: BlockMatmulConfig | None, k: int, chunk: int = 1) -> BlockMatmulConfig:
    if cfg is None:
        return block_matmul_config(k, chunk)
    if not isinstance(cfg, BlockMatmulConfig):
        raise TypeError(f"config must be a BlockMatmulConfig, got {type(cfg).__name__}")
    return cfg.validate(k)


def check_chunked_index(name: str, idx, chunk: int, width: int) -> None:
    """ValueError unless ``chunk`` is a positive int and — when ``idx`` is concrete (not traced) — every
    aligned run of ``chunk`` entries of ``idx`` is either ``chunk`` consecutive values starting at a multiple
    of ``chunk`` below ``width``, or padding (values ≥ ``width``, the first a multiple of ``chunk``, as
    ``poetjax.perms`` pads). Traced vectors are trusted."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got chunk={chunk!r}")
    if chunk == 1:
        return
    if idx.shape[0] % chunk:
        raise ValueError(f"chunk={chunk} does not divide the length {idx.shape[0]} of {name}")
    if isinstance(idx, jax.core.Tracer):
        return
    runs = np.asarray(idx).reshape(-1, chunk).astype(np.int64)
    real = runs[:, 0] < width
    ok = (runs[:, 0] % chunk == 0) & np.where(real, np.all(runs == runs[:, :1] + np.arange(chunk), axis=1),
                                              np.all(runs >= width, axis=1))
    if not ok.all():
        q = int(np.argmin(ok))
        raise ValueError(f"{name} is not {chunk}-chunked: its run {q} (entries {q * chunk}..{(q + 1) * chunk - 1}) is "
                         f"{runs[q][:8].tolist()}{' ...' if chunk > 8 else ''}; sample it with perm_chunk={chunk} "
                         "(poetjax.perms) or pass chunk=1")


def inverse_index(perm, length: int):
    """inv (length,) with inv[perm[q]] = q and len(perm) where no q maps (dropped columns)."""
    m = perm.shape[0]
    return jnp.full((length,), m, jnp.int32).at[perm].set(jnp.arange(m, dtype=jnp.int32), mode="drop")


def permuted_block_matmul(x, perm, r, *, interpret: bool = False, config: BlockMatmulConfig | None = None,
                          chunk: int = 1):
    """y (..., J·K) = x[..., perm] · blockdiag(r), the gather fused into the kernel's loads.

    x: (..., N) float; perm: (J·K,) int32, a permutation of range(N) followed by padding values ≥ N
    (which read 0); r: (J, K, K), cast to x.dtype for the products (its cotangent keeps r's dtype and is
    accumulated in float32). Differentiable in x and r (``jax.custom_vjp`` with Pallas backward kernels).
    ``interpret=True`` runs the kernels in Pallas's interpreter (any backend; for tests). ``chunk``: perm is
    ``chunk``-chunked (see the module docstring; ``check_chunked_index``), so tiles load contiguous ranges.
    """
    nb, k = _check_r(r)
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a floating array (..., N), got shape {tuple(x.shape)} dtype {x.dtype}")
    check_index_vector("perm", perm, nb * k)
    lead, n = x.shape[:-1], x.shape[-1]
    check_chunked_index("perm", perm, chunk, n)
    cfg = _config(config, k, chunk)
    x2 = x.reshape(-1, n)
    if x2.shape[0] == 0:
        return jnp.zeros((*lead, nb * k), x.dtype) + 0 * jnp.sum(r).astype(x.dtype)
    y = _gather_rotate(x2, perm.astype(jnp.int32), r, n, cfg, bool(interpret), chunk)
    return y.reshape(*lead, nb * k)


def block_matmul_permuted(h, perm, r, *, inv_perm=None, interpret: bool = False,
                          config: BlockMatmulConfig | None = None, chunk: int = 1):
    """y (..., M) = (h · blockdiag(r))[..., perm], the gather fused into the kernel's stores.

    h: (..., J·K) float; perm: (M,) int32, distinct values in range(J·K); inv_perm: (J·K,) int32 with
    inv_perm[perm[q]] = q and values ≥ M elsewhere (computed from perm when omitted: pass it when you
    have it, as POET layers do); r: (J, K, K). Differentiable in h and r. ``chunk``: inv_perm is
    ``chunk``-chunked (see ``permuted_block_matmul``), so tiles store contiguous ranges.
    """
    nb, k = _check_r(r)
    d = nb * k
    if h.ndim < 1 or h.shape[-1] != d or not jnp.issubdtype(h.dtype, jnp.floating):
        raise ValueError(f"h must be a floating array (..., {d}) for r of shape {tuple(r.shape)}, "
                         f"got shape {tuple(h.shape)} dtype {h.dtype}")
    check_index_vector("perm", perm)
    if inv_perm is None:
        inv_perm = inverse_index(perm, d)
    check_index_vector("inv_perm", inv_perm, d)
    lead, m = h.shape[:-1], perm.shape[0]
    check_chunked_index("inv_perm", inv_perm, chunk, m)
    cfg = _config(config, k, chunk)
    h2 = h.reshape(-1, d)
    if h2.shape[0] == 0:
        return jnp.zeros((*lead, m), h.dtype) + 0 * jnp.sum(r).astype(h.dtype)
    y = _rotate_gather(h2, perm.astype(jnp.int32), inv_perm.astype(jnp.int32), r, cfg, bool(interpret), chunk)
    return y.reshape(*lead, m)
