"""Programs compiled ahead on worker threads (poetjax.train.ahead)."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poetjax.train.ahead import RARE_OPTIONS, Ahead


def test_a_submitted_program_is_compiled_before_its_call_and_computes_the_same():
    f = jax.jit(lambda x, y: jnp.sin(x) @ y + 1.0)
    x, y = jnp.arange(12.0).reshape(3, 4), jnp.ones((4, 2))
    with Ahead() as ahead:
        g = ahead.submit(f, jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(y.shape, y.dtype))
        ahead.release()
        compiled = g.future.result()  # compiled without ever being called
        assert compiled is not None
        np.testing.assert_array_equal(np.asarray(g(x, y)), np.asarray(f(x, y)))


def test_named_compiles_record_their_seconds_and_when_they_were_ready():
    f = jax.jit(lambda x: jnp.cos(x) * 2)
    t0 = time.perf_counter()
    with Ahead(start=t0) as ahead:
        named = ahead.submit(f, jax.ShapeDtypeStruct((4,), jnp.float32), name="step")
        ahead.submit(f, jax.ShapeDtypeStruct((5,), jnp.float32))  # no name: not recorded
        ahead.release()
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


def test_after_orders_two_compiles_and_leaving_waits_for_running_ones(monkeypatch):
    order, gate = [], threading.Event()
    real = jax.stages.Lowered.compile

    def compile_(self, *a, **k):
        name = "first" if "jit_first" in self.as_text() else "second"
        if name == "first":
            gate.wait(5)  # the first compile is held until the second program has been submitted
        out = real(self, *a, **k)
        order.append(name)
        return out

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_)

    def first(x):
        return x * 2

    def second(x):
        return x * 3

    spec = jax.ShapeDtypeStruct((2,), jnp.float32)
    with Ahead(workers=2) as ahead:
        a = ahead.submit(jax.jit(first), spec)
        b = ahead.submit(jax.jit(second), spec, after=a)
        ahead.release()
        gate.set()
    assert order == ["first", "second"]  # b's compile waited for a's, and both were done on leaving
    assert a.future.done() and b.future.done()
    np.testing.assert_array_equal(np.asarray(b(jnp.ones(2))), [3.0, 3.0])


def _counting_compiles(monkeypatch):
    """A list that gets one entry per XLA compile of a lowered program (in any thread)."""
    compiled = []
    real = jax.stages.Lowered.compile

    def compile_(self, *a, **k):
        compiled.append(threading.current_thread().name)
        return real(self, *a, **k)

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_)
    return compiled


def test_programs_are_lowered_at_once_but_compiled_only_after_release(monkeypatch):
    compiled = _counting_compiles(monkeypatch)
    traced = threading.Event()

    def f(x):
        traced.set()
        return x + 1

    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    with Ahead() as ahead:
        g = ahead.submit(jax.jit(f), spec)
        assert traced.wait(10)  # lowering (which traces) does not wait for release
        time.sleep(0.2)
        assert compiled == [] and not g.future.done()
        ahead.release()
        g.future.result(timeout=30)
        assert len(compiled) == 1 and compiled[0].startswith("poetjax-compile")


def test_a_first_call_releases_the_compiles_and_leaving_drops_held_ones(monkeypatch):
    compiled = _counting_compiles(monkeypatch)
    spec = jax.ShapeDtypeStruct((3,), jnp.float32)
    with Ahead() as ahead:
        g = ahead.submit(jax.jit(lambda x: x * 2), spec)
        np.testing.assert_array_equal(np.asarray(g(jnp.ones(3))), [2.0, 2.0, 2.0])  # no release(): no deadlock
    assert len(compiled) == 1
    compiled.clear()
    with Ahead() as ahead:  # left before release: lowered, never compiled, and leaving does not hang
        h = ahead.submit(jax.jit(lambda x: x * 3), spec)
    assert compiled == []
    assert isinstance(h.future.exception(timeout=10), RuntimeError)
