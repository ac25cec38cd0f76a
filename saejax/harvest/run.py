"""harvest(config, store): text -> contexts -> model -> hookpoint -> activation store.

Everything that can be wrong with the input (config, text, model, hookpoint,
context length, an existing store with other arguments) is checked before
the store is touched. Batches of contexts are numbered from 0; the store's
progress says which batch to continue from, so a killed harvest run again
with the same arguments skips the batches already written.
"""

from __future__ import annotations

import itertools
import os
import sys
from typing import Any, Iterator

import numpy as np
from tqdm.auto import tqdm

import saejax
from saejax.errors import ConfigError, DataError
from saejax.harvest import hookpoints, model as model_io
from saejax.harvest.config import identity, validate_harvest
from saejax.harvest.contexts import Context, ContextPacker, tokenizer_hash
from saejax.harvest.text import TextSource
from saejax.store.layout import LEDGER_FILE, Geometry, canonical_json, read_json
from saejax.store.writer import StoreWriter


def _batches(contexts: Iterator[Context], size: int) -> Iterator[list[Context]]:
    while True:
        batch = list(itertools.islice(contexts, size))
        if not batch:
            return
        yield batch


def forward(model, hook: hookpoints.Hookpoint, batch: list[Context], device: str) -> np.ndarray:
    """Activations at the hookpoint, float32 (contexts, positions, d)."""
    import torch

    ids = torch.from_numpy(np.stack([c.ids for c in batch])).to(device)
    value = hook.capture(model, input_ids=ids, attention_mask=torch.ones_like(ids))
    if value.ndim != 3 or value.shape[:2] != ids.shape:
        raise ConfigError(f"hookpoint {hook.name!r} gives a tensor of shape {tuple(value.shape)}, not "
                          f"(contexts, positions, d) = {tuple(ids.shape)} + (d,); choose a hookpoint on the residual stream")
    return value.detach().to(torch.float32).cpu().numpy()


def kept_rows(batch: list[Context], activations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stored rows of a batch in token order, and their (token id, context index, position)."""
    keep = np.stack([c.keep for c in batch])
    context_rows, positions = np.nonzero(keep)
    ids = np.stack([c.ids for c in batch])[context_rows, positions]
    context_index = np.asarray([batch[r].index for r in context_rows], np.int64)
    tokens = np.stack([ids, context_index, positions], axis=1).astype(np.int32)
    return activations[context_rows, positions], tokens


def _finished(store: str, wanted: dict[str, Any]) -> dict[str, Any] | None:
    ledger = read_json(os.path.join(store, LEDGER_FILE))
    if ledger is None:
        return None
    if canonical_json(ledger.get("identity")) != canonical_json(wanted):
        raise DataError(f"{store} already holds a finished store harvested with other arguments; "
                        "harvest into a new --store path (finished stores are never overwritten)")
    return ledger


def harvest(config, store: str) -> dict[str, Any]:
    """Fill (or finish) the store at `store`; returns its ledger."""
    validate_harvest(config)
    store = os.path.abspath(os.path.expanduser(store))
    wanted = identity(config)
    ledger = _finished(store, wanted)
    if ledger is not None:
        print(f"{store} is already complete ({ledger['num_tokens']:,} tokens); nothing to do", flush=True)
        return ledger

    text = TextSource(config.text.source, config.text.field, config.text.dataset_config, config.text.dataset_split)
    model, tokenizer, model_facts = model_io.load(config)
    hook = hookpoints.resolve(model, config.hookpoint)
    limit = model_facts["max_positions"]
    if limit is not None and config.context_length > limit:
        raise ConfigError(f"context_length={config.context_length} is longer than {config.model.name} allows "
                          f"({limit} positions); set --config.context_length={limit} or less")
    packer = ContextPacker(tokenizer, config.context_length, config.exclude_special_tokens)
    batches = _batches(packer.contexts(text.documents()), int(config.batch_size))
    first = next(batches, None)
    if first is None:
        raise DataError(f"text source {text.describe()} has fewer than {packer.content_length} tokens: "
                        "not one context; give more text")
    device = model_facts["device"]
    first_activations = forward(model, hook, first, device)  # also tells d
    geometry = Geometry.for_sizes(first_activations.shape[-1], config.store.dtype,
                                  config.store.chunk_mb, config.store.shard_mb)
    writer = StoreWriter(store, wanted, geometry, config.seed,
                         block_shards=round(config.store.shuffle_buffer_mb / config.store.shard_mb))
    budget = int(config.max_tokens) or None
    progress = tqdm(total=budget, initial=writer.rows_written + writer.buffered_rows, unit="tok", unit_scale=True,
                    dynamic_ncols=True, file=sys.stderr, desc="harvest", disable=not config.progress,
                    mininterval=0.5 if sys.stderr.isatty() else 30.0)
    if writer.next_batch:
        tqdm.write(f"continuing {store} from batch {writer.next_batch} "
                   f"({writer.rows_written + writer.buffered_rows:,} tokens already harvested)", file=sys.stderr)
    stopped_at_budget, contexts_used = False, 0
    with progress:
        for batch_index, batch in enumerate(itertools.chain([first], batches)):
            contexts_used += len(batch)
            if batch_index < writer.next_batch:
                continue  # written before the restart; tokenised again only to keep the hashes whole
            activations = first_activations if batch_index == 0 else forward(model, hook, batch, device)
            rows, tokens = kept_rows(batch, activations)
            if budget is not None:
                room = budget - writer.rows_written - writer.buffered_rows
                rows, tokens = rows[:room], tokens[:room]
            writer.add(batch_index, rows, tokens)
            progress.update(len(rows))
            if budget is not None and writer.rows_written + writer.buffered_rows >= budget:
                stopped_at_budget = True
                break
    facts = {
        "model": model_facts,
        "hookpoint": hook.name,
        "hookpoint_convention": hook.convention,
        "d": geometry.d,
        "dtype": geometry.dtype,
        "context_length": int(config.context_length),
        "contexts": contexts_used,
        "excluded_tokens": packer.excluded_tokens(),
        "text": {"source": text.describe(), "stopped_at_max_tokens": stopped_at_budget,
                 "dropped_tail_tokens": None if stopped_at_budget else packer.dropped_tail_tokens},
        "hashes": {"tokenizer_sha256": tokenizer_hash(tokenizer),
                   "text_sha256": packer.text_digest.hexdigest(),
                   "token_stream_sha256": packer.token_digest.hexdigest()},
        "saejax_version": saejax.__version__,
    }
    return writer.finish(facts)
