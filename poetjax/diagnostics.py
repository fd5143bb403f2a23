"""Spectral and rotation diagnostics of POET and plain models (POET spec §8).

All functions are pure and jit-friendly; they work on any NNX model: POET layers contribute their
effective (merged) kernel, plain ``nnx.Linear`` layers their kernel, so AdamW/Muon baselines and POET
runs are measured by the same code.

* singular values, spectral norm, SVD entropy H = −(1/log n) Σ pᵢ log pᵢ with pᵢ = σᵢ² / Σⱼ σⱼ² (§8.2;
  the papers print it without the minus sign, which would make it negative);
* orthogonality error e = ‖R Rᵀ − I‖_F / ‖I‖_F of the current R_in, R_out (§8.2);
* vector probing of the three learning phases (§8.1): for a fixed random unit vector v, the cosine vᵀ R v
  between v and its image under the *accumulated* rotation since the start of the run. Merges fold the
  rotations into W0, so ``PhaseProbe`` carries w = v·R_total per layer and side and advances it at every merge;
  the current cosine is v·R_current·wᵀ;
* spectral drift: the largest relative change of the singular values between two measurements (§1, and
  the per-merge drift of the Neumann approximation).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from poetjax import ops
from poetjax.layers import POETLinear
from poetjax.perms import permute
from poetjax.surgery import iter_modules


def path_name(path) -> str:
    return "/".join(str(p) for p in path)


def linear_kernels(model: nnx.Module) -> dict[str, jax.Array]:
    """{path: (in, out) float32 kernel} of every POET layer (effective kernel) and every nnx.Linear."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, POETLinear):
            out[path_name(path)] = node.effective_kernel()
        elif isinstance(node, nnx.Linear):
            out[path_name(path)] = node.kernel[...].astype(jnp.float32)
    return out


def singular_values(kernel: jax.Array) -> jax.Array:
    """Singular values (descending) of a (..., N, M) kernel, in float32 (batched over leading dims)."""
    return jnp.linalg.svd(kernel.astype(jnp.float32), compute_uv=False)


def svd_entropy(s: jax.Array) -> jax.Array:
    """Normalized SVD entropy in [0, 1] of singular values s (..., n): 1 = flat spectrum."""
    s = s.astype(jnp.float32)
    p = s ** 2 / jnp.sum(s ** 2, axis=-1, keepdims=True)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return -jnp.sum(plogp, axis=-1) / jnp.log(s.shape[-1])


def spectral_norm(kernel: jax.Array) -> jax.Array:
    return singular_values(kernel)[..., 0]


def spectral_drift(s_ref: jax.Array, s: jax.Array) -> jax.Array:
    """max_i |s_i − s_ref,i| / s_ref,i (both descending)."""
    return jnp.max(jnp.abs(s - s_ref) / jnp.maximum(s_ref, jnp.finfo(jnp.float32).tiny))


def spectrum_stats(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
    """{path: {"singular_values", "svd_entropy", "spectral_norm"}} for every linear layer."""
    stats = {}
    for name, k in linear_kernels(model).items():
        s = singular_values(k)
        stats[name] = {"singular_values": s, "svd_entropy": svd_entropy(s), "spectral_norm": s[0]}
    return stats


def blocks_orthogonality_error(r_BxKxK: jax.Array, dim: int) -> jax.Array:
    """‖R Rᵀ − I‖_F / √dim for R = the (permuted) block-diagonal matrix of blocks r (dim real coordinates).

    Permutations do not change Frobenius norms, and blockdiag(R)·blockdiag(R)ᵀ − I is block diagonal, so
    the error is the root of the summed per-block errors. A ragged tail block is identity on its padding.
    """
    r = r_BxKxK.astype(jnp.float32)
    eye = jnp.eye(r.shape[-1], dtype=jnp.float32)
    err = jnp.matmul(r, jnp.swapaxes(r, -1, -2), precision="highest") - eye
    return jnp.sqrt(jnp.sum(err ** 2)) / jnp.sqrt(jnp.float32(dim))


def orthogonality_errors(model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{path: (e_in, e_out)} of every POET layer's current rotations (exactly 0 right after a merge)."""
    out = {}
    for path, layer in iter_modules(model, POETLinear):
        r_in, r_out = layer.rotation_blocks()
        out[path_name(path)] = (blocks_orthogonality_error(r_in, layer.in_features),
                                blocks_orthogonality_error(r_out, layer.out_features))
    return out


def rotate_input_side(layer: POETLinear, v_xN: jax.Array, *, transpose: bool = False) -> jax.Array:
    """v·R_in (or v·R_inᵀ) for row vectors v (..., N): the layer's input rotation alone, without W0."""
    r_in, _ = layer.rotation_blocks()
    if transpose:
        r_in = jnp.swapaxes(r_in, -1, -2)
    u = permute(v_xN, layer.perm_in[...], layer.perm_in_inv[...])
    a = ops.block_rotate(u, r_in, precision="highest")
    return permute(a, layer.perm_in_inv[...], layer.perm_in[...])


def rotate_output_side(layer: POETLinear, v_xM: jax.Array) -> jax.Array:
    """v·P for row vectors v (..., M): the layer's output rotation alone."""
    _, r_out = layer.rotation_blocks()
    z = permute(v_xM, layer.perm_out_inv[...], layer.perm_out[...])
    z = ops.block_rotate(z, r_out, precision="highest")
    return permute(z, layer.perm_out[...], layer.perm_out_inv[...])


class ProbeState(NamedTuple):
    v_in: jax.Array   # (N,) fixed unit probe of the input side
    w_in: jax.Array   # (N,) (R_total · v_inᵀ)ᵀ, R_total = R_k ⋯ R_1 (merged input rotations, newest left)
    v_out: jax.Array  # (M,)
    w_out: jax.Array  # (M,) v_out · P_1 ⋯ P_k (merged output rotations, newest right)


class PhaseProbe:
    """Vector probing of the accumulated rotations across merges (spec §8.1), as pure functions.

    With y = x·R·W0·P and merges W0 ← R·W0·P, after k merges the layer computes x·(R_cur R_k⋯R_1)·W0·
    (P_1⋯P_k P_cur). ``probes = PhaseProbe.init(model, key)``; right before every merge
    ``probes = PhaseProbe.advance(probes, model)``; at any time ``PhaseProbe.cosines(probes, model)`` →
    {path: (cos_in, cos_out)} with cos = v·R_total·vᵀ of the accumulated rotation including the current one.
    The papers report a plateau of cos ≈ 0.60–0.65 during the stable-learning phase.
    """

    @staticmethod
    def init(model: nnx.Module, key: jax.Array) -> dict[str, ProbeState]:
        probes = {}
        for i, (path, layer) in enumerate(iter_modules(model, POETLinear)):
            k_in, k_out = jax.random.split(jax.random.fold_in(key, i))
            v_in = jax.random.normal(k_in, (layer.in_features,), jnp.float32)
            v_out = jax.random.normal(k_out, (layer.out_features,), jnp.float32)
            v_in, v_out = v_in / jnp.linalg.norm(v_in), v_out / jnp.linalg.norm(v_out)
            probes[path_name(path)] = ProbeState(v_in, v_in, v_out, v_out)
        return probes

    @staticmethod
    def advance(probes: dict[str, ProbeState], model: nnx.Module) -> dict[str, ProbeState]:
        """Fold the current rotations into the carried probe images (call right before a merge)."""
        out = {}
        for path, layer in iter_modules(model, POETLinear):
            p = probes[path_name(path)]
            out[path_name(path)] = p._replace(w_in=rotate_input_side(layer, p.w_in, transpose=True),
                                              w_out=rotate_output_side(layer, p.w_out))
        return out

    @staticmethod
    def cosines(probes: dict[str, ProbeState], model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array]]:
        out = {}
        for path, layer in iter_modules(model, POETLinear):
            p = probes[path_name(path)]
            cos_in = jnp.dot(rotate_input_side(layer, p.v_in), p.w_in)   # v·R_cur·(R_total vᵀ)
            cos_out = jnp.dot(rotate_output_side(layer, p.w_out), p.v_out)  # (v·P_total·P_cur)·vᵀ
            out[path_name(path)] = (cos_in, cos_out)
        return out
