"""A small TCP fault proxy on loopback, for the chaos run: latency, loss, stalls, cuts, refusal.

proxy = FaultProxy(target_port).start()    # listens on proxy.port
proxy.latency_s = 0.2                       # every chunk waits 200 ms each way
proxy.loss = 0.2                            # a fifth of the chunks are "lost" and retransmitted
proxy.stall(1.5)                            # nothing is forwarded for 1.5 s (held, not dropped)
proxy.drop_all()                            # cut every open connection now
proxy.silence_open()                        # open connections forward nothing, ever; new ones work
proxy.silence_open(b"BRPOP")                # only those whose last request was a BRPOP
proxy.heal()                                # the silent ones forward again, what they held first
proxy.refuse = True                         # cut them and close every new one at once

TCP cannot lose bytes, so loss is emulated the way an application sees it: a lost
segment holds back everything behind it on that connection until it is retransmitted,
after a retransmission timeout that doubles while losses follow each other.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time

CHUNK = 65536
RTO_MIN_S = 0.2  # Linux's minimum TCP retransmission timeout
RTO_MAX_S = 3.2  # cap of the doubling, a few consecutive losses
STALL_POLL_S = 0.01


class FaultProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port, with faults switched on at will."""

    def __init__(self, target_port: int, port: int = 0, seed: int | None = None) -> None:
        self.target_port = target_port
        self.latency_s = 0.0
        self.loss = 0.0
        self._refuse = False
        self._stalled_until = 0.0
        self._rng = random.Random(seed)
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = int(self._server.getsockname()[1])
        self._conns: set[socket.socket] = set()
        self._silenced: set[socket.socket] = set()
        self._last_request: dict[socket.socket, bytes] = {}  # client socket -> its last chunk
        self._peer: dict[socket.socket, socket.socket] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, name=f"proxy:{self.port}", daemon=True).start()
        return self

    @property
    def refuse(self) -> bool:
        return self._refuse

    @refuse.setter
    def refuse(self, on: bool) -> None:
        """While on, the target is unreachable: open connections are cut, new ones closed at once."""
        self._refuse = on
        if on:
            self.drop_all()

    def stall(self, seconds: float) -> None:
        """Forward nothing, on any connection, for ``seconds`` from now (data waits, nothing is lost)."""
        self._stalled_until = max(self._stalled_until, time.monotonic() + seconds)

    def silence_open(self, last_request_has: bytes | None = None) -> int:
        """Let open connections go silent: nothing forwarded, nothing closed, as across a
        network partition that the peers have not noticed; new connections work. All of them,
        or those whose client last sent a chunk containing ``last_request_has``. Returns how
        many pairs went silent."""
        with self._lock:
            clients = [c for c in self._last_request if c in self._conns]
            if last_request_has is not None:
                clients = [c for c in clients if last_request_has in self._last_request[c]]
                pairs = {s for c in clients for s in (c, self._peer[c])}
            else:
                pairs = set(self._conns)
            self._silenced |= pairs
            return len(pairs) // 2

    def heal(self) -> None:
        """The silent connections forward again, the data they held first (the partition healed)."""
        with self._lock:
            self._silenced.clear()

    def clear(self) -> None:
        """Every fault off (connections stay as they are)."""
        self.latency_s, self.loss, self._stalled_until, self._refuse = 0.0, 0.0, 0.0, False

    def drop_all(self) -> int:
        """Close every open connection (both sides); returns how many pairs were cut."""
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        return len(conns) // 2

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.drop_all()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                if self._closed:
                    return
                continue
            if self._refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
                self._last_request[client] = b""
                self._peer[client] = upstream
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(CHUNK):
                if src in self._last_request:
                    self._last_request[src] = data
                self._hold()
                while src in self._silenced and not self._closed:
                    time.sleep(STALL_POLL_S)  # held for good, until either side closes
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
                self._silenced.discard(src)
                self._silenced.discard(dst)
                self._last_request.pop(src, None)
                self._peer.pop(src, None)

    def _hold(self) -> None:
        """Delay one chunk as the faults say."""
        while time.monotonic() < self._stalled_until:
            time.sleep(STALL_POLL_S)
        if self.latency_s:
            time.sleep(self.latency_s)
        rto = RTO_MIN_S
        while self.loss and self._rng.random() < self.loss:  # a retransmission may be lost again
            time.sleep(rto)
            rto = min(RTO_MAX_S, rto * 2)
