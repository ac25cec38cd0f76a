"""SAE families by config name (`sae.family`). A new family: one file + one line here."""

from saejax.models.base import LossOutput, ParamSpec, SAEFamily
from saejax.models.batchtopk import BatchTopK
from saejax.models.binary import Binary
from saejax.models.gated import Gated
from saejax.models.jumprelu import JumpReLU
from saejax.models.matryoshka import Matryoshka
from saejax.models.prolu import ProLU
from saejax.models.rational import Rational
from saejax.models.relu import ReLU
from saejax.models.topk import TopK

FAMILIES: dict[str, type[SAEFamily]] = {
    TopK.name: TopK,
    BatchTopK.name: BatchTopK,
    Matryoshka.name: Matryoshka,
    ReLU.name: ReLU,
    JumpReLU.name: JumpReLU,
    ProLU.name: ProLU,
    Gated.name: Gated,
    Binary.name: Binary,
    Rational.name: Rational,
}


def get_family(config) -> SAEFamily:
    return FAMILIES[config.sae.family](config)


__all__ = ["FAMILIES", "LossOutput", "ParamSpec", "SAEFamily", "get_family"]
