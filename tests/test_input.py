"""The training input paths and the teacher-output cache (issue 6, items 3 and 4).

The device-resident path (the split held on the devices, each step gathering its rows there)
must give exactly the batches, and so exactly the parameters, of the host path; cached teacher
outputs must equal the teacher's per-step forward pass.
"""

import os

import jax
import numpy as np
import pytest

from lpe import checkpoint, data, feed, preflight, teacher, train
from tests import faults


def _params(workdir: str):
  return jax.tree.leaves(checkpoint.load_variables(workdir)[0])


def _run(config, workdir: str, **overrides) -> list[np.ndarray]:
  config = config.copy_and_resolve_references()
  config.update(overrides)
  train.train_and_evaluate(config, workdir)
  return _params(workdir)


def _distilling(small_config, teacher_dir):
  config = small_config.copy_and_resolve_references()
  config.teacher.model, config.teacher.checkpoint = 'cnn_student', teacher_dir
  config.distill.lp_weight, config.distill.kd_weight, config.distill.k = 0.5, 0.5, 4
  return config


def test_index_batches_are_the_batches_of_train_batches(fashion_data_dir):
  split = data.load_split('fashion_mnist', 'train', fashion_data_dir)
  kwargs = dict(batch_size=48, seed=3, epoch=2, start_step=1)
  indices = list(data.train_index_batches(len(split), **kwargs))
  batches = list(data.train_batches(split, **kwargs))
  assert len(indices) == len(batches) == len(split) // 48 - 1
  for index, (images, labels) in zip(indices, batches, strict=True):
    assert index.dtype == np.int32 and len(set(index.tolist())) == 48
    np.testing.assert_array_equal(split.images[index], images)
    np.testing.assert_array_equal(split.labels[index], labels)


def test_auto_input_holds_small_splits_on_the_device(small_config, monkeypatch):
  split = data.Split(np.zeros((10, 4, 4, 1), np.uint8), np.zeros(10, np.int32))
  assert feed.input_path(small_config, split) == 'device'  # The default is 'auto'.
  monkeypatch.setattr(feed, 'DEVICE_INPUT_MAX_BYTES', split.images.nbytes - 1)
  assert feed.input_path(small_config, split) == 'host'
  small_config.input = 'device'
  assert feed.input_path(small_config, split) == 'device'


@pytest.mark.parametrize('augment', ['none', 'cifar'])
def test_device_resident_input_trains_bitwise_like_the_host_path(
  small_config, teacher_dir, tmp_path, augment
):
  """A whole LP + KD run, without augmentation and with augmentation drawn in the step."""
  config = _distilling(small_config, teacher_dir)
  config.augment = augment
  host = _run(config, str(tmp_path / 'host'), input='host')
  device = _run(config, str(tmp_path / 'device'), input='device')
  assert len(host) == len(device)
  for a, b in zip(host, device, strict=True):
    np.testing.assert_array_equal(a, b)


def test_switching_input_path_on_resume_is_allowed_and_changes_nothing(
  small_config, tmp_path, monkeypatch
):
  reference = _run(small_config, str(tmp_path / 'reference'), input='host')
  workdir = str(tmp_path / 'switched')
  with monkeypatch.context() as patch:
    faults.sigterm_before_step(patch, 5, steps_per_epoch=8)
    with pytest.raises(train.Preempted):
      _run(small_config, workdir, input='host')
  # 'input' is resume-safe: no --allow_config_change needed.
  resumed = _run(small_config, workdir, input='device')
  for a, b in zip(reference, resumed, strict=True):
    np.testing.assert_array_equal(a, b)


def test_teacher_cache_holds_the_teachers_outputs(fashion_data_dir, teacher_dir):
  from lpe import models

  split = data.load_split('fashion_mnist', 'train', fashion_data_dir)
  info = data.dataset_info('fashion_mnist')
  teacher_module = models.build('cnn_student', 10)
  variables, _ = checkpoint.load_variables(teacher_dir)
  distill = {'lp_weight': 1.0, 'feature': 'embedding', 'at_weight': 1.0, 'at_features': ['stage1']}
  logits, features = teacher.outputs_cache(
    teacher_module, variables, split, info=info, distill=distill, batch_size=96
  )
  assert sorted(features) == ['embedding', 'stage1']
  rows = np.array([0, 7, 300, len(split) - 1])
  want_logits, want = teacher_module.apply(
    variables, data.preprocess(split.images[rows], info), train=False
  )
  assert logits.shape == (len(split), 10)
  np.testing.assert_allclose(logits[rows], want_logits, rtol=1e-5, atol=1e-5)
  for name in ('embedding', 'stage1'):
    assert features[name].shape == (len(split), *want[name].shape[1:])
    np.testing.assert_allclose(features[name][rows], want[name], rtol=1e-5, atol=1e-5)


def test_cached_teacher_outputs_train_like_the_teacher_forward(small_config, teacher_dir, tmp_path):
  """One step in each of two epochs (two shuffles of the rows the cache is indexed by).

  A teacher row given to the wrong example moves the parameters by about the learning rate at
  the first step; float32 rounding (the cache's forward is compiled apart from the step's)
  moves them by about 1e-7. Longer runs cannot tell the two apart: Adam divides by the
  gradient's running size, so a rounding-sized gradient difference near zero becomes a step of
  size lr within a few steps (on an AVX2 processor, 3e-5 after 4 steps).
  """
  config = _distilling(small_config, teacher_dir)
  config.num_epochs, config.steps_per_epoch_limit = 2, 1
  live = _run(config, str(tmp_path / 'live'))
  config.teacher.cache_outputs = True
  cached = _run(config, str(tmp_path / 'cached'))
  moved = max(float(np.abs(a).max()) for a in live)
  for a, b in zip(live, cached, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(moved, 1.0))


def test_teacher_cache_refuses_augmentation_and_oversize_before_any_write(
  small_config, teacher_dir, monkeypatch, tmp_path
):
  config = _distilling(small_config, teacher_dir)
  config.teacher.cache_outputs = True
  config.augment = 'cifar'
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match='cache_outputs=True needs config.augment=none'):
    train.train_and_evaluate(config, str(workdir))
  config.augment = 'none'
  monkeypatch.setattr(teacher, 'CACHE_MAX_BYTES', 1000)
  with pytest.raises(ValueError, match=r'would hold .* GiB of teacher outputs .* embedding'):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def test_teacher_cache_with_a_feature_the_teacher_lacks_is_a_clear_error(
  small_config, teacher_dir, tmp_path
):
  config = _distilling(small_config, teacher_dir)
  config.teacher.cache_outputs = True
  config.distill.feature = 'stage9'
  with pytest.raises(ValueError, match="has no feature 'stage9'"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_unknown_input_path_is_refused(small_config):
  small_config.input = 'gpu'
  with pytest.raises(
    ValueError, match="config.input='gpu' is unknown; use auto, device, host or stream"
  ):
    preflight.validate(small_config, 1)


def test_per_process_data_under_jit_refuses_device_held_data(small_config, monkeypatch):
  """On several processes each with its own share, sharded jit cannot hold the split (or the
  teacher cache) on the devices; 'auto' falls back to the host path."""
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  small_config.distributed.per_process_data = True
  split = data.Split(np.zeros((10, 4, 4, 1), np.uint8), np.zeros(10, np.int32))
  assert feed.input_path(small_config, split) == 'host'
  small_config.input = 'device'
  with pytest.raises(ValueError, match='config.input=device holds per-process data'):
    preflight.validate(small_config, 2)
  small_config.parallelism = 'pmap'
  preflight.validate(small_config, 2)
  assert feed.input_path(small_config, split) == 'device'


def test_teacher_cache_files_are_reused_by_later_runs(
  fashion_data_dir, teacher_dir, tmp_path, monkeypatch
):
  from lpe import models

  split = data.load_split('fashion_mnist', 'train', fashion_data_dir)
  info = data.dataset_info('fashion_mnist')
  module = models.build('cnn_student', 10)
  variables, meta = checkpoint.load_variables(teacher_dir)
  kwargs = dict(info=info, batch_size=96, cache_dir=str(tmp_path / 'cache'), teacher_id='t1')
  lp_only = {'lp_weight': 1.0, 'feature': 'embedding'}
  first = teacher.outputs_cache(module, variables, split, distill=lp_only, **kwargs)
  assert len(list((tmp_path / 'cache').iterdir())) == 2  # logits and embedding
  calls = []
  original = teacher._forward_split
  monkeypatch.setattr(teacher, '_forward_split', lambda *a: calls.append(a[4]) or original(*a))
  again = teacher.outputs_cache(module, variables, split, distill=lp_only, **kwargs)
  assert calls == []  # Read back, not recomputed.
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1]['embedding'], again[1]['embedding'])
  with_at = dict(lp_only, at_weight=1.0, at_features=['stage1'])
  teacher.outputs_cache(module, variables, split, distill=with_at, **kwargs)
  assert calls == [['stage1']]  # Only the missing feature runs the teacher.
  teacher.outputs_cache(module, variables, split, distill=lp_only, **dict(kwargs, teacher_id='t2'))
  assert calls[-1] == ['logits', 'embedding']  # Another teacher has files of its own.


def test_corrupt_teacher_cache_file_is_computed_again_and_rewritten(
  fashion_data_dir, teacher_dir, tmp_path
):
  from lpe import models

  split = data.load_split('fashion_mnist', 'train', fashion_data_dir)
  module = models.build('cnn_student', 10)
  variables, _ = checkpoint.load_variables(teacher_dir)
  kwargs = dict(
    info=data.dataset_info('fashion_mnist'),
    batch_size=96,
    cache_dir=str(tmp_path),
    teacher_id='t1',
    distill={'lp_weight': 1.0, 'feature': 'embedding'},
  )
  first = teacher.outputs_cache(module, variables, split, **kwargs)
  names = sorted(os.listdir(tmp_path))
  assert len(names) == 2 and not [n for n in names if 'tmp' in n]
  logits = str(tmp_path / next(n for n in names if '-logits-' in n))
  os.truncate(logits, os.path.getsize(logits) // 2)  # What a kill mid-write once left.
  again = teacher.outputs_cache(module, variables, split, **kwargs)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(np.load(logits), first[0])  # Rewritten whole.
  assert sorted(os.listdir(tmp_path)) == names


def test_the_batch_share_of_each_process_is_computed_once_for_both_inputs(small_config):
  """`feed.batch_share`: which rows of each global batch a process feeds, and which part of the
  split it holds, for `Feed` and `StreamFeed` alike."""
  small_config.batch_size = 64
  shares = [feed.batch_share(small_config, (i, 2)) for i in range(2)]
  assert [s.rows for s in shares] == [slice(0, 32), slice(32, 64)]
  assert all(s.index_batch == 64 and s.shard is None for s in shares)
  assert feed.batch_share(small_config) == feed.BatchShare(64, slice(0, 64), 0, None)
  small_config.distributed.per_process_data = True  # Each draws from its own shard.
  shares = [feed.batch_share(small_config, (i, 2)) for i in range(2)]
  assert [(s.index_batch, s.rows, s.first_row, s.shard) for s in shares] == [
    (32, slice(0, 32), 0, (0, 2)),
    (32, slice(0, 32), 32, (1, 2)),
  ]
  small_config.distributed.per_process_data = False
  small_config.distill.update(lp_weight=1.0, lp_graph='neighbours', neighbour_batches='added')
  # Neighbours added on top: each feeds its half of the anchors and their neighbours.
  assert feed.batch_share(small_config, (1, 2)).rows == slice(64, 128)
