"""SSH to the destination: paramiko for the agent's JSON channel and simple commands, and the matching
OpenSSH argv (same user, port, identity and known_hosts, strict host keys) for rsync and the tunnel.

The operator's ssh_config (~/.ssh/config, then /etc/ssh/ssh_config, as ssh(1) reads them) applies as it did
to vzmigrate, which ran ssh: a Host alias's HostName, User, Port, IdentityFile, UserKnownHostsFile and
GlobalKnownHostsFile, unless the command line gives them (user@, :port, --ssh-key, --known-hosts). They are
resolved once, here, and given explicitly to both paramiko and OpenSSH (`-F /dev/null`), so both reach the
same host with the same identity; the system's known_hosts (/etc/ssh/ssh_known_hosts) is consulted too.

Host keys are always verified against one known_hosts file (and the system's): an unknown host is refused with its
fingerprint and how to accept it, unless `accept_new` (OpenSSH's StrictHostKeyChecking=accept-new) was
asked for; a changed key is always refused. Nothing here builds a shell string from unquoted input: a
remote argv is quoted with shlex.join (sshd runs it through the remote user's shell).
"""

from __future__ import annotations

import base64
import errno
import glob
import hashlib
import ipaddress
import os
import re
import shlex
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from vzpy.migrate import (
    AuthFailed,
    CantConnect,
    ConnectionTimeout,
    HostKeyMismatch,
    HostKeyUnknown,
    MigrateUsage,
    Unreachable,
)
from vzpy.migrate.protocol import Connection

DEFAULT_USER = "root"
DEFAULT_PORT = 22
DEFAULT_TIMEOUT = 10.0
KEEPALIVE = 15
ENV_KNOWN_HOSTS = "VZPY_KNOWN_HOSTS"
SYSTEM_SSH_CONFIG = Path("/etc/ssh/ssh_config")
SYSTEM_KNOWN_HOSTS = Path("/etc/ssh/ssh_known_hosts")
INCLUDE_RE = re.compile(r"^\s*Include\s+(.+?)\s*$", re.IGNORECASE)
MAX_INCLUDE_DEPTH = 16  # ssh's READCONF_MAX_DEPTH
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
STDERR_TAIL_BYTES = 8192
USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9-]{1,63})*\.?$")
# A path OpenSSH and rsync take as one word: no whitespace (UserKnownHostsFile splits on it), no quotes.
SAFE_PATH_RE = re.compile(r"^[^\s'\"\\]+$")

# AES-GCM first where the CPU has AES instructions (twice chacha20's speed with AES-NI, see
# bench/transport); OpenSSH's default order otherwise. "^" puts them at the head of OpenSSH's defaults.
GCM_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
CPUINFO = Path("/proc/cpuinfo")

SocketFactory = Callable[[int], socket.socket]


# --- the target -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    user: str
    host: str
    port: int = DEFAULT_PORT
    # from the operator's ssh_config for this host (parse_target): used unless the command line names others
    identity_file: Path | None = field(default=None, compare=False)
    user_known_hosts: Path | None = field(default=None, compare=False)
    global_known_hosts: Path | None = field(default=None, compare=False)

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names this host: `host`, or `[host]:port` off port 22."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    @property
    def ssh_destination(self) -> str:
        """user@host for OpenSSH's command line (the port goes in -p)."""
        return f"{self.user}@{self.host}"

    def rsync_spec(self, path: str) -> str:
        """user@host:path for rsync (IPv6 in brackets)."""
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        return f"{self.user}@{host}:{path}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.is_ipv6 else self.host
        port = "" if self.port == DEFAULT_PORT else f":{self.port}"
        return f"{self.user}@{host}{port}"


def parse_target(
    text: str, *, default_port: int = DEFAULT_PORT, ssh_config: paramiko.SSHConfig | None = None
) -> Target:
    """`[user@]host[:port]` (IPv6 as `[addr]` or `[addr]:port`); MigrateUsage (exit 1) if malformed.

    What the text leaves out comes from ssh_config's entry for host (default: the operator's files), as ssh
    does: HostName, User, Port, and the identity and known_hosts files for SshSession.connect."""
    user, at, rest = text.rpartition("@")
    host, port = _split_host_port(rest, text, 0)  # 0: no port given (a given one is 1..65535)
    host = _validate_host(host, text)
    entry = _lookup(ssh_config or operator_ssh_config(), host)
    if not at:
        user = entry.get("user") or DEFAULT_USER
    if not USER_RE.match(user):
        raise MigrateUsage(f"invalid user {user!r} in destination {text!r}: use [user@]host[:port]")
    if not port:
        port = _parse_port(entry["port"], f"{text} (Port in ssh_config)") if "port" in entry else default_port
    real_host = _validate_host(entry.get("hostname") or host, f"{text} (HostName in ssh_config)")
    return Target(
        user=user,
        host=real_host,
        port=port,
        identity_file=next((Path(p) for p in entry.get("identityfile", []) if Path(p).is_file()), None),
        user_known_hosts=_config_path(entry.get("userknownhostsfile")),
        global_known_hosts=_config_path(entry.get("globalknownhostsfile")),
    )


def operator_ssh_config() -> paramiko.SSHConfig:
    """~/.ssh/config then /etc/ssh/ssh_config, read as one (ssh's order: the first value found wins), with
    their `Include`s (Debian's /etc/ssh/ssh_config.d/*.conf) inlined, which paramiko does not do itself."""
    user_dir = Path.home() / ".ssh"
    texts = [_config_text(user_dir / "config", user_dir), _config_text(SYSTEM_SSH_CONFIG, SYSTEM_SSH_CONFIG.parent)]
    try:
        return paramiko.SSHConfig.from_text("\n".join(texts))
    except Exception as e:  # paramiko's parse errors have no common base
        raise MigrateUsage(f"cannot parse ssh_config (~/.ssh/config or {SYSTEM_SSH_CONFIG}): {e}; fix it") from e


def _config_text(path: Path, base: Path, depth: int = 0) -> str:
    """A config file's text with its Include lines replaced by the files they name (relative to `base`, as ssh
    resolves them: ~/.ssh for the user's, /etc/ssh for the system's), at most MAX_INCLUDE_DEPTH deep."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise MigrateUsage(f"cannot read ssh_config {path}: {e.strerror}") from e
    lines = []
    for line in text.splitlines():
        match = INCLUDE_RE.match(line)
        if not match:
            lines.append(line)
            continue
        if depth >= MAX_INCLUDE_DEPTH:
            raise MigrateUsage(f"ssh_config {path}: Include nested more than {MAX_INCLUDE_DEPTH} deep")
        try:
            patterns = shlex.split(match.group(1))
        except ValueError as e:
            raise MigrateUsage(f"ssh_config {path}: bad Include line {line.strip()!r}: {e}") from e
        for pattern in patterns:
            full = os.path.join(base, os.path.expanduser(pattern))
            lines += [_config_text(Path(name), base, depth + 1) for name in sorted(glob.glob(full))]
    return "\n".join(lines)


def _lookup(config: paramiko.SSHConfig, host: str) -> dict[str, Any]:
    try:
        return dict(config.lookup(host))
    except Exception as e:  # e.g. `Match exec`, which paramiko cannot evaluate here
        raise MigrateUsage(f"cannot apply ssh_config to {host}: {e}; simplify its Host/Match blocks") from e


def _config_path(value: str | None) -> Path | None:
    """The first file of a known_hosts list in ssh_config (~ expanded); `none` is no file."""
    words = (value or "").split()
    if not words:
        return None
    return Path("/dev/null") if words[0].lower() == "none" else Path(os.path.expanduser(words[0]))


def _split_host_port(rest: str, text: str, default_port: int) -> tuple[str, int]:
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise MigrateUsage(f"invalid destination {text!r}: write an IPv6 address as [addr] or [addr]:port")
        return host, _parse_port(tail[1:], text) if tail else default_port
    if rest.count(":") > 1:  # a bare IPv6 address
        return rest, default_port
    host, colon, port = rest.partition(":")
    return host, _parse_port(port, text) if colon else default_port


def _parse_port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise MigrateUsage(f"invalid port {text!r} in destination {where!r}: use a number from 1 to 65535")
    return int(text)


def _validate_host(host: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not HOSTNAME_RE.match(host):
        raise MigrateUsage(f"invalid host {host!r} in destination {text!r}: use a host name or an IP address")
    return host


def safe_path(path: str | os.PathLike[str], what: str) -> Path:
    """An absolute path usable as one word in ssh and rsync options (MigrateUsage otherwise)."""
    absolute = Path(os.path.abspath(os.fspath(path)))
    if not SAFE_PATH_RE.match(str(absolute)):
        raise MigrateUsage(f"{what} {str(path)!r}: the path may not contain spaces, quotes or backslashes")
    return absolute


def default_known_hosts() -> Path:
    return Path(os.environ.get(ENV_KNOWN_HOSTS) or Path.home() / ".ssh" / "known_hosts")


def cpu_has_aes(cpuinfo: Path = CPUINFO) -> bool:
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(
        key.strip() in ("flags", "Features") and "aes" in value.split()
        for key, _, value in (line.partition(":") for line in text.splitlines())
    )


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint: `SHA256:` + unpadded base64 of the key blob's SHA-256."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


# --- OpenSSH options for the same destination ------------------------------------------------------------


@dataclass(frozen=True)
class OpenSsh:
    """How the OpenSSH client reaches the destination the paramiko session reached: same user, port,
    identity and known_hosts, with strict host keys and no prompts. Paths are validated by safe_path."""

    target: Target
    known_hosts: Path
    key: Path | None = None
    connect_timeout: int = int(DEFAULT_TIMEOUT)
    extra_options: tuple[tuple[str, str], ...] = ()
    prefer_gcm: bool = field(default_factory=cpu_has_aes)
    global_known_hosts: Path | None = None

    def options(self) -> list[str]:
        opts = [
            ("BatchMode", "yes"),
            ("StrictHostKeyChecking", "yes"),
            ("UserKnownHostsFile", str(self.known_hosts)),
            ("GlobalKnownHostsFile", str(self.global_known_hosts or "/dev/null")),
            ("ConnectTimeout", str(self.connect_timeout)),
            ("ServerAliveInterval", "10"),
            ("ServerAliveCountMax", "3"),
            ("LogLevel", "ERROR"),
            *((("IdentitiesOnly", "yes"),) if self.key else ()),
            *((("Ciphers", "^" + ",".join(GCM_CIPHERS)),) if self.prefer_gcm else ()),
            *self.extra_options,
        ]
        identity = ["-i", str(self.key)] if self.key else []
        return ["-F", "/dev/null", "-p", str(self.target.port), *identity, *(f"-o{k}={v}" for k, v in opts)]

    def argv(self, *extra: str) -> list[str]:
        """`ssh OPTIONS EXTRA... -- user@host` (add a remote command after it yourself, quoted)."""
        return ["ssh", *self.options(), *extra, "--", self.target.ssh_destination]

    def rsh(self) -> str:
        """The value of rsync's -e: `ssh OPTIONS`, one string of space-separated words (rsync splits it
        on spaces itself). Every word comes from validated parts: nothing in it needs quoting."""
        words = ["ssh", *self.options()]
        bad = [word for word in words if not SAFE_PATH_RE.match(word)]
        if bad:
            raise MigrateUsage(f"cannot pass {bad[0]!r} to rsync's ssh command: no spaces or quotes allowed")
        return " ".join(words)


# --- the paramiko session -------------------------------------------------------------------------------


class _StrictPolicy(paramiko.MissingHostKeyPolicy):
    """Refuse an unknown host key, naming its fingerprint and how to accept it; or, with accept_new,
    append it to known_hosts (mismatches never reach a policy: paramiko raises BadHostKeyException)."""

    def __init__(self, target: Target, known_hosts: Path, accept_new: bool) -> None:
        self.target = target
        self.known_hosts = known_hosts
        self.accept_new = accept_new
        self.accepted: str | None = None

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        described = f"{key.get_name()} {fingerprint(key)}"
        if not self.accept_new:
            keyscan = f"ssh-keyscan -p {self.target.port} {self.target.host} >> {self.known_hosts}"
            raise HostKeyUnknown(
                f"host key of {self.target.host} is unknown: {described}; verify it and add it with "
                f"`{keyscan}` or pass --known-hosts"
            )
        _append_known_host(self.known_hosts, hostname, key)
        client.get_host_keys().add(hostname, key.get_name(), key)
        self.accepted = described


def _append_known_host(path: Path, hostname: str, key: paramiko.PKey) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")


@dataclass
class SshSession:
    """One authenticated SSH connection to the destination."""

    target: Target
    client: paramiko.SSHClient
    known_hosts: Path
    key: Path | None
    timeout: float
    accepted_new_key: str | None = None
    system_known_hosts: Path | None = None
    _closed: bool = field(default=False, repr=False)

    @classmethod
    def connect(
        cls,
        target: Target,
        key: str | os.PathLike[str] | None = None,
        known_hosts: str | os.PathLike[str] | None = None,
        accept_new: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        socket_factory: SocketFactory | None = None,
    ) -> SshSession:
        """Connect and authenticate with keys only. `socket_factory(family)` makes the (unconnected) TCP
        socket, e.g. in another network namespace; default: a plain socket. `key` and `known_hosts` (and
        VZPY_KNOWN_HOSTS) override what the target's ssh_config entry names."""
        from_config = None if os.environ.get(ENV_KNOWN_HOSTS) else target.user_known_hosts
        known = safe_path(known_hosts or from_config or default_known_hosts(), "--known-hosts")
        key_path = _explicit_key(key if key is not None else target.identity_file)
        system_known = _system_known_hosts(target)
        client = paramiko.SSHClient()
        _load_known_hosts(client, known)
        if system_known:
            _load_known_hosts(client, system_known, system=True)
        policy = _StrictPolicy(target, known, accept_new)
        client.set_missing_host_key_policy(policy)
        sock = _connect_socket(target, timeout, socket_factory)
        try:
            client.connect(
                target.host,
                port=target.port,
                username=target.user,
                sock=sock,
                timeout=timeout,
                banner_timeout=timeout,
                auth_timeout=timeout,
                channel_timeout=timeout,
                transport_factory=_transport,
                **_auth_kwargs(key_path),
            )
        except BaseException as e:
            client.close()
            sock.close()
            raise _connect_error(e, target, known, key_path) from e
        client.get_transport().set_keepalive(KEEPALIVE)  # type: ignore[union-attr]  # connected: it has one
        return cls(target, client, known, key_path, timeout, policy.accepted, system_known)

    # --- using it

    @property
    def transport(self) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise CantConnect(f"the SSH connection to {self.target} is closed")
        return transport

    def openssh(self, *, extra_options: tuple[tuple[str, str], ...] = ()) -> OpenSsh:
        """OpenSSH options reaching the same destination with the same identity and known_hosts."""
        return OpenSsh(
            self.target,
            self.known_hosts,
            self.key,
            int(self.timeout),
            extra_options=extra_options,
            global_known_hosts=self.system_known_hosts,
        )

    def exec_json(self, argv: Sequence[str]) -> Connection:
        """Run argv on the destination and speak the JSON line protocol with it over its stdin/stdout."""
        channel = self._exec(argv)
        return Connection(ChannelStream(channel, shlex.join(argv)), peer=str(self.target))

    def run(self, argv: Sequence[str], *, input: bytes = b"", timeout: float = 60.0) -> tuple[int, str, str]:
        """Run argv on the destination; (exit code, stdout, stderr). ConnectionTimeout after `timeout`."""
        channel = self._exec(argv)
        try:
            if input:
                channel.sendall(input)
            channel.shutdown_write()
            out, err = _drain(channel, time.monotonic() + timeout, shlex.join(argv), self.target)
            return channel.recv_exit_status(), out.decode(errors="replace"), err.decode(errors="replace")
        finally:
            channel.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.client.close()

    def __enter__(self) -> SshSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _exec(self, argv: Sequence[str]) -> paramiko.Channel:
        if not argv:
            raise ValueError("empty remote argv")
        try:
            channel = self.transport.open_session(timeout=self.timeout)
            channel.exec_command(shlex.join(argv))
        except paramiko.SSHException as e:
            raise CantConnect(f"cannot run {argv[0]} on {self.target}: {e}") from e
        return channel


def _transport(sock: Any, /, **kw: Any) -> paramiko.Transport:  # sock: whatever SSHClient.connect was given
    """paramiko's transport, with AES-GCM first when the CPU has AES instructions."""
    transport = paramiko.Transport(sock, **kw)
    if cpu_has_aes():
        options = transport.get_security_options()
        known = tuple(options.ciphers)
        options.ciphers = tuple(c for c in GCM_CIPHERS if c in known) + tuple(c for c in known if c not in GCM_CIPHERS)
    return transport


def _drain(channel: paramiko.Channel, deadline: float, what: str, target: Target) -> tuple[bytes, bytes]:
    out, err = bytearray(), bytearray()
    channel.settimeout(0.2)
    while True:
        while channel.recv_stderr_ready():
            err += channel.recv_stderr(65536)
        try:
            chunk = channel.recv(65536)
        except TimeoutError:
            chunk = None
        if chunk == b"" and channel.exit_status_ready():
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(65536)
            return bytes(out), bytes(err)
        if chunk:
            out += chunk
        if time.monotonic() > deadline:
            raise ConnectionTimeout(f"`{what}` on {target} did not finish in time")


def _explicit_key(key: str | os.PathLike[str] | None) -> Path | None:
    if key is None:
        return None
    path = safe_path(key, "--ssh-key")
    if not path.is_file():
        raise MigrateUsage(f"--ssh-key {path}: no such file")
    return path


def _auth_kwargs(key: Path | None) -> dict[str, Any]:
    """Keys only: the explicit key alone, else ssh-agent and ~/.ssh/id_{ed25519,ecdsa,rsa}."""
    if key is not None:
        return {"key_filename": str(key), "allow_agent": False, "look_for_keys": False}
    defaults = [str(p) for name in DEFAULT_KEYS if (p := Path.home() / ".ssh" / name).is_file()]
    return {"key_filename": defaults or None, "allow_agent": True, "look_for_keys": False}


def _system_known_hosts(target: Target) -> Path | None:
    """The system-wide known_hosts (ssh_config's GlobalKnownHostsFile, else /etc/ssh/ssh_known_hosts), if any."""
    path = target.global_known_hosts or SYSTEM_KNOWN_HOSTS
    return safe_path(path, "GlobalKnownHostsFile") if path.is_file() else None


def _load_known_hosts(client: paramiko.SSHClient, path: Path, *, system: bool = False) -> None:
    """The user's known_hosts (accept-new appends to it), or with `system` one only read."""
    if not path.exists():
        return
    try:
        if system:
            client.load_system_host_keys(str(path))
        else:
            client.get_host_keys().load(str(path))
    except (OSError, paramiko.SSHException) as e:
        raise MigrateUsage(f"cannot read known_hosts {path}: {e}") from e


def _connect_socket(target: Target, timeout: float, factory: SocketFactory | None) -> socket.socket:
    """A TCP socket connected to the target (Unreachable, one line, otherwise)."""
    where = f"{target.host} port {target.port}"
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise Unreachable(f"cannot connect to {where}: unknown host ({e.strerror})") from e
    family, _, _, _, address = infos[0]
    sock = factory(family) if factory else socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except TimeoutError as e:
        sock.close()
        raise Unreachable(f"cannot connect to {where}: no answer within {timeout:g}s") from e
    except OSError as e:
        sock.close()
        reason = os.strerror(e.errno) if e.errno else str(e)
        if e.errno == errno.EHOSTUNREACH:
            reason = "host unreachable"
        raise Unreachable(f"cannot connect to {where}: {reason.lower()}") from e
    return sock


def _connect_error(e: BaseException, target: Target, known: Path, key: Path | None) -> BaseException:
    """The one-line error for a failed SSH handshake or authentication."""
    if isinstance(e, CantConnect | KeyboardInterrupt | SystemExit):
        return e
    if isinstance(e, paramiko.BadHostKeyException):
        return HostKeyMismatch(
            f"host key of {target.host} does not match {known}: it offered {e.key.get_name()} "
            f"{fingerprint(e.key)}, known_hosts has {fingerprint(e.expected_key)}; if the host was "
            f"reinstalled remove the old key with `ssh-keygen -R {target.known_hosts_name} -f {known}`, "
            "otherwise someone may be intercepting the connection"
        )
    if isinstance(e, paramiko.PasswordRequiredException):
        return AuthFailed(f"SSH key {key or 'in ~/.ssh'} is encrypted: load it into ssh-agent or pass --ssh-key")
    if isinstance(e, paramiko.AuthenticationException):
        tried = str(key) if key else "ssh-agent and ~/.ssh/" + ", ~/.ssh/".join(DEFAULT_KEYS)
        return AuthFailed(
            f"{target.user}@{target.host} refused our SSH key ({tried}): add its public key to "
            f"{target.user}'s authorized_keys there, or pass --ssh-key"
        )
    if isinstance(e, TimeoutError | socket.timeout):
        return Unreachable(f"SSH handshake with {target} timed out")
    if isinstance(e, paramiko.SSHException | OSError | EOFError):
        return CantConnect(f"SSH handshake with {target} failed: {e or type(e).__name__}")
    return e


# --- a channel as a protocol stream ---------------------------------------------------------------------


class ChannelStream:
    """A paramiko exec channel as a byte stream for protocol.Connection; keeps the tail of stderr."""

    def __init__(self, channel: paramiko.Channel, command: str) -> None:
        self.channel = channel
        self.command = command
        self._stderr = bytearray()

    def read(self, size: int, timeout: float | None) -> bytes:
        self.channel.settimeout(timeout)
        try:
            data = self.channel.recv(size)
        except TimeoutError as e:
            raise TimeoutError(str(e)) from e
        finally:
            self._drain_stderr()
        return data

    def write(self, data: bytes) -> None:
        try:
            self.channel.sendall(data)
        except OSError as e:
            raise BrokenPipeError(str(e)) from e

    def close(self) -> None:
        self.channel.close()

    def describe_end(self) -> str:
        """Why the peer went away: its exit status and the last lines it wrote to stderr."""
        self._drain_stderr()
        parts = []
        if self.channel.exit_status_ready():
            parts.append(f"`{self.command}` exited with code {self.channel.recv_exit_status()}")
        tail = self._stderr.decode(errors="replace").strip().splitlines()[-4:]
        if tail:
            parts.append(" / ".join(tail))
        return "; ".join(parts)

    def exit_status(self, timeout: float = 5.0) -> int | None:
        deadline = time.monotonic() + timeout
        while not self.channel.exit_status_ready():
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return self.channel.recv_exit_status()

    def _drain_stderr(self) -> None:
        while self.channel.recv_stderr_ready():
            self._stderr += self.channel.recv_stderr(65536)
        del self._stderr[:-STDERR_TAIL_BYTES]
