#!/usr/bin/env bash
# Write the credentials kustomization.yaml turns into the Secrets `mlflow-db` and `mlflow-auth`:
# k8s/secrets/mlflow-db.env and k8s/secrets/mlflow-auth.env, generated passwords, mode 0600,
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
if [ ! -e "$DIR/mlflow-auth.env" ]; then
  printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' "$(gen)" >"$DIR/mlflow-auth.env"
  echo "make-secrets: wrote $DIR/mlflow-auth.env"
fi
