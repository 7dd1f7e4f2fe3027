"""Shared fixtures: a tiny, learnable Fashion-MNIST prepared through the real offline path."""

import os
import pathlib

from lpe import xla_cpu

xla_cpu.configure()  # Before any test imports JAX: the suite runs with the trainer's flags.

# One persistent XLA compilation cache for the suite's processes (pytest-xdist's workers and
# the launch.py runs the tests start, which inherit the environment): the same steps compile once.
# Set before JAX starts; a cache of your own (JAX_COMPILATION_CACHE_DIR) is kept.
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR',
  str(pathlib.Path(__file__).resolve().parent.parent / '.pytest_cache' / 'jax_compilation'),
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import gzip  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The inner-loop subset (`pytest -m quick -n auto`): unit tests that train no whole run and start
# no process. The README's test command and CI run every test.
QUICK_FILES = frozenset(
  {
    'test_augment.py',
    'test_baseline_losses.py',
    'test_config.py',
    'test_data.py',
    'test_locality_loss.py',
    'test_loss_bad_input.py',
    'test_loss_properties.py',
    'test_objectives.py',
    'test_sources.py',
    'test_xla_cpu.py',
  }
)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.path.name in QUICK_FILES:
      item.add_marker(pytest.mark.quick)
  # The whole runs first and the many short unit tests last, so that pytest-xdist's workers
  # finish together instead of one waiting for a long run handed out at the end.
  items.sort(key=lambda item: item.path.name in QUICK_FILES)


@pytest.fixture(scope='session', autouse=True)
def _temporary_files_under_pytests_base_temp(tmp_path_factory):
  """Points tempfile, here and in the processes the tests start, at a folder under pytest's base
  temp, which pytest prunes: tfds makes an empty temporary folder each time it opens a dataset
  not prepared yet (`DatasetInfo.initialize_from_bucket`) and never removes it, hundreds a run."""
  import tempfile

  folder = str(tmp_path_factory.mktemp('tmp'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('TMPDIR', folder)
    patch.setattr(tempfile, 'tempdir', folder)
    yield


TRAIN_SIZE, TEST_SIZE = 512, 130  # The test split does not divide by typical batch sizes.


def _write_idx(folder: str, prefix: str, n: int, seed: int) -> None:
  """Writes IDX files whose images carry their class as a bright horizontal band, plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.uint8)
  images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
  for i, label in enumerate(labels):
    images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 220
  with gzip.open(os.path.join(folder, f'{prefix}-images-idx3-ubyte.gz'), 'wb') as f:
    f.write(np.array([0, 0, 8, 3], np.uint8).tobytes())
    f.write(np.array([n, 28, 28], '>i4').tobytes())
    f.write(images.tobytes())
  with gzip.open(os.path.join(folder, f'{prefix}-labels-idx1-ubyte.gz'), 'wb') as f:
    f.write(np.array([0, 0, 8, 1], np.uint8).tobytes())
    f.write(np.array([n], '>i4').tobytes())
    f.write(labels.tobytes())


@pytest.fixture(scope='session')
def fashion_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding a tiny `fashion_mnist`, prepared from IDX files like Debian's."""
  from lpe import data

  root = tmp_path_factory.mktemp('fashion')
  idx_dir = root / 'idx'
  idx_dir.mkdir()
  _write_idx(str(idx_dir), 'train', TRAIN_SIZE, seed=1)
  _write_idx(str(idx_dir), 't10k', TEST_SIZE, seed=2)
  data_dir = str(root / 'tfds')
  data.prepare_fashion_mnist_from_idx(data_dir, idx_dir=str(idx_dir))
  return data_dir


@pytest.fixture
def small_config(fashion_data_dir):
  """The student config shrunk to run in seconds on the tiny dataset."""
  from configs import fashion_mnist_student

  config = fashion_mnist_student.get_config()
  config.data_dir = fashion_data_dir
  config.num_epochs = 2
  config.batch_size = 64
  config.eval_batch_size = 50
  config.log_every_steps = 4
  config.checkpoint_every_steps = 3
  config.learning_rate = 3e-3
  return config


@pytest.fixture(scope='session')
def teacher_dir(fashion_data_dir, tmp_path_factory) -> str:
  """A `cnn_student` trained 3 steps on the tiny dataset, as a teacher workdir."""
  from configs import fashion_mnist_student
  from lpe import train

  config = fashion_mnist_student.get_config()
  config.data_dir, config.num_epochs, config.steps_per_epoch_limit = fashion_data_dir, 1, 3
  config.batch_size, config.eval_batch_size = 64, 50
  workdir = str(tmp_path_factory.mktemp('teacher') / 'run')
  train.train_and_evaluate(config, workdir)
  return workdir


def _band_image(rng, label: int, height: int, width: int, channels: int) -> np.ndarray:
  """Noise with a bright horizontal band whose height says the class (as `_write_idx`)."""
  image = rng.integers(0, 60, (height, width, channels)).astype(np.uint8)
  top = (2 + 3 * label) * height // 32
  image[top : top + max(1, height // 10), width // 8 : -width // 8 or None] = 220
  return image


def write_image_folder(root, *, classes=3, per_class=(12, 4), sizes=((20, 20),), seed=0) -> str:
  """`root/{train,test}/class_<i>/<n>.png|.jpg`: RGB images of `sizes` (cycled), PNG and JPEG."""
  import PIL.Image

  rng = np.random.default_rng(seed)
  for split, count in zip(('train', 'test'), per_class, strict=True):
    for label in range(classes):
      folder = os.path.join(root, split, f'class_{label}')
      os.makedirs(folder, exist_ok=True)
      for i in range(count):
        h, w = sizes[i % len(sizes)]
        pil = PIL.Image.fromarray(_band_image(rng, label, h, w, 3))
        pil.save(os.path.join(folder, f'{i}.{"png" if i % 2 else "jpg"}'), quality=95)
  return str(root)


def write_npz(path, *, classes=3, train=48, test=12, shape=(16, 16, 1), seed=0) -> str:
  """One .npz with train/test images and labels, learnable like the other fixtures."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in (('train', train), ('test', test)):
    labels = np.arange(n) % classes
    arrays[f'{split}_images'] = np.stack([_band_image(rng, c, *shape) for c in labels])
    arrays[f'{split}_labels'] = labels.astype(np.int64)
  np.savez(path, **arrays)
  return str(path)


TINY_IMAGES = 'lpe_tiny_images'  # A TFDS dataset of ImageNet-like JPEGs of mixed sizes.
TINY_TRAIN, TINY_TEST, TINY_CLASSES = 96, 24, 4


def prepare_tiny_images(data_dir: str) -> None:
  """Prepares `TINY_IMAGES` in TFDS's array_record format in `data_dir`: RGB JPEGs from 24 to 64
  pixels a side, any aspect ratio, read back like any prepared TFDS dataset (by name)."""
  import io

  import PIL.Image
  import tensorflow_datasets as tfds

  def jpeg(image):
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format='JPEG', quality=90)
    buffer.seek(0)
    return buffer  # Stored as these bytes: TFDS does not re-encode a file object.

  class TinyImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = TINY_IMAGES
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      features = tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=TINY_CLASSES),
        }
      )
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {
        'train': self._generate_examples(TINY_TRAIN, seed=3),
        'test': self._generate_examples(TINY_TEST, seed=4),
      }

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        label = i % TINY_CLASSES
        h, w = (int(x) for x in rng.integers(24, 65, 2))
        yield i, {'image': jpeg(_band_image(rng, label, h, w, 3)), 'label': label}

  TinyImages(data_dir=data_dir, file_format='array_record').download_and_prepare()


@pytest.fixture(scope='session')
def tiny_images_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding `TINY_IMAGES`."""
  data_dir = str(tmp_path_factory.mktemp('tiny_images'))
  prepare_tiny_images(data_dir)
  return data_dir
