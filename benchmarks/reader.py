"""Store reader throughput against the trainer's consumption, measured in the same run.

    python benchmarks/reader.py                  # d=768, n=16384, k=32, B=4096, 131,072 tokens
    python benchmarks/reader.py --dtype bfloat16

Writes a store of random activations with the harvest's writer (default
geometry: ~1 MB chunks, 64 MB shards), then times
  - the reader: the trainer's own feeder (`BatchFeeder`: chunk reads in
    flight, shuffle, NaN check, normalisation, device placement), from the
    page cache ("warm") and after asking the kernel to drop the store's files
    from it with posix_fadvise ("cold": read from disk);
  - the trainer: the compiled TopK train step at d, n, k, B on this machine.
Reader and trainer are timed alternately and the medians compared. The last
line is `reader/trainer = X.X` (cold tokens/s read over tokens/s trained);
the target is >= 10, so training is never input-bound.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from saejax.data.pipeline import BatchFeeder  # noqa: E402
from saejax.data.store import StoreSource  # noqa: E402
from saejax.plan import batch_sharding  # noqa: E402
from saejax.store.layout import Geometry  # noqa: E402
from saejax.store.writer import StoreWriter  # noqa: E402
from step import build  # noqa: E402  (benchmarks/step.py: the same train step)


def write_store(path: str, d: int, tokens: int, dtype: str) -> float:
    """A store of `tokens` random rows; returns the write throughput in tokens/s."""
    geometry = Geometry.for_sizes(d, dtype, chunk_mb=1.0, shard_mb=64.0)
    writer = StoreWriter(path, {"model": {"name": "random"}, "hookpoint": "none"}, geometry, seed=0, block_shards=4)
    rng = np.random.default_rng(0)
    batch = 4096
    start = time.perf_counter()
    for i in range(tokens // batch):
        rows = rng.standard_normal((batch, d), dtype=np.float32)
        ids = np.stack([np.arange(batch) + i * batch, np.full(batch, i), np.arange(batch)], 1).astype(np.int32)
        writer.add(i, rows, ids)
    writer.finish({})
    return tokens / (time.perf_counter() - start)


def drop_from_page_cache(path: str) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_reader(source: StoreSource, batch: int, steps: int, first_step: int, sharding) -> float:
    """Seconds to feed `steps` batches through the trainer's feeder."""
    feeder = BatchFeeder(source, batch, sharding, source.stored_scale(), first_step, first_step + steps, prefetch=2)
    start = time.perf_counter()
    try:
        for step in range(first_step, first_step + steps):
            jax.block_until_ready(feeder.get(step))
    finally:
        feeder.close()
    return time.perf_counter() - start


def make_train_step(d: int, n: int, k: int, batch: int):
    step, state, x, mesh, _ = build(d, n, k, batch)
    holder = {"state": state}

    def run() -> float:
        start = time.perf_counter()
        holder["state"], metrics = step(holder["state"], x)
        jax.block_until_ready(metrics)
        return time.perf_counter() - start

    run()  # warm-up
    return run, batch_sharding(mesh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=131072, help="tokens in the benchmark store")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write the store (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "store")
        write_rate = write_store(path, args.d, args.tokens, args.dtype)
        source = StoreSource(path, args.d, seed=0, eval_fraction=0.01)
        row_mb = args.d * np.dtype(np.float32 if args.dtype == "float32" else np.float16).itemsize / 2**20
        train_step, sharding = make_train_step(args.d, args.n, args.k, args.batch)
        steps_per_epoch = source.train_tokens // args.batch

        warm, cold, trained = [], [], []
        for rep in range(args.reps):
            trained.append(np.median([train_step() for _ in range(3)]))
            drop_from_page_cache(path)
            cold.append(time_reader(source, args.batch, steps_per_epoch, rep * steps_per_epoch, sharding) / steps_per_epoch)
            warm.append(time_reader(source, args.batch, steps_per_epoch, rep * steps_per_epoch, sharding) / steps_per_epoch)

        per_batch = {name: float(np.median(times)) for name, times in (("warm", warm), ("cold", cold), ("train", trained))}
        rate = {name: args.batch / seconds for name, seconds in per_batch.items()}
        print(f"store: {args.tokens:,} tokens x d={args.d} {args.dtype}, chunks of {source.chunk_rows} rows; "
              f"written at {write_rate:,.0f} tokens/s")
        for name in ("cold", "warm"):
            print(f"reader ({name}): {rate[name]:,.0f} tokens/s, {rate[name] * row_mb:,.0f} MB/s "
                  f"({per_batch[name] * 1e3:.1f} ms per batch of {args.batch})")
        print(f"trainer: {rate['train']:,.0f} tokens/s ({per_batch['train'] * 1e3:.0f} ms per step, "
              f"n={args.n}, k={args.k}, {jax.devices()[0].platform})")
        print(f"reader (warm)/trainer = {rate['warm'] / rate['train']:.1f}")
        print(f"reader/trainer = {rate['cold'] / rate['train']:.1f}")


if __name__ == "__main__":
    main()
