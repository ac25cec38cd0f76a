"""Data sources (`data.source`) and the pipeline feeding the trainer."""

from saejax.data.npy import NpySource
from saejax.data.source import DataSource, check_finite
from saejax.errors import DataError
from saejax.data.synthetic import SyntheticSource
from saejax.data.store import StoreSource

SOURCES: dict[str, type[DataSource]] = {
    "synthetic": SyntheticSource,
    "npy": NpySource,
    "store": StoreSource,
}


def make_source(config) -> DataSource:
    """The configured source, refused if it holds too few rows for one batch or for evaluation."""
    source = SOURCES[config.data.source].from_config(config)
    check_sizes(source, int(config.data.batch_size), int(config.train.eval_batches),
                float(config.data.eval_fraction))
    return source


def check_sizes(source: DataSource, batch_size: int, eval_batches: int, eval_fraction: float) -> None:
    """Before anything is compiled: one batch of training rows, and held-out rows if evaluation is on."""
    rows = source.split_rows()
    if rows is None:
        return
    total = rows["train"] + rows["eval"]
    if rows["train"] < batch_size:
        raise DataError(
            f"{source.describe()} has {rows['train']} training row(s) (of {total}), fewer than one batch of "
            f"data.batch_size={batch_size}: lower --config.data.batch_size to at most {rows['train']}, "
            "or use more data")
    if eval_batches > 0 and rows["eval"] == 0:
        raise DataError(
            f"{source.describe()}: data.eval_fraction={eval_fraction} of its {total} rows holds out none for "
            f"the {eval_batches} evaluation batch(es) (train.eval_batches): raise --config.data.eval_fraction "
            "so that it holds out at least one row, or set --config.train.eval_batches=0")


__all__ = ["DataSource", "NpySource", "SOURCES", "StoreSource", "SyntheticSource", "check_finite", "make_source"]
