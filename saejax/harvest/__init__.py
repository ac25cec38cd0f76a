"""Harvest: run a Hugging Face model over text and store its activations at a hookpoint.

text (`text`) -> contexts (`contexts`) -> model (`model`) -> hookpoint
(`hookpoints`) -> activation store (`saejax.store`); `run.harvest` drives it.
"""

from saejax.harvest.run import harvest

__all__ = ["harvest"]
