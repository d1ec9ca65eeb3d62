"""Config: the shipped file, error messages that name the key, and the CLI's exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from calmline.config import Config, load, parse
from calmline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_equals_the_embedded_defaults():
    cfg, source = load(REPO / "config" / "calmline.toml")
    assert cfg == Config()
    assert source.endswith("calmline.toml")


@pytest.mark.parametrize(("toml", "expected"), [
    ('[server]\nport = 70000', "t.toml: server.port:"),
    ('[server]\nallow = ["not-an-ip"]', "allow[0] = 'not-an-ip' is not an IP address"),
    ('[warn]\ncode = "x1"', "t.toml: warn.code: a DTMF code"),
    ('[warn]\nstages = []', "t.toml: warn.stages:"),
    ('[warn]\nstages = [{prompt = "../../etc/passwd"}]', "warn.stages[0].prompt"),
    ('[warn]\nafter_last = "explode"', "warn.after_last"),
    ('[warn]\nafter_last = "end"\n[end]\nenabled = false', 'warn.after_last = "end" needs [end] enabled = true'),
    ('[sever]\nport = 1', "t.toml: sever: unknown key"),
    ('[end]\ncode = "*1"', "warn.code = '*1' is the same as end.code = '*1'"),
    ('[end]\ncode = "*12"', "is a prefix of end.code"),
    ('[mail]\nteam_address = "a@b\\nBcc: x@y"', "mail.team_address"),
    ('[mail]\nsubject = "x\\nBcc: y"', "mail.subject: must be one line"),
    ("[server\n", "t.toml: not valid TOML"),
    ('[cooldown]\nenabled = true', "cooldown.enabled = true needs [ami] username"),
    ('[cooldown]\nafter = ["hangup"]', "t.toml: cooldown.after[0]:"),
    ('[cooldown]\nseconds = 0', "t.toml: cooldown.seconds:"),
    ('[ami]\nsecret_env = "lower"', "t.toml: ami.secret_env:"),
    ('[lookup]\nwatch_at = 5\nflag_at = 2', "lookup: watch_at (5) must not be above flag_at (2)"),
])
def test_errors_name_the_file_and_the_key(toml, expected):
    with pytest.raises(ConfigError) as info:
        parse(toml, "t.toml")
    assert expected in str(info.value)


def test_check_and_serve_exit_2_with_the_key_on_a_broken_config(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[server]\nport = "many"\n')
    for command in (["check", "--no-port"], ["serve"]):
        result = subprocess.run([sys.executable, "-m", "calmline", "-c", str(path), *command],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        assert f"{path}: server.port" in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_config_file_names_the_fix(tmp_path):
    result = subprocess.run([sys.executable, "-m", "calmline", "-c", str(tmp_path / "nope.toml"), "check"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "no such config file" in result.stderr


def test_an_unwritable_store_names_the_key(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\nport = 0\n[store]\nurl = "sqlite:///{blocker}/x.sqlite3"\n')
    result = subprocess.run([sys.executable, "-m", "calmline", "-c", str(path), "serve"],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2
    assert "store.url: cannot open" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("section", "key"), [("audit", "database"), ("mail", "outbox"), ("audit", "synchronous")])
def test_a_key_that_moved_names_where_it_went(section, key):
    with pytest.raises(ConfigError) as caught:
        parse(f'[{section}]\n{key} = "x"\n', "c.toml")
    assert f"{section}.{key}: this key moved to" in str(caught.value)
    assert "store.url" in str(caught.value) or "remove it" in str(caught.value)


def test_a_store_url_calmline_cannot_use_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"c.toml: store: .*sqlite:///"):
        parse('[store]\nurl = "mysql://db/calmline"\n', "c.toml")


@pytest.mark.parametrize(("toml", "expected"), [
    # Each of these rendered `exten => s,1,System(id)` (or worse) into the Asterisk snippets.
    ('[dialplan]\nmoh_class = "default\\nexten => s,1,System(id)"', "dialplan.moh_class: a music-on-hold class"),
    ('[dialplan]\nmoh_class = "a,b"', "dialplan.moh_class"),
    ('[dialplan]\nservice_url = "agi://127.0.0.1:4573\\nexten => s,1,System(id)"', "dialplan.service_url:"),
    ('[dialplan]\nservice_url = "agi://127.0.0.1:4573/x,System(id)"', "dialplan.service_url:"),
    ('[dialplan]\nservice_url = "agi://h:99999"', "dialplan.service_url:"),
    ('[dialplan]\nservice_url = "http://127.0.0.1:4573"', "dialplan.service_url:"),
    ('[dialplan]\nadmin_extension = "*78,1,System(id)\\nexten => 9"', "dialplan.admin_extension: an extension prefix"),
    ('[dialplan]\nadmin_extension = "_X."', "dialplan.admin_extension"),
    ('[transfer.colleague_keyed]\ndial_template = "PJSIP/{ext})"', "transfer.colleague_keyed: a dial target"),
    # A bool where a number belongs used to load as 1 (port 1) or 1.0.
    ("[server]\nport = true", "server.port: must be a whole number"),
    ("[server]\nmax_sessions = false", "server.max_sessions: must be a whole number"),
    ("[server]\nanswer_timeout = true", "server.answer_timeout: must be a number"),
    ("[mail]\nport = true", "mail.port: must be a whole number"),
    ('[server]\nmax_sessions = "50"', "server.max_sessions: must be a whole number"),
    ('[warn]\nenabled = "yes"', "warn.enabled: must be true or false"),
    ("[server]\nmax_sessions_per_peer = 0", "server.max_sessions_per_peer"),
])
def test_values_rendered_into_asterisk_config_and_numbers_are_checked_strictly(toml, expected):
    with pytest.raises(ConfigError) as info:
        parse(toml, "t.toml")
    assert f"t.toml: {expected}" in str(info.value)
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("toml", [
    '[dialplan]\nmoh_class = ""',
    '[dialplan]\nmoh_class = "calm-music_2"',
    '[dialplan]\nservice_url = "hagi://agi.example.com"',
    '[dialplan]\nservice_url = "agi://[::1]:4573/"',
    '[dialplan]\nadmin_extension = "#9*"',
    "[server]\nenvironment_timeout = 5",
])
def test_values_asterisk_accepts_still_load(toml):
    parse(toml, "t.toml")


def test_a_wildcard_bind_without_an_allowlist_is_named_as_open_to_the_network():
    assert parse('[server]\nhost = "0.0.0.0"').server.exposure_warning()
    assert parse('[server]\nhost = "::"').server.exposure_warning()
    assert parse('[server]\nhost = "0.0.0.0"\nallow = ["10.0.0.5"]').server.exposure_warning() is None
    assert parse('[server]\nhost = "10.0.0.1"').server.exposure_warning() is None
    assert Config().server.exposure_warning() is None


@pytest.mark.parametrize(("toml", "expected"), [
    ('[console]\ntimezone = "Mars/Olympus"', "console.timezone: 'Mars/Olympus' is not a time zone"),
    ('[console]\nurl = "javascript:alert(1)"', "console.url: the console's address"),
    ('[console]\nport = 70000', "console.port:"),
    ('[console]\nsecret_env = "lower"', "console.secret_env:"),
])
def test_console_errors_name_the_key(toml, expected):
    with pytest.raises(ConfigError) as caught:
        parse(toml, "t.toml")
    assert expected in "\n".join(caught.value.problems)


def test_console_timezone_and_url():
    console = parse('[console]\ntimezone = "Europe/Berlin"\nurl = "https://calm.example.com/"').console
    assert str(console.zone()) == "Europe/Berlin"
    assert console.url == "https://calm.example.com"
    assert (console.host, console.port) == ("127.0.0.1", 8088)
