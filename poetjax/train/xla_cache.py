"""JAX's persistent compilation cache for training runs: a second run loads the programs a first compiled.

``train.compilation_cache`` picks the folder: ``auto`` (the default) is ``$POETJAX_COMPILATION_CACHE`` when
that is set, else ``$XDG_CACHE_HOME/poetjax/jax``, else ``~/.cache/poetjax/jax``; ``off`` (or an empty
string, in the config or the variable) turns the cache off; anything else is the folder itself. Every
program is cached, however small or quick to compile: a run compiles many small ones (per-shape init
programs), and on a GPU their compile and autotune times add up.

This sets process-wide JAX options (``jax_compilation_cache_dir`` and the size/time thresholds) at the
edge, before a run builds anything; it is the only place that does.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Mapping

import jax

ENV_VAR = "POETJAX_COMPILATION_CACHE"
OFF = ("", "off")


def cache_dir(setting: str, env: Mapping[str, str] = os.environ) -> str | None:
    """The cache folder of ``setting`` (``train.compilation_cache``), or None when the cache is off."""
    if setting == "auto":
        if ENV_VAR in env:
            setting = env[ENV_VAR]
        else:
            base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
            return os.path.join(base, "poetjax", "jax")
    if setting.strip().lower() in OFF:
        return None
    return os.path.expanduser(setting)


def _reset() -> None:
    """Make jax open the folder now set: it opens its cache once per process, at the first compile."""
    try:
        from jax.experimental.compilation_cache.compilation_cache import reset_cache
    except ImportError:  # a jax without it: the setting still holds for a fresh process
        return
    reset_cache()


def use_compilation_cache(setting: str, warn: Callable[[str], None]) -> str | None:
    """Point JAX's persistent cache at ``cache_dir(setting)`` (or turn it off); return the folder in use.

    A folder that cannot be created or written is not an error: ``warn`` gets one line and the run goes on
    without the cache."""
    path = cache_dir(setting)
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
            tempfile.TemporaryFile(dir=path).close()
        except OSError as e:
            warn(f"warning: compilation cache off: cannot write to {path!r} ({e.strerror or type(e).__name__}); "
                 f"set train.compilation_cache=<folder> or off")
            path = None
    if path != jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", path)
        _reset()
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size floor, no override
    return path
