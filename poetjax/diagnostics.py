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
  the per-merge drift of the Neumann approximation: the effective kernel's spectrum against the current W0's).

``model_diagnostics`` computes all of these for every linear layer in one jit-friendly pass (one batched
SVD per distinct kernel shape); ``diagnostics_record`` turns its output into the JSON record the trainer
logs (``logging.diagnostics_interval``), which ``poetjax.plots`` draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from poetjax import fs, ops
from poetjax.layers import POETLinear
from poetjax.perms import permute
from poetjax.models.llama import layer_view
from poetjax.surgery import fold_in_each, iter_modules, map_layers, vmap_layers


def path_name(path) -> str:
    return "/".join(str(p) for p in path)


def linear_kernels(model: nnx.Module) -> dict[str, jax.Array]:
    """{path: (in, out) float32 kernel} of every POET layer (effective kernel) and every nnx.Linear."""
    model = layer_view(model)
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


def gram_singular_values(kernel: jax.Array) -> jax.Array:
    """Singular values (descending) of a (..., N, M) kernel as the square roots of the eigenvalues of its
    smaller Gram matrix. Squaring the condition number costs accuracy: the error is about ‖K‖₂² · ε / σ
    near σ, so small singular values are only good to ~1e-4 of σ_max in float32 (BENCHMARKS.md)."""
    k = kernel.astype(jnp.float32)
    if k.shape[-2] < k.shape[-1]:
        k = jnp.swapaxes(k, -1, -2)
    gram = jnp.matmul(jnp.swapaxes(k, -1, -2), k, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[..., ::-1], 0.0))


def _logged_singular_values(kernel: jax.Array) -> jax.Array:
    """The diagnostics' spectra: the SVD on a CPU, the Gram form on an accelerator, where the batched SVD
    dominated a record's time (BENCHMARKS.md, issue 22). Chosen when the program is lowered, not traced."""
    return jax.lax.platform_dependent(kernel, cpu=singular_values, default=gram_singular_values)


def svd_entropy(s: jax.Array) -> jax.Array:
    """Normalized SVD entropy in [0, 1] of singular values s (..., n): 1 = flat spectrum."""
    s = s.astype(jnp.float32)
    p = s ** 2 / jnp.sum(s ** 2, axis=-1, keepdims=True)
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return -jnp.sum(plogp, axis=-1) / jnp.log(s.shape[-1])


def spectral_norm(kernel: jax.Array) -> jax.Array:
    return singular_values(kernel)[..., 0]


def spectral_drift(s_ref: jax.Array, s: jax.Array, *, relative_to: str = "each") -> jax.Array:
    """Largest relative change of the singular values s (n,) from s_ref (n,), both descending.

    relative_to="each": max_i |s_i − s_ref,i| / s_ref,i, the multiplicative change that the Neumann bound
    controls, but fp32 rounding of an SVD (~1e-7·σ_max per value) makes it noisy for tiny σ_i;
    relative_to="max": max_i |s_i − s_ref,i| / s_ref,0, the change in units of the spectral norm, which
    has the same bound (|Δσ_i| ≤ e·σ_i ≤ e·σ_0) and stays meaningful for ill-conditioned matrices (the
    trainer logs this one).
    """
    s_ref, s = s_ref.astype(jnp.float32), s.astype(jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    if relative_to == "each":
        return jnp.max(jnp.abs(s - s_ref) / jnp.maximum(s_ref, tiny))
    if relative_to == "max":
        return jnp.max(jnp.abs(s - s_ref)) / jnp.maximum(s_ref[..., 0], tiny)
    raise ValueError(f'relative_to must be "each" or "max", got relative_to={relative_to!r}')


def spectrum_stats(model: nnx.Module) -> dict[str, dict[str, jax.Array]]:
    """{path: {"singular_values", "svd_entropy", "spectral_norm"}} for every linear layer."""
    stats = {}
    for name, k in linear_kernels(model).items():
        s = singular_values(k)
        stats[name] = {"singular_values": s, "svd_entropy": svd_entropy(s), "spectral_norm": s[0]}
    return stats


def blocks_orthogonality_error(r_JxKxK: jax.Array, dim: int) -> jax.Array:
    """‖R Rᵀ − I‖_F / √dim for R = the (permuted) block-diagonal matrix of blocks r (dim real coordinates).

    Permutations do not change Frobenius norms, and blockdiag(R)·blockdiag(R)ᵀ − I is block diagonal, so
    the error is the root of the summed per-block errors. A ragged tail block is identity on its padding.
    """
    r = r_JxKxK.astype(jnp.float32)
    eye = jnp.eye(r.shape[-1], dtype=jnp.float32)
    err = jnp.matmul(r, jnp.swapaxes(r, -1, -2), precision="highest") - eye
    return jnp.sqrt(jnp.sum(err ** 2)) / jnp.sqrt(jnp.float32(dim))


def _orthogonality_error(layer: POETLinear) -> tuple[jax.Array, jax.Array]:
    r_in, r_out = layer.rotation_blocks()
    return (blocks_orthogonality_error(r_in, layer.in_features), blocks_orthogonality_error(r_out, layer.out_features))


def _poet_layers(model: nnx.Module) -> tuple[list[str], list[POETLinear]]:
    """Paths and layers of the POET layers of the per-layer view of ``model``."""
    items = list(iter_modules(layer_view(model), POETLinear))
    return [path_name(p) for p, _ in items], [layer for _, layer in items]


def orthogonality_errors(model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{path: (e_in, e_out)} of every POET layer's current rotations (exactly 0 right after a merge)."""
    names, layers = _poet_layers(model)
    return dict(zip(names, map_layers(_orthogonality_error, layers)))


def _rotate_permuted(layer: POETLinear, u: jax.Array, r: jax.Array) -> jax.Array:
    # In the permuted space BS rotates every block; FS rotates the leading subset and copies the rest.
    if layer.config.family == "fs":
        return fs.prefix_rotate(u, r[0], precision="highest")
    return ops.block_rotate(u, r, precision="highest")


def rotate_input_side(layer: POETLinear, v_xN: jax.Array, *, transpose: bool = False) -> jax.Array:
    """v·R_in (or v·R_inᵀ) for row vectors v (..., N): the layer's input rotation alone, without W0."""
    r_in, _ = layer.rotation_blocks()
    if transpose:
        r_in = jnp.swapaxes(r_in, -1, -2)
    u = permute(v_xN, layer.perm_in[...], layer.perm_in_inv[...])
    return permute(_rotate_permuted(layer, u, r_in), layer.perm_in_inv[...], layer.perm_in[...])


def rotate_output_side(layer: POETLinear, v_xM: jax.Array) -> jax.Array:
    """v·P for row vectors v (..., M): the layer's output rotation alone."""
    _, r_out = layer.rotation_blocks()
    z = permute(v_xM, layer.perm_out_inv[...], layer.perm_out[...])
    return permute(_rotate_permuted(layer, z, r_out), layer.perm_out[...], layer.perm_out_inv[...])


class ProbeState(NamedTuple):
    v_in: jax.Array   # (N,) fixed unit probe of the input side
    w_in: jax.Array   # (N,) (R_total · v_inᵀ)ᵀ, R_total = R_k ⋯ R_1 (merged input rotations, newest left)
    v_out: jax.Array  # (M,)
    w_out: jax.Array  # (M,) v_out · P_1 ⋯ P_k (merged output rotations, newest right)


class PhaseProbe:
    """Vector probing of the accumulated rotations across merges (spec §8.1), as pure functions.

    With y = x·R·W0·P and merges W0 ← R·W0·P, after k merges the layer computes x·(R_cur R_k⋯R_1)·W0·
    (P_1⋯P_k P_cur). ``probes = PhaseProbe.init(model, key)`` (or ``init_numpy``); right before every merge
    ``probes = PhaseProbe.advance(probes, model)``; at any time ``PhaseProbe.cosines(probes, model)`` →
    {path: (cos_in, cos_out)} with cos = v·R_total·vᵀ of the accumulated rotation including the current one.
    The papers report a plateau of cos ≈ 0.60–0.65 during the stable-learning phase.
    """

    @staticmethod
    def init(model: nnx.Module, key: jax.Array) -> dict[str, ProbeState]:
        layers = _probe_layers(model)
        return _unit_probes(layers, _probe_normals(key, layers), jnp)

    @staticmethod
    def init_numpy(model: nnx.Module, key: jax.Array) -> dict[str, ProbeState]:
        """``init``'s probes (the same numbers up to rounding) as numpy arrays, drawn by one program (on the
        default device: the trainer runs it on the host) and cut in numpy: cut inside a device program, each
        layer's probe is a kernel of its own."""
        layers = _probe_layers(model)
        return _unit_probes(layers, np.asarray(jax.jit(lambda k: _probe_normals(k, layers))(key)), np)

    @staticmethod
    def advance(probes: dict[str, ProbeState], model: nnx.Module) -> dict[str, ProbeState]:
        """Fold the current rotations into the carried probe images (call right before a merge)."""
        names, layers = _poet_layers(model)

        def one(layer, p):
            return p._replace(w_in=rotate_input_side(layer, p.w_in, transpose=True),
                              w_out=rotate_output_side(layer, p.w_out))

        return dict(zip(names, map_layers(one, layers, [probes[n] for n in names])))

    @staticmethod
    def cosines(probes: dict[str, ProbeState], model: nnx.Module) -> dict[str, tuple[jax.Array, jax.Array]]:
        names, layers = _poet_layers(model)
        return dict(zip(names, map_layers(_probe_cosines, layers, [probes[n] for n in names])))


def _probe_layers(model: nnx.Module) -> list[tuple[str, int, int]]:
    """(name, N, M) of every POET layer, in the order of the per-layer view."""
    # only shapes are read: an abstract per-layer view (a real one would copy every stacked array,
    # W0 included, e.g. 37 GiB of uint8 codes for a 34B POET-XQ model)
    view = nnx.eval_shape(lambda: layer_view(model))
    return [(path_name(path), layer.in_features, layer.out_features)
            for path, layer in iter_modules(view, POETLinear)]


def _probe_normals(key: jax.Array, layers) -> jax.Array:
    """(L, 2, D) standard normals, row i drawn from ``fold_in(key, i)``; D the widest side of any layer.
    One vmapped draw for the whole model: one random-bits kernel to compile."""
    width = max((max(n, m) for _, n, m in layers), default=0)
    keys = fold_in_each(key, range(len(layers)))
    return jax.vmap(lambda k: jax.random.normal(k, (2, width), jnp.float32))(keys)


def _unit_probes(layers, normals, xp) -> dict[str, ProbeState]:
    """Each layer's probes from its row of ``normals``: the first N (input side) and M (output side) entries,
    scaled to unit length; ``xp``: numpy or jax.numpy."""
    probes = {}
    for i, (name, n, m) in enumerate(layers):
        v_in, v_out = normals[i, 0, :n], normals[i, 1, :m]
        v_in, v_out = v_in / xp.linalg.norm(v_in), v_out / xp.linalg.norm(v_out)
        # w starts as a copy, not the same array: a donated state must not hold one buffer twice
        probes[name] = ProbeState(v_in, v_in.copy(), v_out, v_out.copy())
    return probes


def _probe_cosines(layer: POETLinear, p: ProbeState) -> tuple[jax.Array, jax.Array]:
    cos_in = jnp.dot(rotate_input_side(layer, p.v_in), p.w_in)   # v·R_cur·(R_total vᵀ)
    cos_out = jnp.dot(rotate_output_side(layer, p.w_out), p.v_out)  # (v·P_total·P_cur)·vᵀ
    return cos_in, cos_out


# ----------------------------------------------------------------------------------------------------
# all diagnostics of a model in one pass (what the trainer logs)

# How ``summarize`` aggregates each per-layer scalar over the layers of a group: averages for quantities
# that describe a typical layer, the worst layer for errors and drifts.
SUMMARY_MEAN = ("svd_entropy", "spectral_norm", "cos_in", "cos_out")
SUMMARY_MAX = ("drift", "merge_drift", "orth_in", "orth_out")


def sampled_ranks(n: int, k: int) -> np.ndarray:
    """min(k, n) distinct ranks spread evenly over 0 … n−1, always including the first and the last."""
    if n <= 0 or k <= 0:
        raise ValueError(f"need n > 0 and k > 0, got n={n}, k={k}")
    return np.unique(np.round(np.linspace(0, n - 1, min(k, n))).astype(np.int64))


def base_kernel(layer: POETLinear) -> jax.Array:
    """The current frozen W0 of a POET layer as an (Np, Mp) float32 matrix (stored permuted and padded).

    Permutations and zero padding leave the nonzero singular values unchanged, so its leading min(N, M)
    singular values are those of the unpermuted (N, M) base. POET-XQ: the dequantized codes.
    """
    return layer.base_weight(jnp.float32)


def diagnostic_groups(model: nnx.Module) -> dict[str, list[str]]:
    """{group key: [layer path, ...]}: the linear layers of the per-layer view of ``model`` in groups of one
    structure (POET layers of one graph, plain ``nnx.Linear`` layers of one kernel shape), in graph order.
    ``grouped_diagnostics`` returns one stacked array per group and quantity, in this order."""
    return {key: [name for name, _ in members] for key, members in _layer_groups(layer_view(model)).items()}


def _layer_groups(view: nnx.Module) -> dict[str, list[tuple[str, nnx.Module]]]:
    keys: dict = {}
    groups: dict[str, list[tuple[str, nnx.Module]]] = {}
    for path, node in nnx.iter_graph(view):
        if isinstance(node, POETLinear):
            ident = ("poet", nnx.graphdef(node))
        elif isinstance(node, nnx.Linear):
            ident = ("linear", tuple(node.kernel.shape), node.kernel.dtype)
        else:
            continue
        key = keys.setdefault(ident, f"{ident[0]}{len(keys)}")
        groups.setdefault(key, []).append((path_name(path), node))
    return groups


def grouped_diagnostics(model: nnx.Module, *, probes: dict[str, ProbeState] | None = None,
                        s_ref: dict[str, jax.Array] | None = None, num_sv: int = 16) -> dict[str, dict[str, jax.Array]]:
    """``model_diagnostics`` with every quantity stacked over the layers of a ``diagnostic_groups`` group:
    {group key: {name: (L, ...)}}, and ``s_ref`` likewise {group key: (L, n)}. A jitted program of it has a
    few outputs per layer shape instead of several per layer (``expand_diagnostics`` splits them on the host)."""
    out = {}
    for key, members in _layer_groups(layer_view(model)).items():
        layers = [m for _, m in members]
        if isinstance(layers[0], POETLinear):
            def one(layer, *probe):
                d = {"kernel": layer.effective_kernel(), "base": base_kernel(layer)}
                d["orth_in"], d["orth_out"] = _orthogonality_error(layer)
                if probe:
                    d["cos_in"], d["cos_out"] = _probe_cosines(layer, probe[0])
                return d

            per = [[probes[name] for name, _ in members]] if probes else []
            d = vmap_layers(one, layers, *per)  # one group is one graph: stacked results, nothing to split
            kernels, bases = d.pop("kernel"), d.pop("base")
        else:
            kernels, bases = jnp.stack([m.kernel[...].astype(jnp.float32) for m in layers]), None
            d = {}
        s = _logged_singular_values(kernels)  # (L, n): one batched call per group
        n = s.shape[-1]
        d.update({"singular_values": s, "sv": s[:, sampled_ranks(n, num_sv)], "svd_entropy": svd_entropy(s),
                  "spectral_norm": s[:, 0]})
        if s_ref is not None:
            d["drift"] = _rows_drift(s_ref[key], s)
        if bases is not None:
            d["merge_drift"] = _rows_drift(_logged_singular_values(bases)[:, :n], s)
        out[key] = d
    return out


def _rows_drift(s_ref_Gxn: jax.Array, s_Gxn: jax.Array) -> jax.Array:
    """``spectral_drift(..., relative_to="max")`` of every row."""
    return jax.vmap(lambda a, b: spectral_drift(a, b, relative_to="max"))(s_ref_Gxn, s_Gxn)


def expand_diagnostics(grouped: dict[str, dict], groups: dict[str, list[str]]) -> dict[str, dict]:
    """{path: {name: array}} from ``grouped_diagnostics`` output and the ``diagnostic_groups`` of the model
    (on host arrays this is plain numpy slicing)."""
    return {path: {k: v[i] for k, v in grouped[key].items()}
            for key, paths in groups.items() for i, path in enumerate(paths)}


def model_diagnostics(model: nnx.Module, *, probes: dict[str, ProbeState] | None = None,
                      s_ref: dict[str, jax.Array] | None = None, num_sv: int = 16) -> dict[str, dict[str, jax.Array]]:
    """Every diagnostic of every linear layer (POET layers and plain ``nnx.Linear``), jit-friendly.

    Returns {path: {name: array}}; for a layer with an (N, M) kernel and n = min(N, M):

    * "singular_values" (n,) descending, "sv" (min(num_sv, n),) those at ``sampled_ranks(n, num_sv)``,
      "svd_entropy", "spectral_norm";
    * with ``s_ref`` ({path: (n,)}, e.g. the spectra at step 0): "drift" = ``spectral_drift(s_ref, s,
      relative_to="max")``;
    * POET layers: "orth_in", "orth_out" (``orthogonality_errors``) and "merge_drift", the spectral drift
      (relative to σ_max) of the effective kernel from the current W0 — what the rotations since the last
      merge did to the spectrum (0 for exact Cayley up to rounding, within the Neumann bound otherwise);
    * POET layers with ``probes`` (``PhaseProbe.init``): "cos_in", "cos_out" (``PhaseProbe.cosines``).

    Computed by ``grouped_diagnostics``; a training loop jits that and expands on the host instead.
    """
    groups = diagnostic_groups(model)
    ref = None if s_ref is None else {k: jnp.stack([s_ref[p] for p in paths]) for k, paths in groups.items()}
    return expand_diagnostics(grouped_diagnostics(model, probes=probes, s_ref=ref, num_sv=num_sv), groups)


def group_of(path: str) -> str:
    """The projection type of a layer path: its last component ("layers/0/attn/q_proj" → "q_proj")."""
    return path.rsplit("/", 1)[-1]


def summarize(layers: dict[str, dict[str, float]], exclude: Sequence[str] = ()) -> dict[str, dict[str, float]]:
    """Per projection type (``group_of``) and over "all" layers whose path contains none of ``exclude``:
    the mean of ``SUMMARY_MEAN`` scalars and the max of ``SUMMARY_MAX`` scalars (those present)."""
    groups: dict[str, list[dict]] = {}
    for path, d in layers.items():
        groups.setdefault(group_of(path), []).append(d)
        if not any(e.lower() in path.lower() for e in exclude):
            groups.setdefault("all", []).append(d)
    out = {}
    for g, ds in groups.items():
        agg = {}
        for key in SUMMARY_MEAN + SUMMARY_MAX:
            vals = [float(d[key]) for d in ds if key in d]
            if vals:
                agg[key] = float(np.mean(vals)) if key in SUMMARY_MEAN else float(np.max(vals))
        out[g] = agg
    return out


def diagnostics_record(diag: dict[str, dict], exclude: Sequence[str] = ()) -> dict:
    """A JSON-ready record of ``model_diagnostics`` output (host or device arrays):
    {"layers": {path: {name: float, "sv": [floats]}}, "groups": ``summarize(...)``}. The full spectra
    ("singular_values") are left out; "sv" holds the sampled ranks."""
    host = jax.device_get(diag)
    short = lambda v: float(f"{float(v):.7g}")  # float32 precision keeps the JSON lines short
    layers = {}
    for path, d in host.items():
        rec = {k: short(v) for k, v in d.items() if k not in ("singular_values", "sv")}
        rec["sv"] = [short(x) for x in np.asarray(d["sv"])]
        layers[path] = rec
    groups = {g: {k: short(v) for k, v in d.items()} for g, d in summarize(layers, exclude).items()}
    return {"layers": layers, "groups": groups}
