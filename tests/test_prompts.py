"""The shipped voice prompts are playable by Asterisk as-is, and installing them is safe."""

from __future__ import annotations

import array
import hashlib
import os
import shutil
import subprocess
import wave
from pathlib import Path

import pytest

from calmline.config import Config
from calmline.errors import ConfigError
from calmline.admin.prompts import SHIPPED_DIR, InstallResult, install, missing_prompts, shipped_prompts

EN = SHIPPED_DIR / "en" / "calmline"
SHIPPED_WAVS = sorted(EN.glob("*.wav"))
SCRIPT = SHIPPED_DIR / "make-prompts.sh"
TSV = SHIPPED_DIR / "en" / "prompts.tsv"


def _tsv_names() -> list[str]:
    lines = TSV.read_text(encoding="utf-8").splitlines()
    return [line.split("\t", 1)[0] for line in lines if line and not line.startswith("#")]


def test_every_tsv_line_has_a_rendered_wav_and_nothing_else():
    assert sorted(p.stem for p in SHIPPED_WAVS) == sorted(_tsv_names())
    assert sorted(p.name for p in EN.iterdir()) == sorted(p.name for p in SHIPPED_WAVS)


@pytest.mark.parametrize("path", SHIPPED_WAVS, ids=lambda p: p.stem)
def test_shipped_prompt_is_8khz_mono_16bit_speech(path: Path):
    with wave.open(str(path), "rb") as wav:
        assert wav.getframerate() == 8000
        assert wav.getnchannels() == 1
        assert wav.getsampwidth() == 2
        assert wav.getcomptype() == "NONE"
        frames = wav.getnframes()
        samples = array.array("h", wav.readframes(frames))
    assert 1.0 <= frames / 8000 <= 12.0
    assert max(abs(s) for s in samples) > 1000
    assert path.stat().st_size == 44 + 2 * frames, "extra chunks besides fmt and data"


def test_every_configured_prompt_is_shipped_for_english():
    shipped = shipped_prompts()
    names = Config().prompt_names()
    assert names
    assert set(names) <= set(shipped["en"])


def test_shipped_prompts_groups_by_language_and_ignores_strays(tmp_path: Path):
    (tmp_path / "en" / "calmline").mkdir(parents=True)
    (tmp_path / "en" / "calmline" / "b.wav").write_bytes(b"b")
    (tmp_path / "en" / "calmline" / "a.gsm").write_bytes(b"a")
    (tmp_path / "en" / "calmline" / "a.wav").write_bytes(b"a")
    (tmp_path / "en" / "calmline" / "README").write_text("no extension")
    (tmp_path / "fr" / "calmline").mkdir(parents=True)
    (tmp_path / "de").mkdir()
    (tmp_path / "make-prompts.sh").write_text("")
    assert shipped_prompts(tmp_path) == {"en": ["calmline/a", "calmline/b"]}
    assert shipped_prompts(tmp_path / "absent") == {}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_install_copies_every_shipped_prompt(tmp_path: Path):
    dest = tmp_path / "sounds"
    result = install(dest, ["en"])
    assert sorted(result.copied) == [dest / "en" / "calmline" / p.name for p in SHIPPED_WAVS]
    assert result.kept == [] and result.skipped == []
    for src in SHIPPED_WAVS:
        target = dest / "en" / "calmline" / src.name
        assert target.read_bytes() == src.read_bytes()
        assert target.stat().st_mode & 0o777 == 0o644
    assert not [p for p in (dest / "en" / "calmline").iterdir() if p.name.startswith(".")]


def test_install_twice_keeps_everything(tmp_path: Path):
    install(tmp_path, ["en"])
    before = _files(tmp_path)
    result = install(tmp_path, ["en"])
    assert result.copied == [] and result.skipped == []
    assert sorted(result.kept) == [tmp_path / "en" / "calmline" / p.name for p in SHIPPED_WAVS]
    assert _files(tmp_path) == before


def test_install_leaves_an_admins_recording_unless_forced(tmp_path: Path):
    install(tmp_path, ["en"])
    own = tmp_path / "en" / "calmline" / "warn-1.wav"
    own.write_bytes(b"admin's own recording")

    result = install(tmp_path, ["en"])
    assert result.skipped == [own]
    assert own not in result.kept and own not in result.copied
    assert own.read_bytes() == b"admin's own recording"

    forced = install(tmp_path, ["en"], force=True)
    assert forced.copied == [own]
    assert own.read_bytes() == (EN / "warn-1.wav").read_bytes()


def test_install_respects_an_admins_recording_in_another_format(tmp_path: Path):
    target_dir = tmp_path / "en" / "calmline"
    target_dir.mkdir(parents=True)
    own = target_dir / "end.gsm"
    own.write_bytes(b"gsm recording")
    result = install(tmp_path, ["en"])
    assert result.skipped == [own]
    assert not (target_dir / "end.wav").exists()
    assert own.read_bytes() == b"gsm recording"


def test_install_unknown_language_names_it_and_the_shipped_ones(tmp_path: Path):
    with pytest.raises(ConfigError) as err:
        install(tmp_path, ["en", "xx"])
    assert len(err.value.problems) == 1
    assert "'xx'" in err.value.problems[0] and "shipped: en" in err.value.problems[0]
    assert not (tmp_path / "en").exists(), "nothing is installed when a language is wrong"


@pytest.mark.parametrize("lang", ["../etc", "en/../../x", "", ".", "en us"])
def test_install_refuses_path_traversal(tmp_path: Path, lang: str):
    with pytest.raises(ConfigError) as err:
        install(tmp_path / "sounds", [lang])
    assert repr(lang) in str(err.value)
    assert not tmp_path.joinpath("sounds").exists()


def test_install_into_a_file_names_the_path(tmp_path: Path):
    dest = tmp_path / "sounds"
    dest.write_text("not a directory")
    with pytest.raises(ConfigError) as err:
        install(dest, ["en"])
    assert str(dest) in str(err.value) and "sounds_dir" in str(err.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_install_unwritable_dest_names_the_path_and_the_fix(tmp_path: Path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(ConfigError) as err:
            install(locked / "sounds", ["en"])
    finally:
        locked.chmod(0o755)
    assert str(locked / "sounds") in str(err.value) and "run the install" in str(err.value)


def test_install_unwritable_dest_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError) as err:
        install(tmp_path / "sounds", ["en"])
    assert str(tmp_path / "sounds") in str(err.value) and "not writable" in str(err.value)
    assert not (tmp_path / "sounds").exists()


def test_missing_prompts_finds_exactly_the_removed_ones(tmp_path: Path):
    names = Config().prompt_names()
    install(tmp_path, ["en"])
    assert missing_prompts(tmp_path, ["en"], names) == []

    (tmp_path / "en" / "calmline" / "warn-final.wav").unlink()
    (tmp_path / "en" / "calmline" / "end.wav").rename(tmp_path / "en" / "calmline" / "end.txt.bak")
    (tmp_path / "en" / "calmline" / "enter-extension.wav").rename(
        tmp_path / "en" / "calmline" / "enter-extension.sln16"
    )
    assert missing_prompts(tmp_path, ["en"], names) == [
        ("en", "calmline/warn-final"),
        ("en", "calmline/end"),
    ]
    assert missing_prompts(tmp_path, ["en", "fr"], ["calmline/warn-1"]) == [("fr", "calmline/warn-1")]


def test_missing_prompts_accepts_asterisks_fallback_directory(tmp_path: Path):
    (tmp_path / "calmline").mkdir()
    (tmp_path / "calmline" / "end.gsm").write_bytes(b"x")
    (tmp_path / "en" / "calmline").mkdir(parents=True)
    (tmp_path / "en" / "calmline" / "end").write_bytes(b"no extension: Asterisk ignores it")
    assert missing_prompts(tmp_path, ["en", "de"], ["calmline/end", "calmline/warn-1"]) == [
        ("en", "calmline/warn-1"),
        ("de", "calmline/warn-1"),
    ]
    assert missing_prompts(tmp_path / "absent", ["en"], ["calmline/end"]) == [("en", "calmline/end")]


def test_missing_prompts_refuses_traversal(tmp_path: Path):
    with pytest.raises(ConfigError):
        missing_prompts(tmp_path, ["en"], ["../../etc/passwd"])
    with pytest.raises(ConfigError):
        missing_prompts(tmp_path, [".."], ["calmline/end"])


def test_install_result_defaults_are_independent():
    a, b = InstallResult(), InstallResult()
    a.copied.append(Path("x"))
    assert b.copied == []


@pytest.mark.skipif(
    not (shutil.which("espeak-ng") and shutil.which("sox")), reason="espeak-ng and sox not installed"
)
def test_make_prompts_reproduces_the_committed_wavs(tmp_path: Path):
    run = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert {p.name: digest(p) for p in sorted(tmp_path.glob("*.wav"))} == {
        p.name: digest(p) for p in SHIPPED_WAVS
    }
