"""The relaymilter command, run as a subprocess: verbs, config path, exit codes.

Only test_run_* and the Redis-unreachable limit test open sockets (unix
sockets that cannot exist).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import time
import tomllib

from relaymilter import __version__
from relaymilter.config import CONFIG_ENV, load_config, parse_config

ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE_CONFIG = ROOT / "packaging" / "relaymilter.toml"

EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 64, 69, 78


def relaymilter(*args: str, env: dict[str, str] | None = None, cwd=None,
                timeout: float = 30) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if name != CONFIG_ENV}
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "relaymilter", *args], env=environment,
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def write_config(tmp_path, text: str, name: str = "relaymilter.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_version_prints_version_and_exits_0():
    result = relaymilter("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"relaymilter {__version__}"


def test_check_config_on_sample_config_exits_0_and_prints_parseable_toml():
    result = relaymilter("check-config", "-c", str(SAMPLE_CONFIG))
    assert result.returncode == 0, result.stderr
    printed = parse_config(tomllib.loads(result.stdout))
    assert printed.values == load_config(str(SAMPLE_CONFIG)).values


def test_check_config_first_line_names_the_file_and_says_ok():
    result = relaymilter("check-config", "-c", str(SAMPLE_CONFIG))
    assert result.stdout.splitlines()[0].startswith(f"# {SAMPLE_CONFIG}: OK (")


def test_check_config_with_unknown_key_exits_78_naming_file_and_key(tmp_path):
    path = write_config(tmp_path, '[relay]\nlocal_domainz = ["example.com"]\n')
    result = relaymilter("check-config", "-c", path)
    assert result.returncode == EX_CONFIG
    assert f"{path}: relay.local_domainz: unknown key" in result.stderr
    assert result.stdout == ""


def test_check_config_with_missing_file_exits_78(tmp_path):
    path = str(tmp_path / "absent.toml")
    result = relaymilter("check-config", "-c", path)
    assert result.returncode == EX_CONFIG
    assert path in result.stderr


def test_check_config_with_bad_domains_file_line_exits_78(tmp_path):
    domains = tmp_path / "local-domains"
    domains.write_text("good.example\nnot a domain\n", encoding="utf-8")
    path = write_config(tmp_path, f'[relay]\nlocal_domains_file = "{domains}"\n')
    result = relaymilter("check-config", "-c", path)
    assert result.returncode == EX_CONFIG
    assert f"{domains}: line 2: " in result.stderr


def test_unknown_verb_exits_64():
    result = relaymilter("frobnicate")
    assert result.returncode == EX_USAGE
    assert "frobnicate" in result.stderr


def test_missing_verb_exits_64():
    assert relaymilter().returncode == EX_USAGE


def test_unknown_option_exits_64():
    assert relaymilter("check-config", "--frobnicate").returncode == EX_USAGE


def test_config_environment_variable_is_used_without_c(tmp_path):
    path = write_config(tmp_path, '[relay]\nlocal_domains = ["from-env.example"]\n')
    result = relaymilter("check-config", env={CONFIG_ENV: path})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"# {path}: OK")
    assert "from-env.example" in result.stdout


def test_c_option_wins_over_environment_variable(tmp_path):
    from_env = write_config(tmp_path, '[relay]\nbogus = 1\n', name="env.toml")
    from_option = write_config(tmp_path, '[relay]\nlocal_domains = ["from-c.example"]\n')
    result = relaymilter("check-config", "-c", from_option, env={CONFIG_ENV: from_env})
    assert result.returncode == 0, result.stderr
    assert "from-c.example" in result.stdout


def test_run_exits_69_when_socket_cannot_be_opened(tmp_path):
    socket_path = tmp_path / "no-such-directory" / "relaymilter.sock"
    path = write_config(tmp_path, f'[milter]\nsocket = "unix:{socket_path}"\n')
    started = time.monotonic()
    result = relaymilter("run", "-c", path, timeout=15)
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    assert time.monotonic() - started < 10
    assert f"cannot serve on unix:{socket_path}" in result.stderr


def test_run_with_unknown_key_exits_78_before_opening_a_socket(tmp_path):
    path = write_config(tmp_path, '[milter]\nsocket = "unix:/nonexistent/x.sock"\nbogus = 1\n')
    result = relaymilter("run", "-c", path)
    assert result.returncode == EX_CONFIG
    assert f"{path}: milter.bogus: unknown key" in result.stderr


def test_run_error_line_puts_severity_after_program_tag(tmp_path):
    # BUG: _PostfixStyleFormatter prefixes the whole formatted line, giving
    # "error: <time> relaymilter[PID]: ..." on stderr and, under --syslog,
    # "error: relaymilter[PID]: ..." (syslog then takes "error" for the tag).
    # Postfix writes "relaymilter[PID]: error: ...".
    socket_path = tmp_path / "no-such-directory" / "relaymilter.sock"
    path = write_config(tmp_path, f'[milter]\nsocket = "unix:{socket_path}"\n')
    result = relaymilter("run", "-c", path, timeout=15)
    [line] = [line for line in result.stderr.splitlines() if "cannot serve on" in line]
    assert re.search(r"relaymilter\[\d+\]: error: cannot serve on ", line), line


def test_store_list_on_a_missing_store_exits_66_and_creates_nothing(tmp_path):
    result = relaymilter("hold", "list", "--store", str(tmp_path / "typo.sqlite3"))
    assert result.returncode == 66
    assert "no policy store at" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_relay_client_add_of_the_whole_internet_exits_1_unless_forced(tmp_path):
    store = str(tmp_path / "policy.sqlite3")
    refused = relaymilter("relay-client", "add", "::/0", "--store", store)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert relaymilter("relay-client", "add", "::/0", "--force", "--store", store).returncode == 0


def test_every_log_message_is_one_line_whatever_a_log_call_forgot_to_escape():
    import logging
    from relaymilter.cli import _PostfixStyleFormatter
    formatter = _PostfixStyleFormatter("relaymilter[1]: %(message)s")
    forged = logging.makeLogRecord({"msg": "put on hold: %s", "args": ("mallory\r\nfake: ok",),
                                    "levelno": logging.WARNING, "levelname": "WARNING"})
    assert formatter.format(forged) == r"relaymilter[1]: warning: put on hold: mallory\x0d\x0afake: ok"
    kept = logging.makeLogRecord({"msg": "local domain stra\u00dfe.test", "levelno": logging.INFO})
    assert formatter.format(kept) == "relaymilter[1]: local domain stra\u00dfe.test"
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys
        failed = logging.makeLogRecord({"msg": "internal error", "levelno": logging.ERROR,
                                        "levelname": "ERROR", "exc_info": sys.exc_info()})
    lines = formatter.format(failed).splitlines()
    assert lines[0] == "relaymilter[1]: error: internal error" and lines[-1] == "RuntimeError: boom"


def test_limit_status_without_shared_counters_says_there_is_nothing_to_read(tmp_path):
    config = write_config(tmp_path, '[store]\npath = ""\n')
    for action in ("status", "reset"):
        result = relaymilter("limit", action, "--user", "alice", "-c", config)
        assert result.returncode == 1
        assert "counted in each relaymilter process ([counters] url is not set)" in result.stderr


def test_limit_status_with_redis_unreachable_exits_75(tmp_path):
    config = write_config(tmp_path, '[store]\npath = ""\n[counters]\n'
                                    f'url = "unix://{tmp_path}/no-redis.sock"\n')
    result = relaymilter("limit", "status", "--user", "alice", "-c", config)
    assert result.returncode == 75 and "unavailable; try again later" in result.stderr
