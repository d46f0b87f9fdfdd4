"""The names the pieces agree on: queues and tasks, defined once.

The producer sends by task name, so nothing on the send path imports the tasks module.
"""

from __future__ import annotations

WORKORDER_QUEUE = "workorder"  # update_quantity: one active solo consumer (see lease)
AUDIT_QUEUE = "audit"  # the audit and the outbox relay
QUEUES = (WORKORDER_QUEUE, AUDIT_QUEUE)

UPDATE_QUANTITY = "mes_tasks.tasks.update_quantity"
AUDIT_WORK_ORDERS = "mes_tasks.tasks.audit_work_orders"
RELAY_OUTBOX = "mes_tasks.tasks.relay_outbox"
VERIFY_COUNTERS = "mes_tasks.tasks.verify_counters"
