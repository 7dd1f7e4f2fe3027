"""Training: `train_and_evaluate`, the outline of one run, and `run_epoch`, its loop.

The student is the only thing differentiated and saved. The teacher runs in inference mode from
its exported variables, passed to the step as a static input and never updated or saved with the
student. The same trainer trains a teacher from scratch (no distillation term).

Each part has its own home: the state and optimizer (lpe.state), the step (lpe.step), the teacher
(lpe.teacher), the step's inputs (lpe.feed), devices (lpe.parallel), what happens around the steps
(lpe.hooks), what is printed (lpe.report) and the workdir's files (lpe.workdir);
docs/architecture.md maps them.
"""

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from lpe import (
  checkpoint,
  data,
  evaluate,
  metrics_io,
  models,
  objectives,
  parallel,
  preflight,
  report,
  sources,
  state,
  step,
  stream,
  teacher,
)
from lpe import config as config_lib
from lpe import feed as feed_lib
from lpe import hooks as hooks_lib
from lpe import workdir as workdir_lib
from lpe.hooks import NonFiniteLossError, Preempted, StepHook

__all__ = ['NonFiniteLossError', 'Preempted', 'Run', 'prepare', 'run_epoch', 'train_and_evaluate']


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a run needs, loaded and checked before anything is written."""

  config: ml_collections.ConfigDict
  workdir: str
  info: data.DatasetInfo
  student: nn.Module
  teacher: teacher.Teacher | None
  place: parallel.Placement
  feed: feed_lib.Feed | stream.StreamFeed
  train_data: data.Split | None  # None when the training split streams.
  step_fn: Any  # The compiled `lpe.step.train_step`.
  step_teacher_variables: Any  # What the step reads of the teacher (None with cached outputs).
  evaluate: evaluate.Evaluator
  reporter: report.Reporter

  @property
  def total_steps(self) -> int:
    return self.feed.steps_per_epoch * self.config.num_epochs


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  resume: config_lib.Resume = 'same',
  hooks: Sequence[StepHook] = (),
) -> dict[str, Any]:
  """Trains `config.model` on `config.dataset`, resuming from `workdir`, and evaluates it.

  Writes into `workdir` (process 0 only): config.json, metrics.jsonl (one line per epoch),
  TensorBoard events, and at the end model.msgpack/model.json (the exported model) and
  result.json; every process takes part in the orbax checkpoints. Running the same command again
  resumes from the latest good checkpoint; a finished run returns its saved result. The config
  and the workdir are checked (and the teacher and data loaded) before anything is written; one
  run at a time holds the workdir (`lpe.workdir.lock`). A workdir that holds a run made with
  another config is refused unless `resume='any'`, or `resume='optimizer'` when only the
  optimizer's settings changed (`lpe.config.OPTIMIZER_FIELDS`; see
  `lpe.config.RESUME_SAFE_FIELDS` for the fields that may always change).

  `hooks` are actions of your own, run after every step besides the built-in ones (checking
  the step's metrics, the progress line, checkpoints, SIGTERM): each is called as
  `hook(end, state)` with the step's `lpe.hooks.StepEnd` and train state, and keeps its own
  trigger and state, as clu's periodic actions do (`lpe.hooks.StepHook`).

  A SIGTERM saves the state and raises `Preempted` (exit status 143); a non-finite step raises
  `NonFiniteLossError` without saving (or is skipped with `config.skip_nonfinite_batches`); a
  full or read-only disk raises `lpe.files.StorageError`, keeping the checkpoints.

  Returns:
    The result: model, params, final and best test accuracy, epochs and training time.
  """
  parallel.maybe_initialize_distributed(config)
  # Checked again over the devices `prepare` chooses (a CPU process chooses its count).
  preflight.validate(config, parallel.fixed_device_count())
  workdir_lib.check_usable(workdir)
  workdir_lib.check_not_in_use(workdir)
  finished, changes = _finished_or_changes(config, workdir, resume, say=True)
  if finished is not None:
    return finished
  run = prepare(config, workdir)
  with workdir_lib.lock(workdir), workdir_lib.storage_faults(workdir):
    # Checked again under the lock: another run may have written the workdir meanwhile.
    finished, changes = _finished_or_changes(config, workdir, resume)
    if finished is not None:
      return finished
    manager = checkpoint.checkpoint_manager(workdir, max_to_keep=config.keep_checkpoints)
    writer = metrics_io.MetricsWriter(workdir)
    try:
      train_state = restore_or_start(run, manager, changes, writer)
      train_state = train(run, train_state, manager, writer, hooks)
    finally:
      run.feed.close()
      manager.wait_until_finished()
      writer.close()
    return finish(run, train_state)


def _finished_or_changes(
  config: ml_collections.ConfigDict,
  workdir: str,
  resume: config_lib.Resume,
  *,
  say: bool = False,
) -> tuple[dict[str, Any] | None, list[str]]:
  """The saved result when the run in `workdir` is finished, and the allowed config changes.

  A finished run is not trained again; with changed fields, that is said, since they were not
  applied (only a larger num_epochs trains more). `say`: print the warnings of an unreadable
  result.json (once per run).
  """
  changes = workdir_lib.check_config(config, workdir, resume=resume)
  reporter = _reporter(config, workdir)
  warn = reporter.warning if say else None
  finished = workdir_lib.finished_result(workdir, config, warn=warn)
  if finished is None:
    return None, changes
  logging.info('%s already finished; returning its result.', workdir)
  if changes:
    reporter.warning(
      f'{workdir} holds a finished run of {config.num_epochs} epochs, so nothing was retrained '
      f'and the changed fields ({"; ".join(changes)}) were not applied; to train with them, use '
      'another --workdir (or a larger num_epochs to train more epochs).'
    )
  return finished, changes


def _reporter(config: ml_collections.ConfigDict, workdir: str) -> report.Reporter:
  return report.Reporter(config.name or os.path.basename(os.path.normpath(workdir)))


def conv_impl(config: ml_collections.ConfigDict) -> str:
  """The `conv_impl` the student is built with: `config.conv_impl`, with 'auto' resolved to
  'cpu' on the CPU backend and 'xla' elsewhere (the two give the same parameters and, on this
  project's CPU, the same steps up to float32 rounding; docs/performance_cpu_conv.md)."""
  if config.conv_impl != 'auto':
    return config.conv_impl
  return 'cpu' if jax.default_backend() == 'cpu' else 'xla'


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Loads the data and the teacher, builds the student, its step and its inputs; writes nothing.

  Raises ValueError (or a data or checkpoint error) for anything that cannot run.
  """
  info = data.info_of(config)
  dtype = jnp.bfloat16 if config.half_precision else jnp.float32
  distilling = bool(objectives.active(config.distill))
  # A configured teacher is also loaded without distillation, for the evaluation diagnostics
  # (agreement, neighbourhood preservation, CKA); only distilling steps run it.
  loaded = teacher.load(config, info, dtype) if distilling or config.teacher.checkpoint else None
  student = _build_student(config, info, dtype)
  if config.last_batch == 'masked':  # A student whose statistics it cannot mask stops here.
    step.check_masked_batch_statistics(student, info.image_shape)
  place = parallel.Placement(config.parallelism, devices(config, info, student, loaded))
  logging.info(
    'Training on %d of %d %s devices (%s).',
    len(place.devices),
    jax.device_count(),
    jax.default_backend(),
    f'config.cpu_devices={config.cpu_devices}' if config.cpu_devices else 'chosen by model size',
  )
  streamed, test_data = _streams(config, info, place)
  train_data = None
  if streamed is None:
    train_data, test_data = _load_splits(config)
  cache = graph = None
  if loaded is not None:
    teacher.check_features(config.distill, student, loaded.module, info.image_shape)
    if train_data is not None:
      cache, graph = teacher.precomputed(config, loaded, train_data, info)
  eval_teacher = None
  if loaded is not None:
    eval_teacher = (loaded.module, jax.device_put(loaded.variables, place.replicated))
  needs_teacher = objectives.needs_teacher(config.distill)
  step_teacher = eval_teacher[1] if needs_teacher and cache is None else None
  feed = feed_lib.Feed(config, train_data, place, cache, graph) if streamed is None else streamed
  return Run(
    config=config,
    workdir=workdir,
    info=info,
    student=student,
    teacher=loaded,
    place=place,
    train_data=train_data,
    feed=feed,
    step_fn=place.compile(
      step.make_train_step(
        config,
        student,
        loaded and loaded.module,
        info,
        augmentation='none' if streamed else config.augment,  # Streamed images come augmented.
        steps_per_epoch=feed.steps_per_epoch,
      )
    ),
    step_teacher_variables=None if step_teacher is None else place.state(step_teacher),
    evaluate=evaluate.Evaluator(
      student.clone(bn_axis_name=None),
      test_data,
      info,
      config.eval_batch_size,
      sharding=place.sharded,
      teacher=eval_teacher,
      k=config.distill.k,
      feature=config.distill.feature,
    ),
    reporter=_reporter(config, workdir),
  )


def devices(
  config: ml_collections.ConfigDict,
  info: data.DatasetInfo,
  student: Any,
  loaded: teacher.Teacher | None = None,
) -> list[jax.Device]:
  """The devices the run trains on (`lpe.parallel.choose_devices`: on one CPU process,
  `config.cpu_devices` of the host devices, or as many as the models' size gains from)."""

  def flops_per_example() -> float:
    flops = parallel.forward_flops(student, info.image_shape)
    runs_teacher = objectives.needs_teacher(config.distill) and not config.teacher.cache_outputs
    if loaded is not None and runs_teacher:
      flops += parallel.forward_flops(loaded.module, info.image_shape, loaded.variables)
    return flops

  def fits(n: int) -> bool:
    try:
      preflight.validate(config, n)
    except ValueError:
      return False
    return True

  chosen = parallel.choose_devices(
    config.cpu_devices, feed_lib.step_batch_size(config), flops_per_example, fits
  )
  # The chosen count was checked by `fits` (or, at the fixed count, by `train_and_evaluate`); a
  # count forced by `config.cpu_devices` is checked here, to say why it cannot run.
  if config.cpu_devices and len(chosen) != parallel.fixed_device_count():
    preflight.validate(config, len(chosen))
  return chosen


def _build_student(config: ml_collections.ConfigDict, info: data.DatasetInfo, dtype) -> Any:
  sync_bn = config.parallelism == 'pmap' and config.sync_batch_stats
  return models.build(
    config.model,
    info.num_classes,
    dtype=dtype,
    bn_axis_name=parallel.AXIS if sync_bn else None,
    conv_impl=conv_impl(config),
    # PyTorch's conventions (the CRD configs) only where asked for: models of your own, and the
    # NNX ones, need not know these arguments.
    **{k: True for k in ('bn_unbiased_var', 'torch_classifier_init') if config[k]},
  )


def _streams(
  config: ml_collections.ConfigDict, info: data.DatasetInfo, place: parallel.Placement
) -> tuple[stream.StreamFeed | None, stream.EvalStream | None]:
  """The streamed training feed and test split when the training split streams, else Nones."""
  if config.input not in ('auto', 'stream'):
    return None, None
  size = len(sources.open_split(config.dataset, config.train_split, config.data_dir or None))
  if not stream.streams(config, size, info):
    return None, None
  stream.check_streamable(config)  # 'auto' chose to stream: what streaming cannot do stops here.
  return stream.open_streams(config, info, place)


def _load_splits(config: ml_collections.ConfigDict) -> tuple[data.Split, data.Split]:
  """The training split (this process's share with per-process data) and the test split."""
  data_dir, size = config.data_dir or None, config.image_size
  shard = feed_lib.batch_share(config).shard
  train_split = data.load_split(
    config.dataset, config.train_split, data_dir, shard=shard, image_size=size
  )
  if config.train_subset:
    train_split = data.stratified_subset(
      train_split, config.train_subset, seed=config.train_subset_seed
    )
  return train_split, data.load_split(config.dataset, config.test_split, data_dir, image_size=size)


def restore_or_start(
  run: Run, manager: ocp.CheckpointManager, changes: list[str], writer: metrics_io.MetricsWriter
) -> state.TrainState:
  """The latest good checkpoint's state, or a fresh one; then writes config.json.

  First removes what killed writes left: temporary files, and a torn last line of metrics.jsonl
  (with a warning). An epoch whose checkpoint was saved but whose record was lost with a killed
  process gets its record back: its test accuracy is recomputed exactly from the checkpoint.
  """
  config, reporter = run.config, run.reporter
  if reporter.active:
    workdir_lib.remove_temporaries(run.workdir)
    torn = metrics_io.repair_metrics(run.workdir)
    if torn:
      reporter.warning(torn)
  fresh = state.create_train_state(
    run.student,
    config,
    jax.random.key(config.seed),
    run.info.image_shape,
    run.feed.steps_per_epoch,
  )
  if config.distill.lp_graph == 'bank':  # Filled by one pass of the initial student.
    train_mode = config.distill.bank_fill == 'train'
    bank = state.embeddings(
      run.student.clone(bn_axis_name=None),  # One process-wide pass, outside pmap.
      state.variables_of(fresh),
      run.train_data,
      info=run.info,
      feature=config.distill.feature,
      batch_size=config.batch_size if train_mode else config.eval_batch_size,
      batch_statistics=train_mode,
    )
    fresh = fresh.replace(bank=bank)
  fresh = jax.device_put(fresh, run.place.replicated)
  restored = checkpoint.restore_latest(manager, fresh, warn=reporter.warning)
  if restored is not None:
    logging.info('Resumed %s from step %d.', run.workdir, int(restored.step))
    reporter.resumed(run.workdir, int(restored.step))
  if changes:
    reporter.config_changed(run.workdir, changes)
  if reporter.active:
    workdir_lib.write_config(config, run.workdir, changes)
  train_state = fresh if restored is None else restored
  at, per_epoch = int(train_state.step), run.feed.steps_per_epoch
  if workdir_lib.epoch_record_missing(run.workdir, at, per_epoch):
    evaluation = run.evaluate(state.variables_of(train_state))
    record = {'epoch': at // per_epoch, 'step': at, **evaluate.record_fields(evaluation)}
    # The epoch's training means and time were lost with the process.
    writer.write({**record, 'steps_averaged': 0, 'epoch_time_s': 0.0, 'recovered': True})
    reporter.record_recovered(at // per_epoch)
  return train_state


def train(
  run: Run,
  train_state: state.TrainState,
  manager: ocp.CheckpointManager,
  writer: metrics_io.MetricsWriter,
  extra_hooks: Sequence[StepHook] = (),
) -> state.TrainState:
  """Trains from `train_state`'s step to the end, epoch by epoch; returns the canonical state."""
  loop_hooks = hooks_lib.Hooks(
    run.config,
    manager=manager,
    reporter=run.reporter,
    place=run.place,
    steps_per_epoch=run.feed.steps_per_epoch,
    extra=extra_hooks,
  )
  at = int(train_state.step)
  train_state = run.place.state(train_state)
  try:
    while at < run.total_steps:
      epoch, offset = divmod(at, run.feed.steps_per_epoch)
      train_state, record = run_epoch(run, train_state, epoch, offset, loop_hooks)
      writer.write(record)
      run.reporter.epoch_done(epoch + 1, run.config.num_epochs, record['test_accuracy'])
      at = record['step']
  finally:
    loop_hooks.close()
  return run.place.canonical(train_state)


def run_epoch(
  run: Run, train_state: Any, epoch: int, offset: int, loop_hooks: hooks_lib.Hooks
) -> tuple[Any, dict[str, Any]]:
  """Trains the steps of `epoch` from `offset` on, saves and evaluates; returns its record."""
  per_epoch = run.feed.steps_per_epoch
  at = epoch * per_epoch + offset
  loop_hooks.start_epoch(at)
  t0 = time.time()
  for inputs in run.feed.epoch(epoch, offset):
    train_state, metrics = run.step_fn(train_state, run.step_teacher_variables, *inputs)
    at, offset = at + 1, offset + 1
    # Read the flag once: a SIGTERM that lands later in this step is handled after the next.
    end = hooks_lib.StepEnd(at, epoch, offset, offset == per_epoch, loop_hooks.stopping())
    loop_hooks.after_step(end, train_state, metrics)
  train_time = time.time() - t0
  means, averaged, skipped = loop_hooks.end_epoch(at, train_state)
  evaluation = run.evaluate(state.variables_of(run.place.canonical(train_state)))
  record = {
    'epoch': epoch + 1,
    'step': at,
    **{f'train_{k}': v for k, v in means.items()},
    # The steps the train_* means cover: fewer than the epoch's after a resume or skipped steps.
    'steps_averaged': averaged,
    **evaluate.record_fields(evaluation),
    'epoch_time_s': train_time,
  }
  if run.config.skip_nonfinite_batches:
    record['skipped_batches'] = skipped
  return train_state, record


def finish(run: Run, train_state: state.TrainState) -> dict[str, Any]:
  """The run's result from its epoch records; process 0 exports the model and writes it."""
  config, is_main = run.config, run.reporter.active
  history = metrics_io.read_metrics(run.workdir) if is_main else []
  accuracies = [r['test_accuracy'] for r in history] or [float('nan')]
  meta = run.teacher.meta if run.teacher else None
  result = {
    'name': run.reporter.name,
    'model': config.model,
    'dataset': config.dataset,
    'num_classes': run.info.num_classes,
    # What the model's inputs are, for evaluating the exported model (`lpe.experiment`).
    'image_size': config.image_size,
    'mean': list(run.info.mean),
    'std': list(run.info.std),
    'augment': config.augment,
    'params': state.count_params(train_state.params),
    'extra_params': state.count_params(train_state.aux_params),
    'objective': objectives.describe(config.distill),
    'num_epochs': config.num_epochs,
    'test_accuracy': accuracies[-1],
    'best_test_accuracy': max(accuracies),
    'train_time_s': sum(r['epoch_time_s'] for r in history),
    'skipped_batches': sum(r.get('skipped_batches', 0) for r in history),
    'teacher': meta and {k: meta.get(k) for k in ('model', 'test_accuracy')},
  }
  if is_main:
    workdir_lib.write_result(run.workdir, state.variables_of(train_state), result)
  return result
