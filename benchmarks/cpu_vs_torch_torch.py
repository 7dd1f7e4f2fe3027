"""The PyTorch side of benchmarks/cpu_vs_torch.py: twins of the JAX rows, timed on request.

Runs under a separate Python that has torch (never lpe's venv); benchmarks/cpu_vs_torch.py starts
it as `python cpu_vs_torch_torch.py [--threads=N] ROW...`, reads one JSON line per row (its
parameter count) and then `ready`, and after that answers each request line `ROW REPS` with one
JSON line: the wall and process CPU seconds of REPS steps. The networks are written from the same
definitions as the lpe models (lpe/models/small_cnn.py, fitnets.py, resnet.py) in PyTorch's own
layout (NCHW, oneDNN convolutions); the steps are RepDistiller's (`train_vanilla`, and
`train_distill` with KD): forward, CE (and KD at T = 4 against the teacher's `no_grad` eval-mode
logits), backward, SGD with momentum 0.9 and weight decay 5e-4. Images arrive normalised, as
RepDistiller's DataLoader hands them over; `ce_cifar` rows crop and flip inside the step, as the
JAX step does.
"""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_conv_torch import ResNet  # noqa: E402


class SmallCNN(nn.Module):
  """lpe's `SmallCNN`: two 3x3 conv (bias) + ReLU + 2x2 max-pool stages, ReLU dense, linear."""

  def __init__(self, widths, embedding, classes=10):
    super().__init__()
    self.conv1 = nn.Conv2d(1, widths[0], 3, padding=1)
    self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1)
    self.embed = nn.Linear(7 * 7 * widths[1], embedding)
    self.head = nn.Linear(embedding, classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return self.head(F.relu(self.embed(x.flatten(1))))


def conv_bn_relu(cin, cout):
  return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class BatchNormCNN(nn.Module):
  """lpe's `BatchNormCNN`: 3 stages of 2 x (conv + BN + ReLU), pools after 2, dense 256."""

  def __init__(self, widths=(32, 64, 128), per_stage=2, embedding=256, classes=10):
    super().__init__()
    layers, cin = [], 1
    for i, width in enumerate(widths):
      for _ in range(per_stage):
        layers += conv_bn_relu(cin, width)
        cin = width
      if i < 2:
        layers.append(nn.MaxPool2d(2))
    self.features = nn.Sequential(*layers)
    self.embed = nn.Linear(7 * 7 * cin, embedding)
    self.head = nn.Linear(embedding, classes)

  def forward(self, x):
    return self.head(F.relu(self.embed(self.features(x).flatten(1))))


class FitNet(nn.Module):
  """lpe's `FitNet` (ReLU): conv + BN + ReLU groups, 2x2 max pools between, global mean, linear."""

  def __init__(self, groups, classes=10, channels=1):
    super().__init__()
    layers, cin = [], channels
    for g, widths in enumerate(groups):
      for width in widths:
        layers += conv_bn_relu(cin, width)
        cin = width
      if g < len(groups) - 1:
        layers.append(nn.MaxPool2d(2))
    self.features = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, classes)

  def forward(self, x):
    return self.fc(self.features(x).mean((2, 3)))


FASHION = (1, 28, 28)
CIFAR = (3, 32, 32)
NETS = {
  'cnn_tiny': (lambda: SmallCNN((4, 8), 8), FASHION, 10),
  'cnn_student': (lambda: SmallCNN((8, 16), 32), FASHION, 10),
  'cnn_teacher': (lambda: SmallCNN((64, 128), 256), FASHION, 10),
  'cnn_teacher_bn': (lambda: BatchNormCNN(), FASHION, 10),
  'fitnet1': (lambda: FitNet(((16, 16, 16), (32, 32, 32), (48, 48, 64))), FASHION, 10),
  'resnet20': (lambda: ResNet(3, (16, 16, 32, 64), 100), CIFAR, 100),
  'resnet8x4': (lambda: ResNet(1, (32, 64, 128, 256), 100), CIFAR, 100),
  'resnet32x4': (lambda: ResNet(5, (32, 64, 128, 256), 100), CIFAR, 100),
}


def crop_and_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
  """A 4-pixel zero-padded random crop and a random horizontal flip of each image."""
  n, _, h, w = x.shape
  padded = F.pad(x, (4, 4, 4, 4))
  dy, dx = (torch.randint(0, 9, (n,), generator=gen) for _ in range(2))
  rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
  cols = dx[:, None] + torch.arange(w)
  flip = torch.rand(n, generator=gen) < 0.5
  cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
  return padded[
    torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[:, None, None], rows, cols
  ]


def kd_loss(student_logits, teacher_logits, temperature=4.0):
  """RepDistiller's `DistillKL`: KL(teacher || student) at temperature T, times T^2."""
  log_p = F.log_softmax(student_logits / temperature, dim=1)
  q = F.softmax(teacher_logits / temperature, dim=1)
  return F.kl_div(log_p, q, reduction='batchmean') * temperature**2


def make_row(row: str):
  """`ROW` is `kind:model:batch[:teacher]`; kind is ce, ce_cifar (crop + flip), kd or forward."""
  kind, name, batch, *teacher_name = row.split(':')
  factory, shape, classes = NETS[name]
  torch.manual_seed(0)
  model = factory()
  gen = torch.Generator().manual_seed(0)
  x = torch.randn(int(batch), *shape, generator=gen)
  y = torch.randint(0, classes, (int(batch),), generator=gen)
  if kind == 'forward':
    model.eval()

    def step():
      with torch.no_grad():
        model(x)

    return step, sum(p.numel() for p in model.parameters())
  opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
  teacher = None
  if kind == 'kd':
    teacher = NETS[teacher_name[0]][0]().eval()

  def step():
    images = crop_and_flip(x, gen) if kind == 'ce_cifar' else x
    opt.zero_grad(set_to_none=True)
    logits = model(images)
    loss = F.cross_entropy(logits, y)
    if teacher is not None:
      with torch.no_grad():
        teacher_logits = teacher(images)
      loss = 0.1 * loss + 0.9 * kd_loss(logits, teacher_logits)
    loss.backward()
    opt.step()

  return step, sum(p.numel() for p in model.parameters())


def main() -> None:
  rows = sys.argv[1:]
  if rows and rows[0].startswith('--threads='):
    torch.set_num_threads(int(rows.pop(0).split('=')[1]))
  steps = {}
  for row in rows:
    step, params = make_row(row)
    step()  # Warm-up.
    step()
    steps[row] = step
    print(json.dumps(dict(row=row, params=params)), flush=True)
  print(
    f'ready torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()} '
    f'threads={torch.get_num_threads()}',
    flush=True,
  )
  for line in sys.stdin:
    row, reps = line.split()
    walls, cpus = [], []
    for _ in range(int(reps)):
      t0, c0 = time.perf_counter(), time.process_time()
      steps[row]()
      walls.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
    print(json.dumps(dict(wall=walls, cpu=cpus)), flush=True)


if __name__ == '__main__':
  main()
