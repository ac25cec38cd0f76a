"""ProLU SAE (Taggart 2024, "ProLU: a nonlinearity for sparse autoencoders").

m = (x - b_pre) @ W_enc (no bias inside);  z = m * 1[m > 0 and m + b_enc > 0];
x_hat = z @ W_dec + b_pre. The bias only decides whether a latent fires, it does
not shift the code (scale consistency). Its true gradient is zero almost
everywhere, so it is trained through a straight-through estimator (`sae.prolu.ste`),
with gate G = 1[m > 0 and m + b_enc > 0] and upstream gradient g:

  "ste"  (ProLU-STE; z read as m * H(m + b) with H' := 1 on the gate):
         dz/db = G * m,   dz/dm = G * (1 + m)
  "relu" (ProLU-ReLU, default; z read as ReLU(m + b) for the bias): dz/db = G,  dz/dm = G

The default is "relu": on the synthetic default (Adam, lr 1e-3) ProLU-STE's extra
G * m terms made training unstable (l1_coef 3.5: nmse 0.66, recovery 0.54;
l1_coef 2: L0 130), while ProLU-ReLU trains like a ReLU SAE.

Sparsity: the decoder-norm weighted L1 of saejax.models.dense, as for ReLU, so the
decoder is unconstrained and no rescaling of W_enc against W_dec lowers the
penalty; one penalty for all three dense families keeps their l1_coef comparable.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections

from saejax.models.base import ParamSpec, require
from saejax.models.dense import DenseFamily, check_dense, dense_defaults, encoder_product, sharded_block

STE_KINDS = ("ste", "relu")


@functools.lru_cache(maxsize=None)
def make_prolu(ste: str):
    """prolu(m (B, n), b (n,)) -> m * G with the backward pass named by `ste` (see the module doc)."""

    def gate(m, b):
        return (m > 0) & (m + b > 0)

    @jax.custom_vjp
    def prolu(m, b):
        return jnp.where(gate(m, b), m, 0.0)

    def forward(m, b):
        return prolu(m, b), (m, gate(m, b))

    def backward(res, g):
        m, on = res
        gated = jnp.where(on, g, 0.0)
        if ste == "ste":
            d_b = gated * m
            return gated + d_b, jnp.sum(d_b, axis=0)
        return gated, jnp.sum(gated, axis=0)

    prolu.defvjp(forward, backward)
    return prolu


class ProLU(DenseFamily):
    name = "prolu"

    @classmethod
    def defaults(cls):
        g = ml_collections.ConfigDict()
        # 3: L0 ~43 on the synthetic default with ste="relu" (2: L0 ~55)
        dense_defaults(g, coef=3.0)
        g.ste = "relu"  # the bias's straight-through estimator: "relu" or "ste" (see saejax.models.prolu)
        return g

    @classmethod
    def check(cls, options, config):
        check_dense(options, "sae.prolu")
        require(options.ste in STE_KINDS, f"sae.prolu.ste={options.ste!r} must be one of {', '.join(STE_KINDS)}")

    def __init__(self, config):
        super().__init__(config)
        self.activation_fn = make_prolu(str(self.options.ste))

    def param_specs(self):
        d, n = self.d, self.n
        return {
            "W_enc": ParamSpec((d, n), ("embed", "latent"), "encoder, one column per latent"),
            "b_enc": ParamSpec((n,), ("latent",), "ProLU bias: the latent fires when m + b_enc > 0 (not added)"),
            "W_dec": ParamSpec((n, d), ("latent", "embed"), "decoder, one row per latent (norm unconstrained)"),
            "b_pre": ParamSpec((d,), ("embed",), "subtracted from x before encoding, added to the output"),
        }

    def init_params(self, rng, sample):
        return {**self.tied_init(rng, sample), "b_enc": jnp.zeros((self.n,), jnp.float32)}

    def codes(self, params, x, mesh):
        m = encoder_product(x, params["b_pre"], params["W_enc"], mesh, self.compute_dtype)
        return sharded_block(self.activation_fn(m, params["b_enc"]), mesh)

    def flops_per_step(self, batch_size):
        # As ReLU: encoder, decoder, code and W_dec gradients, W_enc gradient.
        return self.dense_flops(batch_size, matmuls=5, elementwise=14)

    def activation(self):
        return {"kind": "prolu", "encode": "m = (x - b_pre) @ W_enc; z = m * (m > 0) * (m + b_enc > 0)",
                "decode": "x_hat = z @ W_dec + b_pre"}
