"""sendmail_instance - a private, open-relay Sendmail on loopback for tests.

NAME
    sendmail_instance - start and stop a throw-away Sendmail daemon

SYNOPSIS
    with SendmailInstance(milter="inet:8894@127.0.0.1") as sendmail:
        ...connect to ("127.0.0.1", sendmail.port), from any 127.x.y.z...
        sendmail.wait_for_log(r"Milter: connect to filters")

DESCRIPTION
    Debian's sendmail-bin conflicts with the postfix package, so it is never
    installed: scripts/fetch-sendmail unpacks it (and sendmail-cf) into
    SENDMAIL_ROOT. Each instance lives in its own temporary directory: an
    .mc built into sendmail.cf with m4, a queue, the files its private
    /etc shows, and its log. It listens on 127.0.0.1 at a free port chosen
    at start and relays for everyone (FEATURE(`promiscuous_relay')), so the
    milter under test is the only thing between a client and an open relay.
    Nothing leaves the machine: DeliveryMode is queueonly and no queue runner
    is started, so accepted mail stays in the instance's queue (deleted at
    stop), and the local mailer is /bin/true in case anything were run.

    The daemon runs as root in the foreground (`sendmail -bD`) as our child,
    inside a private mount namespace (`unshare -m`, private propagation)
    where these are bind-mounted from the instance directory:
    /etc/resolv.conf (nameserver 127.0.0.1, 1 s, 1 attempt), /etc/nsswitch.conf
    (files only), /etc/hosts (the host name fully qualified), and a fresh
    tmpfs /dev with null, zero, full, random, urandom, tty and a /dev/log that
    is a datagram socket this module reads: Sendmail logs only to syslog.
    The namespace's mounts vanish with its last process. Every process of the
    instance shares that namespace, which is how pids() finds them.

    Sendmail facts this module depends on (measured on Debian 12, Sendmail
    8.17.1.9 from sendmail-bin, in a gVisor sandbox as root):
    - The binary is /usr/libexec/sendmail/sendmail in the package; it links
      libwrap.so.0 and liblockfile (packages libwrap0, liblockfile1, not
      pulled in by postfix): fetch-sendmail installs sendmail-bin's Depends.
    - An .mc needs OSTYPE(`linux') (not Debian's debian.m4, which wants
      sendmail-base's files); FEATURE(`no_default_msa') or it also listens
      on port 587; MODIFY_MAILER_FLAGS(`LOCAL', `-w') before MAILER(`local'),
      or any local user who is not in /etc/passwd gets "550 5.1.1 User
      unknown" before the milter is asked.
    - A milter unix socket under /tmp is refused at start ("local socket
      name ... unsafe: World writable directory"): tests attach the milter
      over TCP (S=inet:PORT@127.0.0.1).
    - With confDOMAIN_NAME set and /etc/hosts qualifying the host name,
      the daemon answers within a second; `sendmail -bD` stays in our
      process group and, on SIGTERM, signals its per-connection children
      and exits.
    - Sendmail honours the milter's macro request (SMFIF_SETSYMLIST): it
      then sends exactly the requested macros, whatever the
      Milter.macros.* options say. It reports the client's name as
      "[127.0.0.5]" when reverse lookup fails (files only here).
    - {rcpt_addr} is the address part of the resolved mailer triple: for a
      local recipient it is only the user ("user", "postmaster"), without a
      domain; for a remote one "user@remote.test". Sendmail itself rewrites
      user%remote@local, remote!user@local, @local:user@remote and
      "user@remote"@local into user@remote.test with mailer esmtp, i.e. it
      would relay them; the milter sees the RCPT argument as the client wrote
      it. user@[127.0.0.1] and user@$j resolve to the local mailer.
    - Over a TCP milter socket each RCPT costs about 44 ms (Nagle and
      delayed ACK: the macros and the RCPT go out as two writes).
    - Sendmail offers AUTH DIGEST-MD5 CRAM-MD5 (its default mechanism list)
      even with no SASL set-up, and logs that it found no Sendmail.conf.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from logwait import wait_for_match

SENDMAIL_ROOT = Path(os.environ.get("RELAYMILTER_SENDMAIL_ROOT", "/opt/relaymilter-test/sendmail"))
SENDMAIL = SENDMAIL_ROOT / "usr/libexec/sendmail/sendmail"
SENDMAIL_CF_DIR = SENDMAIL_ROOT / "usr/share/sendmail/cf"
M4 = shutil.which("m4")
UNSHARE = shutil.which("unshare", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/bin"]))
KEEP_DIRECTORY_ENV = "RELAYMILTER_KEEP_SENDMAIL"  # =1 keeps instance directories for debugging
SYSLOG_TAG = "sendmail-test"
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

# Runs inside the new mount namespace: $1 is the instance directory, the
# rest is the sendmail command line.
_NAMESPACE_SCRIPT = """\
set -e
dir=$1; shift
mount --bind "$dir/etc/resolv.conf" /etc/resolv.conf
mount --bind "$dir/etc/nsswitch.conf" /etc/nsswitch.conf
mount --bind "$dir/etc/hosts" /etc/hosts
mount --bind /dev "$dir/host-dev"
mount -t tmpfs -o mode=755,size=1m relaymilter-sendmail-dev /dev
for device in {devices}; do
    touch "/dev/$device"
    mount --bind "$dir/host-dev/$device" "/dev/$device"
done
umount "$dir/host-dev"
ln -s /proc/self/fd /dev/fd
touch /dev/log
mount --bind "$dir/syslog.sock" /dev/log
exec "$@"
""".format(devices=" ".join(DEVICES))


def sendmail_missing() -> str | None:
    """Why a Sendmail instance cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "Sendmail tests run Sendmail as root in a private mount namespace: run them as root"
    for path in (SENDMAIL, SENDMAIL_CF_DIR / "m4/cf.m4"):
        if not path.exists():
            return f"Sendmail is not unpacked ({path} is missing)"
    if M4 is None:
        return "m4 is not installed"
    if UNSHARE is None:
        return "unshare (util-linux) is not installed"
    return None


def sasl_plugin_directory() -> Path | None:
    """Where Cyrus SASL's plugins are (Debian: /usr/lib/<triplet>/sasl2)."""
    for plugin in sorted(Path("/usr/lib").glob("*/sasl2/libplain.so*")):
        return plugin.parent
    return None


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class SendmailError(RuntimeError):
    """Sendmail would not build its config, start or stop; the message says why."""


class SyslogReceiver:
    """A datagram socket that stands for /dev/log; appends each message to a file."""

    def __init__(self, socket_path: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(socket_path))
        self._socket.settimeout(0.1)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sendmail-syslog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.log_path, "ab", buffering=0) as log:
            while not self._stopping.is_set():
                try:
                    datagram = self._socket.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                # "<22>Dec  1 14:41:56 tag[pid]: text": keep "tag[pid]: text".
                line = re.sub(rb"^<\d+>\w{3} [ \d]\d \d\d:\d\d:\d\d ", b"", datagram)
                log.write(line.rstrip(b"\0\n") + b"\n")

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._socket.close()


class SendmailInstance:
    """A private Sendmail daemon; see the module docstring."""

    def __init__(
        self,
        milter: str | None = None,
        *,
        milter_flags: str = "T",
        milter_timeouts: str = "C:10s;S:10s;R:20s;E:5m",
        local_domains: tuple[str, ...] = ("local.test",),
        extra_mc: tuple[str, ...] = (),
        auth_users: dict[str, str] | None = None,
    ) -> None:
        self.milter = milter
        self.milter_flags = milter_flags
        self.milter_timeouts = milter_timeouts
        self.local_domains = tuple(local_domains)
        self.extra_mc = tuple(extra_mc)
        self.auth_users = dict(auth_users or {})
        self.port = 0
        self.directory: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._syslog: SyslogReceiver | None = None
        self._namespace = ""
        self._final_log = ""
        self._sasl_mount = ""

    # -- paths -------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def hostname(self) -> str:
        return f"mx.{self.local_domains[0]}"

    @property
    def maillog(self) -> Path:
        return self._dir / "maillog"

    @property
    def queue_directory(self) -> Path:
        return self._dir / "queue"

    @property
    def _dir(self) -> Path:
        if self.directory is None:
            raise SendmailError("instance not started")
        return self.directory

    # -- life cycle --------------------------------------------------------
    def start(self, timeout: float = 30.0, attempts: int = 3) -> None:
        """Build sendmail.cf, start the daemon and wait for its SMTP banner."""
        missing = sendmail_missing()
        if missing:
            raise SendmailError(missing)
        if self.directory is not None:
            raise SendmailError("instance already started")
        self.directory = Path(tempfile.mkdtemp(prefix="relaymilter-sm-"))
        try:
            self._write_files()
            if self.auth_users:
                self._write_sasl()
            self._syslog = SyslogReceiver(self._dir / "syslog.sock", self.maillog)
            for _ in range(attempts):
                self.port = free_loopback_port()
                self._build_cf()
                if self._run(timeout):
                    return
            raise SendmailError(f"no free port in {attempts} attempts:\n{self.log_text()}")
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every process of this instance and delete its directory.

        Safe to call twice and after a failed start; log_text() still works.
        """
        if self.directory is None:
            return
        self._terminate(timeout)
        if self._syslog is not None:
            self._syslog.close()
            self._syslog = None
        self._final_log = self._raw_log()
        if os.environ.get(KEEP_DIRECTORY_ENV) != "1":
            shutil.rmtree(self.directory, ignore_errors=True)
        self.directory = None

    def pids(self) -> list[int]:
        """Live processes of this instance (daemon and connection children)."""
        if not self._namespace:
            return []
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "mnt") != self._namespace:
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue  # exited meanwhile
            if state != "Z":
                found.append(int(entry.name))
        return found

    def __enter__(self) -> "SendmailInstance":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- log -----------------------------------------------------------------
    def log_text(self) -> str:
        """Everything Sendmail logged so far (or until stop())."""
        if self.directory is None:
            return self._final_log
        return self._raw_log()

    def wait_for_log(self, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """First match of the regex (re.MULTILINE) in the log, waiting for it."""
        return wait_for_match(self.log_text, pattern, timeout, "Sendmail")

    # -- configuration -----------------------------------------------------
    def mc_text(self) -> str:
        """The .mc this instance is built from."""
        d = self._dir
        lines = [
            "divert(-1)",
            "# relaymilter test instance: an open relay that delivers nothing.",
            "divert(0)dnl",
            f"include(`{SENDMAIL_CF_DIR}/m4/cf.m4')dnl",
            "VERSIONID(`relaymilter test instance')dnl",
            "OSTYPE(`linux')dnl",
            f"define(`confDOMAIN_NAME', `{self.hostname}')dnl",
            f"define(`QUEUE_DIR', `{d / 'queue'}')dnl",
            f"define(`confPID_FILE', `{d / 'sendmail.pid'}')dnl",
            f"define(`STATUS_FILE', `{d / 'statistics'}')dnl",
            f"define(`HELP_FILE', `{d / 'helpfile'}')dnl",
            f"define(`confSERVICE_SWITCH_FILE', `{d / 'service.switch'}')dnl",
            f"define(`confHOSTS_FILE', `{d / 'etc/hosts'}')dnl",
            "define(`ALIAS_FILE', `')dnl",
            "define(`confDELIVERY_MODE', `queueonly')dnl",
            "define(`confDONT_PROBE_INTERFACES', `true')dnl",
            # A loaded CI machine must not make Sendmail queue or refuse.
            "define(`confQUEUE_LA', `1000')dnl",
            "define(`confREFUSE_LA', `1000')dnl",
            "define(`confLOG_LEVEL', `9')dnl",
            "define(`LOCAL_MAILER_PATH', `/bin/true')dnl",
            "define(`LOCAL_MAILER_ARGS', `true')dnl",
            "FEATURE(`promiscuous_relay')dnl",
            "FEATURE(`no_default_msa')dnl",
            "FEATURE(`nocanonify')dnl",
            "FEATURE(`accept_unresolvable_domains')dnl",
            "FEATURE(`accept_unqualified_senders')dnl",
            f"DAEMON_OPTIONS(`Family=inet, Addr=127.0.0.1, Port={self.port}, Name=MTA')dnl",
            *[f"LOCAL_DOMAIN(`{domain}')dnl" for domain in self.local_domains],
            *self.extra_mc,
        ]
        if self.auth_users:
            lines += ["define(`confAUTH_MECHANISMS', `PLAIN LOGIN')dnl",
                      "TRUST_AUTH_MECH(`PLAIN LOGIN')dnl"]
        if self.milter:
            lines.append(f"INPUT_MAIL_FILTER(`relaymilter', `S={self.milter}, "
                         f"F={self.milter_flags}, T={self.milter_timeouts}')dnl")
        lines += [
            "MODIFY_MAILER_FLAGS(`LOCAL', `-w')dnl",
            "MAILER(`local')dnl",
            "MAILER(`smtp')dnl",
        ]
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        d = self._dir
        for name in ("queue", "etc", "host-dev"):
            (d / name).mkdir(mode=0o700)
        host = socket.gethostname().split(".")[0]
        files = {
            "etc/resolv.conf": "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
            "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n"
                                 "networks: files\nservices: files\n",
            # Sendmail sleeps at start when it cannot qualify its host name.
            "etc/hosts": f"127.0.0.1 localhost\n127.0.0.1 {self.hostname} {host}\n::1 localhost\n",
            "service.switch": "hosts files\naliases files\n",
            "helpfile": "",
            "statistics": "",
        }
        for name, text in files.items():
            (d / name).write_text(text)
            (d / name).chmod(0o644)

    def _write_sasl(self) -> None:
        """A copy of the SASL plugin directory with Sendmail.conf and a sasldb.

        The copy is bind-mounted over the original inside the namespace, at
        a path Sendmail searches for Sendmail.conf and finds safe. sasldb2
        is a Berkeley DB hash of "user\\0realm\\0userPassword" -> password
        (the realm is $j); Perl's DB_File writes it without sasl2-bin.
        """
        plugins = sasl_plugin_directory()
        if plugins is None:
            raise SendmailError("no SASL PLAIN plugin (Debian: apt-get install libsasl2-modules)")
        copy = self._dir / "sasl2"
        shutil.copytree(plugins, copy, symlinks=True)
        (copy / "Sendmail.conf").write_text(
            "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            f"sasldb_path: {plugins}/sasldb2\n")
        entries = "".join(f"{user}\t{password}\n" for user, password in self.auth_users.items())
        script = ('use DB_File; use Fcntl; my %db; tie %db, "DB_File", $ARGV[0], O_RDWR|O_CREAT,'
                  ' 0600, $DB_HASH or die "$ARGV[0]: $!"; while (<STDIN>) { chomp;'
                  ' my ($user, $password) = split /\t/; $db{"$user\\0$ARGV[1]\\0userPassword"}'
                  ' = $password } untie %db or die;')
        subprocess.run(["perl", "-e", script, str(copy / "sasldb2"), self.hostname],
                       input=entries, text=True, check=True, timeout=60)
        self._sasl_mount = f'mount --bind "$dir/sasl2" {plugins}\n'

    def _build_cf(self) -> None:
        mc = self._dir / "sendmail.mc"
        mc.write_text(self.mc_text())
        built = subprocess.run([M4 or "m4", str(mc)], capture_output=True, text=True, timeout=60)
        # promiscuous_relay's "configures your system as open relay" warning is expected.
        errors = [line for line in built.stderr.splitlines()
                  if line.strip() and "open" not in line and "Internet" not in line]
        if built.returncode != 0 or errors:
            raise SendmailError(f"m4 {mc} failed:\n{built.stderr}")
        (self._dir / "sendmail.cf").write_text(built.stdout)

    def _run(self, timeout: float) -> bool:
        """Start once; True when the banner comes, False when the port was taken."""
        script = _NAMESPACE_SCRIPT.replace('exec "$@"', self._sasl_mount + 'exec "$@"')
        command = [UNSHARE, "--mount", "--propagation", "private", "sh", "-c", script,
                   "sendmail-namespace", str(self._dir), str(SENDMAIL), "-C",
                   str(self._dir / "sendmail.cf"), "-bD", "-L", SYSLOG_TAG]
        with open(self._dir / "output.txt", "ab") as output:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        log_start = len(self.log_text())
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise SendmailError(f"sendmail exited with {self._process.returncode}:\n"
                                    f"{self._output()}\n{self.log_text()}")
            if not self._namespace:
                self._namespace = self._namespace_of(self._process.pid)
            if "cannot bind: Address already in use" in self.log_text()[log_start:]:
                self._terminate(10.0)
                return False
            if self._answers():
                return True
            if time.monotonic() > deadline:
                raise SendmailError(f"no SMTP banner on port {self.port}:\n"
                                    f"{self._output()}\n{self.log_text()}")
            time.sleep(0.05)

    def _namespace_of(self, pid: int) -> str:
        """The mount namespace of pid once it differs from ours (unshare is done)."""
        try:
            namespace = os.readlink(f"/proc/{pid}/ns/mnt")
        except OSError:
            return ""
        return "" if namespace == os.readlink("/proc/self/ns/mnt") else namespace

    def _answers(self) -> bool:
        """The banner probe reaches the milter as a connect from 127.0.0.1, no HELO."""
        try:
            with socket.create_connection(self.address, timeout=5) as sock:
                if re.match(rb"\d{3}[ -]", sock.makefile("rb").readline()):
                    sock.sendall(b"QUIT\r\n")
                    return True
        except OSError:
            pass
        return False

    def _terminate(self, timeout: float) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        deadline = time.monotonic() + timeout
        while self.pids():                     # connection children, if any outlived it
            if time.monotonic() > deadline:
                for pid in self.pids():
                    _signal(pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        self._namespace = ""

    def _output(self) -> str:
        try:
            return (self._dir / "output.txt").read_text(errors="replace")
        except OSError:
            return ""

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
