import os
import sys

import pytest

# One OpenBLAS thread per caller, as train.py sets: LAPACK (SVDs, solves) called from XLA's worker threads
# otherwise oversubscribes a small CI machine. Before numpy is imported; an explicit setting wins. Not in
# the 8-virtual-device subprocess (tests/multidevice, started by test_distributed.py): eight device threads
# calling LAPACK at once deadlock single-threaded OpenBLAS, exactly as train.py avoids.
if not os.environ.get("POETJAX_MULTIDEVICE") and \
        "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Tests import the package from the checkout even when it is not installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# tests/multidevice needs a process with 8 devices: test_distributed.py runs it in subprocesses.
collect_ignore = [] if os.environ.get("POETJAX_MULTIDEVICE") == "1" else ["multidevice"]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A token-shard cache shared by the tests of one session (prepare runs once per setting)."""
    return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """A persistent XLA cache for the session, never the user's: the training tests compile the same
    programs in several runs (uninterrupted vs stopped + resumed); later runs load them instead of
    compiling again. Through the variable that ``train.compilation_cache=auto`` reads, so runs in this
    process and in subprocesses (train.py) use it too; the thresholds are the ones a run sets."""
    from poetjax.train.xla_cache import ENV_VAR, use_compilation_cache

    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = str(tmp_path_factory.mktemp("xla_cache"))
    use_compilation_cache("auto", warn=print)
    yield
    if before is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = before


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, data_cache):
    """The reference run of the resume tests: 30 tiny steps (merges at 10, 20, 30) that nothing interrupts;
    its checkpoints (steps 20, 25, 30) also serve the checkpoint tests, which work on copies."""
    from _runs import RESUME, tiny
    from poetjax.train.loop import run

    return run(tiny(tmp_path_factory.mktemp("full"), data_cache, "name=full", *RESUME))
