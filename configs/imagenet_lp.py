r"""ImageNet (ILSVRC-2012): the LP student of a torchvision teacher, on the standard KD benchmark.

The argument after the colon names the pair (default resnet34-resnet18):

  .venv/bin/python launch.py --config=configs/imagenet_lp.py:resnet34-resnet18 \
    --workdir=runs/imagenet_lp_resnet34-resnet18
  .venv/bin/python launch.py --config=configs/imagenet_lp.py:resnet50-mobilenet_v2 \
    --workdir=runs/imagenet_lp_resnet50-mobilenet_v2

First prepare `imagenet2012` with TFDS (array_record) and convert the teacher from torchvision's
weights (`resnet34-b627a593.pth`, `resnet50-0676ba61.pth`; needs torch, once):

  .venv/bin/python -c "from lpe import torch_convert; torch_convert.convert_pth(
    'resnet34-b627a593.pth', 'imagenet_resnet34', 'teachers/imagenet_resnet34.msgpack',
    num_classes=1000, dataset='imagenet2012')"

docs/data.md has both steps and how to run on one GPU host, several hosts or a TPU pod slice.

The recipe is the one DKD's mdistiller publishes for both pairs (configs/imagenet/r34_r18/kd.yaml
and configs/imagenet/r50_mv2/kd.yaml, with mdistiller/dataset/imagenet.py; CRD and torchdistill
use the same schedule at batch 256 with lr 0.1): 100 epochs of SGD (momentum 0.9, weight decay
1e-4 on every parameter) at batch 512, lr 0.2 times 0.1 at epochs 30, 60 and 90; training images
are random-resized crops to 224 (scale 0.08-1, ratio 3/4-4/3) with a random flip, test images the
central 224 crop of the image resized to 256 on its shorter side; inputs normalised with
torchvision's constants (the teacher's). The objective is CE + 0.1 * LP (k = 5) on the pooled
embeddings (512 wide for both ResNets; 2048 and 1280 for ResNet-50 and MobileNetV2): lambda = 0.1
is untuned (the Fashion-MNIST best), as in the CIFAR-100 configs.

Time: 250,200 steps (100 epochs x 2,502). Not timed here (no GPU); on one 8-GPU host the
reference PyTorch runs take about a day for ResNet-18 and two for MobileNetV2. On CPU it is out of
reach.
"""

import ml_collections

from configs import common
from lpe import sources
from lpe.config import default_config

# Teacher -> student pairs, as lpe model names; the teacher is read from
# teachers/<teacher>.msgpack, converted from torchvision's weights.
PAIRS = {
  'resnet34-resnet18': ('imagenet_resnet34', 'imagenet_resnet18'),
  'resnet50-mobilenet_v2': ('imagenet_resnet50', 'imagenet_mobilenet_v2'),
}


def imagenet_protocol(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """mdistiller's ImageNet recipe (see the module docstring), streamed from TFDS's files."""
  config.dataset = 'imagenet2012'
  config.train_split, config.test_split = 'train', 'validation'
  config.image_size = sources.IMAGENET_SIZE
  config.data_mean, config.data_std = sources.IMAGENET_MEAN, sources.IMAGENET_STD
  config.augment = 'imagenet'
  config.input = 'stream'
  config.input_workers = 16  # Per host: decoding and cropping 224x224 JPEGs is CPU-heavy.
  config.num_epochs = 100
  config.batch_size = 512
  config.eval_batch_size = 512
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.learning_rate = 0.2
  config.weight_decay = 1e-4
  config.lr_schedule = 'step'
  config.lr_decay_epochs = (30, 60, 90)
  config.lr_decay_factor = 0.1
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  return config


def get_config(pair: str = 'resnet34-resnet18') -> ml_collections.ConfigDict:
  if pair not in PAIRS:
    raise ValueError(f'Unknown pair {pair!r}; use one of {", ".join(PAIRS)}.')
  teacher, student = PAIRS[pair]
  config = imagenet_protocol(default_config())
  config.name = f'imagenet_lp_{pair}'
  config.model = student
  config.teacher.model = teacher
  config.teacher.checkpoint = f'teachers/{teacher}.msgpack'  # lpe.torch_convert's output.
  config.distill.lp_weight = common.LP_WEIGHT
  config.distill.k = common.LP_K
  return config
