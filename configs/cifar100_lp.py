"""CIFAR-100, the paper's method: FitNet-4 with CE + 0.1 * LP (k = 5) from the maxout teacher.

  .venv/bin/python launch.py --config=configs/cifar100_lp.py --workdir=runs/cifar100_lp

CRD's CIFAR recipe (the paper's is unknown): 240 epochs of SGD (momentum 0.9, lr 0.05 x 0.1 at
epochs 150/180/210, weight decay 5e-4), batch 64, padded random crop and flip.
FitNet-4 is the default student; another FitNet: `--config.model=fitnet2` (fitnet1 to 4).
Run configs/cifar100_teacher.py first: the teacher is loaded from runs/cifar100_teacher.

Time: not measured; one step of cifar100_lp_kd.py took 2.3 s on 2 CPU cores shared with another
training job (median of 3 steps after compiling; timings there vary by tens of percent), about 5
days for its 187,440 steps (240 epochs x 781). Not timed on a GPU.
"""

from configs import common


def get_config():
  return common.paper_config('cifar100', 'lp')
