"""MLflow's user for training jobs, in the basic-auth app's user database: created, or its
password set again, and never an admin.

Jobs hold this user's password, not the admin's: a job (or anyone who reads a pod's
environment) can create experiments and write to its own (MLflow gives the creator MANAGE on
an experiment it creates), read what `default_permission` allows, and nothing more: no other
experiment's runs changed, no user created, no permission granted.

Everything comes from the environment, never a command line: MLFLOW_AUTH_DATABASE_URI (the
auth app's database: `sqlite:///...` or `postgresql://...`), MLFLOW_JOB_USERNAME,
MLFLOW_JOB_PASSWORD. Run by `launchers/mlflow_server.sh --auth` and by the schema step of
`k8s/mlflow.yaml` (this file is in the `dtrain-mlflow` image).
"""

import os
import sys

from mlflow.exceptions import MlflowException
from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore


def main() -> None:
    missing = [
        k for k in ("MLFLOW_AUTH_DATABASE_URI", "MLFLOW_JOB_USERNAME", "MLFLOW_JOB_PASSWORD") if not os.environ.get(k)
    ]
    if missing:
        sys.exit(
            f"mlflow_job_user.py: {', '.join(missing)} not set (the auth database, the job user's name, its password)"
        )
    user, password = os.environ["MLFLOW_JOB_USERNAME"], os.environ["MLFLOW_JOB_PASSWORD"]
    store = SqlAlchemyStore()
    store.init_db(os.environ["MLFLOW_AUTH_DATABASE_URI"])  # creates or migrates the tables, as the server does
    if store.has_user(user) and store.get_user(user).is_admin:
        sys.exit(f"mlflow_job_user.py: {user} is an admin: jobs need a user of their own (MLFLOW_JOB_USERNAME)")
    try:
        if store.has_user(user):
            store.update_user(user, password=password)
        else:
            store.create_user(user, password, is_admin=False)
    except MlflowException as e:  # a password MLflow refuses (under 12 characters), a bad name
        sys.exit(f"mlflow_job_user.py: {user}: {e.message}")
    print(f"mlflow_job_user.py: MLflow user {user} ready for jobs (not an admin)")


if __name__ == "__main__":
    main()
