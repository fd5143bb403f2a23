"""Typed, frozen configuration of the POET reparameterization.

A field name equals its YAML key and its CLI dotted path (``optimizer.block_size=128``). Every value is
checked in ``__post_init__`` so that a bad configuration fails before anything is built.
"""

from __future__ import annotations

import dataclasses

VARIANTS = ("fast", "mem", "fs", "xq", "xq_mem")
QUANTIZED_VARIANTS = ("xq", "xq_mem")
CAYLEY_MAPS = ("neumann", "exact")
CAYLEY_PRECISIONS = ("highest", "default", "bf16")
IMPLS = ("auto", "xla", "pallas")
LAYOUTS = ("auto", "tokens", "features")
CAYLEY_SCOPES = ("auto", "linear", "block", "model")
COMPUTES = ("auto", "activations", "weight")
INIT_SCHEMES = ("normalized", "normalized_gaussian", "standard", "xavier", "uniform_spectrum", "keep")


@dataclasses.dataclass(frozen=True)
class POETConfig:
    """Configuration of POET-X layers and of their optimizer.

    block_size:     K, the size of each orthogonal block (an int ≥ 1). A dimension that K does not divide
                    gets a smaller last block (see ``poetjax.cayley.block_layout``). With variant="fs" it
                    is the subset size |S| per side: an int, or a float in (0, 1] taken as a fraction of
                    each dimension (0.5 → |S_in| = N/2, |S_out| = M/2; ``poetjax.fs``). Fractions are
                    rejected for the block-stochastic variants, whose b is an absolute size (spec §3.2).
    merge_interval: T_m, optimizer steps between merge-then-reinitialize events.
    variant:        "fast" (autodiff through the factored layer, keeps the pre-rotation activation),
                    "mem" (saves only the layer input and the small rotation blocks, recomputes the rest),
                    both POET-BS (POET-X); "fs": POET-FS, one random index subset per side (spec §3.1);
                    "xq" / "xq_mem": POET-XQ, the fast / mem flavour with W0 stored as uint8 codes plus
                    per-group scale and zero point (spec §9.4, ``poetjax.quant``), dequantized on the fly
                    and re-quantized at every merge.
    num_terms:      k of the Cayley–Neumann series (I+Q)·Σ_{i=0..k} Qⁱ; the papers use k = 3.
    cayley:         "neumann" (the papers' truncated series) or "exact" ((I+Q)(I−Q)⁻¹ by a solve: exactly
                    orthogonal, slower; for checks and research).
    cayley_precision: the float32 products of the Neumann series in training steps: "default" (one TF32
                    pass on a GPU: measured on the H200, R within 6e-5 and dθ within 1e-4 relative of the
                    float32 series, far below the bf16 rounding R gets before it rotates bf16 activations;
                    half the time of "highest"), "highest" (float32-exact products; CPUs compute float32
                    for "default" too) or "bf16" (the products' operands rounded to bfloat16, float32 sums,
                    on every backend: the tensor cores' full rate, an error of ~2⁻⁸·‖Q‖² relative on R,
                    below R's own bf16 rounding while ‖Q‖₂ ≲ 0.5). Merges and effective kernels always
                    use "highest".
    compute:        "activations" (POET-X: rotate the activations, never form W_eff), "weight" (form W_eff
                    from the blocks each step, then one dense matmul, differentiated through both) or "auto"
                    (by the layer's token count and shape at trace time, ``poetjax.ops.resolve_compute``).
                    Never changes the function.
    cayley_scope:   how many POET layers share one Cayley–Neumann map per step (``poetjax.layers``;
                    never changes the math): "linear" (each layer maps its own blocks, both sides at once),
                    "block" (one map for all projections of a transformer block, computed inside the block,
                    so a rematerialized block recomputes it), "model" (one map for every layer of the model,
                    computed once before the layers run: no recomputation under remat, but the rotation
                    blocks of all layers and the map's residuals stay alive through the backward pass) or
                    "auto" ("model" for POET-X fast, "block" for mem and POET-XQ). Models that do not call
                    ``shared_rotations`` (anything but ``poetjax.models.Llama``) map per linear whatever
                    this says.
    init:           how W0 is formed from the wrapped Linear's weight (POET spec §2):
                    "normalized" (reference default: copy, then every neuron — a kernel column — scaled to
                    unit L2 norm), "normalized_gaussian" (fresh N(0,1) draw, neurons normalized),
                    "standard" (fresh N(0, init_std²)), "xavier" (fresh Glorot normal),
                    "uniform_spectrum" (U·Vᵀ of the copied weight: every singular value 1),
                    "keep" (exact copy: the converted model computes the same function).
    init_std:       standard deviation of the "standard" scheme (LLaMA's initializer_range).
    poet_scale:     multiplier of the generators' learning rate (reference default 0.5).
    b1, b2, eps:    Adam constants of POETAdamW (eps is added to sqrt(v) before bias correction).
    exclude:        Linear layers whose path contains one of these names are not converted.
    impl:           how POET layers compute: "xla" (plain jnp/XLA), "pallas" (the fused kernels of
                    ``pallas_kernels``; on a machine without a GPU they run in Pallas's interpreter, for
                    tests) or "auto" (the path measured fastest: Pallas on a GPU when the kernels support the
                    block size, XLA elsewhere; POET-XQ stays on XLA, see ``poetjax.ops.resolve_impl``).
                    ``poetize`` passes it to every layer it builds; ``POETLinear(impl=...)`` overrides it
                    per layer. Never changes the math.
    layout:         where the layer's permutations and block rotations run: "tokens" (token-major (T, D)
                    activations; the permutations gather along the contiguous axis), "features" (the input
                    permutation also transposes to (D, T), so every permutation moves whole rows; the block
                    rotations and the dense matmul run there and the output permutation transposes back) or
                    "auto" (the layout measured fastest for the resolved impl, ``poetjax.ops.resolve_layout``).
                    Never changes the math.
    quant_group_size: G of POET-XQ, the number of consecutive in-dimension entries of one output column
                    that share a scale and zero point (spec default 256). Must divide every layer's padded
                    in-dimension (checked when the layer is built). Ignored by the other variants.
    perm_chunk:     how many consecutive coordinates the random permutations move together (default 1:
                    uniformly random permutations, as in the papers). c > 1 permutes the D/c runs of c
                    consecutive coordinates, so every block holds K/c whole runs and gathers read contiguous
                    memory (c = 16 bf16 values is one 32-byte sector); c must divide both dimensions and the
                    block size. Coordinates in one run then always share a block. With c ≥ 16 on a GPU, layout
                    "auto" runs the token-major Pallas kernels, which permute inside their loads and stores
                    (no transposing passes; H200, BENCHMARKS.md run 9: 4096² fast 1.00× dense against
                    1.02×, Llama-1B 3.5% faster per step). Quality: within 0.44% of c = 1 on a 250-step
                    llama_20m GPU run with 4 runs per block; another seed differs by 3.3% (one small check).
    """

    block_size: int | float = 256
    merge_interval: int = 200
    variant: str = "fast"
    num_terms: int = 3
    cayley: str = "neumann"
    cayley_precision: str = "default"
    init: str = "normalized"
    init_std: float = 0.02
    poet_scale: float = 0.5
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    exclude: tuple[str, ...] = ("lm_head",)
    impl: str = "auto"
    layout: str = "auto"
    cayley_scope: str = "auto"
    compute: str = "activations"
    quant_group_size: int = 256
    perm_chunk: int = 1

    def __post_init__(self):
        if isinstance(self.block_size, float) and self.variant == "fs":
            if not 0.0 < self.block_size <= 1.0:  # also rejects nan
                raise ValueError(f"a fractional block_size must be in (0, 1], got block_size={self.block_size!r}")
        elif isinstance(self.block_size, float):
            raise ValueError(f"a fractional block_size is only defined for variant='fs' (BS block sizes are "
                             f"absolute); got block_size={self.block_size!r} with variant={self.variant!r}")
        elif isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got block_size={self.block_size!r}")
        if (isinstance(self.merge_interval, bool) or not isinstance(self.merge_interval, int)
                or self.merge_interval <= 0):
            raise ValueError(f"merge_interval must be a positive int, got merge_interval={self.merge_interval!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got variant={self.variant!r}")
        if not isinstance(self.num_terms, int) or self.num_terms < 1:
            raise ValueError(f"num_terms must be an int ≥ 1, got num_terms={self.num_terms!r}")
        if self.cayley not in CAYLEY_MAPS:
            raise ValueError(f"cayley must be one of {CAYLEY_MAPS}, got cayley={self.cayley!r}")
        if isinstance(self.perm_chunk, bool) or not isinstance(self.perm_chunk, int) or self.perm_chunk < 1:
            raise ValueError(f"perm_chunk must be a positive int, got perm_chunk={self.perm_chunk!r}")
        if self.perm_chunk > 1 and self.variant == "fs":
            raise ValueError(f"perm_chunk={self.perm_chunk} is only defined for block variants, not variant='fs'")
        if self.cayley_precision not in CAYLEY_PRECISIONS:
            raise ValueError(f"cayley_precision must be one of {CAYLEY_PRECISIONS}, "
                             f"got cayley_precision={self.cayley_precision!r}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got init={self.init!r}")
        if not self.init_std > 0:
            raise ValueError(f"init_std must be > 0, got init_std={self.init_std!r}")
        if not self.poet_scale > 0:
            raise ValueError(f"poet_scale must be > 0, got poet_scale={self.poet_scale!r}")
        for name in ("b1", "b2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {name}={v!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got eps={self.eps!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got impl={self.impl!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got layout={self.layout!r}")
        if self.compute not in COMPUTES:
            raise ValueError(f"compute must be one of {COMPUTES}, got compute={self.compute!r}")
        if self.cayley_scope not in CAYLEY_SCOPES:
            raise ValueError(f"cayley_scope must be one of {CAYLEY_SCOPES}, got cayley_scope={self.cayley_scope!r}")
        if (isinstance(self.quant_group_size, bool) or not isinstance(self.quant_group_size, int)
                or self.quant_group_size <= 0):
            raise ValueError(f"quant_group_size must be a positive int, got quant_group_size={self.quant_group_size!r}")
        if isinstance(self.exclude, str):  # a lone string would be iterated character by character
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def quantized(self) -> bool:
        """POET-XQ: the base weight is stored group-quantized in uint8."""
        return self.variant in QUANTIZED_VARIANTS

    @property
    def flavour(self) -> str:
        """How the block-stochastic layer is differentiated: "fast" or "mem" ("fs" for POET-FS)."""
        return {"xq": "fast", "xq_mem": "mem"}.get(self.variant, self.variant)

    def replace(self, **changes) -> "POETConfig":
        return dataclasses.replace(self, **changes)
