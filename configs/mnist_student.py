"""MNIST, the paper's baseline: the FitNet-1 student alone (cross-entropy only).

  .venv/bin/python launch.py --config=configs/mnist_student.py --workdir=runs/mnist_student

Our recipe (the paper's is unknown): 20 epochs of SGD (momentum 0.9, lr 0.05, cosine, weight
decay 5e-4), batch 128, no augmentation.
FitNet-1 is the default student; another FitNet: `--config.model=fitnet2` (fitnet1 to 4).

Time: one step took 0.3 s on 2 CPU cores shared with another training job (median of 3 steps after
compiling; timings there vary by tens of percent); 9,360 steps (20 epochs x 468) at that rate is
about 1 hours plus an evaluation per epoch. Not timed on a GPU.
"""

from configs import common


def get_config():
  return common.paper_config('mnist', 'student')
