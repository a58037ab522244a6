"""The background closer: one thread with a selector applies close policies to many
sockets, so that the thread that handed a socket over is not held for the policy's
bounds.

A synchronous server's worker answers, then calls :meth:`BackgroundCloser.close`: the
socket is checked, detached from the caller's ``socket`` object and queued (a few
microseconds); the closer's thread takes it over, runs the same close plan as
:func:`tcpclose.close` (``_plan.ClosePlan`` through the sync driver's steps), but
waits for the peer with its selector instead of a blocking ``poll``, and hands each
:class:`CloseReport` to ``on_close``.

What must live here: the hand-over, the bound on sockets held, the overflow rule,
the selector loop and its timers, shutdown. What must not: close logic (the plan's)
or socket steps (the sync driver's).

Bounded: the closer holds at most ``max_sockets`` sockets (queued or being closed).
A hand-over beyond that is an *overflow*: the socket is closed at once in the calling
thread, like :func:`tcpclose.close`, with ``overflow_policy`` (None, the default: the
hand-over's own policy, so no data guarantee is lost and the caller is held for at
most that policy's bounds: back-pressure). An overflow is counted
(:attr:`BackgroundCloser.overflows`), logged at debug level, and its report goes to
``on_close`` like any other, with ``trigger="overflow"``.
"""

from __future__ import annotations

import atexit
import collections
import heapq
import itertools
import logging
import os
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self, TypeAlias

from . import _checks, _observe
from ._kernel._sockopt import read_tcp_state
from ._kernel._types import TcpState
from ._plan import Close, Event, Finished, Receive
from ._policy import ClosePolicy, PolicyLike, as_policy
from ._report import CloseReport
from ._sync import _Driver, _take_socket

__all__ = ("BackgroundCloser", "OnClose", "close_in_background", "default_closer")

logger = logging.getLogger("tcpclose")

OnClose: TypeAlias = Callable[[CloseReport], object]

#: Sockets one closer holds by default (queued or being closed): each holds an fd.
DEFAULT_MAX_SOCKETS: Final = 4096

_NEVER: Final = float("inf")
_POLICY_CACHE_SIZE: Final = 64


class _Job(_Driver):
    """One socket being closed by the closer's thread: the sync driver's steps, with
    the waits for the peer done by the closer's selector."""

    __slots__ = ("_selector", "fd", "on_close", "registered", "wake")

    def __init__(
        self,
        sock: socket.socket,
        policy: ClosePolicy,
        state: TcpState,
        on_close: OnClose | None,
        selector: selectors.BaseSelector,
    ) -> None:
        super().__init__(
            sock, policy, report=on_close is not None, allow_data_loss=False, state=state
        )
        self._selector = selector
        self.fd = sock.fileno()
        self.on_close = on_close
        #: Monotonic time at which the current wait ends.
        self.wake = _NEVER
        self.registered = False

    def start(self) -> None:
        self._prepare()

    def advance(self) -> Finished | None:
        """Run the steps that need no waiting. Returns :class:`Finished` when the plan
        is over (the fd is closed); None when it waits for the peer (registered for
        reading) until :attr:`wake`."""
        plan = self._plan
        clock = self._clock
        while True:
            action = plan.next_action()
            if isinstance(action, Finished):
                self.unregister()
                return action
            if not isinstance(action, Receive):
                if isinstance(action, Close):
                    self.unregister()  # before the fd number can be reused
                self._step(action)
                continue
            now = clock()
            if self._pending is not None:  # an error met after data, fed now
                event, self._pending = self._pending, None
                plan.feed(event, now)
                continue
            wait = action.until - now
            if wait <= 0:
                plan.feed(Event.TIMEOUT, now)
                continue
            self.wake = now + wait
            if not self.registered:
                self._selector.register(self.fd, selectors.EVENT_READ, self)
                self.registered = True
            return None

    def readable(self) -> None:
        """The selector says the socket is readable: read within the current wait."""
        action = self._plan.next_action()
        if isinstance(action, Receive):
            event, nbytes = self._read_ready(action)
            self._plan.feed(event, self._clock(), nbytes=nbytes)

    def timed_out(self) -> None:
        """The current wait reached :attr:`wake`."""
        if isinstance(self._plan.next_action(), Receive):
            self._plan.feed(Event.TIMEOUT, self._clock())

    def cut_short(self) -> Finished:
        """End the close now: every remaining wait times out at once, and the plan's
        own rules decide what follows (a fallback, our FIN, the close)."""
        plan = self._plan
        while True:
            action = plan.next_action()
            if isinstance(action, Finished):
                self.unregister()
                return action
            if isinstance(action, Receive):
                self._pending = None
                plan.feed(Event.TIMEOUT, self._clock())
            else:
                if isinstance(action, Close):
                    self.unregister()
                self._step(action)

    def report(self, action: Finished) -> CloseReport:
        return self._finish(action)

    def release(self) -> None:
        """After an unexpected error: drop the registration and the fd."""
        self.unregister()
        if self._sock.fileno() != -1:
            self._sock.close()

    def drop_copy(self) -> None:
        """In a forked child: close this process's copy of the fd, nothing else."""
        if self._sock.fileno() != -1:
            self._sock.close()

    def unregister(self) -> None:
        if self.registered:
            self.registered = False
            self._selector.unregister(self.fd)
        self.wake = _NEVER

    @property
    def findings(self) -> list[_checks.Finding]:
        return self._seen.findings


class BackgroundCloser:
    """A thread that closes handed-over sockets with their policies, many at once.

    Hand a socket over with :meth:`close`; the call returns in microseconds and the
    socket belongs to the closer from then on (a ``socket.socket`` is detached, so a
    later ``sock.close()`` by the caller is harmless). The closer's thread runs the
    policy exactly as :func:`tcpclose.close` would, with every wait on one selector,
    and calls ``on_close`` with each report.

    Args:
        max_sockets: the most sockets held at once (queued or being closed). A
            hand-over beyond it is an overflow (see below).
        on_close: called with each :class:`CloseReport`, in the closer's thread (keep
            it quick: it delays the other closes). None: no reports are built (kernel
            lookups skipped), as :func:`tcpclose.close` with ``report=False``.
        overflow_policy: the policy for a hand-over that finds the closer full, applied
            at once in the calling thread. None (default): the hand-over's own policy,
            so the data guarantee holds and the caller waits at most that policy's
            bounds (back-pressure on a server that outruns its closer).
            ``"abort"`` or ``"default"`` never wait, but lose what the policy would
            have saved.
        name: the thread's name.

    The thread starts on the first hand-over. :meth:`shutdown` (or leaving a
    ``with`` block) stops taking sockets, lets the pending closes finish within a
    bound, and cuts the rest short.

    Example::

        closer = tcpclose.BackgroundCloser(on_close=log_report)
        ...
        conn.sendall(response)
        closer.close(conn, "peer-first timeout=2s")   # returns at once
    """

    def __init__(
        self,
        *,
        max_sockets: int = DEFAULT_MAX_SOCKETS,
        on_close: OnClose | None = None,
        overflow_policy: PolicyLike | None = None,
        name: str = "tcpclose-background",
    ) -> None:
        if isinstance(max_sockets, bool) or not isinstance(max_sockets, int) or max_sockets < 1:
            raise ValueError(f"max_sockets must be an int of at least 1, got {max_sockets!r}")
        if on_close is not None and not callable(on_close):
            raise TypeError(f"on_close must be callable, got {type(on_close).__qualname__}")
        self.max_sockets = max_sockets
        self.on_close = on_close
        self.overflow_policy = as_policy(overflow_policy) if overflow_policy is not None else None
        self._name = name
        self._lock = threading.Lock()
        self._held = 0  # queued plus being closed (under _lock)
        self._closed = False
        #: Hand-overs closed inline because the closer was full.
        self.overflows = 0
        self._queue: collections.deque[tuple[int, int, ClosePolicy, OnClose | None]] = (
            collections.deque()
        )
        self._thread: threading.Thread | None = None
        self._worker: _Worker | None = None
        _closers.add(self)
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._signalled = False
        self._stop_at: float | None = None  # monotonic time to cut the rest short
        self._idle = threading.Condition(self._lock)
        self._policies: dict[str, ClosePolicy] = {}

    # -- the calling side ------------------------------------------------------------------

    def close(
        self,
        sock: object,
        policy: PolicyLike = "graceful",
        *,
        on_close: OnClose | None = None,
    ) -> bool:
        """Hand ``sock`` over to be closed with ``policy``; return without waiting.

        Args:
            sock: a connected TCP ``socket.socket`` (detached here: the caller's object
                no longer owns the fd), a TCP fd, or an object with ``fileno()``.
            policy: as for :func:`tcpclose.close`.
            on_close: receives this close's report instead of the closer's
                ``on_close``.

        Returns:
            True when the closer took the socket; False when it was full and the
            socket was closed here with ``overflow_policy`` (see the class).

        Raises:
            PolicyError: ``policy`` is invalid (the socket is left untouched).
            TypeError: ``sock`` is not a TCP socket.
            ValueError: ``sock`` is listening, closed, connecting or never connected
                (left untouched).
            RuntimeError: the closer was shut down.
        """
        resolved = self._resolve(policy)
        owned, _ = _take_socket(sock)
        callback = on_close if on_close is not None else self.on_close
        with self._lock:
            if self._closed:
                raise RuntimeError("the background closer was shut down")
            full = self._held >= self.max_sockets
            if not full:
                self._held += 1
                if self._thread is None:
                    self._start()
        if full:
            self._overflow(owned, resolved, callback)
            return False
        family = owned.family
        self._queue.append((owned.detach(), family, resolved, callback))
        if not self._signalled:  # one wake-up per batch of hand-overs
            self._signal()
        return True

    def _resolve(self, policy: PolicyLike) -> ClosePolicy:
        if isinstance(policy, ClosePolicy):
            return policy
        if not isinstance(policy, str):
            return as_policy(policy)
        # Parsing a policy's text takes about 25 us, several times the rest of a
        # hand-over: the texts a server uses are few, so each is parsed once.
        resolved = self._policies.get(policy)
        if resolved is None:
            resolved = as_policy(policy)
            if len(self._policies) < _POLICY_CACHE_SIZE:
                self._policies[policy] = resolved
        return resolved

    @property
    def held(self) -> int:
        """Sockets held now: queued or being closed."""
        return self._held

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the closer holds no socket; False when ``timeout`` passed first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._held == 0, timeout)

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking sockets, let the pending closes finish within ``timeout`` seconds
        (None: within their own bounds), then cut the rest short (each remaining wait
        times out at once, and the plan's own rules end the close) and stop the thread.
        Idempotent."""
        with self._lock:
            if self._closed:
                thread = self._thread
            else:
                self._closed = True
                thread = self._thread
                self._stop_at = (
                    float("inf") if timeout is None else time.monotonic() + max(0.0, timeout)
                )
        if thread is None:
            return
        self._signal()
        thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown()

    def _overflow(self, sock: socket.socket, policy: ClosePolicy, on_close: OnClose | None) -> None:
        self.overflows += 1
        applied = self.overflow_policy or policy
        logger.debug("background closer full (%d): closing inline with %s", self._held, applied)
        driver = _Driver(
            sock, applied, report=on_close is not None, allow_data_loss=False, trigger="overflow"
        )
        report = driver.run()
        _observe.emit_findings(driver.findings, stacklevel=3)
        if on_close is not None:
            _deliver(on_close, report)

    def _start(self) -> None:
        # (under _lock)
        self._worker = _Worker(self)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread = thread
        thread.start()

    def _signal(self) -> None:
        self._signalled = True
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:  # full of wake-ups already, or the thread is gone
                pass

    # -- the closer's thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            worker = self._worker
            assert worker is not None
            worker.run()
        except BaseException:
            logger.exception("the background closer's thread failed")
            raise
        finally:
            assert self._wake_r is not None
            assert self._wake_w is not None
            self._wake_r.close()
            self._wake_w.close()

    def _release(self) -> None:
        with self._idle:
            self._held -= 1
            if self._held == 0:
                self._idle.notify_all()

    def _after_fork_in_child(self) -> None:
        """In a child of ``fork()``: the closer's thread did not come along. Drop the
        child's copies of every socket the parent's closer held (the parent closes the
        connections; a copy held here would keep them open), and start afresh on the
        next hand-over."""
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        worker, self._worker = self._worker, None
        if worker is not None:
            for job in worker.jobs:
                job.drop_copy()
            worker.jobs.clear()
            worker.selector.close()
        while self._queue:
            fd, *_ = self._queue.popleft()
            os.close(fd)
        for wake in (self._wake_r, self._wake_w):
            if wake is not None:
                wake.close()
        self._wake_r = self._wake_w = None
        self._thread = None
        self._signalled = False
        self._held = 0


class _Worker:
    """The closer's thread: a selector for the sockets and the wake-up socket, and a
    heap of timers (a job's timer is stale once its :attr:`_Job.wake` moved on)."""

    def __init__(self, closer: BackgroundCloser) -> None:
        self.closer = closer
        self.selector = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, _Job]] = []
        self.counter = itertools.count()
        self.jobs: set[_Job] = set()

    def run(self) -> None:
        closer = self.closer
        selector = self.selector
        timers = self.timers
        clock = time.monotonic
        assert closer._wake_r is not None
        selector.register(closer._wake_r, selectors.EVENT_READ, None)
        try:
            while True:
                stop_at = closer._stop_at
                if stop_at is not None and closer._held == 0:
                    return  # (held counts what is queued or about to be)
                while timers and timers[0][2].wake != timers[0][0]:
                    heapq.heappop(timers)
                timeout = max(0.0, timers[0][0] - clock()) if timers else None
                if stop_at is not None and stop_at != _NEVER:
                    left = max(0.0, stop_at - clock())
                    timeout = left if timeout is None else min(timeout, left)
                for key, _ in selector.select(timeout):
                    job = key.data
                    if job is None:
                        self.take_queue()
                    elif job in self.jobs:
                        self.step(job, job.readable)
                now = clock()
                while timers and timers[0][0] <= now:
                    wake, _, job = heapq.heappop(timers)
                    if job.wake == wake and job in self.jobs:
                        self.step(job, job.timed_out)
                if stop_at is not None and clock() >= stop_at:
                    self.take_queue()
                    for job in list(self.jobs):
                        self.cut(job)
        finally:
            # Only after an unexpected error: release every fd still held.
            for job in list(self.jobs):
                self.abandon(job)
            while closer._queue:
                fd, *_ = closer._queue.popleft()
                os.close(fd)
                closer._release()
            selector.close()

    def take_queue(self) -> None:
        closer = self.closer
        assert closer._wake_r is not None
        try:
            while closer._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        # In this order: wake-ups drained, then the flag cleared, then the queue read.
        # A hand-over that saw the flag set appended before it was cleared, so its
        # socket is read below; one that saw it clear sends a wake-up of its own.
        closer._signalled = False
        queue = closer._queue
        while queue:
            fd, family, policy, on_close = queue.popleft()
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
            try:
                # The state now, not at the hand-over: the peer's FIN may have come
                # in between, and then the peer closed first.
                job = _Job(sock, policy, read_tcp_state(sock), on_close, self.selector)
            except Exception:
                logger.exception("background close of fd %d could not start", fd)
                sock.close()
                closer._release()
                continue
            self.jobs.add(job)
            self.step(job, job.start)

    def step(self, job: _Job, action: Callable[[], object]) -> None:
        """Run ``action`` of ``job``, then advance it until it waits or ends. An
        unexpected error abandons the job (fd released, logged), not the thread."""
        try:
            action()
            finished = job.advance()
        except Exception:
            logger.exception("background close failed")
            self.abandon(job)
            return
        if finished is None:
            heapq.heappush(self.timers, (job.wake, next(self.counter), job))
        else:
            self.end(job, finished)

    def cut(self, job: _Job) -> None:
        try:
            finished = job.cut_short()
        except Exception:
            logger.exception("background close failed")
            self.abandon(job)
            return
        self.end(job, finished)

    def end(self, job: _Job, finished: Finished) -> None:
        self.jobs.discard(job)
        try:
            report = job.report(finished)
        except Exception:
            logger.exception("background close: the report failed")
            return
        finally:
            self.closer._release()
        _emit_here(job.findings)
        if job.on_close is not None:
            _deliver(job.on_close, report)

    def abandon(self, job: _Job) -> None:
        if job in self.jobs:
            self.jobs.discard(job)
            try:
                job.release()
            finally:
                self.closer._release()


def _deliver(on_close: OnClose, report: CloseReport) -> None:
    try:
        on_close(report)
    except Exception:
        logger.exception("on_close(%s) raised", report)


def _emit_here(findings: list[_checks.Finding]) -> None:
    """Issue warnings from the closer's thread, where no caller's line exists; a
    filter turning them into errors must not stop the thread: such errors are logged."""
    for finding in findings:
        try:
            _observe.emit_findings([finding], stacklevel=1)
        except Warning as exc:
            logger.warning("tcpclose warning raised as an error in the background: %s", exc)


#: Every closer, for the fork handler.
_closers: Final[weakref.WeakSet[BackgroundCloser]] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _default
    for closer in list(_closers):
        closer._after_fork_in_child()
    # The process-wide closer of the parent is not this process's: make a new one on
    # first use (its exit hook then belongs to this process too).
    _default = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

_default: BackgroundCloser | None = None
_default_lock: Final = threading.Lock()
#: Seconds the process-wide closer gives its pending closes at interpreter exit.
EXIT_GRACE: Final = 5.0


def default_closer() -> BackgroundCloser:
    """The process-wide :class:`BackgroundCloser` (made on first use, default
    settings). At interpreter exit its pending closes get :data:`EXIT_GRACE` seconds
    to finish, then are cut short."""
    global _default
    closer = _default
    if closer is not None:
        return closer
    with _default_lock:
        if _default is None:
            _default = BackgroundCloser(name="tcpclose-background-default")
            atexit.register(_default.shutdown, EXIT_GRACE)
        return _default


def close_in_background(
    sock: object, policy: PolicyLike = "graceful", *, on_close: OnClose | None = None
) -> bool:
    """Hand ``sock`` to the process-wide background closer: :func:`tcpclose.close`
    without waiting. See :class:`BackgroundCloser` (the same arguments, returns and
    errors as its :meth:`~BackgroundCloser.close`).

    Example::

        conn.sendall(response)
        tcpclose.close_in_background(conn, "peer-first timeout=2s", on_close=log_report)
    """
    return default_closer().close(sock, policy, on_close=on_close)
