"""`calmline check`: find an admin's mistakes before the agents do.

Each problem is one line naming the key and the fix; the caller decides the exit status.
What is checked: the config (it loaded), the prompts on disk, the admin's own features.conf
for codes that clash with calmline's, the service port, and (given AMI access) whether the
running Asterisk has calmline's features loaded with the expected codes.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from calmline.actions.catalog import Feature, features
from calmline.config import Config
from calmline.errors import ConfigError

AMI_SECRET_ENV = "CALMLINE_AMI_SECRET"
AMI_TIMEOUT = 10.0
RELOAD_FIX = (
    "render it with `calmline dialplan --output-dir /etc/asterisk`, make sure features.conf "
    "ends with `#include calmline-features.conf`, then run `module reload features`"
)


def _check_port(cfg: Config) -> tuple[list[str], list[str]]:
    host, port = cfg.server.host, cfg.server.port
    try:
        with socket.create_connection((host, port), timeout=2):
            return [], [f"the service answers on {host}:{port}"]
    except OSError as exc:
        return [
            f"server.port: nothing answers on {host}:{port} ({exc.strerror or exc}); "
            f"start it with `calmline serve`, or pass --no-port to skip this check"
        ], []


# --- prompts ----------------------------------------------------------------


def _check_prompts(cfg: Config) -> tuple[list[str], list[str]]:
    from calmline.admin.prompts import missing_prompts

    sounds = cfg.prompts.sounds_dir
    languages = list(cfg.prompts.languages)
    names = cfg.prompt_names()
    if not sounds.is_dir():
        return [
            f"prompts.sounds_dir: {sounds} is not a directory, so none of the {len(names)} prompts "
            f"can play; set it to Asterisk's sounds directory (`core show settings`, astdatadir "
            f"+ /sounds), then run `calmline prompts install`"
        ], []
    try:
        missing = missing_prompts(sounds, languages, names)
    except ConfigError as exc:
        return [f"prompts: {line}" for line in exc.problems], []
    problems = [
        f"prompts.sounds_dir: prompt {name!r} is missing for language {lang!r} (no "
        f"{sounds / lang / name}.* nor {sounds / name}.*); run `calmline prompts install`, "
        f"or record your own there"
        for lang, name in missing
    ]
    notes = [] if problems else [
        f"all {len(names)} prompts are installed under {sounds} for {', '.join(languages)}"
    ]
    return problems, notes


# --- the admin's features.conf ------------------------------------------------


@dataclass(frozen=True)
class FeatureEntry:
    """One `name => code...` line of features.conf, where it was found."""

    path: Path
    line: int
    category: str
    name: str
    code: str

    def where(self) -> str:
        return f"{self.path}:{self.line}: [{self.category}] {self.name} => {self.code}"


_INCLUDE = re.compile(r"^#\s*(try)?include\s+(.+?)\s*$")
_DIRECTIVE = re.compile(r"^#\s*\w+")
_TEMPLATE = re.compile(r"^(\[[^\]]+\])\s*\([^)]*\)")


def _features_conf_class():
    """pyst2's `asterisk.config.Config`, taught the `#include` lines Asterisk files contain.

    pyst2 parses `name = value` / `name => value` lines into categories, but raises on a
    `#include` line and on a template suffix (`[applicationmap](+)`): those are turned
    into blank lines (so line numbers stay right) and the includes are kept aside.
    """
    import asterisk.config

    class FeaturesConf(asterisk.config.Config):
        def __init__(self, filename: str, category: str | None = None):
            self.category_at_start = category
            self.includes: list[tuple[int, str, str | None]] = []
            self.shift = 0
            super().__init__(filename)

        def load(self) -> None:
            with open(self.filename, encoding="utf-8", errors="replace") as f:
                raw = f.readlines()
            lines: list[str] = []
            category = self.category_at_start
            for number, line in enumerate(raw, 1):
                text = line.strip()
                if match := _INCLUDE.match(text):
                    target = match.group(2).strip().strip('"').strip("<>")
                    self.includes.append((number, target, category))
                    lines.append("\n")
                elif _DIRECTIVE.match(text):
                    lines.append("\n")
                elif match := _TEMPLATE.match(text):
                    category = match.group(1)[1:-1]
                    lines.append(match.group(1) + "\n")
                else:
                    if text.startswith("[") and text.endswith("]"):
                        category = text[1:-1]
                    lines.append(line)
            if self.category_at_start:
                # an included file's first lines belong to the includer's category
                lines.insert(0, f"[{self.category_at_start}]\n")
                self.shift = 1
            self.raw_lines = lines

    return FeaturesConf


def read_features_conf(path: Path) -> tuple[list[FeatureEntry], list[str], list[str]]:
    """The `[featuremap]` and `[applicationmap]` entries of `path` and the files it includes.

    Returns (entries, files calmline generated that it includes, problems). calmline's own
    generated file is not read: its entries are calmline's, not the admin's.
    """
    from asterisk.config import ParseError

    from calmline.admin.dialplan import MARKER

    conf_class = _features_conf_class()
    entries: list[FeatureEntry] = []
    ours: list[str] = []
    problems: list[str] = []
    seen: set[Path] = set()

    def visit(file: Path, category: str | None, depth: int) -> None:
        resolved = file.resolve()
        if resolved in seen or depth > 10:
            return
        seen.add(resolved)
        try:
            with file.open(encoding="utf-8", errors="replace") as f:
                first = f.readline()
        except OSError as exc:
            problems.append(f"cannot read {file}: {exc.strerror or exc}")
            return
        if first.startswith(MARKER):
            ours.append(str(file))
            return
        try:
            conf = conf_class(str(file), category)
        except ParseError as exc:
            number, message = (exc.args + ("", ""))[:2]
            problems.append(f"{file}:{number}: cannot parse ({message}); fix that line of features.conf")
            return
        except OSError as exc:
            problems.append(f"cannot read {file}: {exc.strerror or exc}")
            return
        for cat in conf.categories:
            if cat.name not in ("featuremap", "applicationmap"):
                continue
            for item in cat.items:
                value = item.value.strip()
                code = value.split(",", 1)[0].strip() if cat.name == "applicationmap" else value
                if code:
                    entries.append(FeatureEntry(file, item.number - conf.shift, cat.name, item.name.strip(), code))
        for _number, target, cat in conf.includes:
            # Asterisk reads a relative #include from its config directory: the one
            # features.conf is in, for the usual /etc/asterisk layout
            included = Path(target) if Path(target).is_absolute() else file.parent / target
            matches = sorted(included.parent.glob(included.name)) if "*" in included.name else [included]
            for match in matches:
                visit(match, cat, depth + 1)

    visit(path, None, 0)
    return entries, ours, problems


def _clash(a: str, b: str) -> str | None:
    if a == b:
        return "the same code"
    if a.startswith(b) or b.startswith(a):
        return "one is a prefix of the other"
    return None


def _check_features_conf(cfg: Config, path: Path) -> tuple[list[str], list[str]]:
    key = "dialplan.existing_features_conf"
    if not path.is_file():
        return [f"{key}: {path} does not exist; point it (or --features-conf) at Asterisk's features.conf"], []
    entries, ours, problems = read_features_conf(path)
    problems = [f"{key}: {p}" for p in problems]
    notes = []
    codes = features(cfg)
    names = {f.name for f in codes}
    clashes: list[str] = []
    for entry in entries:
        if entry.category == "applicationmap" and entry.name in names:
            clashes.append(
                f"{entry.where()} defines calmline's own feature by hand; remove it and "
                f"`#include calmline-features.conf` at the end of features.conf instead"
            )
            continue
        for feature in codes:
            why = _clash(entry.code, feature.code)
            if why:
                clashes.append(
                    f"{entry.where()} clashes with {feature.key} = {feature.code!r} ({why}): Asterisk "
                    f"would run the wrong feature or wait for more digits; change {feature.key} "
                    f"(or that entry) so neither code starts the other"
                )
    problems += clashes
    if ours:
        notes.append(f"{path} includes calmline's {', '.join(ours)}")
    else:
        problems.append(
            f"{key}: {path} does not include calmline-features.conf, so Asterisk never loads "
            f"calmline's codes; add `#include calmline-features.conf` at its end, then "
            f"`module reload features`"
        )
    if not clashes:
        notes.append(f"no code in {path} clashes with calmline's ({len(entries)} entries read)")
    return problems, notes


# --- a running Asterisk, over AMI ---------------------------------------------


def _command_lines(response) -> list[str]:
    """Output lines of an AMI `Command` action, as pyst2 hands them over.

    Asterisk 22 sends each line as an `Output:` header (pyst2 keeps only the last one in
    `headers`, and `data` is empty); older Asterisks sent free text ending in
    `--END COMMAND--` (in `data`). Read both from the raw lines.
    """
    lines = []
    for raw in response.response:
        text = raw.rstrip("\r\n")
        if text.startswith("Output:"):
            lines.append(text[len("Output:"):].removeprefix(" "))
    if not lines and response.data:
        lines = [line for line in response.data.replace("--END COMMAND--", "").splitlines()]
    return lines


_DYNAMIC_ROW = re.compile(r"^(\S+)\s+(no def|\S+)\s+(\S+)?\s*$")


def parse_features_show(lines: list[str]) -> dict[str, str]:
    """Dynamic feature name -> current code, from the `features show` CLI output."""
    loaded: dict[str, str] = {}
    in_dynamic = False
    for line in lines:
        if line.startswith("Dynamic Feature"):
            in_dynamic = True
            continue
        if not in_dynamic or line.startswith("---"):
            continue
        if not line.strip() or line.startswith("Feature Groups"):
            break
        if match := _DYNAMIC_ROW.match(line):
            loaded[match.group(1)] = match.group(3) or ""
    return loaded


def _ami_run(host: str, port: int, user: str, secret: str, commands: list[str]) -> dict[str, list[str]]:
    """Log in with pyst2's Manager, run CLI commands, return each one's output lines."""
    from asterisk.manager import Manager, ManagerException

    manager = Manager()
    try:
        manager.connect(host, port)
        manager.login(user, secret)
        out = {}
        for command in commands:
            response = manager.command(command)
            if response.get_header("Response") == "Error":
                raise PermissionError(response.get_header("Message") or "the Command action was refused")
            out[command] = _command_lines(response)
        return out
    finally:
        try:
            manager.close()  # logs off itself: calling logoff() too would make it raise
        except (ManagerException, OSError, ValueError):
            # Asterisk may already have dropped the connection (it does after a failed
            # login), and pyst2 then fails to log off, with a socket error or a write to
            # its closed file; that must not hide why the session ended.
            pass


_LOCAL_TARGET = re.compile(r"^Local/([^@/]+)@([^/]+?)(?:/n)?$")


def _target_commands(cfg: Config) -> dict[str, str]:
    """`dialplan show` commands for what the transfers and the listen-in need, with the key
    each checks."""
    wanted: dict[str, str] = {}
    if cfg.transfer.enabled:
        t = cfg.transfer
        wanted[f"dialplan show {t.context}"] = "transfer.context"
        for name, target in (("supervisor", t.supervisor), ("colleague", t.colleague)):
            for key, dial in ((f"transfer.{name}.dial", target.dial), (f"transfer.{name}.fallback_dial", target.fallback_dial)):
                match = _LOCAL_TARGET.match(dial or "")
                if match:
                    wanted[f"dialplan show {match.group(1)}@{match.group(2)}"] = key
    if cfg.listen.enabled:
        wanted[f"dialplan show {cfg.listen.context}"] = "listen.context"
        match = _LOCAL_TARGET.match(cfg.listen.dial)
        if match:
            wanted.setdefault(f"dialplan show {match.group(1)}@{match.group(2)}", "listen.dial")
    return wanted


def _compare_targets(cfg: Config, outputs: dict[str, list[str]], where: str) -> tuple[list[str], list[str]]:
    problems, checked = [], 0
    for command, key in _target_commands(cfg).items():
        lines = outputs.get(command, [])
        if any("There is no existence" in line for line in lines):
            what = command.removeprefix("dialplan show ")
            fix = ("render and include calmline-extensions.conf, then `dialplan reload`"
                   if key in ("transfer.context", "listen.context")
                   else "point it at an extension that exists, or create it")
            problems.append(f"{key}: Asterisk at {where} has no dialplan for {what!r}; {fix}")
        else:
            checked += 1
    notes = [f"Asterisk at {where} has the dialplan the transfers and the listen-in ring ({checked} checked)"] if checked and not problems else []
    return problems, notes


def _check_ami(cfg: Config, host: str, port: int, user: str | None, secret: str | None,
               timeout: float = AMI_TIMEOUT) -> tuple[list[str], list[str]]:
    if not user:
        return ["--ami-user: the AMI user is missing (a [user] of manager.conf with `write = command`)"], []
    if secret is None:
        return [f"--ami-secret: the AMI secret is missing; pass --ami-secret or set {AMI_SECRET_ENV}"], []
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 3.0)):
            pass
    except OSError as exc:
        return [
            f"--ami-host/--ami-port: cannot connect to AMI at {where} ({exc.strerror or exc}); "
            f"enable it in manager.conf ([general] enabled = yes, port, bindaddr) or fix the options"
        ], []

    result: dict[str, object] = {}

    def work() -> None:
        try:
            result["outputs"] = _ami_run(host, port, user, secret, ["features show", *_target_commands(cfg)])
        except BaseException as exc:  # reported below, in the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=work, name="calmline-check-ami", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return [
            f"--ami-host/--ami-port: {where} did not complete an AMI greeting, login and `features show` "
            f"within {timeout:.0f}s; is it Asterisk's AMI port (manager.conf [general] port)?"
        ], []
    error = result.get("error")
    if error is not None:
        from asterisk.manager import ManagerAuthException

        if isinstance(error, ManagerAuthException):
            return [
                f"--ami-user/--ami-secret: AMI login to {where} as {user!r} failed ({error}); "
                f"check the user's secret (and permit/deny) in manager.conf"
            ], []
        if isinstance(error, PermissionError):
            return [
                f"--ami-user: AMI user {user!r} may not run CLI commands ({error}); give it "
                f"`write = command` (or `system`) in manager.conf, then `manager reload`"
            ], []
        return [f"--ami-host: AMI at {where} failed: {type(error).__name__}: {error}"], []

    outputs: dict[str, list[str]] = result["outputs"]  # type: ignore[assignment]
    loaded = parse_features_show(outputs["features show"])
    problems, notes = _compare_loaded(features(cfg), loaded, where)
    more, ok = _compare_targets(cfg, outputs, where)
    return problems + more, notes + ok


def _compare_loaded(expected: list[Feature], loaded: dict[str, str], where: str) -> tuple[list[str], list[str]]:
    problems = []
    for feature in expected:
        code = loaded.get(feature.name)
        if code is None:
            problems.append(
                f"{feature.key}: Asterisk at {where} has no feature {feature.name} ({feature.code!r}) "
                f"loaded; {RELOAD_FIX}"
            )
        elif code != feature.code:
            problems.append(
                f"{feature.key}: Asterisk at {where} has {feature.name} on {code!r}, the config says "
                f"{feature.code!r}; {RELOAD_FIX}"
            )
    names = {f.name for f in expected}
    for name, code in sorted(loaded.items()):
        if name.startswith("calmline_") and name not in names:
            problems.append(
                f"features.conf: Asterisk at {where} has {name} ({code!r}) loaded but this config "
                f"does not enable it; {RELOAD_FIX}"
            )
    notes = [] if problems else [
        f"Asterisk at {where} has all {len(expected)} calmline features loaded with the configured codes"
    ]
    return problems, notes


def _check_mail(cfg: Config) -> tuple[list[str], list[str]]:
    if not (cfg.end.enabled and cfg.mail.enabled):
        return [], []
    from calmline.callback.mail import check_templates

    problems = check_templates(cfg.mail)
    if cfg.mail.password_env and cfg.mail.password_env not in os.environ:
        problems.append(
            f"mail.password_env: {cfg.mail.password_env} is not set in this environment; "
            f"set it where calmline runs (e.g. the systemd unit's Environment=), or remove the key"
        )
    return problems, ([] if problems else ["mail templates and credentials are usable"])


def _check_alert(cfg: Config) -> tuple[list[str], list[str]]:
    """Webhooks are signed with the secret in `[alert] secret_env`: without it none goes out."""
    a = cfg.alert
    if not (a.enabled and a.urls):
        return [], []
    if a.resolved_secret() is None:
        return [
            f"alert.secret_env: {a.secret_env} is not set in this environment, so no webhook can be "
            f"signed (they wait in the outbox); set it where calmline runs (e.g. the systemd unit's "
            f"Environment=) to the secret your receivers check"
        ], []
    return [], [f"alert webhooks to {len(a.urls)} URL(s) can be signed"]


def _check_store(cfg: Config) -> tuple[list[str], list[str]]:
    """The store the service will write: its password at hand, reachable with it, and not
    newer than this calmline. Nothing is created or migrated here; `calmline serve` does that."""
    from calmline.store import DATABASE_ERRORS, Database, reason
    from calmline.store.schema import VERSION

    store = cfg.store
    if store.password_env and store.password_env not in os.environ:
        return [f"store.password_env: {store.password_env} is not set in this environment; set it where "
                f"calmline runs (e.g. the systemd unit's Environment=) to the database user's password"], []
    db = Database(store.url, password=store.resolved_password())
    if db.path is not None and not db.path.exists():
        parent = db.path.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK | os.X_OK):
            return [f"store.url: {db.path} does not exist and {parent} is not writable; "
                    f"{db.fix_hint()}"], []
        return [], [f"store {db.where} will be created by `calmline serve`"]
    try:
        conn = db.connect()
    except DATABASE_ERRORS as exc:
        return [f"store.url: cannot open {db.where}: {reason(exc)}; {db.fix_hint()}"], []
    try:
        try:
            version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0
        except DATABASE_ERRORS:
            version = 0  # an empty database: `calmline serve` creates the schema
    finally:
        conn.close()
    if version > VERSION:
        return [f"store.url: {db.where} has schema version {version}, newer than this calmline knows "
                f"({VERSION}); upgrade calmline, or point store.url at another store"], []
    return [], [f"store {db.where} opens (schema version {version} of {VERSION})"]


# Descriptors the service holds besides its sessions: the store, the listener, stdio, the mail.
FD_RESERVE = 64


def _check_server_limits(cfg: Config) -> tuple[list[str], list[str]]:
    """An open bind without an allowlist, and max_sessions against the open-file limit
    (`calmline serve` raises its soft limit to the hard one, so the hard one counts)."""
    problems: list[str] = []
    notes: list[str] = []
    exposure = cfg.server.exposure_warning()
    if exposure:
        problems.append(exposure)
    try:
        import resource
    except ImportError:
        return problems, notes
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = cfg.server.max_sessions + FD_RESERVE
    if hard != resource.RLIM_INFINITY and hard < need:
        problems.append(
            f"server.max_sessions: {cfg.server.max_sessions} sessions need about {need} open files, "
            f"but the hard limit here is {hard} (ulimit -Hn); raise it (LimitNOFILE= in the "
            f"service unit) or lower server.max_sessions to {max(1, hard - FD_RESERVE)}"
        )
    else:
        notes.append(f"server.max_sessions ({cfg.server.max_sessions}) fits the open-file limit "
                     f"({'unlimited' if hard == resource.RLIM_INFINITY else hard})")
    return problems, notes


SETINTERFACEVAR_FIX = (
    "add `setinterfacevar = yes` to that queue in queues.conf and run `queue reload all`: "
    "without it Asterisk sets no MEMBERINTERFACE, and the cool-down cannot tell which agent to pause"
)


def queues_without_interfacevar(categories: dict[str, list[str]]) -> list[str]:
    """Queues of a queues.conf (as GetConfig gives it) that lack `setinterfacevar = yes`."""
    from calmline.config import _truthy

    missing = []
    for name, lines in categories.items():
        if name == "general":
            continue
        values = {k.strip().lower(): v.strip() for k, _, v in (line.partition("=") for line in lines)}
        if not _truthy(values.get("setinterfacevar", "")):
            missing.append(name)
    return missing


def _check_ami_config(cfg: Config) -> tuple[list[str], list[str]]:
    """Log in as [ami] says, and (for the cool-down) read queues.conf for setinterfacevar."""
    from calmline import ami

    a = cfg.ami
    where = f"{a.host}:{a.port}"
    secret = a.resolved_secret()
    if secret is None:
        return [f"ami.secret_env: {a.secret_env} is not set in this environment, so calmline cannot "
                f"log in to AMI at {where}; set it where calmline runs (e.g. the unit's Environment=)"], []

    def work(session: ami.Session) -> dict[str, list[str]] | str:
        try:
            return session.get_config("queues.conf")
        except ami.AMIUnavailable as exc:
            return str(exc)

    try:
        queues = ami.run(a, secret, work)
    except ami.AMIUnavailable as exc:
        return [f"ami.host/ami.port/ami.username: {exc}; check manager.conf ([general] enabled, "
                f"port, bindaddr; the user's secret, permit/deny) and [ami] in the config"], []
    notes = [f"AMI login to {where} as {a.username!r} works"]
    if not cfg.cooldown.enabled:
        return [], notes
    if isinstance(queues, str):
        return [], notes + [
            f"WARNING: could not read queues.conf over AMI ({queues}); the cool-down needs "
            f"`setinterfacevar = yes` in every queue your agents answer"]
    missing = queues_without_interfacevar(queues)
    problems = [f"cooldown.enabled: queue {name!r} has no `setinterfacevar = yes`; {SETINTERFACEVAR_FIX}"
                for name in missing]
    if not problems:
        notes.append(f"every queue in queues.conf has setinterfacevar = yes ({len(queues) - ('general' in queues)} queues), "
                     f"so the cool-down can find the agent")
    return problems, notes


def run_checks(cfg: Config, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """Return (problems, notes) for everything that can be checked from here."""
    problems: list[str] = []
    notes: list[str] = ["config is valid"]

    def add(result: tuple[list[str], list[str]]) -> None:
        problems.extend(result[0])
        notes.extend(result[1])

    add(_check_server_limits(cfg))
    add(_check_store(cfg))
    add(_check_prompts(cfg))
    add(_check_mail(cfg))
    add(_check_alert(cfg))
    features_conf = getattr(args, "features_conf", None) or cfg.dialplan.existing_features_conf
    if features_conf is not None:
        add(_check_features_conf(cfg, Path(features_conf)))
    if not getattr(args, "no_port", False):
        add(_check_port(cfg))
    ami_host = getattr(args, "ami_host", None)
    if ami_host:
        secret = getattr(args, "ami_secret", None)
        if secret is None:
            secret = os.environ.get(AMI_SECRET_ENV)
        add(_check_ami(cfg, ami_host, getattr(args, "ami_port", 5038), getattr(args, "ami_user", None), secret))
    if cfg.ami.username:
        add(_check_ami_config(cfg))
    elif cfg.cooldown.enabled:
        problems.append("ami.username: the cool-down needs AMI; set [ami] username and its secret")
    return problems, notes
