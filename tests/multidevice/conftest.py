"""Tests that need 8 devices: run in a process of their own with 8 virtual CPU devices.

``tests/test_distributed.py`` starts them (one subprocess per file) during the normal ``pytest`` run;
the root conftest leaves this folder out of that run's own collection, because the device count of a
process is fixed once its backend starts. To run them directly::

    POETJAX_MULTIDEVICE=1 python -m pytest tests/multidevice

(XLA_FLAGS is set here when it does not already ask for host devices; on a machine with 8 real
accelerators the tests use those instead.)
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before any backend starts: jax reads this when the first device is touched.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import pytest

NUM_DEVICES = 8


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    import jax

    if jax.device_count() < NUM_DEVICES:
        pytest.fail(f"these tests need {NUM_DEVICES} devices, the process has {jax.device_count()} "
                    f"({jax.devices()}); was a backend started before this conftest set XLA_FLAGS?")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """The parent test session's token cache when it passes one (no second BPE training), else a fresh one."""
    return os.environ.get("POETJAX_TEST_DATA_CACHE") or str(tmp_path_factory.mktemp("data_cache"))
