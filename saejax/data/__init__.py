"""Data sources (`data.source`) and the pipeline feeding the trainer."""

from saejax.data.npy import NpySource
from saejax.data.source import DataSource, check_finite
from saejax.data.synthetic import SyntheticSource

SOURCES: dict[str, type[DataSource]] = {
    "synthetic": SyntheticSource,
    "npy": NpySource,
}


def make_source(config) -> DataSource:
    return SOURCES[config.data.source].from_config(config)


__all__ = ["DataSource", "NpySource", "SOURCES", "SyntheticSource", "check_finite", "make_source"]
