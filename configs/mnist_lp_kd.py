"""MNIST, LP with KD: FitNet-1 with CE + 0.1 * LP (k = 5) + 1.0 * KD (T = 4), maxout teacher.

  .venv/bin/python launch.py --config=configs/mnist_lp_kd.py --workdir=runs/mnist_lp_kd

Our recipe (the paper's is unknown): 20 epochs of SGD (momentum 0.9, lr 0.05, cosine, weight
decay 5e-4), batch 128, no augmentation.
FitNet-1 is the default student; another FitNet: `--config.model=fitnet2` (fitnet1 to 4).
Run configs/mnist_teacher.py first: the teacher is loaded from runs/mnist_teacher.

Time: one step took 1.1 s on 2 CPU cores shared with another training job (median of 3 steps after
compiling; timings there vary by tens of percent); 9,360 steps (20 epochs x 468) at that rate is
about 3 hours plus an evaluation per epoch. Not timed on a GPU.
"""

from configs import common


def get_config():
  return common.paper_config('mnist', 'lp_kd')
