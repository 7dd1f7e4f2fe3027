r"""CIFAR-100 benchmark (CRD/RepDistiller protocol): a teacher, trained from scratch.

The argument after the colon names the teacher (default resnet32x4); one command per teacher:

  .venv/bin/python launch.py --config=configs/cifar100_crd_teacher.py:resnet32x4 \
    --workdir=runs/cifar100_crd_teacher_resnet32x4
  .venv/bin/python launch.py --config=configs/cifar100_crd_teacher.py:wrn_40_2 \
    --workdir=runs/cifar100_crd_teacher_wrn_40_2
  .venv/bin/python launch.py --config=configs/cifar100_crd_teacher.py:resnet56 \
    --workdir=runs/cifar100_crd_teacher_resnet56
  .venv/bin/python launch.py --config=configs/cifar100_crd_teacher.py:resnet110 \
    --workdir=runs/cifar100_crd_teacher_resnet110
  .venv/bin/python launch.py --config=configs/cifar100_crd_teacher.py:vgg13 \
    --workdir=runs/cifar100_crd_teacher_vgg13

CRD's recipe: 240 epochs of SGD (momentum 0.9, lr 0.05 x 0.1 at epochs 150/180/210, weight decay
5e-4), batch 64, 4-pixel padded random crop and horizontal flip. CRD's published teachers:
resnet32x4 79.42%, wrn_40_2 75.61%.

Time: one step (batch 64) took, on 2 CPU cores shared with another training job (median of 3 steps
after compiling; timings there vary by tens of percent): resnet32x4 11.4 s (about 25 days); wrn_40_2
2.0 s (about 4 days); resnet56 4.0 s (about 9 days); resnet110 10.1 s (about 22 days); vgg13 2.4 s
(about 5 days); in brackets, 187,440 steps (240 epochs x 781) at that rate, without evaluation. On
CPU these runs take days to weeks: run them on a GPU (not timed on one here).
"""

from configs import common


def get_config(model: str = 'resnet32x4'):
  return common.cifar100_teacher_config(model)
