"""The defaults every experiment config starts from (`configs/*.py` override them)."""

import ml_collections
from ml_collections import config_dict


def default_config() -> ml_collections.ConfigDict:
  """Returns the default training config: a student trained alone on Fashion-MNIST."""
  config = ml_collections.ConfigDict()
  config.name = ''  # Shown in progress lines and tables; '' means the workdir's name.
  config.seed = 0
  config.dataset = 'fashion_mnist'
  config.data_dir = ''  # '' means $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.train_split = 'train'
  config.test_split = 'test'
  config.augment = 'none'  # 'none' or 'cifar' (4-pixel padded random crop and flip).
  config.model = 'cnn_student'

  config.num_epochs = 3
  config.batch_size = 128  # Global batch, split over all devices.
  config.eval_batch_size = 1000
  config.steps_per_epoch_limit = 0  # >0 caps the steps of an epoch (smoke tests).

  config.optimizer = 'adam'  # 'adam' or 'sgd'.
  config.learning_rate = 1e-3
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.lr_schedule = 'cosine'  # 'constant', 'cosine' or 'step'.
  config.lr_decay_epochs = (150, 180, 210)
  config.lr_decay_factor = 0.1

  # The frozen teacher: its architecture and its exported model (a run's workdir or .msgpack).
  config.teacher = ml_collections.ConfigDict()
  config.teacher.model = ''
  config.teacher.checkpoint = ''

  # Student objective: CE + lp_weight * LP + kd_weight * KD (a weight of 0 turns a term off).
  config.distill = ml_collections.ConfigDict()
  config.distill.lp_weight = 0.0
  config.distill.k = 5
  config.distill.sigma2 = config_dict.placeholder(float)  # None: mean kNN distance in the batch.
  config.distill.feature = 'embedding'  # A key of both models' feature dicts.
  config.distill.kd_weight = 0.0
  config.distill.kd_temperature = 4.0

  # Devices and hosts (see lpe/parallel.py).
  config.parallelism = 'jit'  # 'jit' (sharded jit over a mesh) or 'pmap'.
  config.sync_batch_stats = True  # pmap: BatchNorm statistics over all devices (cross-replica).
  config.half_precision = False  # bfloat16 forward passes; float32 params, optimizer and losses.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.auto = False  # TPU pods / SLURM: let JAX detect the cluster.
  config.distributed.coordinator_address = ''  # 'host:port' of process 0 ('' = single host).
  config.distributed.num_processes = 0
  config.distributed.process_id = -1

  config.log_every_steps = 100
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 3
  return config
