"""Development and test tooling, kept out of the installed package: the servers for `make run` and
the tests, the chaos run and its fault proxy, the demo. Nothing in ``mes_tasks`` imports it."""
