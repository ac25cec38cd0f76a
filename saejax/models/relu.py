"""ReLU SAE with a decoder-norm weighted L1 penalty (Anthropic's April 2024 recipe).

pre = (x - b_pre) @ W_enc + b_enc;  z = ReLU(pre);  x_hat = z @ W_dec + b_pre.
Loss: nmse + l1_coef(step) * sum_b sum_i z_bi ||w_dec,i|| / sum_b ||x_b - mean(x)||^2
(see saejax.models.dense for the scale of l1_coef). The decoder is not kept at
unit norm: its norm is in the penalty. Init: decoder rows random directions of
norm init_decoder_norm, W_enc = W_dec^T, b_enc = 0, b_pre the geometric median.

The decode is a dense (B, n) x (n, d) matmul, so a step costs about five
encoder-sized matmuls (TopK's costs one plus sparse gathers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from saejax.models.base import ParamSpec
from saejax.models.dense import DenseFamily, check_dense, dense_defaults, encoder_product, sharded_block


class ReLU(DenseFamily):
    name = "relu"

    @classmethod
    def defaults(cls):
        g = ml_collections.ConfigDict()
        # 3: L0 ~34 on the synthetic default (2: L0 ~44; 5: L0 ~26 but nmse ~0.74)
        dense_defaults(g, coef=3.0)
        return g

    @classmethod
    def check(cls, options, config):
        check_dense(options, "sae.relu")

    def param_specs(self):
        d, n = self.d, self.n
        return {
            "W_enc": ParamSpec((d, n), ("embed", "latent"), "encoder, one column per latent"),
            "b_enc": ParamSpec((n,), ("latent",), "encoder bias"),
            "W_dec": ParamSpec((n, d), ("latent", "embed"), "decoder, one row per latent (norm unconstrained)"),
            "b_pre": ParamSpec((d,), ("embed",), "subtracted from x before encoding, added to the output"),
        }

    def init_params(self, rng, sample):
        return {**self.tied_init(rng, sample), "b_enc": jnp.zeros((self.n,), jnp.float32)}

    def codes(self, params, x, mesh):
        pre = encoder_product(x, params["b_pre"], params["W_enc"], mesh, self.compute_dtype) + params["b_enc"]
        return sharded_block(self.gate(pre), mesh)

    def flops_per_step(self, batch_size):
        # Matmuls: encoder, decoder; backward: code and W_dec gradients, W_enc gradient.
        return self.dense_flops(batch_size, matmuls=5, elementwise=10)

    def activation(self):
        return {"kind": "relu", "encode": "z = relu((x - b_pre) @ W_enc + b_enc)",
                "decode": "x_hat = z @ W_dec + b_pre"}
