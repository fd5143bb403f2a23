"""Generator updates in the Lie algebra: the levers of the POET authors' later work, as optax transforms that
compose with ``poetjax.optim`` (shape legend: docs/design.md; J blocks, K block size, P = K(K−1)/2).

A generator θ (J, P) packs J skew-symmetric K×K blocks Q (``poetjax.cayley.skew_from_packed``); a stacked
model adds a leading layer axis (L, J, P). Every transform here works on any leading axes.

* ``lie_momentum``: heavy-ball momentum of the generator gradients (Nesterov by default), with
  ``orthogonalize`` each block's update replaced by its Newton–Schulz orthogonalization (Muon's quintic
  iteration, ``newton_schulz_skew``, batched over the blocks of every leaf of one size: ``orthogonalize_tree``):
  odd polynomials of a skew matrix are skew, so the update stays in the algebra, and with singular values
  near 1 the learning rate is the rotation angle of a step (the Cayley map of Q turns by about 2·‖Q‖₂).
  ``carry=True`` keeps the momentum across merges (``carry_moments`` re-expresses it in the new blocks);
  otherwise a merge zeroes it.
* ``clip_block_angle``: caps the angle of each block's step (after the learning rate): 2·‖ΔQ‖_F ≤ max_angle,
  the Frobenius norm bounding the spectral one.
* ``alternate_sides``: odd steps update the input-side generators only, even steps the output side.

Merge semantics of a carried moment. A moment is a tangent direction: the skew matrix it packs acts on the
layer's own input (or output) coordinates through the layer's permutation. A merge draws new permutations,
so its blocks pair other coordinates. ``carry_moments`` maps the moment to the skew matrix it represents in
the layer's coordinates and restricts that to the new blocks: an entry survives where both of its
coordinates share a new block (the orthogonal projection onto the new block algebra), the rest is dropped.
With unchanged permutations it is the identity.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from poetjax.cayley import block_size_from_packed, packed_from_skew, packed_pairs, skew_from_packed
from poetjax.layers import GENERATOR_NAMES, path_keys

# Muon's quintic Newton–Schulz coefficients (5 steps): fast convergence of the singular values towards 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
GENERATOR_UPDATES = ("adam", "momentum", "ns")


def newton_schulz_skew(q_JxKxK: jax.Array, steps: int = 5, coeffs=NS_COEFFS) -> jax.Array:
    """The Newton–Schulz orthogonalization of every K×K block (float32): X ← a·X + (b·A + c·A²)·X with
    A = X·Xᵀ, from X = Q/‖Q‖_F. For skew X, A = −X² and every term is an odd power of X: skew in, skew out.
    The products use the default precision (one TF32 pass on a GPU, float32 on a CPU): the iteration only
    needs the singular values near 1, which Muon gets from bf16 products."""
    a, b, c = coeffs
    x = q_JxKxK.astype(jnp.float32)
    x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + 1e-7)
    prec = jax.lax.Precision.DEFAULT
    for _ in range(steps):
        gram = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=prec)
        x = a * x + jnp.matmul(b * gram + c * jnp.matmul(gram, gram, precision=prec), x, precision=prec)
    return 0.5 * (x - jnp.swapaxes(x, -1, -2))  # skew in exact arithmetic; exactly skew after rounding too


def orthogonalize_packed(theta_JxP: jax.Array, steps: int = 5) -> jax.Array:
    """``newton_schulz_skew`` of the blocks that packed generators hold, packed again (zeros stay zeros:
    a masked ragged tail is a block-diagonal zero part, which every polynomial keeps)."""
    return packed_from_skew(newton_schulz_skew(skew_from_packed(theta_JxP), steps)).astype(theta_JxP.dtype)


def orthogonalize_tree(tree: Any, steps: int = 5) -> Any:
    """``orthogonalize_packed`` of every leaf (…, P), with the blocks of all leaves of one block size
    concatenated into one batch: one Newton–Schulz iteration per block size instead of one per leaf, so the
    program holds a few large batched products instead of hundreds of small ones (each block is still
    normalized and iterated alone, so the result is that of ``orthogonalize_packed`` leaf by leaf)."""
    leaves, treedef = jax.tree.flatten(tree)
    by_size: dict[int, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_size.setdefault(leaf.shape[-1], []).append(i)
    out = list(leaves)
    for p, members in by_size.items():
        flat = jnp.concatenate([leaves[i].reshape(-1, p) for i in members])
        done = orthogonalize_packed(flat, steps)
        offsets = np.cumsum([0] + [leaves[i].size // p for i in members])
        for i, start, stop in zip(members, offsets[:-1], offsets[1:]):
            out[i] = done[start:stop].reshape(leaves[i].shape)
    return jax.tree.unflatten(treedef, out)


class LieMomentumState(NamedTuple):
    mu: optax.Updates   # the momentum; zeroed at merges


class CarriedLieMomentumState(NamedTuple):
    mu: optax.Updates   # the momentum; carried across merges (``carry_moments``)


def lie_momentum(momentum: float = 0.95, *, nesterov: bool = True, orthogonalize: bool = False,
                 ns_steps: int = 5, carry: bool = False) -> optax.GradientTransformation:
    """Momentum of the generator gradients, optionally Newton–Schulz-orthogonalized per block (see the module
    docstring); the direction only: chain a learning rate after it."""
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got momentum={momentum!r}")
    state_cls = CarriedLieMomentumState if carry else LieMomentumState

    def init(params):
        return state_cls(mu=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params))

    def update(grads, state, params=None):
        mu = jax.tree.map(lambda m, g: momentum * m + g.astype(jnp.float32), state.mu, grads)
        if nesterov:
            d = jax.tree.map(lambda m, g: g.astype(jnp.float32) + momentum * m, mu, grads)
        else:
            d = mu
        if orthogonalize:
            d = orthogonalize_tree(d, ns_steps)
        return jax.tree.map(lambda x, g: x.astype(jnp.result_type(g)), d, grads), state_cls(mu=mu)

    return optax.GradientTransformation(init, update)


def clip_block_angle(max_angle: float) -> optax.GradientTransformation:
    """Scale each block's step down so that 2·‖ΔQ‖_F ≤ max_angle (radians); place after the learning rate."""
    if not max_angle > 0:
        raise ValueError(f"max_angle must be > 0, got max_angle={max_angle!r}")

    def clip(u):
        # ‖ΔQ‖_F² = 2·Σθ²: every packed entry stands twice in the skew block
        angle = 2.0 * jnp.sqrt(2.0 * jnp.sum(jnp.square(u.astype(jnp.float32)), axis=-1))
        factor = jnp.minimum(1.0, max_angle / jnp.maximum(angle, 1e-30))
        return (u * factor[..., None]).astype(u.dtype)

    def update(updates, state, params=None):
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class AlternateState(NamedTuple):
    count: jax.Array  # updates so far


def alternate_sides() -> optax.GradientTransformation:
    """Odd-numbered updates (1st, 3rd, …) move the input-side generators only, even ones the output side
    (``side_of`` each leaf's tree path)."""

    def init(params):
        return AlternateState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        active = jnp.where(state.count % 2 == 0, 0, 1)  # 0: the input side moves this time

        def gate(path, u):
            mine = 0 if side_of(path) == "in" else 1
            return jnp.where(active == mine, u, jnp.zeros_like(u))

        return jax.tree_util.tree_map_with_path(gate, updates), AlternateState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


# -- carrying a moment across a merge ----------------------------------------------------------------

def transport_side(m_JxP: jax.Array, old_pos2coord: jax.Array, old_coord2pos: jax.Array,
                   new_pos2coord: jax.Array) -> jax.Array:
    """One side's packed moment (J, P), written for the old permutation, in the blocks of the new one.

    pos2coord (J·K,): the layer coordinate at each block position (≥ the width D for padding);
    coord2pos (D,): its inverse. Entry (a, b) of new block j pairs coordinates c₁, c₂ at new positions
    j·K+a, j·K+b; it takes the old block entry of the same two coordinates when both lay in one old block,
    else 0 (so does any padding position)."""
    k = block_size_from_packed(m_JxP.shape[-1])
    q_old = skew_from_packed(m_JxP.astype(jnp.float32))                # (J, K, K)
    rows, cols = packed_pairs(k)
    nb = m_JxP.shape[-2]
    base = (jnp.arange(nb) * k)[:, None]
    c1 = new_pos2coord[base + rows[None, :]]                              # (J, P)
    c2 = new_pos2coord[base + cols[None, :]]
    width = old_coord2pos.shape[0]
    real = (c1 < width) & (c2 < width)
    p1 = old_coord2pos[jnp.minimum(c1, width - 1)]
    p2 = old_coord2pos[jnp.minimum(c2, width - 1)]
    same = real & (p1 // k == p2 // k) & (p1 // k < nb)  # POET-FS: positions past its one subset block
    value = q_old[jnp.minimum(p1 // k, nb - 1), p1 % k, p2 % k]
    return jnp.where(same, value, 0.0).astype(m_JxP.dtype)


def _side_maps(perms: dict, side: str):
    """(pos2coord, coord2pos) of one side from a layer's permutation Variables (``poetjax.ops.LayerPerms``
    names): the input side gathers u = x[perm_in], the output side y = z[perm_out]."""
    if side == "in":
        return perms["perm_in"], perms["perm_in_inv"]
    return perms["perm_out_inv"], perms["perm_out"]


def carry_moments(mu: Any, old_frozen: Any, new_frozen: Any) -> Any:
    """``mu`` (a tree of packed moments keyed like the generators: ``…/<layer>/theta_in``) re-expressed in the
    blocks the merge drew (``transport_side`` per side; stacked layers slice by slice). ``old_frozen`` and
    ``new_frozen``: the frozen state (pure dicts or nnx.State) before and after the merge, which hold every
    layer's permutations under the same layer paths."""
    old_flat = _perm_table(old_frozen)
    new_flat = _perm_table(new_frozen)

    def move(path, m):
        keys = _strip(path_keys(path))
        layer, name = keys[:-1], keys[-1]
        side = "in" if name == "theta_in" else "out"
        old_pos2coord, old_coord2pos = _side_maps(old_flat[layer], side)
        new_pos2coord, _ = _side_maps(new_flat[layer], side)
        fn = transport_side
        for _ in range(m.ndim - 2):  # stacked layers: one slice at a time
            fn = jax.vmap(fn)
        return fn(m, old_pos2coord, old_coord2pos, new_pos2coord)

    return jax.tree_util.tree_map_with_path(move, mu)


def _strip(keys: tuple) -> tuple:
    while keys and keys[-1] in ("value", "raw_value"):  # the array inside an nnx.Variable
        keys = keys[:-1]
    return keys


def side_of(path) -> str:
    """"in" or "out": the side of a generator leaf (``theta_in`` / ``theta_out``) from its tree path."""
    return "in" if _strip(path_keys(path))[-1] == GENERATOR_NAMES[0] else "out"


def _perm_table(frozen) -> dict:
    """{layer path (tuple): {"perm_in": …, …}} of every permutation leaf in a frozen state."""
    table: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(frozen)[0]:
        keys = _strip(path_keys(path))
        if keys and str(keys[-1]).startswith("perm_"):
            table.setdefault(keys[:-1], {})[keys[-1]] = leaf
    return table
