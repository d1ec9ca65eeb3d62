"""Voice prompts: the ones calmline ships, installing them into Asterisk, finding gaps.

Asterisk plays `calmline/warn-1` from `<sounds_dir>/<language>/calmline/warn-1.<ext>` (or
`<sounds_dir>/calmline/warn-1.<ext>` as a fallback), in any format it has a codec for, so an
admin replaces a prompt by dropping in a file of the same name. Installing therefore never
overwrites a file it did not put there unless forced.
"""

from __future__ import annotations

import filecmp
import getpass
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from calmline.errors import ConfigError

def _shipped_dir() -> Path:
    """The shipped prompts: the checkout's dialplan/prompts, else where pip put them."""
    checkout = Path(__file__).resolve().parents[3] / "dialplan" / "prompts"
    installed = Path(sys.prefix) / "share" / "calmline" / "prompts"
    return checkout if checkout.is_dir() or not installed.is_dir() else installed


SHIPPED_DIR = _shipped_dir()
SUBDIR = "calmline"

_LANGUAGE = re.compile(r"^[A-Za-z0-9_-]+$")
_PART = re.compile(r"^[A-Za-z0-9_-]+$")


def _sounds_in(directory: Path) -> dict[str, list[Path]]:
    """Files Asterisk could play in `directory`, by name without extension, so formats group."""
    found: dict[str, list[Path]] = {}
    try:
        entries = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return found
    for path in entries:
        if path.suffix and _PART.match(path.stem) and path.is_file():
            found.setdefault(path.stem, []).append(path)
    return found


def shipped_prompts(source: Path = SHIPPED_DIR) -> dict[str, list[str]]:
    """Language -> sorted prompt names shipped in `source`, so callers can check coverage."""
    shipped: dict[str, list[str]] = {}
    try:
        languages = sorted(p for p in source.iterdir() if p.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return shipped
    for lang_dir in languages:
        if not _LANGUAGE.match(lang_dir.name):
            continue
        names = _sounds_in(lang_dir / SUBDIR)
        if names:
            shipped[lang_dir.name] = [f"{SUBDIR}/{stem}" for stem in sorted(names)]
    return shipped


@dataclass
class InstallResult:
    """What `install` did to each file, so the CLI can report it and tests can check it."""

    copied: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def _check_languages(languages: list[str]) -> list[str]:
    return [
        f"language {lang!r}: must be a plain folder name of letters, digits, '-' or '_' "
        "(like 'en' or 'fr_CA')"
        for lang in languages
        if not _LANGUAGE.match(lang)
    ]


def _writable_problem(dest: Path) -> str | None:
    if dest.exists() and not dest.is_dir():
        return f"{dest}: is not a directory; set [prompts] sounds_dir to Asterisk's sounds directory"
    existing = dest
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f"{dest}: not writable by user {getpass.getuser()!r} ({existing} is not); "
            "run the install as root or as the user that owns Asterisk's sounds directory"
        )
    return None


def _copy(src: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def install(dest: Path, languages: list[str], force: bool = False) -> InstallResult:
    """Copy the shipped prompts into `dest/<lang>/calmline/`, leaving an admin's own recordings.

    A destination file that differs, or a same-named prompt in another format, counts as the
    admin's recording: it is listed in `skipped` and left alone unless `force`.
    """
    languages = list(dict.fromkeys(languages))
    problems = _check_languages(languages)
    shipped = shipped_prompts()
    available = ", ".join(sorted(shipped)) or "none"
    for lang in languages:
        if _LANGUAGE.match(lang) and lang not in shipped:
            problems.append(
                f"language {lang!r}: calmline ships no prompts for it (shipped: {available}, "
                f"in {SHIPPED_DIR}); record your own into {dest / lang / SUBDIR} and leave it out "
                "of the install"
            )
    if (problem := _writable_problem(dest)) is not None:
        problems.append(problem)
    if problems:
        raise ConfigError(problems)

    result = InstallResult()
    for lang in languages:
        target_dir = dest / lang / SUBDIR
        try:
            target_dir.mkdir(parents=True, exist_ok=True)
            present = _sounds_in(target_dir)
            for stem, files in sorted(_sounds_in(SHIPPED_DIR / lang / SUBDIR).items()):
                for src in files:
                    target = target_dir / src.name
                    if target.is_file() and filecmp.cmp(src, target, shallow=False):
                        result.kept.append(target)
                    elif not force and (target.exists() or present.get(stem)):
                        result.skipped.append(target if target.exists() else present[stem][0])
                    else:
                        _copy(src, target)
                        result.copied.append(target)
        except OSError as exc:
            where = exc.filename or target_dir
            raise ConfigError(
                [f"{where}: cannot write ({exc.strerror}); run the install as root or as "
                 "the user that owns Asterisk's sounds directory"]
            ) from exc
    return result


def missing_prompts(
    sounds_dir: Path, languages: list[str], names: list[str]
) -> list[tuple[str, str]]:
    """(language, name) pairs Asterisk would fail to play, so a check can name them up front.

    A prompt is found in `<sounds_dir>/<lang>/` or, as Asterisk falls back, `<sounds_dir>/`.
    """
    problems = _check_languages(languages)
    for name in names:
        if not all(_PART.match(part) for part in name.split("/")):
            problems.append(
                f"prompt {name!r}: must be a sound name without extension, like 'calmline/end'"
            )
    if problems:
        raise ConfigError(problems)

    missing = []
    for lang in languages:
        for name in names:
            parent, _, base = name.rpartition("/")
            if not any(
                base in _sounds_in(root / parent) for root in (sounds_dir / lang, sounds_dir)
            ):
                missing.append((lang, name))
    return missing
