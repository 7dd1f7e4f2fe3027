"""Training-step time of the zoo's conv nets on XLA:CPU, per conv implementation and XLA flag.

Run from anywhere (times on the shared 2-core machine of docs/performance_cpu_conv.md):

    .venv/bin/python benchmarks/cpu_conv.py --quick  # ResNet-20, 5 rows, ~2.5 min
    .venv/bin/python benchmarks/cpu_conv.py          # all variants, flags and models, ~30 min
    # The quick rows and two PyTorch rows (~3.5 min; the run in docs/performance_cpu_conv.md):
    .venv/bin/python benchmarks/cpu_conv.py --quick --torch-python /tmp/torchvenv/bin/python

One step is what lpe/train.py does for a plain student: forward in train mode (BatchNorm batch
statistics), softmax cross-entropy, backward, SGD with momentum 0.9 and weight decay 5e-4; CIFAR
nets on random 32x32x3 images, the Fashion-MNIST CNNs on 28x28x1, float32 unless noted.

Variants (`conv_impl` of `lpe.models.build`, or a benchmark-only implementation):
- xla: `nn.Conv` as it is (`lax.conv_general_dilated`), the default.
- cpu: the library's XLA:CPU variant: the same convolutions, but the weight gradient reads the
  layer input from memory (`layers.conv_general_dilated_cpu`).
- im2col: 9 (kh * kw) shifted, strided slices concatenated on the channel axis, one matmul.
- im2col_accum: the same slices, 9 matmuls accumulated.
- nchw: `lax.conv_general_dilated` on NCHW / OIHW, transposing at each conv.
The benchmark-only ones handle dense, undilated convs (all CIFAR ResNet convs) and fall back to
lax for others. XLA flags (`FLAG_LABELS`): which convs and dots XLA:CPU gives to YNNPACK.

XLA flags apply per process, so every (flags, dtype, model) setting runs in its own worker
process; the workers of all settings take turns for `--rounds` rounds and each worker interleaves
its variants, so that the load of a shared machine spreads over all of them. Reported: the median
wall time per step over all rounds, its ratio to `xla` with default flags, and the median process
CPU time per step (all threads; less sensitive to other jobs than wall time). In the first round,
the ResNet-20 float32 settings also save logits and gradients, which are compared with `xla`
under default flags. With `--torch-python`, the same ResNet train step in PyTorch
(benchmarks/cpu_conv_torch.py) takes turns with them, with PyTorch's default threads and with one.
"""

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
_YNN = '--xla_cpu_experimental_ynn_fusion_type='
# jaxlib 0.10's XLA:CPU hands convs and dots to YNNPACK; these flags change that (per process).
FLAG_LABELS = {
  '': 'default',
  _YNN + 'individual_dot': 'YNN dots only',  # Convs go to Eigen's kernels, dots stay on YNNPACK.
  _YNN: 'YNN off',  # Convs and dots go to Eigen.
  _YNN + 'individual_dot,individual_convolution,eltwise,reduce,dot': 'YNN all fusions',
}
DOTS_ONLY = _YNN + 'individual_dot'

# (model, batch, variants, XLA_FLAGS, dtype, remat)
QUICK = [
  ('resnet20', 128, ('xla', 'cpu', 'im2col'), '', 'float32', False),
  ('resnet20', 128, ('xla', 'cpu'), DOTS_ONLY, 'float32', False),
]
FULL = [
  ('resnet20', 128, ('xla', 'cpu', 'im2col', 'im2col_accum', 'nchw'), '', 'float32', False),
  *[('resnet20', 128, ('xla', 'cpu'), flags, 'float32', False) for flags in FLAG_LABELS if flags],
  ('resnet20', 128, ('xla', 'cpu'), '', 'bfloat16', False),
  ('resnet20', 128, ('xla', 'cpu'), '', 'float32', True),
  ('resnet8x4', 128, ('xla', 'cpu', 'im2col'), '', 'float32', False),
  ('resnet8x4', 128, ('xla', 'cpu'), DOTS_ONLY, 'float32', False),
  *[
    (model, batch, ('xla', 'cpu'), flags, 'float32', False)
    for model, batch in [
      ('cnn_student', 128),
      ('cnn_teacher', 128),
      ('wrn_16_2', 64),
      ('vgg8', 64),
      ('MobileNetV2', 64),
      ('ShuffleV2', 64),
    ]
    for flags in ('', DOTS_ONLY)
  ],
]
TORCH_MODELS = ('resnet20', 'resnet8x4')


# ------------------------------------------------------------------ worker (one JAX process)


def _benchmark_only_convs() -> dict:
  """`lax.conv_general_dilated` look-alikes for the variants that the library does not ship."""
  import jax.numpy as jnp
  from jax import lax

  def dense_nhwc(fn):
    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, **kw):
      plain = kw.get('feature_group_count', 1) == 1 and not any(
        d not in (None, 1) and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)
      )
      if not plain:
        return lax.conv_general_dilated(
          lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, **kw
        )
      if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
      return fn(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))

    return conv

  def shifted_slices(x, kh, kw, strides, padding):
    x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    n, h, w, c = x.shape
    ho, wo = (h - kh) // strides[0] + 1, (w - kw) // strides[1] + 1
    limit = lambda i, j: (n, i + strides[0] * (ho - 1) + 1, j + strides[1] * (wo - 1) + 1, c)
    step = (1, *strides, 1)
    return [lax.slice(x, (0, i, j, 0), limit(i, j), step) for i in range(kh) for j in range(kw)]

  def im2col(x, k, strides, padding):
    kh, kw, cin, cout = k.shape
    patches = jnp.concatenate(shifted_slices(x, kh, kw, strides, padding), axis=-1)
    return lax.dot_general(patches, k.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())))

  def im2col_accum(x, k, strides, padding):
    kh, kw = k.shape[:2]
    taps = shifted_slices(x, kh, kw, strides, padding)
    dims = (((3,), (0,)), ((), ()))
    return sum(lax.dot_general(t, k[i // kw, i % kw], dims) for i, t in enumerate(taps))

  def nchw(x, k, strides, padding):
    y = lax.conv_general_dilated(
      jnp.transpose(x, (0, 3, 1, 2)),
      jnp.transpose(k, (3, 2, 0, 1)),
      strides,
      padding,
      dimension_numbers=('NCHW', 'OIHW', 'NCHW'),
    )
    return jnp.transpose(y, (0, 2, 3, 1))

  return {
    'im2col': dense_nhwc(im2col),
    'im2col_accum': dense_nhwc(im2col_accum),
    'nchw': dense_nhwc(nchw),
  }


def _route_benchmark_only_convs() -> None:
  """Lets `conv_impl` name the benchmark-only variants, through the library's own hook."""
  from lpe.models import layers, small_cnn

  extra = _benchmark_only_convs()
  library = layers.conv_general_dilated_fn

  def resolve(conv_impl: str):
    return extra[conv_impl] if conv_impl in extra else library(conv_impl)

  layers.conv_general_dilated_fn = resolve
  small_cnn.conv_general_dilated_fn = resolve


def _train_step_fn(model, remat: bool):
  import jax
  import jax.numpy as jnp
  import optax

  tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))

  def loss_fn(params, batch_stats, images, labels):
    (logits, _), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    return ce.mean(), updates.get('batch_stats', batch_stats)

  if remat:
    loss_fn = jax.checkpoint(loss_fn)

  def step(params, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, images, labels
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  def logits_and_grads(params, batch_stats, images, labels):
    (logits, _), _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    grads = jax.grad(lambda *a: loss_fn(*a)[0], argnums=(0, 2))(params, batch_stats, images, labels)
    return logits, grads

  return tx, jax.jit(step), jax.jit(logits_and_grads)


def run_worker(spec: dict) -> None:
  """Times one setting's variants, interleaved, and prints one JSON line per variant."""
  sys.path.insert(0, str(ROOT))
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lpe import models

  _route_benchmark_only_convs()
  rng = np.random.default_rng(0)
  shape = (28, 28, 1) if spec['model'].startswith('cnn_') else (32, 32, 3)
  images = jnp.asarray(rng.normal(size=(spec['batch'], *shape)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, spec['batch']), jnp.int32)
  dtype = jnp.dtype(spec['dtype'])
  compiled, numerics = {}, {}
  for variant in spec['variants']:
    model = models.build(spec['model'], 10, dtype=dtype, conv_impl=variant)
    variables = model.init(jax.random.key(0), images[:2])  # Same values for every variant.
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    tx, step, numerics_fn = _train_step_fn(model, spec['remat'])
    state = (params, batch_stats, tx.init(params), images, labels)
    start = time.perf_counter()
    compiled[variant] = (step.lower(*state).compile(), state, time.perf_counter() - start)
    jax.block_until_ready(compiled[variant][0](*state))  # Warm-up.
    if spec['numerics']:
      logits, (param_grads, input_grad) = numerics_fn(params, batch_stats, images, labels)
      leaves = [logits, input_grad, *jax.tree.leaves(param_grads)]
      numerics[variant] = np.concatenate([np.ravel(a) for a in leaves])
  walls = {v: [] for v in compiled}
  cpus = {v: [] for v in compiled}
  for _ in range(spec['reps']):
    for variant, (fn, state, _) in compiled.items():
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*state))
      walls[variant].append(time.perf_counter() - t0)
      cpus[variant].append(time.process_time() - c0)
  for variant, (_, _, compile_s) in compiled.items():
    line = dict(variant=variant, wall=walls[variant], cpu=statistics.median(cpus[variant]))
    line.update(compile=compile_s, load=os.getloadavg()[0])
    print(json.dumps(line), flush=True)
  if numerics:  # Logits, input gradient, parameter gradients, flat; the parent compares them.
    sizes = np.array([labels.size * 10, images.size])
    np.savez(spec['numerics'], sizes=sizes, **numerics)


# ------------------------------------------------------------------ driver


def _run(cmd: list[str], env: dict) -> list[dict]:
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='ResNet-20 only, five rows.')
  parser.add_argument('--rounds', type=int, default=None, help='Turns per setting (2 / 3).')
  parser.add_argument('--reps', type=int, default=3, help='Timed steps per variant per round.')
  parser.add_argument('--torch-python', default='', help='A Python with torch, for PyTorch rows.')
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    run_worker(json.loads(args.worker))
    return
  settings = QUICK if args.quick else FULL
  rounds = args.rounds or (2 if args.quick else 3)
  torch_models = [m for m in TORCH_MODELS if any(s[0] == m for s in settings)]
  results: dict = {}
  numerics_dir = tempfile.mkdtemp(prefix='cpu_conv_')
  start = time.perf_counter()
  loads = [os.getloadavg()[0]]
  for r in range(rounds):
    for i, (model, batch, variants, flags, dtype, remat) in enumerate(settings):
      spec = dict(model=model, batch=batch, variants=variants, dtype=dtype, remat=remat)
      check = r == 0 and model == 'resnet20' and dtype == 'float32' and not remat
      spec.update(reps=args.reps, numerics=f'{numerics_dir}/{i}.npz' if check else '')
      env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
      if flags:
        env['XLA_FLAGS'] = flags
      cmd = [sys.executable, __file__, '--worker', json.dumps(spec)]
      for line in _run(cmd, env):
        key = (model, batch, flags, dtype, remat, line['variant'])
        row = results.setdefault(key, {})
        if check:
          row['numerics'] = (spec['numerics'], line['variant'])
        row.setdefault('wall', []).extend(line['wall'])
        row.setdefault('cpu', []).append(line['cpu'])
        loads.append(line['load'])
    for model in torch_models if args.torch_python else ():
      for threads in (0, 1):  # 0: PyTorch's default (one per core).
        script = str(ROOT / 'benchmarks' / 'cpu_conv_torch.py')
        cmd = [args.torch_python, script, model, '128', str(args.reps), str(threads)]
        for line in _run(cmd, dict(os.environ)):
          row = results.setdefault((model, 128, '', 'float32', False, line['variant']), {})
          row.setdefault('wall', []).extend(line['wall'])
          row.setdefault('cpu', []).append(line['cpu'])
          loads.append(line['load'])
  print_report(results, time.perf_counter() - start, loads)
  shutil.rmtree(numerics_dir)


def print_numerics(results: dict) -> None:
  """Largest differences from `xla` with default flags: logits, input and parameter gradients."""
  import numpy as np

  loaded = {}
  for key, row in results.items():
    if 'numerics' in row:
      path, variant = row['numerics']
      with np.load(path) as f:
        loaded[key] = (f[variant], f['sizes'])
  reference = next(v for k, v in loaded.items() if k[2] == '' and k[5] == 'xla')
  ref, (n_logits, n_input) = reference
  parts = lambda a: (a[:n_logits], a[n_logits : n_logits + n_input], a[n_logits + n_input :])
  for (model, _, flags, dtype, _, variant), (values, _) in loaded.items():
    if flags == '' and variant == 'xla':
      continue
    diffs = [np.max(np.abs(u - v)) for u, v in zip(parts(values), parts(ref), strict=True)]
    scales = [np.max(np.abs(v)) for v in parts(ref)]
    print(
      f'Numerics, {model} {dtype}, {variant} ({FLAG_LABELS[flags]}) vs xla (default): max |diff| '
      f'logits {diffs[0]:.1e} (of {scales[0]:.1e}), input gradient {diffs[1]:.1e} (of '
      f'{scales[1]:.1e}), parameter gradients {diffs[2]:.1e} (of {scales[2]:.1e}).'
    )


def print_report(results: dict, seconds: float, loads: list[float]) -> None:
  print('| model | batch | XLA flags | dtype | variant | step (median) | vs xla | CPU time |')
  print('|---|---|---|---|---|---|---|---|')
  base = {}
  for (model, _, flags, dtype, remat, variant), row in results.items():
    if variant == 'xla' and not flags and dtype == 'float32' and not remat:
      base[model] = statistics.median(row['wall'])
  for (model, batch, flags, dtype, remat, variant), row in results.items():
    wall = statistics.median(row['wall'])
    label = FLAG_LABELS[flags]
    name = f'{variant} + remat' if remat else variant
    ratio = f'{wall / base[model]:.2f}x' if model in base else '-'
    cpu = statistics.median(row['cpu'])
    print(
      f'| {model} | {batch} | {label} | {dtype} | {name} | {wall:.3f} s (n={len(row["wall"])}) '
      f'| {ratio} | {cpu:.3f} s |'
    )
  print()
  print_numerics(results)
  print()
  import jax

  print(
    f'Ratios are against `xla` with default flags and float32 of the same model. jax '
    f'{jax.__version__}, {platform.machine()}, {os.cpu_count()} CPUs; load average '
    f'{min(loads):.1f}-{max(loads):.1f} during the run (shared machine); {seconds:.0f} s in all.'
  )


if __name__ == '__main__':
  main()
