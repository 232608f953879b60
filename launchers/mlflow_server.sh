#!/usr/bin/env bash
# A local MLflow tracking server in one command; prints the URI to export.
#
#   bash launchers/mlflow_server.sh                     # SQLite store in ./mlflow-server/
#   bash launchers/mlflow_server.sh --postgres          # a local PostgreSQL cluster, 2 workers
#   bash launchers/mlflow_server.sh --dir DIR --port 5000 --host 0.0.0.0 --workers 4
#   bash launchers/mlflow_server.sh --auth              # MLflow's basic-auth app (on by itself beyond loopback)
#
# SQLite is one file and one writer at a time: right for one user's jobs. Several jobs
# logging at once (a sweep, a team) want a database server: --postgres runs initdb/pg_ctl
# from `pg_config --bindir` into DIR/postgres (as the `postgres` user when run as root,
# since initdb refuses root) and stops it again when the server stops (Ctrl-C / SIGTERM).
# The data stays in DIR: running the command again reopens the same runs.
# Needs psycopg for --postgres: pip install -e ".[postgres]".
#
# DIR and everything in it is private to the user who runs this (0700 / 0600): HTTP's
# credentials guard nothing against a local user who can read mlflow.db. Without --auth the
# server itself is open to every user of the host (said when it starts).
# Credentials (generated on first start, kept in DIR/secrets/, mode 0700, never on a command
# line or in a log): PostgreSQL asks every connection for a password (scram-sha-256); MLflow
# uses a `mlflow` role that owns its database and nothing else. With --auth (always when
# --host is not a loopback address) MLflow's basic-auth app asks every request for a user:
# jobs are `dtrain`, a user that writes to the experiments it creates and administers nothing
# (docker/mlflow_job_user.py), read from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
cd - >/dev/null

DIR=mlflow-server PORT=5000 HOST=127.0.0.1 WORKERS="" BACKEND=sqlite AUTH=""
while [ $# -gt 0 ]; do
  case "$1" in
    --postgres) BACKEND=postgres ;;
    --dir) DIR=$2; shift ;;
    --port) PORT=$2; shift ;;
    --host) HOST=$2; shift ;;
    --workers) WORKERS=$2; shift ;;
    --auth) AUTH=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "mlflow_server.sh: unknown option $1 (valid: --postgres, --auth, --dir DIR, --port N, --host H, --workers N)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}
if ! "$PY" -c "import mlflow" 2>/dev/null; then
  echo "mlflow_server.sh: $PY cannot import mlflow (run bash launchers/setup.sh, or set PYTHON=...)" >&2; exit 2
fi
case "$HOST" in 127.*|localhost|::1) ;; *) AUTH=1 ;; esac  # reachable by others: never without credentials
# The store is its user's: every param, metric and artifact of every run is in its files
# (mlflow.db, artifacts/, server.log), which HTTP's credentials do not guard.
umask 077
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
chmod -R go-rwx "$DIR"
SECRETS=$DIR/secrets
(umask 077 && mkdir -p "$SECRETS") && chmod 700 "$SECRETS"
# secret NAME: the content of DIR/secrets/NAME, generated (0600) the first time.
secret() {
  [ -s "$SECRETS/$1" ] || (umask 077 && "$PY" -c "import secrets; print(secrets.token_urlsafe(24))" >"$SECRETS/$1")
  cat "$SECRETS/$1"
}

PG_STOP=""
cleanup() {
  [ -n "${SERVER_PID:-}" ] && kill -TERM -- "-$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  [ -n "$PG_STOP" ] && $PG_STOP >/dev/null 2>&1 || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$BACKEND" = postgres ]; then
  "$PY" -c "import psycopg" 2>/dev/null || { echo "mlflow_server.sh: --postgres needs psycopg: pip install -e \".[postgres]\"" >&2; exit 2; }
  BIN=$(pg_config --bindir 2>/dev/null || true)
  [ -x "$BIN/initdb" ] || { echo "mlflow_server.sh: --postgres needs the PostgreSQL server binaries (initdb, pg_ctl in pg_config --bindir)" >&2; exit 2; }
  PGDATA_DIR=$DIR/postgres
  AS=()
  if [ "$(id -u)" = 0 ]; then  # initdb refuses root: the cluster belongs to `postgres`
    AS=(runuser -u postgres --)
    chmod 711 "$DIR"  # postgres passes through to its own 0700 folder; no one else lists or reads DIR
    mkdir -p "$PGDATA_DIR" && chown postgres "$PGDATA_DIR" && chmod 700 "$PGDATA_DIR"
    "${AS[@]}" test -w "$PGDATA_DIR" || { echo "mlflow_server.sh: user postgres cannot write $PGDATA_DIR (a parent directory is private); pick --dir elsewhere" >&2; exit 2; }
  fi
  PG_PORT=$("$PY" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  if [ ! -f "$PGDATA_DIR/PG_VERSION" ]; then
    PWFILE=$(mktemp)  # initdb reads the superuser's password from a file: never a command-line argument
    secret postgres.password >"$PWFILE"
    [ ${#AS[@]} -gt 0 ] && chown postgres "$PWFILE"
    "${AS[@]}" "$BIN/initdb" -D "$PGDATA_DIR" -A scram-sha-256 --pwfile="$PWFILE" -U postgres >"$DIR/initdb.log" 2>&1 \
      || { rm -f "$PWFILE"; echo "mlflow_server.sh: initdb failed, see $DIR/initdb.log" >&2; exit 1; }
    rm -f "$PWFILE"
  elif grep -Eq '^[^#]*[[:space:]]trust([[:space:]]|$)' "$PGDATA_DIR/pg_hba.conf" 2>/dev/null; then
    echo "mlflow_server.sh: $PGDATA_DIR lets any local user connect without a password (trust authentication, set up by an older dtrain); dump it (pg_dump), move it aside and run this again" >&2
    exit 2
  fi
  # Loopback only; the socket lives in the cluster's own 0700 folder.
  "${AS[@]}" "$BIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGDATA_DIR/server.log" -w \
    -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $PGDATA_DIR" start >/dev/null \
    || { echo "mlflow_server.sh: PostgreSQL did not start, see $PGDATA_DIR/server.log" >&2; exit 1; }
  PG_STOP="${AS[*]} $BIN/pg_ctl -D $PGDATA_DIR -m fast stop"
  # Passwords reach libpq through a 0600 passfile, never the process list.
  (umask 077 && printf '127.0.0.1:*:*:postgres:%s\n127.0.0.1:*:*:mlflow:%s\n' \
    "$(secret postgres.password)" "$(secret mlflow-db.password)" >"$SECRETS/pgpass")
  export PGPASSFILE=$SECRETS/pgpass
  PSQL=(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qtA)
  # MLflow's role owns its database and nothing else: no superuser, no CREATEDB, no CREATEROLE.
  "${PSQL[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='mlflow'" | grep -q 1 \
    || MLFLOW_DB_PASSWORD=$(secret mlflow-db.password) "${PSQL[@]}" <<'SQL'
\getenv pw MLFLOW_DB_PASSWORD
CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'pw';
SQL
  "${PSQL[@]}" -c "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 \
    || { "${PSQL[@]}" -c "CREATE DATABASE mlflow OWNER mlflow" && "${PSQL[@]}" -c "REVOKE ALL ON DATABASE mlflow FROM PUBLIC"; }
  STORE="postgresql+psycopg://mlflow@127.0.0.1:$PG_PORT/mlflow"
  # A fresh database gets MLflow's schema once, here, before several workers race to create it.
  "$PY" -c "import sys; from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore; SqlAlchemyStore(sys.argv[1], sys.argv[2])" \
    "$STORE" "$DIR/artifacts" 2> >(grep -v "INFO" >&2)
  WORKERS=${WORKERS:-2}
else
  STORE="sqlite:///$DIR/mlflow.db"
  WORKERS=${WORKERS:-1}  # one writer at a time anyway
fi

URL_HOST=$HOST; [ "$HOST" = 0.0.0.0 ] && URL_HOST=$(hostname)
APP=()
if [ -n "$AUTH" ]; then
  "$PY" -c "import flask_wtf" 2>/dev/null || { echo "mlflow_server.sh: --auth needs MLflow's auth extra: pip install 'mlflow[auth]'" >&2; exit 2; }
  # MLflow's basic-auth app: users in their own SQLite file; the admin is created on the first
  # start with the generated password (MLflow reads it from the environment, not a file it keeps).
  (umask 077 && printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///%s\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
    "$SECRETS/basic_auth.db" >"$SECRETS/basic_auth.ini")
  export MLFLOW_AUTH_CONFIG_PATH=$SECRETS/basic_auth.ini
  MLFLOW_AUTH_ADMIN_PASSWORD=$(secret mlflow-admin.password)
  MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret flask-secret.key)  # CSRF tokens: the same for every worker
  export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
  # Jobs get a user of their own, not the admin: they write to the experiments they create.
  MLFLOW_AUTH_DATABASE_URI="sqlite:///$SECRETS/basic_auth.db" MLFLOW_JOB_USERNAME=dtrain \
    MLFLOW_JOB_PASSWORD=$(secret mlflow-job.password) "$PY" "$ROOT/docker/mlflow_job_user.py" >/dev/null 2> >(grep -v "INFO" >&2)
  APP=(--app-name basic-auth)
fi
# No MLflow job runners (dtrain does not use them): less load next to training on a small machine.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} setsid "$PY" -m mlflow server \
  --host "$HOST" --port "$PORT" --workers "$WORKERS" "${APP[@]}" \
  --backend-store-uri "$STORE" --artifacts-destination "$DIR/artifacts" >"$DIR/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 120); do
  if "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://127.0.0.1:$PORT/health" 2>/dev/null; then
    echo "mlflow_server.sh: MLflow $("$PY" -c 'import mlflow; print(mlflow.__version__)') on $BACKEND ($WORKERS workers), data in $DIR"
    echo "export MLFLOW_TRACKING_URI=http://$URL_HOST:$PORT"
    [ -n "$AUTH" ] && echo "export MLFLOW_TRACKING_USERNAME=dtrain MLFLOW_TRACKING_PASSWORD=\$(cat $SECRETS/mlflow-job.password)  # jobs; people: admin, $SECRETS/mlflow-admin.password"
    [ -z "$AUTH" ] && echo "mlflow_server.sh: no --auth: every user of this host can read and write these runs over http://127.0.0.1:$PORT (the files in $DIR are yours alone)"
    echo "runs table: http://$URL_HOST:$PORT/#/experiments  (pick an experiment, then its Runs tab)"
    wait "$SERVER_PID"
    exit $?
  fi
  kill -0 "$SERVER_PID" 2>/dev/null || break
  sleep 0.5
done
echo "mlflow_server.sh: mlflow server did not start; its log: $DIR/server.log" >&2
tail -5 "$DIR/server.log" >&2
exit 1
