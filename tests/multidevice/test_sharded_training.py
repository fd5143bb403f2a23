"""The tiny model trained on meshes (8,1), (4,2), (2,4) and on one device: same losses; a checkpoint
written on (8,1) restores on (2,4) and on one device, and training continues the same way; a run on two
processes stopped by SIGTERM writes one checkpoint that resumes on (2,4)."""

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poetjax import distributed as dist
from poetjax.checkpoint import Checkpointer, committed_steps
from poetjax.testing import assert_close
from poetjax.train import sharded
from poetjax.train.loop import run
from poetjax.train.monitor import read_jsonl
from poetjax.train.optimizers import make_optimizer

from _runs import ROOT, TINY, tiny

MESHES = [(1, 1), (8, 1), (4, 2), (2, 4)]
STEPS = 50
# 60-step schedule stopped after 50 (no final evaluation yet, a checkpoint at 50); merges every 10 steps.
# min_shard_size 4096 makes fsdp split the embedding and lm_head (and their Adam moments) too.
COMMON = ["train.steps=60", "train.eval_interval=0", "checkpoint.interval=0", "mesh.min_shard_size=4096",
          "train.log_interval=10", "logging.progress=lines"]


def _mesh_args(mesh):
    return [f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}"]


def _run(cfg):
    """run(cfg) and its progress output (which names the mesh)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        res = run(cfg)
    return res, err.getvalue()


def _losses(res, steps):
    assert sorted(res.losses) == list(steps)
    return np.array([res.losses[s] for s in steps])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache):
    out = {}
    for mesh in MESHES:
        cfg = tiny(tmp_path_factory.mktemp("mesh"), data_cache, f"name=m{mesh[0]}x{mesh[1]}", *COMMON,
                   f"train.stop_after={STEPS}", *_mesh_args(mesh))
        res, log = _run(cfg)
        n = mesh[0] * mesh[1]
        assert f"mesh (data={mesh[0]}, fsdp={mesh[1]}) over {n} cpu device(s)" in log
        out[mesh] = res
    return out


def test_fifty_steps_with_merges_give_the_same_losses_on_every_mesh(runs):
    ref = _losses(runs[(1, 1)], range(1, STEPS + 1))
    assert ref[-1] < ref[0] - 1.0  # it trained
    for mesh in MESHES[1:]:
        got = _losses(runs[mesh], range(1, STEPS + 1))
        # the same math summed in another order: fp32 reduction-order differences only
        assert_close(got, ref, jnp.float32, "same", f"losses on mesh {mesh} vs one device")
    for mesh in MESHES:
        meta = Checkpointer(runs[mesh].checkpoint_dir).read_meta(STEPS)
        assert meta["merges"] == STEPS // 10 and meta["data_position"] == STEPS


def test_generator_levers_give_the_same_losses_on_a_mesh(tmp_path, data_cache):
    """Newton–Schulz batched over the blocks of every generator leaf, a momentum carried across merges and
    alternating sides: the same losses on a (2, 4) mesh as on one device, through two merges."""
    levers = ["optimizer.generator_update=ns", "poet.cayley=exact", "optimizer.poet_lr=1e-2",
              "optimizer.carry_moment=true", "optimizer.alternate_sides=true", "train.stop_after=25"]
    losses = {}
    for mesh in [(1, 1), (2, 4)]:
        cfg = tiny(tmp_path / f"m{mesh[0]}x{mesh[1]}", data_cache, "name=levers", *COMMON, *levers, *_mesh_args(mesh))
        losses[mesh] = _losses(_run(cfg)[0], range(1, 26))
    assert losses[(1, 1)][-1] < losses[(1, 1)][0] - 0.5  # it trained
    assert_close(losses[(2, 4)], losses[(1, 1)], jnp.float32, "same", "lever losses on mesh (2, 4) vs one device")


def test_checkpoint_from_8x1_restores_on_2x4_and_one_device_and_training_continues(runs, tmp_path, data_cache):
    src = runs[(8, 1)]
    cfg = tiny(tmp_path, data_cache, *COMMON)
    tx = make_optimizer(cfg)

    # The restored state: laid out as the target mesh's rules say, values bit-identical on every mesh.
    restored = {}
    for mesh in [(2, 4), (1, 1)]:
        m = dist.make_mesh(*mesh)
        graphdef, like, shardings = sharded.init_train_state(cfg, tx, m)
        state, meta = Checkpointer(src.checkpoint_dir).restore(STEPS, like, shardings=shardings)
        assert int(state.step) == STEPS and int(state.merges) == STEPS // 10
        jax.tree.map(lambda x, s: _check_layout(x, s, m), state, shardings)
        restored[mesh] = jax.device_get(state)
    w0 = state.frozen["layers"][0]["mlp"]["gate_proj"]["w0"]  # (64, 128) on one device now
    assert len(w0.sharding.device_set) == 1
    jax.tree.map(np.testing.assert_array_equal, restored[(2, 4)], restored[(1, 1)])

    # Training continues: steps 51-60 (a merge at 60) resumed on (8,1), (2,4) and one device.
    cont = {}
    for mesh in [(8, 1), (2, 4), (1, 1)]:
        out = tmp_path / f"{mesh[0]}x{mesh[1]}"
        shutil.copytree(src.run_dir, out / "resumed")
        res, log = _run(tiny(out, data_cache, "name=resumed", *COMMON, *_mesh_args(mesh)))
        assert f"resumed from checkpoint step {STEPS}" in log
        assert res.completed and res.step == 60
        cont[mesh] = res
    ref = _losses(cont[(8, 1)], range(STEPS + 1, 61))
    for mesh in [(2, 4), (1, 1)]:
        assert_close(_losses(cont[mesh], range(STEPS + 1, 61)), ref, jnp.float32, "same",
                     f"losses after resuming on {mesh}")
        assert_close(cont[mesh].val_loss, cont[(8, 1)].val_loss, jnp.float32, "same", f"final val loss on {mesh}")


def _check_layout(x, sharding, mesh):
    assert x.sharding.is_equivalent_to(sharding, x.ndim), (x.sharding, sharding)
    assert x.sharding.mesh.shape == mesh.shape


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_on_another_mesh(runs, tmp_path,
                                                                                             data_cache):
    """Two processes of 4 virtual CPU devices each train on one (8,1) mesh (JAX's multi-process runtime on
    localhost); only process 1 gets SIGTERM. Both must stop after the same step, or the checkpoint they
    write together would mix steps (or its save would hang): process 0 names the step, both exit 143, one
    complete checkpoint is on disk, and it resumes on (2,4) in this process to the losses of the
    uninterrupted (8,1) run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--config", TINY, f"out_dir={tmp_path}",
            f"data.cache_dir={data_cache}", "logging.plot=false", "name=mp", *COMMON, f"train.stop_after={STEPS}",
            "train.log_interval=1", "mesh.data=8"]
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(rank),
                   PYTHONPATH=ROOT)
        logs.append(tmp_path / f"process{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log))
    try:
        metrics = tmp_path / "mp" / "metrics.jsonl"  # process 0's, one line per step
        deadline = time.time() + 600
        while not (metrics.exists() and '"step": 3,' in metrics.read_text()):
            assert time.time() < deadline and all(p.poll() is None for p in procs), logs[0].read_text()[-3000:]
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = logs[0].read_text()
    assert codes == [143, 143], (codes, err[-3000:], logs[1].read_text()[-3000:])
    ckdir = os.path.join(tmp_path, "mp", "checkpoints")
    (step,) = committed_steps(ckdir)
    assert 3 <= step < STEPS and f"stopped by SIGTERM after step {step}: wrote checkpoint step {step}" in err
    assert "mesh (data=8, fsdp=1) over 8 cpu device(s) on 2 processes" in err
    meta = Checkpointer(ckdir).read_meta(step)
    assert meta["data_position"] == step and meta["merges"] == step // 10

    res, log = _run(tiny(tmp_path, data_cache, "name=mp", *COMMON, f"train.stop_after={STEPS}", *_mesh_args((2, 4))))
    assert f"resumed from checkpoint step {step}" in log and res.step == STEPS
    before = {r["step"]: r["loss"] for r in read_jsonl(str(metrics)) if "loss" in r and r["step"] <= step}
    losses = {**before, **res.losses}
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(np.array([losses[s] for s in range(1, STEPS + 1)]), _losses(runs[(8, 1)], range(1, STEPS + 1)),
                 jnp.float32, "same", "losses of the stopped two-process run + its resume vs the (8,1) run")
