"""Leases: claims on the work units of one entry, so several jobs can write it at once.

Several processes, on one machine or many, may extract the same entry into one root. They split
the work instead of repeating it: before computing unit ``u`` a job *claims* it by creating
``<entry>/<LEASES_DIR>/<u:06d>.<generation:04d>.json`` (``LEASES_DIR`` from
:mod:`embedkit.store.layout`) with :meth:`CacheRoot.create_exclusive` (one creator wins: hard
link on filesystems, ``If-None-Match: *`` on S3). The claim names its owner (host, pid, a random
token) and its ``ttl_s``, and holds a heartbeat counter that a background
thread of the owner rewrites every ``ttl_s / 3`` seconds.

A claim is *expired* when a waiter has seen the same heartbeat content for ``ttl_s`` seconds on
its own monotonic clock: no clock is compared across machines. Taking an expired claim over
means creating the next generation, which again only one taker can do. A job that lost a claim
race moves on to another unit; when nothing is claimable it polls until units complete (then
the entry is finalized, once: its completion record is created exclusively too) or a claim expires.

A claim whose owner stopped cleanly (an error, Ctrl-C) is marked ``released`` and is taken over
without waiting, and so is one whose owner ran on this machine, in this pid namespace (same
Linux boot id and ``/proc/self/ns/pid``), and is no longer running (killed, crashed): rerunning
a killed command resumes at once. Owners elsewhere are judged by their heartbeat only. Before
writing a unit the owner checks that no newer generation exists; a job whose claim was taken
over does not write it. What remains: an owner paused for longer than the ttl right after that
check (SIGSTOP, a frozen VM) may write the unit after the taker did. The features of a unit are
deterministic, so both writes hold the same bytes (given the same hardware and library versions)
and the unit record is valid either way; ``embedkit cache verify`` checks it.

The layout of a new entry (``zarr.json`` and the arrays' metadata) is created under the claim
named ``layout``, so exactly one job creates it and the others wait and open it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from embedkit.errors import ConfigError
from embedkit.store.layout import COMPLETE_FILE, LEASES_DIR, unit_record_name
from embedkit.store.root import CacheRoot

if TYPE_CHECKING:
    from embedkit.store.entry import FeatureEntry

__all__ = [
    "DEFAULT_TTL_S",
    "LEASES_DIR",
    "TTL_ENV",
    "Leases",
    "Owner",
    "live_claims",
    "resolve_ttl",
]

log = logging.getLogger(__name__)

#: Seconds without a visible heartbeat after which another job takes a claim over.
DEFAULT_TTL_S = 60.0
#: Environment variable that overrides :data:`DEFAULT_TTL_S` (e.g. ``EMBEDKIT_LEASE_TTL=20``).
TTL_ENV = "EMBEDKIT_LEASE_TTL"
LAYOUT = "layout"
_CLAIM_FILE = re.compile(r"^(\d{6}|layout)\.(\d{4,})\.json$")
#: Settling time before re-reading a claim on stores whose create is only best-effort.
_SETTLE_S = 0.5


def resolve_ttl(ttl_s: float | None = None) -> float:
    """The lease ttl: ``ttl_s`` if given, else ``$EMBEDKIT_LEASE_TTL``, else 60 s."""
    raw: object = ttl_s if ttl_s is not None else os.environ.get(TTL_ENV, DEFAULT_TTL_S)
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0:
        source = "--lease-ttl" if ttl_s is not None else f"${TTL_ENV}"
        raise ConfigError(
            f"Expected a lease ttl in seconds > 0 ({source}), got {raw!r} instead. "
            f"The default is {DEFAULT_TTL_S:g}."
        )
    return value


@dataclass(frozen=True, slots=True)
class Owner:
    """Who holds a claim: one process (or one rank of a torchrun job)."""

    host: str
    pid: int
    token: str
    rank: int | None = None
    #: Boot id and pid namespace of the owner's machine (Linux), where its pid is meaningful.
    machine: str | None = None

    @classmethod
    def this_process(cls, rank: int | None = None) -> Owner:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex, rank, _MACHINE)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"host": self.host, "pid": self.pid, "token": self.token}
        if self.rank is not None:
            out["rank"] = self.rank
        if self.machine is not None:
            out["machine"] = self.machine
        return out


def _machine_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


_MACHINE = _machine_id()


def _owner_gone(owner: object) -> bool:
    """Whether a claim's owner ran here (same machine id) and its process no longer runs."""
    if _MACHINE is None or not isinstance(owner, dict) or owner.get("machine") != _MACHINE:
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's process
        return False
    try:  # a killed process its parent has not reaped yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _claim_name(name: str, generation: int) -> str:
    return f"{name}.{generation:04d}.json"


def _unit_name(u: int) -> str:
    return f"{u:06d}"


@dataclass(slots=True)
class _Held:
    generation: int
    beats: int = 0


@dataclass(slots=True)
class _Seen:
    content: bytes
    since: float


@dataclass
class Leases:
    """This job's claims on one entry (``root``/``relpath``), with their heartbeat thread.

    Use it as a context manager: the heartbeat runs inside, and claims still held on exit are
    marked released so that other jobs take them over at once.
    """

    root: CacheRoot
    relpath: str
    ttl_s: float = field(default_factory=resolve_ttl)
    owner: Owner = field(default_factory=Owner.this_process)
    #: How often a waiting job looks again (default: see :attr:`poll_interval`).
    poll_s: float | None = None
    #: Claims taken inside a complete entry on purpose (``embedkit cache repair``); otherwise
    #: a complete entry gets no claim file rewritten (see :meth:`_write`).
    in_complete_entry: bool = False
    _held: dict[str, _Held] = field(default_factory=dict, init=False, repr=False)
    _seen: dict[tuple[str, int], _Seen] = field(default_factory=dict, init=False, repr=False)
    _mutex: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)
    _atomic: bool | None = field(default=None, init=False, repr=False)
    _shortest_ttl: float = field(default=float("inf"), init=False, repr=False)

    @property
    def poll_interval(self) -> float:
        """Seconds between looks while waiting: ``poll_s``, else a sixth of the shortest ttl
        (ours or of a claim we watch) within [0.05, 10]."""
        if self.poll_s is not None:
            return self.poll_s
        return min(10.0, max(0.05, min(self.ttl_s, self._shortest_ttl) / 6))

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> Leases:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._heartbeat, name="embedkit-lease-heartbeat", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            left = list(self._held.items())
            self._held.clear()
        for name, held in left:  # hand unfinished work over without making others wait
            with contextlib.suppress(OSError):
                self._write(name, held, released=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            with self._mutex:  # under the lock: a released claim is never rewritten as held
                for name, h in self._held.items():
                    h.beats += 1
                    try:
                        self._write(name, h)
                    except OSError as exc:  # keep trying: the claim expires only after ttl_s
                        log.warning("lease heartbeat for %s failed: %s", self._path(name, h), exc)

    # ---- claim files ----------------------------------------------------------------------

    def _dir(self) -> str:
        return f"{self.relpath}/{LEASES_DIR}"

    def _path(self, name: str, h: _Held | int) -> str:
        generation = h.generation if isinstance(h, _Held) else h
        return f"{self._dir()}/{_claim_name(name, generation)}"

    def _body(self, name: str, h: _Held, *, released: bool = False) -> bytes:
        return json.dumps(
            {
                "claim": name,
                "generation": h.generation,
                "owner": self.owner.to_dict(),
                "ttl_s": self.ttl_s,
                "heartbeat": h.beats,
                "released": released,
            }
        ).encode()

    def _write(self, name: str, h: _Held, *, released: bool = False) -> None:
        """Rewrite a held claim (heartbeat, release), never into a complete entry: a job that
        finishes after another finalized the entry (which removed the claims) leaves no
        claim behind."""
        done = f"{self.relpath}/{COMPLETE_FILE}"
        if self.in_complete_entry:
            self.root.write_bytes_atomic(
                self._path(name, h), self._body(name, h, released=released)
            )
            return
        if self.root.exists(done):
            return
        path = self._path(name, h)
        self.root.write_bytes_atomic(path, self._body(name, h, released=released))
        if self.root.exists(done):  # finalized meanwhile: take back what we just wrote
            with contextlib.suppress(OSError):
                self.root.remove_tree(self._dir())

    def generations(self) -> dict[str, int]:
        """The newest generation of every claim present (one listing)."""
        out: dict[str, int] = {}
        for fname in self.root.listdir(self._dir()):
            m = _CLAIM_FILE.match(fname)
            if m:
                out[m.group(1)] = max(out.get(m.group(1), -1), int(m.group(2)))
        return out

    def _conditional_ok(self) -> bool:
        """Whether creates are atomic here; an S3 store that ignores If-None-Match is caught."""
        if self._atomic is None:
            atomic = self.root.exclusive_create == "atomic"
            if atomic and not self.root.is_local:
                probe = f"{self._dir()}/.probe-{self.owner.token}"
                first = self.root.create_exclusive(probe, b"probe")
                second = self.root.create_exclusive(probe, b"probe")
                with contextlib.suppress(OSError):
                    self.root.remove_tree(probe)
                atomic = first and not second
            if not atomic:
                log.warning(
                    "%s: this store does not refuse a second create of one object; claims on "
                    "its units are best-effort (two jobs may compute the same unit, with "
                    "identical results). See docs/sharing.md.",
                    self.root.url(self.relpath),
                )
            self._atomic = atomic
        return self._atomic

    def try_claim(self, name: str, generation: int) -> bool:
        """Create claim ``name`` at ``generation``; whether this job now holds it."""
        h = _Held(generation)
        if not self.root.create_exclusive(self._path(name, h), self._body(name, h)):
            return False
        if not self._conditional_ok():  # last writer wins: keep it only if it is still ours
            time.sleep(_SETTLE_S)
            if self._owner_token(name, generation) != self.owner.token:
                return False
        with self._mutex:
            self._held[name] = h
        return True

    def _owner_token(self, name: str, generation: int) -> str | None:
        try:
            doc = json.loads(self.root.read_small(self._path(name, generation)))
            return str(doc["owner"]["token"])
        except (FileNotFoundError, KeyError, TypeError, ValueError):
            return None

    def holds(self, name: str) -> bool:
        """Whether this job still holds claim ``name`` (no newer generation was created)."""
        with self._mutex:
            h = self._held.get(name)
        return h is not None and not self.root.is_file(self._path(name, h.generation + 1))

    def release(self, name: str, *, mark: bool = False) -> None:
        """Stop heartbeating ``name``; its work is written (the file stays until finalize).

        ``mark``: also rewrite the claim as released, for claims whose completion is not
        visible from a unit record (the layout).
        """
        with self._mutex:
            h = self._held.pop(name, None)
            if h is not None and mark:
                self._write(name, h, released=True)

    def claimable(self, name: str, newest: int | None) -> int | None:
        """The generation to create to claim ``name`` now, or None while someone holds it.

        ``newest`` is the newest generation present (None: never claimed). A claim is free
        when released, or when its content has not changed for its ttl as seen by this job.
        """
        if newest is None:
            return 0
        with self._mutex:
            if name in self._held:
                return None
        key = (name, newest)
        try:
            content = self.root.read_small(self._path(name, newest))
        except FileNotFoundError:
            return newest + 1  # removed meanwhile (the entry is being finalized or removed)
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is None or seen.content != content:
            self._seen[key] = _Seen(content, now)
            seen = self._seen[key]
        try:
            doc = json.loads(content)
            ttl = float(doc.get("ttl_s", self.ttl_s))
            released = bool(doc.get("released", False)) or _owner_gone(doc.get("owner"))
        except (ValueError, TypeError, AttributeError):  # being written: judge by its age
            ttl, released = self.ttl_s, False
        self._shortest_ttl = min(self._shortest_ttl, ttl)
        if released or now - seen.since >= ttl:
            return newest + 1
        return None

    def acquire(self, name: str, *, done: Callable[[], bool]) -> bool:
        """Block until this job holds ``name`` (True) or ``done()`` says it is not needed."""
        while True:
            if done():
                return False
            newest = self.generations().get(name)
            generation = self.claimable(name, newest)
            if generation is not None and self.try_claim(name, generation):
                return True
            time.sleep(self.poll_interval)

    # ---- units of an entry ------------------------------------------------------------------

    def claim_unit(self, entry: FeatureEntry, prefer: Sequence[int] = ()) -> int | None:
        """Claim one pending unit of ``entry`` that nobody holds; None if there is none now.

        Units in ``prefer`` are tried first (a torchrun rank's share), then the others in order.
        """
        done = entry.done_units()
        newest = self.generations()
        rest = [u for u in range(entry.n_units) if u not in set(prefer)]
        for u in [*prefer, *rest]:
            if u in done:
                continue
            generation = self.claimable(_unit_name(u), newest.get(_unit_name(u)))
            if generation is None or not self.try_claim(_unit_name(u), generation):
                continue
            if entry.has_unit(u):  # written by another job between the listing and the claim
                self.release(_unit_name(u))
                continue
            return u
        return None

    def iter_units(self, entry: FeatureEntry, prefer: Sequence[int] = ()) -> Iterator[int]:
        """Claim units one at a time, as the caller asks for them, until none is claimable."""
        while (u := self.claim_unit(entry, prefer)) is not None:
            yield u

    def holds_unit(self, u: int) -> bool:
        return self.holds(_unit_name(u))

    def release_unit(self, u: int) -> None:
        self.release(_unit_name(u))

    def wait_for_units(
        self, entry: FeatureEntry, on_poll: Callable[[int], None] | None = None
    ) -> bool:
        """Poll until every unit is written (False) or one becomes claimable (True).

        ``on_poll(n_done)`` is called at every look (for a progress display).
        """
        while True:
            done = entry.done_units()
            if on_poll is not None:
                on_poll(len(done))
            if len(done) >= entry.n_units:
                return False
            newest = self.generations()
            for u in range(entry.n_units):
                if u not in done:
                    name = _unit_name(u)
                    if self.claimable(name, newest.get(name)) is not None:
                        return True
            time.sleep(self.poll_interval)


def live_claims(
    root: CacheRoot, relpath: str, *, slack: float = 2.0, now: _dt.datetime | None = None
) -> list[str]:
    """Claims of ``relpath`` that look held right now, judged by wall-clock modification time.

    A claim counts as live unless it is released, its unit is written, its owner is known to be
    gone (see :class:`Leases`), or its file is older than ``slack`` times its ttl. This compares
    the store's clock with ours, so it is a guard for removal (``--overwrite``, ``gc``), not
    what jobs use to take claims over.
    """
    now = now or _dt.datetime.now(_dt.UTC)
    newest: dict[str, int] = {}
    for fname in root.listdir(f"{relpath}/{LEASES_DIR}"):
        m = _CLAIM_FILE.match(fname)
        if m:
            newest[m.group(1)] = max(newest.get(m.group(1), -1), int(m.group(2)))
    live = []
    for name, generation in sorted(newest.items()):
        if name != LAYOUT and root.exists(f"{relpath}/{unit_record_name(int(name))}"):
            continue
        path = f"{relpath}/{LEASES_DIR}/{_claim_name(name, generation)}"
        st = root.stat(path)
        if st is None or st.mtime is None:
            continue
        try:
            doc = json.loads(root.read_bytes(path))
            ttl = float(doc.get("ttl_s", DEFAULT_TTL_S))
            released = bool(doc.get("released")) or _owner_gone(doc.get("owner"))
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            ttl, released = DEFAULT_TTL_S, False
        if not released and (now - st.mtime).total_seconds() < slack * ttl:
            live.append(path)
    return live
