import os

# Ranks share 2 cores in CI: one intra-op thread per process avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test may write to a tracking store outside its tmp dir.
os.environ.pop("MLFLOW_TRACKING_URI", None)
