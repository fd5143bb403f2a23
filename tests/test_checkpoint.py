"""Checkpoints refuse bad input and lose nothing: corrupted or mismatched steps, an unexpected resume."""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from poetjax.checkpoint import Checkpointer, CheckpointError
from poetjax.train.loop import check_resume_compatible, run

from _runs import RESUME, state_like, tiny


def _corrupt_arrays(step_dir):
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:  # keep the files, ruin their bytes
        size = os.path.getsize(f)
        with open(f, "r+b") as fh:
            fh.truncate(size // 3)


@pytest.fixture
def run_copy(uninterrupted, tmp_path):
    """A copy of the 30-step reference run's output folder (checkpoints 20, 25, 30)."""
    shutil.copytree(os.path.dirname(uninterrupted.run_dir), tmp_path, dirs_exist_ok=True)
    return tmp_path


def _cfg(run_copy, data_cache, *overrides):
    return tiny(run_copy, data_cache, "name=full", *RESUME, *overrides)


def _ckdir(run_copy):
    return os.path.join(run_copy, "full", "checkpoints")


def test_corrupted_latest_checkpoint_is_refused_and_the_earlier_ones_stay_readable(run_copy, data_cache):
    cfg = _cfg(run_copy, data_cache)
    _corrupt_arrays(os.path.join(_ckdir(run_copy), "30"))
    with pytest.raises(CheckpointError, match=r"checkpoint step 30 .* unreadable or incomplete .*\[20, 25\]"):
        run(cfg)
    ck = Checkpointer(_ckdir(run_copy))
    assert ck.steps() == [20, 25, 30]  # nothing deleted
    state, meta = ck.restore(25, state_like(cfg))
    assert int(state.step) == 25 and meta["data_position"] == 25 and meta["merges"] == 2


def test_garbage_meta_is_refused(run_copy, data_cache):
    with open(os.path.join(_ckdir(run_copy), "30", "meta", "metadata"), "w") as f:
        f.write("{ not json")
    with pytest.raises(CheckpointError, match="checkpoint step 30 .* unreadable"):
        run(_cfg(run_copy, data_cache))
    assert Checkpointer(_ckdir(run_copy)).steps() == [20, 25, 30]


def test_checkpoint_of_a_different_config_is_refused(run_copy, data_cache):
    with pytest.raises(CheckpointError, match=r"different run config — model.hidden_size: 64 \(checkpoint\) vs 32"):
        run(_cfg(run_copy, data_cache, "model.hidden_size=32", "poet.block_size=8"))
    with pytest.raises(CheckpointError, match=r"poet.merge_interval: 10 \(checkpoint\) vs 7"):
        run(_cfg(run_copy, data_cache, "poet.merge_interval=7"))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        run(_cfg(run_copy, data_cache, "checkpoint.resume=false"))
    with pytest.raises(CheckpointError, match=r"resume_step=25 .* later steps \[30\]"):
        run(_cfg(run_copy, data_cache, "checkpoint.resume_step=25"))
    assert Checkpointer(_ckdir(run_copy)).steps() == [20, 25, 30]


def test_state_signature_mismatch_names_the_leaf(tmp_path):
    state = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,), jnp.int32)}
    with Checkpointer(str(tmp_path)) as ck:
        ck.save(7, state, {"data_position": 7})
    ck = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"\['w'\]: checkpoint has shape/dtype \[\[4, 3\], 'float32'\]"):
        ck.restore(7, {"w": jnp.ones((4, 5)), "b": jnp.zeros((3,), jnp.int32)})
    with pytest.raises(CheckpointError, match=r"\['c'\] .* is not in the checkpoint"):
        ck.restore(7, {**state, "c": jnp.ones(2)})
    with pytest.raises(CheckpointError, match="no checkpoint for step 8"):
        ck.restore(8, state)
    restored, meta = ck.restore(7, state)
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert meta["data_position"] == 7 and restored["b"].dtype == jnp.int32


def test_a_config_key_newer_than_the_checkpoint_counts_as_its_default(run_copy, data_cache):
    """A checkpoint written before a config field existed resumes while the field keeps its default (the
    behaviour of the code that wrote it), and is refused once the field is set to something else."""
    cfg = _cfg(run_copy, data_cache)
    meta = Checkpointer(_ckdir(run_copy)).read_meta(30)
    data_meta = {"fingerprint": meta["data"]["fingerprint"], "vocab_size": meta["data"]["vocab_size"]}
    del meta["config"]["data"]["encoding_errors"]
    assert check_resume_compatible(meta, cfg, data_meta, "old") == []
    with pytest.raises(CheckpointError, match=r"data.encoding_errors: 'strict' \(checkpoint\) vs 'replace'"):
        check_resume_compatible(meta, _cfg(run_copy, data_cache, "data.encoding_errors=replace"), data_meta, "old")
    # how the layers compute (poet.exec) never changes their function: a run written under an older default
    # resumes under today's
    meta["config"]["poet"]["exec"]["compute"] = "activations"
    assert cfg.poet.exec.compute == "auto" and check_resume_compatible(meta, cfg, data_meta, "old") == []
