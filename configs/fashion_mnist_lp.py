"""The Fashion-MNIST LP student: the baseline student plus lambda * the locality-preserving loss.

  .venv/bin/python launch.py --config=configs/fashion_mnist_lp.py --workdir=runs/lp

The teacher is the committed assets/fashion_mnist_teacher.msgpack (made by
configs/fashion_mnist_teacher.py); point config.teacher.checkpoint at your own teacher's workdir to
use another. lambda = 0.1, k = 5, default sigma2, 3 epochs: about a minute on 2 CPU cores.
"""

from lpe.config import default_config


def get_config():
  config = default_config()
  config.name = 'lp'
  config.model = 'cnn_student'
  config.teacher.model = 'cnn_teacher'
  config.teacher.checkpoint = 'assets/fashion_mnist_teacher.msgpack'
  config.distill.lp_weight = 0.1
  config.distill.k = 5
  # No augmentation, so the teacher's outputs are computed once, not in every step (about half
  # the step time on CPU; docs/performance.md).
  config.teacher.cache_outputs = True
  return config
