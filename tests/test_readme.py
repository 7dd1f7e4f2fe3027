"""The README's promises: its notebook example runs, and its commands are the CI's."""

import os
import re

import jax
import numpy as np
from flax import nnx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
  with open(os.path.join(REPO, 'README.md')) as f:
    return f.read()


def test_readme_python_examples_run():
  """The notebook example and the custom training step, run in order as a notebook would."""
  namespace = {}
  for block in re.findall(r'```python\n(.*?)```', _readme(), re.S):
    exec(compile(block, 'README.md', 'exec'), namespace)
  assert namespace['per_example'].shape == (128,)
  assert namespace['grads'].shape == (128, 32)
  assert namespace['indices'].shape == (128, 5)
  first_loss = namespace['loss']
  step = namespace['train_step']
  params, opt_state = namespace['params'], namespace['opt_state']
  for _ in range(5):
    params, opt_state, loss = step(params, opt_state, namespace['images'], namespace['labels'])
  assert loss < first_loss  # The step trains.
  # The NNX step: the student learns, the frozen teacher does not move.
  nnx_step, student, teacher = (
    namespace[k] for k in ('nnx_train_step', 'nnx_student', 'nnx_teacher')
  )
  teacher_before = jax.tree.map(np.array, nnx.state(teacher))
  for _ in range(5):
    nnx_loss = nnx_step(
      student, namespace['optimizer'], teacher, namespace['images'], namespace['labels']
    )
  assert nnx_loss < namespace['nnx_loss']
  after = jax.tree.leaves(nnx.state(teacher))
  assert all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(teacher_before), after, strict=True)
  )


def test_readme_leads_with_the_two_commands_and_ci_runs_the_second():
  shell = re.search(r'```shell\n(.*?)```', _readme(), re.S).group(1).splitlines()
  assert shell[0].startswith('bash scripts/setup.sh && ') and 'launch.py' in shell[0]
  assert shell[1] == 'bash scripts/test.sh'
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    assert 'exec bash scripts/test.sh' in f.read()
