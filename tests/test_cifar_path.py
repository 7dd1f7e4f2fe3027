"""A CPU smoke of the whole CIFAR-100 path of docs/reproducing.md, on generated data.

A fake `cifar-100-python.tar.gz` (the archive's format, 28 images) -> scripts/cifar100_npz.py ->
a RepDistiller-style `.pth` teacher (resnet56, seeded weights) converted with `convert_pth` and
checked against the accuracy it records (random weights: the check warns) ->
an epoch of the CRD KD config (resnet56 -> resnet20; 20 training images in batches of 8: two
full batches and a masked one of 4, as RepDistiller's DataLoader) -> evaluation.
"""

import io
import math
import pickle
import tarfile

import numpy as np
import pytest

from configs import common
from lpe import metrics_io, torch_convert, train
from scripts import cifar100_npz
from tests import repdistiller_golden as golden


def _fake_archive(path, counts=None) -> dict[str, np.ndarray]:
  """Writes a `cifar-100-python.tar.gz` of random images; returns its rows and labels by split."""
  rng = np.random.default_rng(0)
  counts = counts or {'train': 16, 'test': 8}
  rows = {}
  with tarfile.open(path, 'w:gz') as archive:
    for split, n in counts.items():
      data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
      labels = [99, *rng.integers(0, 100, n - 1).tolist()]  # 100 classes, as in CIFAR-100.
      blob = pickle.dumps({b'data': data, b'fine_labels': labels, b'coarse_labels': [0] * n})
      info = tarfile.TarInfo(f'cifar-100-python/{split}')
      info.size = len(blob)
      archive.addfile(info, io.BytesIO(blob))
      rows[split] = (data, np.array(labels))
  return rows


def test_converter_keeps_pixels_channels_and_labels(tmp_path):
  rows = _fake_archive(tmp_path / 'c.tar.gz')
  counts = cifar100_npz.convert(str(tmp_path / 'c.tar.gz'), str(tmp_path / 'c.npz'))
  assert counts == {'train': 16, 'test': 8}
  arrays = np.load(tmp_path / 'c.npz')
  data, labels = rows['train']
  images = arrays['train_images']
  assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
  # Pixel (row 1, column 2) of channel c is data[1024 * c + 32 * 1 + 2].
  assert [images[3, 1, 2, c] for c in range(3)] == [data[3, 1024 * c + 34] for c in range(3)]
  np.testing.assert_array_equal(arrays['train_labels'], labels)


def test_converter_names_a_wrong_archive(tmp_path):
  with tarfile.open(tmp_path / 'other.tar.gz', 'w:gz'):
    pass
  with pytest.raises(ValueError, match='cifar-100-python.tar.gz'):
    cifar100_npz.convert(str(tmp_path / 'other.tar.gz'), str(tmp_path / 'c.npz'))


def test_archive_to_converted_teacher_to_kd_student_to_evaluation(tmp_path):
  torch = pytest.importorskip('torch', reason='needs torch; pip install torch==2.13.0')
  _fake_archive(tmp_path / 'c.tar.gz', {'train': 20, 'test': 8})
  cifar100_npz.convert(str(tmp_path / 'c.tar.gz'), str(tmp_path / 'c.npz'))
  dataset = f'npz:{tmp_path / "c.npz"}'
  state = {k: torch.tensor(v) for k, v in golden.initial_state_dict('resnet56', 0).items()}
  # As RepDistiller saves it, with the table's accuracy, which random weights do not have.
  saved = {'model': state, 'epoch': 240, 'accuracy': torch.tensor(72.34)}
  torch.save(saved, tmp_path / 'ckpt_epoch_240.pth')
  teacher = tmp_path / 'resnet56.msgpack'
  torch_convert.convert_pth(
    str(tmp_path / 'ckpt_epoch_240.pth'),
    'resnet56',
    str(teacher),
    num_classes=100,
    dataset=dataset,
    mean=common.REPDISTILLER_CIFAR100_MEAN,
    std=common.REPDISTILLER_CIFAR100_STD,
  )
  check = torch_convert.check_accuracy(str(teacher))  # The check on import warns.
  assert check.num_examples == 8 and check.differs and check.report().startswith('WARNING')
  config = common.cifar100_kd_config('resnet56-resnet20')
  config.dataset = dataset
  config.teacher.checkpoint = str(teacher)
  config.num_epochs = 1
  config.batch_size = 8
  config.eval_batch_size = 8
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert math.isfinite(result['test_accuracy']) and 0 <= result['test_accuracy'] <= 1
  assert result['mean'] == list(common.REPDISTILLER_CIFAR100_MEAN)
  assert result['teacher']['model'] == 'resnet56'
  assert [r['step'] for r in metrics_io.read_metrics(str(tmp_path / 'run'))] == [3]
