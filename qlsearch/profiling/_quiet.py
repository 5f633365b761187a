"""A quiet machine for timing: trials pause while one configuration's latency is measured.

Trials of a sweep run side by side on one node's cores (or GPU), so a forward
timed next to a training neighbour measures the neighbour too. Here every
trial *works* under a shared lock and offers to yield it at each forward of its
model; a measurement takes the lock exclusively, so its timed rounds start once
every neighbour has finished its current step, and the neighbours resume when
it ends. Training pays one non-blocking ``flock`` per forward.

Two ``flock`` files in one folder per node and user (``QLSEARCH_QUIET_DIR``, by
default under the temp dir) do this across processes (Ray's trial workers):

* ``work``: each trial holds it shared while it runs; a measurement holds it
  exclusively while it times.
* ``gate``: a measurement holds it exclusively from the moment it asks.
  Linux does not queue an exclusive ``flock`` ahead of later shared ones, so
  without the gate two trainers could hand the shared lock to each other forever;
  with it, a trainer that yields cannot come back until the measurement is done.

The kernel drops a dead process's locks, so a crashed trial never blocks the
others. A neighbour that holds ``work`` without reaching a forward (pre-training
a backbone, loading data) is waited for, up to ``timeout_s``; after that the
measurement runs anyway and says so (``quiet: False``). Scope: one node. Trials
on other nodes of a Ray cluster are not paused (they do not share its cores).
POSIX only: where ``fcntl`` is missing, nothing is paused and ``quiet`` is False.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from torch import nn

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

#: Environment variable naming the lock folder (tests give each run its own).
QUIET_DIR_ENV = "QLSEARCH_QUIET_DIR"


def default_quiet_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(os.environ.get(QUIET_DIR_ENV) or Path(tempfile.gettempdir()) / f"qlsearch-quiet-{uid}")


class QuietDevice:
    """The two locks of one folder, as seen by this process (use ``quiet_device()``)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._gate = open(self.folder / "gate", "a+")  # noqa: SIM115  (held for the process's life)
        self._work = open(self.folder / "work", "a+")  # noqa: SIM115
        self._depth = 0  # nesting of working(): the shared lock is held while > 0

    # ---- the trainers' side ----

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Hold the machine (shared with other trials) for the block; re-entrant."""
        if self._depth == 0:
            self._enter()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._leave()

    def yield_point(self) -> None:
        """Where a trainer lets a waiting measurement run: release, wait for it, take back."""
        if self._depth == 0 or fcntl is None or not self._gate_closed():
            return
        self._leave()
        self._enter()

    def yield_on_forward(self, model: nn.Module) -> list:
        """Forward pre-hooks on ``model`` and on every submodule that can ``generate``
        (a wrapper's ``generate`` calls its base model's forward, not its own)."""
        modules = [model, *(m for m in model.modules() if m is not model and callable(getattr(m, "generate", None)))]
        return [m.register_forward_pre_hook(lambda *_: self.yield_point()) for m in modules]

    def _gate_closed(self) -> bool:
        try:
            fcntl.flock(self._gate, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._gate, fcntl.LOCK_UN)
        return False

    def _enter(self) -> None:
        if fcntl is None:
            return
        fcntl.flock(self._gate, fcntl.LOCK_SH)  # waits out a measurement that asked first
        fcntl.flock(self._work, fcntl.LOCK_SH)
        fcntl.flock(self._gate, fcntl.LOCK_UN)

    def _leave(self) -> None:
        if fcntl is not None:
            fcntl.flock(self._work, fcntl.LOCK_UN)

    # ---- the measurement's side ----

    @contextlib.contextmanager
    def quiet(self, timeout_s: float = 600.0) -> Iterator[dict]:
        """The machine to this process alone for the block (this process's own ``working``
        hold is set aside meanwhile). Yields ``{"quiet": bool, "waited_s": float}``."""
        started = time.monotonic()
        state = {"quiet": False, "waited_s": 0.0}
        if fcntl is None:
            yield state
            return
        held = self._depth > 0
        if held:
            self._leave()
        try:
            fcntl.flock(self._gate, fcntl.LOCK_EX)  # only another measurement holds it long
            state["quiet"] = self._lock_work(started + timeout_s)
            state["waited_s"] = time.monotonic() - started
            try:
                yield state
            finally:
                fcntl.flock(self._work, fcntl.LOCK_UN)
                fcntl.flock(self._gate, fcntl.LOCK_UN)
        finally:
            if held:
                self._enter()

    def _lock_work(self, deadline: float) -> bool:
        while True:
            try:
                fcntl.flock(self._work, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.005)


@functools.cache
def _device_for(folder: Path) -> QuietDevice:
    return QuietDevice(folder)


def quiet_device(folder: str | Path | None = None) -> QuietDevice:
    """This process's view of the node's quiet lock (one per folder: ``flock`` locks
    belong to an open file, so two views in one process would block each other)."""
    return _device_for(Path(folder or default_quiet_dir()).resolve())
