"""The Fashion-MNIST teacher: a 64/128-channel CNN (1.68M parameters) trained from scratch.

  .venv/bin/python launch.py --config=configs/fashion_mnist_teacher.py --workdir=runs/teacher

Took 23 minutes on 2 CPU cores shared with other jobs (4 epochs, 91.88% test accuracy). Its
exported model (runs/teacher/model.msgpack and model.json) is what the committed
assets/fashion_mnist_teacher.* were copied from.
"""

from lpe.config import default_config


def get_config():
  config = default_config()
  config.name = 'teacher'
  config.model = 'cnn_teacher'
  config.num_epochs = 4
  return config
