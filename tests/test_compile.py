"""No recompilation: a second train step and a second merge reuse the compiled programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import poetjax as pj

from test_optim import VARIANTS, _loss, _setup


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_second_step_and_second_merge_do_not_recompile(variant):
    model, opt, _ = _setup(**VARIANTS[variant])
    traces = {"step": 0, "merge": 0}

    @nnx.jit
    def train_step(model, opt, tokens):
        traces["step"] += 1  # runs only while tracing
        loss, grads = nnx.value_and_grad(_loss)(model, tokens)
        opt.update(model, grads)
        return loss

    @nnx.jit
    def merge_step(model, opt, key):
        traces["merge"] += 1
        pj.merge_and_reset(model, opt, key)

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, (4, 9)))
    for i in range(2):
        train_step(model, opt, tokens)
        merge_step(model, opt, jax.random.key(i))
        train_step(model, opt, tokens)
    assert traces == {"step": 1, "merge": 1}, traces
    # and jax's compilation cache holds one executable per function
    assert train_step.jitted_fn._cache_size() == 1 and merge_step.jitted_fn._cache_size() == 1
