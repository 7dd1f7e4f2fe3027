"""The main job: teacher, student alone and LP student on Fashion-MNIST, then a table.

  .venv/bin/python launch.py --config=configs/fashion_mnist_compare.py --workdir=runs/compare

With the committed teacher (assets/fashion_mnist_teacher.msgpack) it trains the two students,
3 epochs each: about 2 minutes on 2 CPU cores. `--config.teacher_checkpoint=` (empty) trains the
teacher from scratch first (up to 20 minutes more). Any field of a run can be overridden, e.g.
`--config.runs.lp.distill.lp_weight=0.01`. Killed and run again, it resumes where it stopped.
"""

import ml_collections

from configs import fashion_mnist_lp, fashion_mnist_student, fashion_mnist_teacher


def get_config():
  config = ml_collections.ConfigDict()
  # The teacher every distilling run uses; empty trains runs.teacher from scratch first.
  config.teacher_checkpoint = 'assets/fashion_mnist_teacher.msgpack'
  config.runs = ml_collections.ConfigDict()
  config.runs.teacher = fashion_mnist_teacher.get_config()
  config.runs.student = fashion_mnist_student.get_config()
  config.runs.lp = fashion_mnist_lp.get_config()
  return config
