"""CIFAR-100 offline: the standard `cifar-100-python.tar.gz` into one `.npz` that lpe reads as
`--config.dataset=npz:PATH` (docs/reproducing.md).

  .venv/bin/python scripts/cifar100_npz.py cifar-100-python.tar.gz ~/data/cifar100.npz

The archive (https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, the file torchvision's
`CIFAR100` and RepDistiller download) holds `cifar-100-python/train` and `.../test`, Python pickles
of `{b'data': uint8 [N, 3072] (rows of 1024 red, 1024 green, 1024 blue, each row-major 32x32),
b'fine_labels': [N], ...}`. The output holds `train_images` and `test_images` uint8
`[N, 32, 32, 3]` and `train_labels`, `test_labels` int64 `[N]` (the 100 fine labels), in the
archive's order.
"""

import io
import os
import pickle
import sys
import tarfile

import numpy as np

SPLITS = ('train', 'test')


def _split(archive: tarfile.TarFile, split: str) -> tuple[np.ndarray, np.ndarray]:
  name = f'cifar-100-python/{split}'
  try:
    member = archive.extractfile(name)
  except KeyError:
    member = None
  if member is None:
    raise ValueError(
      f'The archive has no {name!r}; pass the CIFAR-100 python archive, cifar-100-python.tar.gz.'
    )
  batch = pickle.load(io.BytesIO(member.read()), encoding='bytes')
  data = np.asarray(batch[b'data'], np.uint8)
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), np.asarray(batch[b'fine_labels'], np.int64)


def convert(archive_path: str, output: str) -> dict[str, int]:
  """Writes `output` (.npz) from the archive at `archive_path`; returns the examples per split."""
  if not os.path.isfile(archive_path):
    raise FileNotFoundError(
      f'No file {archive_path!r}; download cifar-100-python.tar.gz and pass its path.'
    )
  arrays = {}
  with tarfile.open(archive_path, 'r:gz') as archive:
    for split in SPLITS:
      arrays[f'{split}_images'], arrays[f'{split}_labels'] = _split(archive, split)
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  np.savez(output, **arrays)
  return {split: len(arrays[f'{split}_labels']) for split in SPLITS}


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    sys.exit(f'usage: {argv[0]} cifar-100-python.tar.gz OUTPUT.npz')
  counts = convert(argv[1], os.path.expanduser(argv[2]))
  print(f'{argv[2]}: {counts["train"]} training and {counts["test"]} test images')


if __name__ == '__main__':
  main(sys.argv)
