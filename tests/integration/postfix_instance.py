"""postfix_instance - a private, open-relay Postfix on loopback for tests.

NAME
    postfix_instance - start and stop a throw-away Postfix instance

SYNOPSIS
    with PostfixInstance(milter="unix:/tmp/x/milter.sock") as postfix:
        ...connect to ("127.0.0.1", postfix.port)...
        postfix.wait_for_log(r"status=sent")

DESCRIPTION
    Each instance lives in its own temporary directory (config, queue, data
    and log) and listens on 127.0.0.1 at a free port chosen at start. Its
    relay restrictions are deliberately open, so the milter under test is the
    only thing between a client and an open relay. Nothing is ever delivered
    anywhere: every transport name in master.cf runs discard(8).

    Postfix facts this module depends on (measured on Debian 12, Postfix 3.7):
    - A literal open relay is refused at start; "check_client_access
      static:OK, reject_unauth_destination" is the form Postfix accepts.
    - master.cf has no smtp(8), lmtp(8), local(8) or virtual(8) program at
      all: the usual service names (smtp, relay, local, virtual) run discard(8).
      {rcpt_mailer} still shows which class Postfix resolved a recipient to,
      and no main.cf override can make the instance send mail or resolve MX.
    - inet_protocols includes ipv6 whenever ::1 works: with ipv4 only,
      XCLIENT ADDR=IPV6:... is refused (501 5.5.4 Bad ADDR syntax).
    - Every service runs with chroot = n, so a milter's unix socket anywhere
      on the file system is reachable, and no chroot needs populating.
    - The daemons run as the postfix user and chdir into the queue directory:
      the instance directory must be world-searchable (mkdtemp makes 0700).
    - maillog_file needs the postlog service in master.cf and its directory
      listed in maillog_file_prefixes; postlogd writes asynchronously, so
      read the log with wait_for_log(), not once.
    - Every Postfix program, postconf included, re-reads a main.cf whose
      mtime is the current second in 300 ms naps until it is older (a guard
      against half-written files): written main.cf gets an mtime in the past,
      or start takes 2 s instead of 0.2 s.
    - Postfix sleeps smtpd_error_sleep_time (1 s) per rejected command and
      disconnects after 20 errors; tests send many rejected recipients, so
      both are relaxed here.
    - Tests open many transactions that end at RCPT, never delivered. Postfix
      then runs out of in-flow tokens (qmgr hands them out per delivery) and
      smtpd waits in_flow_delay (1 s) before every new queue file, i.e. at
      the first accepted RCPT of each session: in_flow_delay is 0 here.
    - local_recipient_maps is emptied so any user@local-domain is accepted
      (there are no unix accounts to look up), and alias_maps so no
      /etc/aliases is needed.
    - `postfix stop` is a SIGTERM to the master followed by 1 s naps until
      it is gone (costing 1 s now and then); stop() sends the SIGTERM itself and waits
      for every process of the instance in 10 ms steps. The master's
      children exit just after it and are reaped by init, which here takes
      up to 2 s: ps shows them <defunct> meanwhile.
    - smtpd's STARTTLS needs tlsmgr(8) in master.cf (its entropy and session
      cache): without it "454 4.7.0 TLS not available due to local problem".
    - Debian's Postfix reads Cyrus SASL's smtpd.conf from
      $config_directory/sasl/ and ignores cyrus_sasl_config_path.
    - start() waits for the banner (any reply code): that probe reaches the
      milter as one connection with a connect from 127.0.0.1 and no HELO.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from logwait import wait_for_match

# /usr/sbin is not on every PATH (sudo, cron and CI shells differ).
POSTFIX = shutil.which("postfix", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"  # Debian's daemon_directory
KEEP_DIRECTORY_ENV = "RELAYMILTER_KEEP_POSTFIX"  # =1 keeps instance directories for debugging

_MASTER_CF = """\
# service   type  private unpriv chroot wakeup maxproc command
{listen}    inet  n       -       n       -       -       smtpd
cleanup     unix  n       -       n       -       0       cleanup
qmgr        unix  n       -       n       300     1       qmgr
rewrite     unix  -       -       n       -       -       trivial-rewrite
bounce      unix  -       -       n       -       0       bounce
defer       unix  -       -       n       -       0       bounce
trace       unix  -       -       n       -       0       bounce
verify      unix  -       -       n       -       1       verify
flush       unix  n       -       n       1000?   0       flush
proxymap    unix  -       -       n       -       -       proxymap
showq       unix  n       -       n       -       -       showq
error       unix  -       -       n       -       -       error
retry       unix  -       -       n       -       -       error
anvil       unix  -       -       n       -       1       anvil
scache      unix  -       -       n       -       1       scache
tlsmgr      unix  -       -       n       1000?   1       tlsmgr
postlog     unix-dgram n  -       n       -       1       postlogd
# Delivery: the usual transport names, all discard(8).
discard     unix  -       -       n       -       -       discard
smtp        unix  -       -       n       -       -       discard
relay       unix  -       -       n       -       -       discard
local       unix  -       n       n       -       -       discard
virtual     unix  -       n       n       -       -       discard
"""


def ipv6_loopback_works() -> bool:
    """True when ::1 can be bound (containers often have IPv6 disabled)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostfixError(RuntimeError):
    """Postfix would not start, reload or stop; the message holds its output."""


class PostfixInstance:
    """A private Postfix instance; see the module docstring."""

    def __init__(
        self,
        milter: str | None = None,
        *,
        milter_default_action: str = "tempfail",
        milter_protocol: int = 6,
        milter_connect_timeout: str = "10s",
        milter_command_timeout: str = "10s",
        milter_content_timeout: str = "30s",
        local_domains: tuple[str, ...] = ("local.test",),
        extra_main_cf: dict[str, str] | None = None,
    ) -> None:
        self.milter = milter
        self.local_domains = tuple(local_domains)
        self.milter_settings = {
            "milter_default_action": milter_default_action,
            "milter_protocol": str(milter_protocol),
            "milter_connect_timeout": milter_connect_timeout,
            "milter_command_timeout": milter_command_timeout,
            "milter_content_timeout": milter_content_timeout,
        }
        self.extra_main_cf = dict(extra_main_cf or {})
        self.port = 0
        self.directory: Path | None = None
        self._config_path = ""  # kept after stop() so pids() can still look
        self._final_log = ""

    # -- paths -------------------------------------------------------------
    @property
    def config_directory(self) -> Path:
        return self._dir / "etc"

    @property
    def queue_directory(self) -> Path:
        return self._dir / "queue"

    @property
    def maillog(self) -> Path:
        return self._dir / "maillog"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def _dir(self) -> Path:
        if self.directory is None:
            raise PostfixError("instance not started")
        return self.directory

    # -- life cycle --------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        """Create the instance, start it and wait for its SMTP banner."""
        if self.directory is not None:
            raise PostfixError("instance already started")
        self.directory = Path(tempfile.mkdtemp(prefix="relaymilter-pf-"))
        self.directory.chmod(0o755)
        self._config_path = str(self.config_directory)
        self.queue_directory.mkdir()  # `postfix start` creates the rest
        try:
            self._start_master()
            self._wait_for_banner(timeout)
        except BaseException:
            self.stop()
            raise

    def reload(self, extra_main_cf: dict[str, str] | None = None) -> None:
        """Merge extra_main_cf into main.cf and `postfix reload`.

        Idle smtpd processes of the old configuration may still answer the
        next connection or two.
        """
        self.extra_main_cf.update(extra_main_cf or {})
        self._write_config()
        result = self._postfix("reload")
        if result.returncode != 0:
            raise PostfixError(f"postfix reload failed:\n{result.stdout}")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process of this instance and delete its directory.

        Safe to call twice and after a failed start; log_text() still works.
        """
        if self.directory is None:
            return
        master = self._master_pid()
        if master in self.pids():
            _signal(master, signal.SIGTERM)  # all `postfix stop` does, minus its 1 s naps
        if not self._wait_until_no_process(timeout):
            for pid in self.pids():
                _signal(pid, signal.SIGKILL)
            self._wait_until_no_process(timeout)
        self._final_log = self._raw_log()
        if os.environ.get(KEEP_DIRECTORY_ENV) != "1":
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None

    def pids(self) -> list[int]:
        """Live processes of this instance, master and children; [] once stopped.

        Found by the MAIL_CONFIG=<config dir> that `postfix -c` puts in the
        master's environment and the master hands to every child. A zombie's
        environ reads as empty, so dead processes are not listed.
        """
        if not self._config_path:
            return []
        marker = f"MAIL_CONFIG={self._config_path}".encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue  # exited meanwhile
            if marker in environ:
                pids.append(int(entry.name))
        return pids

    def __enter__(self) -> "PostfixInstance":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- log -----------------------------------------------------------------
    def log_text(self) -> str:
        """The instance's maillog so far (or as it was at stop())."""
        if self.directory is None:
            return self._final_log
        return self._raw_log()

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """First match of the regex (re.MULTILINE) in the log, waiting for it."""
        return wait_for_match(self.log_text, pattern, timeout, "Postfix")

    # -- configuration -----------------------------------------------------
    def main_cf(self) -> dict[str, str]:
        """The main.cf settings, in order; extra_main_cf wins."""
        first_domain = self.local_domains[0]
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_directory),
            "data_directory": str(self._dir / "data"),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self._dir),
            "myhostname": f"mx.{first_domain}",
            "mydomain": first_domain,
            "mydestination": ", ".join(["$myhostname", "localhost", *self.local_domains]),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "all" if ipv6_loopback_works() else "ipv4",
            "mynetworks": "127.0.0.0/8",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "smtpd_relay_restrictions": "check_client_access static:OK, reject_unauth_destination",
            "smtpd_authorized_xclient_hosts": "127.0.0.0/8",
            # No DNS of our own; smtp(8) is not even in master.cf (see above).
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_error_sleep_time": "0s",
            "in_flow_delay": "0s",
            "smtpd_soft_error_limit": "1000",
            "smtpd_hard_error_limit": "1000",
            "biff": "no",
            "smtpd_milters": self.milter or "",
            "non_smtpd_milters": "",
            **self.milter_settings,
        }
        settings.update(self.extra_main_cf)
        return settings

    def _write_config(self) -> None:
        self.config_directory.mkdir(exist_ok=True)
        lines = [f"{name} = {value}\n" for name, value in self.main_cf().items()]
        listen = f"127.0.0.1:{self.port}"
        files = {"main.cf": "".join(lines), "master.cf": _MASTER_CF.format(listen=listen)}
        an_hour_ago = time.time() - 3600
        for name, text in files.items():
            path = self.config_directory / name
            path.write_text(text)
            os.utime(path, (an_hour_ago, an_hour_ago))

    def _start_master(self) -> None:
        # Another process may take the port between our probe and master's bind.
        for _ in range(3):
            self.port = free_loopback_port()
            self._write_config()
            result = self._postfix("start")
            if result.returncode == 0:
                return
            if "Address already in use" not in result.stdout + self._raw_log():
                break
        raise PostfixError(f"postfix start failed:\n{self._explain_failure()}\n{self._raw_log()}")

    def _explain_failure(self) -> str:
        # postfix(1) prints configuration errors only to a terminal; script(1) gives it one.
        check = shlex.join([POSTFIX or "postfix", "-c", str(self.config_directory), "check"])
        result = subprocess.run(
            ["script", "-qec", check, "/dev/null"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        )
        return result.stdout

    def _wait_for_banner(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(self.address, timeout=timeout) as sock:
                    if re.match(rb"\d{3}[ -]", sock.makefile("rb").readline()):
                        sock.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise PostfixError(f"no SMTP banner on port {self.port}:\n{self._raw_log()}")
            time.sleep(0.05)

    def _wait_until_no_process(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _postfix(self, verb: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX or "postfix", "-c", str(self.config_directory), verb],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=60,
        )

    def _master_pid(self) -> int | None:
        try:
            return int((self.queue_directory / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _raw_log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except OSError:
            return ""


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
