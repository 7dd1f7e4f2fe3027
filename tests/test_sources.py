"""The dataset forms (issue 13, item 2): any TFDS image-classification dataset by name, a folder
of class-named images (`folder:PATH`) and one .npz (`npz:PATH`), with their errors; a folder and
an .npz dataset train through launch.py."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from lpe import data, sources
from tests.conftest import (
  TINY_CLASSES,
  TINY_IMAGES,
  TINY_TRAIN,
  write_image_folder,
  write_npz,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_folder_dataset_reads_sorted_classes_and_both_splits(tmp_path):
  root = write_image_folder(tmp_path / 'pets', classes=3, per_class=(4, 2), sizes=((20, 24),))
  os.rename(os.path.join(root, 'train', 'class_0'), os.path.join(root, 'train', 'zebra'))
  os.rename(os.path.join(root, 'test', 'class_0'), os.path.join(root, 'test', 'zebra'))
  info = data.dataset_info(f'folder:{root}')
  assert info.num_classes == 3 and info.image_shape == (20, 24, 3)
  train = data.load_split(f'folder:{root}', 'train')
  assert train.images.shape == (12, 20, 24, 3) and train.images.dtype == np.uint8
  # Classes sorted by name: class_1, class_2, zebra.
  np.testing.assert_array_equal(train.labels, np.repeat([0, 1, 2], 4))
  assert len(data.load_split(f'folder:{root}', 'test')) == 6
  pixels = train.images.reshape(-1, 3) / 255.0  # Every train image, so the exact constants.
  np.testing.assert_allclose(info.mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(info.std, pixels.std(0), rtol=1e-5)
  assert os.listdir(os.path.join(root, 'lpe_cache')) == ['folder-train-stats-20x24.json']


def test_a_folder_of_mixed_sizes_needs_image_size(tmp_path):
  root = write_image_folder(tmp_path / 'mixed', sizes=((20, 20), (30, 16)))
  with pytest.raises(ValueError, match='mixes image sizes .* set config.image_size'):
    data.dataset_info(f'folder:{root}')
  info = data.dataset_info(f'folder:{root}', image_size=12)
  assert info.image_shape == (12, 12, 3)
  split = data.load_split(f'folder:{root}', 'train', image_size=12)
  assert split.images.shape == (36, 12, 12, 3)


def test_an_empty_class_folder_is_named(tmp_path):
  root = write_image_folder(tmp_path / 'empty', classes=2)
  os.makedirs(os.path.join(root, 'train', 'nothing_here'))
  with pytest.raises(ValueError, match='nothing_here holds no PNG or JPEG images; add some or'):
    data.dataset_info(f'folder:{root}')


def test_an_npz_dataset_and_its_errors(tmp_path):
  path = write_npz(tmp_path / 'd.npz', classes=3, train=30, test=9, shape=(16, 16, 1))
  info = data.dataset_info(f'npz:{path}')
  assert info.num_classes == 3 and info.image_shape == (16, 16, 1)
  split = data.load_split(f'npz:{path}', 'test')
  assert split.images.shape == (9, 16, 16, 1) and split.labels.dtype == np.int32
  with np.load(path) as f:
    arrays = dict(f)
  np.savez(tmp_path / 'bad.npz', **dict(arrays, test_labels=arrays['test_labels'] + 5))
  with pytest.raises(ValueError, match='test_labels run from 5 to 7, out of the range 0..2'):
    data.dataset_info(f'npz:{tmp_path / "bad.npz"}')
  np.savez(tmp_path / 'float.npz', **dict(arrays, train_images=arrays['train_images'] / 255))
  with pytest.raises(ValueError, match='train_images must be uint8'):
    data.dataset_info(f'npz:{tmp_path / "float.npz"}')


def test_any_prepared_tfds_dataset_by_name(tiny_images_dir):
  with pytest.raises(ValueError, match='images differ in size; set config.image_size'):
    data.dataset_info(TINY_IMAGES, tiny_images_dir)
  info = data.dataset_info(TINY_IMAGES, tiny_images_dir, image_size=32)
  assert info.num_classes == TINY_CLASSES and info.image_shape == (32, 32, 3)
  cached = os.path.join(tiny_images_dir, 'lpe_cache', f'{TINY_IMAGES}-train-stats-32x32.json')
  with open(cached) as f:
    assert tuple(json.load(f)['mean']) == info.mean  # Computed once, then read back.
  given = data.dataset_info(TINY_IMAGES, tiny_images_dir, image_size=32, mean=(0.5,) * 3)
  assert given.mean == (0.5,) * 3 and given.std == info.std
  split = data.load_split(TINY_IMAGES, 'train', tiny_images_dir, image_size=32)
  assert split.images.shape == (TINY_TRAIN, 32, 32, 3)


def test_an_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  with pytest.raises(data.DatasetUnavailableError, match='tfds build imagenet2012 .*manual_dir'):
    data.load_split('imagenet2012', 'train', str(tmp_path))
  # Its classes come from TFDS's code, so a config with its constants is checked without the data.
  info = data.dataset_info(
    'imagenet2012',
    str(tmp_path),
    image_size=224,
    mean=sources.IMAGENET_MEAN,
    std=sources.IMAGENET_STD,
  )
  assert info.num_classes == 1000 and info.image_shape == (224, 224, 3)


def _launch(args: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, os.path.join(REPO, 'launch.py'), *args],
    cwd=REPO,
    env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'),
    capture_output=True,
    text=True,
    timeout=600,
  )


@pytest.mark.parametrize('form', ['folder', 'npz'])
def test_a_folder_or_npz_dataset_trains_through_launch(tmp_path, form):
  if form == 'folder':
    dataset = f'folder:{write_image_folder(tmp_path / "images", per_class=(16, 4))}'
  else:
    dataset = f'npz:{write_npz(tmp_path / "images.npz", train=48, test=12)}'
  workdir = tmp_path / 'run'
  flags = [
    '--config=configs/fashion_mnist_student.py',
    f'--workdir={workdir}',
    f'--config.dataset={dataset}',
    '--config.num_epochs=2',
    '--config.batch_size=16',
    '--config.eval_batch_size=12',
  ]
  proc = _launch(flags)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(workdir / 'result.json') as f:
    result = json.load(f)
  assert result['dataset'] == dataset and result['num_classes'] == 3
  assert 0 <= result['test_accuracy'] <= 1
  evaluated = _launch(['--mode=evaluate', f'--workdir={workdir / "model.msgpack"}'])
  assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
  assert json.loads(evaluated.stdout)['accuracy'] == result['test_accuracy']


def test_a_wrong_tfds_name_fails_in_one_sentence(tmp_path):
  proc = _launch(
    [
      '--config=configs/fashion_mnist_student.py',
      f'--workdir={tmp_path / "run"}',
      '--config.dataset=cifar_10',
      f'--config.data_dir={tmp_path}',
    ]
  )
  assert proc.returncode == 1
  lines = (proc.stdout + proc.stderr).strip().splitlines()
  assert lines[-1].startswith("Error: config.dataset='cifar_10' is not a TFDS dataset"), lines
  assert 'did you mean cifar10' in lines[-1]


# Split slices (issue 19): every form reads `train[:90%]` and the like, with TFDS's rounding.
SLICES = [
  'train',
  'train[:90%]',
  'train[90%:]',
  'train[10%:]',
  'train[:33%]',
  'train[33.5%:66.5%]',
  'train[-10%:]',
  'train[:-5]',
  'train[3:]',
  'train[2:5]',
  'train[:3200]',
  'train[3200:]',
  'train[100:200]',
]


@pytest.mark.parametrize('n', [7, 25, 99, 101, 3201])
def test_split_rows_select_what_tfds_selects(n):
  import types

  import tensorflow_datasets as tfds

  infos = {'train': types.SimpleNamespace(num_examples=n)}
  for expression in SLICES:
    try:
      (absolute,) = tfds.core.ReadInstruction.from_spec(expression).to_absolute(infos)
      expected = range(n)[absolute.from_ : absolute.to]
    except ValueError:  # Out of range for TFDS: so it must be here.
      expected = range(0)
    if not expected:  # TFDS reads nothing; lpe stops instead.
      with pytest.raises(ValueError, match=re.escape(expression)):
        sources.split_rows(expression, {'train': n}, 'npz:d.npz')
      continue
    name, rows = sources.split_rows(expression, {'train': n}, 'npz:d.npz')
    assert name == 'train' and range(n)[rows] == expected, (n, expression)


def test_npz_and_folder_splits_take_slices(tmp_path):
  path = write_npz(tmp_path / 'd.npz', classes=3, train=40, test=9)
  whole = data.load_split(f'npz:{path}', 'train')
  head = data.load_split(f'npz:{path}', 'train[:90%]')
  tail = data.load_split(f'npz:{path}', 'train[90%:]')
  assert (len(head), len(tail)) == (36, 4)
  np.testing.assert_array_equal(np.concatenate([head.images, tail.images]), whole.images)
  np.testing.assert_array_equal(
    data.load_split(f'npz:{path}', 'train[10:20]').labels, whole.labels[10:20]
  )
  assert len(sources.open_split(f'npz:{path}', 'test[-3:]')) == 3  # The streamed input's reader.
  root = write_image_folder(tmp_path / 'images', classes=3, per_class=(4, 2))
  folder = f'folder:{root}'
  whole = data.load_split(folder, 'train')
  half = data.load_split(folder, 'train[6:]')
  np.testing.assert_array_equal(half.images, whole.images[6:])
  np.testing.assert_array_equal(half.labels, whole.labels[6:])
  # Constants computed from a slice are cached under the slice, beside those of the whole split.
  info = data.dataset_info(folder, train_split='train[6:]')
  np.testing.assert_allclose(info.mean, half.images.reshape(-1, 3).mean(0) / 255, rtol=1e-6)
  assert data.dataset_info(folder).mean != info.mean
  assert sorted(os.listdir(os.path.join(root, 'lpe_cache'))) == [
    'folder-train-stats-20x20.json',
    'folder-train_6--stats-20x20.json',
  ]


@pytest.mark.parametrize(
  'split, problem',
  [
    ('train[:abc]', 'is not a split name nor a TFDS slice'),
    ('valid', "has no split 'valid'"),
    ('train[:41]', 'reaches past the 40 examples of train'),
    ('train[:101%]', 'reaches past the 40 examples of train'),
    ('train[10:50%]', 'mixes a percentage and an example count'),
    ('train[20:10]', 'selects none of the 40 examples'),
    ('train[:]', 'has an empty slice'),
  ],
)
def test_a_bad_split_is_one_sentence_naming_it_and_the_valid_forms(tmp_path, split, problem):
  path = write_npz(tmp_path / 'd.npz', classes=3, train=40, test=9)
  with pytest.raises(ValueError, match=re.escape(problem)) as error:
    data.load_split(f'npz:{path}', split)
  message = str(error.value)
  assert repr(split) in message and message.endswith(f'{sources.SPLIT_FORMS}.')
  assert message.count('. ') == 0, message


# Bad user files (issue 19): one sentence naming the file and the fix, or a warning.
def test_a_corrupt_or_foreign_image_file_is_named(tmp_path):
  root = write_image_folder(tmp_path / 'images', classes=2, per_class=(4, 2))
  notes = os.path.join(root, 'train', 'class_1', 'notes.png')
  with open(notes, 'w') as f:
    f.write('not an image')
  with pytest.raises(ValueError, match=re.escape(f'{notes} is not a readable PNG or JPEG image')):
    data.dataset_info(f'folder:{root}')
  os.remove(notes)
  sources._folder_index.cache_clear()  # The listing is cached per process.
  png = os.path.join(root, 'test', 'class_0', '1.png')
  with open(png, 'rb') as f:
    whole = f.read()
  with open(png, 'wb') as f:  # A cut-off download: the header reads, the pixels do not.
    f.write(whole[: len(whole) // 2])
  assert data.dataset_info(f'folder:{root}').num_classes == 2
  with pytest.raises(ValueError, match=re.escape(f'{png} is not a readable')) as error:
    data.load_split(f'folder:{root}', 'test')
  assert str(error.value).endswith('remove or replace it.')


def test_an_npz_that_is_not_one_or_holds_objects_is_named(tmp_path):
  expected = re.escape(sources.NPZ_ARRAYS)
  text = tmp_path / 'notes.npz'
  text.write_text('train_images,train_labels\n')
  with pytest.raises(ValueError, match=f'npz:{text} is not a readable .npz file.*{expected}'):
    data.dataset_info(f'npz:{text}')
  single = tmp_path / 'single.npz'
  with open(single, 'wb') as f:
    np.save(f, np.zeros((2, 4, 4, 1), np.uint8))  # An .npy under an .npz name.
  with pytest.raises(ValueError, match=f'npz:{single} is not a readable .npz file'):
    data.dataset_info(f'npz:{single}')
  pickled = tmp_path / 'pickled.npz'
  images = np.zeros((4, 4, 4, 1), np.uint8)
  np.savez(pickled, train_images=images, train_labels=np.array([0, 1, 0, 1], dtype=object))
  with pytest.raises(ValueError, match=f'holds train_labels as pickled Python objects.*{expected}'):
    data.dataset_info(f'npz:{pickled}')


def test_labels_that_leave_classes_empty_are_warned_about(tmp_path, caplog):
  good = write_npz(tmp_path / 'good.npz', classes=3)
  assert data.dataset_info(f'npz:{good}').num_classes == 3
  assert not caplog.records
  with np.load(good) as f:
    arrays = dict(f)
  arrays['train_labels'] = 100 + np.arange(len(arrays['train_labels'])) % 10
  arrays['test_labels'] = 100 + np.arange(len(arrays['test_labels'])) % 10
  np.savez(tmp_path / 'offset.npz', **arrays)
  with caplog.at_level('WARNING'):
    info = data.dataset_info(f'npz:{tmp_path / "offset.npz"}')
  assert info.num_classes == 110  # Still trains, as before: the warning only says so.
  (record,) = caplog.records
  assert record.levelname == 'WARNING'
  assert (
    'train_labels run from 100 to 109, so the classifier head will have 110 classes with only '
    '10 of them used; number the classes 0..9' in record.getMessage()
  )
