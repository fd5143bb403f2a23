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
    ({"variant": "slow"}, "variant='slow'"),
    ({"cayley": "pade"}, "cayley='pade'"),
    ({"num_terms": 0}, "num_terms=0"),
    ({"poet_scale": 0.0}, "poet_scale=0.0"),
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


def test_exclude_accepts_a_single_string():
    assert pj.POETConfig(exclude="head").exclude == ("head",)
