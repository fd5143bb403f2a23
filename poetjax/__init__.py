"""poetjax: POET / POET-X (orthogonal equivalence transformation) training in JAX.

Array shapes in docstrings use one legend (B batch, S sequence, T = B·S tokens, N/M in/out features,
K block size, I/O blocks of a side, J blocks of one batched call, Np/Mp padded sizes, c perm_chunk, Gq the
quantization group, L stacked layers): docs/design.md, "Shape legend".
"""

from poetjax.config import ExecConfig, POETConfig
from poetjax.layers import FrozenWeight, Generator, Permutation, POETLinear
from poetjax.merge import merge, merge_and_reset
from poetjax.optim import (poet_adamw, poet_clip_schedule, poet_optimizer, reset_generator_state,
                           warmup_cosine_schedule)
from poetjax.surgery import build_poetized, poet_layers, poetize

__all__ = [
    "POETConfig", "ExecConfig", "POETLinear", "FrozenWeight", "Generator", "Permutation", "poetize", "build_poetized", "poet_layers",
    "merge",
    "merge_and_reset", "poet_optimizer", "poet_adamw", "poet_clip_schedule", "reset_generator_state",
    "warmup_cosine_schedule",
]
