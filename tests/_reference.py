"""Dense reference of a POET layer built another way: explicit permutation and block-diagonal matrices.

W_eff = R · W0 · P with R = Π_π · blockdiag(G_in) · Π_πᵀ (N×N) and P = Σ_σᵀ · blockdiag(G_out) · Σ_σ (M×M),
where x·Π_π = pad(x[π]) and z·Σ_σ = z[σ]; blocks from the explicit polynomial (I+Q)Σ_{i≤k} Qⁱ.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import block_diag


def skew_scatter(theta_BxP, k, tail=None):
    r, c = np.triu_indices(k, 1)
    u = jnp.zeros(theta_BxP.shape[:-1] + (k, k), theta_BxP.dtype).at[..., r, c].set(theta_BxP)
    q = u - jnp.swapaxes(u, -1, -2)
    if tail is not None and tail < k:  # the ragged last block lives on its leading tail×tail corner
        m = np.ones((theta_BxP.shape[0], k, k))
        m[-1, tail:, :] = 0
        m[-1, :, tail:] = 0
        q = q * m
    return q


def poly(q, num_terms):
    eye = jnp.eye(q.shape[-1], dtype=q.dtype)
    s = sum(jnp.linalg.matrix_power(q, i) for i in range(num_terms + 1))
    return jnp.matmul(eye + q, s, precision="highest")


def side_matrix(theta, perm, dim, k, num_terms, out_side):
    nb = theta.shape[0]
    tail = dim - (nb - 1) * k
    g = poly(skew_scatter(theta, k, tail), num_terms)
    bd = block_diag(*[g[i] for i in range(nb)])
    padded = nb * k
    p = perm[:dim]
    if out_side:
        sel = jax.nn.one_hot(p, padded, dtype=theta.dtype)  # Σ_σᵀ: sel[j, σ[j]] = 1, z·Σ_σ = z[σ]
    else:  # Π_π: sel[π[j], j] = 1, x·Π_π = pad(x[π])
        sel = jnp.pad(jax.nn.one_hot(p, dim, dtype=theta.dtype).T, ((0, 0), (0, padded - dim)))
    return jnp.matmul(jnp.matmul(sel, bd, precision="highest"), sel.T, precision="highest")


@functools.partial(jax.jit, static_argnums=(5, 6))
def dense_effective(theta_in, theta_out, w0_true, perm_in, perm_out, k, num_terms=3):
    n, m = w0_true.shape
    r = side_matrix(theta_in, perm_in, n, k, num_terms, False)
    p = side_matrix(theta_out, perm_out, m, k, num_terms, True)
    return jnp.matmul(jnp.matmul(r, w0_true, precision="highest"), p, precision="highest")


def grads_against_dense(lay, dense_kernel, x, g, what=""):
    """Asserts that the gradients of Σ(layer(x)·g) with respect to (θ_in, θ_out, x) equal those of
    Σ((x @ dense_kernel(generators))·g), the dense reference differentiated instead; returns the layer's."""
    from flax import nnx

    from poetjax import Generator
    from poetjax.testing import assert_close

    graphdef, gens, rest = nnx.split(lay, Generator, ...)

    def factored(gens, x):
        return jnp.sum(nnx.merge(graphdef, gens, rest)(x) * g)

    def dense(gens, x):
        return jnp.sum((x @ dense_kernel(gens)) * g)

    got, want = (jax.jit(jax.grad(f, argnums=(0, 1)))(gens, x) for f in (factored, dense))
    got = (got[0]["theta_in"][...], got[0]["theta_out"][...], got[1])
    want = (want[0]["theta_in"][...], want[0]["theta_out"][...], want[1])
    for name, a, b in zip(("theta_in", "theta_out", "x"), got, want):
        assert_close(a, b, jnp.float32, "grad", what=f"{what} d{name}")
    return got


def randomize_generators(model, scale, seed=100):
    """Non-trivial rotations: every POET layer's generators drawn from N(0, scale²), layer i from seed + i."""
    import poetjax as pj

    for i, (_, lay) in enumerate(pj.poet_layers(model)):
        k1, k2 = jax.random.split(jax.random.key(seed + i))
        lay.theta_in[...] = scale * jax.random.normal(k1, lay.theta_in.shape)
        lay.theta_out[...] = scale * jax.random.normal(k2, lay.theta_out.shape)
    return model
