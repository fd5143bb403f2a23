"""Bad input gets a ValueError that names the offending value."""

import jax.numpy as jnp
import pytest
from flax import nnx

import poetjax as pj


@pytest.mark.parametrize("kwargs,match", [
    ({"block_size": 0}, "block_size=0"),
    ({"block_size": -3}, "block_size=-3"),
    ({"merge_interval": 0}, "merge_interval=0"),
    ({"merge_interval": -1}, "merge_interval=-1"),
    ({"init": "gaussian"}, "init='gaussian'"),
    ({"family": "ps"}, "family='ps'"),
    ({"memory": "slow"}, "memory='slow'"),
    ({"base": "int4"}, "base='int4'"),
    ({"cayley": "pade"}, "cayley='pade'"),
    ({"num_terms": 0}, "num_terms=0"),
    ({"init_scale": 0.0}, "init_scale=0.0"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        pj.POETConfig(**kwargs)


def test_block_size_larger_than_dim():
    with pytest.raises(ValueError, match=r"block_size=64 is larger than in_features=32"):
        pj.POETLinear(32, 128, config=pj.POETConfig(block_size=64), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"block_size=64 is larger than out_features=16"):
        pj.POETLinear(128, 16, config=pj.POETConfig(block_size=64), rngs=nnx.Rngs(0))


def test_wrong_feature_size():
    layer = pj.POETLinear(32, 16, config=pj.POETConfig(block_size=8), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(\.\.\., 32\); got shape \(2, 5, 33\)"):
        layer(jnp.ones((2, 5, 33)))


def test_exec_fields_are_checked_and_replace_takes_a_dict():
    with pytest.raises(ValueError, match=r"cayley_scope must be one of .*got cayley_scope='layers'"):
        pj.ExecConfig(cayley_scope="layers")
    with pytest.raises(TypeError, match="exec must be an ExecConfig, got dict"):
        pj.POETConfig(exec={"impl": "xla"})
    cfg = pj.POETConfig().replace(block_size=64, exec={"impl": "xla"})
    assert cfg.block_size == 64 and cfg.exec == pj.ExecConfig(impl="xla")
    assert pj.POETConfig(memory="mem", base="uint8").label == "POET-XQ mem"
