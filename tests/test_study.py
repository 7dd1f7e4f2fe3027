"""The method study (sweep on validation, seeds, page) runs end to end in its quick mode."""

import json
import os

import ml_collections

from configs import fashion_mnist_student, fashion_mnist_study
from lpe import experiment, report, train


def test_quick_study_writes_the_page(fashion_data_dir, tmp_path):
  teacher = fashion_mnist_student.get_config()
  teacher.data_dir, teacher.num_epochs, teacher.steps_per_epoch_limit = fashion_data_dir, 1, 4
  teacher.batch_size, teacher.eval_batch_size = 32, 26
  train.train_and_evaluate(teacher, str(tmp_path / 'teacher'))

  config = fashion_mnist_study.get_config('quick')
  base = config.base
  base.data_dir, base.batch_size, base.eval_batch_size = fashion_data_dir, 32, 26
  base.teacher.model, base.teacher.checkpoint = 'cnn_student', str(tmp_path / 'teacher')
  # Two methods keep the test short; with both, the LP+KD row is built from their best weights.
  config.grid = ml_collections.ConfigDict({'lp': (0.1, 1.0), 'kd': (1.0,)})
  config.sweep.steps_per_epoch_limit = 3
  config.final.steps_per_epoch_limit = 3
  config.page = str(tmp_path / 'docs' / 'page.md')
  path = experiment.run(config, str(tmp_path / 'study'))

  assert path == config.page
  text = open(path).read()
  for row in ('| teacher |', '| student alone |', '| KD |', '| LP |', '| LP+KD |'):
    assert row in text, row
  assert '±' in text and 'lp_w0.1_k5' in text and 'lp_w1_k5' in text
  assert os.path.exists(tmp_path / 'docs' / 'page_accuracy.png')
  assert os.path.exists(tmp_path / 'docs' / 'page_curves.png')
  with open(tmp_path / 'study' / 'sweep.json') as f:
    sweep = json.load(f)
  assert set(sweep['best']) == {'lp', 'kd'}
  # The best LP weight is the one with the higher validation accuracy.
  lp_rows = [r for r in sweep['rows'] if r['method'] == 'lp']
  assert sweep['best']['lp']['run'] == max(lp_rows, key=lambda r: r['val_accuracy'])['run']
  # Every final run trained with its own seed, two seeds per row.
  for row in ('student', 'lp', 'kd', 'lp_kd'):
    assert sorted(os.listdir(tmp_path / 'study' / 'final' / row)) == ['seed0', 'seed1']
  assert report.LABELS['lp_kd'] == 'LP+KD'
