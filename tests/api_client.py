"""A gateway process for the tests, and a plain HTTP client for it (the standard library's)."""

from __future__ import annotations

import http.client
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devtools.devserver import api_argv, free_port
from devtools.process import Child

PRODUCER_TOKEN = "producer-token-0123456789abcdef"
OPERATOR_TOKEN = "operator-token-0123456789abcdef"
TOKENS = f"producer:{PRODUCER_TOKEN} operator:{OPERATOR_TOKEN}"


@dataclass
class Answer:
    """One HTTP answer: status, headers, the JSON body (or None), the raw body."""

    status: int
    headers: dict[str, str]
    body: Any
    raw: bytes = field(repr=False)


@dataclass
class Gateway:
    """A running ``celery -A mes_tasks api`` on a free port."""

    port: int
    child: Child

    def call(self, method: str, path: str, body: Any = None, token: str | None = PRODUCER_TOKEN,
             headers: dict[str, str] | None = None, raw: bytes | None = None) -> Answer:  # fmt: skip
        """One request on a new connection; ``body`` is sent as JSON, ``raw`` as it is."""
        sent = {"Content-Type": "application/json"} if body is not None or raw is not None else {}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        sent.update(headers or {})
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            payload = resp.read()
            return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, _json(payload), payload)
        finally:
            conn.close()

    def stop(self) -> None:
        self.child.stop()


def start_gateway(log_path: Path, env: dict[str, str], timeout_s: float = 30.0) -> Gateway:
    """Start a gateway with the test environment and ``TOKENS``; wait until it answers."""
    port = free_port()
    child = Child("api", api_argv(port), log_path, env={**os.environ, "MES_API_TOKENS": TOKENS, **env},
                  cwd=Path(__file__).resolve().parent.parent).start()  # fmt: skip
    gateway = Gateway(port, child)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            gateway.call("GET", "/openapi.json", token=None)
            return gateway
        except OSError:
            if not child.alive():
                break
            time.sleep(0.1)
    gateway.stop()
    raise AssertionError(f"the gateway did not answer:\n{child.log_text()[-3000:]}")


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None
