"""`calmline check`, run as the admin runs it: the real CLI in a subprocess.

Fast tests use a throwaway config, sounds directory and features.conf; the one marked
`asterisk` asks the lab's real Asterisk over AMI whether calmline's features are loaded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from calmline.admin import check
from calmline.admin.dialplan import FEATURES_FILE
from calmline.config import Config

PROMPTS = len(Config().prompt_names())  # every prompt the default config plays

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "dialplan" / "prompts"


def calmline(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calmline", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60, env={**os.environ, **(env or {})})


def problems(result: subprocess.CompletedProcess) -> list[str]:
    return [line.removeprefix("problem: ") for line in result.stdout.splitlines() if line.startswith("problem: ")]


@pytest.fixture
def listening():
    """A port something answers on, standing in for the running service."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, port: int, extra: str = "", sounds: Path = SHIPPED) -> Path:
    path = tmp_path / "calmline.toml"
    path.write_text(f'[server]\nport = {port}\n\n[prompts]\nsounds_dir = "{sounds}"\n\n{extra}')
    return path


def admin_features_conf(tmp_path: Path, body: str) -> Path:
    """An admin's features.conf that includes calmline's rendered file, like the docs say."""
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    result = calmline("-c", str(tmp_path / "calmline.toml"), "dialplan", "--output-dir", str(etc), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = etc / "features.conf"
    path.write_text(body + "\n#include calmline-features.conf\n")
    return path


def test_a_sound_setup_passes(tmp_path, listening):
    config = write_config(tmp_path, listening)
    admin_features_conf(tmp_path, "[general]\nfeaturedigittimeout = 1000\n\n[featuremap]\nblindxfer => #1\natxfer => #2\n")
    result = calmline("-c", str(config), "check", "--features-conf", "etc/features.conf", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert problems(result) == []
    assert f"ok: the service answers on 127.0.0.1:{listening}" in result.stdout
    assert f"ok: all {PROMPTS} prompts are installed" in result.stdout
    assert "ok: etc/features.conf includes calmline's etc/calmline-features.conf" in result.stdout
    assert "ok: no code in etc/features.conf clashes with calmline's (2 entries read)" in result.stdout
    assert result.stdout.rstrip().endswith(f"calmline check: {config} is fine")


def test_a_missing_prompt_is_named_with_its_language_and_the_fix(tmp_path, listening):
    sounds = tmp_path / "sounds"
    installed = calmline("prompts", "install", "--dest", str(sounds), cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    (sounds / "en" / "calmline" / "warn-final.wav").unlink()
    config = write_config(tmp_path, listening, sounds=sounds)
    result = calmline("-c", str(config), "check", cwd=tmp_path)
    assert result.returncode == 1
    assert problems(result) == [
        f"prompts.sounds_dir: prompt 'calmline/warn-final' is missing for language 'en' (no "
        f"{sounds}/en/calmline/warn-final.* nor {sounds}/calmline/warn-final.*); run "
        f"`calmline prompts install`, or record your own there"
    ]
    assert "calmline check: 1 problem(s)" in result.stderr


def test_a_prompt_in_another_format_or_the_fallback_folder_counts(tmp_path, listening):
    sounds = tmp_path / "sounds"
    assert calmline("prompts", "install", "--dest", str(sounds), cwd=tmp_path).returncode == 0
    own = sounds / "en" / "calmline"
    (own / "warn-1.wav").rename(own / "warn-1.gsm")  # an admin's own recording, another codec
    (sounds / "calmline").mkdir()
    (own / "end.wav").rename(sounds / "calmline" / "end.wav")  # Asterisk's language fallback
    result = calmline("-c", str(write_config(tmp_path, listening, sounds=sounds)), "check", cwd=tmp_path)
    assert (result.returncode, problems(result)) == (0, [])


def test_every_language_needs_every_prompt(tmp_path, listening):
    config = write_config(tmp_path, listening, extra="", sounds=SHIPPED)
    config.write_text(config.read_text().replace("[prompts]\n", '[prompts]\nlanguages = ["en", "fr"]\n'))
    result = calmline("-c", str(config), "check", cwd=tmp_path)
    assert result.returncode == 1
    missing = problems(result)
    assert len(missing) == PROMPTS and all("for language 'fr'" in line for line in missing)
    assert "prompt 'calmline/warn-1' is missing for language 'fr'" in missing[0]


def test_no_sounds_directory_is_one_line(tmp_path, listening):
    config = write_config(tmp_path, listening, sounds=tmp_path / "nowhere")
    result = calmline("-c", str(config), "check", cwd=tmp_path)
    assert result.returncode == 1
    assert problems(result) == [
        f"prompts.sounds_dir: {tmp_path / 'nowhere'} is not a directory, so none of the {PROMPTS} prompts can "
        f"play; set it to Asterisk's sounds directory (`core show settings`, astdatadir + /sounds), "
        f"then run `calmline prompts install`"
    ]


@pytest.mark.parametrize("how", ["config key", "option"])
def test_a_clashing_features_conf_names_the_entry_and_the_key(tmp_path, listening, how):
    write_config(tmp_path, listening)
    conf = admin_features_conf(tmp_path, (
        "[featuremap]\n"
        "blindxfer => #1\n"
        "disconnect => *0     ; hang up\n"
        "\n"
        "[applicationmap](+)\n"
        "pause_rec => *1,self,PauseMonitor\n"
        "park => *91,self,Park\n"
        "fine => #8,self,NoOp\n"
    ))
    if how == "config key":
        config = write_config(tmp_path, listening, extra=f'[dialplan]\nexisting_features_conf = "{conf}"\n')
        result = calmline("-c", str(config), "check", cwd=tmp_path)
    else:
        result = calmline("-c", str(tmp_path / "calmline.toml"), "check", "--features-conf", str(conf), cwd=tmp_path)
    assert result.returncode == 1
    found = problems(result)
    assert len(found) == 2, found
    assert found[0].startswith(
        f"{conf}:6: [applicationmap] pause_rec => *1 clashes with warn.code = '*1' (the same code): ")
    assert found[1].startswith(
        f"{conf}:7: [applicationmap] park => *91 clashes with end.code = '*9' (one is a prefix of the other): ")
    assert all("change " in line for line in found)


def test_builtin_feature_codes_clash_too(tmp_path, listening):
    write_config(tmp_path, listening)
    conf = admin_features_conf(tmp_path, "[featuremap]\ndisconnect => *\n")
    result = calmline("-c", str(tmp_path / "calmline.toml"), "check", "--features-conf", str(conf), cwd=tmp_path)
    keys = [line.split(" clashes with ")[1].split(" = ")[0] for line in problems(result)]
    assert keys == ["warn.code", "transfer.supervisor.code", "transfer.colleague.code",
                    "transfer.colleague_keyed.code", "end.code", "listen.code"]


def test_features_conf_without_the_include(tmp_path, listening):
    write_config(tmp_path, listening)
    conf = tmp_path / "features.conf"
    conf.write_text("[featuremap]\nblindxfer => #1\n")
    result = calmline("-c", str(tmp_path / "calmline.toml"), "check", "--features-conf", str(conf), cwd=tmp_path)
    assert result.returncode == 1
    assert problems(result) == [
        f"dialplan.existing_features_conf: {conf} does not include calmline-features.conf, so Asterisk "
        f"never loads calmline's codes; add `#include calmline-features.conf` at its end, then "
        f"`module reload features`"
    ]


def test_a_hand_copied_calmline_entry_is_reported(tmp_path, listening):
    write_config(tmp_path, listening)
    conf = admin_features_conf(tmp_path, "[applicationmap]\ncalmline_warn => *1,peer,AGI,agi://10.0.0.9:4573/warn\n")
    result = calmline("-c", str(tmp_path / "calmline.toml"), "check", "--features-conf", str(conf), cwd=tmp_path)
    assert result.returncode == 1
    assert problems(result) == [
        f"{conf}:2: [applicationmap] calmline_warn => *1 defines calmline's own feature by hand; remove "
        f"it and `#include calmline-features.conf` at the end of features.conf instead"
    ]


def test_an_included_file_is_read_in_the_includers_category(tmp_path, listening):
    write_config(tmp_path, listening)
    conf = admin_features_conf(tmp_path, "[applicationmap]\n#include features-extra.conf\n")
    (conf.parent / "features-extra.conf").write_text("; more of the admin's own\nrecord_it => *3,self,MixMonitor\n")
    result = calmline("-c", str(tmp_path / "calmline.toml"), "check", "--features-conf", str(conf), cwd=tmp_path)
    assert [line.split(" clashes")[0] for line in problems(result)] == [
        f"{conf.parent / 'features-extra.conf'}:2: [applicationmap] record_it => *3"]


def test_an_unparsable_features_conf_names_the_line(tmp_path, listening):
    write_config(tmp_path, listening)
    conf = admin_features_conf(tmp_path, "[featuremap]\nblindxfer => #1\nthis line is junk\n")
    result = calmline("-c", str(tmp_path / "calmline.toml"), "check", "--features-conf", str(conf), cwd=tmp_path)
    assert result.returncode == 1
    assert problems(result)[0].startswith(f"dialplan.existing_features_conf: {conf}:3: cannot parse (")


def test_a_port_nobody_answers_is_a_problem(tmp_path):
    port = closed_port()
    result = calmline("-c", str(write_config(tmp_path, port)), "check", cwd=tmp_path)
    assert result.returncode == 1
    assert problems(result) == [
        f"server.port: nothing answers on 127.0.0.1:{port} (Connection refused); start it with "
        f"`calmline serve`, or pass --no-port to skip this check"
    ]
    skipped = calmline("-c", str(write_config(tmp_path, port)), "check", "--no-port", cwd=tmp_path)
    assert (skipped.returncode, problems(skipped)) == (0, [])


def test_ami_nobody_answers(tmp_path, listening):
    port = closed_port()
    result = calmline("-c", str(write_config(tmp_path, listening)), "check", "--ami-host", "127.0.0.1",
                      "--ami-port", str(port), "--ami-user", "calmline", "--ami-secret", "x", cwd=tmp_path)
    assert result.returncode == 1
    assert problems(result) == [
        f"--ami-host/--ami-port: cannot connect to AMI at 127.0.0.1:{port} (Connection refused); enable it "
        f"in manager.conf ([general] enabled = yes, port, bindaddr) or fix the options"
    ]


def test_ami_needs_a_user_and_a_secret(tmp_path, listening):
    config = str(write_config(tmp_path, listening))
    env = {k: v for k, v in os.environ.items() if k != check.AMI_SECRET_ENV}
    no_user = subprocess.run([sys.executable, "-m", "calmline", "-c", config, "check", "--ami-host", "127.0.0.1"],
                             capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert [line.split(":")[0] for line in problems(no_user)] == ["--ami-user"]
    no_secret = subprocess.run([sys.executable, "-m", "calmline", "-c", config, "check", "--ami-host", "127.0.0.1",
                                "--ami-user", "calmline"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert problems(no_secret) == [
        "--ami-secret: the AMI secret is missing; pass --ami-secret or set CALMLINE_AMI_SECRET"]


# `features show` as Asterisk 22.10.1 printed it over AMI in the lab (one Output: line each)
FEATURES_SHOW = """Builtin Feature           Default Current
---------------           ------- -------
Pickup                    *8      *8     
Blind Transfer            #       #      
Attended Transfer                        
Disconnect Call           *       *      
Park Call                                
One Touch MixMonitor                     

Dynamic Feature           Default Current
---------------           ------- -------
calmline_colleague        no def  *4     
calmline_colleague_keyed  no def  *5     
calmline_end              no def  *9     
calmline_supervisor       no def  *3     
calmline_warn             no def  *1     

Feature Groups:
---------------
(none)
"""  # noqa: W291


def test_parse_features_show_reads_only_the_dynamic_features():
    assert check.parse_features_show(FEATURES_SHOW.splitlines()) == {
        "calmline_colleague": "*4",
        "calmline_colleague_keyed": "*5",
        "calmline_end": "*9",
        "calmline_supervisor": "*3",
        "calmline_warn": "*1",
    }


class _Response:
    """What pyst2 hands back for a `Command` action on Asterisk 22."""

    def __init__(self, output: str):
        self.response = ["Response: Success\r\n", "ActionID: x-00000001\r\n", "Message: Command output follows\r\n"]
        self.response += [f"Output: {line}\r\n" for line in output.splitlines()]
        self.data = ""


def test_command_output_is_read_from_the_raw_output_lines():
    lines = check._command_lines(_Response(FEATURES_SHOW))
    assert lines[0] == "Builtin Feature           Default Current"
    assert lines[-1] == "(none)"
    assert "" in lines  # blank lines survive: they end the dynamic feature table


# --- against the lab's real Asterisk -----------------------------------------------------


def _check_lab(lab, config: Path, *extra: str, secret: str = "test") -> subprocess.CompletedProcess:
    started = time.monotonic()
    result = calmline("-c", str(config), "check", "--ami-host", "127.0.0.1", "--ami-port", str(15038),
                      "--ami-user", "test", *extra, cwd=lab.workdir, env={check.AMI_SECRET_ENV: secret})
    assert time.monotonic() - started < 20
    return result


@pytest.mark.asterisk
def test_check_against_the_lab_asterisk(lab, tmp_path):
    # the lab's own config: features rendered from it, loaded by Asterisk, service running
    ok = _check_lab(lab, lab.config_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok: Asterisk at 127.0.0.1:15038 has all 6 calmline features loaded with the configured codes" in ok.stdout

    # a config whose warn code differs from what Asterisk loaded
    other = tmp_path / "other.toml"
    other.write_text(lab.config_text('\n[warn]\ncode = "*7"\n'))
    mismatch = _check_lab(lab, other)
    assert mismatch.returncode == 1
    assert problems(mismatch) == [
        "warn.code: Asterisk at 127.0.0.1:15038 has calmline_warn on '*1', the config says '*7'; "
        + check.RELOAD_FIX
    ]

    # a wrong secret is a login problem, reported promptly
    denied = _check_lab(lab, lab.config_path, secret="wrong")
    assert denied.returncode == 1
    assert problems(denied)[0].startswith("--ami-user/--ami-secret: AMI login to 127.0.0.1:15038 as 'test' failed")


@pytest.mark.asterisk
def test_module_reload_features_picks_up_a_rerendered_file(lab, tmp_path):
    """What the admin notes promise: render again, `module reload features`, and the new code
    is live (the file is #included from features.conf)."""
    loaded = lab.run_dir / "etc" / FEATURES_FILE
    original = loaded.read_text()
    other = tmp_path / "other.toml"
    other.write_text(lab.config_text('\n[warn]\ncode = "*7"\n'))
    try:
        rendered = calmline("-c", str(other), "dialplan", "--output-dir", str(lab.run_dir / "etc"), cwd=lab.workdir)
        assert rendered.returncode == 0, rendered.stderr
        assert "Module 'features' reloaded successfully." in lab.cli("module reload features")
        assert "calmline_warn             no def  *7" in lab.cli("features show")
        assert _check_lab(lab, other).returncode == 0
        assert _check_lab(lab, lab.config_path).returncode == 1
    finally:
        loaded.write_text(original)
        lab.cli("module reload features")
    assert "calmline_warn             no def  *1" in lab.cli("features show")
    assert _check_lab(lab, lab.config_path).returncode == 0



def test_transfer_targets_missing_from_the_dialplan_are_named():
    from calmline.config import Config as C

    cfg = C.model_validate({"transfer": {"supervisor": {
        "code": "*3", "dial": "Local/sup@nowhere", "prompt": "calmline/transfer-supervisor", "reason": "abusive caller"}}})
    outputs = {
        "dialplan show calmline-transfer": ["[ Context 'calmline-transfer' created by 'pbx_config' ]"],
        "dialplan show sup@nowhere": ["There is no existence of 'sup@nowhere' extension"],
    }
    problems, _notes = check._compare_targets(cfg, outputs, "127.0.0.1:5038")
    assert problems == [
        "transfer.supervisor.dial: Asterisk at 127.0.0.1:5038 has no dialplan for 'sup@nowhere'; "
        "point it at an extension that exists, or create it"
    ]


def test_a_password_variable_that_is_not_set_is_a_problem(tmp_path, monkeypatch):
    monkeypatch.delenv("CALMLINE_TEST_SMTP_PASSWORD", raising=False)
    cfg = Config.model_validate({"mail": {"username": "u", "password_env": "CALMLINE_TEST_SMTP_PASSWORD"}})
    problems, _ = check._check_mail(cfg)
    assert problems and problems[0].startswith("mail.password_env: CALMLINE_TEST_SMTP_PASSWORD is not set")
    monkeypatch.setenv("CALMLINE_TEST_SMTP_PASSWORD", "s3cret")
    assert check._check_mail(cfg)[0] == []


def test_check_flags_an_open_bind_and_max_sessions_over_the_fd_limit(tmp_path):
    import resource

    config = write_config(tmp_path, 4573, "", SHIPPED)
    text = config.read_text().replace("[server]\n", '[server]\nhost = "0.0.0.0"\nmax_sessions = 500\n', 1)
    config.write_text(text)

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    result = subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), "check", "--no-port"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60, preexec_fn=low_limit)
    assert result.returncode == 1
    found = problems(result)
    assert any(p.startswith("server.host = '0.0.0.0' with an empty server.allow") for p in found), found
    assert any(p.startswith("server.max_sessions: 500 sessions need about 564 open files, but the hard "
                            "limit here is 256") for p in found), found
    config.write_text(text.replace("max_sessions = 500", "max_sessions = 100")
                      .replace('host = "0.0.0.0"', 'host = "0.0.0.0"\nallow = ["127.0.0.1"]'))
    result = subprocess.run([sys.executable, "-m", "calmline", "-c", str(config), "check", "--no-port"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60, preexec_fn=low_limit)
    assert problems(result) == [], result.stdout
    assert "ok: server.max_sessions (100) fits the open-file limit (256)" in result.stdout


def test_the_store_is_checked_without_being_created_and_a_newer_one_is_refused(tmp_path, listening):
    from calmline.store import Database
    from calmline.store.schema import VERSION

    path = tmp_path / "data" / "calmline.sqlite3"
    config = write_config(tmp_path, listening, f'[store]\nurl = "sqlite:///{path}"\n')
    fresh = calmline("-c", str(config), "check", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stdout
    assert f"ok: store {path} will be created by `calmline serve`" in fresh.stdout
    assert not path.exists() and not path.parent.exists()  # a check creates nothing

    db = Database(f"sqlite:///{path}")
    db.open_checked()
    conn = db.connect()
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (VERSION + 1,))
    conn.close()
    newer = calmline("-c", str(config), "check", cwd=tmp_path)
    assert newer.returncode == 1
    assert problems(newer) == [f"store.url: {path} has schema version {VERSION + 1}, newer than this calmline "
                               f"knows ({VERSION}); upgrade calmline, or point store.url at another store"]
