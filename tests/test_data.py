"""Data sources: determinism, process splits, the .npy reader's epochs and errors, checks, the feeder."""

import jax
import numpy as np
import pytest

from helpers import small_config
from saejax.data import SOURCES, NpySource, SyntheticSource, check_finite, make_source
from saejax.data.pipeline import BatchFeeder, estimate_scale, host_batch
from saejax.data.synthetic import firing_probabilities, mean_max_cosine
from saejax.errors import DataError

D = 8


def _synthetic(seed=0, **kw):
    params = dict(d=D, num_features=32, avg_active=3.0, power_law_exponent=0.5, min_magnitude=0.5,
                  max_magnitude=1.5, noise_std=0.01, dictionary_seed=1234, seed=seed)
    params.update(kw)
    return SyntheticSource(**params)


# ---------------------------------------------------------------------------- synthetic


def test_synthetic_is_a_pure_function_of_seed_step_split():
    a, b = _synthetic(), _synthetic()
    x = a.read(3, 32)
    assert x.shape == (32, D) and x.dtype == np.float32
    np.testing.assert_array_equal(x, b.read(3, 32))  # a fresh source, same rows
    np.testing.assert_array_equal(x, a.read(3, 32, "train"))
    assert not np.allclose(x, a.read(4, 32))  # next step differs
    assert not np.allclose(x, a.read(3, 32, "eval"))  # eval stream differs from train
    assert not np.allclose(x, _synthetic(seed=1).read(3, 32))  # data seed matters
    assert not np.allclose(a.sample(32), x)
    np.testing.assert_array_equal(a.sample(16), b.sample(16))
    # The true dictionary depends on dictionary_seed only, not on the data seed.
    np.testing.assert_array_equal(a.dictionary, _synthetic(seed=1).dictionary)
    np.testing.assert_allclose(np.linalg.norm(a.dictionary, axis=1), 1.0, rtol=1e-6)
    assert not np.allclose(a.dictionary, _synthetic(dictionary_seed=7).dictionary)


def test_synthetic_rows_are_sparse_combinations_of_the_dictionary():
    source = _synthetic(noise_std=0.0)
    x = source.read(0, 64)
    # Without noise, every row lies in the span of the true features.
    coeffs, *_ = np.linalg.lstsq(source.dictionary.T, x.T, rcond=None)
    np.testing.assert_allclose(source.dictionary.T @ coeffs, x.T, atol=1e-4)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_process_shares_concatenate_to_the_global_batch(split):
    source = _synthetic()
    full = source.read(5, 48, split, 0, 1)
    parts = [source.read(5, 48, split, i, 4) for i in range(4)]
    assert all(p.shape == (12, D) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_read_checks_split_and_process_count():
    source = _synthetic()
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'eval'\), got 'test'"):
        source.read(0, 8, "test")
    with pytest.raises(DataError, match=r"batch size 10 is not divisible by the 4 processes"):
        source.read(0, 10, "train", 0, 4)


@pytest.mark.parametrize("num_features, avg_active, exponent", [(10, 5.0, 2.0), (512, 6.0, 0.5), (10, 10.0, 2.0), (4, 2.0, 0.0)])
def test_firing_probabilities_sum_to_avg_active_and_stay_below_one(num_features, avg_active, exponent):
    p = firing_probabilities(num_features, avg_active, exponent)
    assert p.shape == (num_features,)
    assert p.sum() == pytest.approx(avg_active, rel=1e-9)
    assert p.max() <= 1.0
    assert p.min() > 0.0
    assert np.all(np.diff(p) <= 1e-12)  # non-increasing: feature 0 fires most


def test_firing_probabilities_clip_and_redistribute():
    # With exponent 2 and avg_active=5 the raw power law gives feature 0 p = 5 / 1.55 > 1.
    weights = (np.arange(10) + 1.0) ** -2.0
    assert 5.0 * weights[0] / weights.sum() > 1.0
    p = firing_probabilities(10, 5.0, 2.0)
    assert p[0] == 1.0
    assert p.sum() == pytest.approx(5.0)
    # Unclipped features keep power-law ratios.
    free = p < 1.0
    ratios = p[free] / weights[free]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-12)
    # Uniform case: every feature exactly avg_active / num_features.
    np.testing.assert_allclose(firing_probabilities(4, 2.0, 0.0), 0.5)


def test_synthetic_coefficients_follow_the_firing_probabilities():
    # d > num_features and no noise: the true coefficients of each row can be solved for.
    source = _synthetic(d=24, num_features=12, avg_active=3.0, power_law_exponent=1.0, noise_std=0.0)
    x = source.read(0, 4096).astype(np.float64)
    coeffs = np.linalg.lstsq(source.dictionary.T.astype(np.float64), x.T, rcond=None)[0].T
    active = np.abs(coeffs) > 1e-3
    assert np.all(coeffs[active] >= 0.5 - 1e-3) and np.all(coeffs[active] <= 1.5 + 1e-3)  # U[min, max]
    assert active.sum(axis=1).mean() == pytest.approx(3.0, rel=0.05)
    np.testing.assert_allclose(active.mean(axis=0), source.probabilities, atol=0.03)


def test_mean_max_cosine():
    source = _synthetic()
    true = source.dictionary
    assert mean_max_cosine(true, true) == pytest.approx(1.0, abs=1e-6)
    assert source.feature_recovery(true) == pytest.approx(1.0, abs=1e-6)
    # Permuted, rescaled copy with extra rows still recovers every feature.
    rng = np.random.default_rng(0)
    learned = np.concatenate([true[rng.permutation(len(true))] * rng.uniform(0.1, 10, (len(true), 1)),
                              rng.standard_normal((5, D))])
    assert mean_max_cosine(true, learned.astype(np.float32)) == pytest.approx(1.0, abs=1e-6)
    # Sign matters: a negated dictionary is not a recovery.
    assert mean_max_cosine(true, -true) < 0.9
    # Hand-built: e1 and e2 against the single learned row (1, 1): cos = 1/sqrt(2) each.
    e = np.eye(2, dtype=np.float32)
    assert mean_max_cosine(e, np.array([[1.0, 1.0]], np.float32)) == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    # e1 found exactly, e2 best matched by (1, 1): mean of 1 and 1/sqrt(2).
    learned = np.array([[2.0, 0.0], [1.0, 1.0], [-1.0, -3.0]], np.float32)
    assert mean_max_cosine(e, learned) == pytest.approx((1 + 1 / np.sqrt(2)) / 2, abs=1e-6)
    # Scale of the true dictionary does not matter either.
    assert mean_max_cosine(3 * e, learned) == pytest.approx((1 + 1 / np.sqrt(2)) / 2, abs=1e-6)


def test_make_source_from_config():
    config = small_config()
    source = make_source(config)
    assert isinstance(source, SyntheticSource) and set(SOURCES) == {"synthetic", "npy", "store"}
    assert source.d == 16 and source.num_features == 64
    assert source.metadata()["synthetic"]["avg_active"] == 4.0
    assert source.metadata()["d"] == 16


# ---------------------------------------------------------------------------- npy


def _npy(tmp_path, rows=100, d=D, dtype=np.float32, name="acts.npy"):
    # Row i holds the value i in every coordinate, so rows identify themselves.
    array = np.repeat(np.arange(rows, dtype=np.float64)[:, None], d, axis=1).astype(dtype)
    path = tmp_path / name
    np.save(path, array)
    return str(path), array


def _ids(batch):
    assert np.all(batch == batch[:, :1])  # still whole rows
    return batch[:, 0].astype(np.int64)


def test_npy_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data\.path '.*missing\.npy' does not exist; point data\.path at a \.npy file"):
        NpySource(str(tmp_path / "missing.npy"), D, 0, 0.1)


def test_npy_not_an_npy_file(tmp_path):
    path = tmp_path / "text.npy"
    path.write_text("not numpy")
    with pytest.raises(DataError, match=r"text\.npy is not a readable \.npy array"):
        NpySource(str(path), D, 0, 0.1)


def test_npy_one_dimensional(tmp_path):
    path = tmp_path / "flat.npy"
    np.save(path, np.zeros(64, np.float32))
    with pytest.raises(DataError, match=r"flat\.npy has shape \(64,\); expected 2-D \(tokens, d\)"):
        NpySource(str(path), D, 0, 0.1)


def test_npy_integer_dtype(tmp_path):
    path, _ = _npy(tmp_path, dtype=np.int32)
    with pytest.raises(DataError, match=r"has dtype int32; expected floating point activations"):
        NpySource(path, D, 0, 0.1)


def test_npy_wrong_dimension_suggests_the_right_one(tmp_path):
    path, _ = _npy(tmp_path, d=12)
    with pytest.raises(DataError, match=r"holds vectors of dimension 12 but sae\.d=8; set --config\.sae\.d=12"):
        NpySource(path, D, 0, 0.1)


def test_npy_all_rows_held_out(tmp_path):
    path, _ = _npy(tmp_path, rows=10)
    with pytest.raises(DataError, match=r"has 10 rows, none left for training after the eval split"):
        NpySource(path, D, 0, 0.99)


def test_npy_eval_without_eval_rows(tmp_path):
    path, _ = _npy(tmp_path, rows=10)
    source = NpySource(path, D, 0, 0.0)
    assert source.eval_rows.size == 0 and source.train_rows.size == 10
    with pytest.raises(DataError, match=r"no evaluation rows: set data\.eval_fraction > 0 or train\.eval_batches=0"):
        source.read(0, 4, "eval")


def test_npy_every_training_row_once_per_epoch(tmp_path):
    path, _ = _npy(tmp_path, rows=100)
    source = NpySource(path, D, seed=3, eval_fraction=0.2)
    train = set(source.train_rows.tolist())
    assert len(train) == 80 and source.eval_rows.size == 20
    assert train.isdisjoint(source.eval_rows.tolist())

    batch = 16  # 5 steps per epoch
    epoch0 = np.concatenate([_ids(source.read(s, batch)) for s in range(5)])
    epoch1 = np.concatenate([_ids(source.read(s, batch)) for s in range(5, 10)])
    np.testing.assert_array_equal(np.sort(epoch0), source.train_rows)
    np.testing.assert_array_equal(np.sort(epoch1), source.train_rows)
    assert not np.array_equal(epoch0, epoch1)  # a fresh permutation each epoch
    assert not np.array_equal(epoch0, source.train_rows)  # and shuffled, not file order

    # A batch size that does not divide the epoch: batches straddle epochs, the
    # positions 0..79 still hold each training row once, then epoch 1 begins.
    stream = np.concatenate([_ids(source.read(s, 30)) for s in range(6)])  # 180 positions
    np.testing.assert_array_equal(stream[:80], epoch0)
    np.testing.assert_array_equal(stream[80:160], epoch1)
    assert len(set(stream[160:].tolist())) == 20 and set(stream[160:].tolist()) <= train  # start of epoch 2


def test_npy_eval_rows_disjoint_from_train(tmp_path):
    path, _ = _npy(tmp_path, rows=100)
    source = NpySource(path, D, seed=0, eval_fraction=0.1)
    evals = np.concatenate([_ids(source.read(s, 5, "eval")) for s in range(2)])
    np.testing.assert_array_equal(np.sort(evals), source.eval_rows)  # 10 eval rows, each once
    trains = np.concatenate([_ids(source.read(s, 10)) for s in range(9)])
    assert set(evals.tolist()).isdisjoint(trains.tolist())
    # The held-out set depends on the seed.
    other = NpySource(path, D, seed=1, eval_fraction=0.1)
    assert not np.array_equal(other.eval_rows, source.eval_rows)


def test_npy_batches_are_a_pure_function_of_the_step(tmp_path):
    path, array = _npy(tmp_path, rows=100)
    a = NpySource(path, D, seed=0, eval_fraction=0.1)
    b = NpySource(path, D, seed=0, eval_fraction=0.1)
    a.read(0, 16)  # a's history must not matter
    x = a.read(7, 16)
    np.testing.assert_array_equal(x, b.read(7, 16))
    assert x.dtype == np.float32 and x.shape == (16, D)
    np.testing.assert_array_equal(x, array[_ids(x)])
    np.testing.assert_array_equal(a.read(7, 16, "eval"), b.read(7, 16, "eval"))
    assert not np.array_equal(x, NpySource(path, D, seed=1, eval_fraction=0.1).read(7, 16))
    # Process shares concatenate to the global batch.
    parts = [a.read(7, 16, "train", i, 4) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), x)


def test_npy_sample_comes_from_training_rows(tmp_path):
    path, _ = _npy(tmp_path, rows=100, dtype=np.float16)  # half precision is read as float32
    source = NpySource(path, D, seed=0, eval_fraction=0.25)
    sample = source.sample(50)
    assert sample.shape == (50, D) and sample.dtype == np.float32
    ids = _ids(sample)
    assert len(set(ids.tolist())) == 50  # without replacement
    assert set(ids.tolist()) <= set(source.train_rows.tolist())
    np.testing.assert_array_equal(sample, source.sample(50))
    # Asking for more rows than there are gives every training row.
    np.testing.assert_array_equal(np.sort(_ids(source.sample(1000))), source.train_rows)


def test_npy_from_config(tmp_path):
    path, _ = _npy(tmp_path, rows=40, d=16)
    config = small_config(**{"data.source": "npy", "data.path": path, "data.eval_fraction": 0.25,
                             "data.batch_size": 16})
    source = make_source(config)
    assert isinstance(source, NpySource)
    assert source.metadata() == {"source": source.describe(), "d": 16, "path": path, "rows": 40, "eval_rows": 10}
    assert "40 rows x d=16" in source.describe()


# ---------------------------------------------------------------------------- checks and scale


def test_check_finite_names_step_split_and_row():
    source = _synthetic()
    batch = source.read(0, 16)
    check_finite(batch, 0, "train", source)  # finite: no error
    batch[5, 2] = np.nan
    batch[9, 0] = np.inf
    with pytest.raises(DataError, match=r"^eval batch for step 42 from synthetic\(.*\) contains NaN/inf in 2 row\(s\) \(first at row 5 of the batch\)"):
        check_finite(batch, 42, "eval", source)


def test_host_batch_checks_and_scales():
    source = _synthetic()
    np.testing.assert_allclose(host_batch(source, 2, 16, 2.5), 2.5 * source.read(2, 16), rtol=1e-6)
    np.testing.assert_array_equal(host_batch(source, 2, 16, 1.0, "eval"), source.read(2, 16, "eval"))


def test_estimate_scale():
    rng = np.random.default_rng(0)
    directions = rng.standard_normal((200, 16))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    norms = np.where(np.arange(200) % 2 == 0, 1.0, 3.0)  # E||x||^2 = (1 + 9) / 2 = 5
    sample = (directions * norms[:, None]).astype(np.float32)
    scale = estimate_scale(sample)
    assert scale == pytest.approx(np.sqrt(16 / 5), rel=1e-5)
    assert np.mean(np.sum((scale * sample.astype(np.float64)) ** 2, axis=1)) == pytest.approx(16, rel=1e-5)
    with pytest.raises(DataError, match=r"cannot normalise: the data sample's mean squared norm is 0\.0"):
        estimate_scale(np.zeros((10, 16), np.float32))
    with pytest.raises(DataError, match=r"mean squared norm is (nan|inf)"):
        estimate_scale(np.full((4, 16), np.inf, np.float32))


# ---------------------------------------------------------------------------- feeder


def _sharding():
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_feeder_yields_host_batches_in_order_from_a_start_step():
    source = _synthetic()
    feeder = BatchFeeder(source, 16, _sharding(), scale=2.0, start_step=5, stop_step=9, prefetch=2)
    try:
        for step in range(5, 9):
            batch = feeder.get(step)
            assert isinstance(batch, jax.Array) and batch.shape == (16, D)
            np.testing.assert_array_equal(np.asarray(batch), host_batch(source, step, 16, 2.0))
    finally:
        feeder.close()


def test_feeder_rejects_out_of_order_requests():
    feeder = BatchFeeder(_synthetic(), 8, _sharding(), scale=1.0, start_step=3, stop_step=6, prefetch=1)
    try:
        with pytest.raises(RuntimeError, match=r"feeder out of order: asked for step 4, had step 3"):
            feeder.get(4)
    finally:
        feeder.close()


class _CorruptAt(SyntheticSource):
    """Synthetic data with a NaN in row 5 of one training step."""

    bad_step = 7

    def rows(self, step, batch_size, split, start, stop):
        x = super().rows(step, batch_size, split, start, stop)
        if step == self.bad_step:
            x = x.copy()
            x[5, 0] = np.nan
        return x


def test_feeder_raises_source_errors_in_the_consumer():
    source = _CorruptAt(d=D, num_features=32, avg_active=3.0, power_law_exponent=0.5, min_magnitude=0.5,
                        max_magnitude=1.5, noise_std=0.01, dictionary_seed=1234, seed=0)
    feeder = BatchFeeder(source, 16, _sharding(), scale=1.0, start_step=5, stop_step=10, prefetch=2)
    try:
        np.testing.assert_array_equal(np.asarray(feeder.get(5)), source.read(5, 16))
        np.testing.assert_array_equal(np.asarray(feeder.get(6)), source.read(6, 16))
        with pytest.raises(DataError, match=r"train batch for step 7 .* \(first at row 5 of the batch\)"):
            feeder.get(7)
    finally:
        feeder.close()
    assert not feeder._thread.is_alive()


def test_feeder_close_stops_a_blocked_worker():
    feeder = BatchFeeder(_synthetic(), 8, _sharding(), scale=1.0, start_step=0, stop_step=1000, prefetch=1)
    feeder.get(0)
    feeder.close()  # the worker is blocked on a full queue; close must still end it
    assert not feeder._thread.is_alive()
