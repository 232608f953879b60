"""Secrets reach no log, file, param or command line (`dtrain.config.redact`), and what a run
writes is its user's alone (`dtrain.runtime.files.keep_private`).

Each password form that once leaked is tried: one holding `/` or `@`, a secret query parameter,
and a password seen again later in another library's message."""

import os
import re
from pathlib import Path

import pytest
from helpers import CNN, TINY_CNN, run_dtrain

from dtrain.config import redact
from dtrain.runtime import files

FORMS = {
    "http://alice:S3cretPw1@mlflow.example:5000/": "S3cretPw1",
    "postgresql://bob:pa/ss-w0rd@db/mlflow": "pa/ss-w0rd",
    "http://bob:p@ss3@h:5000": "p@ss3",
    "https://mlflow.example/api?user=x&password=qp-secret-7&page=2": "qp-secret-7",
    "s3://bucket/x?token=tk-0123456789": "tk-0123456789",
}
OLD_FORM = re.compile(r"://([^:/@\s]+):[^:/@\s]+@")
"""What was masked before: `://user:password@` where the password holds neither `/` nor `@`."""


@pytest.mark.parametrize("uri", FORMS)
def test_every_password_form_is_masked(uri):
    secret = FORMS[uri]
    shown = redact.text(f"cannot reach tracking.uri={uri!r}: refused")
    assert secret not in shown and redact.MASK in shown and redact.has_password(uri), shown
    assert "mlflow.example" in shown or "db/mlflow" in shown or "h:5000" in shown or "bucket" in shown
    assert redact.text(f"psycopg: password authentication failed ({secret})") == (
        f"psycopg: password authentication failed ({redact.MASK})"
    )  # seen once, masked wherever it turns up again


def test_the_old_mask_let_four_forms_through():
    """The guard above is what holds: the one form masked before leaves these in clear, whole
    or in part (`bob:***@ss3@h`)."""
    pieces = {u: [p for p in re.split(r"[@/]", secret) if len(p) > 2] for u, secret in FORMS.items()}
    leaked = [u for u in FORMS if any(p in OLD_FORM.sub(r"://\1:***@", u) for p in pieces[u])]
    assert len(leaked) == 4 and not any(p in redact.text(u) for u in FORMS for p in pieces[u]), leaked


def test_a_uri_splits_into_mlflows_variables_and_overrides_travel_in_the_environment():
    assert redact.split("http://bob:p@ss3@h:5000/x") == ("http://h:5000/x", "bob", "p@ss3")
    public, env = redact.portable(["optim.lr=0.1", "tracking.uri=http://bob:p@ss3@h:5000"])
    assert public == ["optim.lr=0.1"] and "p@ss3" in env[redact.PRIVATE_OVERRIDES]


def test_a_run_leaks_no_password_and_keeps_its_files_private(tmp_path):
    """A tracking server that is down: the warning names the URI masked; config.yaml, every
    checkpoint's trainer.pt, summary.json and the log hold no password. Folders 0700, files
    0600 with the usual umask 022 (`private: false` leaves them to the umask)."""
    uri = "http://bob:p@ss/w0rd3@127.0.0.1:9/?password=qp-secret-77"
    out = tmp_path / "out"
    proc = run_dtrain(["train", CNN, *TINY_CNN, "train.max_steps=2", "checkpoint.every_steps=1",
                       "tracking.enabled=true", f"tracking.uri={uri}", f"output_dir={out}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training without it" in proc.stderr
    for secret in ("p@ss/w0rd3", "qp-secret-77", "w0rd3"):
        assert secret not in proc.stdout + proc.stderr
        assert not [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert "bob:***@127.0.0.1:9" in (out / "config.yaml").read_text()
    assert list(out.rglob("trainer.pt"))
    modes = {(p.is_dir(), oct(p.stat().st_mode & 0o777)) for p in [out, *out.rglob("*")]}
    assert modes == {(True, "0o700"), (False, "0o600")}, modes


def test_keep_private_tightens_the_users_umask_and_private_false_restores_it(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_users_umask", None)
    before = os.umask(0o022)
    try:
        files.keep_private(True)
        files.atomic_write(tmp_path / "a", lambda p: Path(p).write_text("x"))
        os.mkdir(tmp_path / "d1")
        files.keep_private(False)
        files.atomic_write(tmp_path / "b", lambda p: Path(p).write_text("x"))
        os.mkdir(tmp_path / "d2")
    finally:
        os.umask(before)
    mode = {n: oct((tmp_path / n).stat().st_mode & 0o777) for n in ("a", "d1", "b", "d2")}
    assert mode == {"a": "0o600", "d1": "0o700", "b": "0o644", "d2": "0o755"}
