"""poetjax.distributed in this (single-device) process, and the 8-device tests of tests/multidevice run
in one subprocess of their own (a process's device count is fixed when its backend starts)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from poetjax import distributed as dist
from poetjax.data.loader import BatchSampler
from poetjax.run_config import ConfigError, load_config

from _runs import ROOT, TINY


@pytest.mark.parametrize("data,fsdp,n,expected", [(-1, 1, 8, (8, 1)), (2, -1, 8, (2, 4)), (4, 2, 8, (4, 2)),
                                                   (1, 1, 8, (1, 1)), (-1, 1, 1, (1, 1))])
def test_mesh_shape_resolves_the_rest(data, fsdp, n, expected):
    assert dist.mesh_shape(data, fsdp, n) == expected


@pytest.mark.parametrize("data,fsdp,n,message", [
    (0, 1, 8, r"mesh.data must be a positive number of devices or -1 \(the rest\), got data=0"),
    (2, -3, 8, r"mesh.fsdp .* got fsdp=-3"),
    (-1, -1, 8, r"at most one of mesh.data and mesh.fsdp may be -1"),
    (3, -1, 8, r"mesh.data=3 does not divide the 8 available devices"),
    (4, 4, 8, r"mesh data=4 x fsdp=4 needs 16 devices, but only 8 are available"),
])
def test_mesh_shape_errors_name_the_bad_value(data, fsdp, n, message):
    with pytest.raises(dist.MeshError, match=message):
        dist.mesh_shape(data, fsdp, n)


def test_mesh_config_is_checked_when_loaded():
    with pytest.raises(ConfigError, match=r"fsdp must be a positive number of devices or -1 .* got fsdp=0"):
        load_config(TINY, ["mesh.fsdp=0"])
    with pytest.raises(ConfigError, match=r"distributed must be one of \('auto', 'on', 'off'\), got distributed='yes'"):
        load_config(TINY, ["mesh.distributed=yes"])
    with pytest.raises(ConfigError, match=r"train.batch_size=8 is not divisible by mesh.data=3 x mesh.fsdp=1 x "
                                          r"train.microbatches=1 = 3"):
        load_config(TINY, ["mesh.data=3"])
    assert load_config(TINY, ["mesh.data=2", "mesh.fsdp=4"]).mesh.fsdp == 4


def test_one_device_mesh_and_batch_checks():
    mesh = dist.make_mesh(-1, 1, jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert "mesh (data=1, fsdp=1) over 1" in dist.describe(mesh)
    with pytest.raises(dist.MeshError, match=r"needs 2 devices, but only 1 are available"):
        dist.make_mesh(2, 1, jax.devices()[:1])
    dist.check_batch(8, mesh, microbatches=8)
    fake = type("FakeMesh", (), {"shape": {"data": 2, "fsdp": 2}})()
    with pytest.raises(dist.MeshError, match=r"train.batch_size=8 is not divisible by microbatches=4 x the 4 batch "
                                             r"shards of the mesh \(data=2, fsdp=2\)"):
        dist.check_batch(8, fake, microbatches=4)


def test_multi_host_entry_is_asked_for_by_the_environment():
    assert not dist.distributed_requested("auto", {})
    assert dist.distributed_requested("auto", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert not dist.distributed_requested("off", {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert dist.distributed_requested("on", {})
    with pytest.raises(ValueError, match=r"mesh.distributed must be one of .* got 'sometimes'"):
        dist.distributed_requested("sometimes", {})
    assert dist.initialize_distributed("auto", {}) is False  # nothing asked: nothing started
    with pytest.raises(dist.MeshError, match=r"JAX_NUM_PROCESSES='two' is not an integer"):
        dist.initialize_distributed("auto", {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two"})


def test_a_hosts_rows_of_a_batch_are_those_rows_of_the_global_batch():
    tokens = np.random.default_rng(0).integers(0, 100, 5000).astype(np.uint16)
    sampler = BatchSampler(tokens, batch_size=8, seq_len=16, seed=3)
    for position in (0, 7, 400):  # 400: a later epoch
        whole = sampler.batch(position)
        assert whole.shape == (8, 17) and whole.dtype == np.int32
        for rows in (slice(0, 2), slice(2, 6), slice(6, 8)):
            np.testing.assert_array_equal(sampler.batch(position, rows), whole[rows])
        assert sampler.batch(position, slice(3, 3)).shape == (0, 17)

    mesh = dist.make_mesh(1, 1, jax.devices()[:1])
    sharding = dist.batch_sharding(mesh)
    assert dist.process_rows(sharding, (8, 17)) == slice(0, 8)
    got = dist.global_batch(lambda rows: sampler.batch(5, rows), (8, 17), sharding)
    np.testing.assert_array_equal(np.asarray(got), sampler.batch(5))
    with pytest.raises(ValueError, match=r"returned shape \(7, 17\), expected \(8, 17\)"):
        dist.global_batch(lambda rows: sampler.batch(5, slice(0, 7)), (8, 17), sharding)


def test_eight_device_suite(data_cache):
    """tests/multidevice (sharded training on four meshes, sharding rules and HLO, checkpoints across
    meshes, pmap, the scaling benchmark) in one process with 8 virtual CPU devices."""
    env = dict(os.environ, POETJAX_MULTIDEVICE="1", POETJAX_TEST_DATA_CACHE=data_cache, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    # Eight device threads calling LAPACK at once deadlock single-threaded OpenBLAS (the diagnostics' SVDs
    # hung the first sharded run); train.py leaves it unset with virtual devices, so must we.
    if env.get("OPENBLAS_NUM_THREADS") == "1":
        del env["OPENBLAS_NUM_THREADS"]
    # Threads for XLA's CPU pools, as train.py sets them (see there): the in-process all-reduces of eight
    # devices deadlocked the 2-core CI machine's pools under the other test worker's load.
    env.setdefault("NPROC", "16")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.join("tests", "multidevice")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"tests/multidevice failed:\n{proc.stdout[-8000:]}\n{proc.stderr[-4000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]
