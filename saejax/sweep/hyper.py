"""Grids of config values in the style of big_vision's `get_hyper(hyper)`.

A study's `get_hyper(hyper)` returns a list of points, each a dict from a
dotted config key to a value:

    def get_hyper(hyper):
        return hyper.product([
            hyper.sweep("sae.n", [2**10, 2**12, 2**14]),
            hyper.sweep("sae.k", [16, 32]),
        ])

Keys may carry big_vision's "config." prefix. Written here rather than taken
from a library: the `hyper` module big_vision uses ships only inside Google's
internal launchers, and these five functions are all a grid needs.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence

Point = dict[str, Any]


def _key(name: str) -> str:
    return name[len("config."):] if name.startswith("config.") else name


def sweep(name: str, values: Iterable[Any]) -> list[Point]:
    """One point per value of one key."""
    return [{_key(name): value} for value in values]


def fixed(name: str, value: Any) -> list[Point]:
    """A key set to one value in every point."""
    return [{_key(name): value}]


def _merge(points: Sequence[Point]) -> Point:
    merged: Point = {}
    for point in points:
        clash = set(merged) & set(point)
        if clash:
            raise ValueError(f"hyper: key(s) {sorted(clash)} set twice in one point")
        merged.update(point)
    return merged


def product(factors: Sequence[Sequence[Point]]) -> list[Point]:
    """Every combination of one point from each factor (the last varies fastest)."""
    return [_merge(combo) for combo in itertools.product(*factors)]


def zipit(factors: Sequence[Sequence[Point]]) -> list[Point]:
    """The i-th points of every factor together; the factors must have one length."""
    lengths = {len(f) for f in factors}
    if len(lengths) > 1:
        raise ValueError(f"hyper.zipit: factors have different lengths {sorted(lengths)}")
    return [_merge(combo) for combo in zip(*factors, strict=True)]


def chainit(factors: Sequence[Sequence[Point]]) -> list[Point]:
    """The points of each factor, one after another."""
    return [dict(point) for factor in factors for point in factor]
