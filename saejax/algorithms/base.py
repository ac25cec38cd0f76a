"""What a training algorithm provides to the trainer.

The trainer only needs: the state's shardings, a pure `init_state(rng,
sample)`, a pure `train_step(state, batch) -> (state, metrics)`, the step
number and the parameters to export. Adam on the family's loss is one
algorithm (`adam.py`); PAM-SGD (closed-form decoder, SGD encoder) is another
file implementing the same methods.

Shared by every algorithm, so no family or algorithm counts on its own:
the family state (`FAMILY_STATE`, sharded by the family's own specs) and
the firing statistics (`FIRING`: dead latents by tokens since they last
fired, dense latents by the fraction of a batch's tokens they fire on).
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from saejax.models.base import LossContext, LossOutput, Params, SAEFamily
from saejax.sharding import named

State = dict[str, Any]

# Every algorithm's state holds these two entries; the trainer reads them.
STEP = "step"
PARAMS = "params"
# Tokens since each latent last fired, saturating at sae.dead_tokens (the key of runs before families).
FIRING = "tokens_since_fired"
# The family's own state (threshold estimates, adaptive coefficients); absent for families without one.
FAMILY_STATE = "family_state"


def firing_metrics(counts: jax.Array, batch_tokens: int, since_fired: jax.Array, dead_tokens: int,
                   dense_threshold: float) -> dict[str, jax.Array]:
    """Dead fraction (no firing in dead_tokens tokens) and dense fraction (fires on > threshold of the batch)."""
    return {
        "dead_fraction": jnp.mean((since_fired >= dead_tokens).astype(jnp.float32)),
        "dense_fraction": jnp.mean((counts > dense_threshold * batch_tokens).astype(jnp.float32)),
    }


class TrainAlgorithm(abc.ABC):
    name: str

    # ------------------------------------------------------------------ config (class level)

    @classmethod
    def defaults(cls):
        """The algorithm's own keys (the group `train.<name>`), or None when it has none."""
        return None

    @classmethod
    def check(cls, options, config) -> None:
        """Raise ConfigError for bad values (`options` = config.train.<name>, None without a group)."""

    def check_metrics(self, step: int, values: dict[str, float]) -> None:
        """Raise a SaeJaxError when a step's fetched metrics show a failure of the algorithm itself."""

    def __init__(self, family: SAEFamily, config, mesh: Mesh):
        self.family = family
        self.config = config
        self.mesh = mesh
        self.dead_tokens = int(config.sae.dead_tokens)
        self.dense_threshold = float(config.sae.dense_threshold)

    # ------------------------------------------------------------------ shared by every algorithm

    def init_shared(self, params: Params, sample: jax.Array) -> State:
        """Firing counters and the family state at step 0 (no family_state entry when it is empty)."""
        state: State = {FIRING: jnp.zeros((self.family.n,), jnp.int32)}
        family_state = self.family.init_state(params, sample)
        if family_state:
            state[FAMILY_STATE] = family_state
        return state

    def shared_shardings(self, abstract_state: State) -> State:
        shardings: State = {FIRING: named(self.mesh, ("latent",))}
        if FAMILY_STATE in abstract_state:
            shardings[FAMILY_STATE] = {name: named(self.mesh, spec.axes)
                                       for name, spec in self.family.state_specs().items()}
        return shardings

    def loss_context(self, state: State) -> LossContext:
        return LossContext(step=state[STEP], dead=state[FIRING] >= self.dead_tokens, mesh=self.mesh)

    def update_shared(self, state: State, out: LossOutput, batch_tokens: int) -> tuple[State, dict[str, jax.Array]]:
        """New firing counters and family state after a step, and their metrics."""
        since_fired = jnp.where(out.fire_counts > 0, 0,
                                jnp.minimum(state[FIRING] + batch_tokens, self.dead_tokens))
        updated: State = {FIRING: since_fired}
        if FAMILY_STATE in state:
            updated[FAMILY_STATE] = out.state
        metrics = firing_metrics(out.fire_counts, batch_tokens, since_fired, self.dead_tokens, self.dense_threshold)
        return updated, metrics

    def family_state(self, state: State) -> dict[str, jax.Array]:
        return state.get(FAMILY_STATE, {})

    def learning_rate(self) -> float:
        """optim.lr, or the family's default when it is unset."""
        lr = self.config.optim.lr
        return float(lr) if lr is not None else self.family.default_learning_rate()

    @abc.abstractmethod
    def init_state(self, rng: jax.Array, sample: jax.Array) -> State:
        """Pure: the state at step 0 (`sample`: (rows, d) data for data-dependent init)."""

    @abc.abstractmethod
    def train_step(self, state: State, batch: jax.Array) -> tuple[State, dict[str, jax.Array]]:
        """Pure: one step on a global (B, d) batch; metrics are scalars."""

    @abc.abstractmethod
    def state_shardings(self, abstract_state: State) -> Any:
        """NamedSharding for every leaf of the state (same tree structure)."""

    def export_params(self, state: State) -> Params:
        """The parameters to publish (e.g. the EMA weights when they are kept)."""
        return state[PARAMS]

    def inference_params(self, state: State) -> Params:
        """What encode/decode and the export use: exported parameters plus the family's inference state."""
        return self.family.inference_params(self.export_params(state), self.family_state(state))

    def abstract_state(self, sample_rows: int) -> State:
        """ShapeDtypeStructs with shardings: no allocation (used by the plan and restore)."""
        rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
        sample = jax.ShapeDtypeStruct((sample_rows, self.family.d), jax.numpy.float32)
        shapes = jax.eval_shape(self.init_state, rng, sample)
        shardings = self.state_shardings(shapes)
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
        )
