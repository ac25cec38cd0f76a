"""Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse autoencoders").

A gate decides which latents fire, a magnitude path (the same directions, rescaled
per latent) how strongly:

  pi  = (x - b_dec) @ W_enc + b_gate                    (W_enc is the paper's W_gate)
  mag = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag
  z   = 1[pi > 0] * ReLU(mag);   x_hat = z @ W_dec + b_dec

Loss: nmse(x, x_hat)
      + l1_coef(step) * decoder-norm weighted L1 of ReLU(pi)   (scaled as in saejax.models.dense)
      + aux_coef * nmse(x, ReLU(pi) @ sg(W_dec) + sg(b_dec))  (frozen decoder: trains the gate to reconstruct)

The Heaviside 1[pi > 0] passes no gradient: the gate path learns only from the L1
and auxiliary terms, as in the paper. Parameter names follow the paper and SAELens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from saejax.models.base import LossOutput, ParamSpec, normalized_mse, require
from saejax.models.dense import (
    DenseFamily,
    active_per_token,
    check_dense,
    dense_defaults,
    decode_block,
    encoder_product,
    sharded_block,
    weighted_l1,
)


class Gated(DenseFamily):
    name = "gated"
    decoder_bias = "b_dec"

    @classmethod
    def defaults(cls):
        g = ml_collections.ConfigDict()
        # 8: L0 ~23 on the synthetic default (2 gave L0 ~240, most latents dense)
        dense_defaults(g, coef=8.0)
        g.aux_coef = 1.0  # weight of the frozen-decoder reconstruction from ReLU(pi) (the paper: 1)
        return g

    @classmethod
    def check(cls, options, config):
        check_dense(options, "sae.gated")
        require(options.aux_coef >= 0, f"sae.gated.aux_coef={options.aux_coef} must be >= 0")

    def __init__(self, config):
        super().__init__(config)
        self.aux_coef = float(self.options.aux_coef)

    def param_specs(self):
        d, n = self.d, self.n
        latent = ("latent",)
        return {
            "W_enc": ParamSpec((d, n), ("embed", "latent"), "gate directions W_gate, shared by the magnitude path"),
            "b_gate": ParamSpec((n,), latent, "gate bias: the latent fires when pi > 0"),
            "r_mag": ParamSpec((n,), latent, "log-scale of the magnitude path: W_mag = W_enc * exp(r_mag)"),
            "b_mag": ParamSpec((n,), latent, "magnitude bias"),
            "W_dec": ParamSpec((n, d), ("latent", "embed"), "decoder, one row per latent (norm unconstrained)"),
            "b_dec": ParamSpec((d,), ("embed",), "subtracted from x before encoding, added to the output"),
        }

    def init_params(self, rng, sample):
        zeros = jnp.zeros((self.n,), jnp.float32)
        return {**self.tied_init(rng, sample), "b_gate": zeros, "r_mag": zeros, "b_mag": zeros}

    def gate_and_codes(self, params, x, mesh):
        """(pi, z): gate pre-activations and codes, both (B, n) latent-sharded, from one matmul."""
        product = encoder_product(x, params["b_dec"], params["W_enc"], mesh, self.compute_dtype)
        pi = product + params["b_gate"]
        mag = product * jnp.exp(params["r_mag"]) + params["b_mag"]
        return pi, sharded_block(jnp.where(pi > 0, jax.nn.relu(mag), 0.0), mesh)

    def codes(self, params, x, mesh):
        return self.gate_and_codes(params, x, mesh)[1]

    def loss(self, params, state, batch, ctx):
        pi, z = self.gate_and_codes(params, batch, ctx.mesh)
        gate = sharded_block(jax.nn.relu(pi), ctx.mesh)
        nmse = normalized_mse(batch, self.reconstruct(params, z))
        l1 = weighted_l1(gate, params["W_dec"], batch)
        frozen_w, frozen_b = jax.lax.stop_gradient(params["W_dec"]), jax.lax.stop_gradient(params["b_dec"])
        aux = normalized_mse(batch, decode_block(gate, frozen_w, frozen_b, self.compute_dtype))
        coef = self.l1_coef_at(ctx.step)
        metrics = {"nmse": nmse, "l0": active_per_token(z), "l1_loss": l1, "l1_coef": coef, "aux_loss": aux}
        loss = nmse + coef * l1 + self.aux_coef * aux
        return loss, LossOutput(metrics=metrics, fire_counts=self.fire_counts(z))

    def flops_per_step(self, batch_size):
        # Matmuls: encoder (once for both paths), decoder and auxiliary decoder; backward: code and
        # W_dec gradients of the main decode, gate gradient of the auxiliary one, W_enc gradient.
        return self.dense_flops(batch_size, matmuls=7, elementwise=24)

    def activation(self):
        return {"kind": "gated",
                "encode": "pi = (x - b_dec) @ W_enc + b_gate; mag = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag; "
                          "z = (pi > 0) * relu(mag)",
                "decode": "x_hat = z @ W_dec + b_dec"}
