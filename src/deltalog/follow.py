"""Follow a source: ``deltalog sync SRC DST --follow`` as a library.

A follower runs rounds. A round is one :func:`deltalog.sync.sync` (the
destination's writer lock is taken for the round and released after it, so
``compact``, ``status`` or a cron job can get in between; the source and,
where the sink allows it, the destination stay open across rounds, so their
memory maps stay warm); between rounds
the follower waits for the source's head to move with the source's
long-poll (``Source.wait_for_head``: the source side watches its own log,
so a commit reaches the follower in milliseconds and an idle follower costs
one request per ``interval``), never with a fixed sleep. A round that a
budget (--max-bytes, --deadline) stopped is followed at once by the next,
which continues the partial sync.

Failures that can pass (the peer went away, a lock held, an offset
compacted away under us, a source directory not there yet) close the
source and retry after an exponential :class:`Backoff` with jitter; the
destination's partial-sync state makes the retry resume where the last
chunk left off. Anything else (another model, a corrupt source, bad input)
ends the follower with its usual exit code.

A :class:`Stopper` turns SIGTERM and SIGINT into a stop at the next safe
point: a wait, a connection attempt or a backoff sleep is cut short at
once; a round in progress stops before its next chunk (each chunk is
applied atomically, and what arrived stays as resumable partial-sync
state), so the destination is always exactly at some head. A round stalled
on the network ends with --timeout; a second signal stops at once, as the
default action would (as safe as kill -9: the next writer repairs). :class:`TokenBucket` paces the bytes received
(--bwlimit): one bucket for all rounds, drained as each round starts, so
no round goes faster than the limit after an idle spell.

Nothing here prints: each round (and each retry) is handed to a callback
as a dict with the sync fields plus the lag (see :func:`follow`).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import (
    DeltalogError,
    HistoryUnproven,
    IntegrityError,
    LockHeld,
    NotAReplica,
    OffsetNotRetained,
    StorageError,
    TransportError,
)

DEFAULT_INTERVAL = 5.0  # seconds: the longest wait per poll, so an idle follower refreshes its lag this often
RETRYABLE = (TransportError, LockHeld, OffsetNotRetained, StorageError)
MAX_INTEGRITY_RETRIES = 3  # a corrupt transfer is retried this many times in a row, then it is fatal
_NAP_SLICE = 0.05  # a cut-short sleep notices a stop within this long


class StopRequested(BaseException):
    """Raised inside :meth:`Stopper.interruptible` sections when a stop is requested.

    A BaseException, so that ``except Exception`` on the way up does not swallow it.
    """


class Stopper:
    """A stop flag set by SIGTERM/SIGINT (:meth:`install`) or by :meth:`request`.

    The signal handler only sets the flag, except inside an
    :meth:`interruptible` section (a long-poll, a backoff sleep), where it
    raises :class:`StopRequested` to cut the wait short. Code outside those
    sections checks :attr:`requested` at its safe points.
    """

    def __init__(self) -> None:
        self.signal: int | None = None  # the signal that asked us to stop, if any
        self._requested = False
        self._armed = False

    @property
    def requested(self) -> bool:
        return self._requested

    def request(self, signum: int | None = None) -> None:
        """Ask the follower to stop (from any thread; only a signal cuts a wait short)."""
        if signum is not None and self.signal is None:
            self.signal = signum
        self._requested = True

    def _handler(self, signum, frame) -> None:
        if self._requested and self.signal is not None:
            # A second signal: stop now, as the default action would (like kill -9, which
            # leaves every replica valid: the next writer repairs a torn step).
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.request(signum)
        if self._armed:
            self._armed = False  # one raise per section, whatever follows
            raise StopRequested

    @contextmanager
    def installed(self, signals=(signal.SIGTERM, signal.SIGINT)) -> Iterator[Stopper]:
        """Handle ``signals`` with this stopper (main thread only), restoring the old handlers after."""
        previous = {s: signal.signal(s, self._handler) for s in signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """A section a signal may abort with StopRequested (a wait: nothing half-done in it)."""
        try:
            self._armed = True
            if self._requested:
                raise StopRequested
            yield
        finally:
            self._armed = False

    def sleep(self, seconds: float) -> None:
        """Sleep, cut short (StopRequested) by a stop."""
        with self.interruptible():
            self.nap(seconds)
        if self._requested:
            raise StopRequested

    def nap(self, seconds: float) -> None:
        """Sleep up to ``seconds``, returning early (no exception) once a stop is requested."""
        end = time.monotonic() + max(0.0, seconds)
        while not self._requested:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(_NAP_SLICE, left))


@dataclass
class Backoff:
    """Exponential backoff with jitter, capped: base, 2*base, 4*base, ... up to ``cap``.

    Each delay is drawn uniformly from [d * (1 - jitter), d] ("equal jitter"
    at 0.5), so followers cut off together do not all come back at once.
    :meth:`reset` after a success starts again from ``base``.
    """

    base: float = 0.25
    cap: float = 30.0
    factor: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def ceiling(self, attempt: int) -> float:
        """The largest delay of attempt number ``attempt`` (0-based)."""
        return min(self.cap, self.base * self.factor ** min(attempt, 64))

    def next_delay(self) -> float:
        d = self.ceiling(self.attempts)
        self.attempts += 1
        return d * (1.0 - self.jitter * self.rng.random())

    def reset(self) -> None:
        self.attempts = 0


class TokenBucket:
    """Paces a byte stream to ``rate`` bytes/s on average, short streams included.

    The bucket starts empty and fills at ``rate``, keeping at most ``burst``
    bytes of credit (default: a quarter second's worth, about one --bwlimit
    chunk: enough to credit the time spent applying a chunk while the next
    one is on its way, never a head start). :meth:`take` spends ``n`` tokens
    and sleeps until any debt is paid, before the bytes are used, so at the
    end of every take at most ``rate * t`` bytes have been taken in the ``t``
    seconds since the bucket was made or last :meth:`drain`-ed: the average
    over any transfer that starts with a drain stays at or under ``rate``.
    """

    def __init__(self, rate: float, burst: float | None = None, *, until: float | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate / 4)
        self.until = until  # --deadline, on ``clock``: a take whose wait would end later raises instead
        self._clock = clock
        self._sleep = sleep
        self.tokens = 0.0
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now

    def drain(self) -> None:
        """Drop any credit (a transfer starts: an idle spell before it buys nothing)."""
        self._refill()
        self.tokens = min(self.tokens, 0.0)

    def delay(self, n: int) -> float:
        """Seconds :meth:`take` would sleep for ``n`` bytes now."""
        self._refill()
        return max(0.0, (n - self.tokens) / self.rate)

    def take(self, n: int) -> float:
        """Spend ``n`` bytes of tokens, sleeping off any debt; returns the seconds slept for.

        sync.DeadlineReached, with nothing spent or slept, when the debt could
        not be paid before ``until``: those bytes would arrive too late to be used.
        """
        self._refill()
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        wait = -self.tokens / self.rate
        if self.until is not None and self._clock() + wait > self.until:
            self.tokens += n
            from .sync import DeadlineReached

            raise DeadlineReached
        self._sleep(wait)
        return wait


def chunk_bytes_for(bwlimit: int | None, chunk_bytes: int) -> int:
    """Chunks small enough to pace smoothly: about a quarter of a second's worth at --bwlimit."""
    if not bwlimit:
        return chunk_bytes
    return min(chunk_bytes, max(16 << 10, bwlimit // 4))


def piece_bytes_for(bwlimit: int | None) -> int:
    """Snapshot pieces (one request each) paced like chunks under --bwlimit."""
    from .transport.base import SNAPSHOT_PIECE_BYTES

    if not bwlimit:
        return SNAPSHOT_PIECE_BYTES
    return min(SNAPSHOT_PIECE_BYTES, max(16 << 10, bwlimit // 4))


def _error_info(exc: BaseException) -> dict:
    if isinstance(exc, DeltalogError):
        return {"type": type(exc).__name__, "message": str(exc), "hint": exc.hint, "exit_code": exc.exit_code}
    return {"type": type(exc).__name__, "message": str(exc), "hint": None, "exit_code": 20}


def follow(
    src: str,
    dst: str,
    *,
    source_name: str,
    destination_name: str,
    open_source: Callable[[str], object],
    open_sink: Callable[[str], object],
    interval: float = DEFAULT_INTERVAL,
    max_bytes: int | None = None,
    deadline: float | None = None,
    bwlimit: int | None = None,
    wait: float = 0.0,
    chunk_bytes: int | None = None,
    on_event: Callable[[dict], None] | None = None,
    stopper: Stopper | None = None,
    backoff: Backoff | None = None,
    max_rounds: int | None = None,
) -> dict:
    """Keep ``dst`` following ``src`` until ``stopper`` asks to stop (or ``max_rounds`` rounds ran).

    ``open_source(src)`` / ``open_sink(dst)`` make the transport objects
    (deltalog.transport.open_source / open_sink with the user's options).
    ``on_event`` gets one dict per round::

        {"event": "sync", "round": n, <SyncResult fields>, "lag_offsets", "lag_seconds",
         "waited": seconds spent waiting for the source before the round, "time": unix time}

    one per failed attempt::

        {"event": "retry", "round": n, "source", "destination", "error": {type, message,
         hint, exit_code}, "retry_in": seconds, "attempt": k}

    Returns the final summary ``{"event": "stopped", "rounds", "head", "signal"}``
    (the same dict is also passed to ``on_event``). Raises the error of a
    failure that cannot pass.
    """
    from .sync import sync
    from .transport.base import DEFAULT_CHUNK_BYTES

    stopper = stopper or Stopper()
    backoff = backoff or Backoff(cap=max(30.0, interval))
    emit = on_event or (lambda event: None)
    bucket = TokenBucket(bwlimit, sleep=stopper.nap) if bwlimit else None
    chunk = chunk_bytes_for(bwlimit, chunk_bytes or DEFAULT_CHUNK_BYTES)
    source = None
    sink = None
    known: int | None = None  # the source head we last saw: wait until it moves past it
    need_wait = False
    rounds = 0
    head: int | None = None
    last_in_sync: float | None = None
    integrity_failures = 0
    polling_fallback = False  # the source cannot long-poll: sleep `interval` between rounds

    def drop_sink() -> None:
        nonlocal sink
        if sink is not None:
            with contextlib.suppress(Exception):  # a broken session: closed, reopened next round
                sink.close()
            sink = None

    def drop_source() -> None:
        nonlocal source
        if source is not None:
            with contextlib.suppress(Exception):  # it is being given up on anyway
                source.close()
            source = None

    try:
        while not stopper.requested and (max_rounds is None or rounds < max_rounds):
            stage = "source"
            waited = 0.0
            try:
                if source is None:
                    with stopper.interruptible():  # an ssh login or a dead host can hang here
                        source = open_source(src)
                if need_wait and known is not None:
                    started = time.monotonic()
                    if polling_fallback:
                        stopper.sleep(interval)
                    else:
                        try:
                            with stopper.interruptible():
                                source.wait_for_head(known, interval)
                        except (NotImplementedError, AttributeError):
                            polling_fallback = True
                            stopper.sleep(interval)
                    waited = time.monotonic() - started
                stage = "sync"
                round_started = time.monotonic()  # --deadline counts per round, from after the wait
                if sink is None:
                    sink = open_sink(dst)
                if bucket is not None:
                    bucket.drain()
                    bucket.until = None if deadline is None else round_started + deadline
                ok = False
                try:
                    result = sync(
                        source, sink, source_name=source_name, destination_name=destination_name,
                        max_bytes=max_bytes, deadline=deadline, wait=wait, chunk_bytes=chunk,
                        piece_bytes=piece_bytes_for(bwlimit),
                        throttle=bucket.take if bucket is not None else None,
                        should_stop=lambda: stopper.requested, started=round_started,
                    )
                    ok = True
                finally:
                    end_round = getattr(sink, "end_round", None)
                    if ok and end_round is not None and getattr(sink, "reusable", False):
                        end_round()  # the lock goes, the session stays
                    else:
                        drop_sink()
            except StopRequested:
                break
            except DeltalogError as exc:
                drop_sink()
                if stopper.requested:
                    break  # e.g. Ctrl-C reached the ssh child too: its pipe broke because we are stopping
                retry = isinstance(exc, RETRYABLE) or (isinstance(exc, NotAReplica) and stage == "source")
                retry = retry and not isinstance(exc, HistoryUnproven)  # no retry makes the proof appear
                if isinstance(exc, IntegrityError):
                    integrity_failures += 1
                    retry = integrity_failures <= MAX_INTEGRITY_RETRIES
                if not retry:
                    raise
                if isinstance(exc, (TransportError, IntegrityError, NotAReplica)) or not getattr(
                    source, "reusable", True
                ):
                    drop_source()  # reconnect: the peer (or its pipe) is not to be trusted as it is
                delay = backoff.next_delay()
                emit({"event": "retry", "round": rounds + 1, "source": source_name, "destination": destination_name,
                      "error": _error_info(exc), "retry_in": round(delay, 3), "attempt": backoff.attempts,
                      "time": time.time()})
                try:
                    stopper.sleep(delay)
                except StopRequested:
                    break
                need_wait = False  # after a failure, look at once
                continue
            rounds += 1
            backoff.reset()
            integrity_failures = 0
            known = result.source_head
            head = result.head
            now = time.time()
            if result.complete:
                last_in_sync = now
            # A round the deadline stopped before anything moved would only repeat itself at once:
            # it waits for the source like a complete one (a too-short --deadline must not spin).
            need_wait = result.complete or (result.stopped_by == "deadline" and result.bytes_sent == 0)
            if not getattr(source, "reusable", True):
                drop_source()  # e.g. an ssh pipe still holding the stream a budget stopped
            event = {"event": "sync", "round": rounds, **result.to_json()}
            event.pop("plan", None)
            event.pop("dry_run", None)
            event.update(
                lag_offsets=max(0, int(result.source_head or 0) - int(result.head or 0)),
                lag_seconds=0.0 if result.complete else (
                    None if last_in_sync is None else round(now - last_in_sync, 3)),
                waited=round(waited, 6),
                time=now,
            )
            emit(event)
    finally:
        drop_sink()
        drop_source()
    summary = {"event": "stopped", "rounds": rounds, "head": head,
               "signal": signal.Signals(stopper.signal).name if stopper.signal else None}
    emit(summary)
    return summary
