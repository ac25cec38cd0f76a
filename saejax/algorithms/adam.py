"""Backpropagation + Adam on the family's loss (the Gao et al. recipe)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from saejax.algorithms.base import PARAMS, STEP, TrainAlgorithm
from saejax.sharding import named, replicated


def lr_schedule(peak: float, warmup: int) -> optax.Schedule:
    """Linear warm-up over `warmup` steps to `peak`, then constant."""
    if warmup == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(peak / warmup, peak, warmup), optax.constant_schedule(peak)], [warmup]
    )


class Adam(TrainAlgorithm):
    name = "adam"

    def __init__(self, family, config, mesh):
        super().__init__(family, config, mesh)
        self.schedule = lr_schedule(self.learning_rate(), int(config.optim.warmup_steps))
        self.optimizer = optax.chain(
            optax.scale_by_adam(b1=config.optim.b1, b2=config.optim.b2, eps=config.optim.eps),
            optax.scale_by_learning_rate(self.schedule),
        )
        self.ema_decay = float(config.optim.ema_decay)

    def init_state(self, rng, sample):
        params = self.family.init_params(rng, sample)
        state = {
            STEP: jnp.zeros((), jnp.int32),
            PARAMS: params,
            "opt_state": self.optimizer.init(params),
            **self.init_shared(params, sample),
        }
        if self.ema_decay:
            state["ema_params"] = params
        return state

    def state_shardings(self, abstract_state):
        params = {name: named(self.mesh, p.axes) for name, p in self.family.param_specs().items()}
        shardings = {
            STEP: replicated(self.mesh),
            PARAMS: params,
            "opt_state": optax.tree_map_params(
                self.optimizer,
                lambda _, sharding: sharding,
                abstract_state["opt_state"],
                params,
                transform_non_params=lambda _: replicated(self.mesh),
            ),
            **self.shared_shardings(abstract_state),
        }
        if "ema_params" in abstract_state:
            shardings["ema_params"] = params
        return shardings

    def train_step(self, state, batch):
        params = state[PARAMS]
        (loss, out), grads = jax.value_and_grad(self.family.loss, has_aux=True)(
            params, self.family_state(state), batch, self.loss_context(state)
        )
        grads = self.family.project_gradients(grads, params)
        updates, opt_state = self.optimizer.update(grads, state["opt_state"], params)
        new_params = self.family.apply_constraints(optax.apply_updates(params, updates))

        shared, firing = self.update_shared(state, out, batch.shape[0])
        new_state = {
            STEP: state[STEP] + 1,
            PARAMS: new_params,
            "opt_state": opt_state,
            **shared,
        }
        if self.ema_decay:
            new_state["ema_params"] = jax.tree.map(
                lambda e, p: self.ema_decay * e + (1 - self.ema_decay) * p, state["ema_params"], new_params
            )
        metrics = {
            **out.metrics,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            **firing,
            "lr": jnp.asarray(self.schedule(state[STEP]), jnp.float32),
        }
        return new_state, metrics

    def export_params(self, state):
        return state["ema_params"] if self.ema_decay else state[PARAMS]
