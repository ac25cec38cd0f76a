"""TopK SAE (Gao et al. 2024), latent-sharded.

pre = (x - b_pre) @ W_enc + b_enc;  z = ReLU(TopK_k(pre));  x_hat = z @ W_dec + b_pre.
Loss: nmse(x, x_hat) [+ multi_topk_coef * nmse at multi_topk_factor*k]
      [+ auxk_coef * AuxK loss over dead latents].
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from saejax.models.base import (
    LossOutput,
    ParamSpec,
    SAEFamily,
    normalized_mse,
    remove_parallel_component,
    unit_rows,
)
from saejax.ops import compact
from saejax.ops import latent_parallel as lp
from saejax.ops.geometric_median import geometric_median
from saejax.ops.sparse import make_encode_select
from saejax.sharding import DATA_AXIS, MODEL_AXIS, spec


def default_k_aux(d: int) -> int:
    """A power of two near d/2 (Gao et al. use 512 for d=768)."""
    return 2 ** max(0, round(math.log2(max(d, 2) / 2)))


class TopK(SAEFamily):
    name = "topk"

    def __init__(self, config):
        super().__init__(config)
        sae = config.sae
        self.k = int(sae.k)
        self.k_multi = min(self.n, int(sae.multi_topk_factor) * self.k) if sae.multi_topk else self.k
        self.multi_coef = float(sae.multi_topk_coef) if sae.multi_topk else 0.0
        self.auxk_coef = float(sae.auxk_coef)
        k_aux = sae.k_aux if sae.k_aux is not None else default_k_aux(self.d)
        self.k_aux = min(int(k_aux), self.n) if self.auxk_coef > 0 else 0
        self.fire_threshold = float(sae.fire_threshold)
        self.compute_dtype = str(config.train.compute_dtype)
        self.topk_impl = str(config.train.topk_impl)

    # ------------------------------------------------------------------ params

    def param_specs(self):
        d, n = self.d, self.n
        return {
            "W_enc": ParamSpec((d, n), ("embed", "latent"), "encoder, one column per latent"),
            "b_enc": ParamSpec((n,), ("latent",), "encoder bias"),
            "W_dec": ParamSpec((n, d), ("latent", "embed"), "decoder, one unit-norm row per latent"),
            "b_pre": ParamSpec((d,), ("embed",), "subtracted from x before encoding, added to the output"),
        }

    def init_params(self, rng, sample):
        w_dec = unit_rows(jax.random.normal(rng, (self.n, self.d), jnp.float32))
        return {
            "W_enc": w_dec.T,  # tied init, untied training
            "b_enc": jnp.zeros((self.n,), jnp.float32),
            "W_dec": w_dec,
            "b_pre": geometric_median(sample),
        }

    def project_gradients(self, grads, params):
        return {**grads, "W_dec": remove_parallel_component(grads["W_dec"], params["W_dec"])}

    def apply_constraints(self, params):
        return {**params, "W_dec": unit_rows(params["W_dec"])}

    # ------------------------------------------------------------------ forward

    def _per_shard(self, x, w_enc, b_enc, w_dec, b_pre, dead, dead_count):
        """Runs on one device: local candidates -> global top-k -> owned decode."""
        n_local = w_enc.shape[1]
        k_aux_local = min(self.k_aux, n_local)
        encode_select = make_encode_select(
            min(self.k_multi, n_local), k_aux_local, self.compute_dtype, self.topk_impl
        )
        values, indices, aux_values, aux_indices = encode_select(
            lp.vary(x), lp.vary(b_pre), lp.vary(w_enc), lp.vary(b_enc), dead, dead_count
        )
        offset = lp.latent_offset(n_local)
        w_dec = lp.vary(w_dec)

        top_values, top_indices = lp.global_top_k(values, indices + offset, self.k_multi, self.topk_impl)
        codes = jax.nn.relu(top_values)
        codes_k, indices_k = codes[:, : self.k], top_indices[:, : self.k]
        recon = lp.decode_owned(codes_k, indices_k, w_dec) + b_pre
        recon_multi = lp.decode_owned(codes, top_indices, w_dec) + b_pre if self.multi_coef else recon

        if self.k_aux:
            def survivors():
                aux_top, aux_top_idx = lp.global_top_k(aux_values, aux_indices + offset, self.k_aux, self.topk_impl)
                return jax.nn.relu(aux_top), aux_top_idx

            def no_dead():
                return lp.vary(jnp.zeros_like(x), (DATA_AXIS,))

            def block_decode(capacity):
                return lambda: lp.decode_owned_block(*survivors(), w_dec, compact.member_ids(dead, capacity))

            # The same branch as encode_select took: nothing dead / few dead (dense block) / many.
            caps = compact.capacities(k_aux_local, n_local)
            branches = [no_dead] + [block_decode(c) for c in caps] + [lambda: lp.decode_owned(*survivors(), w_dec)]
            aux_recon = jax.lax.switch(compact.branch_index(dead_count, caps), branches)
        else:
            aux_recon = jnp.zeros_like(recon)

        _, owned = lp.own_slots(indices_k, n_local)
        active = jnp.sum((owned & (codes_k > 0)).astype(jnp.float32))
        active = jax.lax.psum(active, (DATA_AXIS, MODEL_AXIS))
        fired = lp.fired_latents(codes_k, indices_k, n_local, self.fire_threshold)
        return recon, recon_multi, aux_recon, active, fired

    def forward(self, params, x, dead, mesh: Mesh):
        """Reconstructions (k, multi-k, AuxK residual fit), active-latent count, fired mask."""
        batch, latent, replicated = spec(("batch", None)), spec(("latent",)), P()
        sharded = jax.shard_map(
            self._per_shard,
            mesh=mesh,
            in_specs=(batch, spec(("embed", "latent")), latent, spec(("latent", "embed")), replicated, latent, replicated),
            out_specs=(batch, batch, batch, replicated, latent),
        )
        # Dead latents on the device that has the most: decides AuxK's path (the same on all devices).
        dead_count = jnp.max(jnp.sum(dead.reshape(mesh.shape[MODEL_AXIS], -1), axis=1, dtype=jnp.int32))
        return sharded(x, params["W_enc"], params["b_enc"], params["W_dec"], params["b_pre"], dead, dead_count)

    def loss(self, params, batch, dead, mesh):
        recon, recon_multi, aux_recon, active, fired = self.forward(params, batch, dead, mesh)
        nmse = normalized_mse(batch, recon)
        loss = nmse
        metrics = {"nmse": nmse, "l0": active / batch.shape[0]}
        if self.multi_coef:
            metrics["nmse_multi"] = normalized_mse(batch, recon_multi)
            loss = loss + self.multi_coef * metrics["nmse_multi"]
        if self.k_aux:
            residual = jax.lax.stop_gradient(batch - recon)
            # Zero, never NaN, when nothing is dead (aux_recon is then all zeros).
            auxk = jnp.where(jnp.any(dead), normalized_mse(residual, aux_recon), 0.0)
            metrics["auxk_loss"] = auxk
            loss = loss + self.auxk_coef * auxk
        else:
            metrics["auxk_loss"] = jnp.zeros((), jnp.float32)
        return loss, LossOutput(metrics=metrics, fired=fired)

    # ------------------------------------------------------------------ accounting / export

    def flops_per_step(self, batch_size: int) -> float:
        d, n = self.d, self.n
        per_token = (
            2 * d * n  # encoder matmul
            + 2 * self.k * d  # decode
            + (2 * self.k_multi * d if self.multi_coef else 0)
            + 2 * self.k_multi * d * 2  # encoder backward: scatter into W_enc, b_pre
            + 2 * self.k * d * 2  # decoder backward: code and W_dec gradients
        )
        optimizer = 2 * n * d * 12  # gradient projection, Adam and renormalisation (elementwise)
        return float(batch_size * per_token + optimizer)

    def export(self, params):
        tensors = {name: params[name] for name in ("W_enc", "b_enc", "W_dec", "b_pre")}
        cfg: dict[str, Any] = {
            "family": self.name,
            "d": self.d,
            "n": self.n,
            "k": self.k,
            "activation": "topk_relu",
            "encode": "z = relu(topk_k((x - b_pre) @ W_enc + b_enc))",
            "decode": "x_hat = z @ W_dec + b_pre",
            "layout": {
                "W_enc": ["d", "n"],
                "b_enc": ["n"],
                "W_dec": ["n", "d"],
                "b_pre": ["d"],
            },
        }
        if self.multi_coef:
            cfg["multi_topk_k"] = self.k_multi
        return tensors, cfg
