"""Follow-up evidence: does locality preservation help once it cannot shrink the student? (issue 21)

  .venv/bin/python launch.py --config=configs/fashion_mnist_locality_study.py \
    --workdir=runs/locality
  .venv/bin/python launch.py --config=configs/fashion_mnist_locality_study.py:quick \
    --workdir=runs/lq

The first study (configs/fashion_mnist_study.py, docs/results/fashion_mnist_study.md) found no
resolved gain for the paper's LP loss, which the student satisfies by shrinking its embedding.
This one adds, beside that study's final rows (reused from its ledger, never trained again):

- `cnn_student` on the whole training split: LP on L2-normalised student embeddings ('l2'), LP
  divided by the batch's mean squared student distance ('mean'), the neighbour-aware batches
  repaired (the ordinary batch as anchors, every image once per epoch, graph neighbours added on
  top) and their control (the same batches, LP off), and the memory bank repaired (LP's weight
  warmed up over the first epoch, the bank filled with batch statistics); both graph variants
  with the better of the two scale-invariant forms.
- `cnn_student_few`: few labels, a fixed stratified subset of 6,000 images of train[:50000] (the
  same for every method and seed), 40 epochs: the student alone, KD, SP, RKD, PKT, LP (the
  paper's form), the better scale-invariant LP and the better repaired graph variant, each swept
  on this setting's validation.
- `fitnet_28` (cut to fit the compute: no sweeps, the main student's chosen points): the better
  scale-invariant LP and the better repaired graph variant.

Sweeps: 2 seeds at half the final budget, the choice by their mean. Verdicts: paired t-intervals
and Holm's correction over each setting's comparisons with the student alone. Every run is
recorded in docs/results/fashion_mnist_locality_study_runs.jsonl; the command resumes (also in a
later sitting, from a fresh clone) without repeating a run, and `--config.page_only=True` writes
the page from the ledger alone.

- 'quick': a smoke test of the whole pipeline on a few steps per epoch, with its own ledger.
"""

import ml_collections

from configs import fashion_mnist_study

COMMAND = (
  '.venv/bin/python launch.py --config=configs/fashion_mnist_locality_study.py '
  '--workdir=runs/locality'
)
NEW_LP_ROWS = ('lp_l2', 'lp_mean', 'lp_neighbours_added', 'neighbours_control', 'lp_bank_warm')


def get_config(mode: str = 'full') -> ml_collections.ConfigDict:
  if mode not in ('full', 'quick'):
    raise ValueError(f'Unknown study mode {mode!r}; use full or quick.')
  previous = fashion_mnist_study.get_config(mode)
  config = ml_collections.ConfigDict()
  config.previous = previous
  config.reuse_ledgers = (previous.ledger,)
  config.base = previous.base  # The same runs as the previous study's, so its rows are reused.

  config.settings = ml_collections.ConfigDict()
  config.settings.cnn_student = dict(
    model='cnn_student',
    description='the main student, whole training split',
    reused=('student', 'kd', 'sp', 'rkd', 'pkt', 'lp', 'lp_neighbours', 'lp_bank'),
    swept=('lp_l2', 'lp_mean', 'lp_neighbours_added', 'lp_bank_warm'),
    rows=NEW_LP_ROWS,
  )
  config.settings.cnn_student_few = dict(
    model='cnn_student',
    description='few labels: a fixed stratified 6,000 images of train[:50000], 40 epochs',
    changes={'train_subset': 6000, 'train_split': 'train[:50000]'},
    sweep_epochs=20,
    final_epochs=40,
    swept=(
      'kd',
      'sp',
      'rkd',
      'pkt',
      'lp',
      'lp_l2',
      'lp_mean',
      'lp_neighbours_added',
      'lp_bank_warm',
    ),
    rows=(
      'student',
      'kd',
      'sp',
      'rkd',
      'pkt',
      'lp',
      'best_scale_invariant_lp',
      'best_repaired_graph_lp',
    ),
  )
  config.settings.fitnet_28 = dict(
    model='fitnet_28',
    description="the thin, deep FitNet, whole training split, at the main student's points",
    reused=('student', 'kd', 'rkd', 'lp', 'lp_bank'),
    weights_from='cnn_student',
    rows=('best_scale_invariant_lp', 'best_repaired_graph_lp'),
  )

  # The scale-invariant forms' terms are of order 1 (unit vectors, or distances over their mean),
  # so their grids reach weights at which the term matches CE and beyond, where a form may
  # collapse; the page shows every point.
  config.grids = ml_collections.ConfigDict(dict(previous.grids))
  config.grids.lp_l2 = (0.3, 1.0, 3.0, 10.0)
  config.grids.lp_mean = (0.3, 1.0, 3.0, 10.0)
  config.grids.lp_neighbours_added = (0.3, 1.0, 3.0)
  config.grids.lp_bank_warm = (0.3, 1.0, 3.0)

  config.sweep = ml_collections.ConfigDict(dict(previous.sweep))
  config.sweep.seeds = (0, 1)
  config.sweep.epochs = 10  # Half the final budget.
  config.sweep.max_extensions = 2
  config.final = ml_collections.ConfigDict(dict(previous.final))

  config.title = 'Fashion-MNIST follow-up: scale-invariant and repaired locality preservation'
  config.page = 'docs/results/fashion_mnist_locality_study.md'
  config.ledger = 'docs/results/fashion_mnist_locality_study_runs.jsonl'
  config.notes_file = 'docs/results/fashion_mnist_locality_study_notes.md'
  config.command = COMMAND
  config.page_only = False
  if mode == 'quick':
    for name in config.grids:
      config.grids[name] = config.grids[name][:2]
    config.sweep.epochs, config.sweep.steps_per_epoch_limit = 1, 5
    config.sweep.max_extensions = 1
    config.final.epochs, config.final.seeds, config.final.steps_per_epoch_limit = 2, 2, 5
    few = config.settings.cnn_student_few
    few.sweep_epochs, few.final_epochs = 1, 2
    few.changes = {'train_subset': 640, 'train_split': 'train[:50000]'}
    few.swept = ('kd', 'lp', 'lp_l2', 'lp_mean', 'lp_neighbours_added', 'lp_bank_warm')
    few.rows = ('student', 'kd', 'lp', 'best_scale_invariant_lp', 'best_repaired_graph_lp')
    config.settings.cnn_student.reused = ('student', 'kd', 'sp', 'lp')
    config.settings.fitnet_28.reused = ()
    config.settings.fitnet_28.rows = ('student', *config.settings.fitnet_28.rows)
    config.settings.fitnet_28.model = 'cnn_tiny'
    config.page = 'runs/lq/page.md'
    config.ledger = 'runs/lq/runs.jsonl'
    config.notes_file = ''
    config.command = COMMAND.replace('study.py', 'study.py:quick').replace(
      'runs/locality', 'runs/lq'
    )
  return config
