"""The activation store: the writer's shuffled, resumable blocks, and StoreSource's order, splits and checks.

Every stored row is identifiable: the token row written with input row i is
(i, batch index, position in batch), and every activation row is random, so
a row read back maps to its input through its bytes.
"""

import math
import os
import re
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import tensorstore as ts

from helpers import small_config
from saejax.data import StoreSource, make_source
from saejax.data.pipeline import BatchFeeder
from saejax.errors import DataError
from saejax.store.layout import Geometry, open_arrays, read_ledger, shard_file
from saejax.store.writer import StoreWriter
from saejax.trainer import train_and_evaluate

D = 16
GEOMETRY = Geometry(d=D, dtype="float32", chunk_rows=16, shard_rows=64)
BLOCK_SHARDS = 2
BLOCK_ROWS = BLOCK_SHARDS * GEOMETRY.shard_rows  # 128
# 341 rows = 21 full chunks + a chunk of 5. Buffered rows pass 128 after batch 2
# (block 0 = inputs 0..127, nothing carried) and 256 after batch 5 (block 1 =
# inputs 128..255, 51 rows carried); finish() writes the partial block 256..340.
SIZES = (40, 55, 33, 70, 48, 61, 34)
NUM_ROWS = sum(SIZES)
BLOCKS = ((0, 128), (128, 256), (256, NUM_ROWS))
WRITER_SEED = 7
IDENTITY = {"model": {"name": "test-model"}, "hookpoint": "blocks.1.hook_resid_post"}
FACTS = {"hookpoint_convention": "residual stream after block 1", "hashes": {"text": "abc123"}}


# ---------------------------------------------------------------------------- helpers


def _rows(sizes, d=D, seed=0):
    """Random activations (rows of varied norm) and their identifying token rows."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    acts = (rng.standard_normal((n, d)) * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)
    tokens = np.concatenate([
        np.stack([np.arange(start, start + size), np.full(size, b), np.arange(size)], axis=1)
        for b, (start, size) in enumerate(zip(np.cumsum((0,) + tuple(sizes[:-1])), sizes, strict=True))
    ]).astype(np.int32)
    return acts, tokens


def _batches(acts, tokens, sizes, start=0):
    """(batch index, activations, tokens) of every batch from `start` on."""
    offsets = np.cumsum((0,) + tuple(sizes))
    for b in range(start, len(sizes)):
        yield b, acts[offsets[b]:offsets[b + 1]], tokens[offsets[b]:offsets[b + 1]]


def _write(path, acts, tokens, sizes, geometry=GEOMETRY, identity=IDENTITY, seed=WRITER_SEED,
           block_shards=BLOCK_SHARDS, finish=True):
    writer = StoreWriter(str(path), identity, geometry, seed, block_shards)
    for batch in _batches(acts, tokens, sizes, writer.next_batch):
        writer.add(*batch)
    return writer.finish(dict(FACTS)) if finish else writer


def _stored(path):
    """The store's two arrays as numpy."""
    activations, tokens = open_arrays(str(path))
    return activations.read().result(), tokens.read().result()


def _files(path):
    """Every file under `path` with its bytes."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


class Store:
    """A finished store of SIZES random rows and what is known about it."""

    def __init__(self, path):
        self.path = str(path)
        self.acts, self.tokens = _rows(SIZES)
        self.ledger = _write(self.path, self.acts, self.tokens, SIZES)
        self.stored_acts, self.stored_tokens = _stored(self.path)
        self.ids_at = self.stored_tokens[:, 0].astype(np.int64)  # stored row -> input row
        self.row_of = np.empty(NUM_ROWS, np.int64)
        self.row_of[self.ids_at] = np.arange(NUM_ROWS)  # input row -> stored row
        self._lookup = {row.tobytes(): i for i, row in enumerate(self.acts)}
        assert len(self._lookup) == NUM_ROWS

    def ids(self, batch):
        """Input rows of a batch read back (each read row must equal its input bit for bit)."""
        assert batch.dtype == np.float32 and batch.shape[1] == D
        ids = np.array([self._lookup[row.tobytes()] for row in batch], np.int64)
        np.testing.assert_array_equal(batch, self.acts[ids])
        return ids

    def chunk_of(self, ids):
        return self.row_of[ids] // GEOMETRY.chunk_rows

    def chunk_ids(self, chunks):
        """Input rows stored in `chunks`, chunk by chunk in storage order."""
        c = GEOMETRY.chunk_rows
        return np.concatenate([self.ids_at[k * c:(k + 1) * c] for k in chunks])

    def copy(self, dest):
        shutil.copytree(self.path, dest)
        return str(dest)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("store") / "acts")


def _stream(source, store, steps, batch_size, split="train"):
    return np.concatenate([store.ids(source.read(s, batch_size, split)) for s in steps])


# ---------------------------------------------------------------------------- writer: round trip


def test_every_row_is_stored_once_bit_exact_with_the_whole_store_scale(store):
    acts, toks = store.stored_acts, store.stored_tokens
    assert acts.shape == (NUM_ROWS, D) and acts.dtype == np.float32  # cut to num_tokens
    assert toks.shape == (NUM_ROWS, 3) and toks.dtype == np.int32
    np.testing.assert_array_equal(np.sort(store.ids_at), np.arange(NUM_ROWS))  # each row exactly once
    np.testing.assert_array_equal(acts, store.acts[store.ids_at])  # bit-exact
    np.testing.assert_array_equal(toks, store.tokens[store.ids_at])  # batch index and position kept too

    ledger = store.ledger
    assert read_ledger(store.path) == ledger
    assert ledger["num_tokens"] == NUM_ROWS and ledger["complete"] is True
    assert ledger["format"] == "saejax-activations/1"
    assert ledger["identity"] == IDENTITY and ledger["seed"] == WRITER_SEED and ledger["block_rows"] == BLOCK_ROWS
    assert ledger["geometry"] == {"d": D, "dtype": "float32", "chunk_rows": 16, "shard_rows": 64}
    assert ledger["hashes"] == FACTS["hashes"] and ledger["hookpoint_convention"] == FACTS["hookpoint_convention"]
    mean_sq_norm = np.mean(np.sum(store.acts.astype(np.float64) ** 2, axis=1))
    assert ledger["normalization"]["mean_sq_norm"] == pytest.approx(mean_sq_norm, rel=1e-12)
    assert ledger["normalization"]["scale"] == pytest.approx(math.sqrt(D / mean_sq_norm), rel=1e-12)
    # The harvest's scratch files are gone; shards are files of whole chunks: 6 shards for 341 rows.
    assert sorted(os.listdir(store.path)) == ["activations", "ledger.json", "metadata.json", "tokens"]
    assert sorted(os.listdir(os.path.join(store.path, "activations", "c"))) == [str(i) for i in range(6)]
    last_shard = shard_file(store.path, NUM_ROWS - 1, 64)
    assert last_shard == os.path.join(store.path, "activations", "c", "5", "0") and os.path.isfile(last_shard)


def test_rows_are_shuffled_within_their_block_only(store):
    ids_at = store.ids_at
    assert not np.array_equal(ids_at, np.arange(NUM_ROWS))
    permutations = []
    for start, stop in BLOCKS:
        block = ids_at[start:stop]
        # The first 128 input rows fill the first block, and so on: no row leaves its block.
        np.testing.assert_array_equal(np.sort(block), np.arange(start, stop))
        assert np.mean(block == np.arange(start, stop)) < 0.1  # permuted, not kept in order
        permutations.append(block - start)
    assert not np.array_equal(permutations[0], permutations[1])  # each block its own permutation
    # Neighbouring tokens of a batch land far apart within the block.
    gaps = np.abs(np.diff(store.row_of[:128]))
    assert np.median(gaps) > 10


# ---------------------------------------------------------------------------- reader: order and splits


def test_one_epoch_visits_every_train_row_once_then_a_new_permutation(store):
    source = StoreSource(store.path, D, seed=3, eval_fraction=0.1)
    assert source.num_tokens == NUM_ROWS and source.chunk_rows == 16 and source.shard_rows == 64
    assert len(source.eval_chunks) == 2 and len(source.train_chunks) == 20  # round(22 * 0.1) chunks held out
    np.testing.assert_array_equal(np.sort(np.concatenate([source.train_chunks, source.eval_chunks])), np.arange(22))
    train_ids = store.chunk_ids(source.train_chunks)
    assert source.train_tokens == len(train_ids) and source.eval_tokens == NUM_ROWS - len(train_ids)

    n, batch = source.train_tokens, 24
    assert n % batch  # one batch straddles the epoch boundary
    stream = _stream(source, store, range(-(-2 * n // batch)), batch)
    epoch0, epoch1 = stream[:n], stream[n:2 * n]
    np.testing.assert_array_equal(np.sort(epoch0), np.sort(train_ids))
    np.testing.assert_array_equal(np.sort(epoch1), np.sort(train_ids))
    assert not np.array_equal(epoch0, epoch1)
    # An epoch reads chunk after chunk: 20 runs of rows from one chunk each, the chunks in an order
    # of the epoch's own, the rows of each chunk shuffled.
    chunk_orders = []
    for epoch in (epoch0, epoch1):
        chunks = store.chunk_of(epoch)
        runs = np.split(store.row_of[epoch], np.flatnonzero(np.diff(chunks)) + 1)
        run_chunks = np.array([run[0] // 16 for run in runs])
        np.testing.assert_array_equal(np.sort(run_chunks), source.train_chunks)
        assert not np.array_equal(run_chunks, source.train_chunks)
        assert sum(np.all(np.diff(run) > 0) for run in runs) <= 1  # rows not read in storage order
        chunk_orders.append(run_chunks)
    assert not np.array_equal(*chunk_orders)
    # locate agrees with what was read (epoch number and chunk of every row).
    epochs, chunk_ids, _ = source.locate(0, 2 * n, "train", 0, 2 * n)
    np.testing.assert_array_equal(epochs, np.repeat([0, 1], n))
    np.testing.assert_array_equal(chunk_ids, store.chunk_of(stream[:2 * n]))


def test_eval_rows_come_from_eval_chunks_in_storage_order(store):
    source = StoreSource(store.path, D, seed=3, eval_fraction=0.1)
    n, batch = source.eval_tokens, 8
    assert n == 32 and n % batch == 0
    stream = _stream(source, store, range(n // batch + 2), batch, "eval")  # 16 positions past the end
    expected = store.chunk_ids(source.eval_chunks)
    np.testing.assert_array_equal(stream[:n], expected)
    np.testing.assert_array_equal(stream[n:], expected[:16])  # then wraps around to the start
    train_ids = store.chunk_ids(source.train_chunks)
    assert set(expected.tolist()).isdisjoint(train_ids.tolist())
    assert sorted(expected.tolist() + train_ids.tolist()) == list(range(NUM_ROWS))
    # The held-out chunks depend on the store, not on the run's seed.
    other = StoreSource(store.path, D, seed=11, eval_fraction=0.1)
    np.testing.assert_array_equal(other.eval_chunks, source.eval_chunks)
    np.testing.assert_array_equal(other.read(1, batch, "eval"), source.read(1, batch, "eval"))
    no_eval = StoreSource(store.path, D, seed=3, eval_fraction=0.0)
    assert no_eval.eval_tokens == 0 and no_eval.train_tokens == NUM_ROWS
    with pytest.raises(DataError, match=r"this run holds out no evaluation chunks: set data\.eval_fraction > 0 or train\.eval_batches=0"):
        no_eval.read(0, batch, "eval")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'eval'\), got 'test'"):
        source.read(0, batch, "test")


def test_sample_holds_whole_train_chunks(store):
    source = StoreSource(store.path, D, seed=3, eval_fraction=0.1)
    sample = source.sample(100)
    assert sample.shape == (100, D) and sample.dtype == np.float32
    ids = store.ids(sample)
    assert len(set(ids.tolist())) == 100
    assert set(store.chunk_of(ids).tolist()) <= set(source.train_chunks.tolist())
    np.testing.assert_array_equal(sample, StoreSource(store.path, D, seed=3, eval_fraction=0.1).sample(100))
    everything = store.ids(source.sample(10_000))  # more than there is: every train row once
    np.testing.assert_array_equal(np.sort(everything), np.sort(store.chunk_ids(source.train_chunks)))


def test_a_one_chunk_store_cannot_hold_out_eval_data(tmp_path):
    acts, tokens = _rows((6, 4))
    _write(tmp_path / "tiny", acts, tokens, (6, 4))
    with pytest.raises(DataError, match=r"has 1 chunk\(s\) of 16 tokens: too few to hold out data\.eval_fraction=0\.1 "
                                        r"of them and still train\. .*--config\.data\.eval_fraction=0"):
        StoreSource(str(tmp_path / "tiny"), D, seed=0, eval_fraction=0.1)
    source = StoreSource(str(tmp_path / "tiny"), D, seed=0, eval_fraction=0.0)
    lookup = {row.tobytes(): i for i, row in enumerate(acts)}
    ids = [lookup[row.tobytes()] for row in source.read(0, 25)]  # 2.5 epochs of 10 rows
    assert sorted(ids[:10]) == list(range(10)) and sorted(ids[10:20]) == list(range(10))
    assert ids[:10] != ids[10:20]


# ---------------------------------------------------------------------------- reader: determinism


def test_batches_are_a_pure_function_of_seed_and_step(store):
    a = StoreSource(store.path, D, seed=3, eval_fraction=0.1)
    b = StoreSource(store.path, D, seed=3, eval_fraction=0.1)
    steps, batch = range(30), 24  # 30 * 24 = 720 positions: past the second epoch boundary
    seq_a = [a.read(s, batch) for s in steps]
    seq_b = [b.read(s, batch) for s in steps]
    for x, y in zip(seq_a, seq_b, strict=True):
        np.testing.assert_array_equal(x, y)
    other = StoreSource(store.path, D, seed=4, eval_fraction=0.1)
    assert not np.array_equal(np.concatenate(seq_a), np.concatenate([other.read(s, batch) for s in steps]))

    # Resume: a fresh reader asked for step s gives what a reader that read 0..s-1 gives.
    for s in (1, 13, 14, 29):
        np.testing.assert_array_equal(StoreSource(store.path, D, seed=3, eval_fraction=0.1).read(s, batch), seq_a[s])
    # After three epochs, the reader still reproduces epoch 0 (its epoch cache has been evicted).
    assert a.read(29, batch).size and 0 not in a._epoch_cache
    np.testing.assert_array_equal(a.read(0, batch), seq_a[0])
    np.testing.assert_array_equal(a.read(29, batch, "eval"), b.read(29, batch, "eval"))


# ---------------------------------------------------------------------------- reader: multi-host


class _Recorder:
    """Wraps a tensorstore array; records the chunks of the row ranges that are read."""

    def __init__(self, array):
        self.array, self.reads = array, []

    def __getitem__(self, index):
        rows = index[0] if isinstance(index, tuple) else index
        assert rows.start % 16 == 0 and rows.stop - rows.start <= 16  # whole chunks, one at a time
        self.reads.append(rows.start // 16)
        return self.array[index]

    def __getattr__(self, name):
        return getattr(self.array, name)

    def chunks(self):
        chunks, self.reads = sorted(self.reads), []
        assert len(set(chunks)) == len(chunks)  # no chunk read twice for one batch
        return chunks


@pytest.mark.parametrize("process_count", [2, 4])
@pytest.mark.parametrize("split, step, batch", [("train", 0, 48), ("train", 6, 48), ("eval", 1, 24)])
def test_process_shares_are_slices_of_the_global_batch_and_read_only_their_chunks(
        store, monkeypatch, process_count, split, step, batch):
    # Train step 6 of 48 holds positions 288..335: the epoch boundary. The 32 eval rows
    # (two chunks) hold eval step 1 of 24 without repeating a row: positions 24..31, 0..15.
    source = StoreSource(store.path, D, seed=3, eval_fraction=0.1)
    assert source.eval_tokens == 32 and source.train_tokens == 309
    requested = []
    original = StoreSource._start_reads

    def spy(self, epochs, chunk_ids):
        requested.append(sorted(set(chunk_ids.tolist())))
        return original(self, epochs, chunk_ids)

    monkeypatch.setattr(StoreSource, "_start_reads", spy)
    source.activations = _Recorder(source.activations)  # and what is actually read from the array
    full = store.ids(source.read(step, batch, split))
    global_chunks = requested.pop()
    assert source.activations.chunks() == global_chunks
    if split == "train" and step == 6:
        assert source.locate(step, batch, split, 0, batch)[0].tolist().count(1) > 0  # crosses into epoch 1
    per = batch // process_count
    shares, smaller = [], False
    for p in range(process_count):
        share = store.ids(source.read(step, batch, split, p, process_count))
        np.testing.assert_array_equal(share, full[p * per:(p + 1) * per])
        shares.append(share)
        chunks = requested.pop()
        _, located, _ = source.locate(step, batch, split, p * per, (p + 1) * per)
        assert chunks == sorted(set(located.tolist())) == sorted(set(store.chunk_of(share).tolist()))
        assert source.activations.chunks() == chunks
        smaller |= len(chunks) < len(global_chunks)
    assert smaller  # some process reads fewer chunks than the whole batch touches
    np.testing.assert_array_equal(np.concatenate(shares), full)
    flat = np.concatenate(shares)
    assert len(set(flat.tolist())) == len(flat)  # pairwise disjoint
    with pytest.raises(DataError, match=rf"batch size {batch} is not divisible by the 5 processes"):
        source.read(step, batch, split, 0, 5)


# ---------------------------------------------------------------------------- reader: errors


def test_a_corrupt_shard_is_named_and_other_batches_still_read(store, tmp_path):
    path = store.copy(tmp_path / "corrupt")
    shard = shard_file(path, 64, 64)  # rows 64..127: chunks 4..7
    assert shard == os.path.join(path, "activations", "c", "1", "0")
    with open(shard, "rb") as f:
        data = bytearray(f.read())
    for offset in range(128, len(data) - 128, 256):  # inside every inner chunk, clear of the index at the end
        data[offset] ^= 0x5A
    with open(shard, "wb") as f:
        f.write(bytes(data))

    source = StoreSource(path, D, seed=3, eval_fraction=0.0)
    clean = StoreSource(store.path, D, seed=3, eval_fraction=0.0)
    batch, touching, not_touching = 8, [], []
    for step in range(40):
        chunks = set(source.locate(step, batch, "train", 0, batch)[1].tolist())
        (touching if chunks & {4, 5, 6, 7} else not_touching).append(step)
    assert touching and not_touching
    with pytest.raises(DataError) as info:
        source.read(touching[0], batch)
    message = str(info.value)
    assert shard in message and "corrupt" in message
    assert re.search(r"chunk [4-7] \(rows \d+-\d+\) in shard file", message)
    for step in not_touching[:5]:
        np.testing.assert_array_equal(source.read(step, batch), clean.read(step, batch))


def test_incomplete_store(store, tmp_path):
    writer = _write(tmp_path / "partial", store.acts, store.tokens, SIZES, finish=False)
    assert writer.rows_written == 256
    with pytest.raises(DataError, match=r"is incomplete: it has no ledger\.json .*Run the same `saejax harvest` command again"):
        StoreSource(str(tmp_path / "partial"), D, seed=0, eval_fraction=0.1)


def test_missing_and_non_store_paths(tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(DataError, match=rf"activation store {re.escape(missing)} does not exist; create it with `saejax harvest --store"):
        StoreSource(missing, D, seed=0, eval_fraction=0.1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.npy").write_bytes(b"")
    with pytest.raises(DataError, match=r"other is not an activation store \(no ledger\.json or metadata\.json\)"):
        StoreSource(str(tmp_path / "other"), D, seed=0, eval_fraction=0.1)


def test_wrong_dimension_and_inconsistent_ledger(store, tmp_path):
    with pytest.raises(DataError, match=r"holds activations of dimension d=16 \(test-model at blocks\.1\.hook_resid_post\) "
                                        r"but sae\.d=8; set --config\.sae\.d=16"):
        StoreSource(store.path, 8, seed=0, eval_fraction=0.1)
    path = store.copy(tmp_path / "edited")
    ledger_path = os.path.join(path, "ledger.json")
    with open(ledger_path) as f:
        text = f.read()
    assert f'"num_tokens": {NUM_ROWS}' in text
    with open(ledger_path, "w") as f:
        f.write(text.replace(f'"num_tokens": {NUM_ROWS}', '"num_tokens": 340'))
    with pytest.raises(DataError, match=r"has shape \(341, 16\) but the ledger records \(340, 16\)"):
        StoreSource(path, D, seed=0, eval_fraction=0.1)


# ---------------------------------------------------------------------------- writer: resume and refusals


@pytest.mark.parametrize("killed_after, next_batch, rows_written", [(1, 0, 0), (4, 3, 128), (5, 6, 256)])
def test_a_resumed_harvest_writes_the_same_store(store, tmp_path, killed_after, next_batch, rows_written):
    path = str(tmp_path / "resumed")
    writer = StoreWriter(path, IDENTITY, GEOMETRY, WRITER_SEED, BLOCK_SHARDS)
    for batch in _batches(store.acts, store.tokens, SIZES[:killed_after + 1]):
        writer.add(*batch)
    del writer  # killed: whatever was only in memory is lost

    resumed = StoreWriter(path, IDENTITY, GEOMETRY, WRITER_SEED, BLOCK_SHARDS)
    assert resumed.next_batch == next_batch and resumed.rows_written == rows_written
    assert resumed.buffered_rows == sum(SIZES[:next_batch]) - rows_written  # the carried rows
    with pytest.raises(RuntimeError, match=rf"store expects batch {next_batch}, got {next_batch + 1}"):
        resumed.add(next_batch + 1, *next(_batches(store.acts, store.tokens, SIZES, next_batch))[1:])
    for batch in _batches(store.acts, store.tokens, SIZES, next_batch):
        resumed.add(*batch)
    ledger = resumed.finish(dict(FACTS))

    assert ledger == store.ledger and read_ledger(path) == read_ledger(store.path)
    acts, toks = _stored(path)
    assert np.array_equal(acts, store.stored_acts) and np.array_equal(toks, store.stored_tokens)
    for array in ("activations", "tokens"):  # byte-identical shard files
        assert _files(os.path.join(path, array)) == _files(os.path.join(store.path, array))
    assert sorted(os.listdir(path)) == ["activations", "ledger.json", "metadata.json", "tokens"]


def test_a_harvest_killed_inside_finish_resumes_to_the_same_store(store, tmp_path, monkeypatch):
    """Killed after the arrays were cut to size but before the ledger was written."""
    import saejax.store.writer as writer_module

    path = str(tmp_path / "killed_in_finish")
    writer = StoreWriter(path, IDENTITY, GEOMETRY, WRITER_SEED, BLOCK_SHARDS)
    for batch in _batches(store.acts, store.tokens, SIZES):
        writer.add(*batch)
    write_json = writer_module.write_json_atomic

    def killed_at_the_ledger(target, payload):
        if target.endswith("ledger.json"):
            raise KeyboardInterrupt
        write_json(target, payload)

    monkeypatch.setattr(writer_module, "write_json_atomic", killed_at_the_ledger)
    with pytest.raises(KeyboardInterrupt):
        writer.finish(dict(FACTS))
    monkeypatch.setattr(writer_module, "write_json_atomic", write_json)
    with pytest.raises(DataError, match="incomplete"):
        read_ledger(path)

    resumed = StoreWriter(path, IDENTITY, GEOMETRY, WRITER_SEED, BLOCK_SHARDS)
    for batch in _batches(store.acts, store.tokens, SIZES, resumed.next_batch):
        resumed.add(*batch)
    assert resumed.finish(dict(FACTS)) == store.ledger
    acts, toks = _stored(path)
    assert np.array_equal(acts, store.stored_acts) and np.array_equal(toks, store.stored_tokens)


def test_a_writer_with_other_arguments_changes_nothing(store, tmp_path):
    path = str(tmp_path / "partial")
    writer = StoreWriter(path, IDENTITY, GEOMETRY, WRITER_SEED, BLOCK_SHARDS)
    for batch in _batches(store.acts, store.tokens, SIZES[:5]):
        writer.add(*batch)
    before = _files(path)
    assert "progress.json" in before and "metadata.json" in before
    other = {**IDENTITY, "hookpoint": "blocks.2.hook_resid_post"}
    with pytest.raises(DataError, match=r"holds a harvest started with different arguments \(identity\.hookpoint: store has "
                                        r"'blocks\.1\.hook_resid_post', now 'blocks\.2\.hook_resid_post'\)\. .*nothing was changed"):
        StoreWriter(path, other, GEOMETRY, WRITER_SEED, BLOCK_SHARDS)
    with pytest.raises(DataError, match=r"different arguments \(seed: store has 7, now 8\)"):
        StoreWriter(path, IDENTITY, GEOMETRY, WRITER_SEED + 1, BLOCK_SHARDS)
    with pytest.raises(DataError, match=r"different arguments \(block_rows: store has 128, now 192\)"):
        StoreWriter(path, IDENTITY, GEOMETRY, WRITER_SEED, 3)
    assert _files(path) == before

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"busy is not empty and is not an activation store; harvest into a new or empty directory"):
        StoreWriter(str(tmp_path / "busy"), IDENTITY, GEOMETRY, WRITER_SEED, BLOCK_SHARDS)
    assert os.listdir(tmp_path / "busy") == ["notes.txt"]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_rows_are_refused_and_nothing_is_written(store, tmp_path, bad):
    path = str(tmp_path / "nan")
    writer = StoreWriter(path, IDENTITY, GEOMETRY, WRITER_SEED, BLOCK_SHARDS)
    batches = list(_batches(store.acts, store.tokens, SIZES))
    writer.add(*batches[0])
    writer.add(*batches[1])
    index, acts, toks = batches[2]  # the batch that completes block 0
    poisoned = acts.copy()
    poisoned[7, 3] = bad
    with pytest.raises(DataError, match=r"the model produced NaN/inf activations in harvest batch 2; "
                                        r"nothing from this block was written"):
        writer.add(index, poisoned, toks)
    assert writer.next_batch == 2 and writer.rows_written == 0 and writer.buffered_rows == 95
    assert "progress.json" not in os.listdir(path)
    assert not os.path.exists(os.path.join(path, "activations", "c"))  # no shard written
    # The same writer continues with the good batch and makes the same store as a clean run.
    for batch in batches[2:]:
        writer.add(*batch)
    assert writer.finish(dict(FACTS)) == store.ledger
    acts_out, toks_out = _stored(path)
    assert np.array_equal(acts_out, store.stored_acts) and np.array_equal(toks_out, store.stored_tokens)


# ---------------------------------------------------------------------------- bfloat16


def test_a_bfloat16_store_reads_back_the_rounded_rows(tmp_path):
    geometry = Geometry(d=D, dtype="bfloat16", chunk_rows=16, shard_rows=64)
    acts, tokens = _rows(SIZES, seed=5)
    path = str(tmp_path / "bf16")
    ledger = _write(path, acts, tokens, SIZES, geometry=geometry)
    rounded = acts.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert not np.array_equal(rounded, acts)

    raw_acts, raw_tokens = open_arrays(path)
    assert raw_acts.dtype == ts.bfloat16
    raw = raw_acts.read().result()
    assert raw.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(raw.astype(np.float32), rounded[raw_tokens.read().result()[:, 0]])

    mean_sq_norm = np.mean(np.sum(rounded.astype(np.float64) ** 2, axis=1))  # of what the reader sees
    assert ledger["normalization"]["scale"] == pytest.approx(math.sqrt(D / mean_sq_norm), rel=1e-12)
    source = StoreSource(path, D, seed=0, eval_fraction=0.0)
    assert source.stored_scale() == ledger["normalization"]["scale"]
    lookup = {row.tobytes(): i for i, row in enumerate(rounded)}
    assert len(lookup) == NUM_ROWS
    epoch = source.read(0, NUM_ROWS)
    assert epoch.dtype == np.float32 and epoch.shape == (NUM_ROWS, D)
    ids = np.array([lookup[row.tobytes()] for row in epoch])
    np.testing.assert_array_equal(np.sort(ids), np.arange(NUM_ROWS))
    np.testing.assert_array_equal(epoch, rounded[ids])


# ---------------------------------------------------------------------------- feeder and trainer


def test_feeder_yields_scaled_store_batches(store):
    source = StoreSource(store.path, D, seed=3, eval_fraction=0.1)
    scale = source.stored_scale()
    assert scale == store.ledger["normalization"]["scale"]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    feeder = BatchFeeder(source, 24, sharding, scale, start_step=10, stop_step=16, prefetch=2)  # crosses epoch 0 -> 1
    try:
        for step in range(10, 16):
            batch = feeder.get(step)
            assert isinstance(batch, jax.Array) and batch.shape == (24, D)
            np.testing.assert_array_equal(np.asarray(batch), source.read(step, 24) * np.float32(scale))
    finally:
        feeder.close()
    assert not feeder._thread.is_alive()


def test_trainer_reads_a_store(tmp_path):
    sizes = (700,) * 5
    acts, tokens = _rows(sizes, seed=9)
    path = str(tmp_path / "store")
    geometry = Geometry(d=D, dtype="float32", chunk_rows=32, shard_rows=128)
    ledger = _write(path, acts, tokens, sizes, geometry=geometry)
    config = small_config(**{"data.source": "store", "data.path": path, "sae.d": D, "data.eval_fraction": 0.1,
                             "train.steps": 4})
    source = make_source(config)
    assert isinstance(source, StoreSource) and source.num_tokens == 3500
    results = train_and_evaluate(config, str(tmp_path / "run"))
    assert results["steps"] == 4 and results["tokens_seen"] == 4 * 64
    assert results["normalization"] == {"scale": ledger["normalization"]["scale"],
                                        "method": "whole dataset, stored with the data"}
    data = results["data"]
    assert data["path"] == path and data["num_tokens"] == 3500 and data["d"] == D
    assert data["train_tokens"] == source.train_tokens and data["eval_tokens"] == source.eval_tokens
    assert len(source.eval_chunks) == 11 and len(source.train_chunks) == 99  # of 110 chunks (109 x 32 rows + 12)
    assert data["model"] == IDENTITY["model"] and data["hookpoint"] == IDENTITY["hookpoint"]
    assert data["store_normalization"] == ledger["normalization"] and data["hashes"] == FACTS["hashes"]
    assert np.isfinite(results["eval_metrics"]["nmse"]) and np.isfinite(results["final_train_metrics"]["loss"])

    # A store of another dimension is refused before anything is trained.
    small_acts, small_tokens = _rows((100,), d=8)
    other = str(tmp_path / "d8")
    _write(other, small_acts, small_tokens, (100,), geometry=Geometry(d=8, dtype="float32", chunk_rows=16, shard_rows=64))
    bad = small_config(**{"data.source": "store", "data.path": other, "sae.d": D, "data.eval_fraction": 0.1})
    workdir = str(tmp_path / "bad_run")
    with pytest.raises(DataError, match=r"holds activations of dimension d=8 .* but sae\.d=16; set --config\.sae\.d=8"):
        train_and_evaluate(bad, workdir)
    assert not os.path.exists(os.path.join(workdir, "results.json"))
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))


# ---------------------------------------------------------------------------- reader: files against the ledger


def test_the_ledger_lists_every_array_file_with_its_size(store):
    files = store.ledger["files"]
    assert "activations/zarr.json" in files and "tokens/zarr.json" in files
    shards = -(-NUM_ROWS // GEOMETRY.shard_rows)
    for array in ("activations", "tokens"):
        for shard in range(shards):
            entry = files[f"{array}/c/{shard}/0"]
            assert entry["bytes"] == os.path.getsize(os.path.join(store.path, array, "c", str(shard), "0"))
    assert len(files) == 2 * (shards + 1)


@pytest.mark.parametrize("array", ["activations", "tokens"])
def test_a_deleted_shard_is_refused_at_open_and_nothing_is_trained(store, tmp_path, array):
    path = store.copy(tmp_path / "deleted")
    shard = os.path.join(path, array, "c", "1", "0")
    os.remove(shard)
    with pytest.raises(DataError, match=rf"activation store .*: {re.escape(shard)} is missing\. Nothing was trained"):
        StoreSource(path, D, seed=0, eval_fraction=0.1)
    config = small_config(**{"data.source": "store", "data.path": path, "sae.d": D, "data.eval_fraction": 0.1})
    workdir = tmp_path / "run"
    with pytest.raises(DataError, match=re.escape(shard)):
        train_and_evaluate(config, str(workdir))
    assert not (workdir / "checkpoints").exists(), "refused before anything was compiled or saved"


def test_a_truncated_shard_is_refused_at_open(store, tmp_path):
    path = store.copy(tmp_path / "truncated")
    shard = os.path.join(path, "activations", "c", "2", "0")
    size = os.path.getsize(shard)
    os.truncate(shard, size - 100)
    with pytest.raises(DataError, match=rf"{re.escape(shard)} has {size - 100} bytes but the ledger records {size} "
                                        r"\(truncated or replaced\)"):
        StoreSource(path, D, seed=0, eval_fraction=0.1)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_shard_lost_after_open_is_a_read_error_never_zeros(store, tmp_path, damage):
    path = store.copy(tmp_path / damage)
    source = StoreSource(path, D, seed=3, eval_fraction=0.0)
    shard = shard_file(path, 64, 64)  # chunks 4..7
    if damage == "deleted":
        os.remove(shard)
    else:
        os.truncate(shard, 40)
    touching = next(step for step in range(40) if set(source.locate(step, 8, "train", 0, 8)[1].tolist()) & {4, 5, 6, 7})
    with pytest.raises(DataError) as info:
        source.read(touching, 8)
    message = str(info.value)
    assert shard in message and re.search(r"chunk [4-7] \(rows \d+-\d+\) in shard file", message)
    assert ("is missing" if damage == "deleted" else "has 40 bytes but the ledger records") in message
    # What zarr does without the ledger and the no-fill read: the lost rows come back as zeros.
    zeros = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": os.path.join(path, "activations")}},
                    open=True, read=True).result()
    if damage == "deleted":
        assert not zeros[64:128].read().result().any()
