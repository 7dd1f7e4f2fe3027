"""Shared fixtures: a tiny, learnable Fashion-MNIST prepared through the real offline path."""

import gzip
import os

import numpy as np
import pytest

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


@pytest.fixture(scope='module')
def persistent_compilation_cache(request):
  """JAX's persistent compilation cache, in .pytest_cache, for a module of many small runs.

  A short run is nearly all compiling (each parameter shape's init, the train and eval steps),
  and runs of the same shapes compile the same programs, so with the cache the module runs
  several times faster. It is not pruned (a size limit needs the `filelock` package):
  `pytest --cache-clear` empties it.
  """
  import jax  # Here, not at the top: nothing in conftest imports jax before the tests do.
  from jax.experimental.compilation_cache import compilation_cache

  options = {
    'jax_compilation_cache_dir': str(request.config.cache.mkdir('jax_compilation_cache')),
    'jax_persistent_cache_min_compile_time_secs': 0.0,  # Most compiles are small init ops.
  }
  previous = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # Takes the new directory even if JAX already compiled.
  yield
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
