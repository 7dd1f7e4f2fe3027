"""Baseline distillation losses, defined as in the CIFAR-100 CRD/RepDistiller benchmark.

Each loss follows the matching class in RepDistiller's `distiller_zoo/` (KD.py, FitNet.py, AT.py,
SP.py, RKD.py, PKT.py; github.com/HobbitLong/RepDistiller, Tian, Krishnan and Isola, "Contrastive
Representation Distillation", ICLR 2020), so numbers are comparable with that benchmark:

- per-example losses (`kd_loss`, `fitnet_loss`, `attention_transfer_loss`) return `[n]` values
  whose batch mean equals RepDistiller's batch loss;
- batch-relational losses (`similarity_preserving_loss`, `rkd_loss`, `pkt_loss`) return a scalar
  over the batch they are given (the per-device batch under `pmap`, as in single-GPU RepDistiller),
  or with `where` over its rows where `where` is True: the value of the loss on those rows alone
  (a padded last batch, `config.last_batch='masked'`; the other rows get no gradient).

All losses compute in float32 (bfloat16 inputs are upcast) with full-precision matmuls, pass no
gradient to the teacher argument (`jax.lax.stop_gradient`), and check shapes before any work.
Hyper-parameters are keyword-only; those that must be positive are checked when they are concrete
Python or NumPy numbers (a traced value under `jit` cannot be checked).

Bad input is never hidden: a NaN or inf feature makes the loss of its example (per-example losses)
or of the batch (relational losses) non-finite; `kd_loss` reads a `-inf` logit as probability 0
(see there). Finite features of any magnitude give the right value wherever the maths is
scale-invariant (relational losses, attention maps, logits): those are computed on inputs divided
by a power of two near their largest magnitude, which is exact, so ordinary inputs give the same
values as the plain formulas.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lpe.losses.locality import (
  _F32_TINY,
  _masked_rows_zeroed,
  _power_of_two_scale,
  pairwise_sq_distances,
)

__all__ = [
  'FitNetRegressor',
  'attention_transfer_loss',
  'fitnet_loss',
  'kd_loss',
  'pkt_loss',
  'rkd_loss',
  'similarity_preserving_loss',
]

# torch.nn.functional.normalize's default eps: x / max(||x||, eps).
_NORMALIZE_EPS = 1e-12
# The default matmul precision on GPU/TPU (tf32/bf16 passes) is too coarse for Gram matrices.
_HIGHEST = jax.lax.Precision.HIGHEST


def _check_rank(fn: str, name: str, x: jax.Array, ranks: Sequence[int], layout: str) -> None:
  if np.ndim(x) not in ranks:
    raise ValueError(f'{fn} expects {name} of shape {layout}, got shape {np.shape(x)}.')


def _check_same_batch(fn: str, student: jax.Array, teacher: jax.Array) -> None:
  if np.shape(student)[0] != np.shape(teacher)[0]:
    raise ValueError(
      f'{fn}: student and teacher batch sizes differ ({np.shape(student)[0]} vs '
      f'{np.shape(teacher)[0]}); pass the same examples to both.'
    )


def _check_positive(fn: str, name: str, value: float) -> None:
  if np.ndim(value) != 0:
    raise ValueError(f'{fn}: {name} must be a scalar, got shape {np.shape(value)}.')
  try:
    concrete = float(value)
  except TypeError:  # A tracer under jit (ConcretizationTypeError is a TypeError).
    return
  if not concrete > 0:
    raise ValueError(f'{fn}: {name} must be positive, got {concrete}.')


def _relational_inputs(
  fn: str, student: jax.Array, teacher: jax.Array, *, min_batch: int = 1
) -> tuple[jax.Array, jax.Array]:
  """Checks `[n, ...]` inputs and returns them flattened to `[n, d]` float32, teacher frozen."""
  _check_rank(fn, 'student features', student, range(2, 9), '[n, ...]')
  _check_rank(fn, 'teacher features', teacher, range(2, 9), '[n, ...]')
  _check_same_batch(fn, student, teacher)
  n = np.shape(student)[0]
  if n < min_batch:
    raise ValueError(f'{fn} needs a batch of at least {min_batch} examples, got {n}.')
  student = jnp.asarray(student, jnp.float32).reshape(n, -1)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher, jnp.float32).reshape(n, -1))
  return student, teacher


def _nan_unless_finite(loss: jax.Array, *inputs: jax.Array) -> jax.Array:
  """`loss` where every input row (relational: the whole batch) is finite, NaN elsewhere.

  Stated rather than left to the arithmetic, which can lose a non-finite value (`rsqrt(inf) = 0`,
  a clamp, an underflowing weight).
  """
  finite = jnp.ones(np.shape(loss), bool)
  for x in inputs:
    x_finite = jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    finite &= x_finite if np.ndim(loss) else x_finite.all()
  return jnp.where(finite, loss, jnp.nan)


def _l2_normalize(
  x: jax.Array, axis: int = -1, sq_eps: float | jax.Array = _NORMALIZE_EPS**2
) -> jax.Array:
  """`x / max(||x||_2, sqrt(sq_eps))` along `axis`, as `torch.nn.functional.normalize`.

  Written as `x * rsqrt(max(||x||^2, eps^2))`, the same value, with the norm's gradient cut
  where the clamp is active, so that the gradient at a zero vector is finite. Each vector is
  first divided by a power of two near its largest entry (exact), so that `||x||^2` neither
  overflows nor underflows; the clamp still applies to the norm in `x`'s units (floored at the
  smallest normal float32, which only zero vectors reach).
  """
  scale = _power_of_two_scale(x, axis)
  x = x / scale
  sq_norm = jnp.sum(x * x, axis=axis, keepdims=True)
  clamp = jax.lax.stop_gradient(jnp.maximum(sq_eps / scale / scale, _F32_TINY))
  # rsqrt's slope at a small clamp overflows float32 (it is about clamp^-1.5): keep it off the
  # gradient path, where 0 * inf would be NaN.
  above = sq_norm > clamp
  inv_norm = jnp.where(above, jax.lax.rsqrt(jnp.where(above, sq_norm, 1.0)), jax.lax.rsqrt(clamp))
  return x * inv_norm


def _smooth_l1(x: jax.Array, y: jax.Array, count: jax.Array | None = None) -> jax.Array:
  """Mean Huber loss with beta = 1, as `torch.nn.functional.smooth_l1_loss` (mean reduction);
  with `count`, the sum divided by it (the entries outside a mask are 0 in both)."""
  diff = jnp.abs(x - y)
  huber = jnp.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5)
  return jnp.mean(huber) if count is None else jnp.sum(huber) / count


def _masked_inputs(
  fn: str, student: jax.Array, teacher: jax.Array, where: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The `[n, d]` inputs with the rows outside `where` zeroed, and the count of the others
  (float32, at least 1). Zeroed rows leave every power-of-two scale to the valid rows."""
  _check_rank(fn, 'where', where, (1,), '[n]')
  if np.shape(where)[0] != student.shape[0]:
    raise ValueError(
      f'{fn}: where has {np.shape(where)[0]} rows but the features have {student.shape[0]}; '
      'pass one flag per example.'
    )
  where = jnp.asarray(where, bool)
  count = jnp.maximum(jnp.sum(where).astype(jnp.float32), 1.0)
  return _masked_rows_zeroed(student, where), _masked_rows_zeroed(teacher, where), count


def kd_loss(
  student_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 4.0
) -> jax.Array:
  """Hinton's knowledge-distillation loss per example: a tempered KL divergence.

  `loss_i = T^2 * KL(softmax(t_i / T) || softmax(s_i / T))
          = T^2 * sum_c p_ic (log p_ic - log q_ic)`, with `p = softmax(t / T)` and
  `q = softmax(s / T)`. RepDistiller's `DistillKL` sums the KL over classes and examples and
  divides by the batch size, so it equals `kd_loss(...).mean()`. The `T^2` factor keeps gradient
  magnitudes independent of `T`.

  The log-softmax subtracts each row's largest logit before dividing by `T`, so finite logits of
  any magnitude and any `T` work; classes with `p = 0` contribute 0 (`0 log 0 = 0`, as
  `kl_div`). Non-finite logits:

  - `-inf` is probability 0, exactly the limit, and the usual way to mask a class: a `-inf`
    teacher logit drops the class from the sum; a `-inf` student logit costs nothing where
    `p = 0` and makes the loss `+inf` where `p > 0` (the KL is infinite).
  - `NaN` or `+inf` anywhere in a row makes that row's loss NaN. `+inf` is not read as a one-hot
    target: a float32 network gives it only by overflowing, which the trainer's non-finite guard
    should see, and with two `+inf` logits the limit is undefined. For one-hot targets use
    cross-entropy, or large finite logits (which this computes exactly).

  Args:
    student_logits: `[n, classes]` student logits (any float dtype; bfloat16 is upcast).
    teacher_logits: `[n, classes]` teacher logits; no gradient flows to them.
    temperature: softmax temperature `T > 0`; 4 by default, as RepDistiller and CRD use.

  Returns:
    `[n]` float32 per-example losses.

  Raises:
    ValueError: if the inputs are not `[n, classes]` of the same shape, or `temperature <= 0`.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> t = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 8.0]])
    >>> [round(v, 4) for v in kd_loss(s, t, temperature=4.0).tolist()]
    [0.0, 6.9286]

  Reference: G. Hinton, O. Vinyals and J. Dean, "Distilling the Knowledge in a Neural Network",
  NIPS Deep Learning Workshop 2015, arXiv 1503.02531.
  """
  fn = 'kd_loss'
  _check_rank(fn, 'student_logits', student_logits, (2,), '[n, classes]')
  _check_rank(fn, 'teacher_logits', teacher_logits, (2,), '[n, classes]')
  if np.shape(student_logits) != np.shape(teacher_logits):
    raise ValueError(
      f'kd_loss: student_logits shape {np.shape(student_logits)} and teacher_logits shape '
      f'{np.shape(teacher_logits)} differ; both must be [n, classes] over the same classes.'
    )
  _check_positive(fn, 'temperature', temperature)
  student = jnp.asarray(student_logits, jnp.float32)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
  log_q = _tempered_log_softmax(student, temperature)
  log_p = _tempered_log_softmax(teacher, temperature)
  p = jnp.exp(log_p)
  # Where p = 0 (a -inf logit, or exp underflowing), the term is 0 even if log_p or log_q is
  # -inf; a NaN p is not 0 and stays.
  kl = jnp.sum(jnp.where(p == 0, 0.0, p * (log_p - log_q)), axis=-1)
  bad = lambda x: jnp.any(jnp.isnan(x) | (x == jnp.inf), axis=-1)
  return jnp.where(bad(student) | bad(teacher), jnp.nan, kl * temperature**2)


def _tempered_log_softmax(logits: jax.Array, temperature: float | jax.Array) -> jax.Array:
  """`log_softmax(logits / T)` along the last axis, computed as `log_softmax((x - max x) / T)`.

  The same value, but `x / T` cannot overflow for finite `x` (`x - max x <= 0`, and where it
  overflows to `-inf` the probability is 0 to float32 precision anyway).
  """
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  return jax.nn.log_softmax((logits - top) / temperature, axis=-1)


def fitnet_loss(student_hint: jax.Array, teacher_hint: jax.Array) -> jax.Array:
  """FitNet hint loss per example: the mean squared error over all non-batch dimensions.

  `loss_i = mean_k (s_ik - t_ik)^2` over the flattened features of example `i`, so the batch
  mean equals RepDistiller's `HintLoss` (`nn.MSELoss()`). The student hint must already have the
  teacher's shape: map it with `FitNetRegressor` (whose parameters are trained with the student).
  The error is not scale-invariant: a squared error beyond float32's range gives `inf`.

  Args:
    student_hint: `[n, ...]` regressed student features (e.g. NHWC maps or `[n, d]` vectors).
    teacher_hint: teacher features of the same shape; no gradient flows to them.

  Returns:
    `[n]` float32 per-example losses.

  Raises:
    ValueError: if an input has rank < 2 or the two shapes differ.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.zeros((2, 2, 2, 3))
    >>> t = jnp.ones((2, 2, 2, 3)).at[1].set(2.0)
    >>> fitnet_loss(s, t).tolist()
    [1.0, 4.0]

  Reference: A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta and Y. Bengio, "FitNets:
  Hints for Thin Deep Nets", ICLR 2015, arXiv 1412.6550.
  """
  fn = 'fitnet_loss'
  _check_rank(fn, 'student_hint', student_hint, range(2, 9), '[n, ...]')
  _check_rank(fn, 'teacher_hint', teacher_hint, range(2, 9), '[n, ...]')
  if np.shape(student_hint) != np.shape(teacher_hint):
    raise ValueError(
      f'fitnet_loss: student_hint shape {np.shape(student_hint)} differs from teacher_hint '
      f'shape {np.shape(teacher_hint)}; map the student features with '
      'FitNetRegressor(features=teacher_width) first (spatial sizes must already match).'
    )
  student = jnp.asarray(student_hint, jnp.float32)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_hint, jnp.float32))
  sq_err = jnp.square(student - teacher)
  return jnp.mean(sq_err.reshape(sq_err.shape[0], -1), axis=1)


class FitNetRegressor(nn.Module):
  """The FitNet regressor: maps student features to the teacher's width.

  As RepDistiller's `ConvReg` for equal spatial sizes and its `Regress` for vectors:

  - NHWC `[n, h, w, c_s]` input: 1x1 convolution (with bias) to `features` channels, then batch
    normalisation over `(n, h, w)` with a learnt scale and bias (epsilon 1e-5, as PyTorch), then
    ReLU. Output `[n, h, w, features]`: the spatial size is kept, so the teacher map must have the
    student's spatial size; `fitnet_loss` raises a ValueError otherwise. (`ConvReg`'s strided or
    transposed convolutions for 2x size ratios are not supported.)
  - `[n, d_s]` input: Dense (with bias) to `features`, then ReLU. Output `[n, features]`.

  The normalisation always uses the statistics of the current batch (with `where`, of its rows
  where it is True), as PyTorch BatchNorm in training mode, and keeps no running averages: the
  regressor is used only for the training loss and dropped at evaluation, so running statistics
  would never be read, and the module stays a pure function with only a `params` collection.
  Under `pmap` the statistics are per device, as unsynchronised BatchNorm.

  Its parameters are extra trainable parameters: optimise them together with the student's, and
  do not keep them as part of the student. Count: `c_s * features + 3 * features` for NHWC
  input (conv kernel and bias, normalisation scale and bias; as `ConvReg` with a 1x1 kernel),
  `d_s * features + features` for vectors. Initialisation uses Flax defaults (LeCun normal
  kernels, zero biases), not PyTorch's.

  Attributes:
    features: teacher width (channels for NHWC maps, `d` for vectors).
    epsilon: variance epsilon of the batch normalisation.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> reg = FitNetRegressor(features=8)
    >>> x = jnp.ones((2, 4, 4, 3))
    >>> params = reg.init(jax.random.key(0), x)
    >>> reg.apply(params, x).shape
    (2, 4, 4, 8)
    >>> sum(p.size for p in jax.tree.leaves(params))  # 3*8 + 8 + 8 + 8
    48

  Reference: A. Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
  """

  features: int
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, where: jax.Array | None = None) -> jax.Array:
    """The hint `[n, h, w, features]` or `[n, features]` of `x`; `where`: optional `[n]` bool,
    the rows whose statistics normalise the map (a padded batch's own rows)."""
    _check_rank('FitNetRegressor', 'x', x, (2, 4), '[n, d] or NHWC [n, h, w, c]')
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 2:
      return nn.relu(nn.Dense(self.features, name='dense')(x))
    y = nn.Conv(self.features, (1, 1), name='conv')(x)
    if where is None:
      mean = jnp.mean(y, axis=(0, 1, 2))
      var = jnp.var(y, axis=(0, 1, 2))  # Biased, as BatchNorm normalises with.
    else:
      weight = jnp.asarray(where, jnp.float32)[:, None, None, None]
      count = jnp.maximum(jnp.sum(weight) * y.shape[1] * y.shape[2], 1.0)
      mean = jnp.sum(y * weight, axis=(0, 1, 2)) / count
      var = jnp.sum(jnp.square(y - mean) * weight, axis=(0, 1, 2)) / count
    scale = self.param('bn_scale', nn.initializers.ones, (self.features,), jnp.float32)
    bias = self.param('bn_bias', nn.initializers.zeros, (self.features,), jnp.float32)
    y = (y - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return nn.relu(y)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """`[out, in]` averaging weights of PyTorch's `adaptive_avg_pool` along one axis.

  Output cell `i` averages inputs `floor(i * in / out)` up to `ceil((i + 1) * in / out)`
  (exclusive); for `in` a multiple of `out` this is plain `in / out` average pooling.
  """
  weights = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -(-((i + 1) * in_size) // out_size)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def _adaptive_avg_pool(x: jax.Array, height: int, width: int) -> jax.Array:
  """Adaptive average pooling of an NHWC map to `[n, height, width, c]`."""
  if x.shape[1:3] == (height, width):
    return x
  pool_h = _adaptive_pool_matrix(x.shape[1], height)
  pool_w = _adaptive_pool_matrix(x.shape[2], width)
  return jnp.einsum('nhwc,ph,qw->npqc', x, pool_h, pool_w, precision=_HIGHEST)


def _attention_map(x: jax.Array, p: float | jax.Array) -> jax.Array:
  """`[n, h*w]` L2-normalised spatial attention: channel mean of `|x|^p`, flattened.

  Each example's map is first divided by a power of two `m` near its largest entry: the
  normalised attention is the same, but `|x|^p` no longer overflows (or underflows). The clamp of
  the normalisation stays in the original units: `eps / m^p`.
  """
  scale = _power_of_two_scale(x, axis=(1, 2, 3))  # [n, 1, 1, 1]
  attention = jnp.mean(jnp.abs(x / scale) ** p, axis=-1)
  log2_eps = float(np.log2(_NORMALIZE_EPS))
  sq_eps = jnp.exp2(2.0 * (log2_eps - p * jnp.log2(scale.reshape(-1, 1))))
  return _l2_normalize(attention.reshape(attention.shape[0], -1), sq_eps=sq_eps)


def attention_transfer_loss(
  student_map: jax.Array, teacher_map: jax.Array, *, p: float = 2.0
) -> jax.Array:
  """Attention-transfer loss per example between NHWC feature maps.

  The attention of a map `f` of shape `[h, w, c]` is `a = vec(mean_c |f|^p) / ||vec(mean_c
  |f|^p)||_2` (a unit vector of length `h * w`), and `loss_i = mean_k (a_s,ik - a_t,ik)^2`. As
  RepDistiller's `Attention.at_loss`, whose `.pow(2).mean()` over the batch equals
  `attention_transfer_loss(...).mean()`. Channel counts may differ.

  When the spatial sizes differ, the larger map is adaptive-average-pooled (PyTorch's
  `adaptive_avg_pool2d`) to the smaller size before the attention is taken; height and width
  are pooled independently to `min(h_s, h_t)` and `min(w_s, w_t)` (RepDistiller compares heights
  only and assumes square maps, which this reproduces).

  Deviation: this uses `|f|^p` as in the paper; RepDistiller uses `f^p`, which is the same for
  even `p`, including the default `p = 2`.

  Args:
    student_map: `[n, h_s, w_s, c_s]` student feature map (NHWC).
    teacher_map: `[n, h_t, w_t, c_t]` teacher feature map; no gradient flows to it.
    p: positive exponent of the attention (RepDistiller and the paper use 2).

  Returns:
    `[n]` float32 per-example losses.

  Raises:
    ValueError: if a map is not rank 4, the batch sizes differ, or `p <= 0`.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.ones((1, 2, 2, 3)).at[0, 0, 0].set(0.0)
    >>> t = jnp.ones((1, 4, 4, 5))
    >>> [round(v, 4) for v in attention_transfer_loss(s, t).tolist()]
    [0.067]

  Reference: S. Zagoruyko and N. Komodakis, "Paying More Attention to Attention: Improving the
  Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017,
  arXiv 1612.03928.
  """
  fn = 'attention_transfer_loss'
  _check_rank(fn, 'student_map', student_map, (4,), 'NHWC [n, h, w, c]')
  _check_rank(fn, 'teacher_map', teacher_map, (4,), 'NHWC [n, h, w, c]')
  _check_same_batch(fn, student_map, teacher_map)
  _check_positive(fn, 'p', p)
  student = jnp.asarray(student_map, jnp.float32)
  teacher = jax.lax.stop_gradient(jnp.asarray(teacher_map, jnp.float32))
  height = min(student.shape[1], teacher.shape[1])
  width = min(student.shape[2], teacher.shape[2])
  a_s = _attention_map(_adaptive_avg_pool(student, height, width), p)
  a_t = _attention_map(_adaptive_avg_pool(teacher, height, width), p)
  return _nan_unless_finite(jnp.mean(jnp.square(a_s - a_t), axis=1), student, teacher)


def _row_normalized_gram(x: jax.Array) -> jax.Array:
  """`G = x x^T` with rows L2-normalised (clamp 1e-12), computed on `x / s`, `s` a power of two.

  Row normalisation cancels the common factor `s^2` exactly; the clamp is rescaled to match.
  """
  scale = _power_of_two_scale(x)
  x = x / scale
  sq_eps = _NORMALIZE_EPS**2 / scale / scale / scale / scale  # Underflows only for huge x.
  return _l2_normalize(jnp.matmul(x, x.T, precision=_HIGHEST), axis=1, sq_eps=sq_eps)


def similarity_preserving_loss(
  student_map: jax.Array, teacher_map: jax.Array, *, where: jax.Array | None = None
) -> jax.Array:
  """Similarity-preserving loss over the batch (a scalar: the loss is batch-relational).

  With `f` the features flattened to `[n, d]`, `G = f f^T` (`[n, n]`) is L2-normalised row by
  row, and `loss = sum_ij (G_s,ij - G_t,ij)^2 / n^2`, as RepDistiller's
  `Similarity.similarity_loss`. The widths (and shapes after the batch axis) may differ.

  Args:
    student_map: `[n, ...]` student features (e.g. NHWC maps or `[n, d]` vectors).
    teacher_map: `[n, ...]` teacher features; no gradient flows to them.
    where: optional `[n]` bool: the loss of the rows where it is True alone (`n` their count;
      zeroed rows add nothing to the Gram rows' norms).

  Returns:
    Scalar float32 loss over the batch.

  Raises:
    ValueError: if an input has rank < 2 or the batch sizes differ.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> t = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    >>> round(float(similarity_preserving_loss(s, t)), 4)
    0.2929

  Reference: F. Tung and G. Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019,
  arXiv 1907.09682.
  """
  student, teacher = _relational_inputs('similarity_preserving_loss', student_map, teacher_map)
  n = student.shape[0]
  if where is not None:
    student, teacher, n = _masked_inputs('similarity_preserving_loss', student, teacher, where)
  diff = _row_normalized_gram(student) - _row_normalized_gram(teacher)
  return _nan_unless_finite(jnp.sum(jnp.square(diff)) / (n * n), student, teacher)


def _rkd_distances(x: jax.Array, pairs: jax.Array | None = None) -> jax.Array:
  """Distances normalised by their mean over the positive entries, as RepDistiller's `pdist`.

  `d_ij = sqrt(max(||x_i - x_j||^2, 1e-12))` off the diagonal and 0 on it. The clamp keeps the
  square root's gradient finite (and cuts it where active) for coincident rows. Computed on
  `x / s` with `s` a power of two (and the clamp divided by `s^2`, floored at the smallest
  normal float32), which the mean normalisation cancels exactly. With `pairs` (`[n, n]` bool)
  the other entries are 0 and out of the mean (all are 0 when no pair of distinct rows is in).
  """
  n = x.shape[0]
  scale = _power_of_two_scale(x)
  clamp = jnp.maximum(1e-12 / scale / scale, _F32_TINY)
  dist = jnp.sqrt(jnp.maximum(pairwise_sq_distances(x / scale), clamp))
  dist = jnp.where(jnp.eye(n, dtype=bool), 0.0, dist)
  if pairs is not None:
    dist = jnp.where(pairs, dist, 0.0)
  positive = dist > 0
  # No positive entry (fewer than 2 rows in `pairs`): every distance is 0, and so is the result.
  count = jnp.sum(positive)
  mean = jnp.sum(jnp.where(positive, dist, 0.0)) / jnp.maximum(count, 1)
  return dist / jnp.where(count > 0, mean, 1.0)


def _rkd_angles(x: jax.Array, rows: jax.Array | None = None) -> jax.Array:
  """`[n, n, n]` cosines `<e_ij, e_ik>` of the unit difference vectors `e_ij = unit(x_j - x_i)`.

  A zero difference (`j = i`, or duplicate rows) gives a zero vector, as F.normalize. The
  differences are taken on `x / s` (`s` a power of two), so they cannot overflow. With `rows`
  (`[n]` bool) the cosines of triples outside them are 0.
  """
  scale = _power_of_two_scale(x)
  x = x / scale
  sq_eps = _NORMALIZE_EPS**2 / scale / scale
  unit = _l2_normalize(x[None, :, :] - x[:, None, :], axis=-1, sq_eps=sq_eps[..., None])
  cosines = jnp.einsum('ijd,ikd->ijk', unit, unit, precision=_HIGHEST)
  if rows is None:
    return cosines
  return jnp.where(rows[:, None, None] & rows[None, :, None] & rows[None, None, :], cosines, 0.0)


def rkd_loss(
  student_features: jax.Array,
  teacher_features: jax.Array,
  *,
  distance_weight: float = 25.0,
  angle_weight: float = 50.0,
  where: jax.Array | None = None,
) -> jax.Array:
  """Relational knowledge distillation over the batch (a scalar: the loss is batch-relational).

  With the features flattened to `[n, d]` (widths may differ):

  - distance term: `d_ij = ||x_i - x_j||` (clamped at `sqrt(1e-12)` off the diagonal, 0 on
    it) divided by the mean of the positive `d_ij`; `L_d = mean_ij huber(d_s,ij - d_t,ij)`;
  - angle term: `c_ijk = <e_ij, e_ik>` with `e_ij = (x_j - x_i) / max(||x_j - x_i||, 1e-12)`;
    `L_a = mean_ijk huber(c_s,ijk - c_t,ijk)`;

  where `huber` is smooth-L1 with beta 1 (`0.5 x^2` for `|x| < 1`, else `|x| - 0.5`), and
  `loss = distance_weight * L_d + angle_weight * L_a`, as RepDistiller's `RKDLoss` (weights 25
  and 50). Gradients are finite for coincident rows (the clamps cut them there).

  Memory is `O(n^2 d + n^3)` for the angle term, as in RepDistiller: apply it to embeddings.

  Args:
    student_features: `[n, ...]` student features, `n >= 2`.
    teacher_features: `[n, ...]` teacher features; no gradient flows to them.
    distance_weight: weight of the distance term.
    angle_weight: weight of the angle term.
    where: optional `[n]` bool: the loss of the rows where it is True alone (the means over
      their pairs and triples). Fewer than 2 such rows have no relations to keep: the loss is
      0 with a zero gradient (as SP's and PKT's), so a padded last batch with one real row
      trains on its other terms.

  Returns:
    Scalar float32 loss over the batch.

  Raises:
    ValueError: if an input has rank < 2, the batch sizes differ, or the batch has fewer than
      2 examples (there are no distances).

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> abs(float(rkd_loss(s, 3.0 * s))) < 1e-6  # Distances and angles are scale-invariant.
    True
    >>> t = jnp.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    >>> round(float(rkd_loss(s, t)), 3)
    8.274

  Reference: W. Park, D. Kim, Y. Lu and M. Cho, "Relational Knowledge Distillation", CVPR 2019,
  arXiv 1904.05068.
  """
  student, teacher = _relational_inputs('rkd_loss', student_features, teacher_features, min_batch=2)
  if where is None:
    loss_d = _smooth_l1(_rkd_distances(student), _rkd_distances(teacher))
    loss_a = _smooth_l1(_rkd_angles(student), _rkd_angles(teacher))
  else:
    student, teacher, n = _masked_inputs('rkd_loss', student, teacher, where)
    rows = jnp.asarray(where, bool)
    pairs = rows[:, None] & rows[None, :]
    loss_d = _smooth_l1(_rkd_distances(student, pairs), _rkd_distances(teacher, pairs), n * n)
    angles = _rkd_angles(student, rows), _rkd_angles(teacher, rows)
    loss_a = _smooth_l1(*angles, n * n * n)
  return _nan_unless_finite(distance_weight * loss_d + angle_weight * loss_a, student, teacher)


def _pkt_probabilities(
  x: jax.Array, eps: float | jax.Array, pairs: jax.Array | None = None
) -> jax.Array:
  """Rows of the cosine kernel `(cos + 1) / 2`, each normalised to sum to 1.

  `x_i / (||x_i|| + eps)` is computed as `(x_i / m) / (||x_i / m|| + eps / m)` with `m` a power
  of two near the row's largest entry: the same value, without overflow in `||x_i||^2`. With
  `pairs` (`[n, n]` bool) the kernel is 0 outside them (a row without any is all 0).
  """
  scale = _power_of_two_scale(x, axis=1)
  x = x / scale
  sq_norm = jnp.sum(x * x, axis=1, keepdims=True)
  # sqrt has an infinite gradient at 0: take it only on positive values (zero rows stay 0).
  norm = jnp.where(sq_norm > 0, jnp.sqrt(jnp.where(sq_norm > 0, sq_norm, 1.0)), 0.0)
  unit = x / (norm + eps / scale)
  kernel = (jnp.matmul(unit, unit.T, precision=_HIGHEST) + 1.0) / 2.0
  if pairs is None:
    return kernel / jnp.sum(kernel, axis=1, keepdims=True)
  kernel = jnp.where(pairs, kernel, 0.0)
  total = jnp.sum(kernel, axis=1, keepdims=True)
  return kernel / jnp.where(total > 0, total, 1.0)


def pkt_loss(
  student_features: jax.Array,
  teacher_features: jax.Array,
  *,
  eps: float = 1e-7,
  where: jax.Array | None = None,
) -> jax.Array:
  """Probabilistic knowledge transfer over the batch (a scalar: the loss is batch-relational).

  With the features flattened to `[n, d]` (widths may differ), each row is scaled to
  `x_i / (||x_i|| + eps)`, the cosine kernel is shifted to `[0, 1]` as `K_ij = (x_i . x_j + 1)
  / 2` and row-normalised to `P_ij = K_ij / sum_k K_ik`; then
  `loss = mean_ij P_t,ij * log((P_t,ij + eps) / (P_s,ij + eps))`, a KL(teacher || student)
  averaged over all `n^2` entries, with `eps` placed as in RepDistiller's `PKT`. Gradients are
  finite for duplicate and all-zero rows. (RepDistiller also zeroes NaNs after the row
  scaling; with `eps > 0` these arise only from non-finite inputs, so that step is omitted.)

  Args:
    student_features: `[n, ...]` student features.
    teacher_features: `[n, ...]` teacher features; no gradient flows to them.
    eps: positive stabiliser of the row norm and the logarithm.
    where: optional `[n]` bool: the loss of the rows where it is True alone (the mean over
      their `n^2` pairs).

  Returns:
    Scalar float32 loss over the batch.

  Raises:
    ValueError: if an input has rank < 2, the batch sizes differ, or `eps <= 0`.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> abs(float(pkt_loss(s, 2.0 * s))) < 1e-6  # The kernel is scale-invariant.
    True
    >>> round(float(pkt_loss(s, jnp.array([[1.0, 0.0], [1.0, 0.0]]))), 4)
    0.0294

  Reference: N. Passalis and A. Tefas, "Learning Deep Representations with Probabilistic
  Knowledge Transfer", ECCV 2018, arXiv 1803.10837.
  """
  fn = 'pkt_loss'
  student, teacher = _relational_inputs(fn, student_features, teacher_features)
  _check_positive(fn, 'eps', eps)
  if where is None:
    p_s = _pkt_probabilities(student, eps)
    p_t = _pkt_probabilities(teacher, eps)
    loss = jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))
  else:
    student, teacher, n = _masked_inputs(fn, student, teacher, where)
    rows = jnp.asarray(where, bool)
    pairs = rows[:, None] & rows[None, :]
    p_s = _pkt_probabilities(student, eps, pairs)
    p_t = _pkt_probabilities(teacher, eps, pairs)
    loss = jnp.sum(p_t * jnp.log((p_t + eps) / (p_s + eps))) / (n * n)
  return _nan_unless_finite(loss, student, teacher)
