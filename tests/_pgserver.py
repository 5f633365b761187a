"""A throwaway PostgreSQL server for the storage tests: its own data folder and port, so
restarting or stopping it disturbs no other test (nor the shared server on 5432).

Built from the Debian binaries (/usr/lib/postgresql/<version>/bin); as root they run as
the ``postgres`` user (``runuser``), which owns the server's folder.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Server:
    """``url`` logs in as a role whose password is long and random (``password``), over TCP."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="qlpg-"))  # short: a socket path has ~100 chars
        self.data = self.folder / "data"
        self.port = _free_port()
        self.password = "Pw-" + secrets.token_hex(12)
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_postgres:
            shutil.chown(self.folder, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8")
        self.start()
        self.psql(f"CREATE ROLE storetest LOGIN PASSWORD '{self.password}'")
        self.psql("CREATE DATABASE storetest OWNER storetest")
        self.url = f"postgresql://storetest:{self.password}@localhost:{self.port}/storetest"

    def _run(self, tool: str, *args: str) -> str:
        done = subprocess.run([*self.as_postgres, str(self.bin / tool), *args], capture_output=True,
                              text=True, timeout=120, cwd=self.folder)
        if done.returncode:
            raise RuntimeError(f"{tool} failed: {done.stderr or done.stdout}")
        return done.stdout

    def psql(self, sql: str) -> str:
        return self._run("psql", "-h", str(self.folder), "-p", str(self.port), "-U", "postgres", "-qAtc", sql)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-l", str(self.folder / "log"), "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=localhost", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "fast", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        subprocess.run([*self.as_postgres, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)
