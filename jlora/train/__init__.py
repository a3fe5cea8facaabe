"""Training: exact gradient accumulation, orbax checkpoints, sharding, the `jlora train` job."""
from jlora.train.config import ConfigError
from jlora.train.config import TrainConfig
from jlora.train.guard import DeadGradient
from jlora.train.guard import TrainingStopped
from jlora.train.trainer import NonFiniteLoss
from jlora.train.trainer import RunDirError
from jlora.train.trainer import Trainer
from jlora.train.step import make_train_step
from jlora.train.step import make_eval_step
from jlora.train.state import SplitModel
from jlora.train.optimizer import learning_rate_schedule
from jlora.train.optimizer import make_optimizer
from jlora.train.sharding import make_mesh
