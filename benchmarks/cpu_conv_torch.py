"""The PyTorch side of benchmarks/cpu_conv.py: one CIFAR ResNet train step, timed.

Runs under a separate Python that has torch (never lpe's venv), e.g.

    /tmp/torchvenv/bin/python benchmarks/cpu_conv_torch.py resnet20 128 5 2

and prints one JSON line: median wall and CPU seconds per step. The network is RepDistiller's
CIFAR ResNet, as lpe/models/resnet.py ports it (3x3 stem, post-activation basic blocks, 1x1
conv + BN shortcuts where the shape changes); the step is forward, cross-entropy, backward and
SGD with momentum 0.9 and weight decay 5e-4, in float32 NCHW, PyTorch's native layout.
"""

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.shortcut = nn.Identity()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(
        nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
  def __init__(self, blocks_per_stage: int, widths: tuple[int, ...], num_classes: int = 10):
    super().__init__()
    self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    layers, cin = [], widths[0]
    for i, width in enumerate(widths[1:]):
      for j in range(blocks_per_stage):
        layers.append(BasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
        cin = width
    self.layers = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.layers(F.relu(self.bn1(self.conv1(x))))
    return self.fc(x.mean((2, 3)))


MODELS = {
  'resnet20': lambda: ResNet(3, (16, 16, 32, 64)),
  'resnet8x4': lambda: ResNet(1, (32, 64, 128, 256)),
}


def main() -> None:
  name, batch, reps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
  torch.manual_seed(0)
  if threads:
    torch.set_num_threads(threads)
  model = MODELS[name]()
  opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
  x = torch.randn(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()

  step()  # Warm-up.
  walls, cpus = [], []
  for _ in range(reps):
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    walls.append(time.perf_counter() - t0)
    cpus.append(time.process_time() - c0)
  print(
    json.dumps(
      dict(
        variant=f'pytorch {torch.__version__}, {torch.get_num_threads()} thread(s)',
        wall=walls,
        cpu=statistics.median(cpus),
        load=os.getloadavg()[0],
      )
    )
  )


if __name__ == '__main__':
  main()
