"""saejax: sparse autoencoders on language-model activations, in JAX, at any scale."""

__version__ = "0.1.0"
