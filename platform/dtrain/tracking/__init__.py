"""MLflow tracking: one run per job, written by rank 0 only, asynchronously, never fatal. (`dtrain.tracking.mlflow_tracker`, re-exported)."""

from dtrain.tracking.mlflow_tracker import log as log
from dtrain.tracking.mlflow_tracker import DEFAULT_URI as DEFAULT_URI
from dtrain.tracking.mlflow_tracker import MAX_PARAMS_PER_BATCH as MAX_PARAMS_PER_BATCH
from dtrain.tracking.mlflow_tracker import MAX_METRICS_PER_BATCH as MAX_METRICS_PER_BATCH
from dtrain.tracking.mlflow_tracker import RETRY_AFTER_S as RETRY_AFTER_S
from dtrain.tracking.mlflow_tracker import FLUSH_EVERY_S as FLUSH_EVERY_S
from dtrain.tracking.mlflow_tracker import resolve_uri as resolve_uri
from dtrain.tracking.mlflow_tracker import _bound_http_retries as _bound_http_retries
from dtrain.tracking.mlflow_tracker import open_client as open_client
from dtrain.tracking.mlflow_tracker import git_commit as git_commit
from dtrain.tracking.mlflow_tracker import _lower_thread_priority as _lower_thread_priority
from dtrain.tracking.mlflow_tracker import experiment_id as experiment_id
from dtrain.tracking.mlflow_tracker import NullTracker as NullTracker
from dtrain.tracking.mlflow_tracker import MlflowTracker as MlflowTracker
from dtrain.tracking.mlflow_tracker import _sigterm_deferred as _sigterm_deferred
from dtrain.tracking.mlflow_tracker import PROBE_TIMEOUT_S as PROBE_TIMEOUT_S
from dtrain.tracking.mlflow_tracker import probe as probe
from dtrain.tracking.mlflow_tracker import start as start
