"""What operators ask: status, doctor and the Prometheus collector."""
