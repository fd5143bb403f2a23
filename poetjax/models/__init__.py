"""Model definitions (Flax NNX)."""

from poetjax.models.llama import (Llama, LlamaConfig, count_params, layer_view, llama_param_formula, stack_layers,
                                  unstack_layers)

__all__ = ["Llama", "LlamaConfig", "count_params", "layer_view", "llama_param_formula", "stack_layers", "unstack_layers"]
