"""The Debian package: built from this checkout, installed, used, purged.

packaging/build-deb builds it (`dpkg-buildpackage -us -uc -b` in a copy of
the tree, so the checkout stays clean); apt installs it with its
dependencies from Debian, without starting the service (policy-rc.d); the
tests run the installed /usr/bin/relaymilter with Debian's python3 and
Debian's python3-milter, python3-dnspython and
python3-idna; the package is purged at the end, whatever happened.

Run as root on a Debian 12 test machine (CI does): it installs and purges a
system package and creates the relaymilter system user (which stays, as
Debian's system users do). Missing build tools or root fail the tests,
never skip them. It refuses to touch a relaymilter package that it did not
install itself.
"""

from __future__ import annotations

import os
import pwd
import grp
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from postfix_instance import PostfixInstance
from rbldnsd import Rbldnsd, RbldnsdZone
from smtp_dialog import rcpt_reply

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "relaymilter"
CONFFILE = Path("/etc/relaymilter/relaymilter.toml")
UNIT = Path("/lib/systemd/system/relaymilter.service")
POLICYD_UNIT = Path("/lib/systemd/system/relaymilter-policyd.service")
SNIPPET = Path("/usr/share/doc/relaymilter/examples/postfix-main.cf.snippet")
SPOOL_SOCKET_DIR = Path("/var/spool/postfix/relaymilter")
STATE_DIR = Path("/var/lib/relaymilter")
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
# Set while this module has the package installed: a leftover from an
# interrupted run is ours to purge; a relaymilter package without it is not.
MARKER = Path("/var/lib/relaymilter-package-test.installed")
# Debian's tools and python3, not the virtualenv's that runs pytest.
SYSTEM_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
              "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
INSTALL_HINT = "run `scripts/install-debian-deps test` (or `make test`)"


def run(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=SYSTEM_ENV, cwd="/", capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def output_of(done: subprocess.CompletedProcess, lines: int = 40) -> str:
    text = (done.stdout or "") + (done.stderr or "")
    return f"$ {' '.join(map(str, done.args))}\nexit {done.returncode}\n" + \
        "\n".join(text.splitlines()[-lines:])


def package_installed() -> bool:
    done = run(["dpkg-query", "-W", "-f=${db:Status-Status}", PACKAGE])
    return done.returncode == 0 and done.stdout.strip() not in ("", "not-installed")


def source_version() -> str:
    text = (ROOT / "relaymilter" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def changelog_version() -> str:
    first = (ROOT / "packaging" / "debian" / "changelog").read_text(encoding="utf-8")
    return re.match(r"relaymilter \(([^)]+)\)", first).group(1)


def require_build_tools() -> None:
    """Fail, never skip, when the machine cannot build and install the package."""
    if os.geteuid() != 0:
        pytest.fail("the Debian package test installs a system package: run it as root",
                    pytrace=False)
    missing = [tool for tool in ("dpkg-buildpackage", "dpkg-checkbuilddeps", "apt-get",
                                 "dpkg-query", "setpriv")
               if shutil.which(tool, path=SYSTEM_ENV["PATH"]) is None]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}; {INSTALL_HINT}", pytrace=False)
    done = run(["dpkg-checkbuilddeps", str(ROOT / "packaging" / "debian" / "control")])
    if done.returncode != 0:
        pytest.fail(f"build dependencies missing: {done.stderr.strip()}; {INSTALL_HINT}",
                    pytrace=False)
    for user in ("postfix",):
        try:
            pwd.getpwnam(user)
        except KeyError:
            pytest.fail(f"no {user} user: Postfix is not installed; {INSTALL_HINT}",
                        pytrace=False)


def purge() -> None:
    done = run(["apt-get", "purge", "-y", "-q", PACKAGE], timeout=300)
    assert done.returncode == 0, output_of(done)
    assert not package_installed(), "relaymilter is still installed after purge"
    MARKER.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """The .deb, built from this checkout by packaging/build-deb."""
    require_build_tools()
    out = tmp_path_factory.mktemp("deb")
    done = run([str(ROOT / "packaging" / "build-deb"), str(out)], timeout=600)
    assert done.returncode == 0, output_of(done, lines=60)
    debs = sorted(out.glob(f"{PACKAGE}_*_all.deb"))
    assert len(debs) == 1, f"expected one {PACKAGE}_*_all.deb in {out}: {debs}"
    return debs[0]


@pytest.fixture(scope="module")
def installed(deb: Path) -> Iterator[Path]:
    """The package installed with apt, the service not started; purged after."""
    if package_installed() and not MARKER.exists():
        pytest.fail("a relaymilter package that this test did not install is installed here; "
                    "this test installs and purges it: `apt-get purge relaymilter` first",
                    pytrace=False)
    made_policy_rc_d = not POLICY_RC_D.exists()
    if made_policy_rc_d:    # exit 101: maintainer scripts start no service
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        MARKER.write_text(f"{deb.name}\n")
        done = run(["apt-get", "install", "-y", "-q", "--no-install-recommends", str(deb)],
                   timeout=600)
        assert done.returncode == 0, output_of(done)
        assert package_installed()
        yield deb
    finally:
        try:
            purge()
        finally:
            if made_policy_rc_d:
                POLICY_RC_D.unlink(missing_ok=True)


def test_changelog_version_is_the_source_version():
    assert changelog_version() == source_version(), \
        "packaging/debian/changelog: add an entry for relaymilter/__init__.py's __version__"


def test_installed_command_prints_the_version(installed):
    done = run(["/usr/bin/relaymilter", "--version"])
    assert done.returncode == 0, output_of(done)
    assert done.stdout.strip() == f"relaymilter {source_version()}"
    where = run(["/usr/bin/python3", "-c", "import relaymilter; print(relaymilter.__file__)"])
    assert where.stdout.startswith("/usr/lib/python3/dist-packages/relaymilter/"), \
        output_of(where)


def test_installed_sample_config_checks(installed):
    assert CONFFILE.read_text(encoding="utf-8") == \
        (ROOT / "packaging" / "relaymilter.toml").read_text(encoding="utf-8")
    conffiles = run(["dpkg-query", "-W", "-f=${Conffiles}", PACKAGE]).stdout
    assert str(CONFFILE) in conffiles
    done = run(["/usr/bin/relaymilter", "check-config", "-c", str(CONFFILE)])
    assert done.returncode == 0, output_of(done)
    assert f"# {CONFFILE}: OK" in done.stdout


def test_package_ships_unit_users_directories_man_pages_and_snippets(installed):
    listed = set(run(["dpkg", "-L", PACKAGE]).stdout.split())
    for path in (str(UNIT), str(POLICYD_UNIT), "/usr/bin/relaymilter",
                 "/usr/lib/sysusers.d/relaymilter.conf", "/usr/lib/tmpfiles.d/relaymilter.conf",
                 "/usr/share/man/man8/relaymilter.8.gz",
                 "/usr/share/man/man5/relaymilter.conf.5.gz",
                 "/usr/share/doc/relaymilter/examples/postfix-main.cf.snippet",
                 "/usr/share/doc/relaymilter/examples/sendmail.mc.snippet",
                 "/usr/share/doc/relaymilter/examples/relaymilter-alerts.yml",
                 "/usr/share/doc/relaymilter/examples/relaymilter-dashboard.json"):
        assert path in listed, f"{path} is not in the package"
    assert UNIT.read_text() == (ROOT / "packaging" / "systemd" / "relaymilter.service").read_text()
    assert POLICYD_UNIT.read_text() == \
        (ROOT / "packaging" / "systemd" / "relaymilter-policyd.service").read_text()
    user = pwd.getpwnam("relaymilter")
    assert user.pw_uid < 1000 and user.pw_shell in ("/usr/sbin/nologin", "/sbin/nologin")
    postfix_gid = grp.getgrnam("postfix").gr_gid
    assert user.pw_name not in grp.getgrnam("postfix").gr_mem  # the directory's group does it
    spool = SPOOL_SOCKET_DIR.stat()
    assert (spool.st_uid, spool.st_gid) == (user.pw_uid, postfix_gid)
    assert stat.S_IMODE(spool.st_mode) == 0o2750
    state = STATE_DIR.stat()
    assert (state.st_uid, stat.S_IMODE(state.st_mode)) == (user.pw_uid, 0o750)


@pytest.mark.parametrize("unit", [UNIT, POLICYD_UNIT], ids=lambda unit: unit.name)
def test_systemd_analyze_verify_accepts_the_unit(installed, unit):
    analyze = shutil.which("systemd-analyze", path=SYSTEM_ENV["PATH"])
    if analyze is None:
        pytest.fail("systemd-analyze is not installed (Debian package systemd); "
                    "run `scripts/install-debian-deps test`", pytrace=False)
    done = run([analyze, "verify", str(unit)])
    # verify exits 0 even for unknown keys and bad values: read what it says.
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if "relaymilter" in line]
    assert done.returncode == 0 and not complaints, output_of(done)


@pytest.mark.parametrize("unit", [UNIT, POLICYD_UNIT], ids=lambda unit: unit.name)
def test_units_reload_with_sighup_and_share_the_runtime_directory(installed, unit):
    text = unit.read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text
    assert "RuntimeDirectoryPreserve=yes" in text    # stopping one leaves the other's


def test_postfix_snippet_names_the_packaged_policyd_socket(installed):
    """check_policy_service unix:relaymilter/policyd.sock is relative to
    Postfix's queue directory: the packaged [policyd] socket, in the
    directory tmpfiles.d makes for user relaymilter and group postfix."""
    import tomllib
    snippet = SNIPPET.read_text()
    where = re.search(r"check_policy_service unix:(\S+?),", snippet).group(1)
    queue = run(["postconf", "-h", "queue_directory"]).stdout.strip() or "/var/spool/postfix"
    configured = tomllib.loads(CONFFILE.read_text())["policyd"]["socket"]
    assert configured == f"unix:{queue}/{where}" == f"unix:{SPOOL_SOCKET_DIR}/policyd.sock"
    assert SPOOL_SOCKET_DIR.is_dir()


def test_service_user_serves_the_policy_service_on_the_packaged_socket(installed,
                                                                       postfix_installed):
    """As relaymilter-policyd.service runs it, with the packaged config's
    [policyd] socket: smtpd's user may connect, others not; SIGHUP reloads,
    never stops; SIGTERM stops with 0 and removes the socket."""
    import tomllib
    socket_path = Path(tomllib.loads(CONFFILE.read_text())["policyd"]["socket"][len("unix:"):])
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-deb-policyd-"))
    directory.chmod(0o755)
    config = directory / "relaymilter.toml"
    config.write_text(f'[policyd]\nsocket = "unix:{socket_path}"\n'
                      '[relay]\nlocal_domains = ["local.test"]\n[store]\npath = ""\n')
    config.chmod(0o644)
    log_path = directory / "policyd.log"
    log = log_path.open("w")
    service = subprocess.Popen(
        ["setpriv", "--reuid=relaymilter", "--regid=relaymilter", "--init-groups",
         "sh", "-c", 'umask 0007 && exec /usr/bin/relaymilter policyd -c "$1"', "sh",
         str(config)], env=SYSTEM_ENV, cwd="/", stdout=log, stderr=subprocess.STDOUT)
    request = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.9\n"
               b"sender=s@s.test\nrecipient=u@remote.test\n\n")

    def ask() -> bytes:
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(socket_path))
            client.sendall(request)
            return client.recv(4096)
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert service.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "no policy service socket after 20 s"
            time.sleep(0.05)
        mode = socket_path.stat()
        assert stat.S_IMODE(mode.st_mode) == 0o660
        assert mode.st_gid == grp.getgrnam("postfix").gr_gid
        assert _connect_as("postfix", socket_path).returncode == 0
        refused = _connect_as("nobody", socket_path)
        assert refused.returncode == 1 and "PermissionError" in refused.stdout
        assert ask() == b"action=554 5.7.1 Relay access denied\n\n"
        service.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert service.poll() is None, log_path.read_text()
        assert ask() == b"action=554 5.7.1 Relay access denied\n\n"
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=15) == 0, log_path.read_text()
        assert not socket_path.exists()
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_installed_lookup_asks_a_dnsbl_through_debians_dnspython(installed, rbldnsd_installed):
    zones = [RbldnsdZone("bl.test", "ip4set", ["127.0.0.2"])]
    with Rbldnsd(zones) as server, tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "relaymilter.toml"
        config.write_text(f'[dnsbl]\nnameservers = ["{server.nameserver}"]\n'
                          '[[dnsbl.zone]]\nname = "bl.test"\n[store]\npath = ""\n')
        listed = run(["/usr/bin/relaymilter", "lookup", "127.0.0.2", "-c", str(config)])
        clean = run(["/usr/bin/relaymilter", "lookup", "127.0.0.1", "-c", str(config)])
    assert listed.returncode == 2 and "LISTED, blocked using bl.test" in listed.stdout, \
        output_of(listed)
    assert clean.returncode == 0 and "127.0.0.1: not listed" in clean.stdout, output_of(clean)


def _connect_as(user: str, path: Path) -> subprocess.CompletedProcess:
    """Connect to a unix socket as `user`: exit 0, or the error on stdout."""
    probe = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
             "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n"
             "    print(type(e).__name__); sys.exit(1)\n")
    gid = pwd.getpwnam(user).pw_gid
    return run(["setpriv", f"--reuid={user}", f"--regid={gid}", "--init-groups",
                "/usr/bin/python3", "-c", probe, str(path)], timeout=30)


def test_service_user_serves_postfix_through_the_spool_socket(installed, postfix_installed):
    """As the unit runs it: user relaymilter, UMask 0007, socket where smtpd reaches it."""
    socket_path = SPOOL_SOCKET_DIR / "milter.sock"
    directory = Path(tempfile.mkdtemp(prefix="relaymilter-deb-"))
    directory.chmod(0o755)   # read by user relaymilter
    config = directory / "relaymilter.toml"
    config.write_text(f'[milter]\nsocket = "unix:{socket_path}"\n'
                      '[relay]\nlocal_domains = ["local.test"]\n')   # store: the default path
    config.chmod(0o644)
    log = (directory / "milter.log").open("w")
    milter = subprocess.Popen(
        ["setpriv", "--reuid=relaymilter", "--regid=relaymilter", "--init-groups",
         "sh", "-c", 'umask 0007 && exec /usr/bin/relaymilter run -c "$1"', "sh", str(config)],
        env=SYSTEM_ENV, cwd="/", stdout=log, stderr=subprocess.STDOUT)
    postfix = None
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            assert milter.poll() is None, (directory / "milter.log").read_text()
            assert time.monotonic() < deadline, "no milter socket after 20 s"
            time.sleep(0.05)
        mode = socket_path.stat()
        assert stat.S_ISSOCK(mode.st_mode) and stat.S_IMODE(mode.st_mode) == 0o770
        assert mode.st_gid == grp.getgrnam("postfix").gr_gid
        assert _connect_as("postfix", socket_path).returncode == 0
        refused = _connect_as("nobody", socket_path)
        assert refused.returncode == 1 and "PermissionError" in refused.stdout

        postfix = PostfixInstance(f"unix:{socket_path}", local_domains=("local.test",))
        postfix.start()
        denied = rcpt_reply(postfix.port, "<user@remote.test>", addr="192.0.2.9")
        assert denied.code == 554 and "Relay access denied" in denied.text, denied
        accepted = rcpt_reply(postfix.port, "<user@local.test>", addr="192.0.2.9")
        assert accepted.code == 250, accepted
        assert (STATE_DIR / "policy.sqlite3").exists()   # the store, made by the service user

        started = time.monotonic()
        milter.send_signal(signal.SIGTERM)
        assert milter.wait(timeout=15) == 0, (directory / "milter.log").read_text()
        assert time.monotonic() - started < 10
    finally:
        if postfix is not None:
            postfix.stop()
        if milter.poll() is None:
            milter.kill()
            milter.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)
