r"""CIFAR-100 benchmark (CRD/RepDistiller protocol): the LP student of a teacher-student pair.

The argument after the colon names the pair (default resnet32x4-resnet8x4); one command per pair,
each after its teacher's run (configs/cifar100_crd_teacher.py:<teacher>) has finished:

  .venv/bin/python launch.py --config=configs/cifar100_crd_lp.py:resnet32x4-resnet8x4 \
    --workdir=runs/cifar100_crd_lp_resnet32x4-resnet8x4
  .venv/bin/python launch.py --config=configs/cifar100_crd_lp.py:wrn_40_2-wrn_16_2 \
    --workdir=runs/cifar100_crd_lp_wrn_40_2-wrn_16_2
  .venv/bin/python launch.py --config=configs/cifar100_crd_lp.py:resnet56-resnet20 \
    --workdir=runs/cifar100_crd_lp_resnet56-resnet20
  .venv/bin/python launch.py --config=configs/cifar100_crd_lp.py:resnet110-resnet32 \
    --workdir=runs/cifar100_crd_lp_resnet110-resnet32
  .venv/bin/python launch.py --config=configs/cifar100_crd_lp.py:vgg13-vgg8 \
    --workdir=runs/cifar100_crd_lp_vgg13-vgg8
  .venv/bin/python launch.py --config=configs/cifar100_crd_lp.py:resnet32x4-ShuffleV2 \
    --workdir=runs/cifar100_crd_lp_resnet32x4-ShuffleV2

The objective is CE + 0.1 * LP (k = 5, default sigma2) on the pooled embeddings, as CRD trains its
feature-loss baselines (CE weight 1, no KD). lambda = 0.1 is untuned (the Fashion-MNIST best):
sweep it with `--config.distill.lp_weight=`. CRD's recipe: 240 epochs of SGD (momentum 0.9, lr
0.05 x 0.1 at epochs 150/180/210, weight decay 5e-4), batch 64, padded random crop and flip; as
in CRD, the ShuffleV2 student uses lr 0.01.

Time: one step (batch 64) took, on 2 CPU cores shared with another training job (median of 3 steps
after compiling; timings there vary by tens of percent): resnet32x4-resnet8x4 4.6 s (about 10 days);
wrn_40_2-wrn_16_2 1.2 s (about 3 days); resnet56-resnet20 0.9 s (about 45 hours); resnet110-resnet32
2.2 s (about 5 days); vgg13-vgg8 1.6 s (about 3 days); resnet32x4-ShuffleV2 5.7 s (about 12 days);
in brackets, 187,440 steps (240 epochs x 781) at that rate, without evaluation. On CPU these runs
take days to weeks: run them on a GPU (not timed on one here).
"""

from configs import common


def get_config(pair: str = 'resnet32x4-resnet8x4'):
  return common.cifar100_lp_config(pair)
