"""Data sources (`data.source`) and the pipeline feeding the trainer."""

from saejax.data.npy import NpySource
from saejax.data.source import DataSource, check_finite
from saejax.data.synthetic import SyntheticSource
from saejax.data.store import StoreSource

SOURCES: dict[str, type[DataSource]] = {
    "synthetic": SyntheticSource,
    "npy": NpySource,
    "store": StoreSource,
}


def make_source(config) -> DataSource:
    return SOURCES[config.data.source].from_config(config)


__all__ = ["DataSource", "NpySource", "SOURCES", "StoreSource", "SyntheticSource", "check_finite", "make_source"]
