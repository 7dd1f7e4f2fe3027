"""Tests of the input pipeline: offline preparation, caching, deterministic batches, evaluation."""

import os
import shutil

import numpy as np
import pytest

from lpe import data, metrics_io, train
from tests.conftest import TEST_SIZE, TRAIN_SIZE


def test_load_split_prepares_offline_and_caches(fashion_data_dir):
  train = data.load_split('fashion_mnist', 'train', fashion_data_dir)
  test = data.load_split('fashion_mnist', 'test', fashion_data_dir)
  assert train.images.shape == (TRAIN_SIZE, 28, 28, 1) and train.images.dtype == np.uint8
  assert test.labels.shape == (TEST_SIZE,) and test.labels.dtype == np.int32
  assert set(np.unique(train.labels)) <= set(range(10))
  cached = os.listdir(os.path.join(fashion_data_dir, 'lpe_cache'))
  assert any(name.startswith('fashion_mnist-') and 'train' in name for name in cached)
  again = data.load_split('fashion_mnist', 'train', fashion_data_dir)
  np.testing.assert_array_equal(again.images, train.images)
  np.testing.assert_array_equal(again.labels, train.labels)


@pytest.mark.parametrize('count', [2, 3])
def test_a_process_share_is_its_even_part_of_the_split(fashion_data_dir, count):
  whole = data.load_split('fashion_mnist', 'train', fashion_data_dir)
  shares = [
    data.load_split('fashion_mnist', 'train', fashion_data_dir, shard=(i, count))
    for i in range(count)
  ]
  assert {len(s) for s in shares} <= {TRAIN_SIZE // count, TRAIN_SIZE // count + 1}
  np.testing.assert_array_equal(np.concatenate([s.images for s in shares]), whole.images)
  np.testing.assert_array_equal(np.concatenate([s.labels for s in shares]), whole.labels)
  again = data.load_split('fashion_mnist', 'train', fashion_data_dir, shard=(count - 1, count))
  np.testing.assert_array_equal(again.images, shares[-1].images)  # Its own cache file.
  with pytest.raises(ValueError, match='Shard 3 of 3 does not exist'):
    data.shard_rows(10, (3, 3))


def test_two_writers_of_the_same_cache_do_not_collide(fashion_data_dir, tmp_path, monkeypatch):
  """Processes sharing a data_dir may decode and cache the same split at once: here a second
  load writes the cache while the first is between its write and its rename."""
  data_dir = tmp_path / 'data'
  shutil.copytree(fashion_data_dir, data_dir, ignore=shutil.ignore_patterns('lpe_cache'))
  replace = os.replace
  inner = []

  def replace_after_another_writer(src, dst):
    if str(src).endswith('.tmp') and str(dst).endswith('.npz') and not inner:
      inner.append(None)  # Only the first cache write lets another writer in.
      inner[0] = data.load_split('fashion_mnist', 'test', str(data_dir))
    replace(src, dst)

  monkeypatch.setattr(
    os, 'replace', replace_after_another_writer
  )  # As files.write_atomic calls it.
  outer = data.load_split('fashion_mnist', 'test', str(data_dir))
  np.testing.assert_array_equal(outer.images, inner[0].images)
  monkeypatch.undo()
  again = data.load_split('fashion_mnist', 'test', str(data_dir))  # From the cache.
  np.testing.assert_array_equal(again.labels, outer.labels)


def test_missing_dataset_says_how_to_get_it(tmp_path):
  with pytest.raises(data.DatasetUnavailableError, match='tfds build mnist'):
    data.load_split('mnist', 'train', str(tmp_path))


def test_an_unknown_dataset_name_is_one_sentence_with_close_matches(tmp_path):
  with pytest.raises(ValueError, match='is not a TFDS dataset') as error:
    data.dataset_info('fashion_mnistt', str(tmp_path))
  assert 'did you mean fashion_mnist' in str(error.value)
  assert str(error.value).count('. ') == 0 and str(error.value).endswith('?')


def _split(n):
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1)
  return data.Split(images, np.arange(n, dtype=np.int32))


def test_train_batches_are_a_function_of_seed_and_epoch():
  split = _split(100)
  first = [b[1] for b in data.train_batches(split, batch_size=32, seed=0, epoch=0)]
  again = [b[1] for b in data.train_batches(split, batch_size=32, seed=0, epoch=0)]
  other_epoch = [b[1] for b in data.train_batches(split, batch_size=32, seed=0, epoch=1)]
  other_seed = [b[1] for b in data.train_batches(split, batch_size=32, seed=1, epoch=0)]
  assert len(first) == 3  # The last partial batch is dropped in training.
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other_epoch))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other_seed))
  assert len(set(np.concatenate(first).tolist())) == 96  # No example twice in an epoch.
  resumed = [b[1] for b in data.train_batches(split, batch_size=32, seed=0, epoch=0, start_step=2)]
  np.testing.assert_array_equal(resumed[0], first[2])


def test_masked_last_batch_trains_every_example_once_and_keeps_the_other_batches():
  """'masked': ceil(100 / 32) = 4 batches of 32 rows; the first 3 are 'drop's, the last holds
  the 4 remaining examples and 28 padding rows, which `valid_rows` marks."""
  kwargs = dict(batch_size=32, seed=0, epoch=1)
  dropped = list(data.train_index_batches(100, **kwargs))
  masked = list(data.train_index_batches(100, last_batch='masked', **kwargs))
  assert data.steps_per_epoch(100, 32) == len(dropped) == 3
  assert data.steps_per_epoch(100, 32, 'masked') == len(masked) == 4
  assert all(len(b) == 32 and b.dtype == np.int32 for b in masked)
  for a, b in zip(dropped, masked[:3], strict=True):
    np.testing.assert_array_equal(a, b)
  valid = [data.valid_rows(100, 32, step) for step in range(4)]
  assert [int(v.sum()) for v in valid] == [32, 32, 32, 4] and valid[3][:4].all()
  seen = np.concatenate([b[v] for b, v in zip(masked, valid, strict=True)])
  assert sorted(seen.tolist()) == list(range(100))  # Every example exactly once.
  resumed = list(data.train_index_batches(100, last_batch='masked', start_step=3, **kwargs))
  np.testing.assert_array_equal(resumed[0], masked[3])
  # A multiple of the batch has no partial batch either way.
  assert data.steps_per_epoch(96, 32, 'masked') == data.steps_per_epoch(96, 32) == 3
  with pytest.raises(ValueError, match='use drop or masked'):
    data.steps_per_epoch(96, 32, 'keep')


@pytest.mark.parametrize('n, batch_size', [(100, 32), (96, 32), (5, 8)])
@pytest.mark.parametrize('wrap', [False, True])
def test_eval_batches_count_every_example_once(n, batch_size, wrap):
  seen, padding = [], []
  for images, labels, mask in data.eval_batches(_split(n), batch_size=batch_size, wrap=wrap):
    assert images.shape[0] == labels.shape[0] == mask.shape[0] == batch_size
    seen.extend(labels[mask].tolist())
    padding.extend(labels[~mask].tolist())
  assert sorted(seen) == list(range(n))
  pad = -n % batch_size
  # Zeros, or the split's first examples again, cyclically (5 examples in a batch of 8).
  assert padding == ([i % n for i in range(pad)] if wrap else [0] * pad)


def test_batch_larger_than_dataset_is_a_clear_error():
  with pytest.raises(ValueError, match='larger than the 10 training examples'):
    data.steps_per_epoch(10, 32)


def test_preprocess_standardises():
  info = data.dataset_info('fashion_mnist')
  x = np.full((2, 28, 28, 1), 255, np.uint8)
  out = np.asarray(data.preprocess(x, info))
  np.testing.assert_allclose(out, (1.0 - info.mean[0]) / info.std[0], rtol=1e-6)


@pytest.mark.parametrize('name', ['mnist', 'cifar10', 'cifar100'])
def test_mocked_tfds_loads_both_splits(name, tmp_path):
  import tensorflow_datasets as tfds

  info = data.dataset_info(name)
  with tfds.testing.mock_data(num_examples=16):
    splits = [data.load_split(name, split, str(tmp_path)) for split in ('train', 'test')]
  for split in splits:
    assert split.images.shape == (16, *info.image_shape) and split.images.dtype == np.uint8
    assert split.labels.shape == (16,) and split.labels.dtype == np.int32
    assert 0 <= split.labels.min() and split.labels.max() < info.num_classes
  assert not os.path.exists(tmp_path / 'lpe_cache')  # Fake records are never cached.


def test_missing_cifar100_says_how_to_get_it(tmp_path):
  with pytest.raises(data.DatasetUnavailableError, match='tfds build cifar100'):
    data.load_split('cifar100', 'train', str(tmp_path))


def test_stratified_subset_keeps_class_shares_and_is_fixed():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), [50, 30, 15, 5]).astype(np.int32)
  rng.shuffle(labels)
  split = data.Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), labels)
  subset = data.stratified_subset(split, 20, seed=7)
  assert len(subset) == 20
  assert np.bincount(subset.labels).tolist() == [10, 6, 3, 1]
  # The images come with their own labels, in the split's order, without repeats.
  index = subset.images.reshape(-1).astype(int)
  assert np.all(np.diff(index) > 0) and np.array_equal(labels[index], subset.labels)
  again = data.stratified_subset(split, 20, seed=7)
  np.testing.assert_array_equal(again.images, subset.images)
  other = data.stratified_subset(split, 20, seed=8)
  assert not np.array_equal(other.images, subset.images)
  assert len(data.stratified_subset(split, 7, seed=0)) == 7  # Remainders are handed out.
  with pytest.raises(ValueError, match='train_subset=101 must be between 1 and the 100'):
    data.stratified_subset(split, 101, seed=0)


def test_the_trainer_trains_on_the_subset(small_config, tmp_path):
  small_config.train_subset, small_config.num_epochs = 128, 1
  train.train_and_evaluate(small_config, str(tmp_path / 'subset'))
  assert metrics_io.read_metrics(str(tmp_path / 'subset'))[-1]['step'] == 2  # 128 / 64.
