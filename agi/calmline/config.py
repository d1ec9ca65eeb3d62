"""Configuration: one TOML file, validated by pydantic models into one frozen `Config`.

Every error names the file, the key (`warn.stages[1].prompt`) and what is allowed, so an
admin can fix it without reading code. Relative paths are resolved against the directory
the service runs in.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    model_validator,
)

from calmline.errors import CalmlineError, ConfigError

DEFAULT_PATH = Path("config/calmline.toml")

_DTMF = re.compile(r"^[0-9*#A-D]{1,8}$")
_PROMPT = re.compile(r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$")
_CONTEXT = re.compile(r"^[A-Za-z0-9_-]{1,79}$")
_VARIABLE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_DIAL_FORBIDDEN = re.compile(r"[,|$\{\}\[\]\"'\\;\s&()]")
_EMAIL = re.compile(r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+$")
_HEADERISH = re.compile(r"[\r\n\x00]")


def _dtmf(value: str) -> str:
    if not _DTMF.match(value):
        raise ValueError("a DTMF code is 1-8 of 0-9 * # A-D, e.g. \"*1\"")
    return value


def _prompt(value: str) -> str:
    if not _PROMPT.match(value) or ".." in value:
        raise ValueError(
            "a prompt is a sound name without extension, relative to Asterisk's sounds "
            "directory, made of letters, digits, _ and - (e.g. \"calmline/warn-1\")"
        )
    return value


def _context(value: str) -> str:
    if not _CONTEXT.match(value):
        raise ValueError("a dialplan context name is 1-79 of letters, digits, _ and -")
    return value


def _variable(value: str) -> str:
    if not _VARIABLE.match(value):
        raise ValueError("a channel variable name is upper-case letters, digits and _")
    return value


def _dial_target(value: str) -> str:
    if not value or _DIAL_FORBIDDEN.search(value):
        raise ValueError(
            "a dial target is one channel such as \"PJSIP/2001\" or \"Local/2001@from-internal\"; "
            "commas, pipes, quotes, spaces, ${...} and ; are not allowed (they would inject dialplan)"
        )
    if "/" not in value:
        raise ValueError("a dial target names its technology, e.g. \"PJSIP/2001\"")
    return value


_MOH_CLASS = re.compile(r"^[A-Za-z0-9_-]{0,79}$")
_EXTENSION_PREFIX = re.compile(r"^[0-9*#]{1,20}$")
_SERVICE_URL = re.compile(
    r"^(?P<scheme>h?agi)://(?P<host>[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?(?P<path>/[A-Za-z0-9._~/-]{0,200})?$"
)


def _moh_class(value: str) -> str:
    if not _MOH_CLASS.match(value):
        raise ValueError(
            "a music-on-hold class is a [section] name of musiconhold.conf: letters, digits, _ "
            "and - (e.g. \"default\"; see `moh show classes`), or \"\" for none"
        )
    return value


def _extension_prefix(value: str) -> str:
    if not _EXTENSION_PREFIX.match(value):
        raise ValueError("an extension prefix is 1-20 of the keys 0-9 * # (e.g. \"*78\")")
    return value


def _service_url(value: str) -> str:
    match = _SERVICE_URL.match(value)
    if not match or (match["port"] and not 1 <= int(match["port"]) <= 65535):
        raise ValueError(
            "the URL Asterisk reaches calmline at: agi://HOST[:PORT][/PATH] or hagi://DOMAIN, "
            "with HOST a name or address (e.g. \"agi://127.0.0.1:4573\"); no commas, spaces, "
            "quotes or ${...}: it is written into features.conf and the dialplan"
        )
    return value


def _email(value: str) -> str:
    if not _EMAIL.match(value):
        raise ValueError("an e-mail address like \"team@example.com\"")
    return value


_LABEL = re.compile(r"^[A-Za-z0-9 .:'()/_+-]{1,80}$")


def _label(value: str) -> str:
    if not _LABEL.match(value) or value.strip() != value:
        raise ValueError(
            "a label is 1-80 letters, digits, spaces and . : ' ( ) / _ + - "
            "(no commas, semicolons, quotes, $, {} or |: Asterisk would read them as dialplan)"
        )
    return value


def _truthy(value: str) -> bool:
    """Asterisk's ast_true(): yes, true, y, t, 1 and on, in any case."""
    return value.strip().lower() in {"yes", "true", "y", "t", "1", "on"}


def _one_line(value: str) -> str:
    if _HEADERISH.search(value):
        raise ValueError("must be one line (no line breaks)")
    return value


DTMFCode = Annotated[str, AfterValidator(_dtmf)]
Prompt = Annotated[str, AfterValidator(_prompt)]
Context = Annotated[str, AfterValidator(_context)]
Variable = Annotated[str, AfterValidator(_variable)]
DialTarget = Annotated[str, AfterValidator(_dial_target)]
Email = Annotated[str, AfterValidator(_email)]
OneLine = Annotated[str, AfterValidator(_one_line)]
Label = Annotated[str, AfterValidator(_label)]


class Section(BaseModel):
    """Unknown keys are errors: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: StrictInt = Field(4573, ge=0, le=65535, description="0 picks a free port (for tests)")
    max_sessions: StrictInt = Field(500, ge=1, le=100_000)
    # None: one peer may hold every slot (one Asterisk). Set it when several hosts connect.
    max_sessions_per_peer: StrictInt | None = Field(None, ge=1, le=100_000)
    max_line_bytes: StrictInt = Field(16384, ge=1024, le=1_048_576)
    environment_timeout: StrictFloat = Field(5.0, gt=0, le=300)
    answer_timeout: StrictFloat = Field(300.0, gt=0, le=3600)
    shutdown_grace: StrictFloat = Field(30.0, ge=0, le=3600)
    allow: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_allow(self) -> ServerConfig:
        for i, entry in enumerate(self.allow):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(
                    f"allow[{i}] = {entry!r} is not an IP address or network (e.g. \"127.0.0.1\", \"10.0.0.0/24\")"
                ) from None
        return self

    def allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(entry, strict=False) for entry in self.allow]

    def exposure_warning(self) -> str | None:
        """A warning when any host on the network may connect: a wildcard bind, no allowlist."""
        try:
            wildcard = self.host == "" or ipaddress.ip_address(self.host).is_unspecified
        except ValueError:
            wildcard = False
        if not wildcard or self.allow:
            return None
        return (
            f"server.host = {self.host!r} with an empty server.allow: every host that can reach "
            f"port {self.port} can run calmline's actions, which mails an address of its choosing "
            f"and forges escalations in the audit trail; list your Asterisk hosts in server.allow "
            f"(e.g. allow = [\"10.0.0.5\"]) or bind to one address"
        )


class StoreConfig(Section):
    """The one store of the audit trail and the callback outbox."""

    url: str = "sqlite:///var/calmline.sqlite3"
    password_env: Variable | None = None

    @model_validator(mode="after")
    def _check_url(self) -> StoreConfig:
        from calmline.store import Database

        try:
            Database(self.url)
        except CalmlineError as exc:
            raise ValueError(str(exc).removeprefix("store.url: ")) from None
        return self

    def resolved_password(self) -> str | None:
        return os.environ.get(self.password_env) if self.password_env else None


class AuditConfig(Section):
    stdout: StrictBool = True
    commit_timeout: StrictFloat = Field(5.0, gt=0, le=300)
    # None keeps every event (as before); otherwise the service prunes older ones hourly.
    keep_days: StrictInt | None = Field(None, ge=1, le=36600)


class WarnStage(Section):
    prompt: Prompt


class WarnConfig(Section):
    enabled: StrictBool = True
    code: DTMFCode = "*1"
    stages: list[WarnStage] = Field(
        default_factory=lambda: [
            WarnStage(prompt="calmline/warn-1"),
            WarnStage(prompt="calmline/warn-final"),
        ],
        min_length=1,
        max_length=9,
    )
    after_last: Literal["repeat", "end"] = "repeat"
    counter_variable: Variable = "CALMLINE_WARNINGS"


class TransferTarget(Section):
    """Where a transferred caller rings, and where it goes when nobody answers."""

    code: DTMFCode
    dial: DialTarget
    ring_seconds: StrictInt = Field(20, ge=5, le=300)
    prompt: Prompt
    reason: Label
    fallback: Literal["queue", "dial", "hangup"] = "queue"
    fallback_queue: Context = "support"
    fallback_dial: DialTarget | None = None
    whisper: Prompt | None = None


class ColleagueKeyedConfig(Section):
    enabled: StrictBool = True
    code: DTMFCode = "*5"
    prompt: Prompt = "calmline/enter-extension"
    invalid_prompt: Prompt = "calmline/extension-invalid"
    pattern: str = r"^[1-9][0-9]{1,5}$"
    dial_template: str = "PJSIP/{ext}"
    timeout_seconds: StrictInt = Field(6, ge=1, le=60)
    max_digits: StrictInt = Field(6, ge=1, le=20)

    @model_validator(mode="after")
    def _check(self) -> ColleagueKeyedConfig:
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
        if "{ext}" not in self.dial_template:
            raise ValueError("dial_template must contain {ext}, e.g. \"PJSIP/{ext}\"")
        _dial_target(self.dial_template.replace("{ext}", "100"))
        return self


class TransferConfig(Section):
    enabled: StrictBool = True
    context: Context = "calmline-transfer"
    caller_id_prefix: StrictBool = True
    supervisor: TransferTarget = TransferTarget(
        code="*3",
        dial="Local/supervisor@calmline-example-targets",
        prompt="calmline/transfer-supervisor",
        reason="abusive caller",
        whisper="calmline/whisper-supervisor",
    )
    colleague: TransferTarget = TransferTarget(
        code="*4",
        dial="Local/colleague@calmline-example-targets",
        prompt="calmline/transfer-colleague",
        reason="caller needs another agent",
    )
    colleague_keyed: ColleagueKeyedConfig = ColleagueKeyedConfig()


class EndConfig(Section):
    enabled: StrictBool = True
    code: DTMFCode = "*9"
    prompt: Prompt = "calmline/end"
    reason: Label = "abusive caller: call ended by agent"
    cdr_userfield: Label = "calmline:ended"


class MailConfig(Section):
    enabled: StrictBool = True
    host: str = "127.0.0.1"
    port: StrictInt = Field(25, ge=1, le=65535)
    starttls: StrictBool = False
    username: str | None = None
    password: str | None = None
    password_env: Variable | None = None
    timeout: StrictFloat = Field(10.0, gt=0, le=300)
    sender: Email = "calmline@localhost"
    team_address: Email = "team@localhost"
    subject: OneLine = "Callback request: {caller_number} ({reason})"
    caller_email_variable: Variable = "CALMLINE_CALLER_EMAIL"
    caller_subject: OneLine = "Following up on your call"
    caller_template: str = (
        "Hello {caller_name},\n\n"
        "Thank you for calling. We ended today's call, and we would still like to help.\n"
        "You can reply to this e-mail to continue in writing, or call us back whenever\n"
        "you are ready to talk it through.\n\n"
        "Kind regards,\nThe support team\n"
    )
    retry_initial_seconds: StrictFloat = Field(30.0, gt=0)
    retry_max_seconds: StrictFloat = Field(3600.0, gt=0)
    max_attempts: StrictInt = Field(48, ge=1)
    # How long a worker's claim on a mail lasts: another instance sends it after that if the
    # claiming one died.
    lease_seconds: StrictFloat = Field(60.0, ge=1, le=86400)

    @model_validator(mode="after")
    def _check_lease(self) -> MailConfig:
        if self.lease_seconds <= self.timeout:
            raise ValueError(
                f"lease_seconds ({self.lease_seconds:g}) must be longer than timeout ({self.timeout:g}): "
                f"a mail still being sent when its lease runs out is sent again by another instance; "
                f"raise mail.lease_seconds")
        return self

    def resolved_password(self) -> str | None:
        if self.password_env:
            return os.environ.get(self.password_env)
        return self.password


class ListenConfig(Section):
    """Summon a supervisor to listen in: ring `dial`, then ChanSpy on the agent in whisper mode."""

    enabled: StrictBool = True
    code: DTMFCode = "*6"
    dial: DialTarget = "Local/supervisor@calmline-example-targets"
    ring_seconds: StrictInt = Field(20, ge=5, le=300)
    context: Context = "calmline-listen"
    unanswered_prompt: Prompt = "calmline/listen-unanswered"


_WEBHOOK_URL = re.compile(r"^https?://[A-Za-z0-9.\[\]:-]{1,260}(/[\x21-\x7e]*)?$")


def _webhook_url(value: str) -> str:
    if not _WEBHOOK_URL.match(value) or "@" in value.split("/", 3)[2]:
        raise ValueError(
            "a webhook URL is http:// or https:// followed by a host and an optional path, "
            "without spaces or credentials (e.g. \"https://hooks.example.com/calmline\")"
        )
    return value


class AlertConfig(Section):
    """Live alert at the final warning, a transfer and an end: an AMI UserEvent and webhooks."""

    enabled: StrictBool = True
    user_event: StrictBool = True
    urls: list[Annotated[str, AfterValidator(_webhook_url)]] = Field(default_factory=list, max_length=20)
    secret_env: Variable = "CALMLINE_ALERT_SECRET"
    timeout: StrictFloat = Field(5.0, gt=0, le=60)
    retry_initial_seconds: StrictFloat = Field(5.0, gt=0)
    retry_max_seconds: StrictFloat = Field(3600.0, gt=0)
    max_attempts: StrictInt = Field(100, ge=1)

    def resolved_secret(self) -> str | None:
        return os.environ.get(self.secret_env) or None


class DialplanConfig(Section):
    agent_context: Context = "calmline-agent"
    moh_class: Annotated[str, AfterValidator(_moh_class)] | None = "default"
    admin_context: Context = "calmline-admin"
    admin_extension: Annotated[str, AfterValidator(_extension_prefix)] = "*78"
    example_context: Context = "calmline-example-inbound"
    example_queue: Context = "support"
    existing_features_conf: Path | None = None
    service_url: Annotated[str, AfterValidator(_service_url)] = "agi://127.0.0.1:4573"


class PromptsConfig(Section):
    sounds_dir: Path = Path("/var/lib/asterisk/sounds")
    languages: list[Annotated[str, AfterValidator(_context)]] = Field(
        default_factory=lambda: ["en"], min_length=1
    )


class MetricsConfig(Section):
    """Prometheus metrics at http://host:port/metrics; off unless asked for, loopback when on."""

    enabled: StrictBool = False
    host: str = "127.0.0.1"
    port: StrictInt = Field(9573, ge=0, le=65535, description="0 picks a free port (for tests)")


def _timezone(value: str) -> str:
    if value:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone this machine knows; write an IANA name "
                             "such as \"Europe/Berlin\", or \"\" for the machine's own") from None
    return value


def _console_url(value: str) -> str:
    if not re.match(r"^https?://[^\s\"'<>]+$", value):
        raise ValueError("the console's address as supervisors open it, e.g. \"https://calmline.example.com\"")
    return value.rstrip("/")


class ConsoleConfig(Section):
    """`calmline console`: the supervisors' web console, loopback unless asked otherwise."""

    host: str = "127.0.0.1"
    port: StrictInt = Field(8088, ge=0, le=65535, description="0 picks a free port (for tests)")
    # Times are shown in this zone (an IANA name); "" is the machine's own.
    timezone: Annotated[str, AfterValidator(_timezone)] = ""
    # Where supervisors reach the console (behind a proxy, say); the report links calls there.
    url: Annotated[str, AfterValidator(_console_url)] | None = None
    # The key that signs session cookies: from this environment variable, or else from
    # secret_file, which `calmline console` creates (0600) on first start.
    secret_env: Variable | None = None
    secret_file: Path = Path("var/calmline-console.key")
    session_hours: StrictFloat = Field(8.0, gt=0, le=24 * 30)
    secure_cookie: StrictBool = False  # set it when supervisors reach the console over HTTPS
    lockout_after: StrictInt = Field(5, ge=1, le=1000)
    lockout_minutes: StrictFloat = Field(15.0, gt=0, le=24 * 60)
    page_size: StrictInt = Field(50, ge=5, le=1000)

    def zone(self):
        """The zone times are shown in: the configured one, or the machine's."""
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        if self.timezone:
            return ZoneInfo(self.timezone)
        candidates = [os.environ.get("TZ", "").lstrip(":")]
        try:
            candidates.append(Path("/etc/timezone").read_text().strip())
        except OSError:
            pass
        try:
            candidates.append(str(Path("/etc/localtime").resolve()).partition("zoneinfo/")[2])
        except OSError:
            pass
        for name in candidates:
            if name:
                try:
                    return ZoneInfo(name)
                except (ZoneInfoNotFoundError, ValueError):
                    continue
        return ZoneInfo("UTC")
class AMIConfig(Section):
    """Asterisk's manager interface, for the cool-down's pause and unpause and for `calmline check`."""

    host: str = "127.0.0.1"
    port: StrictInt = Field(5038, ge=1, le=65535)
    # None: calmline does not use AMI (the cool-down needs it).
    username: Annotated[str, AfterValidator(_one_line)] | None = None
    secret_env: Variable = "CALMLINE_AMI_SECRET"
    timeout: StrictFloat = Field(5.0, gt=0, le=120)

    def resolved_secret(self) -> str | None:
        return os.environ.get(self.secret_env)


CooldownTrigger = Literal["end", "final_warning", "transfer"]


class CooldownConfig(Section):
    """Pause the agent in their queues after an abusive call, and unpause them when it is over."""

    enabled: StrictBool = False
    seconds: StrictInt = Field(120, ge=1, le=86_400)
    after: list[CooldownTrigger] = Field(default_factory=lambda: ["end"], min_length=1)
    # How often the store is asked for due unpauses, and how long AMI failures wait to retry.
    poll_seconds: StrictFloat = Field(1.0, gt=0, le=60)
    retry_seconds: StrictFloat = Field(5.0, gt=0, le=600)


class LookupConfig(Section):
    """The `lookup` request path: what calmline remembers of a caller, for the inbound route."""

    enabled: StrictBool = True
    days: StrictInt = Field(90, ge=1, le=36600)
    watch_at: StrictInt = Field(1, ge=1, le=1_000_000)
    flag_at: StrictInt = Field(3, ge=1, le=1_000_000)
    timeout_ms: StrictInt = Field(200, ge=1, le=10_000)
    senior_queue: Context = "support-senior"
    notice_prompt: Prompt = "calmline/caller-notice"

    @model_validator(mode="after")
    def _check_thresholds(self) -> LookupConfig:
        if self.watch_at > self.flag_at:
            raise ValueError(f"watch_at ({self.watch_at}) must not be above flag_at ({self.flag_at})")
        return self


# Keys earlier versions had, and what replaced them.
_MOVED = {
    ("audit", "database"): "store.url (one store for the audit trail and the outbox, e.g. "
                           "url = \"sqlite:///var/calmline.sqlite3\")",
    ("mail", "outbox"): "store.url (the outbox now lives in the same store as the audit trail)",
    ("audit", "synchronous"): "nothing: SQLite always commits with synchronous = FULL now; remove it",
}


class Config(Section):
    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    audit: AuditConfig = AuditConfig()
    warn: WarnConfig = WarnConfig()
    transfer: TransferConfig = TransferConfig()
    end: EndConfig = EndConfig()
    listen: ListenConfig = ListenConfig()
    alert: AlertConfig = AlertConfig()
    mail: MailConfig = MailConfig()
    dialplan: DialplanConfig = DialplanConfig()
    prompts: PromptsConfig = PromptsConfig()
    metrics: MetricsConfig = MetricsConfig()
    console: ConsoleConfig = ConsoleConfig()
    ami: AMIConfig = AMIConfig()
    cooldown: CooldownConfig = CooldownConfig()
    lookup: LookupConfig = LookupConfig()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: object) -> object:
        if isinstance(data, dict):
            moved = [f"{section}.{key}: this key moved to {where}"
                     for (section, key), where in _MOVED.items()
                     if isinstance(data.get(section), dict) and key in data[section]]
            if moved:
                raise ValueError("; ".join(moved))
        return data

    @model_validator(mode="after")
    def _check_after_last(self) -> Config:
        if self.warn.after_last == "end" and not self.end.enabled:
            raise ValueError("warn.after_last = \"end\" needs [end] enabled = true")
        if self.cooldown.enabled and not self.ami.username:
            raise ValueError(
                "cooldown.enabled = true needs [ami] username (a manager.conf user with "
                "`write = agent`), with its secret in the variable [ami] secret_env names")
        from calmline.actions.catalog import features  # imported here: the catalog reads Config

        codes = features(self)
        for a in codes:
            for b in codes:
                if a is not b and b.code.startswith(a.code):
                    same = "is the same as" if a.code == b.code else "is a prefix of"
                    raise ValueError(
                        f"{a.key} = {a.code!r} {same} {b.key} = {b.code!r}: Asterisk would fire "
                        f"the wrong feature or wait for more digits; give each action a code that "
                        f"does not start another (e.g. *1, *3, *9)"
                    )
        return self

    def prompt_names(self) -> list[str]:
        """Every prompt the enabled actions can play, in a stable order."""
        names = [stage.prompt for stage in self.warn.stages] if self.warn.enabled else []
        if self.transfer.enabled:
            for target in (self.transfer.supervisor, self.transfer.colleague):
                names.append(target.prompt)
                if target.whisper:
                    names.append(target.whisper)
            keyed = self.transfer.colleague_keyed
            if keyed.enabled:
                names += [keyed.prompt, keyed.invalid_prompt]
            names.append("calmline/transfer-unavailable")  # the rendered fallback plays it
        if self.end.enabled:
            names.append(self.end.prompt)
        if self.listen.enabled:
            names.append(self.listen.unanswered_prompt)
        names += ["calmline/record-intro", "calmline/record-saved"]  # the admin's recording line
        if self.lookup.enabled:
            names.append(self.lookup.notice_prompt)  # the rendered lookup route plays it
        return list(dict.fromkeys(names))


def _location(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in {"function-after", "function-wrap"} or "[" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


_STRICT_MESSAGES = {
    "int_type": "must be a whole number such as 4573, not true/false, text or a fraction",
    "float_type": "must be a number such as 5.0, not true/false or text",
    "bool_type": "must be true or false (without quotes)",
}


def _problems(source: str, exc: ValidationError) -> list[str]:
    lines = []
    for error in exc.errors():
        key = _location(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling, or remove it)"
        elif error["type"] == "missing":
            message = "required key is missing"
        elif error["type"] in _STRICT_MESSAGES:
            message = _STRICT_MESSAGES[error["type"]]
        shown = error.get("input")
        value = "" if error["type"] in {"missing", "extra_forbidden"} or isinstance(shown, dict) else f" (got {shown!r})"
        lines.append(f"{source}: {key + ': ' if key else ''}{message}{value}")
    return lines


def parse(text: str, source: str = "<config>") -> Config:
    """Validate TOML text; raise ConfigError whose lines name the source and the key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: not valid TOML: {exc}"]) from None
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_problems(source, exc)) from None


def load(path: Path | None = None) -> tuple[Config, str]:
    """Load a config file; with no path, `config/calmline.toml` if present, else defaults.

    Returns the config and a description of where it came from, for the log.
    """
    if path is None:
        if not DEFAULT_PATH.exists():
            return Config(), "embedded defaults"
        path = DEFAULT_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such config file (use --config PATH, or create it from config/calmline.toml)"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the config file: {exc}"]) from None
    return parse(text, str(path)), str(path)
