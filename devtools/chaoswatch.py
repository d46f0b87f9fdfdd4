"""The partitioned chaos run's watch: is every workorder queue with waiting updates consumed,
and by one worker only?

Every ``SAMPLE_S`` it reads the oldest message of every workorder queue, leftovers of
another N included (``LINDEX queue -1``: kombu pushes on the left and pops on the right).
A queue is *unconsumed* while it holds messages and its oldest one stays the same; the
gap ends when that message leaves (or the queue empties). The lease holder seen while a
queue was unconsumed is kept, to say why.

Every ``INSPECT_EVERY_S`` it asks the workers which queues they consume (``inspect
active_queues``). Replies of a solo worker come between its tasks, so a hand-over can
show its two sides in one round: a queue that two workers name is a double consumer only
if a second round, asked at once, says so too.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import redis

from devtools.chaosreport import LOG_STAMP, Injection, Row

SAMPLE_S = 0.25
INSPECT_EVERY_S = 2.0
INSPECT_TIMEOUT_S = 1.0
KEPT_GAP_S = 0.5  # shorter gaps are a queue at work, not worth keeping
HOLDER_AFTER_S = 1.0  # a queue unconsumed this long has its lease holder looked up
WHY_LINES = 4  # worker log lines quoted for a gap over the goal
# The worker log lines that tell who consumes what, and why it may not.
LEASE_LINE = re.compile(r"took the |hand(?:s|ed) \S+ over|lost the |standby|not consuming|paused|"
                        r"LOCK_BUSY|LOCK_LOST|FENCE_LOST|Traceback|ERROR|CRITICAL|exited|"
                        r"Connection to broker lost")  # fmt: skip


@dataclass(frozen=True)
class Gap:
    """A queue that held messages while its oldest did not leave, from ``start`` to ``end``."""

    queue: str
    start: float
    end: float
    holder: str  # its lease holder while it was unconsumed

    def within(self, since: float, until: float) -> float:
        """How much of it falls between ``since`` and ``until`` (epoch seconds)."""
        return max(0.0, min(self.end, until) - max(self.start, since))


@dataclass(frozen=True)
class Double:
    """A queue that two workers consumed, seen twice in a row."""

    queue: str
    at: float
    workers: tuple[str, ...]


@dataclass
class _Open:
    oldest: str
    since: float
    holder: str = "?"


class Watch:
    """Samples the workorder queues and the workers' consumers in two threads, until ``stop``.

    Args:
        client: Redis, directly (not through a fault proxy).
        holder: queue -> a description of its lease holder.
        ask: queue -> the workers that say they consume it (raises when nobody can be asked).
    """

    def __init__(
        self,
        client: redis.Redis,
        holder: Callable[[str], str],
        ask: Callable[[], dict[str, list[str]]],
    ) -> None:
        from mes_tasks.partitions import every_queue

        self.client, self.holder, self.ask = client, holder, ask
        self.queues = every_queue()
        self.gaps: list[Gap] = []
        self.doubles: list[Double] = []
        self.samples = 0
        self._open: dict[str, _Open] = {}
        self.last = time.time()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample_forever, daemon=True),
                         threading.Thread(target=self._inspect_forever, daemon=True)]  # fmt: skip

    def start(self) -> Watch:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        for queue in list(self._open):
            self._close(queue, self.last)

    def _sample_forever(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            with contextlib.suppress(redis.RedisError):  # Redis restarting: the gaps stay open
                self.sample(time.time())

    def sample(self, now: float) -> None:
        """One look at the oldest message of every workorder queue."""
        pipe = self.client.pipeline(transaction=False)
        for queue in self.queues:
            pipe.lindex(queue, -1)
        for queue, oldest in zip(self.queues, pipe.execute(), strict=True):
            seen = self._open.get(queue)
            if seen is not None and seen.oldest == oldest:
                if now - seen.since >= HOLDER_AFTER_S:
                    seen.holder = self.holder(queue)
                continue
            if seen is not None:
                self._close(queue, now)
            if oldest is not None:
                self._open[queue] = _Open(str(oldest), now)
        self.last, self.samples = now, self.samples + 1

    def _close(self, queue: str, now: float) -> None:
        seen = self._open.pop(queue)
        if now - seen.since >= KEPT_GAP_S:
            self.gaps.append(Gap(queue, seen.since, now, seen.holder))

    def _inspect_forever(self) -> None:
        while not self._stop.wait(INSPECT_EVERY_S):
            try:
                self.inspect()
            except Exception:  # nobody to ask right now (Redis down): the next round asks again
                continue

    def inspect(self) -> None:
        """One round of asking who consumes what; a second one at once if a queue has two."""
        doubled = _doubled(self.ask())
        if doubled:
            again = _doubled(self.ask())
            now = time.time()
            self.doubles += [Double(q, now, tuple(ws)) for q, ws in again.items() if q in doubled]


def _doubled(consumers: dict[str, list[str]]) -> dict[str, list[str]]:
    from mes_tasks.partitions import is_workorder_queue

    return {q: sorted(ws) for q, ws in consumers.items() if is_workorder_queue(q) and len(ws) > 1}


def charge(rows: dict[str, Row], injections: list[Injection], watch: Watch, whole: set[str],
           logs: list[Path]) -> None:  # fmt: skip
    """Add each injection's worst unconsumed gap and its double consumers to its fault's row.

    An injection's window runs until the next one starts (its recovery and the fleet's
    repair included); a gap counts from the fault's end, or from its start for a fault
    in ``whole`` (a change of the fleet). Gaps over the goal are told with the worker log
    lines of that moment.
    """
    ends = [inj.started for inj in injections[1:]] + [watch.last]
    for inj, until in zip(injections, ends, strict=True):
        row = rows[inj.key]
        since = inj.started if inj.key in whole else inj.ended
        worst = max((g.within(since, until) for g in watch.gaps), default=0.0)
        row.unconsumed.append(worst)
        for gap in [g for g in watch.gaps if g.within(since, until) > row.unconsumed_goal_s]:
            row.gaps.append(_told(gap, since, until, logs))
        row.doubles += [f"{d.queue} consumed by {', '.join(d.workers)} at {_hms(d.at)}"
                        for d in watch.doubles if inj.started <= d.at < until]  # fmt: skip


def _told(gap: Gap, since: float, until: float, logs: list[Path]) -> str:
    start, end = max(gap.start, since), min(gap.end, until)
    said = f"{gap.queue} unconsumed {end - start:.1f} s from {_hms(start)} (lease: {gap.holder})"
    lines = lease_lines(logs, start - 1.0, end)
    return said + "".join(f"\n         | {line}" for line in lines[-WHY_LINES:])


def lease_lines(logs: Iterable[Path], since: float, until: float) -> list[str]:
    """The workers' lease and error lines between ``since`` and ``until``, oldest first."""
    found: list[tuple[float, str]] = []
    for path in logs:
        for line in path.read_text(errors="replace").splitlines():
            stamp = LOG_STAMP.match(line)
            if stamp is None or not LEASE_LINE.search(line):
                continue
            at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").astimezone().timestamp()
            if since <= at <= until:
                found.append((at, f"{path.stem}: {line[len(stamp.group(0)) :][:200]}"))
    return [line for _, line in sorted(found)]


def _hms(epoch_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(epoch_s))
