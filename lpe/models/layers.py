"""Building blocks shared by the model zoo: PyTorch-compatible conv, BatchNorm, pooling, maxout.

The CIFAR architectures are ports of PyTorch definitions (CRD/RepDistiller), so the helpers here
pin down the PyTorch behaviours that Flax does not default to: explicit symmetric padding (so
stride-2 convs give the same shapes and pixel alignment as PyTorch, which 'SAME' does not),
BatchNorm momentum 0.9 / epsilon 1e-5, and average pooling that counts padded zeros.

Every conv of the zoo takes a `conv_impl` (see `CONV_IMPLS` and `conv_general_dilated_fn`): the
same `nn.Conv` module and parameters, with either lax's convolution as it is ('xla') or the same
convolution with a backward pass arranged for XLA:CPU ('cpu'; docs/performance_cpu_conv.md).
"""

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Values of the models' `conv_impl` (named in `lpe.config` with the config's other choices):
# 'xla' runs `lax.conv_general_dilated` and `nn.max_pool` unchanged (the default; right for GPU
# and TPU); 'cpu' arranges them for XLA:CPU: the weight gradient reads the layer input from memory
# instead of recomputing it (a ResNet-20 training step takes about a third less time, bitwise the
# same results), 2x2 max pooling has an elementwise gradient (bitwise the same), a conv of a
# one-channel input (MNIST's first layer) sums its taps and BatchNorm is one affine map (both the
# same up to float32 rounding); docs/performance_cpu_conv.md, docs/performance.md.
# Parameters and their names are the same.
from lpe.config import CONV_IMPLS
from lpe.models import initializers

ModuleDef = Any
Dtype = Any
# What every zoo model returns: logits `[n, classes]` and named features, always 'embedding'.
ModelOutput = tuple[jnp.ndarray, dict[str, jnp.ndarray]]

# He-normal over fan-out, as RepDistiller initialises its convs (`lpe.models.initializers`).
CONV_INIT = initializers.HE_NORMAL_FAN_OUT


def _opaque_identity(x: jnp.ndarray, token: jnp.ndarray) -> jnp.ndarray:
  """Returns `x` through a conditional that XLA keeps, so its users read `x` from a buffer.

  XLA fuses cheap elementwise producers (BatchNorm, ReLU, residual adds) into every consumer. A
  conv's weight gradient first transposes its input into the layout the conv kernel wants; with
  the producers fused in, each transpose recomputes BatchNorm and the residual chain with strided
  reads, which took about a third of a ResNet-20 step on XLA:CPU. A conditional is a fusion
  boundary. `optimization_barrier` is not one on XLA:CPU (it is expanded before fusion), and XLA
  removes a conditional whose predicate it can fold or whose two branches are the same. Here the
  predicate `(bits | 1) != 0` is always true, so the result is always `x` exactly, but XLA does not
  fold it; `token` (any small array) supplies the bits.
  """
  bits = lax.bitcast_convert_type(token.reshape(-1)[0].astype(jnp.float32), jnp.int32)
  always = lax.bitwise_or(bits, jnp.int32(1)) != 0
  return lax.cond(always, lambda a: a, lambda a: -a, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _conv_reading_input(
  conv_fn: Callable, forward_fn: Callable, lhs: jnp.ndarray, rhs: jnp.ndarray
) -> jnp.ndarray:
  return forward_fn(lhs, rhs)


def _conv_reading_input_fwd(conv_fn, forward_fn, lhs, rhs):
  return forward_fn(lhs, rhs), (lhs, rhs)


def _conv_reading_input_bwd(conv_fn, forward_fn, residuals, g):
  lhs, rhs = residuals
  # The gradient convolutions are autodiff's own; only their input is made opaque.
  _, vjp = jax.vjp(conv_fn, _opaque_identity(lhs, rhs), rhs)
  return vjp(g)


def _single_channel_conv(lhs, rhs, window_strides, padding) -> jnp.ndarray:
  """A conv of a one-channel NHWC input with an HWIO kernel, as a sum of its shifted taps.

  `y[n, i, j, o] = sum_(a, b) x_padded[n, s_h i + a, s_w j + b] * k[a, b, 0, o]`, in row-major tap
  order: one elementwise loop. XLA:CPU gives such convs (MNIST's first layer) to Eigen, whose
  kernel took 19 ms against this loop's 0.5 ms for 128 28x28 images and 8 filters; the sum's order
  differs from Eigen's, so the result may differ from lax's by float32 rounding.
  """
  n, h, w, _ = lhs.shape
  kh, kw, _, _ = rhs.shape
  if isinstance(padding, str):
    padding = lax.padtype_to_pads((h, w), (kh, kw), window_strides, padding)
  (top, bottom), (left, right) = padding
  x = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
  sh, sw = window_strides
  ho, wo = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
  y = None
  for a in range(kh):
    for b in range(kw):
      tap = x[:, a : a + sh * (ho - 1) + 1 : sh, b : b + sw * (wo - 1) + 1 : sw] * rhs[a, b, 0]
      y = tap if y is None else y + tap
  return y


_conv_reading_input.defvjp(_conv_reading_input_fwd, _conv_reading_input_bwd)


def conv_general_dilated_cpu(
  lhs: jnp.ndarray,
  rhs: jnp.ndarray,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> jnp.ndarray:
  """`lax.conv_general_dilated` whose weight gradient reads its input `lhs` from memory.

  Same signature, forward value and gradient operations as lax's; only the backward pass differs,
  by an identity that stops XLA from fusing the producers of `lhs` into the weight gradient's
  transposes (see `_opaque_identity`). One exception: a dense NHWC conv of a one-channel input
  computes its forward value as a sum of shifted taps (`_single_channel_conv`), equal to lax's up
  to float32 rounding. Forward-mode differentiation (`jax.jvp`) is not defined.
  Meant for XLA:CPU: on an accelerator the added conditional may wait for its predicate on the
  host at every conv of the backward pass (not measured here), so keep 'xla' there.

  Args:
    lhs: Input, laid out as `dimension_numbers` says (NHWC in the zoo).
    rhs: Kernel (HWIO in the zoo).
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision, preferred_element_type: As in
      `lax.conv_general_dilated`.

  Returns:
    What `lax.conv_general_dilated(lhs, rhs, ...)` returns.
  """
  conv_fn = functools.partial(
    lax.conv_general_dilated,
    window_strides=window_strides,
    padding=padding,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    batch_group_count=batch_group_count,
    precision=precision,
    preferred_element_type=preferred_element_type,
  )
  forward_fn = conv_fn
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
  plain = all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
  if (
    lhs.ndim == 4
    and lhs.shape[-1] == 1
    and plain
    and feature_group_count == batch_group_count == 1
    and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc
  ):
    forward_fn = functools.partial(
      _single_channel_conv, window_strides=tuple(window_strides), padding=padding
    )
  return _conv_reading_input(conv_fn, forward_fn, lhs, rhs)


def conv_general_dilated_fn(conv_impl: str) -> Callable | None:
  """Returns what `nn.Conv(conv_general_dilated=...)` takes for `conv_impl` (None: lax's own).

  Args:
    conv_impl: One of `CONV_IMPLS`.
  """
  if conv_impl == 'xla':
    return None
  if conv_impl == 'cpu':
    return conv_general_dilated_cpu
  raise ValueError(f'conv_impl={conv_impl!r} is unknown; use one of {", ".join(CONV_IMPLS)}.')


def conv(
  features: int,
  kernel_size: int,
  strides: int = 1,
  *,
  groups: int = 1,
  use_bias: bool = False,
  dtype: Dtype = jnp.float32,
  conv_impl: str = 'xla',
  name: str | None = None,
) -> nn.Conv:
  """Returns a square conv with PyTorch's `padding=kernel_size // 2` on every side.

  Args:
    features: Output channels.
    kernel_size: Height and width of the kernel (odd).
    strides: Stride in both spatial dimensions.
    groups: `feature_group_count` (PyTorch's `groups`); equal to the input channels for a
      depthwise conv.
    use_bias: Whether the conv has a bias (PyTorch's `bias=`); most convs here are followed by
      BatchNorm and have none.
    dtype: Computation dtype; the kernel itself stays float32.
    conv_impl: One of `CONV_IMPLS`; changes the computation, never the parameters.
    name: Optional submodule name.
  """
  pad = kernel_size // 2
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(strides, strides),
    padding=((pad, pad), (pad, pad)),
    feature_group_count=groups,
    use_bias=use_bias,
    dtype=dtype,
    kernel_init=CONV_INIT,
    conv_general_dilated=conv_general_dilated_fn(conv_impl),
    name=name,
  )


class AffineBatchNorm(nn.Module):
  """`flax.linen.BatchNorm` (feature axis last, fast variance) computed as one affine map.

  Training: `mean = E[x]`, `var = max(0, E[x^2] - mean^2)` over every axis but the last (and
  over `axis_name`), `y = x * a + b` with `a = scale / sqrt(var + epsilon)` and
  `b = bias - mean * a`; flax computes `(x - mean) * a + bias`, the same up to float32 rounding.
  In this form neither pass needs `x - mean` as an array: XLA:CPU wrote and re-read it for every
  BatchNorm of the forward pass, and the backward pass reduces `g` and `g * x` directly; a
  ResNet-20 training step took about 8% less CPU time, FitNet-1's 13% (docs/performance.md).
  Same parameters (`scale`, `bias`), statistics (`mean`, `var`), running-average update and
  initial values as flax's, so checkpoints are interchangeable.

  Attributes:
    use_running_average: Normalise with the running averages (evaluation) instead of the batch.
    momentum: Running average `ra = momentum * ra + (1 - momentum) * batch value`.
    epsilon: Added to the variance.
    dtype: Computation dtype of `y`; statistics, `a` and `b` are float32.
    axis_name: Mapped axis to average the statistics over, or None.
    unbiased_var: Update the running variance with the unbiased batch variance `var * n / (n - 1)`
      (n values per channel, over every device of `axis_name`), as `torch.nn.BatchNorm2d` does;
      the batch itself is normalised with the biased `var` either way, as in PyTorch.

  Called with a `mask` (as flax's BatchNorm takes one; `batch_statistics_over` passes it), the
  batch statistics are over the positions where the mask is True only, and under `axis_name`
  over those of every device, however many each device holds (flax's pmean of per-device
  means would weight the devices equally); n counts only those positions.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  axis_name: str | None = None
  unbiased_var: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Normalises `x` `[..., c]` per channel; returns `[..., c]` in `dtype`.

    `mask`: None, or a bool array broadcastable to `x`: the positions the batch statistics
    are taken over (the others are normalised with them too)."""
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      axis_name = None if self.is_initializing() else self.axis_name
      count = None
      if mask is None:
        moments = jnp.stack([jnp.mean(xf, axes), jnp.mean(jnp.square(xf), axes)])
        if axis_name is not None:
          moments = lax.pmean(moments, axis_name)
      else:
        moments, count = _masked_moments(xf, mask, axis_name)
      mean, var = moments[0], jnp.maximum(0.0, moments[1] - jnp.square(moments[0]))
      if not self.is_initializing():
        running_var = self._running(var, x, count)
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * running_var
    a = scale * lax.rsqrt(var + self.epsilon)
    b = bias - mean * a
    return (x.astype(self.dtype) * a.astype(self.dtype) + b.astype(self.dtype)).astype(self.dtype)

  def _running(self, var: jnp.ndarray, x: jnp.ndarray, count: jnp.ndarray | None) -> jnp.ndarray:
    """The batch variance that enters the running average: `var`, or `var * n / (n - 1)` with
    `n` the values per channel (`count`, over every device, when the statistics were masked)."""
    if not self.unbiased_var:
      return var
    if count is not None:
      return var * (count / jnp.maximum(count - 1, 1))
    n = x.size // x.shape[-1]
    if self.axis_name is not None:
      n = n * lax.psum(1, self.axis_name)
    return var * (n / jnp.maximum(n - 1, 1))


def _masked_moments(
  x: jnp.ndarray, mask: jnp.ndarray, axis_name: str | None
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`[E[x], E[x^2]]` per channel (`[2, c]`) over the positions where `mask` is True (summed
  over `axis_name` before dividing) and their count per channel (`[c]`, float32)."""
  axes = tuple(range(x.ndim - 1))
  weight = jnp.broadcast_to(mask, x.shape).astype(jnp.float32)
  sums = jnp.stack([jnp.sum(x * weight, axes), jnp.sum(jnp.square(x) * weight, axes)])
  count = jnp.sum(weight, axes)
  if axis_name is not None:
    sums, count = lax.psum((sums, count), axis_name)
  return sums / jnp.maximum(count, 1.0), count


@contextlib.contextmanager
def batch_statistics_over(rows: jnp.ndarray) -> Iterator[set[tuple[str, ...]]]:
  """Within it, each BatchNorm that normalises by batch statistics takes them over `rows` only.

  `rows` is `[n]` bool over the batch axis of the modules' inputs (the valid rows of a padded
  batch, `config.last_batch='masked'`): as PyTorch's BatchNorm computes the statistics of a
  partial batch over its own rows, the padding enters neither the normalisation nor the
  running averages. It reaches `AffineBatchNorm` and `flax.linen.BatchNorm` (each is given
  `mask=`, through a flax method interceptor, so no model's code changes); under a mapped
  `axis_name` only `AffineBatchNorm`, which weights each device by its rows (flax's BatchNorm
  averages per-device means, which is wrong when the devices hold different numbers of valid
  rows: a ValueError says so when it is called).

  Yields the set of the scope paths of the BatchNorm modules it reached, filled as the model
  runs (traces), so the caller can check that no other module kept batch statistics (an NNX
  BatchNorm, a hand-written one).
  """
  reached = set()

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, nn.BatchNorm | AffineBatchNorm):
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.BatchNorm) and module.axis_name is not None:
      raise ValueError(
        "Masked BatchNorm statistics (config.last_batch='masked') under parallelism=pmap need "
        "lpe's AffineBatchNorm, which weights each device by its valid rows, but this model uses "
        'flax.linen.BatchNorm; set bn_unbiased_var=True or conv_impl=cpu (both use '
        'AffineBatchNorm), parallelism=jit, or last_batch=drop.'
      )
    reached.add(tuple(module.scope.path))
    x = args[0]
    kwargs = dict(kwargs, mask=rows.reshape(rows.shape[0], *(1,) * (x.ndim - 1)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield reached


def batch_norm(
  train: bool,
  *,
  dtype: Dtype,
  axis_name: str | None,
  conv_impl: str = 'xla',
  unbiased_var: bool = False,
) -> Callable[..., nn.Module]:
  """Returns a BatchNorm constructor with PyTorch's defaults (momentum 0.1 there is 0.9 here).

  Args:
    train: Whether to normalise with batch statistics (and update the running averages in the
      mutable `batch_stats` collection) rather than with the running averages.
    dtype: Computation dtype; scale and bias stay float32.
    axis_name: Mapped axis over which batch statistics are averaged (`pmap`/`vmap` axis name),
      or None for per-device statistics.
    conv_impl: As the model's convs: 'xla' gives `flax.linen.BatchNorm`, 'cpu' `AffineBatchNorm`
      (the same parameters and statistics, computed in an order that suits XLA:CPU).
    unbiased_var: PyTorch's running variance (`AffineBatchNorm.unbiased_var`); always
      `AffineBatchNorm`, which flax's BatchNorm has no such option for.
  """
  conv_general_dilated_fn(conv_impl)  # Rejects an unknown value.
  if unbiased_var:
    return functools.partial(
      AffineBatchNorm,
      use_running_average=not train,
      dtype=dtype,
      axis_name=axis_name,
      unbiased_var=True,
    )
  module = AffineBatchNorm if conv_impl == 'cpu' else nn.BatchNorm
  return functools.partial(
    module,
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    axis_name=axis_name,
  )


def _max_pool_2x2_even_fwd(x):
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
  taps = [windows[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]  # Row-major window order.
  y = jnp.maximum(jnp.maximum(taps[0], taps[1]), jnp.maximum(taps[2], taps[3]))
  # Which tap holds each window's first maximum: the one lax's gradient gives everything to.
  first = jnp.where(taps[0] == y, 0, jnp.where(taps[1] == y, 1, jnp.where(taps[2] == y, 2, 3)))
  # Read from memory in the backward pass: fused there, XLA would recompute it from four
  # strided reads of the layer's input (and its BatchNorm) for every gradient element.
  return y, _opaque_identity(first.astype(jnp.int8), y)


@jax.custom_vjp
def _max_pool_2x2_even(x: jnp.ndarray) -> jnp.ndarray:
  return _max_pool_2x2_even_fwd(x)[0]


def _max_pool_2x2_even_bwd(first, g):
  n, h2, w2, c = g.shape
  # Broadcasts only, no concatenation: XLA emits one vectorised loop over the input's gradient.
  shape = (1, 1, 2, 1, 2, 1)
  tap = 2 * lax.broadcasted_iota(jnp.int8, shape, 2) + lax.broadcasted_iota(jnp.int8, shape, 4)
  hit = first[:, :, None, :, None, :] == tap
  dx = jnp.where(hit, g[:, :, None, :, None, :], jnp.zeros((), g.dtype))
  return (dx.reshape(n, 2 * h2, 2 * w2, c),)


_max_pool_2x2_even.defvjp(_max_pool_2x2_even_fwd, _max_pool_2x2_even_bwd)


def max_pool_2x2(x: jnp.ndarray, conv_impl: str = 'xla') -> jnp.ndarray:
  """2x2 max pooling with stride 2, flooring odd sizes like PyTorch's `MaxPool2d(2, 2)`.

  `y[n, i, j, c] = max(x[n, 2i + a, 2j + b, c] for a, b in {0, 1})`. With `conv_impl='cpu'` the
  same maximum and the same gradient (all of it to the first maximum of each window in row-major
  order, as lax's `select_and_scatter_add` gives it) are computed elementwise on the four taps,
  the forward pass saving which tap that is (int8).
  XLA:CPU expands lax's pooling gradient into a reduce-window over four index arrays and a
  scatter, which took about a third of a FitNet-1 training step (docs/performance.md).

  Args:
    x: `[n, h, w, c]`.
    conv_impl: One of `CONV_IMPLS`, as the model's convs ('xla': `flax.linen.max_pool`).

  Returns:
    `[n, h // 2, w // 2, c]`.

  Example:
    >>> max_pool_2x2(jnp.arange(16.0).reshape(1, 4, 4, 1), 'cpu')[0, :, :, 0]
    Array([[ 5.,  7.], [13., 15.]], dtype=float32)
  """
  if conv_impl == 'cpu':
    _, h, w, _ = x.shape
    return _max_pool_2x2_even(x[:, : h // 2 * 2, : w // 2 * 2])  # The slice's gradient pads.
  conv_general_dilated_fn(conv_impl)  # Rejects an unknown value.
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Averages `[n, h, w, c]` over space to `[n, c]`.

  RepDistiller pools with fixed windows (`AvgPool2d(8)`, `avg_pool2d(out, 4)`) that cover the
  whole map for 32x32 inputs; the global mean is identical there and also works for 28x28.
  """
  return jnp.mean(x, axis=(1, 2))


def channel_shuffle(x: jnp.ndarray, groups: int) -> jnp.ndarray:
  """ShuffleNet's channel shuffle on NHWC: channel `g * (c / groups) + i` moves to `i * groups + g`.

  This is PyTorch's `view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4)` with channels last.
  """
  n, h, w, c = x.shape
  x = x.reshape(n, h, w, groups, c // groups)
  return jnp.swapaxes(x, 3, 4).reshape(n, h, w, c)


def maxout(x: jnp.ndarray, pieces: int) -> jnp.ndarray:
  """Maxout over the last axis: `[..., c * pieces] -> [..., c]`, the max of adjacent pieces.

  Unit `i` is the max of channels `i * pieces` to `i * pieces + pieces - 1` (pylearn2's grouping).
  """
  *lead, c = x.shape
  if c % pieces:
    raise ValueError(f'maxout needs channels ({c}) divisible by pieces ({pieces}).')
  return jnp.max(x.reshape(*lead, c // pieces, pieces), axis=-1)
