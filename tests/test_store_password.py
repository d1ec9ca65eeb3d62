"""`[store] password_env` against a PostgreSQL that checks passwords (SCRAM), through the CLI:
the right password from the variable opens the store, a wrong or missing one is refused with
one line that names the key, and the password never shows in what calmline prints."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from postgres import admin_execute, drop_database, with_database
from serve_process import environment


@pytest.fixture
def scram_role(postgres_cluster, postgres_url):
    """A role with a password, that the server lets in only with it (a pg_hba.conf line for it
    alone, ahead of the session cluster's `trust`), and a database it owns."""
    if postgres_cluster is None:
        pytest.skip("needs the session's own cluster, whose pg_hba.conf the test may edit")
    role, password = f"calmline_pw_{secrets.token_hex(4)}", f"pw-{secrets.token_hex(8)}"
    admin_execute(postgres_url, "SET password_encryption = 'scram-sha-256'; "
                                f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
    admin_execute(postgres_url, f'CREATE DATABASE "{role}" OWNER {role}')
    hba = Path(postgres_cluster.datadir) / "pg_hba.conf"
    original = hba.read_text()
    hba.write_text(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + original)
    admin_execute(postgres_url, "SELECT pg_reload_conf()")
    url = with_database(postgres_url, role).replace("postgres@", f"{role}@", 1)
    try:
        yield url, password
    finally:
        hba.write_text(original)
        admin_execute(postgres_url, "SELECT pg_reload_conf()")
        drop_database(with_database(postgres_url, role))
        admin_execute(postgres_url, f"DROP ROLE IF EXISTS {role}")


def calmline(tmp_path: Path, url: str, password: str | None, *args: str) -> subprocess.CompletedProcess:
    config = tmp_path / "calmline.toml"
    config.write_text(f'[store]\nurl = "{url}"\npassword_env = "CALMLINE_STORE_PASSWORD"\n')
    env = environment()
    env.pop("CALMLINE_STORE_PASSWORD", None)
    if password is not None:
        env["CALMLINE_STORE_PASSWORD"] = password
    return subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_password_env_opens_a_store_that_checks_passwords(tmp_path, scram_role):
    url, password = scram_role
    right = calmline(tmp_path, url, password, "check", "--no-port")
    assert "store.url" not in right.stdout + right.stderr and "store.password_env" not in right.stdout
    assert "opens (schema version 0 of" in right.stdout, right.stdout  # nothing created by a check

    wrong = calmline(tmp_path, url, "wrong-" + password, "check", "--no-port")
    assert wrong.returncode == 1
    [line] = [x for x in wrong.stdout.splitlines() if "store.url" in x]
    assert "password authentication failed" in line and "store.password_env" in line

    unset = calmline(tmp_path, url, None, "check", "--no-port")
    assert unset.returncode == 1
    assert "store.password_env: CALMLINE_STORE_PASSWORD is not set in this environment" in unset.stdout

    # A reader of the store (`calmline audit`) with the right password, then a wrong one.
    served = calmline(tmp_path, url, password, "audit")
    assert served.returncode == 0, served.stderr
    refused = calmline(tmp_path, url, "wrong-" + password, "audit")
    assert refused.returncode == 1
    assert "password authentication failed" in refused.stderr and "store.password_env" in refused.stderr
    for done in (right, wrong, unset, served, refused):
        assert password not in done.stdout + done.stderr  # never printed, right or wrong
