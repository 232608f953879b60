"""Checkpoints: written atomically and resumed exactly (`store`), and files from elsewhere read
without running code from them (`safeload`; DCP folders: `dcp`). The store's API is here too,
so that `from dtrain import checkpoint` reads as it always did."""

from dtrain.checkpoint.store import BEST as BEST
from dtrain.checkpoint.store import LATEST as LATEST
from dtrain.checkpoint.store import TRAINER as TRAINER
from dtrain.checkpoint.store import WRITTEN as WRITTEN
from dtrain.checkpoint.store import Pending as Pending
from dtrain.checkpoint.store import atomic_save as atomic_save
from dtrain.checkpoint.store import candidates as candidates
from dtrain.checkpoint.store import clear as clear
from dtrain.checkpoint.store import gather_rng_states as gather_rng_states
from dtrain.checkpoint.store import io_error_line as io_error_line
from dtrain.checkpoint.store import latest as latest
from dtrain.checkpoint.store import load as load
from dtrain.checkpoint.store import load_file as load_file
from dtrain.checkpoint.store import load_newest as load_newest
from dtrain.checkpoint.store import mark_best as mark_best
from dtrain.checkpoint.store import named as named
from dtrain.checkpoint.store import resolve as resolve
from dtrain.checkpoint.store import rng_state as rng_state
from dtrain.checkpoint.store import save as save
from dtrain.checkpoint.store import save_in_background as save_in_background
from dtrain.checkpoint.store import set_rng_state as set_rng_state
