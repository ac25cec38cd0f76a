"""PAM-SGD (Budd et al. 2025, "SplInterp"): closed-form decoder, SGD encoder, per block of data.

Proximal alternating minimisation over blocks of `block_tokens` streamed tokens:

1. Decoder, encoder fixed: with the codes Z of the block (N tokens) solve
       min_{W, b}  (1/N) ||X - Z W - 1 b^T||^2 + rho ||W||^2 + mu_dec ||W - W_prev||^2.
2. Encoder, decoder fixed: `encoder_steps` Adam steps on the family's own loss (so AuxK, L1,
   the JumpReLU threshold still apply) plus mu_enc ||W - W_anchor||^2 on the encoder's
   matrices and nu_enc ||b - b_anchor||^2 on its vectors, the anchors being the encoder at
   the end of the block's solve.

The state machine. The trainer calls `train_step(state, batch)` once per batch and the batch of
step s is a function of s, so a cycle is L = block_steps + encoder_steps consecutive steps and
every step is pure; the phase is `step mod L`:
  * phase < block_steps: encode the batch with the fixed encoder, keep its codes (values and
    global indices, B x m each: small) in the block buffer and accumulate Z^T X, Z^T 1 and
    diag(Z^T Z) latent-sharded, and sum X;
  * phase == block_steps - 1: the same, then the decoder solve (below), new anchors, and the
    accumulators are zeroed;
  * otherwise: one encoder step on the step's batch.
The codes buffer and accumulators are part of the state, so a checkpoint taken inside a block
resumes bit-exactly without re-reading past batches (recomputing them would break the
trainer's one-batch-per-step contract); a kill during the solve resumes from the last
checkpoint and repeats it.

The decoder solve. Eliminating b exactly (joint minimiser, not the reference's alternation
`W` first and then `b = mean(X - Z W)`, which minimises the objective only for centred codes):
b = xbar - W^T zbar, and W solves the centred ridge system
    (Zc^T Zc / N + (rho + mu_dec) I) W = Zc^T Xc / N + mu_dec W_prev,
    Zc^T Zc v = Z^T Z v - N zbar (zbar^T v),  Zc^T Xc = Z^T X - N zbar xbar^T.
It is solved by Jacobi-preconditioned conjugate gradients (diag = diag(Zc^T Zc)/N + rho + mu),
one independent CG per column, all d columns at once, warm-started at W_prev. Z^T Z v is
matrix-free: for each buffered batch a sparse decode Z v (gather the k owned rows, psum over
the model axis) then a scatter-add Z^T (Z v) into the owned rows, psum over the data axis.
No n x n matrix and no tokens x n code matrix exists at any point. A latent that had no
non-zero code in the block keeps its previous decoder row (the data says nothing about it).
The closed-form decoder is not renormalised (the reference does not either).

Families whose codes are dense (ReLU, JumpReLU, ...) are compacted to their `max_codes`
largest |z| per token for the buffer; `codes_dropped` reports the L1 mass left out.
A CG that does not reach `cg_tol` in `cg_max_iters` iterations stops the run with the residual.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import PartitionSpec as P

from saejax.algorithms.adam import lr_schedule
from saejax.algorithms.base import PARAMS, STEP, TrainAlgorithm
from saejax.errors import TrainingDivergedError
from saejax.models.base import LossOutput, SparseCodes, require
from saejax.ops import latent_parallel as lp
from saejax.ops.sparse import scatter_rows
from saejax.ops.topk import top_k
from saejax.sharding import DATA_AXIS, MODEL_AXIS, named, replicated, spec

PREFIX = "train.pam_sgd"
ACCUMULATE, SOLVE, ENCODER = 0, 1, 2


class PamSGD(TrainAlgorithm):
    name = "pam_sgd"

    @classmethod
    def defaults(cls):
        g = ml_collections.ConfigDict()
        g.block_tokens = 65536  # tokens per decoder solve (a multiple of data.batch_size)
        g.encoder_steps = 16  # Adam steps on the encoder after each solve (each on a new batch)
        # Ridge on W_dec, per token of the block (the reference: lambda^2 = 1e-10 in total). 1e-6 left
        # CG unconverged in 200 iterations on blocks with few tokens per latent; 1e-4 is the study's.
        g.rho = 1e-4
        g.mu_dec = 0.0  # proximal pull of the decoder toward the previous one
        g.mu_enc = 1e-3  # proximal pull of the encoder's matrices toward the anchors
        g.nu_enc = 1e-3  # ... and of its vectors (biases, thresholds)
        g.clip_norm = 1.0  # global gradient-norm clip of the encoder steps (0 disables)
        g.cg_tol = 1e-4  # relative residual ||r_j|| / ||rhs_j||, worst column
        g.cg_max_iters = 500
        g.max_codes = 64  # codes kept per token for families with dense codes
        return g

    @classmethod
    def check(cls, options, config):
        from saejax.models import FAMILIES

        family = FAMILIES[config.sae.family]
        linear = sorted(name for name, f in FAMILIES.items() if f.decoder_linear_in_codes)
        require(family.decoder_linear_in_codes,
                f"train.algorithm='pam_sgd' solves the decoder in closed form, which needs a family whose "
                f"decoder is linear in its codes (x_hat = z @ W_dec + bias); sae.family={config.sae.family!r} "
                f"is not. Use one of: {', '.join(linear)}, or train.algorithm=adam")
        batch = config.data.batch_size
        require(options.block_tokens >= batch,
                f"{PREFIX}.block_tokens={options.block_tokens} is smaller than one batch "
                f"(data.batch_size={batch}); set it to a multiple of data.batch_size")
        require(options.block_tokens % batch == 0,
                f"{PREFIX}.block_tokens={options.block_tokens} is not a multiple of data.batch_size={batch}")
        require(options.rho > 0, f"{PREFIX}.rho={options.rho} must be > 0 (the ridge keeps the "
                "decoder's normal equations positive definite)")
        for key in ("mu_dec", "mu_enc", "nu_enc", "clip_norm"):
            require(options[key] >= 0, f"{PREFIX}.{key}={options[key]} must be >= 0")
        require(options.encoder_steps >= 1, f"{PREFIX}.encoder_steps={options.encoder_steps} must be >= 1")
        require(options.cg_tol > 0, f"{PREFIX}.cg_tol={options.cg_tol} must be > 0")
        require(options.cg_max_iters >= 1, f"{PREFIX}.cg_max_iters={options.cg_max_iters} must be >= 1")
        require(options.max_codes >= 1, f"{PREFIX}.max_codes={options.max_codes} must be >= 1")

    def __init__(self, family, config, mesh):
        super().__init__(family, config, mesh)
        o = config.train.pam_sgd
        self.options = o
        self.batch_size = int(config.data.batch_size)
        self.block_steps = int(o.block_tokens) // self.batch_size
        self.cycle = self.block_steps + int(o.encoder_steps)
        self.rho, self.mu_dec = float(o.rho), float(o.mu_dec)
        self.mu_enc, self.nu_enc = float(o.mu_enc), float(o.nu_enc)
        self.cg_tol, self.cg_max_iters = float(o.cg_tol), int(o.cg_max_iters)
        self.decoder_names = ("W_dec", family.decoder_bias)
        self.encoder_names = tuple(name for name in family.param_specs() if name not in self.decoder_names)
        self.schedule = lr_schedule(self.learning_rate(), int(config.optim.warmup_steps))
        clip = [optax.clip_by_global_norm(float(o.clip_norm))] if o.clip_norm else []
        self.optimizer = optax.chain(
            *clip,
            optax.scale_by_adam(b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps),
            optax.scale_by_learning_rate(self.schedule),
        )
        self.width = self._code_width()

    # ------------------------------------------------------------------ codes

    def _code_width(self) -> int:
        x = jax.ShapeDtypeStruct((self.batch_size, self.family.d), jnp.float32)
        params = {name: jax.ShapeDtypeStruct(s.shape, s.dtype) for name, s in self.family.inference_specs().items()}
        codes = jax.eval_shape(lambda p, b: self.family.encode(p, b, self.mesh), params, x)
        if isinstance(codes, SparseCodes):
            return int(codes.values.shape[1])
        return min(int(self.options.max_codes), self.family.n)

    def sparse_codes(self, params, x):
        """(values, global indices, dropped L1 fraction, L0) of the family's inference codes."""
        codes = self.family.encode(params, x, self.mesh)
        if isinstance(codes, SparseCodes):
            l0 = jnp.mean(jnp.sum(codes.values != 0, axis=1, dtype=jnp.float32))
            return codes.values, codes.indices, jnp.zeros((), jnp.float32), l0
        block = codes.values
        l0 = jnp.mean(jnp.sum(block != 0, axis=1, dtype=jnp.float32))
        values, indices = self._compact(block)
        total = jnp.sum(jnp.abs(block))
        dropped = 1.0 - jnp.sum(jnp.abs(values)) / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)
        return values, indices, dropped, l0

    def _compact(self, block):
        """The `width` largest |z| of each row of a latent-sharded (B, n) block, signed, no gather of B x n."""
        m = self.width

        def per_shard(z):
            n_local = z.shape[1]
            _, pos = top_k(jnp.abs(z), min(m, n_local))
            values = jnp.take_along_axis(z, pos, axis=1)
            indices = pos.astype(jnp.int32) + lp.latent_offset(n_local)
            all_values = jax.lax.all_gather(values, MODEL_AXIS, axis=1, tiled=True)
            all_indices = jax.lax.all_gather(indices, MODEL_AXIS, axis=1, tiled=True)
            _, best = top_k(jnp.abs(all_values), m)
            values = jnp.take_along_axis(all_values, best, axis=1)
            indices = jnp.take_along_axis(all_indices, best, axis=1)
            # The same selection on every device of a model group; pmax (a no-op here) tells shard_map.
            return jax.lax.pmax(values, MODEL_AXIS), jax.lax.pmax(indices, MODEL_AXIS)

        batch = spec(("batch", None))
        return jax.shard_map(per_shard, mesh=self.mesh, in_specs=spec(("batch", "latent")),
                             out_specs=(batch, batch))(block)

    def decode(self, params, values, indices):
        """z @ W_dec + bias from sparse codes: what `decoder_linear_in_codes` promises the family does."""
        batch = spec(("batch", None))
        recon = jax.shard_map(lp.decode_owned, mesh=self.mesh, in_specs=(batch, batch, spec(("latent", "embed"))),
                              out_specs=batch)(values, indices, params["W_dec"])
        return recon + params[self.family.decoder_bias]

    # ------------------------------------------------------------------ sufficient statistics

    def _accumulate(self, acc, values, indices, x):
        """acc + this batch's Z^T X, Z^T 1, diag(Z^T Z) (latent-sharded) and sum of X."""
        def per_shard(ztx, zsum, zsq, v, i, xb):
            n_local = ztx.shape[0]
            local, owned = lp.own_slots(i, n_local)
            c = jnp.where(owned, v, 0.0)
            flat_local, flat_c = local.reshape(-1), c.reshape(-1)
            d_ztx = scatter_rows(n_local, local, c, xb)
            d_zsum = jax.ops.segment_sum(flat_c, flat_local, n_local)
            d_zsq = jax.ops.segment_sum(flat_c * flat_c, flat_local, n_local)
            return (ztx + jax.lax.psum(d_ztx, DATA_AXIS), zsum + jax.lax.psum(d_zsum, DATA_AXIS),
                    zsq + jax.lax.psum(d_zsq, DATA_AXIS))

        latent, batch = spec(("latent",)), spec(("batch", None))
        ztx, zsum, zsq = jax.shard_map(
            per_shard, mesh=self.mesh,
            in_specs=(spec(("latent", "embed")), latent, latent, batch, batch, batch),
            out_specs=(spec(("latent", "embed")), latent, latent),
        )(acc["ztx"], acc["zsum"], acc["zsq"], values, indices, x)
        return {"ztx": ztx, "zsum": zsum, "zsq": zsq, "xsum": acc["xsum"] + jnp.sum(x, axis=0)}

    def gram(self, v, values, indices):
        """Z^T Z v for the buffered codes (S_b, B, m) and a latent-sharded (n, d) v, matrix-free."""
        def per_shard(v_local, vals, idx):
            n_local = v_local.shape[0]

            def one_batch(acc, slab):
                c, i = slab
                local, owned = lp.own_slots(i, n_local)
                c = jnp.where(owned, c, 0.0)
                zv = lp.decode_owned(c, i, v_local)  # (B, d): sum of the owned rows, psum over model
                return acc + scatter_rows(n_local, local, c, zv), None

            acc0 = lp.vary(jnp.zeros_like(v_local))
            out, _ = jax.lax.scan(one_batch, acc0, (vals, idx))
            return jax.lax.psum(out, DATA_AXIS)

        codes = P(None, DATA_AXIS)
        return jax.shard_map(per_shard, mesh=self.mesh, in_specs=(spec(("latent", "embed")), codes, codes),
                             out_specs=spec(("latent", "embed")))(v, values, indices)

    def solve_decoder(self, acc, values, indices, w_prev):
        """(W_dec, b, iterations, worst relative residual) of the block's ridge problem (module doc)."""
        tokens = float(values.shape[0] * values.shape[1])
        shift = self.rho + self.mu_dec
        zbar, xbar = acc["zsum"] / tokens, acc["xsum"] / tokens

        def apply(v):
            centred = self.gram(v, values, indices) - tokens * zbar[:, None] * (zbar @ v)[None, :]
            return centred / tokens + shift * v

        rhs = (acc["ztx"] - tokens * zbar[:, None] * xbar[None, :]) / tokens + self.mu_dec * w_prev
        diag = (acc["zsq"] - tokens * zbar * zbar) / tokens + shift
        rhs_norm = jnp.maximum(jnp.linalg.norm(rhs, axis=0), jnp.finfo(jnp.float32).tiny)

        def residual(r):
            return jnp.max(jnp.linalg.norm(r, axis=0) / rhs_norm)

        w0 = w_prev
        r0 = rhs - apply(w0)
        z0 = r0 / diag[:, None]
        init = (jnp.zeros((), jnp.int32), w0, r0, z0, jnp.sum(r0 * z0, axis=0), residual(r0))

        def keep_going(carry):
            it, *_, res = carry
            return (it < self.cg_max_iters) & (res > self.cg_tol)

        def iterate(carry):
            it, w, r, p, rz, _ = carry
            ap = apply(p)
            pap = jnp.sum(p * ap, axis=0)
            alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
            w = w + alpha * p
            r = r - alpha * ap
            z = r / diag[:, None]
            rz_new = jnp.sum(r * z, axis=0)
            beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
            return it + 1, w, r, z + beta * p, rz_new, residual(r)

        iterations, w, _, _, _, res = jax.lax.while_loop(keep_going, iterate, init)
        w = jnp.where((acc["zsq"] > 0)[:, None], w, w_prev)  # rows the block never used: unchanged
        w = jax.lax.with_sharding_constraint(w, named(self.mesh, ("latent", "embed")))
        b = xbar - zbar @ w
        return w, b, iterations, res

    # ------------------------------------------------------------------ state

    def _encoder(self, params):
        return {name: params[name] for name in self.encoder_names}

    def _zero_acc(self):
        n, d = self.family.n, self.family.d
        return {"ztx": jnp.zeros((n, d), jnp.float32), "zsum": jnp.zeros((n,), jnp.float32),
                "zsq": jnp.zeros((n,), jnp.float32), "xsum": jnp.zeros((d,), jnp.float32)}

    def init_state(self, rng, sample):
        params = self.family.init_params(rng, sample)
        encoder = self._encoder(params)
        shape = (self.block_steps, self.batch_size, self.width)
        return {
            STEP: jnp.zeros((), jnp.int32),
            PARAMS: params,
            "opt_state": self.optimizer.init(encoder),
            "anchors": encoder,
            "acc": self._zero_acc(),
            "codes": {"values": jnp.zeros(shape, jnp.float32), "indices": jnp.zeros(shape, jnp.int32)},
            "cg": {"iterations": jnp.zeros((), jnp.int32), "residual": jnp.zeros((), jnp.float32),
                   "converged": jnp.ones((), jnp.int32)},
            **self.init_shared(params, sample),
        }

    def state_shardings(self, abstract_state):
        params = {name: named(self.mesh, p.axes) for name, p in self.family.param_specs().items()}
        encoder = self._encoder(params)
        codes = jax.sharding.NamedSharding(self.mesh, P(None, DATA_AXIS))
        rep = replicated(self.mesh)
        return {
            STEP: rep,
            PARAMS: params,
            "opt_state": optax.tree_map_params(self.optimizer, lambda _, s: s, abstract_state["opt_state"],
                                               encoder, transform_non_params=lambda _: rep),
            "anchors": encoder,
            "acc": {"ztx": named(self.mesh, ("latent", "embed")), "zsum": named(self.mesh, ("latent",)),
                    "zsq": named(self.mesh, ("latent",)), "xsum": rep},
            "codes": {"values": codes, "indices": codes},
            "cg": {"iterations": rep, "residual": rep, "converged": rep},
            **self.shared_shardings(abstract_state),
        }

    # ------------------------------------------------------------------ the step

    def _proximal(self, encoder, anchors):
        total = jnp.zeros((), jnp.float32)
        for name, value in encoder.items():
            coef = self.mu_enc if value.ndim >= 2 else self.nu_enc
            if coef:
                total = total + coef * jnp.sum(jnp.square(value - anchors[name]))
        return total

    def _encoder_step(self, state, batch):
        params, anchors = state[PARAMS], state["anchors"]
        fixed = {name: params[name] for name in self.decoder_names}

        def objective(encoder):
            loss, out = self.family.loss({**encoder, **fixed}, self.family_state(state), batch,
                                         self.loss_context(state))
            prox = self._proximal(encoder, anchors)
            return loss + prox, (out, prox)

        (loss, (out, prox)), grads = jax.value_and_grad(objective, has_aux=True)(self._encoder(params))
        full = self.family.project_gradients({**grads, **jax.tree.map(jnp.zeros_like, fixed)}, params)
        grads = self._encoder(full)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], self._encoder(params))
        stepped = self.family.apply_constraints({**params, **optax.apply_updates(self._encoder(params), updates)})
        new_params = {**self._encoder(stepped), **fixed}  # the closed-form decoder is not renormalised
        shared, firing = self.update_shared(state, out, batch.shape[0])
        new_state = {**state, PARAMS: new_params, "opt_state": opt_state, **shared}
        metrics = {**out.metrics, "loss": loss, "proximal": prox, "grad_norm": optax.tree.norm(grads),
                   "codes_dropped": jnp.zeros((), jnp.float32), **firing}
        return new_state, metrics

    def _block_step(self, state, batch, solve: bool):
        params = state[PARAMS]
        inference = self.inference_params(state)
        values, indices, dropped, l0 = self.sparse_codes(inference, batch)
        slot = state[STEP] % self.cycle
        codes = {"values": jax.lax.dynamic_update_index_in_dim(state["codes"]["values"], values, slot, 0),
                 "indices": jax.lax.dynamic_update_index_in_dim(state["codes"]["indices"], indices, slot, 0)}
        acc = self._accumulate(state["acc"], values, indices, batch)
        recon = self.decode(inference, values, indices)
        nmse = jnp.sum(jnp.square(batch - recon)) / jnp.maximum(
            jnp.sum(jnp.square(batch - jnp.mean(batch, axis=0))), jnp.finfo(jnp.float32).tiny)
        counts = jax.shard_map(
            lambda v, i: lp.fire_counts(jnp.abs(v), i, self.family.n // self.mesh.shape[MODEL_AXIS],
                                        self.family.fire_threshold),
            mesh=self.mesh, in_specs=(spec(("batch", None)),) * 2, out_specs=spec(("latent",)),
        )(values, indices)
        out = LossOutput(metrics={}, fire_counts=counts, state=self.family_state(state))
        shared, firing = self.update_shared(state, out, batch.shape[0])
        new_state = {**state, "codes": codes, "acc": acc, **shared}
        if solve:
            w, b, iterations, res = self.solve_decoder(acc, codes["values"], codes["indices"], params["W_dec"])
            new_state[PARAMS] = {**params, "W_dec": w, self.family.decoder_bias: b}
            new_state["anchors"] = self._encoder(params)
            new_state["acc"] = jax.tree.map(jnp.zeros_like, acc)
            new_state["cg"] = {"iterations": iterations, "residual": res,
                               "converged": (res <= self.cg_tol).astype(jnp.int32)}
        metrics = {"nmse": nmse, "l0": l0, "loss": nmse, "proximal": jnp.zeros((), jnp.float32),
                   "grad_norm": jnp.zeros((), jnp.float32), "codes_dropped": dropped, **firing}
        return new_state, metrics

    def train_step(self, state, batch):
        encoder_shapes = jax.eval_shape(self._encoder_step, state, batch)[1]

        def with_all_metrics(fn):
            def run(s, b):
                new_state, metrics = fn(s, b)
                filled = {k: metrics.get(k, jnp.zeros(v.shape, v.dtype)) for k, v in encoder_shapes.items()}
                return new_state, filled
            return run

        phase = state[STEP] % self.cycle
        index = jnp.where(phase < self.block_steps - 1, ACCUMULATE,
                          jnp.where(phase == self.block_steps - 1, SOLVE, ENCODER))
        branches = [with_all_metrics(lambda s, b: self._block_step(s, b, solve=False)),
                    with_all_metrics(lambda s, b: self._block_step(s, b, solve=True)),
                    self._encoder_step]
        new_state, metrics = jax.lax.switch(index, branches, state, batch)
        new_state = {**new_state, STEP: state[STEP] + 1}
        cg = new_state["cg"]
        encoder_steps_done = (state[STEP] // self.cycle) * (self.cycle - self.block_steps) + jnp.maximum(
            phase - self.block_steps, 0)  # the learning-rate schedule counts encoder steps only
        metrics = {**metrics, "phase": index.astype(jnp.float32),
                   "cg_iterations": cg["iterations"].astype(jnp.float32), "cg_residual": cg["residual"],
                   "cg_converged": cg["converged"].astype(jnp.float32),
                   "lr": jnp.asarray(self.schedule(encoder_steps_done), jnp.float32)}
        return new_state, metrics

    def check_metrics(self, step, values):
        if values.get("cg_converged", 1.0) < 0.5:
            raise TrainingDivergedError(
                f"pam_sgd: the decoder's conjugate-gradient solve before step {step} did not converge: "
                f"relative residual {values['cg_residual']:.3g} > {PREFIX}.cg_tol={self.cg_tol:g} after "
                f"{PREFIX}.cg_max_iters={self.cg_max_iters} iterations. Raise cg_max_iters, loosen cg_tol, "
                f"or raise {PREFIX}.rho (a larger ridge is better conditioned); the last checkpoint is intact.")
