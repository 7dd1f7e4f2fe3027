"""CIFAR-10, the paper's baseline: the FitNet-4 student alone (cross-entropy only).

  .venv/bin/python launch.py --config=configs/cifar10_student.py --workdir=runs/cifar10_student

CRD's CIFAR recipe (the paper's is unknown): 240 epochs of SGD (momentum 0.9, lr 0.05 x 0.1 at
epochs 150/180/210, weight decay 5e-4), batch 64, padded random crop and flip.
FitNet-4 is the default student; another FitNet: `--config.model=fitnet2` (fitnet1 to 4).

Time: one step took 2.6 s on 2 CPU cores shared with another training job (median of 3 steps after
compiling; timings there vary by tens of percent); 187,440 steps (240 epochs x 781) at that rate is
about 6 days plus an evaluation per epoch. Not timed on a GPU.
"""

from configs import common


def get_config():
  return common.paper_config('cifar10', 'student')
