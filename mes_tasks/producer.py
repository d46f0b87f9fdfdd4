"""Where the main app imports the producer from: ``mes_tasks.producer.submit_quantity_update(s)``.

The producer lives in ``mes_tasks.send``; this module keeps the public import path.
"""

from mes_tasks.send.producer import (
    Producer,
    default_producer,
    submit_quantity_update,
    submit_quantity_updates,
)

__all__ = ["Producer", "default_producer", "submit_quantity_update", "submit_quantity_updates"]
