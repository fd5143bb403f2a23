"""Pallas GPU kernels for POET-X (depend on jax only, never on poetjax).

    cayley_neumann(theta, block_size, num_terms=3)   packed generators → orthogonal blocks (fused skew + series)
    permuted_block_matmul(x, perm, r)                 x[..., perm] · blockdiag(r)   (gather fused into loads)
    block_matmul_permuted(h, perm, r, inv_perm=...)   (h · blockdiag(r))[..., perm] (gather fused into stores)
    transpose_scatter(x, idx) / gather_transpose(z, idx, C)   permute the features while switching between the
                                                      token-major (T, C) and feature-major (R, T) layouts

Each has a jnp ``*_reference``, a ``jax.custom_vjp`` with Pallas backward kernels and an ``interpret``
flag (Pallas's interpreter: runs anywhere, for tests). Configurations: ``pallas_kernels.tuning``.
"""

from pallas_kernels._common import (BlockMatmulConfig, CayleyConfig, LoopConfig, ReduceConfig, RotateConfig,
                                    check_block_size, chunk_tile, default_interpret, supports_block_size,
                                    supports_chunk)
from pallas_kernels.block_matmul import (block_matmul_permuted, block_matmul_permuted_reference,
                                         check_chunked_index, inverse_index, permuted_block_matmul,
                                         permuted_block_matmul_reference)
from pallas_kernels.cayley import cayley_neumann, cayley_neumann_reference
from pallas_kernels.qmatmul import QMatmulConfig, dequantize_reference, qmatmul, qmatmul_reference
from pallas_kernels.transpose_perm import (TransposeConfig, gather_transpose, gather_transpose_reference,
                                           transpose_scatter, transpose_scatter_reference)
from pallas_kernels import tuning

__all__ = [
    "cayley_neumann", "cayley_neumann_reference", "permuted_block_matmul", "permuted_block_matmul_reference",
    "block_matmul_permuted", "block_matmul_permuted_reference", "inverse_index", "check_chunked_index",
    "chunk_tile", "BlockMatmulConfig", "CayleyConfig", "LoopConfig", "ReduceConfig", "RotateConfig", "check_block_size",
    "default_interpret", "supports_block_size", "supports_chunk", "tuning", "qmatmul", "qmatmul_reference",
    "dequantize_reference", "QMatmulConfig",
    "transpose_scatter", "transpose_scatter_reference", "gather_transpose", "gather_transpose_reference",
    "TransposeConfig",
]
