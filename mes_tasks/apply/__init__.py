"""Applying one update: the ledger, work-order locks and fencing, MongoDB sessions, dead letters."""
