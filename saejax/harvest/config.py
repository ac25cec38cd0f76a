"""Every `saejax harvest` config key, its default, and the checks run before any work.

Harvest config files live in `saejax/configs/harvest/` (or anywhere, by
path) and start from `harvest_config()`, like training configs start from
`saejax.config.base_config()`.
"""

from __future__ import annotations

import os

import ml_collections

from saejax.config import _check_schema, _require, apply_variant
from saejax.store.layout import STORE_DTYPES

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "harvest")
MODEL_KINDS = ("auto", "causal_lm")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
# Short names for get_config(arg) variants, e.g. 'minilm:hookpoint=resid_post.5,tokens=1e6'.
ALIASES = {"model": "model.name", "hookpoint": "hookpoint", "text": "text.source", "tokens": "max_tokens",
           "context": "context_length", "dtype": "store.dtype", "seed": "seed"}


def harvest_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # the write-time shuffle and the store's train/eval chunk split

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # Hub name, local directory, package:MODULE (MODULE.get_model_path()), gguf:PACKAGE/FILE
    c.model.revision = ""  # Hub branch, tag or commit (recorded in the ledger)
    c.model.kind = "auto"  # auto: AutoModel (no head); causal_lm: AutoModelForCausalLM
    c.model.dtype = "float32"  # dtype the model runs in
    c.model.device = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
    c.model.trust_remote_code = False

    c.hookpoint = "resid_post.0"  # resid_pre.L | resid_post.L | module:NAME (see saejax.harvest.hookpoints)

    c.text = ml_collections.ConfigDict()
    c.text.source = "builtin:pydoc_topics"  # builtin:NAME, a .txt/.jsonl file or directory, or hf:DATASET
    c.text.field = "text"  # the text field of .jsonl records and datasets rows
    c.text.dataset_config = ""  # hf: the dataset's configuration name
    c.text.dataset_split = "train"  # hf: the split to stream

    c.context_length = 128  # tokens per context, special tokens included
    c.exclude_special_tokens = True  # leave BOS/CLS/SEP/pad positions out of the store
    c.max_tokens = 0  # stop after this many stored tokens (0: all the text)
    c.batch_size = 32  # contexts per forward pass

    c.store = ml_collections.ConfigDict()
    c.store.dtype = "float32"  # float32 | bfloat16
    c.store.chunk_mb = 1.0  # inner chunk: the unit of reads and of the reader's shuffle
    c.store.shard_mb = 64.0  # one file per shard, written whole
    c.store.shuffle_buffer_mb = 1024.0  # tokens are shuffled across contexts within blocks of this size

    c.progress = True  # progress bar (tokens/s, ETA) on stderr
    return c


def harvest_variant(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """`get_config(arg)` variants: model, hookpoint, text, tokens, context, dtype, seed, or any dotted key."""
    return apply_variant(config, arg, ALIASES)


def validate_harvest(config) -> None:
    _check_schema(config, harvest_config())
    _require(bool(config.model.name), "model.name is empty; give a Hub name, a local directory, package:MODULE or gguf:PACKAGE/FILE")
    _require(config.model.kind in MODEL_KINDS, f"model.kind={config.model.kind!r} is not one of {MODEL_KINDS}")
    _require(config.model.dtype in MODEL_DTYPES, f"model.dtype={config.model.dtype!r} is not one of {MODEL_DTYPES}")
    _require(config.context_length >= 2, f"context_length={config.context_length} must be >= 2")
    _require(config.batch_size >= 1, f"batch_size={config.batch_size} must be >= 1")
    _require(config.max_tokens >= 0, f"max_tokens={config.max_tokens} must be >= 0 (0: all the text)")
    _require(config.store.dtype in STORE_DTYPES, f"store.dtype={config.store.dtype!r} is not one of {STORE_DTYPES}")
    _require(config.store.chunk_mb > 0, f"store.chunk_mb={config.store.chunk_mb} must be > 0")
    _require(config.store.shard_mb >= config.store.chunk_mb,
             f"store.shard_mb={config.store.shard_mb} must be >= store.chunk_mb={config.store.chunk_mb}")
    _require(config.store.shuffle_buffer_mb >= config.store.shard_mb,
             f"store.shuffle_buffer_mb={config.store.shuffle_buffer_mb} must be >= store.shard_mb={config.store.shard_mb}")


def identity(config) -> dict:
    """The keys that define the store's contents (everything but the progress bar)."""
    values = config.to_dict()
    values.pop("progress")
    return values
