"""Tests of `lpe.models.from_torch` and `lpe.torch_convert`.

Without torch: the key mapping, the layouts and every error, on NumPy state_dicts. With torch
2.13.0 (`pip install torch==2.13.0`): PyTorch twins of the source nets (tests/torch_twins.py)
with random weights and random BatchNorm statistics, converted, must give the same logits and
embedding in eval mode; a .pth file round-trips through `convert_pth` and `load_variables`.
"""

import argparse
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lpe import checkpoint, data, torch_convert
from lpe import teacher as teacher_lib
from lpe.models import build, from_torch, names
from lpe.models.from_torch import SOURCES, torch_keys

TORCH_REASON = 'needs torch; install it with `pip install torch==2.13.0`'


def numpy_state_dict(name: str, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random arrays under every PyTorch key of `name`, plus BN's `num_batches_tracked`."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in torch_keys(name, num_classes).values():
    state[key] = rng.normal(size=shape).astype(np.float32)
    if key.endswith('running_var'):
      state[key.replace('running_var', 'num_batches_tracked')] = np.array(7)
  return state


def test_every_source_is_a_registered_model():
  assert set(SOURCES) <= set(names())


def test_layouts_and_tree_match_model_init():
  state = numpy_state_dict('resnet8', 10)
  variables = from_torch('resnet8', state)
  model = build('resnet8', 10)
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  shape_of = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)
  assert shape_of(variables) == shape_of(expected)
  params, stats = variables['params'], variables['batch_stats']
  np.testing.assert_array_equal(
    params['layer2_0']['conv1']['kernel'], state['layer2.0.conv1.weight'].transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(
    params['layer2_0']['shortcut_conv']['kernel'],
    state['layer2.0.downsample.0.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(params['fc']['kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(params['fc']['bias'], state['fc.bias'])
  np.testing.assert_array_equal(
    params['layer3_0']['shortcut_bn']['scale'], state['layer3.0.downsample.1.weight']
  )
  np.testing.assert_array_equal(stats['bn1']['mean'], state['bn1.running_mean'])
  np.testing.assert_array_equal(stats['layer1_0']['bn2']['var'], state['layer1.0.bn2.running_var'])


def test_vgg_and_mobilenet_keys_follow_their_sequentials():
  vgg = torch_keys('vgg13', 100)
  assert vgg['params', 'block1_conv1', 'kernel'] == ('block1.3.weight', (128, 128, 3, 3))
  assert vgg['params', 'block1_conv1', 'bias'] == ('block1.3.bias', (128,))
  assert vgg['batch_stats', 'block1_bn1', 'mean'] == ('block1.4.running_mean', (128,))
  mobilenet = torch_keys('imagenet_mobilenet_v2', 1000)
  # Block 0 has no expansion conv, so its depthwise conv is conv.0; later blocks' is conv.1.
  assert mobilenet['params', 'group0_0', 'depthwise', 'kernel'] == (
    'features.1.conv.0.0.weight',
    (32, 1, 3, 3),
  )
  assert mobilenet['params', 'group1_1', 'project_bn', 'scale'] == (
    'features.3.conv.3.weight',
    (24,),
  )
  assert mobilenet['params', 'conv2', 'kernel'] == ('features.18.0.weight', (1280, 320, 1, 1))
  assert mobilenet['params', 'classifier', 'kernel'] == ('classifier.1.weight', (1000, 1280))


def test_data_parallel_prefix_is_removed():
  state = numpy_state_dict('wrn_16_1', 10)
  plain = from_torch('wrn_16_1', state)
  prefixed = from_torch('wrn_16_1', {f'module.{k}': v for k, v in state.items()})
  jax.tree.map(np.testing.assert_array_equal, prefixed, plain)


def test_converted_arrays_do_not_share_memory_with_the_state_dict():
  state = numpy_state_dict('resnet8', 10)
  variables = from_torch('resnet8', state)
  before = jax.tree.map(np.copy, variables)
  for value in state.values():
    value[...] = 0  # What training the PyTorch model on after converting would do in place.
  jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_missing_key_is_named():
  state = numpy_state_dict('resnet8', 10)
  del state['layer1.0.bn2.running_mean']
  with pytest.raises(ValueError, match=r'missing layer1\.0\.bn2\.running_mean; unused none'):
    from_torch('resnet8', state)


def test_unused_key_is_named():
  state = numpy_state_dict('resnet8', 10)
  state['layer4.0.conv1.weight'] = np.zeros((1, 1, 1, 1))
  with pytest.raises(ValueError, match=r'missing none; unused layer4\.0\.conv1\.weight'):
    from_torch('resnet8', state)


def test_wrong_depth_lists_missing_keys_with_a_count():
  with pytest.raises(ValueError, match=r"lpe 'resnet20'.*missing .* and \d+ more; unused none"):
    from_torch('resnet20', numpy_state_dict('resnet8', 10))


def test_wrong_shape_is_named_with_both_shapes():
  state = numpy_state_dict('resnet8', 10)
  state['layer1.0.conv2.weight'] = np.zeros((16, 16, 5, 5), np.float32)
  with pytest.raises(
    ValueError,
    match=r'layer1\.0\.conv2\.weight has shape \(16, 16, 5, 5\) where lpe needs '
    r'\(16, 16, 3, 3\)',
  ):
    from_torch('resnet8', state)


def test_unknown_model_missing_classifier_and_class_mismatch():
  state = numpy_state_dict('resnet8', 10)
  with pytest.raises(ValueError, match=r"model 'MobileNetV2'; from_torch converts: .*resnet8"):
    from_torch('MobileNetV2', state)
  with pytest.raises(ValueError, match=r"no 'classifier.weight'.*vgg8"):
    from_torch('vgg8', state)
  with pytest.raises(ValueError, match=r'classifies into 10 classes .* not num_classes=100'):
    from_torch('resnet8', state, num_classes=100)


def test_convert_pth_without_torch_says_how_to_install_it(monkeypatch, tmp_path):
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError.
  with pytest.raises(ImportError, match=r'pip install torch==2\.13\.0'):
    torch_convert.convert_pth(
      str(tmp_path / 'a.pth'),
      'resnet8',
      str(tmp_path / 'm.msgpack'),
      num_classes=10,
      dataset='cifar10',
    )


def test_convert_pth_checks_classes_against_the_dataset(tmp_path):
  with pytest.raises(ValueError, match=r'num_classes=10 but cifar100 has 100 classes'):
    torch_convert.convert_pth(
      str(tmp_path / 'a.pth'),
      'resnet8',
      str(tmp_path / 'm.msgpack'),
      num_classes=10,
      dataset='cifar100',
    )


# With torch: (lpe name, twin factory, image side). Deep nets are included (resnet110, wrn_40_2)
# because a converter error would compound over depth; ImageNet nets run on small images, one of
# odd side (PyTorch floors odd sizes in its strided convs and pools; lpe must too).
TWIN_CASES = {
  'resnet56': (lambda twins: twins.repdistiller_resnet(56, [16, 16, 32, 64], 100), 32),
  'resnet110': (lambda twins: twins.repdistiller_resnet(110, [16, 16, 32, 64], 100), 32),
  'resnet32x4': (lambda twins: twins.repdistiller_resnet(32, [32, 64, 128, 256], 100), 32),
  'ResNet50': (lambda twins: twins.repdistiller_resnet50(100), 32),
  'wrn_40_2': (lambda twins: twins.WideResNet(40, 2, 100), 32),
  'vgg13': (lambda twins: twins.VGG(13, 100), 32),
  'imagenet_resnet18': (lambda twins: twins.torchvision_resnet(18, 1000), 65),
  'imagenet_resnet34': (lambda twins: twins.torchvision_resnet(34, 1000), 64),
  'imagenet_resnet50': (lambda twins: twins.torchvision_resnet(50, 1000), 64),
  'imagenet_mobilenet_v2': (lambda twins: twins.MobileNetV2(1000), 64),
}


@pytest.fixture(scope='module')
def twins():
  pytest.importorskip('torch', reason=TORCH_REASON)
  from tests import torch_twins

  return torch_twins


def assert_close_on_logit_scale(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize('name', sorted(TWIN_CASES))
def test_converted_twin_computes_the_same_logits_and_embedding(twins, name):
  import torch

  make, side = TWIN_CASES[name]
  net = twins.randomize(make(twins), seed=0)
  images = np.random.default_rng(1).normal(size=(2, 3, side, side)).astype(np.float32)
  with torch.no_grad():
    want_logits, want_embedding = (t.numpy() for t in net(torch.from_numpy(images)))
  variables = from_torch(name, net.state_dict())
  model = build(name, want_logits.shape[1])
  # Compiled whole: faster on CPU than running the layers one by one.
  logits, features = jax.jit(model.apply)(variables, jnp.asarray(images.transpose(0, 2, 3, 1)))
  assert_close_on_logit_scale(np.asarray(features['embedding']), want_embedding)
  assert_close_on_logit_scale(np.asarray(logits), want_logits)


@pytest.mark.parametrize('layout', ['repdistiller', 'bare'])
def test_convert_pth_writes_a_teacher_that_load_variables_reads(twins, tmp_path, layout):
  import torch

  net = twins.randomize(twins.repdistiller_resnet(8, [16, 16, 32, 64], 10), seed=3)
  state = {f'module.{k}': v for k, v in net.state_dict().items()}
  if layout == 'repdistiller':  # As train_teacher.py saves, including its argparse options.
    saved = {'epoch': 240, 'model': state, 'accuracy': torch.tensor(93.1), 'optimizer': {}}
    saved['opt'] = argparse.Namespace(model='resnet8', learning_rate=0.05)
  else:
    saved = state
  pth = tmp_path / 'ckpt_epoch_240.pth'
  torch.save(saved, pth)
  output = tmp_path / 'teacher' / 'model.msgpack'
  written = torch_convert.convert_pth(
    str(pth), 'resnet8', str(output), num_classes=10, dataset='cifar10'
  )
  variables, meta = checkpoint.load_variables(str(output))
  assert meta == written
  assert {k: meta[k] for k in ('model', 'dataset', 'num_classes', 'test_accuracy', 'source')} == {
    'model': 'resnet8',
    'dataset': 'cifar10',
    'num_classes': 10,
    'test_accuracy': None,
    'source': str(pth),
  }
  assert meta['params'] == sum(math.prod(v.shape) for v in jax.tree.leaves(variables['params']))
  jax.tree.map(np.testing.assert_array_equal, variables, from_torch('resnet8', net.state_dict()))
  # What a distillation run does with config.teacher.checkpoint (model, classes, shapes checked).
  config = ml_collections.ConfigDict(
    {'dataset': 'cifar10', 'teacher': {'model': 'resnet8', 'checkpoint': str(output)}}
  )
  loaded = teacher_lib.load(config, data.dataset_info('cifar10')).variables
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_convert_pth_rejects_a_pickled_model(twins, tmp_path):
  import torch

  pth = tmp_path / 'list.pth'
  torch.save([torch.zeros(1)], pth)
  with pytest.raises(ValueError, match=r'holds a list, not a state_dict'):
    torch_convert.convert_pth(
      str(pth), 'resnet8', str(tmp_path / 'm.msgpack'), num_classes=10, dataset='cifar10'
    )


def test_recorded_accuracy_reads_percent_and_fractions():
  """RepDistiller records percent ('accuracy' in ckpt_epoch_*.pth, 'best_acc' in *_best.pth, as
  0-d tensors); a value of at most 1 is a fraction already."""
  read = torch_convert.recorded_accuracy
  assert read({'accuracy': np.float32(79.42), 'model': {}}) == pytest.approx(0.7942)
  assert read({'best_acc': np.array(74.31)}) == pytest.approx(0.7431)
  assert read({'accuracy': 0.9}) == 0.9
  assert read({'opt': argparse.Namespace(), 'model': {}}) is None  # RepDistiller's *_last.pth.
  assert read({'accuracy': 'n/a', 'best_acc': float('nan')}) is None


def _fake_npz(path, seed=0) -> tuple[str, np.ndarray]:
  """An `npz:` dataset of random 32x32 images in 10 classes; returns its name and test images."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
  labels = np.arange(60, dtype=np.int64) % 10
  np.savez(
    path,
    train_images=images[:20],
    train_labels=labels[:20],
    test_images=images[20:],
    test_labels=labels[20:],
  )
  return f'npz:{path}', images[20:]


def _teacher_pth(
  twins, path, dataset, test_images, *, offset_points=0.0, record=True, mean=(), std=()
):
  """A resnet8 twin saved as RepDistiller saves it, and a copy of the `dataset` whose test labels
  are its own predictions for 30 of the 40 images; it records the accuracy PyTorch measures on
  the images normalised with `mean` and `std` (default: the dataset's), moved by
  `offset_points`. Returns the copy's name and that accuracy."""
  import torch

  net = twins.randomize(twins.repdistiller_resnet(8, [16, 16, 32, 64], 10), seed=5)
  info = data.dataset_info(dataset, mean=mean, std=std)
  x = (test_images / 255.0 - np.array(info.mean)) / np.array(info.std)
  with torch.no_grad():
    logits, _ = net(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32)))
  predicted = logits.numpy().argmax(1)
  labels = np.where(np.arange(40) < 30, predicted, (predicted + 1) % 10)
  copy = f'{dataset[len("npz:") :]}.labelled.npz'  # lpe keeps the first file's arrays cached.
  np.savez(copy, **dict(np.load(dataset[len('npz:') :]), test_labels=labels))
  accuracy = float(np.mean(predicted == labels))
  saved = {'epoch': 240, 'model': net.state_dict(), 'optimizer': {}}
  if record:
    saved['accuracy'] = torch.tensor(100 * accuracy + offset_points)
  torch.save(saved, path)
  return f'npz:{copy}', accuracy


def test_check_on_import_agrees_with_the_accuracy_pytorch_measured(twins, tmp_path):
  dataset, test_images = _fake_npz(tmp_path / 'd.npz')
  dataset, accuracy = _teacher_pth(twins, tmp_path / 'ckpt_epoch_240.pth', dataset, test_images)
  assert accuracy == 0.75
  output = str(tmp_path / 'teacher.msgpack')
  meta = torch_convert.convert_pth(
    str(tmp_path / 'ckpt_epoch_240.pth'), 'resnet8', output, num_classes=10, dataset=dataset
  )
  assert meta['recorded_accuracy'] == pytest.approx(0.75)
  check = torch_convert.check_accuracy(output)
  assert (check.measured, check.num_examples, check.differs) == (0.75, 40, False)
  assert check.report() == (
    f'Accuracy check: the converted teacher scores 75.00% on the 40 test images of {dataset}, '
    'the .pth records 75.00%: they agree within 0.5 points.'
  )
  # The same evaluation as launch.py --mode=evaluate, saved beside the teacher.
  with open(output + '.evaluation.json') as f:
    assert json.load(f)['accuracy'] == 0.75


@pytest.mark.parametrize('offset_points, record', [(0.6, True), (-12.0, True), (0.0, False)])
def test_check_on_import_warns_in_one_line_naming_the_causes(
  twins, tmp_path, offset_points, record
):
  dataset, test_images = _fake_npz(tmp_path / 'd.npz')
  pth = tmp_path / 'teacher.pth'
  dataset, _ = _teacher_pth(
    twins, pth, dataset, test_images, offset_points=offset_points, record=record
  )
  output = str(tmp_path / 'teacher.msgpack')
  torch_convert.convert_pth(str(pth), 'resnet8', output, num_classes=10, dataset=dataset)
  check = torch_convert.check_accuracy(output)
  report = check.report()
  assert '\n' not in report and check.measured == 0.75
  if not record:
    assert not check.differs and report.endswith('the .pth records none.')
    return
  assert check.differs
  points = f'{abs(offset_points):.2f} points apart, more than 0.5'
  assert report.startswith('WARNING: the converted teacher scores 75.00%') and points in report
  for cause in ('--model', '--data_mean, --data_std', '--dataset'):
    assert cause in report


def test_check_on_import_is_skipped_without_the_dataset_and_says_how_to_run_it(
  twins, tmp_path, monkeypatch
):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'no_data'))
  net = twins.randomize(twins.repdistiller_resnet(8, [16, 16, 32, 64], 10), seed=4)
  import torch

  torch.save({'model': net.state_dict(), 'best_acc': torch.tensor(93.1)}, tmp_path / 'best.pth')
  output = str(tmp_path / 'teacher.msgpack')
  torch_convert.convert_pth(
    str(tmp_path / 'best.pth'), 'resnet8', output, num_classes=10, dataset='cifar10'
  )
  check = torch_convert.check_accuracy(output)
  assert check.measured is None and check.recorded == pytest.approx(0.931)
  assert check.report() == (
    "Accuracy check skipped: the test split of cifar10 is not available here (Dataset 'cifar10' "
    f'is not prepared in {tmp_path / "no_data"}); the .pth records 93.10%. Where it is, run '
    f'`launch.py --mode=evaluate --checkpoint={output}`.'
  )


def _launch_convert(args: list[str], python: str = sys.executable) -> subprocess.CompletedProcess:
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run(
    [python, os.path.join(repo, 'launch.py'), '--mode=convert_torch', *args],
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_launch_convert_torch_names_missing_flags_and_a_missing_torch(tmp_path):
  proc = _launch_convert(['--model=resnet8'])
  assert proc.returncode != 0 and '--checkpoint, --dataset, --num_classes, --output' in (
    proc.stdout + proc.stderr
  )
  try:
    import torch  # noqa: F401
  except ImportError:
    args = [f'--checkpoint={tmp_path / "x.pth"}', '--model=resnet8', '--dataset=cifar10']
    proc = _launch_convert([*args, '--num_classes=10', f'--output={tmp_path / "t.msgpack"}'])
    assert proc.returncode == 1 and 'pip install torch==2.13.0' in proc.stderr


def test_launch_convert_torch_writes_the_teacher_and_checks_its_accuracy(twins, tmp_path):
  """The teacher's own normalisation (RepDistiller's CIFAR-100 constants) is recorded and used
  by the check, which prints its line to stderr and its figures in the JSON on stdout."""
  import torch

  mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
  dataset, test_images = _fake_npz(tmp_path / 'd.npz')
  pth = tmp_path / 'ckpt.pth'
  dataset, _ = _teacher_pth(twins, pth, dataset, test_images, mean=mean, std=std)
  output = tmp_path / 'teacher.msgpack'
  proc = _launch_convert(
    [
      f'--checkpoint={pth}',
      '--model=resnet8',
      f'--dataset={dataset}',
      '--num_classes=10',
      f'--output={output}',
      f'--data_mean={",".join(map(str, mean))}',
      f'--data_std={",".join(map(str, std))}',
    ]
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  variables, meta = checkpoint.load_variables(str(output))
  printed = json.loads(proc.stdout)
  assert meta['model'] == 'resnet8' and printed['sha256'] == meta['sha256']
  assert (meta['mean'], meta['std']) == (list(mean), list(std))
  state_dict = torch.load(pth, weights_only=True)['model']
  jax.tree.map(np.testing.assert_array_equal, variables, from_torch('resnet8', state_dict))
  assert printed['accuracy_check'] == {
    'recorded': pytest.approx(0.75),
    'measured': 0.75,
    'num_examples': 40,
    'tolerance': 0.005,
    'differs': False,
  }
  assert (
    proc.stderr.strip()
    .splitlines()[-1]
    .startswith('Accuracy check: the converted teacher scores 75.00% on the 40 test images')
  )


@pytest.mark.parametrize('content', [b'hello, not a checkpoint\n', b'', bytes(range(256)) * 4])
def test_a_file_that_is_not_a_pytorch_checkpoint_is_one_sentence(tmp_path, content):
  pytest.importorskip('torch', reason=TORCH_REASON)
  path = tmp_path / 'weights.pth'
  path.write_bytes(content)
  with pytest.raises(ValueError, match=f'{path} is not a PyTorch checkpoint') as error:
    torch_convert.load_state_dict(str(path))
  assert '\n' not in str(error.value) and str(error.value).count('. ') == 0
