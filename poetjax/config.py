"""Typed, frozen configuration of the POET reparameterization.

``POETConfig`` is the math: which layers compute what. ``ExecConfig`` (its ``exec`` field) is how that
computation runs; no value of it changes the function a layer computes. A field name equals its YAML key
and its CLI dotted path in a run config (``poet.block_size=128``, ``poet.exec.impl=xla``). Every value is
checked in ``__post_init__`` so that a bad configuration fails before anything is built.
"""

from __future__ import annotations

import dataclasses

FAMILIES = ("bs", "fs")
MEMORIES = ("fast", "mem")
BASES = ("float", "uint8")
CAYLEY_MAPS = ("neumann", "exact")
CAYLEY_PRECISIONS = ("highest", "default", "bf16")
IMPLS = ("auto", "xla", "pallas")
CAYLEY_SCOPES = ("auto", "linear", "block", "model")
COMPUTES = ("auto", "activations", "weight")
INIT_SCHEMES = ("normalized", "mup", "normalized_gaussian", "standard", "xavier", "uniform_spectrum", "keep")
# The variants the papers name, as POETConfig fields: POET-X fast/mem (BS), POET-FS, POET-XQ fast/mem.
VARIANTS = {"fast": {}, "mem": {"memory": "mem"}, "fs": {"family": "fs"}, "xq": {"base": "uint8"},
            "xq_mem": {"memory": "mem", "base": "uint8"}}


def _one_of(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {name}={value!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}")


@dataclasses.dataclass(frozen=True)
class ExecConfig:
    """How POET layers compute. Never changes the function (only rounding, within the dtype's tolerance).

    impl:       "xla" (plain jnp/XLA), "pallas" (the fused kernels of ``pallas_kernels``; on a machine without
                a GPU they run in Pallas's interpreter, for tests) or "auto" (Pallas on a GPU when the kernels
                support the block size, XLA elsewhere; POET-XQ stays on XLA). See ``poetjax.ops.resolve_plan``.
    compute:    "activations" (POET-X: rotate the activations, never form W_eff), "weight" (form W_eff from
                the blocks each step, then one dense matmul) or "auto" ("activations" on GPUs and under data
                parallelism; with one CPU device "weight" when a layer sees at least max(N, M) tokens;
                ``poetjax.ops.resolve_plan``). "auto" is a run's default (``poetjax.run_config``).
    cayley_precision: the float32 products of the Neumann series in training steps: "default" (one TF32
                pass on a GPU), "highest" (float32-exact products; CPUs compute float32 for "default" too)
                or "bf16" (the products' operands rounded to bfloat16, float32 sums). Merges and effective
                kernels always use "highest".
    cayley_scope: how many POET layers share one Cayley–Neumann map per step (``poetjax.layers``): "linear"
                (each layer maps its own blocks), "block" (one map for all projections of a transformer
                block, computed inside the block, so a rematerialized block recomputes it), "model" (one
                map for every layer, computed once before the layers run) or "auto" ("model" for the fast
                memory mode, "block" for mem and for a uint8 base). Models without a rotation hook
                (anything but ``poetjax.models.Llama``) map per linear whatever this says.
    """

    impl: str = "auto"
    compute: str = "activations"
    cayley_precision: str = "default"
    cayley_scope: str = "auto"

    def __post_init__(self):
        _one_of("impl", self.impl, IMPLS)
        _one_of("compute", self.compute, COMPUTES)
        _one_of("cayley_precision", self.cayley_precision, CAYLEY_PRECISIONS)
        _one_of("cayley_scope", self.cayley_scope, CAYLEY_SCOPES)

    def replace(self, **changes) -> "ExecConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class POETConfig:
    """The POET reparameterization of every converted linear layer (POET spec; ``poetjax.layers``).

    block_size:     K, the size of each orthogonal block (an int ≥ 1). A dimension that K does not divide
                    gets a smaller last block (``poetjax.cayley.block_layout``). With family "fs" it is the
                    subset size |S| per side: an int, or a float in (0, 1] taken as a fraction of each
                    dimension (0.5 → |S_in| = N/2, |S_out| = M/2; ``poetjax.fs``).
    merge_interval: T_m, optimizer steps between merge-then-reinitialize events.
    family:         "bs" (POET-BS: block-diagonal rotations between random permutations, spec §3.2) or
                    "fs" (POET-FS: one random index subset rotated per side, spec §3.1).
    memory:         what the backward pass keeps (POET-BS): "fast" (autodiff through the factored layer,
                    keeps the rotated activations) or "mem" (only the layer input and the rotation blocks,
                    the rest recomputed: one ``jax.checkpoint``).
    base:           storage of the frozen W0 (POET-BS): "float" (the model's param dtype) or "uint8"
                    (POET-XQ: codes plus a float32 scale and a uint8 zero point per group of
                    ``quant_group_size`` in-dimension entries, dequantized on the fly and re-quantized at
                    every merge; spec §9.4, ``poetjax.quant``).
    num_terms:      k of the Cayley–Neumann series (I+Q)·Σ_{i=0..k} Qⁱ; the papers use k = 3.
    cayley:         "neumann" (the papers' truncated series) or "exact" ((I+Q)(I−Q)⁻¹ by a solve: exactly
                    orthogonal, slower; for checks and research).
    init:           how W0 is formed from the wrapped Linear's weight (spec §2): "normalized" (reference
                    default: every neuron, a kernel column, scaled to unit L2 norm), "mup" (neurons normalized,
                    then scaled so that ‖W0‖₂ ≈ sqrt(M/N), the μP spectral condition: see
                    ``poetjax.initializers``), "normalized_gaussian" (fresh N(0,1) draw, neurons normalized),
                    "standard" (fresh N(0, 0.02²)), "xavier" (fresh Glorot normal), "uniform_spectrum" (U·Vᵀ
                    of the weight: every singular value 1), "keep" (exact copy: the converted model computes
                    the same function).
    init_scale:     α, a multiplier of W0 after its scheme: W0's spectrum, which POET keeps for the whole run,
                    scales with it (1: the scheme as defined; "keep" needs 1 to keep the function).
    quant_group_size: G of the uint8 base: consecutive in-dimension entries of one output column that share a
                    scale and zero point (spec default 256); must divide every layer's padded in-dimension.
    perm_chunk:     how many consecutive coordinates the random permutations move together (default 1:
                    uniformly random permutations, as in the papers). c > 1 permutes the D/c runs of c
                    consecutive coordinates, so gathers read contiguous memory; c must divide both
                    dimensions and the block size (family "bs" only).
    exec:           how the layers run (``ExecConfig``).
    """

    block_size: int | float = 256
    merge_interval: int = 200
    family: str = "bs"
    memory: str = "fast"
    base: str = "float"
    num_terms: int = 3
    cayley: str = "neumann"
    init: str = "normalized"
    init_scale: float = 1.0
    quant_group_size: int = 256
    perm_chunk: int = 1
    exec: ExecConfig = dataclasses.field(default_factory=ExecConfig)

    def __post_init__(self):
        _one_of("family", self.family, FAMILIES)
        _one_of("memory", self.memory, MEMORIES)
        _one_of("base", self.base, BASES)
        if isinstance(self.block_size, float) and self.family == "fs":
            if not 0.0 < self.block_size <= 1.0:  # also rejects nan
                raise ValueError(f"a fractional block_size must be in (0, 1], got block_size={self.block_size!r}")
        elif isinstance(self.block_size, float):
            raise ValueError(f"a fractional block_size is only defined for family='fs' (BS block sizes are "
                             f"absolute); got block_size={self.block_size!r} with family={self.family!r}")
        else:
            _positive_int("block_size", self.block_size)
        _positive_int("merge_interval", self.merge_interval)
        _positive_int("num_terms", self.num_terms)
        _one_of("cayley", self.cayley, CAYLEY_MAPS)
        _one_of("init", self.init, INIT_SCHEMES)
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got init_scale={self.init_scale!r}")
        _positive_int("quant_group_size", self.quant_group_size)
        _positive_int("perm_chunk", self.perm_chunk)
        if self.family == "fs":
            for name, value, default in (("memory", self.memory, "fast"), ("base", self.base, "float"),
                                         ("perm_chunk", self.perm_chunk, 1)):
                if value != default:
                    raise ValueError(f"{name}={value!r} is only defined for family='bs', not family='fs'")
        if not isinstance(self.exec, ExecConfig):
            raise TypeError(f"exec must be an ExecConfig, got {type(self.exec).__name__}")

    @property
    def quantized(self) -> bool:
        """POET-XQ: the base weight is stored group-quantized in uint8."""
        return self.base == "uint8"

    @property
    def label(self) -> str:
        """"POET-X fast", "POET-XQ mem", "POET-FS", … for log lines."""
        if self.family == "fs":
            return "POET-FS"
        return f"POET-{'XQ' if self.quantized else 'X'} {self.memory}"

    def replace(self, **changes) -> "POETConfig":
        """A copy with ``changes``; ``exec`` may be given as a dict of ExecConfig changes."""
        if isinstance(changes.get("exec"), dict):
            changes["exec"] = self.exec.replace(**changes["exec"])
        return dataclasses.replace(self, **changes)
