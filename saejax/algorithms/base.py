"""What a training algorithm provides to the trainer.

The trainer only needs: the state's shardings, a pure `init_state(rng,
sample)`, a pure `train_step(state, batch) -> (state, metrics)`, the step
number and the parameters to export. Adam on the family's loss is one
algorithm (`adam.py`); PAM-SGD (closed-form decoder, SGD encoder) is another
file implementing the same methods.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
from jax.sharding import Mesh

from saejax.models.base import Params, SAEFamily

State = dict[str, Any]

# Every algorithm's state holds these two entries; the trainer reads them.
STEP = "step"
PARAMS = "params"


class TrainAlgorithm(abc.ABC):
    name: str

    def __init__(self, family: SAEFamily, config, mesh: Mesh):
        self.family = family
        self.config = config
        self.mesh = mesh

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

    def abstract_state(self, sample_rows: int) -> State:
        """ShapeDtypeStructs with shardings: no allocation (used by the plan and restore)."""
        rng = jax.ShapeDtypeStruct((2,), jax.numpy.uint32)
        sample = jax.ShapeDtypeStruct((sample_rows, self.family.d), jax.numpy.float32)
        shapes = jax.eval_shape(self.init_state, rng, sample)
        shardings = self.state_shardings(shapes)
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
        )
