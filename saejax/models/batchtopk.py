"""BatchTopK SAE (Bussmann et al. 2024), latent-sharded.

Training: pre = (x - b_pre) @ W_enc + b_enc; keep the B·k largest entries of the
whole global (B, n) batch of pre-activations (across data and latent shards),
zero the rest, ReLU; x_hat = z @ W_dec + b_pre. Loss: nmse [+ auxk_coef * AuxK].
Unit-norm decoder rows and AuxK on dead latents as in TopK.

Selection without gathering (B, n): each device takes the top-C latents of each
of its tokens among its own latents (C = capacity_factor * k, at most its
latents), and the threshold tau (the B·k-th largest value) is found from those
candidates by bisection (saejax.ops.batch_topk). A row whose C candidates are
all >= tau may hold more kept latents: up to overflow_fraction of a device's
rows are then re-read in full (a small matmul) and tau found again; beyond that
tau is found over the full local block and the step decodes densely. The
metric `selection_path` says which (0, 1, 2); all three are exact. Ties at tau
are all kept.

Inference: a JumpReLU z = pre * 1[pre > theta] (ReLU'd), with theta the family
state `threshold`: an EMA of the smallest positive kept activation of each step
(as in dictionary_learning), from `threshold_start_step` on; a global scalar by
default, one per latent with `threshold_per_latent`. Until it is estimated it is
+inf (nothing fires).

Nested (Matryoshka) dictionaries reuse all of this through `groups()`: the
decoder's partial reconstructions are taken per group of latents and summed
into one reconstruction per prefix (BatchTopK: one group, one prefix).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from saejax.models.base import (
    DenseCodes,
    LossOutput,
    ParamSpec,
    SAEFamily,
    SparseCodes,
    normalized_mse,
    require,
)
from saejax.models.topk import TopK, auxk_defaults, check_auxk, resolve_k_aux
from saejax.ops import batch_topk as bt
from saejax.ops import latent_parallel as lp
from saejax.ops.sparse import make_encode_select
from saejax.ops.vma import vary_like
from saejax.sharding import DATA_AXIS, MODEL_AXIS, named, spec


def batchtopk_defaults() -> ml_collections.ConfigDict:
    """Keys shared by BatchTopK and the families built on its selection (Matryoshka)."""
    g = ml_collections.ConfigDict()
    g.k = 8  # active latents per token, on average over the batch
    auxk_defaults(g)
    g.capacity_factor = 4  # candidates per token and device: capacity_factor * k
    g.overflow_fraction = 1 / 16  # rows per device re-read in full when their candidates do not suffice
    g.threshold_decay = 0.99  # EMA decay of the inference threshold
    g.threshold_start_step = 200  # steps before the threshold estimate starts
    g.threshold_per_latent = False  # one threshold per latent instead of one for all
    return g


def check_batchtopk(options, config, prefix: str) -> None:
    n = config.sae.n
    require(1 <= options.k <= n, f"{prefix}.k={options.k} must be between 1 and sae.n={n}")
    check_auxk(options, prefix)
    require(options.capacity_factor >= 1, f"{prefix}.capacity_factor={options.capacity_factor} must be >= 1")
    require(0 < options.overflow_fraction <= 1,
            f"{prefix}.overflow_fraction={options.overflow_fraction} must be in (0, 1]")
    require(0 <= options.threshold_decay < 1,
            f"{prefix}.threshold_decay={options.threshold_decay} must be in [0, 1)")
    require(options.threshold_start_step >= 0,
            f"{prefix}.threshold_start_step={options.threshold_start_step} must be >= 0")


class BatchTopK(TopK):
    name = "batchtopk"
    sparsity_key = "k"
    has_k = True

    @classmethod
    def defaults(cls):
        return batchtopk_defaults()

    @classmethod
    def check(cls, options, config):
        check_batchtopk(options, config, f"sae.{cls.name}")

    def __init__(self, config):
        SAEFamily.__init__(self, config)  # TopK's multi-k options do not apply
        o = self.options
        self.k = int(o.k)
        self.capacity = min(self.n, int(o.capacity_factor) * self.k)
        self.auxk_coef = float(o.auxk_coef)
        self.k_aux = resolve_k_aux(o, self.d, self.n)
        self.overflow_fraction = float(o.overflow_fraction)
        self.threshold_decay = float(o.threshold_decay)
        self.threshold_start_step = int(o.threshold_start_step)
        self.per_latent = bool(o.threshold_per_latent)

    def groups(self) -> tuple[tuple[int, int], ...]:
        """Latent ranges [lo, hi) decoded separately; prefix i reconstructs from groups 0..i."""
        return ((0, self.n),)

    def prefix_weights(self) -> tuple[float, ...]:
        return (1.0,)

    # ------------------------------------------------------------------ state

    def state_specs(self):
        if self.per_latent:
            return {"threshold": ParamSpec((self.n,), ("latent",), "inference threshold per latent")}
        return {"threshold": ParamSpec((), (), "inference threshold (JumpReLU theta)")}

    def init_state(self, params, sample):
        shape = self.state_specs()["threshold"].shape
        return {"threshold": jnp.full(shape, jnp.inf, jnp.float32)}  # inf: not estimated yet

    def _update_threshold(self, state, smallest_kept, step):
        """EMA of the smallest positive kept activation (per latent or global); inf = none seen."""
        observed = smallest_kept if self.per_latent else jnp.min(smallest_kept)
        old = state["threshold"]
        ema = self.threshold_decay * old + (1 - self.threshold_decay) * observed
        new = jnp.where(jnp.isinf(old), observed, ema)
        update = (step >= self.threshold_start_step) & jnp.isfinite(observed)
        return {"threshold": jnp.where(update, new, old)}

    # ------------------------------------------------------------------ forward

    def _decode_groups_sparse(self, codes, global_indices, w_dec):
        """Per group: sum of its selected latents' code * decoder row, over all model shards."""
        partials = []
        for lo, hi in self.groups():
            if (lo, hi) != (0, self.n):
                codes_in = jnp.where((global_indices >= lo) & (global_indices < hi), codes, 0.0)
            else:
                codes_in = codes
            partials.append(lp.decode_owned(codes_in, global_indices, w_dec))
        return tuple(partials)

    def _decode_groups_dense(self, z, offset, w_dec, place=None):
        """`_decode_groups_sparse` for dense local codes; `place` maps each device's (rows, d) product
        to its (B, d) batch rows before the sum over model shards (the rows may differ per device)."""
        columns = offset + jnp.arange(z.shape[1], dtype=jnp.int32)
        partials = []
        for lo, hi in self.groups():
            z_in = z if (lo, hi) == (0, self.n) else jnp.where((columns >= lo) & (columns < hi), z, 0.0)
            product = z_in @ w_dec
            partials.append(jax.lax.psum(product if place is None else place(product), MODEL_AXIS))
        return tuple(partials)

    def _pre(self, xv, b_pre, w_enc, b_enc):
        """Dense local pre-activations, as encode_select computes them (for the rows it cannot cover)."""
        dtype = jnp.dtype(self.compute_dtype)
        return jnp.dot((xv - b_pre).astype(dtype), w_enc.astype(dtype),
                       preferred_element_type=jnp.float32) + b_enc

    def _overflow_rows(self, local_batch: int) -> int:
        return min(local_batch, max(1, math.ceil(self.overflow_fraction * local_batch)))

    def _select(self, x, w_enc, b_enc, b_pre, dead, dead_count, target, emit):
        """Inside shard_map: the exact batch selection, handed to `emit` in the form it took.

        `emit` maps "sparse" (codes (B, C), local indices), "rows" (codes (R, n_local) of the
        listed rows), "block" (codes (B, n_local)) to one pytree, and "merge" combines two.
        Path 0: tau from the candidates is exact. Path 1: a few rows had all C candidates >= tau;
        they are re-read in full (one (R, d) x (d, n_local) matmul) and tau found again. Path 2:
        more such rows than R on some device: tau over the whole local block.
        Returns (emitted, tau, path, AuxK candidates).
        """
        n_local, local_batch = w_enc.shape[1], x.shape[0]
        capacity = min(self.capacity, n_local)
        encode_select = make_encode_select(capacity, min(self.k_aux, n_local), self.compute_dtype,
                                           self.topk_impl)
        inputs = lp.vary(x), lp.vary(b_pre), lp.vary(w_enc), lp.vary(b_enc)
        values, indices, aux_values, aux_indices = encode_select(*inputs, dead, dead_count)
        frozen = jax.lax.stop_gradient(values)
        tau = bt.kth_largest(frozen, target)

        def from_candidates():
            return emit["sparse"](jnp.where(values >= tau, self.gate(values), 0.0), indices), tau

        if capacity == n_local:  # every local latent is a candidate: exact by construction
            emitted, tau = from_candidates()
            return emitted, tau, jnp.zeros((), jnp.int32), (aux_values, aux_indices)

        overflow = frozen[:, -1] >= tau  # rows that may hold kept latents beyond their candidates
        num_rows = self._overflow_rows(local_batch)
        worst = jax.lax.pmax(jnp.sum(overflow, dtype=jnp.int32), bt.ALL_AXES)

        def from_rows():
            rows = jnp.nonzero(overflow, size=num_rows, fill_value=local_batch)[0]
            valid = (rows < local_batch)[:, None]
            pre_rows = self._pre(jnp.take(inputs[0], rows, axis=0, mode="fill", fill_value=0.0), *inputs[1:])
            others = jnp.where(overflow[:, None], -jnp.inf, frozen)
            tau_rows = bt.kth_largest((others, jnp.where(valid, jax.lax.stop_gradient(pre_rows), -jnp.inf)),
                                      target)
            codes = jnp.where((values >= tau_rows) & ~overflow[:, None], self.gate(values), 0.0)
            z_rows = jnp.where(valid & (pre_rows >= tau_rows), self.gate(pre_rows), 0.0)
            return emit["merge"](emit["sparse"](codes, indices), emit["rows"](z_rows, rows)), tau_rows

        def from_block():
            pre = self._pre(*inputs)
            tau_block = bt.kth_largest(jax.lax.stop_gradient(pre), target)
            return emit["block"](jnp.where(pre >= tau_block, self.gate(pre), 0.0)), tau_block

        path = jnp.where(worst == 0, 0, jnp.where(worst <= num_rows, 1, 2)).astype(jnp.int32)
        emitted, tau = jax.lax.switch(path, [from_candidates, from_rows, from_block])
        return emitted, tau, path, (aux_values, aux_indices)

    def _training_emitters(self, local_batch, n_local, offset, w_dec):
        """Per-group partial reconstructions and per-device statistics from each form of the codes."""
        threshold = self.fire_threshold

        def stats(z, partials, local_indices=None):
            z = jax.lax.stop_gradient(z)  # statistics only
            positive = z > 0
            masked = jnp.where(positive, z, jnp.inf)
            if local_indices is None:  # dense columns
                counts = jnp.sum(z > threshold, axis=0, dtype=jnp.int32)
                smallest = jnp.min(masked, axis=0)
            else:
                flat = local_indices.reshape(-1)
                hits = (z > threshold).reshape(-1).astype(jnp.int32)
                counts = jnp.zeros((n_local,), jnp.int32).at[flat].add(hits)
                smallest = jnp.full((n_local,), jnp.inf, jnp.float32).at[flat].min(masked.reshape(-1))
            active = jnp.sum(positive, dtype=jnp.float32)
            return {"partials": partials, "counts": counts, "active": active, "smallest": smallest}

        def sparse(codes, indices):
            return stats(codes, self._decode_groups_sparse(codes, indices + offset, w_dec), indices)

        def rows(z_rows, row_ids):
            def to_batch(product):
                batch = vary_like(jnp.zeros((local_batch, product.shape[1]), product.dtype), product)
                return batch.at[row_ids].add(product, mode="drop")
            return stats(z_rows, self._decode_groups_dense(z_rows, offset, w_dec, to_batch))

        def block(z):
            return stats(z, self._decode_groups_dense(z, offset, w_dec))

        def merge(a, b):
            summed = jax.tree.map(jnp.add, {k: a[k] for k in ("partials", "counts", "active")},
                                  {k: b[k] for k in ("partials", "counts", "active")})
            return {**summed, "smallest": jnp.minimum(a["smallest"], b["smallest"])}

        return {"sparse": sparse, "rows": rows, "block": block, "merge": merge}

    def _per_shard(self, x, w_enc, b_enc, w_dec, b_pre, dead, dead_count, *, target):
        """Runs on one device: selection, per-group decode, AuxK, firing counts, threshold statistic."""
        n_local = w_enc.shape[1]
        offset = lp.latent_offset(n_local)
        w_dec = lp.vary(w_dec)
        emit = self._training_emitters(x.shape[0], n_local, offset, w_dec)
        out, tau, path, (aux_values, aux_indices) = self._select(
            x, w_enc, b_enc, b_pre, dead, dead_count, target, emit)
        aux_recon = self._auxk_recon(x, aux_values, aux_indices, offset, w_dec, dead, dead_count, n_local)
        counts = jax.lax.psum(out["counts"], DATA_AXIS)
        active = jax.lax.psum(out["active"], bt.ALL_AXES)
        smallest = jax.lax.pmin(out["smallest"], DATA_AXIS)
        return out["partials"], aux_recon, active, counts, smallest, tau, path.astype(jnp.float32)

    def forward(self, params, x, dead, mesh):
        """Per-group partial reconstructions (no b_pre), AuxK fit, and the selection's statistics."""
        batch, latent, replicated = spec(("batch", None)), spec(("latent",)), P()
        partial_specs = tuple(batch for _ in self.groups())
        sharded = jax.shard_map(
            functools.partial(self._per_shard, target=self.k * x.shape[0]),
            mesh=mesh,
            in_specs=(batch, spec(("embed", "latent")), latent, spec(("latent", "embed")), replicated, latent,
                      replicated),
            out_specs=(partial_specs, batch, replicated, latent, latent, replicated, replicated),
        )
        dead_count = jnp.max(jnp.sum(dead.reshape(mesh.shape[MODEL_AXIS], -1), axis=1, dtype=jnp.int32))
        return sharded(x, params["W_enc"], params["b_enc"], params["W_dec"], params["b_pre"], dead,
                       dead_count)

    def loss(self, params, state, batch, ctx):
        partials, aux_recon, active, counts, smallest, tau, path = self.forward(
            params, batch, ctx.dead, ctx.mesh)
        recons, running = [], params["b_pre"]
        for partial in partials:
            running = running + partial
            recons.append(running)
        prefix_nmse = [normalized_mse(batch, r) for r in recons]
        loss = sum(w * e for w, e in zip(self.prefix_weights(), prefix_nmse, strict=True))
        auxk = self._auxk_loss(batch, recons[-1], aux_recon, ctx.dead)
        loss = loss + self.auxk_coef * auxk
        new_state = self._update_threshold(state, smallest, ctx.step)
        theta = new_state["threshold"]
        estimated = jnp.isfinite(theta)
        metrics = {
            "nmse": prefix_nmse[-1],
            "l0": active / batch.shape[0],
            "auxk_loss": auxk,
            "batch_threshold": tau,  # the B·k-th largest pre-activation of this batch
            "threshold": jnp.sum(jnp.where(estimated, theta, 0.0)) / jnp.maximum(jnp.sum(estimated), 1),
            "selection_path": path,  # 0 candidates, 1 overflow rows re-read, 2 full block
            **self.prefix_metrics(prefix_nmse),
        }
        return loss, LossOutput(metrics=metrics, fire_counts=counts, state=new_state)

    def prefix_metrics(self, prefix_nmse) -> dict[str, jax.Array]:
        return {}

    def training_codes(self, params, x, mesh) -> tuple[DenseCodes, jax.Array]:
        """The training selection as dense (B, n) latent-sharded codes, and the path it took (0, 1, 2)."""
        batch, latent = spec(("batch", None)), spec(("latent",))
        target = self.k * x.shape[0]

        def per_shard(x, w_enc, b_enc, b_pre):
            n_local, local_batch = w_enc.shape[1], x.shape[0]

            def sparse(codes, indices):
                block = vary_like(jnp.zeros((local_batch, n_local), jnp.float32), codes)
                return block.at[jnp.arange(local_batch)[:, None], indices].set(codes)

            def rows(z_rows, row_ids):
                block = vary_like(jnp.zeros((local_batch, n_local), jnp.float32), z_rows)
                return block.at[row_ids].set(z_rows, mode="drop")

            emit = {"sparse": sparse, "rows": rows, "block": lambda z: z, "merge": jnp.add}
            z, _, path, _ = self._select(x, w_enc, b_enc, b_pre, jnp.zeros((n_local,), bool),
                                         jnp.zeros((), jnp.int32), target, emit)
            return z, path

        z, path = jax.shard_map(
            per_shard, mesh=mesh, in_specs=(batch, spec(("embed", "latent")), latent, P()),
            out_specs=(spec(("batch", "latent")), P()),
        )(x, params["W_enc"], params["b_enc"], params["b_pre"])
        return DenseCodes(z), path

    # ------------------------------------------------------------------ accounting

    def flops_per_step(self, batch_size: int) -> float:
        """Analytic FLOPs of path 0; the candidates' C slots are decoded whether kept or not. Path 1
        adds about overflow_fraction of the encoder and a dense decode of those rows; path 2 (a
        second encoder matmul and a dense decode) is not counted."""
        d, n = self.d, self.n
        slots = self.capacity
        per_token = (
            2 * d * n  # encoder matmul
            + 2 * slots * d * len(self.groups())  # decode of the candidates, per group
            + 2 * slots * d * 2  # encoder backward: scatter into W_enc, b_pre
            + 2 * slots * d * 2 * len(self.groups())  # decoder backward: code and W_dec gradients
            + 32 * slots  # bisection: 32 comparisons per candidate
        )
        optimizer = 2 * n * d * 12  # gradient projection, Adam and renormalisation (elementwise)
        return float(batch_size * per_token + optimizer)

    def describe(self) -> str:
        return f"{super().describe()} (batch top-k)"

    # ------------------------------------------------------------------ inference

    def inference_params(self, params, state):
        return {**params, "threshold": state["threshold"]}

    def inference_specs(self):
        return {**self.param_specs(), **self.state_specs()}

    def encode(self, params, x, mesh):
        """JumpReLU with the estimated threshold: dense (B, n) codes, split over the latent axis."""
        pre = (x - params["b_pre"]) @ params["W_enc"] + params["b_enc"]
        pre = jax.lax.with_sharding_constraint(pre, named(mesh, ("batch", "latent")))
        return DenseCodes(jnp.where(pre > params["threshold"], self.gate(pre), 0.0))

    def decode(self, params, codes, mesh):
        if isinstance(codes, SparseCodes):
            return super().decode(params, codes, mesh)
        return codes.values @ params["W_dec"] + params["b_pre"]

    def activation(self):
        return {"kind": "jumprelu", "trained_as": self.name, "k": self.k,
                "threshold": "per_latent" if self.per_latent else "global",
                "encode": "z = relu(pre) * (pre > threshold), pre = (x - b_pre) @ W_enc + b_enc",
                "decode": "x_hat = z @ W_dec + b_pre"}

