"""Model definitions (Flax NNX)."""

from poetjax.models.llama import Llama, LlamaConfig, count_params, llama_param_formula

__all__ = ["Llama", "LlamaConfig", "count_params", "llama_param_formula"]
