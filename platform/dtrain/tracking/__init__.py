"""MLflow tracking: one run per job, written by rank 0, never fatal (`mlflow_tracker`, whose API
is here); `dtrain compare` reads runs back (`compare`)."""

from dtrain.tracking.mlflow_tracker import MlflowTracker as MlflowTracker
from dtrain.tracking.mlflow_tracker import NullTracker as NullTracker
from dtrain.tracking.mlflow_tracker import experiment_id as experiment_id
from dtrain.tracking.mlflow_tracker import git_commit as git_commit
from dtrain.tracking.mlflow_tracker import open_client as open_client
from dtrain.tracking.mlflow_tracker import probe as probe
from dtrain.tracking.mlflow_tracker import resolve_uri as resolve_uri
from dtrain.tracking.mlflow_tracker import start as start
