"""The streaming input (issue 13, items 3 and 6): the in-memory path's batches read record by
record in worker processes, each process reading only its own records, resumed exactly.

The launch.py tests train a tiny TFDS dataset of ImageNet-like JPEGs of mixed sizes
(`conftest.prepare_tiny_images`) with random-resized crops drawn in the input workers, on 1
process and on 2 CPU processes, killed and resumed.
"""

import os
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lpe import checkpoint, data, feed, preflight, sources, stream, train
from lpe import config as config_lib
from tests import faults
from tests.conftest import TINY_IMAGES, TINY_TRAIN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir) -> list[np.ndarray]:
  return jax.tree.leaves(checkpoint.load_variables(str(workdir))[0])


def _equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _run(small_config, workdir, **overrides) -> list[np.ndarray]:
  run_config = small_config.copy_and_resolve_references()
  run_config.update(overrides)
  train.train_and_evaluate(run_config, str(workdir))
  return _params(workdir)


def test_a_streamed_run_is_bitwise_the_in_memory_run(small_config, tmp_path):
  """Fashion-MNIST without augmentation: 2 input workers give the device-resident path's run."""
  device = _run(small_config, tmp_path / 'device', input='device')
  streamed = _run(small_config, tmp_path / 'stream', input='stream', input_workers=2)
  assert _equal(device, streamed)


def test_a_preempted_streamed_run_resumes_exactly(small_config, tmp_path):
  """SIGTERM mid-epoch 1 (saved at step 6), then the same call: the uninterrupted run."""
  reference = _run(small_config, tmp_path / 'reference', input='stream')
  workdir = tmp_path / 'preempted'
  steps_per_epoch = 512 // small_config.batch_size
  with pytest.MonkeyPatch.context() as monkeypatch:
    faults.sigterm_before_step(monkeypatch, 6, steps_per_epoch, stream.StreamFeed)
    with pytest.raises(train.Preempted):
      _run(small_config, workdir, input='stream')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  assert _equal(_run(small_config, workdir, input='stream'), reference)


def _batches(source, *, processes: int, per_process: bool, augment='none', shape=(28, 28, 1)):
  """Each process's `StepBatches` for a global batch of 32 (as `StreamFeed` builds them, from
  `feed.batch_share`)."""
  config = config_lib.default_config()
  config.batch_size, config.distributed.per_process_data = 32, per_process
  out = []
  for index in range(processes):
    share = feed.batch_share(config, (index, processes))
    shard = data.shard_rows(len(source), share.shard)
    out.append(
      stream.StepBatches(
        source,
        seed=7,
        steps_per_epoch=len(shard) // share.index_batch,
        index_batch=share.index_batch,
        rows=share.rows,
        first_row=share.first_row,
        shard=shard,
        augment=augment,
        shape=shape,
      )
    )
  return out


def _source(n=200, shape=(28, 28, 1)):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
  return sources.ArraySource(images, np.arange(n) % 10)


@pytest.mark.parametrize('per_process', [False, True])
def test_each_process_reads_only_its_own_records(per_process):
  source = _source()
  (whole,) = _batches(source, processes=1, per_process=per_process)
  halves = _batches(source, processes=2, per_process=per_process)
  for step in (0, 3, 7):  # Epochs 0 and 1.
    keys = [b.keys(step) for b in halves]
    assert len(keys[0]) == len(keys[1]) == 16 and not set(keys[0]) & set(keys[1])
    if per_process:  # Each reads only from its contiguous shard of the split.
      assert set(keys[0]) <= set(range(100)) and set(keys[1]) <= set(range(100, 200))
    else:  # Each reads its rows of the one global batch.
      np.testing.assert_array_equal(np.concatenate(keys), whole.keys(step))
      images, labels = halves[1](step)
      np.testing.assert_array_equal(images, source.images[keys[1]])
      np.testing.assert_array_equal(labels, keys[1] % 10)


@pytest.mark.parametrize('augment, shape', [('cifar', (28, 28, 1)), ('imagenet', (16, 16, 3))])
def test_augmentation_depends_on_neither_workers_nor_processes(augment, shape):
  source = _source(shape=(28, 20, shape[-1]) if augment == 'imagenet' else shape)
  (whole,) = _batches(source, processes=1, per_process=False, augment=augment, shape=shape)
  halves = _batches(source, processes=2, per_process=False, augment=augment, shape=shape)
  in_process = list(stream.iterate(whole, range(2, 5), workers=0))
  by_workers = list(stream.iterate(whole, range(2, 5), workers=2))
  for step, (images, labels), (w_images, w_labels) in zip(
    range(2, 5), in_process, by_workers, strict=True
  ):
    assert images.shape == (32, *shape) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, w_images)
    np.testing.assert_array_equal(labels, w_labels)
    rows = np.concatenate([half(step)[0] for half in halves])
    np.testing.assert_array_equal(images, rows)
  plain = _batches(source, processes=1, per_process=False, shape=shape)[0](2)[0]
  assert not np.array_equal(in_process[0][0], plain)  # The images were augmented.


def test_what_needs_the_split_in_memory_is_refused_with_streaming(small_config):
  for field, value in (('teacher.cache_outputs', True), ('distill.lp_graph', 'neighbours')):
    run_config = small_config.copy_and_resolve_references()
    run_config.update_from_flattened_dict({'input': 'stream', field: value})
    run_config.distill.lp_weight = 0.1
    with pytest.raises(ValueError, match=f'config.{field}=.* needs the whole training split'):
      preflight.validate(run_config, 1)
  small_config.augment = 'imagenet'
  with pytest.raises(ValueError, match="augment='imagenet' .* config.image_size > 0"):
    preflight.validate(small_config, 1)


# --- launch.py: ImageNet-like JPEGs, 1 and 2 processes, killed and resumed -----------------------


def _launch(workdir, data_dir, devices, extra=()) -> subprocess.Popen:
  # The environment carries the suite's compilation cache (tests/conftest.py).
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  flags = [
    '--config=configs/fashion_mnist_student.py',
    f'--workdir={workdir}',
    f'--config.dataset={TINY_IMAGES}',
    f'--config.data_dir={data_dir}',
    '--config.image_size=32',
    '--config.augment=imagenet',  # Random-resized crops, drawn in the input workers.
    '--config.input_workers=1',
    '--config.num_epochs=2',
    '--config.batch_size=16',
    '--config.eval_batch_size=12',
    '--config.log_every_steps=1',
    '--config.checkpoint_every_steps=2',
    f'--config.cpu_devices={devices}',  # Every device, though the model is small.
  ]
  return subprocess.Popen(
    [sys.executable, os.path.join(REPO, 'launch.py'), *flags, *extra],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,  # Its own process group, input workers included.
  )


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _processes(workdir, data_dir, count: int) -> list[subprocess.Popen]:
  if count == 1:
    return [_launch(workdir, data_dir, 2)]
  cluster = [
    f'--config.distributed.coordinator_address=127.0.0.1:{_free_port()}',
    f'--config.distributed.num_processes={count}',
  ]
  return [
    _launch(workdir, data_dir, 2 // count, [*cluster, f'--config.distributed.process_id={i}'])
    for i in range(count)
  ]


def _kill_at(procs: list[subprocess.Popen], line: str) -> str:
  """SIGKILLs every process's group when process 0 prints `line`; returns its output."""
  lines = []
  for text in procs[0].stdout:
    lines.append(text)
    if text.startswith(line):
      for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)
      break
  for proc in procs:
    proc.communicate(timeout=120)
  return ''.join(lines)


def _finish(procs: list[subprocess.Popen]) -> str:
  outs = [proc.communicate(timeout=600)[0] for proc in procs]
  for proc, out in zip(procs, outs, strict=True):
    assert proc.returncode == 0, out
  return outs[0]


def test_imagenet_like_jpegs_stream_through_launch_killed_and_resumed(tiny_images_dir, tmp_path):
  """Uninterrupted on 1 process x 2 devices; killed mid-epoch and rerun on 1 process, and on 2
  processes x 1 device: every run ends with bitwise the same parameters."""
  steps = TINY_TRAIN // 16
  reference = tmp_path / 'reference'
  out = _finish(_processes(reference, tiny_images_dir, 1))
  assert f'epoch 2/2 step {steps}/{steps}' in out, out
  for count in (1, 2):
    workdir = tmp_path / f'killed_{count}'
    procs = _processes(workdir, tiny_images_dir, count)
    out = _kill_at(procs, f'[student] epoch 2/2 step {steps - 1}/{steps}')
    assert procs[0].returncode == -signal.SIGKILL, out
    out = _finish(_processes(workdir, tiny_images_dir, count))
    # From the last complete save (step 10's may have been cut short): mid-epoch 2 either way.
    assert any(f'Resuming {workdir} from step {s}.' in out for s in (8, 10)), out
    assert _equal(_params(workdir), _params(reference)), count
