r"""Golden trajectories of RepDistiller's own training loop, for test_repdistiller_parity.py.

Not run by CI. A developer runs it by hand, with torch 2.13.0 and RepDistiller at the pinned commit
`PINNED_COMMIT` (its modules are imported from the path given; none of its code is in lpe):

  git clone https://github.com/HobbitLong/RepDistiller /tmp/RepDistiller
  git -C /tmp/RepDistiller checkout b84f547
  .venv/bin/python -m tests.repdistiller_golden --repdistiller=/tmp/RepDistiller

For every run of `RUNS` it builds RepDistiller's student (and teacher) from `models.model_dict`,
loads the weights `initial_state_dict` generates (seeded NumPy, so the test rebuilds them without a
file), and calls RepDistiller's `helper.loops.train_distill` (or `train_vanilla` for CE alone) for
one "epoch" of `STEPS` fixed batches (`batches`), with its criteria (`DistillKL`, `PKT`) and
`torch.optim.SGD(lr=0.05, momentum=0.9, weight_decay=5e-4)` as its `train_student.py` builds them.
It does so twice: in float32 and in float64 (models and inputs in double). It writes
tests/golden/<run>.npz with, for each precision `p` in (f32, f64):

- `p/loss`, `p/<term>`: the loss and its terms at each step (recorded by wrapping the criteria);
- `p/<collection>/<path>`: the student's variables after the last step, in lpe's layout and
  names: every 1-D array (BatchNorm scale, bias, running mean and variance; the classifier's bias)
  in full, and every larger one (conv and classifier kernels) as its projections on `PROJECTIONS`
  fixed random unit vectors (`projections`). The full kernels would take megabytes (resnet8x4 has
  1.2M parameters); a projection changes as soon as any entry of the update does.
"""

import argparse
import dataclasses
import os
import sys
import types
import zlib

import numpy as np

from lpe.models.from_torch import torch_keys

PINNED_COMMIT = 'b84f547'
STEPS = 4
BATCH = 8
NUM_CLASSES = 100
PROJECTIONS = 8
# RepDistiller's CIFAR-100 normalisation (dataset/cifar100.py); the CRD configs use the same.
MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4
GOLDEN_DIR = os.path.join(os.path.dirname(__file__), 'golden')


@dataclasses.dataclass(frozen=True)
class Run:
  """One golden run: RepDistiller's `--distill` with its weights `-r` (gamma, CE), `-a` (alpha,
  KD) and `-b` (beta, the feature loss), as in its scripts/run_cifar_distill.sh."""

  student: str
  teacher: str | None
  distill: str  # 'kd', 'pkt' or 'vanilla' (CE alone, train_vanilla).
  gamma: float = 1.0
  alpha: float = 0.0
  beta: float = 0.0
  seed: int = 0


RUNS = {
  'kd_resnet32x4_resnet8x4': Run('resnet8x4', 'resnet32x4', 'kd', gamma=0.1, alpha=0.9),
  'ce_resnet20': Run('resnet20', None, 'vanilla', seed=1),
  'pkt_resnet56_resnet20': Run('resnet20', 'resnet56', 'pkt', gamma=1.0, beta=30000.0, seed=2),
}


def initial_state_dict(name: str, seed: int) -> dict[str, np.ndarray]:
  """Seeded float64 weights under every PyTorch key of `name`: convs He-normal (fan-out), the
  classifier uniform in +-1/sqrt(fan_in), BatchNorm affine and statistics away from 1 and 0 so
  that every one of them matters (a residual branch's last scale near 0.2, so that the teacher's
  logits in eval mode stay of order one rather than growing with depth)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in torch_keys(name, NUM_CLASSES).values():
    if key.endswith('running_var'):
      value = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 4:
      value = rng.normal(size=shape) * np.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))
    elif len(shape) == 2:
      value = rng.uniform(-1, 1, shape) / np.sqrt(shape[1])
    elif key.endswith('bn2.weight'):  # A residual branch's last BatchNorm: small, so that
      value = 0.2 * (1.0 + 0.1 * rng.normal(size=shape))  # deep nets' outputs stay O(1).
    elif key.endswith('weight'):
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    state[key] = value
  return state


def batches(seed: int) -> tuple[np.ndarray, np.ndarray]:
  """`STEPS` batches of `BATCH` random uint8 images `[STEPS, BATCH, 32, 32, 3]` and labels."""
  rng = np.random.default_rng(1000 + seed)
  images = rng.integers(0, 256, (STEPS, BATCH, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (STEPS, BATCH))
  return images, labels


def to_lpe_layout(name: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A PyTorch state_dict of `name` in lpe's layout, keyed `'params/layer1_0/conv1/kernel'`,
  without changing the dtype (OIHW -> HWIO, `[out, in]` -> `[in, out]`)."""
  out = {}
  for path, (key, _) in torch_keys(name, NUM_CLASSES).items():
    value = np.asarray(state[key])
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    out['/'.join(path)] = value
  return out


def projections(path: str, value: np.ndarray) -> np.ndarray:
  """`value` (more than 1-D) flattened and projected on `PROJECTIONS` random unit vectors, fixed
  by `path`; a 1-D `value` is returned whole."""
  if value.ndim == 1:
    return np.asarray(value, np.float64)
  rng = np.random.default_rng(zlib.crc32(path.encode()))
  vectors = rng.normal(size=(PROJECTIONS, value.size))
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  return vectors @ np.asarray(value, np.float64).reshape(-1)


def summary(name: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """What a golden file stores of a student's variables (see the module docstring)."""
  return {path: projections(path, v) for path, v in to_lpe_layout(name, state).items()}


def _torch_run(repdistiller: str, run: Run, dtype: str) -> dict[str, np.ndarray]:
  """RepDistiller's own loop over the fixed batches; returns losses and the student summary."""
  import torch  # noqa: PLC0415 (only this by-hand path needs torch)

  sys.path.insert(0, repdistiller)
  from distiller_zoo import PKT, DistillKL  # noqa: PLC0415
  from helper.loops import train_distill, train_vanilla  # noqa: PLC0415
  from models import model_dict  # noqa: PLC0415

  torch_dtype = {'f32': torch.float32, 'f64': torch.float64}[dtype]

  class Cast(torch.Tensor):
    """The loops call `input.float()`; in the float64 run that must keep double precision."""

    def float(self):
      return torch.Tensor.to(self.as_subclass(torch.Tensor), torch_dtype)

  def model(name, seed):
    net = model_dict[name](num_classes=NUM_CLASSES)
    sd = {k: torch.tensor(v) for k, v in initial_state_dict(name, seed).items()}
    for key in net.state_dict():
      if key.endswith('num_batches_tracked'):
        sd[key] = torch.tensor(0)
    net.load_state_dict(sd)
    return net.to(torch_dtype)

  recorded = {}

  class Recorder(torch.nn.Module):
    def __init__(self, term, criterion):
      super().__init__()
      self.term, self.criterion = term, criterion

    def forward(self, *args):
      value = self.criterion(*args)
      recorded.setdefault(self.term, []).append(float(value.detach()))
      return value

  student = model(run.student, run.seed)
  images, labels = batches(run.seed)
  mean = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)
  std = torch.tensor(STD, dtype=torch.float64).view(1, 3, 1, 1)
  loader = []
  for step in range(STEPS):
    x = torch.tensor(images[step], dtype=torch.float64).permute(0, 3, 1, 2) / 255.0
    x = ((x - mean) / std).to(torch_dtype).as_subclass(Cast)
    loader.append((x, torch.tensor(labels[step]), torch.arange(BATCH)))
  opt = types.SimpleNamespace(
    distill=run.distill, gamma=run.gamma, alpha=run.alpha, beta=run.beta, print_freq=10**9
  )
  optimizer = torch.optim.SGD(
    student.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
  )
  ce = Recorder('ce', torch.nn.CrossEntropyLoss())
  if run.distill == 'vanilla':
    train_vanilla(1, [(x, y) for x, y, _ in loader], student, ce, optimizer, opt)
  else:
    teacher = model(run.teacher, run.seed + 100)
    feature = {'kd': DistillKL(4), 'pkt': PKT()}[run.distill]
    criteria = torch.nn.ModuleList(
      [ce, Recorder('kd', DistillKL(4)), Recorder(run.distill + '_feature', feature)]
    )
    train_distill(1, loader, torch.nn.ModuleList([student, teacher]), criteria, optimizer, opt)
  out = {term: np.array(values) for term, values in recorded.items()}
  loss = run.gamma * out['ce']
  if 'kd' in out:
    loss = loss + run.alpha * out['kd']
  if run.distill + '_feature' in out:  # RepDistiller's `--distill kd` has no feature loss.
    loss = loss + run.beta * out[run.distill + '_feature']
  out['loss'] = loss
  final = {k: v.detach().double().numpy() for k, v in student.state_dict().items()}
  out.update(summary(run.student, final))
  sys.path.remove(repdistiller)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--repdistiller', required=True, help='a RepDistiller checkout at b84f547')
  args = parser.parse_args()
  import torch  # noqa: PLC0415

  torch.set_num_threads(1)  # Reproducible float32 reductions.
  os.makedirs(GOLDEN_DIR, exist_ok=True)
  for name, run in RUNS.items():
    arrays = {}
    for dtype in ('f32', 'f64'):
      for key, value in _torch_run(args.repdistiller, run, dtype).items():
        arrays[f'{dtype}/{key}'] = value
    path = os.path.join(GOLDEN_DIR, f'{name}.npz')
    np.savez_compressed(path, **arrays)
    print(f'{path}: {os.path.getsize(path)} bytes; f64 loss {arrays["f64/loss"]}')


if __name__ == '__main__':
  main()
