"""CIFAR-10, the KD baseline: FitNet-4 with CE + 1.0 * KD (T = 4) from the maxout teacher.

  .venv/bin/python launch.py --config=configs/cifar10_kd.py --workdir=runs/cifar10_kd

CRD's CIFAR recipe (the paper's is unknown): 240 epochs of SGD (momentum 0.9, lr 0.05 x 0.1 at
epochs 150/180/210, weight decay 5e-4), batch 64, padded random crop and flip.
FitNet-4 is the default student; another FitNet: `--config.model=fitnet2` (fitnet1 to 4).
Run configs/cifar10_teacher.py first: the teacher is loaded from runs/cifar10_teacher.

Time: not measured; one step of cifar10_lp_kd.py took 2.3 s on 2 CPU cores shared with another
training job (median of 3 steps after compiling; timings there vary by tens of percent), about 5
days for its 187,440 steps (240 epochs x 781). Not timed on a GPU.
"""

from configs import common


def get_config():
  return common.paper_config('cifar10', 'kd')
