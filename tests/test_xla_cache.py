"""The persistent compilation cache of training runs: where it lives, its off-switch, and a second run
that loads what the first compiled."""

import os

import jax

from poetjax.train.loop import run
from poetjax.train.xla_cache import ENV_VAR, cache_dir, use_compilation_cache

from _runs import tiny


def test_the_cache_folder_follows_the_setting_then_the_environment():
    home = os.path.expanduser("~")
    assert cache_dir("auto", {}) == os.path.join(home, ".cache", "poetjax", "jax")
    assert cache_dir("auto", {"XDG_CACHE_HOME": "xdg"}) == os.path.join("xdg", "poetjax", "jax")
    assert cache_dir("auto", {ENV_VAR: "mine", "XDG_CACHE_HOME": "xdg"}) == "mine"
    for off in ("off", "OFF", "", " "):
        assert cache_dir("auto", {ENV_VAR: off}) is None
        assert cache_dir(off, {ENV_VAR: "mine"}) is None
    assert cache_dir("~/c", {ENV_VAR: "mine"}) == os.path.join(home, "c")  # an explicit folder wins


def test_an_unwritable_folder_warns_once_and_turns_the_cache_off(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    lines = []
    try:
        assert use_compilation_cache(str(blocker / "cache"), lines.append) is None
        assert jax.config.jax_compilation_cache_dir is None
        assert len(lines) == 1 and str(blocker / "cache") in lines[0] and lines[0].startswith("warning:")
        assert float(jax.jit(lambda x: x + 1)(1.0)) == 2.0  # compiling still works, without a cache
    finally:
        use_compilation_cache("auto", print)  # back to the session's cache (conftest.py)
    assert jax.config.jax_compilation_cache_dir == os.environ[ENV_VAR]


def test_a_second_identical_run_loads_its_programs_from_the_cache(tmp_path, data_cache):
    cache = tmp_path / "xla"
    events = []

    def listen(event, **kwargs):
        if event.startswith("/jax/compilation_cache/cache_"):
            events.append(event.rsplit("/", 1)[-1])

    small = ["train.steps=2", "schedule.warmup_steps=1", "model.num_layers=1", "logging.diagnostics_interval=0", "train.eval_batches=1",
             f"train.compilation_cache={cache}"]
    jax.jit(lambda x: 3 * x)(1.0)  # jax opens the session's cache here: the run must switch folders
    jax.monitoring.register_event_listener(listen)
    try:
        first = run(tiny(tmp_path, data_cache, "name=first", *small))
        written = len(os.listdir(cache))
        assert written > 0 and "cache_misses" in events  # the first run wrote its programs
        events.clear()
        second = run(tiny(tmp_path, data_cache, "name=second", *small))
    finally:
        jax.monitoring.unregister_event_listener(listen)
        use_compilation_cache("auto", print)
    assert "cache_hits" in events and "cache_misses" not in events, events  # compiled nothing new
    assert len(os.listdir(cache)) == written
    assert second.losses == first.losses
