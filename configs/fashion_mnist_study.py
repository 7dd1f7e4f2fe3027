"""The evidence: every method on Fashion-MNIST, chosen on validation, over seeds; a results page.

  .venv/bin/python launch.py --config=configs/fashion_mnist_study.py --workdir=runs/study
  .venv/bin/python launch.py --config=configs/fashion_mnist_study.py:quick \
    --workdir=runs/study_quick
  .venv/bin/python launch.py --config=configs/fashion_mnist_study.py:full --workdir=runs/study_full

Teacher: the committed cnn_teacher (91.88%). Student: cnn_student (26.7K parameters). For each
method (KD, FitNet, AT, SP, RKD, PKT, LP; and k for LP) three weights around CRD's published
ones are tried on a validation split carved from the training set (train[:90%] / train[90%:]),
one seed; the best weight per method, the student alone and LP+KD are then trained on the whole
training split with 3 seeds and evaluated on the test split. lpe.study writes the page.

- default ('standard'): sweep runs of 100 steps; final runs of 3 x 156 steps (one pass over the
  60,000 training images), 3 seeds. About 50 minutes on 2 CPU cores; writes
  docs/results/fashion_mnist.md.
- 'full': sweep runs of one epoch on train[:90%]; final runs of 3 full epochs, 3 seeds. About
  2.5 hours on 2 CPU cores (estimated from the standard run's step times, not run here);
  writes docs/results/fashion_mnist_full.md.
- 'quick': smoke mode, one weight per method, 2 seeds, 20-step runs: a few minutes; writes
  runs/study_quick/fashion_mnist_quick.md (not a result: too short to mean anything).
"""

import ml_collections

from configs import fashion_mnist_student

COMMAND = (
  '.venv/bin/python launch.py --config=configs/fashion_mnist_study.py{arg} --workdir={workdir}'
)


def get_config(mode: str = 'standard') -> ml_collections.ConfigDict:
  if mode not in ('standard', 'quick', 'full'):
    raise ValueError(f'Unknown study mode {mode!r}; use standard, quick or full.')
  config = ml_collections.ConfigDict()
  base = fashion_mnist_student.get_config()
  base.name = 'study'
  base.teacher.model = 'cnn_teacher'
  base.teacher.checkpoint = 'assets/fashion_mnist_teacher.msgpack'
  base.checkpoint_every_steps = 100
  config.base = base

  # Weights around CRD/RepDistiller's (KD 0.9 vs CE 0.1, FitNet 100, AT 1000, SP 3000, RKD 1,
  # PKT 30000) and the paper.md starting point for LP (0.1), a decade either side.
  config.grid = ml_collections.ConfigDict()
  config.grid.kd = (0.3, 1.0, 3.0)
  config.grid.fitnet = (1.0, 10.0, 100.0)
  config.grid.at = (100.0, 1000.0, 10000.0)
  config.grid.sp = (300.0, 3000.0, 30000.0)
  config.grid.rkd = (0.1, 1.0, 10.0)
  config.grid.pkt = (3000.0, 30000.0, 300000.0)
  config.grid.lp = (0.01, 0.1, 1.0)
  config.lp_k_grid = (5, 10)

  config.sweep = ml_collections.ConfigDict()
  config.sweep.seed = 0
  config.sweep.train_split = 'train[:90%]'
  config.sweep.val_split = 'train[90%:]'
  config.sweep.epochs = 1
  config.sweep.steps_per_epoch_limit = 100

  config.final = ml_collections.ConfigDict()
  config.final.seeds = 3
  config.final.epochs = 3
  config.final.steps_per_epoch_limit = 156

  config.title = 'Fashion-MNIST: locality preservation against the baselines'
  config.page = 'docs/results/fashion_mnist.md'
  config.notes_file = 'docs/results/fashion_mnist_notes.md'
  config.command = COMMAND.format(arg='', workdir='runs/study')
  config.description = (
    'standard mode: 100-step sweep runs, final runs of 3 x 156 steps = one pass over the '
    'training set'
  )
  if mode == 'full':
    config.sweep.steps_per_epoch_limit = 0
    config.final.steps_per_epoch_limit = 0
    config.page = 'docs/results/fashion_mnist_full.md'
    config.notes_file = 'docs/results/fashion_mnist_full_notes.md'
    config.command = COMMAND.format(arg=':full', workdir='runs/study_full')
    config.description = 'full mode: 1-epoch sweep runs, final runs of 3 full epochs'
  if mode == 'quick':
    for method in config.grid:
      config.grid[method] = config.grid[method][1:2]
    config.lp_k_grid = (5,)
    config.sweep.steps_per_epoch_limit = 20
    config.final.seeds = 2
    config.final.epochs = 2
    config.final.steps_per_epoch_limit = 10
    config.page = 'runs/study_quick/fashion_mnist_quick.md'
    config.notes_file = ''
    config.command = COMMAND.format(arg=':quick', workdir='runs/study_quick')
    config.description = 'quick smoke mode: far too short to mean anything'
  return config
