"""The evidence: does locality preservation help thin students at convergence? (studies.study)

  .venv/bin/python launch.py --config=configs/fashion_mnist_study.py --workdir=runs/study
  .venv/bin/python launch.py --config=configs/fashion_mnist_study.py:quick --workdir=runs/quick

Teacher: `cnn_teacher_bn` (assets/fashion_mnist_teacher_bn.msgpack, made by
configs/fashion_mnist_teacher_bn.py). Students: `cnn_student` (the main one, 26.7K parameters,
32-wide embedding: every method), `cnn_tiny` (3.6K, 8-wide) and the thin, deep `fitnet_28` (37K,
64-wide): the student alone, KD, the best relational baseline, LP and the best of the two
graph variants. The recipe is chosen among `recipes` on validation, every weight is swept on
validation (train[:50000] / train[50000:]) with grids extended past an edge optimum, and each
final row trains 5 seeds on the whole training split. docs/results/fashion_mnist_study.md is the
page; every finished run is recorded in docs/results/fashion_mnist_study_runs.jsonl, so the
command resumes (also in another sitting, from a fresh clone) without repeating a run. The page
gives the study's total wall time on 2 CPU cores.

- default: the study as the page reports it.
`--config.page_only=True` trains nothing and writes the page of the students whose runs are all
in the ledger (while the study runs in another process, or after it stopped part-way).

- 'quick': a smoke test of the whole pipeline (two recipes, short grids, two seeds, a few steps
  per epoch), writing runs/quick/page.md and its own ledger; far too short to mean anything.
"""

import ml_collections

from configs import fashion_mnist_student

COMMAND = '.venv/bin/python launch.py --config=configs/fashion_mnist_study.py --workdir=runs/study'


def _base() -> ml_collections.ConfigDict:
  base = fashion_mnist_student.get_config()
  base.name = 'study'
  base.teacher.model = 'cnn_teacher_bn'
  base.teacher.checkpoint = 'assets/fashion_mnist_teacher_bn.msgpack'
  # No augmentation, so the frozen teacher's outputs are computed once (and kept as files for
  # every run of the study) instead of in every step.
  base.teacher.cache_outputs = True
  # The feature baselines pair maps of the same size by name: stage2 is 7x7 in the teacher and in
  # the small CNNs. AT reads stage2 only: the teacher's 14x14x32 stage1 of 60,000 images would
  # not fit the teacher-output cache beside it.
  base.distill.at_features = ('stage2',)
  base.eval_batch_size = 1000
  base.log_every_steps = 10_000  # One progress line per epoch (its last step).
  base.checkpoint_every_steps = 500
  base.keep_checkpoints = 2
  return base


def get_config(mode: str = 'full') -> ml_collections.ConfigDict:
  if mode not in ('full', 'quick'):
    raise ValueError(f'Unknown study mode {mode!r}; use full or quick.')
  config = ml_collections.ConfigDict()
  config.base = _base()
  config.main_student = 'cnn_student'
  config.other_students = ('cnn_tiny', 'fitnet_28')
  config.main_methods = (
    'kd',
    'fitnet',
    'at',
    'sp',
    'rkd',
    'pkt',
    'lp',
    'lp_neighbours',
    'lp_bank',
  )
  config.other_methods = ('kd', 'best_relational', 'lp', 'best_graph_variant')

  # Candidate recipes for the student alone (fields of the run config), cosine schedules.
  config.recipes = ml_collections.ConfigDict()
  config.recipes.adam_1e3 = {'optimizer': 'adam', 'learning_rate': 1e-3}
  config.recipes.adam_3e3 = {'optimizer': 'adam', 'learning_rate': 3e-3}
  config.recipes.sgd_5e2 = {
    'optimizer': 'sgd',
    'learning_rate': 0.05,
    'momentum': 0.9,
    'weight_decay': 5e-4,
  }

  # Starting grids, around CRD/RepDistiller's weights (KD 0.9 vs CE 0.1, FitNet 100, AT 1000,
  # SP 3000, RKD 1, PKT 30000) and paper.md's LP starting point (0.1); an edge optimum extends
  # them. lp_neighbours and lp_bank are the LP weight of the two graph variants.
  config.grids = ml_collections.ConfigDict()
  config.grids.kd = (0.3, 1.0, 3.0)
  config.grids.fitnet = (10.0, 100.0, 1000.0)
  config.grids.at = (100.0, 1000.0, 10000.0)
  config.grids.sp = (300.0, 3000.0, 30000.0)
  config.grids.rkd = (0.3, 1.0, 3.0)
  config.grids.pkt = (3000.0, 30000.0, 300000.0)
  config.grids.lp = (0.03, 0.1, 0.3)
  config.grids.k = (3, 5, 10)
  config.grids.sigma2_scale = (0.5, 1.0, 2.0)
  config.grids.lp_neighbours = (0.03, 0.1, 0.3)
  config.grids.lp_bank = (0.03, 0.1, 0.3)

  config.sweep = ml_collections.ConfigDict()
  config.sweep.train_split = 'train[:50000]'
  config.sweep.val_split = 'train[50000:]'
  config.sweep.epochs = 5  # A quarter of the final budget.
  config.sweep.seed = 0
  config.sweep.max_extensions = 3
  config.sweep.steps_per_epoch_limit = 0

  config.final = ml_collections.ConfigDict()
  config.final.epochs = 20
  config.final.seeds = 5
  config.final.steps_per_epoch_limit = 0

  config.title = 'Fashion-MNIST at convergence: locality preservation against the baselines'
  config.page = 'docs/results/fashion_mnist_study.md'
  config.ledger = 'docs/results/fashion_mnist_study_runs.jsonl'
  config.notes_file = 'docs/results/fashion_mnist_study_notes.md'
  config.command = COMMAND
  config.description = 'the full study'
  # True: train nothing, write the page of the students whose runs are all in the ledger.
  config.page_only = False
  if mode == 'quick':
    config.recipes = ml_collections.ConfigDict(
      {k: config.recipes[k] for k in ('adam_1e3', 'adam_3e3')}
    )
    config.other_students = ('cnn_tiny',)
    config.main_methods = ('kd', 'sp', 'lp', 'lp_neighbours', 'lp_bank')
    for name in config.grids:
      config.grids[name] = config.grids[name][:2]
    config.sweep.epochs, config.sweep.steps_per_epoch_limit, config.sweep.max_extensions = 1, 5, 1
    config.final.epochs, config.final.seeds, config.final.steps_per_epoch_limit = 2, 2, 5
    config.page = 'runs/quick/page.md'
    config.ledger = 'runs/quick/runs.jsonl'
    config.notes_file = ''
    config.command = COMMAND.replace('study.py', 'study.py:quick').replace(
      'runs/study', 'runs/quick'
    )
    config.description = 'quick smoke mode: far too short to mean anything'
  return config
