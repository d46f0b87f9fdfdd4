"""What runs in the main app's process: binding a call, publishing it, the outbox and its relay."""
