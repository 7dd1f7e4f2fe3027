"""The Fashion-MNIST study's teacher: `cnn_teacher_bn` (1.9M parameters) with crop-and-flip
augmentation, 20 epochs of SGD with a cosine schedule.

  .venv/bin/python launch.py --config=configs/fashion_mnist_teacher_bn.py \
    --workdir=runs/fashion_mnist_teacher_bn

Its exported model is committed as assets/fashion_mnist_teacher_bn.msgpack (+ .json with its
SHA-256, a7e00a5689e40424e3545447ed7ce404bba412a68e8a1d0af34397ab9cc99828): 94.01% test accuracy
after 20 epochs (epoch 10: 92.00%, 15: 93.47%). That run took 133 minutes of training on 2 CPU
cores shared with three to four other jobs the whole time (load 6 to 12), with the code before
the CPU speed-ups of docs/performance.md section 6.
"""

from lpe.config import default_config


def get_config():
  config = default_config()
  config.name = 'teacher_bn'
  config.model = 'cnn_teacher_bn'
  config.augment = 'cifar'  # A 4-pixel padded random crop and a horizontal flip.
  config.num_epochs = 20
  config.batch_size = 128
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.learning_rate = 0.05
  config.weight_decay = 5e-4
  config.lr_schedule = 'cosine'
  config.checkpoint_every_steps = 200
  return config
