"""The Asterisk snippets `calmline dialplan` renders, checked without an Asterisk.

The committed `dialplan/calmline-*.conf` must be what the renderer writes today (the CLI is
run as a real subprocess, as an admin would); asterisklint must accept the extensions; the
pre-dial handler must sit where Asterisk honours it; and the CLI must never overwrite an
admin's own file or accept keypad codes Asterisk would confuse.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from calmline import config as config_module
from calmline.actions import catalog
from calmline.admin import dialplan
from calmline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
REPO_CONFIG = Path("config/calmline.toml")  # relative: the header names it as given


def calmline(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "calmline", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


def repo_config_args() -> list[str]:
    """The committed files are rendered from config/calmline.toml when the repo has one."""
    return ["-c", str(REPO_CONFIG)] if (REPO / REPO_CONFIG).exists() else []


def repo_config() -> config_module.Config:
    return config_module.load(REPO / REPO_CONFIG if (REPO / REPO_CONFIG).exists() else None)[0]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rendered")
    result = calmline(*repo_config_args(), "dialplan", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("name", [dialplan.FEATURES_FILE, dialplan.EXTENSIONS_FILE])
def test_committed_files_are_what_the_renderer_writes(rendered, name):
    committed = REPO / "dialplan" / name
    assert committed.exists(), f"render it: python -m calmline {' '.join(repo_config_args())} dialplan --output-dir dialplan"
    assert committed.read_text() == (rendered / name).read_text(), (
        f"dialplan/{name} is stale: run `python -m calmline {' '.join(repo_config_args())} "
        f"dialplan --output-dir dialplan` from the repo root and commit the result"
    )


def test_printing_renders_the_same_as_writing(rendered):
    printed = calmline(*repo_config_args(), "dialplan")
    assert printed.returncode == 0, printed.stderr
    for name in (dialplan.FEATURES_FILE, dialplan.EXTENSIONS_FILE):
        assert f";;; ---- {name} ----\n" + (rendered / name).read_text() in printed.stdout


def _asterisklint() -> str:
    beside = Path(sys.executable).parent / "asterisklint"
    found = str(beside) if beside.exists() else shutil.which("asterisklint")
    if found is None:
        pytest.fail("asterisklint is not installed: pip install -e '.[test]'")
    return found


def _lint(directory: Path, included: str) -> subprocess.CompletedProcess:
    # asterisklint wants a whole extensions.conf ([general], [globals] first); ours is a
    # snippet an admin #includes, so lint it the way Asterisk reads it: through a wrapper
    (directory / "extensions.conf").write_text(
        f"[general]\nstatic=yes\nwriteprotect=no\n\n[globals]\n\n#include {included}\n")
    return subprocess.run([_asterisklint(), "dialplan-check", "extensions.conf"], capture_output=True,
                          text=True, cwd=directory, timeout=120)


def test_asterisklint_accepts_the_extensions(rendered):
    result = _lint(rendered, dialplan.EXTENSIONS_FILE)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_asterisklint_reads_the_included_file(tmp_path, rendered):
    """Control: the wrapper really makes asterisklint read the snippet (a mistake is found)."""
    text = (rendered / dialplan.EXTENSIONS_FILE).read_text()
    broken = text.replace(" same => n,Return()", " same => n,Retrun()", 1)
    assert broken != text
    (tmp_path / dialplan.EXTENSIONS_FILE).write_text(broken)
    result = _lint(tmp_path, dialplan.EXTENSIONS_FILE)
    assert result.returncode == 1
    assert "E_APP_MISSING" in result.stdout + result.stderr and "Retrun" in result.stdout + result.stderr


def _args(application: str, line: str) -> list[str]:
    """The arguments of `application(...)` in a dialplan line, split at top-level commas."""
    start = line.index(application + "(") + len(application) + 1
    args, depth, current = [], 0, ""
    for char in line[start:]:
        if char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                break
            depth -= 1
        if char == "," and depth == 0:
            args.append(current)
            current = ""
        else:
            current += char
    args.append(current)
    return args


def test_queue_takes_the_pre_dial_handler_in_its_second_argument(rendered):
    cfg = repo_config()
    handler = f"b({cfg.dialplan.agent_context}^s^1)"
    text = (rendered / dialplan.EXTENSIONS_FILE).read_text()
    queue_lines = [line for line in text.splitlines() if "Queue(" in line and "b(" in line]
    assert queue_lines, "no Queue line with a pre-dial handler was rendered"
    for line in queue_lines:
        args = _args("Queue", line)
        assert handler in args[1], f"b() must be Queue's second argument (options): {line}"
        assert all("b(" not in arg for i, arg in enumerate(args) if i != 1), line
    example = [line for line in text.splitlines() if line.startswith("exten => 200,1,Queue(")]
    assert len(example) == 1 and _args("Queue", example[0])[:2] == [cfg.dialplan.example_queue, handler]
    # and Dial takes it in its third argument (options)
    dial = next(line for line in text.splitlines() if "Dial(" in line and handler in line)
    assert _args("Dial", dial)[2] == handler


def test_pre_dial_handler_appends_to_an_existing_dynamic_features(rendered):
    cfg = repo_config()
    text = (rendered / dialplan.EXTENSIONS_FILE).read_text()
    context = text.split(f"[{cfg.dialplan.agent_context}]\n", 1)[1].split("\n\n", 1)[0].splitlines()
    names = "#".join(f.name for f in catalog.features(cfg))
    assert context == [
        'exten => s,1,Set(DYNAMIC_FEATURES=${IF($["${DYNAMIC_FEATURES}" != ""]?${DYNAMIC_FEATURES}#)}'
        + names + ")",
        " same => n,Return()",
    ]


def test_features_file_maps_each_code_to_its_service_path(rendered):
    cfg = repo_config()
    url = cfg.dialplan.service_url.rstrip("/")
    lines = (rendered / dialplan.FEATURES_FILE).read_text().splitlines()
    entries = [line for line in lines if " => " in line and not line.startswith(";")]
    moh = f",{cfg.dialplan.moh_class}" if cfg.dialplan.moh_class else ""
    assert entries == [f"{f.name} => {f.code},{f.activate_on},AGI,{url}/{f.path}{moh}" for f in catalog.features(cfg)]
    assert lines.index("[applicationmap]") < lines.index(entries[0])


@pytest.mark.parametrize("toml", [
    "",
    "[transfer]\nenabled = false\n",
    "[transfer.colleague_keyed]\nenabled = false\n[warn]\nenabled = false\n",
    '[end]\nenabled = false\n[warn]\nafter_last = "repeat"\n',
])
def test_every_path_the_dialplan_asks_for_is_served_and_no_other(toml):
    """The rendered AGI URLs and the service's registry both come from the catalog."""
    from calmline.service import build_registry

    cfg = config_module.parse(toml)
    files = dialplan.render(cfg)
    url = re.escape(cfg.dialplan.service_url.rstrip("/"))
    asked = set(re.findall(url + r"/([a-z/-]+)", "".join(files.values())))
    assert asked == set(build_registry(cfg).paths())


def test_write_refuses_to_replace_an_admins_file(tmp_path):
    mine = tmp_path / dialplan.EXTENSIONS_FILE
    mine.write_text("[my-own]\nexten => s,1,NoOp(mine)\n")
    result = calmline("-c", str(tmp_path / "none.toml"), "dialplan", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2  # the config is missing: a usage error, nothing written
    (tmp_path / "calmline.toml").write_text("")
    result = calmline("-c", str(tmp_path / "calmline.toml"), "dialplan", "--output-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert str(mine) in result.stderr and "not generated by calmline" in result.stderr
    assert mine.read_text() == "[my-own]\nexten => s,1,NoOp(mine)\n"
    # nothing was written, not even the file that was free: all or nothing
    assert not (tmp_path / dialplan.FEATURES_FILE).exists()


def test_write_replaces_its_own_files(tmp_path):
    (tmp_path / "calmline.toml").write_text('[warn]\ncode = "*7"\n')
    first = calmline("-c", "calmline.toml", "dialplan", "--output-dir", "out", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (tmp_path / "calmline.toml").write_text('[warn]\ncode = "*8"\n')
    second = calmline("-c", "calmline.toml", "dialplan", "--output-dir", "out", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    features = (tmp_path / "out" / dialplan.FEATURES_FILE).read_text()
    assert "calmline_warn => *8," in features and "*7" not in features


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[end]\ncode = "*12"\n', ["warn.code = '*1' is a prefix of end.code = '*12'"]),
        ('[end]\ncode = "*3"\n', ["transfer.supervisor.code = '*3' is the same as end.code = '*3'"]),
        ('[warn]\ncode = "*x"\n', ["warn.code", "DTMF code", "'*x'"]),
        ('[warn]\ncode = "1 2"\n', ["warn.code", "DTMF code"]),
        ('[end]\ncode = ""\n', ["end.code", "DTMF code"]),
        ('[end]\ncode = "*123456789"\n', ["end.code", "DTMF code"]),
    ],
)
def test_codes_asterisk_would_confuse_are_config_errors(tmp_path, toml, expected):
    (tmp_path / "calmline.toml").write_text(toml)
    result = calmline("-c", "calmline.toml", "dialplan", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    for fragment in expected:
        assert fragment in result.stderr
    assert result.stderr.startswith("calmline: calmline.toml: ")


def test_a_disabled_action_does_not_reserve_its_code():
    cfg = config_module.parse('[end]\nenabled = false\ncode = "*12"\n')
    assert [f.code for f in catalog.features(cfg)] == ["*1", "*3", "*4", "*5", "*6"]
    with pytest.raises(ConfigError):
        config_module.parse('[end]\nenabled = true\ncode = "*12"\n')


def test_codes_are_checked_whatever_the_order_of_the_keys():
    """A longer code listed first still clashes with a shorter one listed later."""
    with pytest.raises(ConfigError) as exc:
        config_module.parse('[warn]\ncode = "*31"\n')
    assert re.search(r"transfer\.supervisor\.code = '\*3' is a prefix of warn\.code = '\*31'", str(exc.value))


def test_write_never_follows_a_symlink_at_its_target(tmp_path):
    """A dangling symlink named calmline-features.conf used to be followed and created."""
    (tmp_path / "calmline.toml").write_text("")
    out = tmp_path / "etc"
    out.mkdir()
    (out / dialplan.FEATURES_FILE).symlink_to(tmp_path / "created-through-the-link")
    result = calmline("-c", "calmline.toml", "dialplan", "--output-dir", "etc", cwd=tmp_path)
    assert result.returncode == 2
    assert "is a symbolic link" in result.stderr
    assert not (tmp_path / "created-through-the-link").exists()
    assert not (out / dialplan.EXTENSIONS_FILE).exists()  # all or nothing
