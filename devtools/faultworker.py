"""A celery process with a fault installed at one of ``mes_tasks.apply.faults``' points.

    python -m devtools.faultworker --hold written=60 -- -A mes_tasks worker -P solo ...

``--hold POINT=SECONDS`` sleeps at that point on every update: at ``written``, the
update's writes are done and its lock checked, and its transaction stays open, as for a
worker that dies mid-commit. Everything after ``--`` is the celery command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from mes_tasks.apply import faults

log = logging.getLogger("mes_tasks.apply.faults")


def hold(spec: str) -> tuple[str, float]:
    point, _, seconds = spec.partition("=")
    if point not in faults.POINTS:
        points = ", ".join(faults.POINTS)
        raise argparse.ArgumentTypeError(f"unknown point {point!r}; the points are {points}")
    try:
        return point, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: expected POINT=SECONDS") from None


def holding(point: str, seconds: float) -> faults.Fault:
    def fault() -> None:
        log.warning("fault injected at %s: holding the transaction open for %ss", point, seconds)
        time.sleep(seconds)

    return fault


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devtools.faultworker")
    parser.add_argument("--hold", type=hold, action="append", default=[], metavar="POINT=SECONDS")
    parser.add_argument("celery_args", nargs=argparse.REMAINDER, help="-- then the celery command line")
    args = parser.parse_args(argv)
    for point, seconds in args.hold:
        faults.install(point, holding(point, seconds))
    celery_args = args.celery_args[1:] if args.celery_args[:1] == ["--"] else args.celery_args
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *celery_args]
    celery_main()


if __name__ == "__main__":
    main()
