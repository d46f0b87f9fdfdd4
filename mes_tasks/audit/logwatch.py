"""The logs' change stream: which work orders had a log deleted, edited or replaced since the
last verification pass, and the highest version each work order's new logs carry.

mes_tasks only ever inserts logs, so every other change happened behind its back, and the
work order it touched is proved in full by the same pass: a deleted or edited log is found
within one pass, however many work orders there are, without reading the logs that did not
change. A log is written with its counter in one transaction, so a work order read after
the stream cannot have a lower version than its logs read from it: one that does was
restored from a backup, even to exactly its checkpoint. The stream's position is kept
(``VerifyState`` ``log_stream``) only after the pass that read it has proved what it
named, so a pass that dies re-reads the same changes.

The stream asks for the document before the change (``changeStreamPreAndPostImages``, set
on the logs' collection whenever the stream starts afresh; MongoDB 6.0 or later). Where a change
does not say its work order (an older server, a dropped collection, a position the server
no longer has or one more than ``READ_BUDGET_S`` of reading behind, no position yet), the
pass proves every work order in full instead: once, at the cost of a full audit, and
nothing is missed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pymongo.errors import OperationFailure

from mes_tasks.models import QuantityLog, VerifyState, utcnow

log = logging.getLogger(__name__)

STREAM_ID = "log_stream"  # the VerifyState document that keeps the stream's position
CHANGED = ["delete", "update", "replace"]
GONE = ["drop", "rename", "dropDatabase", "invalidate"]  # the collection itself
WO, VERSION_AT = "work_order_id", "version"
PIPELINE = [
    {"$match": {"operationType": {"$in": ["insert", *CHANGED, *GONE]}}},
    {
        "$project": {
            "operationType": 1,
            f"fullDocument.{WO}": 1,
            f"fullDocument.{VERSION_AT}": 1,
            f"fullDocumentBeforeChange.{WO}": 1,
        }
    },
]
READ_BUDGET_S = 10.0  # a stream further behind than this much reading is started afresh
AWAIT_MS = 50  # how long the server waits for a change before it says there is none
PRE_IMAGES_WIRE_VERSION = 17  # MongoDB 6.0: a change stream can carry the document before the change


@dataclass
class LogChanges:
    """What the stream said since the last kept position."""

    work_orders: set[str] = field(default_factory=set)
    # per work order, the highest version among the logs written since: a counter restored from
    # a backup has a lower one, however it matches its checkpoint
    logged: dict[str, int] = field(default_factory=dict)
    everything: bool = False  # prove every work order in full (see the module's doc)
    events: int = 0  # changes other than inserts
    token: Any = None  # the position after these changes; kept by ``keep`` once they are proved

    def named(self, wo_id: str, version: int) -> bool:
        """Whether work order ``wo_id``, read at ``version`` after these changes, must be
        proved in full."""
        return self.everything or wo_id in self.work_orders or self.logged.get(wo_id, 0) > version


def read_changes() -> LogChanges:
    """The work orders whose logs changed since the kept position, read up to now."""
    token = (VerifyState._get_collection().find_one({"_id": STREAM_ID}) or {}).get("token")
    changes = LogChanges()
    if token is not None:
        try:
            changes.token = _read(token, changes)
        except OperationFailure as exc:  # the position is too old, or from another collection
            log.warning(
                "verify: the logs' change stream cannot resume (code %s); every work order is proved in full",
                exc.code,
            )
        else:
            if changes.token is not None:
                return changes
            log.warning(  # passes stopped for long: proving everything once costs less than catching up
                "verify: the logs' change stream is more than %g s of reading behind; every work order "
                "is proved in full",
                READ_BUDGET_S,
            )
    changes.everything = True
    enable_pre_images()
    changes.token = _read(None, changes)
    return changes


def keep(changes: LogChanges) -> None:
    """Keep the position after ``changes`` (call once they are proved)."""
    if changes.token is not None:
        VerifyState._get_collection().update_one(
            {"_id": STREAM_ID}, {"$set": {"token": changes.token, "at": utcnow()}}, upsert=True
        )


def enable_pre_images() -> bool:
    """Ask the server to keep a log as it was before a change, so that a deleted log's change
    says its work order; False where the server cannot (before MongoDB 6.0)."""
    logs = QuantityLog._get_collection()
    if not _pre_images_known():
        return False
    try:
        logs.database.command("collMod", logs.name, changeStreamPreAndPostImages={"enabled": True})
    except OperationFailure as exc:
        log.info("verify: no pre-images for the logs (code %s); a deleted log: all proved", exc.code)
        return False
    return True


def _read(token: Any, changes: LogChanges) -> Any:
    """Read the stream from ``token`` (None: from now) to its end into ``changes``; the
    position there, or None when ``READ_BUDGET_S`` ran out first."""
    until = time.monotonic() + READ_BUDGET_S
    with QuantityLog._get_collection().watch(
        PIPELINE,
        resume_after=token,
        full_document="updateLookup",
        full_document_before_change="whenAvailable" if _pre_images_known() else None,
        max_await_time_ms=AWAIT_MS,
        batch_size=1000,
    ) as stream:
        while True:
            if time.monotonic() >= until:
                return None  # not at the end yet: see ``read_changes``
            event = stream.try_next()
            if event is None:  # an empty batch: the server read to the end and waited AWAIT_MS
                break
            if event["operationType"] == "insert":
                _logged(event.get("fullDocument") or {}, changes)
                continue
            changes.events += 1
            if event["operationType"] == "invalidate":  # the stream is over: a new one, from now
                changes.everything = True
                enable_pre_images()
                return _read(None, changes)
            touched = _work_orders(event)
            changes.work_orders.update(touched)
            changes.everything = changes.everything or not touched
        return stream.resume_token


def _logged(log_doc: dict[str, Any], changes: LogChanges) -> None:
    wo_id, version = log_doc.get(WO), log_doc.get(VERSION_AT)
    if isinstance(wo_id, str) and isinstance(version, int):  # a log of an earlier release has none
        changes.logged[wo_id] = max(version, changes.logged.get(wo_id, 0))


def _pre_images_known() -> bool:
    wire = QuantityLog._get_collection().database.client.topology_description.common_wire_version
    return wire is not None and wire >= PRE_IMAGES_WIRE_VERSION


def _work_orders(event: dict[str, Any]) -> set[str]:
    """The work orders a change touched: the log's before and after (an edit may move it)."""
    docs = (event.get("fullDocumentBeforeChange"), event.get("fullDocument"))
    return {wo for doc in docs if isinstance(wo := (doc or {}).get("work_order_id"), str)}
