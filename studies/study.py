"""A method study at convergence: a tuned recipe, sweeps that bracket the optimum, paired seeds.

One command runs it all, and runs it again after a kill (or in another sitting) from where it
stopped. Stages, each made of ordinary `train.train_and_evaluate` runs in their own workdirs:

1. Recipe: the student alone, trained with each of `config.recipes` on the validation split
   (`config.sweep.train_split` / `config.sweep.val_split`, both carved from the training set) for
   the final budget; the best last-epoch validation accuracy picks the recipe that every later
   run keeps.
2. Sweeps: for each student and each of its methods, the method's weight on validation, one seed,
   `config.sweep.epochs` epochs; for LP then k and the bandwidth scale at the best weight. A best
   value on a grid's edge extends the grid past that edge (up to `config.sweep.max_extensions`
   times, or until a hard bound such as k = 1), so the page can show every optimum bracketed.
3. Finals: every row (the student alone and each method at its best point) on the whole training
   split with `config.final.seeds` seeds, scored on the test split after every epoch.

Every finished run is appended to `config.ledger` (JSON lines: its config digest, epoch records
and result). A run already in the ledger with the same config is never trained again, so the
ledger, committed as results come in, carries the study across machines and sittings; the page
(`lpe.report.write_study_page`) is written from the ledger alone.
"""

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections

from lpe import checkpoint, methods, metrics_io, report, train
from studies import page as study_page


@dataclasses.dataclass(frozen=True)
class Method:
  """A study row's method: the config field of its weight (None: nothing to sweep) and the
  settings it always has; `scale_free` rows take the better of the scale-invariant LP forms."""

  weight: str | None
  fixed: tuple[tuple[str, Any], ...] = ()
  scale_free: bool = False


_ADDED = (('distill.lp_graph', 'neighbours'), ('distill.neighbour_batches', 'added'))
_WARM_BANK = (
  ('distill.lp_graph', 'bank'),
  ('distill.lp_warmup_epochs', 1.0),
  ('distill.bank_fill', 'train'),
)
METHODS = {
  # Every method of lpe by its weight, then the study's LP variants.
  **{name: Method(f'distill.{name}_weight') for name in methods.METHODS},
  'lp_neighbours': Method('distill.lp_weight', (('distill.lp_graph', 'neighbours'),)),
  'lp_bank': Method('distill.lp_weight', (('distill.lp_graph', 'bank'),)),
  # The scale-invariant forms and the repaired graph variants (the follow-up study, issue 21).
  'lp_l2': Method('distill.lp_weight', (('distill.student_scale', 'l2'),)),
  'lp_mean': Method('distill.lp_weight', (('distill.student_scale', 'mean'),)),
  'lp_neighbours_added': Method('distill.lp_weight', _ADDED, scale_free=True),
  'neighbours_control': Method(None, _ADDED),
  'lp_bank_warm': Method('distill.lp_weight', _WARM_BANK, scale_free=True),
}
RELATIONAL = study_page.RELATIONAL_BASELINES
GRAPH_VARIANTS = ('lp_neighbours', 'lp_bank')
SCALE_INVARIANT = ('lp_l2', 'lp_mean')
REPAIRED_GRAPH_VARIANTS = ('lp_neighbours_added', 'lp_bank_warm')
# Other students' rows name these; the main student's validation sweep resolves them.
CHOSEN = {
  'best_relational': RELATIONAL,
  'best_graph_variant': GRAPH_VARIANTS,
  'best_scale_invariant_lp': SCALE_INVARIANT,
  'best_repaired_graph_lp': REPAIRED_GRAPH_VARIANTS,
}
# The LP family: rows that keep the previous study's best k and bandwidth scale.
LP_FAMILY = ('lp', *GRAPH_VARIANTS, *SCALE_INVARIANT, *REPAIRED_GRAPH_VARIANTS)
# LP's other dimensions, swept one after the other at the best weight; the graph variants keep
# LP's best values of them (their graph has the same k).
LP_DIMENSIONS = ('distill.k', 'distill.sigma2_scale')


# Settings added to lpe after a ledger's first runs, with the value at which each trains exactly
# as lpe did before it existed. At that value a setting is left out of the digest, so the runs
# recorded before it was added stay valid; any other value is part of the digest.
DIGEST_NEUTRAL = {
  'train_subset': 0,
  'train_subset_seed': 0,
  'distill.student_scale': 'none',
  'distill.lp_warmup_epochs': 0.0,
  'distill.neighbour_batches': 'within',
  'distill.bank_fill': 'inference',
  'bn_unbiased_var': False,
  'torch_classifier_init': False,
  'last_batch': 'drop',
  'cpu_devices': 0,
}


def config_digest(config: ml_collections.ConfigDict) -> str:
  """A short hash of a run config's training-relevant fields (not where files live)."""
  fields = json.loads(config.to_json_best_effort())
  for key in ('name', 'data_dir', 'log_every_steps', 'checkpoint_every_steps', 'input'):
    fields.pop(key, None)
  fields.get('teacher', {}).pop('cache_dir', None)
  for key, neutral in DIGEST_NEUTRAL.items():
    *parents, leaf = key.split('.')
    group = fields
    for parent in parents:
      group = group.get(parent, {})
    if leaf in group and group[leaf] == neutral:
      del group[leaf]
  return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def extend(values: list[float], edge: int, key: str) -> float | None:
  """The next grid value past the edge at index `edge` (0 or last), or None at a hard bound.

  Weights and scales continue the ratio of the two values at that edge (x10 from a one-point
  grid); k doubles or halves, and stops at 1.
  """
  low = edge == 0
  if key == 'distill.k':
    value = values[0] // 2 if low else values[-1] * 2
    return None if low and values[0] <= 1 else max(int(value), 1)
  if len(values) == 1:
    return values[0] / 10 if low else values[0] * 10
  return values[0] ** 2 / values[1] if low else values[-1] ** 2 / values[-2]


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split('.')
  for parent in parents:
    config = config[parent]
  config[leaf] = value


def _name(value: Any) -> str:
  return f'{value:g}' if isinstance(value, float) else str(value)


class Study:
  """One study's runs in `workdir`, recorded in `config.ledger`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, allow_config_change: bool):
    self.config, self.workdir = config, workdir
    self.resume = 'any' if allow_config_change else 'same'  # `lpe.config.Resume`.
    self.ledger = _read_ledger(config.ledger)
    # Runs of earlier studies (read only): a run with the same id and config digest is taken
    # from them instead of being trained again.
    self.reused = {}
    for path in config.get('reuse_ledgers', ()):
      self.reused.update(_read_ledger(path))
    self.reporter = report.Reporter('study')

  def run_config(
    self,
    model: str,
    changes: dict[str, Any],
    *,
    seed: int,
    final: bool,
    recipe: dict,
    epochs: int | None = None,
  ) -> ml_collections.ConfigDict:
    """A run of `model` with the recipe and `changes`, on validation or (final) the test split,
    for `epochs` (None: the stage's)."""
    config = self.config.base.copy_and_resolve_references()
    for key, value in {**recipe, **changes}.items():
      _set(config, key, value)
    stage = self.config.final if final else self.config.sweep
    config.model, config.seed, config.num_epochs = model, seed, epochs or stage.epochs
    config.teacher.cache_dir = os.path.join(self.workdir, 'teacher_cache')
    config.steps_per_epoch_limit = stage.steps_per_epoch_limit
    if not final:
      config.train_split, config.test_split = stage.train_split, stage.val_split
    return config

  def train(self, run_id: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The ledger's record of `run_id`, training it first unless the ledger holds this config."""
    digest = config_digest(config)
    for ledger in (self.ledger, self.reused):
      record = ledger.get(run_id)
      if record is not None and record['digest'] == digest:
        return record
    if self.config.get('page_only', False):
      raise _NotInLedger(run_id)
    config.name = run_id
    workdir = os.path.join(self.workdir, 'runs', run_id)
    start = time.time()
    diverged = None
    try:
      result = train.train_and_evaluate(config, workdir, resume=self.resume)
    except train.NonFiniteLossError as error:
      # A result of the study, not a crash of it: the point scores below every other, and
      # a final row says how many seeds diverged.
      result, diverged = None, str(error)
      self.reporter.warning(f'{run_id} diverged: {error}')
    record = {
      'run': run_id,
      'digest': digest,
      'history': metrics_io.read_metrics(workdir),
      'result': result,
      'wall_s': time.time() - start,
      'machine': _machine(),
    }
    if diverged is not None:
      record['diverged'] = diverged
    _append_ledger(self.config.ledger, record)
    self.ledger[run_id] = record
    return record

  def recipe(self) -> tuple[str, dict[str, Any]]:
    """The recipe (name, field changes) with the best validation accuracy of the student alone."""
    scores = {}
    for name, changes in sorted(self.config.recipes.items()):
      changes = dict(changes)
      run = self.run_config(
        self.config.main_student, {}, seed=self.config.sweep.seed, final=False, recipe=changes
      )
      run.num_epochs = self.config.final.epochs  # The recipe is tuned at the final budget.
      scores[name] = _last(self.train(f'recipe/{name}', run))
    best = max(sorted(scores), key=lambda n: scores[n])
    return best, dict(self.config.recipes[best])

  def sweep(
    self, student: str, method: str, recipe: dict, fixed: dict, *, lp_dimensions: bool
  ) -> dict[str, Any]:
    """Sweeps `method`'s weight for `student` (then, with `lp_dimensions`, LP's k and bandwidth
    scale at the best weight), with `fixed` settings; returns the best point's changes, its
    validation accuracy, and every point tried, per dimension."""
    spec = METHODS[method]
    point = dict(spec.fixed, **fixed)
    dims = [(spec.weight, self.config.grids[method])]
    if lp_dimensions:
      dims += [(key, self.config.grids[key.split('.')[1]]) for key in LP_DIMENSIONS]
      # The base values, named in every point, so a later dimension's sweep finds the earlier
      # one's best point among the runs already trained.
      point.update({key: self.config.base.distill[key.split('.')[1]] for key in LP_DIMENSIONS})
    tried = []
    for key, grid in dims:
      point[key], dimension = self._sweep_dimension(student, method, recipe, point, key, list(grid))
      tried.append(dimension)
    score = next(r['val_accuracy'] for r in tried[-1]['rows'] if r['chosen'])
    return {'changes': point, 'dimensions': tried, 'val_accuracy': score}

  def _sweep_dimension(self, student, method, recipe, point, key, grid):
    values, scores, seeds, status = sorted(grid), {}, {}, 'bracketed'
    for attempt in range(self.config.sweep.max_extensions + 1):
      for value in values:
        if value not in scores:
          seeds[value] = self._sweep_point(student, method, recipe, dict(point, **{key: value}))
          scores[value] = sum(seeds[value]) / len(seeds[value])
      best = max(values, key=lambda v: (scores[v], -values.index(v)))
      edge = values.index(best)
      if 0 < edge < len(values) - 1 or len(values) == 1:
        break
      new = extend(values, edge, key)
      if new is None or attempt == self.config.sweep.max_extensions:
        status = 'hard bound' if new is None else 'edge after extensions'
        break
      values = sorted([*values, new])
    else:
      status = 'edge after extensions'
    rows = [
      {
        'value': v,
        'val_accuracy': scores[v],
        'chosen': v == best,
        'added': v not in grid,
        'seeds': seeds[v],
      }
      for v in values
    ]
    if len(values) == 1:
      status = 'one value'
    return best, {'key': key, 'rows': rows, 'status': status}

  def _sweep_point(self, student, method, recipe, changes) -> list[float]:
    """The point's last-epoch validation accuracy for each of `sweep.seeds` (default: the one
    `sweep.seed`); -inf for a seed that diverged. Their mean scores the point."""
    run_id = f'sweep/{student}/{method}/' + '_'.join(
      f'{k.split(".")[-1]}{_name(v)}' for k, v in sorted(changes.items())
    )
    seeds = self.sweep_seeds()
    return [
      _last(
        self.train(
          run_id + (f'/seed{seed}' if len(seeds) > 1 else ''),
          self.student_run(student, changes, seed=seed, final=False, recipe=recipe),
        )
      )
      for seed in seeds
    ]

  def student_run(
    self, student: str, changes: dict[str, Any], *, seed: int, final: bool, recipe: dict
  ) -> ml_collections.ConfigDict:
    """`run_config` for a student (or a follow-up study's setting: its model, the changes its
    every run has, and its budgets)."""
    setting = self.setting(student)
    return self.run_config(
      setting['model'],
      {**setting['changes'], **changes},
      seed=seed,
      final=final,
      recipe=recipe,
      epochs=setting['final_epochs' if final else 'sweep_epochs'],
    )

  def sweep_seeds(self) -> tuple[int, ...]:
    return tuple(self.config.sweep.get('seeds', ())) or (self.config.sweep.seed,)

  def setting(self, name: str) -> dict[str, Any]:
    """A student's model, the changes every run of it has and its budgets (a follow-up
    study's `settings`; a plain student otherwise)."""
    setting = dict(self.config.get('settings', {}).get(name, {}))
    return {
      'model': setting.get('model', name),
      'changes': dict(setting.get('changes', {})),
      'sweep_epochs': setting.get('sweep_epochs'),
      'final_epochs': setting.get('final_epochs'),
    }

  def finals(
    self, student: str, rows: dict[str, dict], recipe: dict
  ) -> tuple[dict[str, list], bool]:
    """Trains each row's seeds on the whole training split, seed by seed (every row's seed 0,
    then every row's seed 1, ...), so a study stopped part-way has the same seeds of every row.

    Returns:
      Each row's ledger records and whether every seed is there. With `page_only` missing runs
      are not trained: the records are cut to the seeds that every row has.
    """
    records: dict[str, list] = {row: [] for row in rows}
    try:
      for seed in range(self.config.final.seeds):
        for row, changes in rows.items():
          run = self.student_run(student, changes, seed=seed, final=True, recipe=recipe)
          records[row].append(self.train(f'final/{student}/{row}/seed{seed}', run))
    except _NotInLedger:
      done = min(len(r) for r in records.values())
      return {row: r[:done] for row, r in records.items()} if done else {}, False
    return records, True


def _machine() -> str:
  """What trained a run, for the page's wall time: '2 CPU cores' or, on accelerators, '1 H200'
  (the device count and kind)."""
  if jax.default_backend() == 'cpu':
    return f'{os.cpu_count()} CPU cores'
  return f'{jax.device_count()} {jax.devices()[0].device_kind}'


class _NotInLedger(Exception):
  """`page_only`: a run the page needs is not in the ledger."""


def _last(record: dict[str, Any]) -> float:
  """The run's last-epoch accuracy; -inf for a run that diverged (it ranks below every other)."""
  if record.get('diverged'):
    return -math.inf
  return record['history'][-1]['test_accuracy']


def _read_ledger(path: str) -> dict[str, dict[str, Any]]:
  """The ledger's records by run (the latest wins). A torn last line, what a kill mid-append
  leaves, is cut off with a warning (that run is trained again); any other bad line stops."""
  if not path:
    return {}
  torn = metrics_io.repair_records(path, 'run', 'the run it recorded is trained again')
  if torn:
    report.Reporter('study').warning(torn)
  return {record['run']: record for record in metrics_io.read_records(path, 'run')}


def _append_ledger(path: str, record: dict[str, Any]) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  metrics_io.append_record(path, record)


def _resolve(rows: tuple[str, ...], main_sweeps: dict[str, dict]) -> list[str]:
  """Other students' row names with `CHOSEN` names replaced by the main student's best."""
  resolved = []
  for row in rows:
    if row in CHOSEN:
      candidates = [m for m in CHOSEN[row] if m in main_sweeps]
      row = max(candidates, key=lambda m: main_sweeps[m]['val_accuracy'])
    resolved.append(row)
  return resolved


def run(config: ml_collections.ConfigDict, workdir: str, *, allow_config_change=False) -> str:
  """The whole study: recipe, sweeps, finals, page. Returns the page's path.

  With `config.page_only`, nothing trains: the page shows what the ledger holds (a study stopped
  part-way, or running in another process): the finished sweeps, and the final rows with the
  seeds that every row of a student has so far.
  """
  if 'settings' in config:
    return run_followup(config, workdir, allow_config_change=allow_config_change)
  study = Study(config, workdir, allow_config_change)
  start = time.time()
  students = (config.main_student, *config.other_students)
  sweeps, finals, page, done = {}, {}, None, []
  try:
    recipe_name, recipe = study.recipe()
    for student in students:
      sweeps[student] = {}
      _student_runs(study, sweeps, finals, student, recipe)
      done.append(student)
      # The page after each student, so a study stopped part-way shows what it has finished.
      page = _write_page(study, recipe_name, sweeps, finals, students, done)
      study.reporter.say(f'Wrote {page} ({time.time() - start:.0f} s this sitting).')
  except _NotInLedger as missing:
    if not all(f'recipe/{n}' in study.ledger for n in config.recipes):
      raise ValueError(
        f'page_only: {config.ledger} does not hold {missing} yet, and the page needs at least '
        'the recipe runs; run the study without page_only first.'
      ) from None
    # Every finished sweep and final row (a sweep being trained is left out).
    sweeps = {s: v for s, v in sweeps.items() if v}
    page = _write_page(study, study.recipe()[0], sweeps, finals, students, done)
    study.reporter.say(f'Wrote {page} from the ledger (page_only; next run: {missing}).')
  return page


def _student_runs(study: Study, sweeps: dict, finals: dict, student: str, recipe: dict) -> None:
  """Sweeps, then trains the final rows of, one student; fills `sweeps` and `finals`."""
  config = study.config
  methods = config.main_methods if student == config.main_student else config.other_methods
  sweeps[student]['student'] = _reference(study, student, recipe)
  for method in _resolve(tuple(methods), sweeps.get(config.main_student, {})):
    sweeps[student][method] = _sweep_method(study, sweeps, student, method, recipe)
  rows = {'student': {}, **{m: s['changes'] for m, s in sweeps[student].items()}}
  records, complete = study.finals(student, rows, recipe)
  if records:
    finals[student] = records
  if not complete:  # page_only: the seeds every row has so far.
    raise _NotInLedger(
      f'the final runs of {student} from seed {len(records.get("student", []))} on'
    )


def _reference(study: Study, student: str, recipe: dict) -> dict:
  """The student alone at the sweep budget (every weight 0), shown beside the sweeps."""
  seeds = study.sweep_seeds()
  scores = [
    _last(
      study.train(
        f'sweep/{student}/student' + (f'/seed{seed}' if len(seeds) > 1 else ''),
        study.student_run(student, {}, seed=seed, final=False, recipe=recipe),
      )
    )
    for seed in seeds
  ]
  score = sum(scores) / len(scores)
  row = {'value': 0, 'val_accuracy': score, 'chosen': False, 'added': False, 'seeds': scores}
  dimension = {'key': 'no distillation', 'rows': [row], 'status': 'reference'}
  return {'changes': {}, 'dimensions': [dimension], 'val_accuracy': score}


def _write_page(study: Study, recipe_name: str, sweeps, finals, students, done) -> str:
  config = study.config
  return study_page.write_study_page(
    config,
    teacher=checkpoint.load_variables(config.base.teacher.checkpoint)[1],
    recipe=recipe_name,
    recipes={n: study.ledger[f'recipe/{n}'] for n in config.recipes},
    sweeps=sweeps,
    finals=finals,
    wall=study_page.wall_time(study.ledger.values()),
    pending=[s for s in students if s not in done],
  )


def _sweep_method(study: Study, sweeps: dict, student: str, method: str, recipe: dict) -> dict:
  """LP's k and bandwidth scale are swept for the main student's LP row only; its graph
  variants, and every LP row of the other students, keep the main student's best values."""
  main = study.config.main_student
  own_dimensions = method == 'lp' and student == main
  fixed = {}
  if method in ('lp', *GRAPH_VARIANTS) and not own_dimensions:
    fixed = {k: sweeps[main]['lp']['changes'][k] for k in LP_DIMENSIONS}
  return study.sweep(student, method, recipe, fixed, lp_dimensions=own_dimensions)


def run_followup(
  config: ml_collections.ConfigDict, workdir: str, *, allow_config_change=False
) -> str:
  """A follow-up study: new rows beside the final rows of `config.previous`, per setting.

  Each of `config.settings` (a student on some data: `model`, `changes` every run has, optional
  `sweep_epochs`/`final_epochs`) has `reused` rows, trained by the previous study at its chosen
  points (taken from `config.reuse_ledgers` by id and digest, never trained again), `swept`
  methods, whose weights are swept here (`config.sweep.seeds`, the mean over seeds decides), and
  `rows`, its new final rows: swept methods, `CHOSEN` names resolved among this setting's sweeps,
  or, with `weights_from`, another setting's chosen points. The recipe, and LP's k and bandwidth
  scale for every LP row, are the previous study's. Returns the page's path.
  """
  study = Study(config, workdir, allow_config_change)
  # The previous study's points come from its ledger (what is missing there, such as a quick
  # mode's runs on a fresh machine, is trained into its ledger first).
  previous_config = config.previous.copy_and_resolve_references()
  previous_config.page_only = config.page_only
  previous = Study(previous_config, workdir, allow_config_change)
  recipe_name, recipe = previous.recipe()
  previous_sweeps = {}
  main = previous_config.main_student
  previous_sweeps[main] = {'lp': _sweep_method(previous, previous_sweeps, main, 'lp', recipe)}
  lp_fixed = {k: previous_sweeps[main]['lp']['changes'][k] for k in LP_DIMENSIONS}
  start, sweeps, finals, done = time.time(), {}, {}, []
  names = list(config.settings)
  try:
    for name in names:
      setting = config.settings[name]
      rows = {}
      for row in setting.get('reused', ()):
        source = setting.get('previous_student', name)
        if row == 'student':
          rows[row] = {}
          continue
        chosen = previous_sweeps.setdefault(source, {})
        if row not in chosen:
          chosen[row] = _sweep_method(previous, previous_sweeps, source, row, recipe)
        rows[row] = chosen[row]['changes']
      sweeps[name], new_rows = _followup_sweeps(study, sweeps, name, recipe, lp_fixed)
      rows.update(new_rows)
      records, complete = study.finals(name, rows, recipe)
      if records:
        finals[name] = records
      if not complete:
        raise _NotInLedger(f'the final runs of {name}')
      done.append(name)
      page = _write_followup_page(study, recipe_name, sweeps, finals, names, done)
      study.reporter.say(f'Wrote {page} ({time.time() - start:.0f} s this sitting).')
  except _NotInLedger as missing:
    sweeps = {s: v for s, v in sweeps.items() if v}
    page = _write_followup_page(study, recipe_name, sweeps, finals, names, done)
    study.reporter.say(f'Wrote {page} from the ledger (page_only; next run: {missing}).')
  return page


def _followup_sweeps(
  study: Study, sweeps: dict, name: str, recipe: dict, lp_fixed: dict
) -> tuple[dict, dict[str, dict]]:
  """One setting's sweeps (filled into `sweeps[name]` as they finish) and its new rows'
  changes."""
  setting = study.config.settings[name]
  own = sweeps.setdefault(name, {})
  source = sweeps[setting['weights_from']] if setting.get('weights_from') else own
  if setting.get('swept'):
    own['student'] = _reference(study, name, recipe)
  for method in setting.get('swept', ()):
    spec = METHODS[method]
    fixed = dict(lp_fixed) if method in LP_FAMILY else {}
    if spec.scale_free:
      fixed['distill.student_scale'] = _best_scale(own)
    own[method] = study.sweep(name, method, recipe, fixed, lp_dimensions=False)
  rows = {}
  for row in setting['rows']:
    method = row
    if row == 'student':
      rows[row] = {}
      continue
    if row in CHOSEN:
      method = max(CHOSEN[row], key=lambda m: source[m]['val_accuracy'])
    spec = METHODS[method]
    if spec.weight is None:  # Nothing to sweep (the sampler's control row).
      rows[method] = {**lp_fixed, **dict(spec.fixed)}
    else:
      rows[method] = dict(source[method]['changes'])
  return own, rows


def _best_scale(sweeps: dict) -> str:
  """The `student_scale` of the better-scoring scale-invariant LP sweep of a setting."""
  best = max(SCALE_INVARIANT, key=lambda m: sweeps[m]['val_accuracy'])
  return dict(METHODS[best].fixed)['distill.student_scale']


def _write_followup_page(study: Study, recipe_name: str, sweeps, finals, names, done) -> str:
  config = study.config
  return study_page.write_followup_page(
    config,
    teacher=checkpoint.load_variables(config.base.teacher.checkpoint)[1],
    recipe=recipe_name,
    sweeps=sweeps,
    finals=finals,
    wall=study_page.wall_time(study.ledger.values()),
    pending=[s for s in names if s not in done],
  )
