"""Programs compiled ahead on worker threads (poetjax.train.ahead)."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poetjax.run_config import load_config
from poetjax.train.ahead import RARE_OPTIONS, Ahead, compiler_options, train_options


def test_a_submitted_program_is_compiled_before_its_call_and_computes_the_same():
    f = jax.jit(lambda x, y: jnp.sin(x) @ y + 1.0)
    x, y = jnp.arange(12.0).reshape(3, 4), jnp.ones((4, 2))
    with Ahead() as ahead:
        g = ahead.submit(f, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(y.shape, y.dtype))
        compiled = g.future.result()  # compiled without ever being called
        assert compiled is not None
        np.testing.assert_array_equal(np.asarray(g(x, y)), np.asarray(f(x, y)))


def test_named_compiles_record_their_seconds_and_when_they_were_ready():
    f = jax.jit(lambda x: jnp.cos(x) * 2)
    t0 = time.perf_counter()
    with Ahead(start=t0) as ahead:
        named = ahead.submit(f, jax.ShapeDtypeStruct((4,), jnp.float32), name="step")
        ahead.submit(f, jax.ShapeDtypeStruct((5,), jnp.float32))  # no name: not recorded
        named.future.result()
        waited = time.perf_counter() - t0
    assert list(ahead.compiles) == ["step"]
    ready, seconds = ahead.compiles["step"]
    assert 0 < seconds <= ready <= waited


def test_rare_options_compile_and_give_the_same_result():
    f = jax.jit(lambda a: jnp.linalg.svd(a @ a.T, compute_uv=False))
    a = jax.random.normal(jax.random.key(0), (16, 8))
    with Ahead() as ahead:
        g = ahead.submit(f, jax.ShapeDtypeStruct(a.shape, a.dtype), options=RARE_OPTIONS)
        np.testing.assert_allclose(np.asarray(g(a)), np.asarray(f(a)), rtol=1e-5, atol=1e-5)


def test_an_option_set_in_xla_flags_keeps_the_users_value():
    flags = "--xla_gpu_enable_triton_gemm=true  --xla_dump_to=dumps"
    kept = compiler_options(RARE_OPTIONS, flags)
    assert "xla_gpu_enable_triton_gemm" not in kept
    assert kept == {k: v for k, v in RARE_OPTIONS.items() if k != "xla_gpu_enable_triton_gemm"}
    assert compiler_options(RARE_OPTIONS, "") == RARE_OPTIONS
    assert compiler_options(None, flags) == {}


@pytest.mark.parametrize("config, triton_gemm", [("configs/llama_60m.yaml", False), ("configs/llama_130m.yaml", True),
                                                 ("configs/llama_1b.yaml", True)])
def test_the_train_step_drops_triton_gemm_fusions_only_in_small_models(config, triton_gemm):
    options = train_options(load_config(config).model.hidden_size)
    assert options.get("xla_gpu_enable_triton_gemm", True) == triton_gemm
    assert set(options) <= {"xla_gpu_enable_triton_gemm"}  # autotuning stays on: the step runs every time


def test_a_compile_error_is_raised_at_the_first_call():
    f = jax.jit(lambda x: x @ x)  # (3, 4) @ (3, 4): a shape error, found while lowering on the worker
    with Ahead() as ahead:
        g = ahead.submit(f, jax.ShapeDtypeStruct((3, 4), jnp.float32))
        with pytest.raises(TypeError, match="dot_general"):
            g(jnp.ones((3, 4)))


def test_a_plain_function_is_returned_unchanged():
    def plain(x):
        return x + 1
    with Ahead() as ahead:
        assert ahead.submit(plain, jax.ShapeDtypeStruct((2,), jnp.float32)) is plain


def test_after_orders_two_compiles_and_leaving_waits_for_running_ones():
    order, gate = [], threading.Event()

    def first(x):
        gate.wait(5)  # the first trace is held until the second program has been submitted
        order.append("first")
        return x * 2

    def second(x):
        order.append("second")
        return x * 3

    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    with Ahead(workers=2) as ahead:
        a = ahead.submit(jax.jit(first), spec)
        b = ahead.submit(jax.jit(second), spec, after=a)
        gate.set()
    assert order == ["first", "second"]  # b waited for a, and both were done on leaving
    assert a.future.done() and b.future.done()
    np.testing.assert_array_equal(np.asarray(b(jnp.ones(2))), [3.0, 3.0])
