"""The parts the paper and benchmark configs share; not itself a config (it has no get_config).

Run names: a config `configs/<file>.py` runs in `runs/<file>` (`runs/<file>_<arg>` for a config
that takes an argument), and a distilling config's teacher checkpoint is its teacher config's run.
"""

import ml_collections

from lpe.config import default_config

# The paper's methods: a teacher, the student alone, and the student with KD, LP or both.
PAPER_METHODS = ('teacher', 'student', 'kd', 'lp', 'lp_kd')
# The FitNet student each paper dataset trains unless overridden (`--config.model=fitnet2`).
PAPER_STUDENTS = {'mnist': 'fitnet1', 'cifar10': 'fitnet4', 'cifar100': 'fitnet4'}

# CRD/RepDistiller's CIFAR-100 teacher -> student pairs that the LP student is benchmarked on.
CIFAR100_PAIRS = (
  ('resnet32x4', 'resnet8x4'),
  ('wrn_40_2', 'wrn_16_2'),
  ('resnet56', 'resnet20'),
  ('resnet110', 'resnet32'),
  ('vgg13', 'vgg8'),
  ('resnet32x4', 'ShuffleV2'),
)
CIFAR100_TEACHERS = tuple(dict.fromkeys(teacher for teacher, _ in CIFAR100_PAIRS))
# RepDistiller trains these students with lr 0.01 instead of 0.05.
LOW_LR_STUDENTS = ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')

# Starting points, not tuned: lambda 0.1 was the best of 0.01/0.1/1 on Fashion-MNIST (paper.md).
LP_WEIGHT = 0.1
LP_K = 5
# Hinton's KD added to CE with weight 1 (the loss carries the T^2 factor). CRD's KD baseline uses
# 0.1 CE + 0.9 KD: `--config.distill.ce_weight=0.1 --config.distill.kd_weight=0.9`.
KD_WEIGHT = 1.0
KD_TEMPERATURE = 4.0


def crd_protocol(config: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
  """Sets CRD's CIFAR recipe for training `model`: 240 epochs of SGD, batch 64, crop and flip.

  SGD with momentum 0.9 and weight decay 5e-4, lr 0.05 (0.01 for `LOW_LR_STUDENTS`) times 0.1 at
  epochs 150, 180 and 210.
  """
  config.augment = 'cifar'
  config.num_epochs = 240
  config.batch_size = 64
  config.eval_batch_size = 500
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.learning_rate = 0.01 if model in LOW_LR_STUDENTS else 0.05
  config.weight_decay = 5e-4
  config.lr_schedule = 'step'
  config.lr_decay_epochs = (150, 180, 210)
  config.lr_decay_factor = 0.1
  return config


# RepDistiller's CIFAR-100 normalisation (dataset/cifar100.py), which its teachers were trained
# with; lpe's published constants (lpe.sources.KNOWN) differ in the fourth decimal.
REPDISTILLER_CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
REPDISTILLER_CIFAR100_STD = (0.2675, 0.2565, 0.2761)


def crd_exact(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """RepDistiller's conventions where PyTorch's differ from lpe's defaults (docs/reproducing.md):
  its CIFAR-100 normalisation constants, BatchNorm's running variance from the unbiased batch
  variance, torch.nn.Linear's classifier init, and the last partial batch of each epoch trained
  on (masked: 782 steps per epoch at batch 64, as its DataLoader's, and the learning-rate
  schedule's epochs of 782 steps)."""
  config.data_mean = REPDISTILLER_CIFAR100_MEAN
  config.data_std = REPDISTILLER_CIFAR100_STD
  config.bn_unbiased_var = True
  config.torch_classifier_init = True
  config.last_batch = 'masked'
  return config


def mnist_protocol(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Our MNIST recipe (the paper's is unknown): 20 epochs of SGD with a cosine schedule, batch 128.

  SGD with momentum 0.9, lr 0.05, weight decay 5e-4, no augmentation.
  """
  config.num_epochs = 20
  config.batch_size = 128
  config.eval_batch_size = 1000
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.learning_rate = 0.05
  config.weight_decay = 5e-4
  config.lr_schedule = 'cosine'
  return config


def distill(
  config: ml_collections.ConfigDict, teacher: str, teacher_run: str, *, lp: bool, kd: bool
) -> ml_collections.ConfigDict:
  """Distils `config.model` from the exported `teacher` model of the run in `runs/<teacher_run>`."""
  config.teacher.model = teacher
  config.teacher.checkpoint = f'runs/{teacher_run}'
  if lp:
    config.distill.lp_weight = LP_WEIGHT
    config.distill.k = LP_K
  if kd:
    config.distill.kd_weight = KD_WEIGHT
    config.distill.kd_temperature = KD_TEMPERATURE
  return config


def paper_config(dataset: str, method: str) -> ml_collections.ConfigDict:
  """One of the paper's experiments: `method` (in `PAPER_METHODS`) on `dataset`.

  The teacher is FitNets' maxout CNN, the student `PAPER_STUDENTS[dataset]`. MNIST uses
  `mnist_protocol`, CIFAR-10 and CIFAR-100 `crd_protocol`. Distilling runs load the teacher from
  `runs/<dataset>_teacher` (the run of `configs/<dataset>_teacher.py`).
  """
  if method not in PAPER_METHODS:
    raise ValueError(f'Unknown method {method!r}; use one of {", ".join(PAPER_METHODS)}.')
  config = default_config()
  config.dataset = dataset
  config.model = 'maxout_teacher' if method == 'teacher' else PAPER_STUDENTS[dataset]
  if dataset == 'mnist':
    mnist_protocol(config)
  else:
    crd_protocol(config, config.model)
  if method in ('kd', 'lp', 'lp_kd'):
    distill(
      config,
      'maxout_teacher',
      f'{dataset}_teacher',
      lp=method.startswith('lp'),
      kd=method.endswith('kd'),
    )
  return config


def parse_pair(pair: str) -> tuple[str, str]:
  """`'teacher-student'` (one of `CIFAR100_PAIRS`) as `(teacher, student)`."""
  valid = [f'{t}-{s}' for t, s in CIFAR100_PAIRS]
  if pair not in valid:
    raise ValueError(f'Unknown pair {pair!r}; use one of {", ".join(valid)}.')
  teacher, student = pair.split('-')
  return teacher, student


def cifar100_teacher_config(model: str) -> ml_collections.ConfigDict:
  """A CIFAR-100 benchmark teacher, `model` in `CIFAR100_TEACHERS`, trained with `crd_protocol`."""
  if model not in CIFAR100_TEACHERS:
    raise ValueError(f'Unknown teacher {model!r}; use one of {", ".join(CIFAR100_TEACHERS)}.')
  config = default_config()
  config.dataset = 'cifar100'
  config.model = model
  return crd_exact(crd_protocol(config, model))


def cifar100_lp_config(pair: str) -> ml_collections.ConfigDict:
  """The LP student of a CIFAR-100 benchmark pair `'teacher-student'`: CE + lambda * LP.

  Its teacher is the run of `configs/cifar100_crd_teacher.py:<teacher>`, in
  `runs/cifar100_crd_teacher_<teacher>`.
  """
  teacher, student = parse_pair(pair)
  config = default_config()
  config.dataset = 'cifar100'
  config.model = student
  crd_exact(crd_protocol(config, student))
  return distill(config, teacher, f'cifar100_crd_teacher_{teacher}', lp=True, kd=False)


def cifar100_kd_config(pair: str) -> ml_collections.ConfigDict:
  """RepDistiller's KD row of a CIFAR-100 benchmark pair: 0.1 * CE + 0.9 * KD at T = 4
  (`train_student.py --distill kd -r 0.1 -a 0.9 -b 0`), teacher as in `cifar100_lp_config`."""
  teacher, student = parse_pair(pair)
  config = default_config()
  config.dataset = 'cifar100'
  config.model = student
  crd_exact(crd_protocol(config, student))
  distill(config, teacher, f'cifar100_crd_teacher_{teacher}', lp=False, kd=True)
  config.distill.ce_weight = 0.1
  config.distill.kd_weight = 0.9
  return config
