"""Weight-update coverage (POET spec §8.4): how evenly a run touches the entries of W.

In one inner loop (between two merges) R rotates some rows of the (N, M) kernel — its input
coordinates — and P some columns. Entry (i, j) is touched by R when row i is rotated and by P when
column j is; the spec's count adds the two, so it grows by 0, 1 or 2 per inner loop (2·num_merges at
most). POET-BS rotates every coordinate that shares a block with another one (all of them unless a
ragged last block has a single coordinate), so every entry reaches the maximum; POET-FS rotates only its
two index subsets, giving lower, uneven counts with mean num_merges·(Ki/N + Ko/M).

Nothing here re-derives that formula. The rotated coordinates are read off the layer: a coordinate of
its permuted space is rotated iff a free generator entry couples it to another coordinate (the skew
pattern of the layer's own generators and ragged-block masks), and it is mapped back to the layer's
coordinates through the permutations the merges actually drew. ``coverage_run`` plays the spec's toy
(T_m = 1) with the layer's own ``merge_and_reinit`` and also records which entries really changed
value in each inner loop, an independent check on the structural count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poetjax.cayley import mask_generators, skew_from_packed


def rotated_coordinates(theta_JxP: jax.Array, layout) -> jax.Array:
    """(layout.padded,) bool: the permuted-space coordinates a generator of this shape can rotate.

    ``layout`` is a ``cayley.BlockLayout`` (POET-BS) or an ``fs.SubsetLayout`` (POET-FS: the first K
    coordinates). Coordinates past the blocks (FS) or in a 1×1 block are never rotated.
    """
    free = mask_generators(jnp.ones(theta_JxP.shape, jnp.float32), layout)
    coupled = jnp.any(skew_from_packed(free) != 0, axis=-1).reshape(-1)  # (J·K,)
    return jnp.pad(coupled, (0, layout.padded - coupled.shape[0]))


def touched_rows(layer) -> jax.Array:
    """(N,) bool: the kernel rows (input coordinates) R rotates in the layer's current inner loop."""
    # Input coordinate i sits at permuted position perm_in_inv[i] (u = x[..., perm_in]).
    return rotated_coordinates(layer.theta_in[...], layer.layout_in)[layer.perm_in_inv[...]]


def touched_cols(layer) -> jax.Array:
    """(M,) bool: the kernel columns (output coordinates) P rotates in the current inner loop."""
    # Output coordinate j reads permuted position perm_out[j] (y = z[..., perm_out]).
    return rotated_coordinates(layer.theta_out[...], layer.layout_out)[layer.perm_out[...]]


def touch_counts(layer) -> jax.Array:
    """(N, M) int32 in {0, 1, 2}: [row i rotated] + [column j rotated] for the current inner loop."""
    rows = touched_rows(layer).astype(jnp.int32)
    cols = touched_cols(layer).astype(jnp.int32)
    return rows[:, None] + cols[None, :]


class Coverage(NamedTuple):
    """Counts over a run (int32): per kernel row, per column, and per entry."""

    rows: jax.Array     # (N,)   inner loops in which R rotated row i
    cols: jax.Array     # (M,)   inner loops in which P rotated column j
    touches: jax.Array  # (N, M) the spec's count: rows[i] + cols[j]
    touched: jax.Array  # (N, M) inner loops in which row i or column j was rotated
    changed: jax.Array  # (N, M) inner loops in which the entry's value actually changed


def coverage_run(layer, num_merges: int, key: jax.Array, *, theta_scale: float = 0.1) -> Coverage:
    """The spec's toy on a copy of ``layer`` (which is left untouched): ``num_merges`` inner loops of one
    step each (T_m = 1; the subsets only change at merges, so longer loops give the same counts).

    Each inner loop records the rotated rows and columns, sets both generators to N(0, theta_scale²)
    values (standing in for an optimizer step), and calls the layer's ``merge_and_reinit``, which folds
    the rotations into W0 and draws the next permutations / index subsets. ``changed`` compares the
    effective kernel after the merge with the one before the step, exactly.
    """
    if isinstance(num_merges, bool) or not isinstance(num_merges, int) or num_merges <= 0:
        raise ValueError(f"num_merges must be a positive int, got num_merges={num_merges!r}")
    if not theta_scale > 0:
        raise ValueError(f"theta_scale must be > 0 (a zero step changes nothing), got theta_scale={theta_scale!r}")
    graphdef, state = nnx.split(layer)
    shape = (layer.in_features, layer.out_features)
    return _coverage_scan(graphdef, state, key, num_merges, shape, jnp.float32(theta_scale))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _coverage_scan(graphdef, state, key, num_merges, shape_NxM, theta_scale):
    def inner_loop(carry, k):
        state, cov = carry
        lay = nnx.merge(graphdef, state)
        rows, cols = touched_rows(lay), touched_cols(lay)
        before = lay.effective_kernel()
        k_in, k_out, k_merge = jax.random.split(k, 3)
        lay.theta_in[...] = theta_scale * jax.random.normal(k_in, lay.theta_in.shape, jnp.float32)
        lay.theta_out[...] = theta_scale * jax.random.normal(k_out, lay.theta_out.shape, jnp.float32)
        lay.merge_and_reinit(k_merge)
        changed = lay.effective_kernel() != before
        r, c = rows.astype(jnp.int32), cols.astype(jnp.int32)
        cov = Coverage(cov.rows + r, cov.cols + c, cov.touches + r[:, None] + c[None, :],
                       cov.touched + (rows[:, None] | cols[None, :]).astype(jnp.int32),
                       cov.changed + changed.astype(jnp.int32))
        return (nnx.state(lay), cov), None

    n, m = shape_NxM
    zeros = jnp.zeros(shape_NxM, jnp.int32)
    init = Coverage(jnp.zeros((n,), jnp.int32), jnp.zeros((m,), jnp.int32), zeros, zeros, zeros)
    (_, cov), _ = jax.lax.scan(inner_loop, (state, init), jax.random.split(key, num_merges))
    return cov


def coverage_stats(counts_NxM) -> dict[str, float]:
    """min / max / mean / std of a count matrix, and the fraction of entries at its maximum."""
    c = np.asarray(counts_NxM)
    return {"min": float(c.min()), "max": float(c.max()), "mean": float(c.mean()), "std": float(c.std()),
            "frac_at_max": float(np.mean(c == c.max()))}
