"""Pallas GPU kernels for POET-X (depend on jax only)."""
