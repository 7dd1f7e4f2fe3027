"""The Fashion-MNIST student alone (no distillation): the baseline for the LP student.

  .venv/bin/python launch.py --config=configs/fashion_mnist_student.py --workdir=runs/student

An 8/16-channel CNN with a 32-wide embedding (26.7K parameters), 3 epochs: about a minute on
2 CPU cores.
"""

from lpe.config import default_config


def get_config():
  config = default_config()
  config.name = 'student'
  config.model = 'cnn_student'
  return config
