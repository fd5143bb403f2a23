"""poetjax: POET / POET-X (orthogonal equivalence transformation) training in JAX."""

from poetjax.config import POETConfig
from poetjax.layers import FrozenWeight, Generator, Permutation, POETLinear
from poetjax.merge import merge, merge_and_reset
from poetjax.optim import (poet_adamw, poet_clip_schedule, poet_optimizer, reset_generator_state,
                           warmup_cosine_schedule)
from poetjax.surgery import build_poetized, poet_layers, poetize

__all__ = [
    "POETConfig", "POETLinear", "FrozenWeight", "Generator", "Permutation", "poetize", "build_poetized", "poet_layers",
    "merge",
    "merge_and_reset", "poet_optimizer", "poet_adamw", "poet_clip_schedule", "reset_generator_state",
    "warmup_cosine_schedule",
]
