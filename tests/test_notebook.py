"""The example notebook runs from top to bottom (on the offline Fashion-MNIST)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from lpe import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_locality_loss_notebook_runs():
  try:
    data.load_split('fashion_mnist', 'test')
  except data.DatasetUnavailableError as error:
    pytest.skip(f'needs Fashion-MNIST: {error}')
  path = os.path.join(REPO, 'examples', 'locality_loss.ipynb')
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(
    notebook, timeout=600, kernel_name='python3', resources={'metadata': {'path': REPO}}
  ).execute()
  outputs = '\n'.join(
    out.get('text', '')
    for cell in notebook.cells
    if cell.cell_type == 'code'
    for out in cell.outputs
  )
  assert 'LP loss (batch mean):' in outputs
  assert 'teacher neighbours:' in outputs and 'student neighbours:' in outputs
  assert 'finite: True' in outputs
