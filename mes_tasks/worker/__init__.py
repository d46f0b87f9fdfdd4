"""The worker process: its state and outcome tally, the partition leases, sharing and recovery."""
