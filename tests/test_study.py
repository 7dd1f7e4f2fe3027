"""The method study: grids that bracket the optimum, paired statistics, the ledger, the page."""

import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from configs import fashion_mnist_student, fashion_mnist_study
from lpe import objectives, train
from studies import page as study_page
from studies import study


def test_paired_interval_is_the_t_interval_of_the_per_seed_differences():
  values, baseline = [0.91, 0.92, 0.905, 0.915, 0.93], [0.90, 0.91, 0.90, 0.91, 0.915]
  diffs = np.subtract(values, baseline)
  mean, low, high = study_page.paired_interval(values, baseline)
  half = stats.t.ppf(0.975, 4) * diffs.std(ddof=1) / math.sqrt(5)
  assert mean == pytest.approx(diffs.mean())
  assert (low, high) == pytest.approx((diffs.mean() - half, diffs.mean() + half))
  assert low > 0  # These five pairs all improve: the interval excludes 0.
  assert math.isnan(study_page.paired_interval([0.9], [0.8])[1])


@pytest.mark.parametrize(
  'values, edge, key, expected',
  [
    ([0.03, 0.1, 0.3], 2, 'distill.lp_weight', 0.9),
    ([0.03, 0.1, 0.3], 0, 'distill.lp_weight', 0.009),
    ([5], 0, 'distill.kd_weight', 0.5),
    ([3, 5, 10], 2, 'distill.k', 20),
    ([3, 5, 10], 0, 'distill.k', 1),
    ([1, 3], 0, 'distill.k', None),  # k = 1 is a hard bound.
  ],
)
def test_extend_continues_the_grid_past_its_edge(values, edge, key, expected):
  got = study.extend(values, edge, key)
  assert got == (pytest.approx(expected) if expected is not None else None)


class _FakeStudy(study.Study):
  """A study whose runs are not trained: each point's validation accuracy is `score(changes)`."""

  def __init__(self, config, score):
    super().__init__(config, '/nonexistent', False)
    self.score, self.trained = score, []

  def train(self, run_id, config):  # As the ledger does, a run trains once.
    if run_id not in self.ledger:
      self.trained.append(run_id)
      self.ledger[run_id] = {'history': [{'test_accuracy': self.score(config)}], 'result': {}}
    return self.ledger[run_id]


def _config(tmp_path):
  config = fashion_mnist_study.get_config('quick')
  config.ledger = str(tmp_path / 'ledger.jsonl')
  config.grids.lp = (0.03, 0.1, 0.3)
  config.grids.k = (3, 5, 10)
  config.grids.sigma2_scale = (0.5, 1.0, 2.0)
  config.sweep.max_extensions = 3
  return config


def test_a_best_value_on_an_edge_extends_the_grid_until_it_is_bracketed(tmp_path):
  # Validation accuracy peaks at lp_weight 3 (the grid reaches 2.7 and 8.1), k 5 and scale 1.
  def score(run):
    d = run.distill
    return 0.9 - abs(math.log10(d.lp_weight / 3.0)) - abs(d.k - 5) / 100 - abs(d.sigma2_scale - 1)

  fake = _FakeStudy(_config(tmp_path), score)
  result = fake.sweep('cnn_student', 'lp', {}, {}, lp_dimensions=True)
  assert result['changes']['distill.lp_weight'] == pytest.approx(2.7)
  assert result['changes']['distill.k'] == 5 and result['changes']['distill.sigma2_scale'] == 1.0
  weights = result['dimensions'][0]['rows']
  assert [round(r['value'], 6) for r in weights] == [0.03, 0.1, 0.3, 0.9, 2.7, 8.1]
  chosen = [r for r in weights if r['chosen']]
  assert len(chosen) == 1 and 0 < weights.index(chosen[0]) < len(weights) - 1
  assert [r['added'] for r in weights] == [False, False, False, True, True, True]
  # k and the scale were swept at the best weight, and each point trained once.
  assert len(fake.trained) == 6 + 2 + 2


def test_an_optimum_at_a_hard_bound_is_marked_and_stops(tmp_path):
  fake = _FakeStudy(_config(tmp_path), lambda run: 0.9 - run.distill.k / 100)
  result = fake.sweep('cnn_student', 'lp', {}, {}, lp_dimensions=True)
  ks = result['dimensions'][1]
  assert [r['value'] for r in ks['rows']] == [1, 3, 5, 10] and ks['rows'][0]['chosen']
  assert ks['status'] == 'hard bound'
  # The weight did not matter: its best stayed on the edge after every extension, and says so.
  weights = result['dimensions'][0]
  assert weights['status'] == 'edge after extensions' and len(weights['rows']) == 3 + 3


def test_a_diverged_run_is_a_recorded_result_that_ranks_last(tmp_path, monkeypatch):
  """A sweep point whose training goes non-finite is recorded (ledger and page) as diverged and
  never chosen; the study goes on."""

  def fake_train(config, workdir, **kwargs):
    if config.distill.kd_weight >= 1.0:
      raise train.NonFiniteLossError('step 3 gave a non-finite loss')
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write(json.dumps({'epoch': 1, 'test_accuracy': 0.8 + config.distill.kd_weight}) + '\n')
    return {'params': 1}

  monkeypatch.setattr(train, 'train_and_evaluate', fake_train)
  config = _config(tmp_path)
  config.grids.kd = (0.1, 0.3, 1.0)
  config.sweep.max_extensions = 0
  real = study.Study(config, str(tmp_path / 'study'), False)
  result = real.sweep('cnn_student', 'kd', {}, {}, lp_dimensions=False)
  assert result['changes']['distill.kd_weight'] == 0.3
  rows = result['dimensions'][0]['rows']
  assert rows[2]['val_accuracy'] == -math.inf
  with open(config.ledger) as f:
    records = {r['run']: r for r in map(json.loads, f)}
  assert 'non-finite' in records['sweep/cnn_student/kd/kd_weight1']['diverged']
  table = '\n'.join(study_page.sweep_tables('cnn_student', {'kd': result}))
  assert '1: diverged' in table and '**0.3: 110.00**' in table


def _final_record(seed, accuracy):
  history = [{'test_accuracy': accuracy, 'epoch_time_s': 1.0}]
  return {'run': f'final/s/kd/seed{seed}', 'history': history, 'result': {'params': 5}}


def test_a_final_row_with_a_diverged_seed_counts_it_and_pairs_the_others():
  record = _final_record
  alone = study_page.summarise([record(s, 0.90 + s / 1000) for s in range(5)])
  kd = [record(s, 0.91 + s / 1000) for s in range(5)]
  kd[2] = dict(kd[2], diverged='step 7 gave a non-finite loss', result=None)
  summary = study_page.summarise(kd)
  assert summary['diverged'] == 1 and math.isnan(summary['last'][2])
  mean, low, high = study_page.paired_interval(summary['last'], alone['last'])
  assert mean == pytest.approx(0.01) and low == pytest.approx(0.01)  # Four equal pairs.
  table = '\n'.join(study_page.student_table({'student': alone, 'kd': summary}))
  assert 'KD (1 of 5 seeds diverged)' in table and '91.20 ± 0.18' in table  # Seeds 0, 1, 3, 4.
  with pytest.raises(ValueError, match='every seed of final/s/kd diverged'):
    study_page.summarise([dict(r, diverged='x', result=None) for r in kd])


def test_a_row_with_one_seed_so_far_shows_no_spread_and_no_interval():
  rows = {
    'student': study_page.summarise([_final_record(0, 0.9)]),
    'kd': study_page.summarise([_final_record(0, 0.915)]),
  }
  table = '\n'.join(study_page.student_table(rows))
  assert '| 90.00 | 90.00 |' in table and '| 91.50 | 91.50 | +1.50 | one seed |' in table, table
  assert '±' not in table, table


def test_quick_study_writes_the_page_and_resumes_from_its_ledger(
  fashion_data_dir, tmp_path, monkeypatch
):
  teacher = fashion_mnist_student.get_config()
  teacher.data_dir, teacher.num_epochs, teacher.steps_per_epoch_limit = fashion_data_dir, 1, 4
  teacher.batch_size, teacher.eval_batch_size = 32, 26
  train.train_and_evaluate(teacher, str(tmp_path / 'teacher'))

  config = fashion_mnist_study.get_config('quick')
  base = config.base
  base.data_dir, base.batch_size, base.eval_batch_size = fashion_data_dir, 32, 26
  base.teacher.model, base.teacher.checkpoint = 'cnn_student', str(tmp_path / 'teacher')
  base.distill.at_features = ('stage1',)
  # One value per grid but KD's, whose two points show the sweep choosing on validation.
  config.recipes = {'adam_1e3': config.recipes.adam_1e3}
  config.main_methods = ('kd', 'sp', 'lp', 'lp_bank')
  for name in ('sp', 'lp', 'lp_bank'):
    config.grids[name] = config.grids[name][:1]
  config.grids.k, config.grids.sigma2_scale = (4,), (1.0,)
  config.sweep.train_split, config.sweep.val_split = 'train[:384]', 'train[384:]'
  config.sweep.max_extensions = 0
  config.page = str(tmp_path / 'docs' / 'page.md')
  config.ledger = str(tmp_path / 'docs' / 'runs.jsonl')
  written = []  # The page after each student: (pending students, text).
  write = study_page.write_study_page

  def spy(*args, **kwargs):
    page = write(*args, **kwargs)
    written.append((list(kwargs.get('pending', ())), open(page).read()))
    return page

  monkeypatch.setattr(study_page, 'write_study_page', spy)
  path = study.run(config, str(tmp_path / 'study'))

  assert path == config.page
  text = open(path).read()
  # Part-way, the page shows the main student and names the one still to come.
  assert [pending for pending, _ in written] == [['cnn_tiny'], []]
  assert '**In progress**' in written[0][1] and '`cnn_tiny`' in written[0][1]
  assert '| LP |' in written[0][1] and '## `cnn_tiny`' not in written[0][1]
  assert '**In progress**' not in text
  for row in ('| student alone |', '| KD |', '| LP |', '| SP |', 'memory bank', '## `cnn_tiny`'):
    assert row in text, row
  assert '±' in text and '[' in text  # Mean ± std, and paired intervals.
  for plot in ('gain_vs_size', 'paired', 'curves', 'recipes'):
    assert os.path.exists(tmp_path / 'docs' / f'page_{plot}.png'), plot
  with open(config.ledger) as f:
    records = [json.loads(line) for line in f]
  runs = {r['run'] for r in records}
  assert len(runs) == len(records)  # Each run trained once.
  assert {'final/cnn_student/lp/seed0', 'final/cnn_student/lp/seed1'} <= runs
  assert 'final/cnn_tiny/sp/seed1' in runs  # cnn_tiny's best relational baseline: the only one.
  # The student alone at the sweep budget, once per student, shown as the sweeps' reference.
  assert {'sweep/cnn_student/student', 'sweep/cnn_tiny/student'} <= runs
  assert '| cnn_student | student alone | no distillation | 0: ' in text
  # Seed by seed: every row's seed 0 trains before any row's seed 1.
  order = [r['run'] for r in records if r['run'].startswith('final/cnn_student/')]
  assert order.index('final/cnn_student/lp_bank/seed0') < order.index(
    'final/cnn_student/student/seed1'
  )
  kd = [r for r in records if r['run'].startswith('sweep/cnn_student/kd/')]
  best = max(kd, key=lambda r: r['history'][-1]['test_accuracy'])['run'].split('kd_weight')[1]
  assert 'final/cnn_student/kd/seed0' in runs and f'**{best}:' in text

  # Run again (a new sitting, even without the workdir): nothing trains, the same page comes back.
  def refuse(*args, **kwargs):
    raise AssertionError('a run in the ledger was trained again')

  monkeypatch.setattr(train, 'train_and_evaluate', refuse)
  os.rename(tmp_path / 'study', tmp_path / 'study_moved')
  assert study.run(config, str(tmp_path / 'study')) == path
  assert open(path).read() == text

  # page_only, with cnn_tiny's last final missing from the ledger: in progress, the main student
  # whole, cnn_tiny's rows with the one seed they all have; nothing trained.
  with open(config.ledger) as f:
    kept = [line for line in f if json.loads(line)['run'] != 'final/cnn_tiny/sp/seed1']
  with open(config.ledger, 'w') as f:
    f.writelines(kept)
  config.page_only = True
  assert study.run(config, str(tmp_path / 'study')) == path
  partial = open(path).read()
  assert '**In progress**' in partial and '## `cnn_tiny` (subset; 1 of 2 seeds so far)' in partial

  def main_table(page):
    return page.split('## `cnn_student`')[1].split('\n## ')[0]

  def sweeps_of(page):  # The main student's sweep rows.
    return [line for line in page.splitlines() if line.startswith('| cnn_student |')]

  assert main_table(partial) == main_table(written[0][1])
  # Before any final run: the recipes and the finished sweeps, no final table and no plots.
  with open(config.ledger, 'w') as f:
    f.writelines(line for line in kept if not json.loads(line)['run'].startswith('final/'))
  assert study.run(config, str(tmp_path / 'study')) == path
  early = open(path).read()
  assert '## `cnn_student`' not in early and '## Plots' not in early
  assert sweeps_of(early) == sweeps_of(text)
  assert 'final rows are not trained yet' in early
  # Without the recipe runs there is nothing to show; the error says what to run.
  with open(config.ledger, 'w') as f:
    f.writelines(line for line in kept if json.loads(line)['run'].startswith('sweep/'))
  with pytest.raises(ValueError, match='run the study without page_only'):
    study.run(config, str(tmp_path / 'study'))


def test_a_torn_last_ledger_record_is_cut_and_a_bad_middle_one_stops(tmp_path):
  ledger = tmp_path / 'runs.jsonl'
  good = json.dumps({'run': 'a', 'digest': 'x'}) + '\n'
  ledger.write_text(good + '{"run": "b", "dig')  # A kill mid-append.
  assert set(study._read_ledger(str(ledger))) == {'a'}
  assert ledger.read_text() == good
  ledger.write_text('{"run": "b", "dig\n' + good)
  with pytest.raises(ValueError, match='runs.jsonl line 1 is unreadable .*remove that line'):
    study._read_ledger(str(ledger))


def test_the_gain_plot_shows_kd_lp_and_every_graph_variant_from_the_first_student():
  assert {'kd', 'lp', *study.GRAPH_VARIANTS} == set(study_page._ALWAYS_PLOTTED)


@pytest.mark.parametrize('name', ['fashion_mnist_study', 'fashion_mnist_locality_study'])
def test_the_committed_ledger_still_answers_every_run_of_the_study(tmp_path, name):
  """Every run of a committed study is found in its ledger by its config's digest (settings
  added to lpe since are digest-neutral at their defaults), so the page is rebuilt unchanged."""
  config = importlib.import_module(f'configs.{name}').get_config()
  committed_page = config.page
  config.page_only = True
  config.page = str(tmp_path / os.path.basename(committed_page))
  page = study.run(config, str(tmp_path / 'work'))
  with open(page) as f, open(committed_page) as committed:
    assert f.read() == committed.read()


# --- the follow-up study (issue 21): reused rows, two-seed sweeps, chosen forms, Holm ----------


def _fake_trainer(trained: list):
  """`train.train_and_evaluate` without training: a run's accuracy is a fixed function of its
  config (the 'mean' form best, at LP weight 1), written as a one-epoch metrics.jsonl."""

  def fake(config, workdir, **_):
    d = config.distill
    accuracy = 0.90 + 0.001 * config.seed
    if d.lp_weight:
      accuracy += {'none': 0.0, 'l2': 0.004, 'mean': 0.008}[d.student_scale]
      accuracy -= 0.002 * abs(math.log10(d.lp_weight))
      accuracy += 0.001 * (d.lp_graph == 'bank')
    accuracy += 0.002 * bool(d.kd_weight) - 0.02 * (d.lp_graph == 'neighbours' and not d.lp_weight)
    accuracy -= 0.05 * bool(config.train_subset)
    trained.append(config.name)
    os.makedirs(workdir, exist_ok=True)
    record = {
      'epoch': 1,
      'test_accuracy': accuracy,
      'test_neighbourhood_preservation': 0.2,
      'test_cka': 0.8,
      'epoch_time_s': 1.0,
    }
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write(json.dumps(record) + '\n')
    return {'params': 1000, 'objective': objectives.describe(d)}

  return fake


def test_the_follow_up_study_reuses_rows_sweeps_two_seeds_and_reports_holm(tmp_path, monkeypatch):
  from configs import fashion_mnist_locality_study

  trained = []
  monkeypatch.setattr(study.train, 'train_and_evaluate', _fake_trainer(trained))
  config = fashion_mnist_locality_study.get_config('quick')
  config.previous.ledger = str(tmp_path / 'previous.jsonl')
  config.previous.page = str(tmp_path / 'previous.md')
  config.previous.main_methods = ('kd', 'sp', 'lp')
  config.previous.other_methods = ('kd', 'lp')
  config.reuse_ledgers = (config.previous.ledger,)
  config.ledger, config.page = str(tmp_path / 'followup.jsonl'), str(tmp_path / 'followup.md')
  study.run(config.previous, str(tmp_path / 'work'))  # The previous study, whole.
  before = len(trained)
  page = study.run(config, str(tmp_path / 'work'))
  followup = trained[before:]
  # The previous study's final rows are reused, not trained again.
  assert not any(
    r.startswith('final/cnn_student/' + m + '/')
    for r in followup
    for m in ('kd', 'sp', 'lp', 'student')
  )
  # New sweeps run both seeds of each point; the mean decides.
  lp_mean = [r for r in followup if r.startswith('sweep/cnn_student/lp_mean/')]
  assert lp_mean and {r[-6:] for r in lp_mean} == {'/seed0', '/seed1'}
  ledger = study._read_ledger(config.ledger)
  finals = {r.split('/')[2] for r in ledger if r.startswith('final/cnn_student/')}
  assert finals == {'lp_l2', 'lp_mean', 'lp_neighbours_added', 'neighbours_control', 'lp_bank_warm'}
  # The graph variants take the better scale-invariant form ('mean'); the other settings resolve
  # the chosen names, from their own sweeps (few labels) or the main student's (fitnet_28).
  followup_ledger = study.Study(config, str(tmp_path / 'work'), False)
  assert {r.split('/')[2] for r in ledger if r.startswith('final/cnn_student_few/')} == {
    'student',
    'kd',
    'lp',
    'lp_mean',
    'lp_bank_warm',
  }
  assert {r.split('/')[2] for r in ledger if r.startswith('final/fitnet_28/')} == {
    'student',
    'lp_mean',
    'lp_bank_warm',
  }
  assert followup_ledger.ledger == ledger
  text = open(page).read()
  assert '| LP, mean-normalised student | CE + 1 LP (mean) |' in text
  assert 'Holm-adjusted p' in text and '(reused)' in text and '**In progress**' not in text
  assert '| +0.80 [+0.80, +0.80] | 0.000 | 0.000 | better |' in text  # Every seed +0.8 pp.
  assert '| -2.00 [-2.00, -2.00] | 0.000 | 0.000 | worse |' in text  # The control, -2 pp.
  assert '**1: 90.85 (90.80, 90.90)**' in text  # A sweep point: the mean and each seed.
  # Rerunning trains nothing: every run is in the ledgers.
  again = len(trained)
  study.run(config, str(tmp_path / 'work'))
  assert len(trained) == again


def test_holm_adjusts_step_down_and_keeps_the_order():
  adjusted = study_page.holm_adjusted({'a': 0.01, 'b': 0.04, 'c': 0.03, 'd': math.nan})
  assert adjusted['a'] == pytest.approx(0.03)
  assert adjusted['c'] == pytest.approx(0.06) and adjusted['b'] == pytest.approx(0.06)
  assert math.isnan(adjusted['d'])
  assert study_page.holm_adjusted({'a': 0.5, 'b': 0.6}) == {'a': 1.0, 'b': 1.0}
  values, baseline = [0.91, 0.92, 0.905], [0.90, 0.915, 0.90]
  expected = stats.ttest_rel(values, baseline).pvalue
  assert study_page.paired_p_value(values, baseline) == pytest.approx(expected)
  assert math.isnan(study_page.paired_p_value([0.9], [0.8]))


def test_lp_rows_are_compared_with_the_best_relational_baseline():
  """The best relational baseline is the one with the highest mean; each LP row is paired with it
  by seed, and Holm's correction runs over those comparisons alone."""

  def row(last):
    return {'last': last}

  rows = {
    'student': row([0.900, 0.901, 0.902]),
    'sp': row([0.910, 0.911, 0.912]),
    'rkd': row([0.915, 0.917, 0.916]),
    'lp_l2': row([0.905, 0.906, 0.907]),
    'lp': row([0.915, 0.916, 0.917]),
    'neighbours_control': row([0.95, 0.95, 0.95]),
  }
  lines = study_page.against_best_baseline(rows)
  text = '\n'.join(lines)
  assert 'best relational baseline, RKD (91.60 ± 0.10' in text
  assert '| LP, L2-normalised student | -1.00 [-1.25, -0.75] | 0.003 | 0.007 | worse |' in text
  assert '| LP | +0.00 [-0.25, +0.25]' in text and 'not resolved' in text
  assert 'control' not in text and len(lines) == 6  # Two LP rows, no other row.
  assert study_page.against_best_baseline({'student': rows['student'], 'lp': rows['lp']}) == []


def test_the_library_loads_neither_the_studies_nor_their_dependencies():
  """`studies` is a tool beside lpe: a training run imports none of it, nor scipy or matplotlib."""
  code = (
    'import sys, lpe.train, lpe.experiment, lpe.report; '
    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('studies', 'matplotlib', 'scipy')))"
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout


def test_a_study_runs_on_an_npz_dataset_with_its_validation_carved_by_slices(tmp_path):
  """A user's own data: an .npz, a teacher trained on it, sweeps on `train[:80%]` scored on
  `train[80%:]`, finals on the whole split."""
  rng = np.random.default_rng(0)

  def images(labels):
    x = rng.integers(0, 60, (len(labels), 28, 28, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
      x[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 220
    return x

  train_labels, test_labels = rng.integers(0, 10, 320), rng.integers(0, 10, 100)
  path = tmp_path / 'mine.npz'
  np.savez(
    path,
    train_images=images(train_labels),
    train_labels=train_labels,
    test_images=images(test_labels),
    test_labels=test_labels,
  )
  base = fashion_mnist_student.get_config()
  base.dataset, base.batch_size, base.eval_batch_size = f'npz:{path}', 32, 50
  base.num_epochs, base.log_every_steps, base.checkpoint_every_steps = 1, 100, 100
  teacher_dir = str(tmp_path / 'teacher')
  train.train_and_evaluate(base, teacher_dir)
  base.teacher.model, base.teacher.checkpoint, base.teacher.cache_outputs = (
    'cnn_student',
    teacher_dir,
    True,
  )
  config = fashion_mnist_study.get_config('quick')
  config.base = base
  config.recipes = {'adam_1e3': {'optimizer': 'adam', 'learning_rate': 1e-3}}
  config.main_student, config.other_students, config.main_methods = 'cnn_tiny', (), ('kd',)
  config.grids.kd = (1.0,)
  config.sweep.train_split, config.sweep.val_split = 'train[:80%]', 'train[80%:]'
  config.sweep.epochs, config.sweep.steps_per_epoch_limit = 1, 3
  config.final.epochs, config.final.seeds, config.final.steps_per_epoch_limit = 1, 2, 3
  config.ledger, config.page = str(tmp_path / 'ledger.jsonl'), str(tmp_path / 'page.md')
  page = study.run(config, str(tmp_path / 'study'))
  ledger = study._read_ledger(config.ledger)
  assert set(ledger) == {
    'recipe/adam_1e3',
    'sweep/cnn_tiny/student',
    'sweep/cnn_tiny/kd/kd_weight1',
    *(f'final/cnn_tiny/{row}/seed{s}' for row in ('student', 'kd') for s in (0, 1)),
  }
  sweep_config = json.load(open(tmp_path / 'study/runs/sweep/cnn_tiny/kd/kd_weight1/config.json'))
  assert (sweep_config['train_split'], sweep_config['test_split']) == ('train[:80%]', 'train[80%:]')
  assert '## `cnn_tiny`' in open(page).read()
