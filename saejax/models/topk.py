"""TopK SAE (Gao et al. 2024), latent-sharded.

pre = (x - b_pre) @ W_enc + b_enc;  z = ReLU(TopK_k(pre));  x_hat = z @ W_dec + b_pre.
Options for the SplInterp reference's variant (Budd et al. 2025): `abs_select` keeps the k
largest |pre| with their signs (no ReLU; no AuxK), `pre_bias=false` encodes x itself
(pre = x @ W_enc + b_enc; b_pre is only the decoder's bias). Defaults: Gao et al.'s TopK.
Loss: nmse(x, x_hat) [+ multi_topk_coef * nmse at multi_topk_factor*k]
      [+ auxk_coef * AuxK loss over dead latents].
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, PartitionSpec as P
from ml_collections import config_dict

from saejax.models.base import (
    LossOutput,
    ParamSpec,
    SAEFamily,
    SparseCodes,
    normalized_mse,
    remove_parallel_component,
    require,
    unit_rows,
)
from saejax.ops import compact
from saejax.ops import latent_parallel as lp
from saejax.ops.geometric_median import geometric_median
from saejax.ops.sparse import make_encode_select
from saejax.ops.topk import top_k
from saejax.sharding import DATA_AXIS, MODEL_AXIS, spec


def default_k_aux(d: int) -> int:
    """A power of two near d/2 (Gao et al. use 512 for d=768)."""
    return 2 ** max(0, round(math.log2(max(d, 2) / 2)))


def auxk_defaults(group: ml_collections.ConfigDict) -> None:
    """AuxK's keys (shared by the families that revive dead latents the way Gao et al. do)."""
    group.k_aux = config_dict.placeholder(int)  # AuxK latents; default: power of two near d/2
    group.auxk_coef = 1 / 32  # 0 disables AuxK


def check_auxk(options, prefix: str) -> None:
    require(options.k_aux is None or options.k_aux >= 1, f"{prefix}.k_aux={options.k_aux} must be >= 1 (or unset)")
    require(options.auxk_coef >= 0, f"{prefix}.auxk_coef={options.auxk_coef} must be >= 0 (0 disables AuxK)")


def resolve_k_aux(options, d: int, n: int) -> int:
    """AuxK's k_aux (0 when AuxK is off), capped by n."""
    k_aux = options.k_aux if options.k_aux is not None else default_k_aux(d)
    return min(int(k_aux), n) if options.auxk_coef > 0 else 0


class TopK(SAEFamily):
    name = "topk"
    sparsity_key = "k"
    has_k = True
    decoder_linear_in_codes = True
    abs_select, pre_bias = False, True  # Gao et al.'s; subclasses with other groups keep these

    @classmethod
    def defaults(cls):
        g = ml_collections.ConfigDict()
        g.k = 16  # active latents per token
        auxk_defaults(g)
        g.multi_topk = False  # add multi_topk_coef * nmse at multi_topk_factor * k
        g.multi_topk_factor = 4
        g.multi_topk_coef = 1 / 8
        g.abs_select = False  # select the k largest |pre| and keep their signed values (SplInterp)
        g.pre_bias = True  # subtract b_pre before encoding (false: b_pre is only the output bias)
        return g

    @classmethod
    def unhashed_defaults(cls):
        return {"abs_select": False, "pre_bias": True}  # added later: runs before them keep their ids

    @classmethod
    def check(cls, options, config):
        n = config.sae.n
        require(1 <= options.k <= n, f"sae.topk.k={options.k} must be between 1 and sae.n={n}")
        check_auxk(options, "sae.topk")
        require(options.multi_topk_factor >= 1, f"sae.topk.multi_topk_factor={options.multi_topk_factor} must be >= 1")
        require(not options.abs_select or options.auxk_coef == 0,
                "sae.topk.abs_select=true has no AuxK (dead latents have no sign to select by); "
                "set sae.topk.auxk_coef=0")

    def __init__(self, config):
        super().__init__(config)
        o = self.options
        self.k = int(o.k)
        self.k_multi = min(self.n, int(o.multi_topk_factor) * self.k) if o.multi_topk else self.k
        self.multi_coef = float(o.multi_topk_coef) if o.multi_topk else 0.0
        self.auxk_coef = float(o.auxk_coef)
        self.k_aux = resolve_k_aux(o, self.d, self.n)
        self.abs_select, self.pre_bias = bool(o.abs_select), bool(o.pre_bias)

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

    def _auxk_recon(self, x, aux_values, aux_indices, offset, w_dec, dead, dead_count, n_local):
        """Inside shard_map: AuxK's fit of the residual from the global top-k_aux dead latents of each token.

        `aux_values`/`aux_indices` are this device's candidates from `encode_select`; zeros when AuxK is off.
        """
        if not self.k_aux:
            return lp.vary(jnp.zeros_like(x), (DATA_AXIS,))
        k_aux_local = min(self.k_aux, n_local)

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
        return jax.lax.switch(compact.branch_index(dead_count, caps), branches)

    def _auxk_loss(self, batch, recon, aux_recon, dead):
        """AuxK's nmse of the (stopped) residual; zero, never NaN, when nothing is dead or AuxK is off."""
        if not self.k_aux:
            return jnp.zeros((), jnp.float32)
        residual = jax.lax.stop_gradient(batch - recon)
        return jnp.where(jnp.any(dead), normalized_mse(residual, aux_recon), 0.0)

    def _encoder_center(self, b_pre):
        return b_pre if self.pre_bias else jnp.zeros_like(b_pre)

    def _abs_top_k(self, x, w_enc, b_enc, center, k):
        """Inside shard_map: the global k largest |pre| of each token, signed values and global indices."""
        n_local = w_enc.shape[1]
        dtype = jnp.dtype(self.compute_dtype)
        pre = jnp.dot((x - center).astype(dtype), w_enc.astype(dtype), preferred_element_type=jnp.float32) + b_enc
        _, pos = top_k(jnp.abs(pre), min(k, n_local), self.topk_impl)
        values = jnp.take_along_axis(pre, pos, axis=1)
        all_values = jax.lax.all_gather(values, MODEL_AXIS, axis=1, tiled=True)
        all_indices = jax.lax.all_gather(pos.astype(jnp.int32) + lp.latent_offset(n_local), MODEL_AXIS,
                                         axis=1, tiled=True)
        _, best = top_k(jnp.abs(all_values), k, self.topk_impl)
        return jnp.take_along_axis(all_values, best, axis=1), jnp.take_along_axis(all_indices, best, axis=1)

    def _per_shard(self, x, w_enc, b_enc, w_dec, b_pre, dead, dead_count):
        """Runs on one device: local candidates -> global top-k -> owned decode."""
        n_local = w_enc.shape[1]
        k_aux_local = min(self.k_aux, n_local)
        center = self._encoder_center(b_pre)
        offset = lp.latent_offset(n_local)
        if self.abs_select:  # signed codes of the k largest |pre|; AuxK is refused with it
            codes, top_indices = self._abs_top_k(lp.vary(x), lp.vary(w_enc), lp.vary(b_enc), lp.vary(center),
                                                 self.k_multi)
            aux_values = aux_indices = jnp.zeros(x.shape[:1] + (0,), jnp.float32)
        else:
            encode_select = make_encode_select(
                min(self.k_multi, n_local), k_aux_local, self.compute_dtype, self.topk_impl
            )
            values, indices, aux_values, aux_indices = encode_select(
                lp.vary(x), lp.vary(center), lp.vary(w_enc), lp.vary(b_enc), dead, dead_count
            )
            top_values, top_indices = lp.global_top_k(values, indices + offset, self.k_multi, self.topk_impl)
            codes = self.gate(top_values)
        w_dec = lp.vary(w_dec)
        codes_k, indices_k = codes[:, : self.k], top_indices[:, : self.k]
        recon = lp.decode_owned(codes_k, indices_k, w_dec) + b_pre
        recon_multi = lp.decode_owned(codes, top_indices, w_dec) + b_pre if self.multi_coef else recon

        aux_recon = self._auxk_recon(x, aux_values, aux_indices, offset, w_dec, dead, dead_count, n_local)

        _, owned = lp.own_slots(indices_k, n_local)
        active = jnp.sum((owned & (codes_k != 0)).astype(jnp.float32))
        active = jax.lax.psum(active, (DATA_AXIS, MODEL_AXIS))
        counts = lp.fire_counts(jnp.abs(codes_k), indices_k, n_local, self.fire_threshold)
        return recon, recon_multi, aux_recon, active, counts

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

    def loss(self, params, state, batch, ctx):
        dead = ctx.dead
        recon, recon_multi, aux_recon, active, counts = self.forward(params, batch, dead, ctx.mesh)
        nmse = normalized_mse(batch, recon)
        loss = nmse
        metrics = {"nmse": nmse, "l0": active / batch.shape[0]}
        if self.multi_coef:
            metrics["nmse_multi"] = normalized_mse(batch, recon_multi)
            loss = loss + self.multi_coef * metrics["nmse_multi"]
        metrics["auxk_loss"] = self._auxk_loss(batch, recon, aux_recon, dead)
        loss = loss + self.auxk_coef * metrics["auxk_loss"]
        return loss, LossOutput(metrics=metrics, fire_counts=counts)

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

    # ------------------------------------------------------------------ inference

    def _encode_shard(self, x, w_enc, b_enc, b_pre):
        n_local = w_enc.shape[1]
        b_pre = self._encoder_center(b_pre)
        if self.abs_select:
            values, indices = self._abs_top_k(lp.vary(x), lp.vary(w_enc), lp.vary(b_enc), lp.vary(b_pre), self.k)
            return jax.lax.pmax(values, MODEL_AXIS), jax.lax.pmax(indices, MODEL_AXIS)
        encode_select = make_encode_select(min(self.k, n_local), 0, self.compute_dtype, self.topk_impl)
        no_dead = jnp.zeros((n_local,), bool)
        values, indices, _, _ = encode_select(lp.vary(x), lp.vary(b_pre), lp.vary(w_enc), lp.vary(b_enc),
                                              no_dead, jnp.zeros((), jnp.int32))
        values, indices = lp.global_top_k(values, indices + lp.latent_offset(n_local), self.k, self.topk_impl)
        # Every device of a model group holds the same selection; pmax (a no-op on equal values)
        # makes that visible to shard_map's replication check.
        return jax.lax.pmax(self.gate(values), MODEL_AXIS), jax.lax.pmax(indices, MODEL_AXIS)

    def encode(self, params, x, mesh):
        batch, latent = spec(("batch", None)), spec(("latent",))
        values, indices = jax.shard_map(
            self._encode_shard, mesh=mesh,
            in_specs=(batch, spec(("embed", "latent")), latent, P()), out_specs=(batch, batch),
        )(x, params["W_enc"], params["b_enc"], params["b_pre"])
        return SparseCodes(values, indices)

    def decode(self, params, codes, mesh):
        batch = spec(("batch", None))
        decode = jax.shard_map(
            lambda v, i, w: lp.decode_owned(v, i, w), mesh=mesh,
            in_specs=(batch, batch, spec(("latent", "embed"))), out_specs=batch,
        )
        return decode(codes.values, codes.indices, params["W_dec"]) + params["b_pre"]

    def activation(self):
        if self.abs_select or not self.pre_bias:
            center = "(x - b_pre)" if self.pre_bias else "x"
            select = "signed values of the k largest |pre|" if self.abs_select else "relu(topk_k(pre))"
            return {"kind": "topk", "k": self.k, "postact": "none" if self.abs_select else "relu",
                    "select": "abs" if self.abs_select else "value", "pre_bias": self.pre_bias,
                    "encode": f"pre = {center} @ W_enc + b_enc; z = {select}", "decode": "x_hat = z @ W_dec + b_pre"}
        return {"kind": "topk", "k": self.k, "postact": "relu",
                "encode": "z = relu(topk_k((x - b_pre) @ W_enc + b_enc))",
                "decode": "x_hat = z @ W_dec + b_pre"}
