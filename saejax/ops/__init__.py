"""Kernels: exact top-k, sparse encode/decode with custom VJPs, latent-parallel top-k."""
