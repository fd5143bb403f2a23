"""Kernel configurations: validation messages, heuristics, the tuning table, token chunking."""

import dataclasses

import pytest

import pallas_kernels as pk
from pallas_kernels import BlockMatmulConfig, CayleyConfig, LoopConfig, ReduceConfig, RotateConfig
from pallas_kernels import tuning


@pytest.mark.parametrize("k", [16, 32, 48, 64, 96, 128, 256, 512])
def test_default_configs_are_valid_for_supported_block_sizes(k):
    bm = tuning.block_matmul_config(k)
    for cfg in (bm.forward, bm.backward):
        assert k % cfg.block_k == 0 and k % cfg.n_tile(k) == 0
    assert k % bm.reduce.block_m == 0 and k % bm.reduce.block_n == 0
    cy = tuning.cayley_config(k)
    assert k % cy.block_m == 0 and k % cy.block_k == 0


def test_tuning_table_entries_are_valid_configs():
    kinds = {"rotate_fwd": RotateConfig, "rotate_bwd": RotateConfig, "reduce": ReduceConfig, "cayley": CayleyConfig,
             "loop_bwd": LoopConfig}
    for (kernel, k), fields in tuning.TABLE.items():
        kinds[kernel.split("/")[0]](**fields).validate(k)   # "<kernel>/chunked", "cayley/<precision>"


def test_table_overrides_heuristics(monkeypatch):
    monkeypatch.setitem(tuning.TABLE, ("rotate_fwd", 64), {"block_t": 128, "num_warps": 4})
    cfg = tuning.block_matmul_config(64)
    assert cfg.forward.block_t == 128 and cfg.forward.num_warps == 4
    assert cfg.backward == tuning._rotate_heuristic(64)  # other kernels keep their heuristics


def test_chunked_index_vectors_get_their_own_tiles(monkeypatch):
    monkeypatch.setitem(tuning.TABLE, ("rotate_fwd/chunked", 64), {"block_t": 256, "block_k": 64})
    monkeypatch.setitem(tuning.TABLE, ("reduce/chunked", 64), {"block_m": 32})
    plain, chunked = tuning.block_matmul_config(64), tuning.block_matmul_config(64, 32)
    assert (chunked.forward.block_t, chunked.forward.block_k) == (256, 64) and chunked.reduce.block_m == 32
    assert chunked.backward == plain.backward   # no chunked entry: the plain one
    assert plain.forward.block_t != 256 and plain.save_gathered
    assert not chunked.save_gathered   # chunked: the dR reduction gathers again
    assert tuning.block_matmul_config(64, 8) == plain   # runs narrower than a tile: the plain kernels


def test_loop_kernels_only_for_chunked_vectors_with_table_entries(monkeypatch):
    monkeypatch.setitem(tuning.TABLE, ("loop_bwd/chunked", 64), {"block_t": 32, "block_n": 128, "block_p": 16})
    cfg = tuning.block_matmul_config(64, 32)
    assert cfg.backward_loop == LoopConfig(block_t=32, block_n=64, block_p=16)   # block_n fitted to K
    assert tuning.block_matmul_config(64).backward_loop is None       # unchunked vectors never
    assert tuning.block_matmul_config(64, 8).backward_loop is None    # nor runs narrower than a tile
    monkeypatch.delitem(tuning.TABLE, ("loop_bwd/chunked", 64))
    assert tuning.block_matmul_config(64, 32).backward_loop is None   # no entry: the separate kernels


@pytest.mark.parametrize("k", [0, 8, 20, 24, 250])
def test_unsupported_block_sizes(k):
    assert not pk.supports_block_size(k)
    with pytest.raises(ValueError, match=f"block_size={k} is not supported by the Pallas kernels"):
        tuning.block_matmul_config(k)


def test_validation_messages_quote_values():
    with pytest.raises(ValueError, match=r"RotateConfig.block_t=24 must be a power of two ≥ 16"):
        RotateConfig(block_t=24).validate()
    with pytest.raises(ValueError, match=r"RotateConfig.block_n=64 does not divide block_size=32"):
        RotateConfig(block_k=16, block_n=64).validate(32)
    with pytest.raises(ValueError, match=r"ReduceConfig.num_chunks=-1 must be an int ≥ 0"):
        ReduceConfig(num_chunks=-1).validate(64)
    with pytest.raises(ValueError, match=r"ReduceConfig.num_warps=3 must be one of"):
        ReduceConfig(num_warps=3).validate(64)
    with pytest.raises(ValueError, match=r"CayleyConfig.num_stages=0 must be an int in \[1, 8\]"):
        CayleyConfig(num_stages=0).validate(64)
    with pytest.raises(ValueError, match=r"save_gathered=1 must be a bool"):
        BlockMatmulConfig(save_gathered=1).validate(64)
    with pytest.raises(ValueError, match=r"LoopConfig.block_p=128 does not divide block_size=64"):
        LoopConfig(block_p=128).validate(64)
    with pytest.raises(ValueError, match=r"LoopConfig.waves=0 must be an int ≥ 1"):
        LoopConfig(waves=0).validate(64)
    with pytest.raises(ValueError, match=r"LoopConfig.block_n=64 does not divide block_size=32"):
        dataclasses.replace(tuning.block_matmul_config(32),
                            backward_loop=LoopConfig(block_n=64, block_p=16)).validate(32)
    with pytest.raises(TypeError, match=r"backward_loop must be a LoopConfig or None, got RotateConfig"):
        BlockMatmulConfig(backward_loop=RotateConfig()).validate(64)


def test_token_chunks():
    cfg = ReduceConfig(block_t=64, block_m=64, block_n=64)
    # 16 blocks × 4 × 4 tiles = 256 programs per chunk: one chunk already fills the GPU twice
    assert cfg.chunks(16384, 16, 256) == 2               # 256 programs per chunk: ⌈2·132 / 256⌉
    assert cfg.chunks(16384, 1, 64) == 256               # 1 program per chunk wants 264, capped by 256 tiles
    assert cfg.chunks(100, 1, 64) == 2                # never more chunks than token tiles
    assert ReduceConfig(num_chunks=8).chunks(16384, 1, 64) == 8
    assert ReduceConfig(num_chunks=8).chunks(100, 1, 64) == 2


def test_loop_token_chunks():
    cfg = LoopConfig(block_t=64, block_n=64)
    assert cfg.chunks(16384, 16, 256) == 5               # 64 programs per chunk: ⌈2·132 / 64⌉
    assert LoopConfig(block_t=64, block_n=64, waves=4).chunks(16384, 16, 256) == 9
    assert cfg.chunks(100, 16, 256) == 2                 # never more chunks than token tiles
    assert LoopConfig(num_chunks=3).chunks(16384, 16, 256) == 3
