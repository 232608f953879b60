"""Data: the sharded, resumable loaders (`loaders`, whose API is here, as user tasks import it),
per-sample random streams (`seeding`), built-in image datasets (`images`), token files
(`tokens`), tar shards (`shards`), Hugging Face tables (`tables`)."""

from dtrain.data.loaders import Augment as Augment
from dtrain.data.loaders import Augmented as Augmented
from dtrain.data.loaders import BatchPlan as BatchPlan
from dtrain.data.loaders import ExactShardSampler as ExactShardSampler
from dtrain.data.loaders import ResumableDistributedSampler as ResumableDistributedSampler
from dtrain.data.loaders import batch_len as batch_len
from dtrain.data.loaders import close as close
from dtrain.data.loaders import eval_loader as eval_loader
from dtrain.data.loaders import head as head
from dtrain.data.loaders import move as move
from dtrain.data.loaders import plan_batches as plan_batches
from dtrain.data.loaders import sample_generator as sample_generator
from dtrain.data.loaders import seeded as seeded
from dtrain.data.loaders import set_position as set_position
from dtrain.data.loaders import start as start
from dtrain.data.loaders import steps_per_epoch as steps_per_epoch
from dtrain.data.loaders import train_loader as train_loader
