"""The consistency audit: the checks, the stored reports and the alerts."""
