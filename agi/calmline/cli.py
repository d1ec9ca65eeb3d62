"""The `calmline` command: serve, check, dialplan, prompts, outbox, store, audit, report, console,
install-unit.

Exit statuses follow click's convention: 0 success, 1 a check or operation failed,
2 a usage or configuration error (with one line per problem, naming the key and the fix).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import unicodedata
from pathlib import Path

from calmline import __version__
from calmline import config as config_module
from calmline.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _load(args: argparse.Namespace) -> tuple[config_module.Config, str]:
    cfg, source = config_module.load(args.config)
    overrides = {}
    if getattr(args, "host", None):
        overrides["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides["port"] = args.port
    if overrides:
        data = cfg.model_dump()
        data["server"].update(overrides)
        try:
            cfg = config_module.Config.model_validate(data)
        except config_module.ValidationError as exc:
            raise ConfigError(config_module._problems("command line", exc)) from None
    return cfg, source


def cmd_serve(args: argparse.Namespace) -> int:
    from calmline.service import serve

    cfg, source = _load(args)
    runner = asyncio.run
    if not args.no_uvloop:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
    runner(serve(cfg, source, load=lambda: _load(args)))
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from calmline.admin.check import run_checks

    cfg, source = _load(args)
    problems, notes = run_checks(cfg, args)
    for note in notes:
        print(f"ok: {note}")
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"calmline check: {len(problems)} problem(s) in {source}", file=sys.stderr)
        return EXIT_FAILED
    print(f"calmline check: {source} is fine")
    return EXIT_OK


def _store(cfg: config_module.Config):
    """The store to read, or None once the admin has been told why there is none."""
    from calmline.store import Database

    db = Database(cfg.store.url, password=cfg.store.resolved_password())
    if db.path is not None and not db.path.is_file():
        print(f"calmline: no store at {db.path} (store.url): nothing has been recorded there; "
              "check the URL, or whether `calmline serve` runs with this config", file=sys.stderr)
        return None
    try:
        db.open_checked()
    except ConfigError as exc:
        print(f"calmline: cannot read the store {db.where} ({exc})", file=sys.stderr)
        return None
    return db


def _unreadable(db, exc: Exception) -> int:
    from calmline.store import reason

    print(f"calmline: cannot read the store {db.where} (store.url): {reason(exc)}", file=sys.stderr)
    return EXIT_FAILED


def cmd_audit(args: argparse.Namespace) -> int:
    from calmline.audit.store import read_events
    from calmline.store import DATABASE_ERRORS

    cfg, _source = _load(args)
    db = _store(cfg)
    if db is None:
        return EXIT_FAILED
    try:
        events = read_events(db, linkedid=args.linkedid, limit=args.limit + 1)
    except DATABASE_ERRORS as exc:
        return _unreadable(db, exc)
    for line in _audit_lines(events, args.limit, args.linkedid):
        print(line)
    return EXIT_OK


def _os_user() -> dict[str, str]:
    """Who runs this command, as the trail records it: the OS user, and sudo's caller if any."""
    import os
    import pwd

    try:
        who = {"by": pwd.getpwuid(os.geteuid()).pw_name}
    except KeyError:
        who = {"by": f"uid {os.geteuid()}"}
    if os.environ.get("SUDO_USER"):
        who["sudo_user"] = os.environ["SUDO_USER"]
    return who


def cmd_audit_prune(args: argparse.Namespace) -> int:
    """Delete events before --before (and sent or failed mail), never pending mail; audit it."""
    from datetime import datetime, timezone

    from calmline.audit import retention
    from calmline.audit.store import AuditStore, stamp
    from calmline.store import DATABASE_ERRORS

    cfg, _source = _load(args)
    before = _cut(args.before)
    if before > datetime.now(timezone.utc):
        raise ConfigError([f"--before {retention.as_ts(before)} is in the future; "
                           "give the day (or time) before which events go, e.g. 2026-01-01"])
    db = _store(cfg)
    if db is None:
        return EXIT_FAILED
    try:
        pruned = retention.prune(db, before)
    except DATABASE_ERRORS as exc:
        return _unreadable(db, exc)
    store = AuditStore(db)
    store.open()
    store.submit(stamp("info", {"event": "audit_pruned", **_os_user(), **pruned.fields()}))
    recorded = store.close()
    print(f"pruned {pruned.events} event(s) and {pruned.outbox} sent or failed mail(s) from before "
          f"{pruned.before}; kept {pruned.pending_kept} pending callback mail(s)")
    if not recorded:
        print(f"calmline: the prune was not recorded in the audit trail of {db.where}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cut(text: str):
    """--before: a date (midnight UTC) or an ISO time; a time without offset is UTC."""
    from datetime import date, datetime, time, timezone

    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time.min, timezone.utc)
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError([
            f"--before: {text!r} is not a date; write 2026-11-01 or 2026-11-01T09:30:00+01:00"]) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def _audit_lines(events: list[dict], limit: int, linkedid: str | None) -> list[str]:
    """The events as JSON lines a terminal shows as they are; says on stderr what --limit cut.

    `events` holds up to `limit + 1`: the newest (oldest first), or a call's first ones.
    """
    if len(events) > limit:
        events = events[:limit] if linkedid else events[-limit:]
        which = f"the first {limit} events of call {linkedid}" if linkedid else f"the newest {limit} events"
        print(f"calmline: showing {which}; there are more (pass --limit with a larger number)",
              file=sys.stderr)
    return [_visible(json.dumps(event, ensure_ascii=False)) for event in events]


_INVISIBLE = frozenset(("Cc", "Cf", "Cs", "Zl", "Zp"))


def _visible(line: str) -> str:
    """A JSON line with every control and format character (bidi overrides such as U+202E,
    zero-width and tag characters) written as its JSON escape, so what an audit line shows
    on a terminal is what it holds. json.dumps has already escaped C0 controls."""
    if line.isascii():
        return line.replace("\x7f", "\\u007f")
    out = []
    for ch in line:
        if unicodedata.category(ch) not in _INVISIBLE:
            out.append(ch)
        elif ord(ch) > 0xFFFF:  # JSON spells an astral character as its UTF-16 pair
            high, low = divmod(ord(ch) - 0x10000, 0x400)
            out.append(f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04x}")
        else:
            out.append(f"\\u{ord(ch):04x}")
    return "".join(out)


def cmd_report(args: argparse.Namespace) -> int:
    """The supervisor's HTML report of the last --days days, from the store."""
    from datetime import datetime, timedelta, timezone

    from calmline.audit.report import build_report, render_html
    from calmline.files import PRIVATE, write_atomically
    from calmline.store import DATABASE_ERRORS

    cfg, _source = _load(args)
    db = _store(cfg)
    if db is None:
        return EXIT_FAILED
    now = datetime.now(timezone.utc)
    since = datetime.combine(now.date() - timedelta(days=args.days - 1), datetime.min.time(), timezone.utc)
    try:
        report = build_report(db, since=since, until=None, now=now, console_url=cfg.console.url)
    except DATABASE_ERRORS as exc:
        return _unreadable(db, exc)
    output = args.output
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(output, render_html(report), PRIVATE)  # caller data: 0600
    except OSError as exc:
        print(f"calmline: cannot write the report {output}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {output}: {report.call_count} call(s), {report.escalations} escalation(s) "
          f"in the last {args.days} day(s)")
    return EXIT_OK


def cmd_console(args: argparse.Namespace) -> int:
    """Serve the console, or add or remove a supervisor's account (recorded in the trail)."""
    from calmline.audit.store import AuditStore, stamp
    from calmline.console.accounts import AccountError, Accounts
    from calmline.store import Database

    cfg, _source = _load(args)
    db = Database(cfg.store.url, password=cfg.store.resolved_password())
    db.open_checked()
    command = getattr(args, "console_command", None)
    if command is None:
        from calmline.console.serve import run

        run(cfg, db)
        return EXIT_OK
    accounts = Accounts(db)
    if command == "add-user":
        if not args.password_stdin:
            raise ConfigError(["console add-user: pass --password-stdin and the password on stdin "
                               "(it never goes on the command line, where `ps` shows it)"])
        password = sys.stdin.readline().rstrip("\r\n")
        try:
            done = accounts.add(args.name, password, replace=args.replace)
        except AccountError as exc:
            raise ConfigError([f"console add-user: {exc}"]) from None
        if not done:
            print(f"calmline: the account {args.name!r} exists; pass --replace to set a new password",
                  file=sys.stderr)
            return EXIT_FAILED
        event, said = "console_user_added", f"account {args.name} {'updated' if args.replace else 'added'}"
    elif command == "remove-user":
        if not accounts.remove(args.name):
            print(f"calmline: no account {args.name!r}", file=sys.stderr)
            return EXIT_FAILED
        event, said = "console_user_removed", f"account {args.name} removed; its logins end now"
    else:
        for name in accounts.names():
            print(name)
        return EXIT_OK
    store = AuditStore(db)
    store.open()
    store.submit(stamp("info", {"event": event, "supervisor": args.name, **_os_user()}))
    store.close()
    print(said)
    return EXIT_OK


def cmd_dialplan(args: argparse.Namespace) -> int:
    from calmline.admin import dialplan

    cfg, source = _load(args)
    files = dialplan.render(cfg, source)
    if args.output_dir is None:
        for name, text in files.items():
            print(f";;; ---- {name} ----")
            print(text, end="")
        return EXIT_OK
    try:
        written = dialplan.write(files, args.output_dir)
    except OSError as exc:
        print(f"calmline: cannot write to {args.output_dir} (--output-dir): {exc}", file=sys.stderr)
        return EXIT_FAILED
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def cmd_prompts(args: argparse.Namespace) -> int:
    from calmline.admin import prompts

    cfg, _source = _load(args)
    languages = args.language or list(cfg.prompts.languages)
    if args.prompts_command == "list":
        for language, names in prompts.shipped_prompts().items():
            for name in names:
                print(f"{language}\t{name}")
        return EXIT_OK
    dest = args.dest or cfg.prompts.sounds_dir
    result = prompts.install(dest, languages, force=args.force)
    for path in result.copied:
        print(f"installed {path}")
    for path in result.skipped:
        print(f"kept your own recording {path} (use --force to replace it)")
    print(f"{len(result.copied)} installed, {len(result.kept)} already up to date, "
          f"{len(result.skipped)} of your own kept")
    return EXIT_OK


def cmd_outbox(args: argparse.Namespace) -> int:
    from calmline.audit.trail import configure_console
    from calmline.callback.mail import OutboxWorker, outbox_report
    from calmline.callback.outbox import Outbox
    from calmline.callback.webhooks import WebhookOutbox, WebhookWorker, webhooks_report
    from calmline.store import Database

    cfg, _source = _load(args)
    db = Database(cfg.store.url, password=cfg.store.resolved_password())
    if db.path is not None and not db.path.is_file():
        print(f"outbox is empty (no store at {db.path} yet; store.url)")
        return EXIT_OK
    configure_console()
    failing = 0
    with Outbox(db) as outbox, WebhookOutbox(db) as hooks:
        if args.retry_now:
            count = outbox.retry_now()
            sent, failed = OutboxWorker(outbox, cfg.mail).deliver_due_now()
            print(f"retried {count} message(s): {sent} sent, {failed} still failing")
            if count := hooks.retry_now():
                posted, refused = WebhookWorker(hooks, cfg.alert).deliver_due_now()
                print(f"retried {count} webhook(s): {posted} delivered, {refused} still failing")
                failed += refused
            failing = failed
        print(outbox_report(outbox))
        if listing := webhooks_report(hooks):
            print()
            print(listing)
        return EXIT_FAILED if failing else EXIT_OK


def cmd_store_migrate(args: argparse.Namespace) -> int:
    """Copy a store into another (SQLite into PostgreSQL): idempotent and resumable."""
    import os

    from calmline.store import DATABASE_ERRORS, reason
    from calmline.store.copy import copy_store

    password = os.environ.get(args.password_env) if args.password_env else None
    if args.password_env and password is None:
        raise ConfigError([f"--password-env: the environment variable {args.password_env} is not set"])
    source = _named_store("--from", args.source, password)
    target = _named_store("--to", args.target, password)
    if source.path is not None and not source.path.is_file():
        raise ConfigError([f"--from: no store at {source.path}; name the SQLite file calmline serve used "
                           "(its store.url), e.g. sqlite:////var/lib/calmline/calmline.sqlite3"])
    if source.url == target.url or (source.path is not None and source.path == target.path):
        raise ConfigError(["--from and --to name the same store; --to is the store to copy into"])
    started = time.monotonic()
    try:
        copied = copy_store(source, target, batch=args.batch)
    except DATABASE_ERRORS as exc:
        print(f"calmline: the copy from {source.where} to {target.where} stopped: {reason(exc)}; "
              "run the same command again to go on from where it stopped", file=sys.stderr)
        return EXIT_FAILED
    rows = ", ".join(f"{c.rows:,} {c.table} rows" for c in copied)
    print(f"copied {source.where} into {target.where}: {rows} offered in {time.monotonic() - started:.1f}s "
          "(rows already there were kept as they were)")
    return EXIT_OK


def _named_store(option: str, url: str, password: str | None):
    from calmline.store import Database

    try:
        return Database(url, password=password)
    except ConfigError as exc:
        raise ConfigError([p.replace("store.url:", f"{option}:", 1) for p in exc.problems]) from None


def cmd_install_unit(args: argparse.Namespace) -> int:
    """Write calmline.service for this installation; say what would stop it from starting."""
    from calmline.admin import unit

    exec_start = args.exec_start or unit.this_calmline()
    config = args.config.absolute() if args.config else unit.DEFAULT_CONFIG
    text = unit.render(exec_start=exec_start, config=config, user=args.user)
    if str(args.output_dir) == "-":
        print(text, end="")
        return EXIT_OK
    try:
        path = unit.write(text, args.output_dir)
    except OSError as exc:
        print(f"calmline: cannot write to {args.output_dir} (--output-dir): {exc.strerror or exc}; "
              "run it as root, or pass --output-dir - to print the unit", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {path}")
    for warning in unit.warnings(exec_start, config, args.user):
        print(f"calmline: note: {warning}", file=sys.stderr)
    print("next: systemctl daemon-reload && systemctl enable --now calmline")
    return EXIT_OK


def _positive_days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if not 1 <= days <= 3660:
        raise argparse.ArgumentTypeError("--days must be between 1 and 3660")
    return days


def _positive_batch(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of rows from 1 to 100000")
    return int(text)


def _positive_limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of events") from None
    if limit < 1:
        raise argparse.ArgumentTypeError("--limit must be at least 1")
    return limit


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="calmline", description="Keypad codes for agents facing abusive callers, over FastAGI."
    )
    parser.add_argument("--version", action="version", version=f"calmline {__version__}")
    parser.add_argument(
        "-c", "--config", type=Path, default=None,
        help="config file (default: config/calmline.toml if it exists, else embedded defaults)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the FastAGI service")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check", help="validate config, codes, prompts, the port and (with AMI) Asterisk")
    check.add_argument("--no-port", action="store_true", help="do not probe the service port")
    check.add_argument("--ami-host", default=None, help="ask this Asterisk's AMI whether the features are loaded")
    check.add_argument("--ami-port", type=int, default=5038)
    check.add_argument("--ami-user", default=None)
    check.add_argument("--ami-secret", default=None, help="or set CALMLINE_AMI_SECRET")
    check.add_argument("--features-conf", type=Path, default=None,
                       help="Asterisk's features.conf, checked for codes that clash with calmline's "
                            "(default: dialplan.existing_features_conf)")
    check.set_defaults(func=cmd_check)

    dp = sub.add_parser("dialplan", help="render the features.conf and extensions.conf snippets")
    dp.add_argument("--output-dir", type=Path, default=None,
                    help="write calmline-features.conf and calmline-extensions.conf here (default: print)")
    dp.set_defaults(func=cmd_dialplan)

    pr = sub.add_parser("prompts", help="install the shipped prompts where Asterisk looks for sounds")
    pr_sub = pr.add_subparsers(dest="prompts_command", required=True)
    pr_install = pr_sub.add_parser("install", help="copy prompts to DEST/<lang>/calmline/")
    pr_install.add_argument("--dest", type=Path, default=None, help="sounds directory (default: prompts.sounds_dir)")
    pr_install.add_argument("--language", action="append", help="language (repeatable; default: prompts.languages)")
    pr_install.add_argument("--force", action="store_true", help="replace recordings that differ from ours")
    pr_list = pr_sub.add_parser("list", help="list the shipped prompts")
    for p in (pr_install, pr_list):
        p.set_defaults(func=cmd_prompts, language=None, dest=None, force=False)
    pr_install.set_defaults(func=cmd_prompts)

    ob = sub.add_parser("outbox", help="list callback mails and live-alert webhooks pending or failed; "
                                         "--retry-now sends them now")
    ob.add_argument("--retry-now", action="store_true", help="send pending and failed messages now")
    ob.set_defaults(func=cmd_outbox)

    iu = sub.add_parser("install-unit", help="write the systemd unit that runs `calmline serve` "
                                "with -c's config (default /etc/calmline/calmline.toml)")
    iu.add_argument("--output-dir", type=Path, default=Path("/etc/systemd/system"),
                    help="where to write calmline.service (default /etc/systemd/system); '-' prints it")
    iu.add_argument("--user", default="calmline", help="the unprivileged user it runs as (default calmline)")
    iu.add_argument("--exec-start", default=None,
                    help="the command that runs calmline (default: this installation's)")
    iu.set_defaults(func=cmd_install_unit)

    st = sub.add_parser("store", help="manage the store: `store migrate` copies one into another")
    st_sub = st.add_subparsers(dest="store_command", required=True)
    mig = st_sub.add_parser(
        "migrate", help="copy the audit trail and the outbox from one store into another "
                        "(e.g. SQLite into PostgreSQL); idempotent, and resumes where it stopped")
    mig.add_argument("--from", dest="source", required=True, metavar="URL",
                     help="the store to copy, e.g. sqlite:////var/lib/calmline/calmline.sqlite3")
    mig.add_argument("--to", dest="target", required=True, metavar="URL",
                     help="the store to copy into, e.g. postgresql://calmline@db.example:5432/calmline")
    mig.add_argument("--password-env", metavar="VAR", default=None,
                     help="read the PostgreSQL password from this environment variable")
    mig.add_argument("--batch", type=_positive_batch, default=2000, metavar="N",
                     help="rows per transaction (default 2000)")
    mig.set_defaults(func=cmd_store_migrate)

    audit = sub.add_parser("audit", help="print audit events as JSON lines")
    audit.add_argument("--linkedid", metavar="ID", help="only this call")
    audit.add_argument("--limit", metavar="N", type=_positive_limit, default=200,
                       help="at most this many events (default 200): the newest, or with --linkedid the "
                            "call's first; stderr says when there are more")
    audit.set_defaults(func=cmd_audit)
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="[prune]", title="commands")
    prune = audit_sub.add_parser(
        "prune", help="delete events before a date, and sent or failed mail; pending mail stays")
    prune.add_argument("--before", required=True, metavar="DATE",
                       help="2026-11-01 (midnight UTC) or an ISO time with offset; events at the cut stay")
    prune.set_defaults(func=cmd_audit_prune)

    rep = sub.add_parser("report", help="write the supervisors' HTML report of escalations from the audit trail")
    rep.add_argument("--days", type=_positive_days, default=30, help="how many days back, today included (default 30)")
    rep.add_argument("--output", type=Path, default=Path("calmline-report.html"),
                     help="the HTML file to write (default calmline-report.html)")
    rep.set_defaults(func=cmd_report)

    con = sub.add_parser("console", help="serve the supervisors' web console on console.host/port; "
                                         "add-user / remove-user manage its accounts")
    con.set_defaults(func=cmd_console)
    con_sub = con.add_subparsers(dest="console_command", metavar="[add-user|remove-user|users]", title="commands")
    add = con_sub.add_parser("add-user", help="create a supervisor's account (password read from stdin)")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    add.add_argument("--replace", action="store_true", help="set a new password for an existing account")
    remove = con_sub.add_parser("remove-user", help="remove an account; its open sessions end")
    remove.add_argument("name")
    con_sub.add_parser("users", help="list the accounts")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"calmline: {problem}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
