#!/usr/bin/env bash
# Write the credentials kustomization.yaml turns into the Secrets `mlflow-db`, `mlflow-admin`
# (MLflow's admin: people's, read by the server alone) and `mlflow-auth` (the training jobs'
# own MLflow user, not an admin): k8s/secrets/*.env, generated passwords, mode 0600,
# git-ignored. An existing file is kept (re-running never rotates a live password by surprise:
# to rotate, change the value here and in the database, then kubectl apply -k again).
#
#   bash k8s/make-secrets.sh [DIR]     # default DIR: k8s/secrets
set -euo pipefail
DIR=${1:-$(dirname "$0")/secrets}
umask 077
mkdir -p "$DIR"
gen() { python3 -c "import secrets; print(secrets.token_urlsafe(24))"; }
if [ ! -e "$DIR/mlflow-db.env" ]; then
  pw=$(gen)
  cat >"$DIR/mlflow-db.env" <<ENV
postgres-password=$(gen)
password=$pw
uri=postgresql://mlflow:$pw@mlflow-postgres:5432/mlflow
auth-uri=postgresql://mlflow:$pw@mlflow-postgres:5432/mlflow_auth
flask-secret=$(gen)
ENV
  echo "make-secrets: wrote $DIR/mlflow-db.env"
fi
if [ ! -e "$DIR/mlflow-admin.env" ]; then
  if grep -qx 'MLFLOW_TRACKING_USERNAME=admin' "$DIR/mlflow-auth.env" 2>/dev/null; then
    # An older layout gave the pods the admin: it stays the admin (its password is live), and
    # the pods get a user of their own below.
    sed 's/^MLFLOW_TRACKING_/MLFLOW_ADMIN_/' "$DIR/mlflow-auth.env" >"$DIR/mlflow-admin.env"
    rm "$DIR/mlflow-auth.env"
  else
    printf 'MLFLOW_ADMIN_USERNAME=admin\nMLFLOW_ADMIN_PASSWORD=%s\n' "$(gen)" >"$DIR/mlflow-admin.env"
  fi
  echo "make-secrets: wrote $DIR/mlflow-admin.env"
fi
if [ ! -e "$DIR/mlflow-auth.env" ]; then
  printf 'MLFLOW_TRACKING_USERNAME=dtrain-jobs\nMLFLOW_TRACKING_PASSWORD=%s\n' "$(gen)" >"$DIR/mlflow-auth.env"
  echo "make-secrets: wrote $DIR/mlflow-auth.env"
fi
