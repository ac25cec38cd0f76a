"""Helpers for shard_map's varying-manual-axes (vma) types.

Inside `jax.shard_map`, every value records the mesh axes it varies over.
Values that meet (branches of a cond, inputs of a custom VJP and their
cotangents) must agree; these helpers make them agree. Outside shard_map
they do nothing.
"""

from __future__ import annotations

from typing import Iterable

import jax


def varying_axes(x) -> frozenset:
    return frozenset(jax.typeof(x).manual_axis_type.varying)


def vary(x, axes: Iterable[str]):
    """Mark `x` as varying over `axes` (its gradient is then psum'd over them on the way back)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def vary_like(x, *references):
    """Mark `x` as varying over every axis any of `references` varies over."""
    return vary(x, sorted(frozenset().union(*(varying_axes(r) for r in references))))
