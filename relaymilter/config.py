"""config - the TOML configuration, its schema, and its frozen form.

NAME
    config - TOML -> frozen dataclasses; one schema table; errors name file and key

SYNOPSIS
    config = load_config("/etc/relaymilter/relaymilter.toml")
    config.relay.local_domains, config.decisions.dry_run
    config, changed = keep_restart_only(running, config)     # on a reload

DESCRIPTION
    Every key is declared once in SCHEMA, with its type, default, bounds,
    help text and whether a change waits for a restart (restart_only: the
    listeners and libmilter's timeout, which a running process cannot
    change); the man page and
    `relaymilter check-config` are built from the same table, and a test
    proves the docs name every key. Unknown sections and keys, wrong types
    and out-of-range values are refused with a ConfigError whose text reads
    "FILE: section.key: reason".

    Renamed keys. ALIASES maps an old dotted name to the key that replaced
    it ([milter] on_error and dry_run became [decisions] ones when the
    policy service arrived, since they govern both front ends). An old name
    is read with the new key's type and checks, errors naming the old name;
    its value is used for the new key, and each load that meets one logs a
    deprecation warning. Setting both to different values is refused.

    The result is immutable. A reload builds a new Config and the owner swaps
    one reference (see reload.py); nothing here is re-read behind its back.
    keep_restart_only() gives a reloaded Config the running values of the
    restart-only keys back, and says which of them changed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from relaymilter.address import parse_network
from relaymilter.endpoint import DNS_PORT, parse_socket, split_host_port
from relaymilter.entries import too_wide
from relaymilter.relay import split_domain_patterns
from relaymilter.storelocation import display_location, is_url
from relaymilter.zones import Zone

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/relaymilter/relaymilter.toml"
CONFIG_ENV = "RELAYMILTER_CONFIG"


class ConfigError(Exception):
    """A configuration problem; str() is "FILE: section.key: reason"."""

    def __init__(self, path: str, key: str | None, reason: str):
        self.path, self.key, self.reason = path, key, reason
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + reason)


# ---------------------------------------------------------------- checks ---
# Each check takes the TOML value (already of the declared type) and returns
# the value to store, or raises ValueError with the reason.

def _one_of(*choices: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return value
    return check


def _socket(value: str) -> str:
    """libmilter socket syntax: inet:PORT@HOST, inet6:PORT@[ADDR], unix:/path."""
    parse_socket(value)
    return value


def _domains(values: list[str]) -> tuple[str, ...]:
    split_domain_patterns(values)  # raises ValueError naming the bad entry
    return tuple(values)


def _networks(values: list[str]) -> tuple[str, ...]:
    for text in values:
        parse_network(text)
    return tuple(values)


def _addresses(values: list[str]) -> tuple[str, ...]:
    for text in values:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address") from None
    return tuple(values)


def _nameservers(values: list[str]) -> tuple[str, ...]:
    for text in values:
        split_host_port(text, default_port=DNS_PORT)
    return tuple(values)


class SubkeyError(ValueError):
    """A problem inside a table of an array of tables: names the entry and key."""

    def __init__(self, subkey: str, reason: str):
        super().__init__(reason)
        self.subkey = subkey


ZONE_FIELDS = {"name": str, "display_name": str, "weight": int, "codes": list, "txt": str}


def _zones(tables: list[dict[str, Any]]) -> tuple[Zone, ...]:
    """[[dnsbl.zone]] tables -> Zones; errors name "[N].key" (N from 1)."""
    zones: list[Zone] = []
    for number, table in enumerate(tables, 1):
        where = f"[{number}]"
        for name, value in table.items():
            expected = ZONE_FIELDS.get(name)
            if expected is None:
                raise SubkeyError(f"{where}.{name}", "unknown key")
            if (not isinstance(value, expected) or isinstance(value, bool)
                    or (expected is list and not all(isinstance(v, str) for v in value))):
                raise SubkeyError(f"{where}.{name}", f"must be {_TYPE_NAMES[expected]}")
        if "name" not in table:
            raise SubkeyError(where, "a zone needs a name")
        try:
            zone = Zone.build(table["name"], weight=table.get("weight", 1),
                              codes=table.get("codes"), display_name=table.get("display_name"),
                              txt=table.get("txt", "listed"))
        except ValueError as error:
            raise SubkeyError(where, str(error)) from None
        if any(other.name == zone.name for other in zones):
            raise SubkeyError(f"{where}.name", f"zone {zone.name} is configured twice")
        zones.append(zone)
    return tuple(zones)


def _listen(value: str) -> str:
    if value:
        split_host_port(value)
    return value


def _octal_mode(value: str) -> str:
    try:
        mode = int(value, 8)
    except ValueError:
        raise ValueError(f"{value!r} is not an octal mode such as \"0660\"") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{value!r} is not a permission mode (0000-0777)")
    return value


def _optional_path(value: str) -> str | None:
    if value == "":
        return None
    if not value.startswith("/"):
        raise ValueError(f"must be an absolute path, not {value!r}")
    return value


def _counters_url(value: str) -> str | None:
    if value == "":
        return None
    if not value.lower().startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"must be a redis://, rediss:// or unix:// URL, not "
                         f"{display_location(value)!r}")
    return value


def _store_url(value: str) -> str | None:
    if value == "":
        return None
    if not is_url(value):
        raise ValueError(f"must be a postgresql:// URL, not {display_location(value)!r}")
    return value


# ---------------------------------------------------------------- schema ---

@dataclass(frozen=True)
class Key:
    """One configuration key: where it lives, what it holds, what it means."""

    section: str
    name: str
    type: type              # the TOML type: str, bool, int, float, list (of str)
                            # or dict (an array of tables, [[section.name]])
    default: Any
    help: str
    check: Callable[[Any], Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    restart_only: bool = False  # a reload keeps the running value (keep_restart_only)

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"


SCHEMA: tuple[Key, ...] = (
    Key("milter", "socket", str, "inet:8894@127.0.0.1",
        "Where the milter listens: inet:PORT@HOST, inet6:PORT@[ADDR] or unix:/PATH.",
        _socket, restart_only=True),
    Key("milter", "timeout", int, 600,
        "Seconds libmilter waits for the MTA before it drops a connection.",
        minimum=1, maximum=86400, restart_only=True),
    Key("milter", "session_timeout", int, 1800,
        "Seconds one milter connection (one SMTP session of the MTA) may last, however its "
        "bytes trickle; then it is closed and the MTA answers the rest of that session with "
        "its milter default action.", minimum=5, maximum=86400, restart_only=True),
    Key("decisions", "on_error", str, "tempfail",
        "What an internal fault answers, in the milter and the policy service: "
        "tempfail (451 4.3.0) or accept.", _one_of("tempfail", "accept")),
    Key("decisions", "dry_run", bool, False,
        "Decide and log \"would reject\", but accept everything (both front ends)."),
    Key("relay", "local_domains", list, [],
        "Domains we receive mail for; \".example.net\" means every subdomain of example.net.",
        _domains),
    Key("relay", "local_domains_file", str, "",
        "Optional file of further local domains, one a line, # comments; re-read when it changes.",
        _optional_path),
    Key("relay", "trusted_networks", list, ["127.0.0.0/8", "::1/128"],
        "Client networks that may relay anywhere (CIDR, IPv4 and IPv6).",
        _networks),
    Key("relay", "allow_wide_trusted_networks", bool, False,
        "Accept trusted_networks wider than /8 (IPv4) or /32 (IPv6), which let every client "
        "in them relay anywhere; logged as a warning."),
    Key("relay", "trust_authenticated", bool, True,
        "Whether an SMTP-authenticated client ({auth_authen} set) may relay."),
    Key("relay", "local_address_literals", list, [],
        "IP addresses that recipients may name as a literal, as in user@[192.0.2.1].",
        _addresses),
    Key("dnsbl", "nameservers", list, [],
        "DNS servers to ask, \"IP\" or \"IP:PORT\"; [] = the system resolver (/etc/resolv.conf).",
        _nameservers),
    Key("dnsbl", "timeout", float, 2.0,
        "Seconds all zones together may take; a zone that has not answered by then counts "
        "as not listed.", minimum=0.05, maximum=30),
    Key("dnsbl", "threshold", int, 1,
        "Sum of the weights of the listing zones at or above which a client is rejected.",
        minimum=1, maximum=1000),
    Key("dnsbl", "reject_stage", str, "rcpt",
        "rcpt: reject at each recipient, postmaster and trusted clients exempt; "
        "connect: reject the whole connection.", _one_of("rcpt", "connect")),
    Key("dnsbl", "health_interval", int, 300,
        "Seconds between two list health checks (RFC 5782 test points).",
        minimum=10, maximum=86400),
    Key("dnsbl", "zone", dict, [],
        "The lists, as [[dnsbl.zone]] tables: name, display_name, weight "
        "(negative = allowlist), codes, txt (listed, with-a, off).", _zones),
    Key("cache", "max_entries", int, 100000,
        "Most DNS answers kept; the least recently used go first.", minimum=1, maximum=10_000_000),
    Key("cache", "min_ttl", int, 60,
        "Shortest time an answer is kept, whatever its TTL says (seconds).",
        minimum=0, maximum=86400),
    Key("cache", "max_ttl", int, 3600,
        "Longest time an answer is kept, whatever its TTL says (seconds).",
        minimum=0, maximum=604800),
    Key("store", "path", str, "/var/lib/relaymilter/policy.sqlite3",
        "The per-domain policy store (SQLite), created on first use; \"\" = no store.",
        _optional_path),
    Key("store", "url", str, "",
        "A policy store in PostgreSQL, shared by every host of a fleet: a libpq URL, "
        "postgresql://USER@HOST/DATABASE (a unix socket: ?host=/DIRECTORY). Set, it "
        "replaces path.", _store_url),
    Key("limits", "window", int, 3600,
        "Seconds in the hour of the outbound limits (`relaymilter limit`: per hour, and "
        "per day = 24 of them): 3600; other values stretch or shrink that hour.",
        minimum=1, maximum=86400),
    Key("limits", "auto_hold_factor", int, 0,
        "Put a sender on hold when its attempts reach this many times one of its rates "
        "within that rate's window; 0 = never.", minimum=0, maximum=1000),
    Key("limits", "auto_hold_duration", int, 0,
        "Seconds an automatic hold lasts before it ends by itself; 0 = until removed by "
        "hand.", minimum=0, maximum=10 * 365 * 86400),
    Key("probes", "detect", bool, True,
        "Block a client that keeps trying to relay: after `refusals` refused relay "
        "attempts within `window` seconds, every recipient it sends for `block_for` "
        "seconds gets a 5xx (an automatic hold on everything, reason \"relay probing\"). "
        "Trusted networks and authenticated clients are never counted."),
    Key("probes", "refusals", int, 5,
        "Refused relay attempts that make a client a prober.", minimum=2, maximum=10000),
    Key("probes", "window", int, 600,
        "Seconds over which the refused relay attempts are counted (a sliding window).",
        minimum=10, maximum=86400),
    Key("probes", "block_for", int, 3600,
        "Seconds a prober stays blocked.", minimum=60, maximum=30 * 86400),
    Key("holds", "notify", str, "",
        "A command run when relaymilter puts a sender on hold by itself, with the hold "
        "in its environment (RELAYMILTER_HOLD_KIND, _VALUE, _REASON, _EXPIRES, _HOST); "
        "\"\" = none.", _optional_path),
    Key("counters", "url", str, "",
        "Count the outbound limits in Redis, shared by every process and host: "
        "redis://HOST:PORT/DB, rediss://... (TLS) or unix:///PATH?db=N; \"\" = in each "
        "process.", _counters_url),
    Key("counters", "timeout_ms", int, 50,
        "How long a decision waits for Redis before it counts in this process instead.",
        minimum=1, maximum=2000),
    Key("counters", "on_error", str, "local",
        "When Redis does not answer: local = count in this process; tempfail = defer "
        "the recipient (4xx).", _one_of("local", "tempfail")),
    Key("policyd", "socket", str, "inet:8895@127.0.0.1",
        "Where `relaymilter policyd`, the Postfix policy service, listens: "
        "inet:PORT@HOST, inet6:PORT@[ADDR] or unix:/PATH.", _socket, restart_only=True),
    Key("policyd", "socket_mode", str, "0660",
        "Permissions of a unix policyd socket, in octal (smtpd connects as user postfix).",
        _octal_mode, restart_only=True),
    Key("policyd", "idle_timeout", int, 330,
        "Seconds a policy service connection may stay silent before it is closed (Postfix "
        "closes its own idle ones after 300 s: smtpd_policy_service_max_idle).",
        minimum=1, maximum=86400, restart_only=True),
    Key("policyd", "max_connections", int, 200,
        "Most policy service connections served at once (Postfix keeps one per smtpd "
        "process); further ones are accepted but not read until one closes; logged.",
        minimum=1, maximum=10000, restart_only=True),
    Key("policyd", "workers", int, 1,
        "Processes that serve the policy service's socket together (one per core): with "
        "limits in the store, more than 1 needs [counters] url.",
        minimum=1, maximum=64, restart_only=True),
    Key("metrics", "listen", str, "",
        "Where the milter (`relaymilter run`) serves Prometheus metrics (/metrics) and the "
        "health check (/healthz), \"IP:PORT\" or \"[IPv6]:PORT\"; \"\" = off. Needs the "
        "prometheus_client package.", _listen, restart_only=True),
    Key("metrics", "policyd_listen", str, "",
        "The same for the policy service (`relaymilter policyd`): its own address, so that "
        "one config serves both daemons at once; \"\" = off.", _listen, restart_only=True),
    Key("metrics", "status_token", str, "",
        "A secret that /status and /api/v1/ ask for (Authorization: Bearer TOKEN, or "
        "?token=TOKEN) when the listener is not on loopback; \"\" = those pages only on "
        "loopback. /metrics and /healthz never ask."),
)

SECTIONS = tuple(dict.fromkeys(key.section for key in SCHEMA))
KEYS = {key.dotted: key for key in SCHEMA}

# Deprecated dotted name -> the key that replaced it (see DESCRIPTION).
ALIASES: dict[str, str] = {
    "milter.on_error": "decisions.on_error",
    "milter.dry_run": "decisions.dry_run",
}


# ---------------------------------------------------------- frozen form ---

@dataclass(frozen=True)
class MilterConfig:
    socket: str
    timeout: int
    session_timeout: int


@dataclass(frozen=True)
class DecisionsConfig:
    """What both front ends answer: the milter and the policy service."""

    on_error: str
    dry_run: bool


@dataclass(frozen=True)
class RelayConfig:
    local_domains: tuple[str, ...]
    local_domains_file: str | None
    trusted_networks: tuple[str, ...]
    allow_wide_trusted_networks: bool
    trust_authenticated: bool
    local_address_literals: tuple[str, ...]


@dataclass(frozen=True)
class DnsblConfig:
    nameservers: tuple[str, ...]
    timeout: float
    threshold: int
    reject_stage: str
    health_interval: int
    zone: tuple[Zone, ...]

    @property
    def zones(self) -> tuple[Zone, ...]:
        return self.zone


@dataclass(frozen=True)
class CacheConfig:
    max_entries: int
    min_ttl: int
    max_ttl: int


@dataclass(frozen=True)
class StoreConfig:
    path: str | None
    url: str | None

    @property
    def location(self) -> str | None:
        """Where the store is, for openstore.open_store(): the URL, else the path."""
        return self.url or self.path

    @property
    def shown(self) -> str | None:
        """location as logs and the status page show it: no password."""
        return None if self.location is None else display_location(self.location)


@dataclass(frozen=True)
class LimitsConfig:
    window: int
    auto_hold_factor: int
    auto_hold_duration: int


@dataclass(frozen=True)
class ProbesConfig:
    detect: bool
    refusals: int
    window: int
    block_for: int


@dataclass(frozen=True)
class HoldsConfig:
    notify: str | None


@dataclass(frozen=True)
class CountersConfig:
    url: str | None
    timeout_ms: int
    on_error: str

    @property
    def shown(self) -> str | None:
        """url as logs show it: no password."""
        return None if self.url is None else display_location(self.url)


@dataclass(frozen=True)
class MetricsConfig:
    listen: str
    policyd_listen: str
    status_token: str

    @property
    def address(self) -> tuple[str, int] | None:
        """(ip, port) the milter listens on; None when its metrics are off."""
        return split_host_port(self.listen) if self.listen else None

    @property
    def policyd_address(self) -> tuple[str, int] | None:
        """(ip, port) the policy service listens on; None when its metrics are off."""
        return split_host_port(self.policyd_listen) if self.policyd_listen else None


@dataclass(frozen=True)
class PolicydConfig:
    socket: str
    socket_mode: str        # octal text, as written
    idle_timeout: int
    max_connections: int
    workers: int

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)


@dataclass(frozen=True)
class Config:
    path: str
    milter: MilterConfig
    decisions: DecisionsConfig
    relay: RelayConfig
    dnsbl: DnsblConfig
    cache: CacheConfig
    store: StoreConfig
    limits: LimitsConfig
    probes: ProbesConfig
    holds: HoldsConfig
    counters: CountersConfig
    metrics: MetricsConfig
    policyd: PolicydConfig
    values: dict[str, Any] = field(repr=False, compare=False)  # dotted key -> value

    def effective_toml(self) -> str:
        """The effective configuration, defaults included, as TOML text."""
        lines: list[str] = []
        for section in SECTIONS:
            lines.append(f"[{section}]")
            tables = []
            for key in SCHEMA:
                if key.section != section:
                    continue
                if key.type is dict and self.values[key.dotted]:
                    tables.append(key)
                elif key.type is dict:
                    lines.append(f"{key.name} = []")
                else:
                    restart = "    # takes effect at restart" if key.restart_only else ""
                    value = self.values[key.dotted]
                    if key.dotted in ("store.url", "counters.url") and value:
                        value = display_location(value)     # no password on a screen
                    lines.append(f"{key.name} = {_toml_value(value)}{restart}")
            lines.append("")
            for key in tables:
                for zone in self.values[key.dotted]:
                    lines += [f"[[{key.dotted}]]", f"name = {_toml_value(zone.name)}",
                              f"display_name = {_toml_value(zone.display_name)}",
                              f"weight = {zone.weight}",
                              f"codes = {_toml_value([str(code) for code in zone.codes])}",
                              f"txt = {_toml_value(zone.txt)}", ""]
        return "\n".join(lines)


_SECTION_TYPES = {"milter": MilterConfig, "decisions": DecisionsConfig, "relay": RelayConfig,
                  "dnsbl": DnsblConfig, "cache": CacheConfig, "store": StoreConfig,
                  "limits": LimitsConfig, "probes": ProbesConfig, "holds": HoldsConfig,
                  "counters": CountersConfig,
                  "metrics": MetricsConfig,
                  "policyd": PolicydConfig}


def config_path(cli_path: str | None) -> str:
    """-c, else $RELAYMILTER_CONFIG, else the default path."""
    return cli_path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH


def load_config(path: str) -> Config:
    """Read and validate a config file; raises ConfigError."""
    try:
        with open(path, "rb") as stream:
            document = tomllib.load(stream)
    except OSError as error:
        raise ConfigError(path, None, f"cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(path, None, f"not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(path, None, f"not UTF-8 (byte {error.start}): "
                                      "save the file as UTF-8") from None
    return parse_config(document, path)


def parse_config(document: dict[str, Any], path: str = "<string>") -> Config:
    """Validate a parsed TOML document against SCHEMA."""
    for section, body in document.items():
        if section not in SECTIONS:
            raise ConfigError(path, section, "unknown section")
        if not isinstance(body, dict):
            raise ConfigError(path, section, "must be a table ([section])")
    for section, body in document.items():
        for name in body:
            if f"{section}.{name}" not in KEYS and f"{section}.{name}" not in ALIASES:
                raise ConfigError(path, f"{section}.{name}", "unknown key")
    values = {key.dotted: _read_key(key, document.get(key.section, {}), path) for key in SCHEMA}
    _apply_aliases(document, values, path)
    _check_wide_trusted_networks(values, path)
    _check_metrics_listeners(values, path)
    if values["store.url"] and document.get("store", {}).get("path"):
        raise ConfigError(path, "store.url", "set either [store] path (a SQLite file) or "
                                             "[store] url (PostgreSQL), not both")
    if values["cache.min_ttl"] > values["cache.max_ttl"]:
        raise ConfigError(path, "cache.max_ttl", f"{values['cache.max_ttl']} is below "
                                                 f"cache.min_ttl ({values['cache.min_ttl']})")
    return _frozen(path, values)


def _check_wide_trusted_networks(values: dict[str, Any], path: str) -> None:
    """A trusted network wider than /8 or /32 is an open relay: refused unless
    relay.allow_wide_trusted_networks, then warned about."""
    wide = [text for text in values["relay.trusted_networks"] if too_wide(parse_network(text))]
    if not wide:
        return
    what = (f"{', '.join(wide)} {'is' if len(wide) == 1 else 'are'} wider than /8 (IPv4) or "
            "/32 (IPv6): every client in them may relay anywhere (an open relay)")
    if not values["relay.allow_wide_trusted_networks"]:
        raise ConfigError(path, "relay.trusted_networks",
                          f"{what}; set relay.allow_wide_trusted_networks = true if that "
                          "is meant")
    log.warning("%s: relay.trusted_networks: %s (relay.allow_wide_trusted_networks is set)",
                path, what)


def _check_metrics_listeners(values: dict[str, Any], path: str) -> None:
    """Both daemons run from one config: their metrics listeners must differ."""
    milter, policyd = values["metrics.listen"], values["metrics.policyd_listen"]
    if milter and policyd and split_host_port(milter) == split_host_port(policyd):
        raise ConfigError(path, "metrics.policyd_listen",
                          f"{policyd!r} is metrics.listen too: the milter and the policy "
                          "service each need an address of their own")


def _apply_aliases(document: dict[str, Any], values: dict[str, Any], path: str) -> None:
    """Put the values of deprecated names set in document into values; warn once."""
    used = []
    for old, new in ALIASES.items():
        section, name = old.split(".")
        body = document.get(section, {})
        if name not in body:
            continue
        key = KEYS[new]
        value = _read_key(dataclasses.replace(key, section=section, name=name), body, path)
        if key.name in document.get(key.section, {}) and value != values[new]:
            raise ConfigError(path, old, f"conflicts with {new}, which replaces it: "
                                         f"remove {old}")
        values[new] = value
        used.append(f"{old} is deprecated, write {new}")
    if used:
        log.warning("%s: %s", path, "; ".join(used))


def _frozen(path: str, values: dict[str, Any]) -> Config:
    """The Config of checked values: every section's dataclass, from SCHEMA."""
    sections = {
        section: cls(**{key.name: values[key.dotted] for key in SCHEMA if key.section == section})
        for section, cls in _SECTION_TYPES.items()
    }
    return Config(path=path, values=values, **sections)


def keep_restart_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """new with the running values of the restart_only keys, and which of those changed.

    A reload cannot move a listening socket; a Config that claimed the new
    value would misreport what is in force. The changed names are dotted,
    in SCHEMA order, for the caller to log.
    """
    changed = [key.dotted for key in SCHEMA
               if key.restart_only and running.values[key.dotted] != new.values[key.dotted]]
    if not changed:
        return new, []
    values = {**new.values, **{dotted: running.values[dotted] for dotted in changed}}
    return _frozen(new.path, values), changed


def _read_key(key: Key, body: dict[str, Any], path: str) -> Any:
    if key.name not in body:
        value = key.default
    else:
        value = body[key.name]
        _check_type(key, value, path)
        if key.type is float:
            value = float(value)
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(path, key.dotted, f"{value} is below the minimum {key.minimum}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(path, key.dotted, f"{value} is above the maximum {key.maximum}")
    if key.check is not None:
        try:
            value = key.check(value)
        except SubkeyError as error:
            raise ConfigError(path, key.dotted + error.subkey, str(error)) from None
        except ValueError as error:
            raise ConfigError(path, key.dotted, str(error)) from None
    elif isinstance(value, list):
        value = tuple(value)
    return value


def _check_type(key: Key, value: Any, path: str) -> None:
    expected = key.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if expected is int and isinstance(value, bool):
        raise ConfigError(path, key.dotted, "must be an integer, not a boolean")
    if expected is dict:
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise ConfigError(path, key.dotted, f"must be tables written [[{key.dotted}]]")
        return
    if not isinstance(value, expected):
        raise ConfigError(path, key.dotted,
                          f"must be {_TYPE_NAMES[expected]}, not {type(value).__name__}")
    if expected is list and not all(isinstance(item, str) for item in value):
        raise ConfigError(path, key.dotted, "must be a list of strings")


_TYPE_NAMES = {str: "a string", bool: "true or false", int: "an integer",
               float: "a number", list: "a list of strings", dict: "tables"}


def _toml_value(value: Any) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return '"' + "".join(_toml_char(char) for char in str(value)) + '"'


def _toml_char(char: str) -> str:
    if char in ('"', "\\"):
        return "\\" + char
    if ord(char) < 0x20 or ord(char) == 0x7F:
        return f"\\u{ord(char):04X}"
    return char
