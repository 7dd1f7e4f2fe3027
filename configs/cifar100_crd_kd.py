r"""CIFAR-100 benchmark (CRD/RepDistiller protocol): the KD student of a teacher-student pair.

The argument after the colon names the pair (default resnet32x4-resnet8x4), for example:

  .venv/bin/python launch.py --config=configs/cifar100_crd_kd.py:resnet32x4-resnet8x4 \
    --workdir=runs/cifar100_crd_kd_resnet32x4-resnet8x4 --config.dataset=npz:$HOME/data/cifar100.npz

RepDistiller's KD row: 0.1 * CE + 0.9 * KD at T = 4, with the CRD recipe (240 epochs of SGD,
momentum 0.9, lr 0.05 x 0.1 at epochs 150/180/210, weight decay 5e-4, batch 64, padded random crop
and flip) and its PyTorch conventions (`common.crd_exact`). Its teacher is the run of
configs/cifar100_crd_teacher.py:<teacher>, or a RepDistiller checkpoint converted with
`--mode=convert_torch` (docs/reproducing.md).

Time: not measured on a GPU (docs/reproducing.md says what is known).
"""

from configs import common


def get_config(pair: str = 'resnet32x4-resnet8x4'):
  return common.cifar100_kd_config(pair)
