"""Poetize a tiny NNX MLP and train it on CPU with POET (merges included).

    python examples/poetize_mlp.py [--steps 300]

Task: regress y = tanh(x·A)·B for fixed random A, B. The MLP's Linears become POETLinear layers whose
W0 is frozen; only the skew-symmetric generators (and the biases) train.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import poetjax as pj  # noqa: E402


class MLP(nnx.Module):
    def __init__(self, d_in: int, d_hidden: int, d_out: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(d_in, d_hidden, rngs=rngs)
        self.fc2 = nnx.Linear(d_hidden, d_hidden, rngs=rngs)
        self.fc3 = nnx.Linear(d_hidden, d_out, rngs=rngs)

    def __call__(self, x):
        return self.fc3(jax.nn.gelu(self.fc2(jax.nn.gelu(self.fc1(x)))))


def main(steps: int = 300, seed: int = 0, verbose: bool = True) -> list[float]:
    cfg = pj.POETConfig(block_size=16, merge_interval=50, init="normalized")
    model = MLP(32, 64, 16, rngs=nnx.Rngs(seed))
    pj.poetize(model, cfg, rngs=nnx.Rngs(seed + 1), exclude=())  # convert every layer here
    opt = nnx.Optimizer(model, pj.poet_optimizer(cfg, learning_rate=3e-3, poet_learning_rate=2e-2,
                                                 max_grad_norm=1.0), wrt=nnx.Param)
    k_a, k_b, k_data = jax.random.split(jax.random.key(seed), 3)
    a = jax.random.normal(k_a, (32, 32)) / jnp.sqrt(32.0)
    b = jax.random.normal(k_b, (32, 16)) / jnp.sqrt(32.0)

    @nnx.jit
    def train_step(model, opt, x):
        y = jnp.tanh(x @ a) @ b
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        opt.update(model, grads)
        return loss

    merge_step = nnx.jit(pj.merge_and_reset)
    losses = []
    for step in range(1, steps + 1):
        x = jax.random.normal(jax.random.fold_in(k_data, step), (128, 32))
        losses.append(float(train_step(model, opt, x)))
        if step % cfg.merge_interval == 0:
            merge_step(model, opt, jax.random.fold_in(jax.random.key(seed + 2), step))
        if verbose and (step % 50 == 0 or step == 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = main(args.steps, args.seed)
    print(f"first loss {out[0]:.4f} -> last loss {out[-1]:.4f}")
