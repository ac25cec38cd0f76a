"""Training algorithms by config name (`train.algorithm`). A new one: one file + one line here."""

from saejax.algorithms.adam import Adam
from saejax.algorithms.pam_sgd import PamSGD
from saejax.algorithms.base import FAMILY_STATE, FIRING, PARAMS, STEP, State, TrainAlgorithm

ALGORITHMS: dict[str, type[TrainAlgorithm]] = {
    Adam.name: Adam,
    PamSGD.name: PamSGD,
}


def get_algorithm(family, config, mesh) -> TrainAlgorithm:
    return ALGORITHMS[config.train.algorithm](family, config, mesh)


__all__ = ["ALGORITHMS", "FAMILY_STATE", "FIRING", "PARAMS", "STEP", "State", "TrainAlgorithm", "get_algorithm"]
