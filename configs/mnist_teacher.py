"""MNIST, the paper's teacher: FitNets' wide maxout CNN, trained from scratch.

  .venv/bin/python launch.py --config=configs/mnist_teacher.py --workdir=runs/mnist_teacher

Our recipe (the paper's is unknown): 20 epochs of SGD (momentum 0.9, lr 0.05, cosine, weight
decay 5e-4), batch 128, no augmentation.

Time: one step took 3.0 s on 2 CPU cores shared with another training job (median of 3 steps after
compiling; timings there vary by tens of percent); 9,360 steps (20 epochs x 468) at that rate is
about 8 hours plus an evaluation per epoch. Not timed on a GPU.
"""

from configs import common


def get_config():
  return common.paper_config('mnist', 'teacher')
