"""A small TCP fault proxy on loopback, for the chaos run: latency and dropped connections.

proxy = FaultProxy(target_port).start()    # listens on proxy.port
proxy.latency_s = 0.05                      # every chunk waits 50 ms each way
proxy.drop_all()                            # cut every open connection now
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK = 65536


class FaultProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port, with faults switched on at will."""

    def __init__(self, target_port: int, port: int = 0) -> None:
        self.target_port = target_port
        self.latency_s = 0.0
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = int(self._server.getsockname()[1])
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> FaultProxy:
        threading.Thread(target=self._accept, name=f"proxy:{self.port}", daemon=True).start()
        return self

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
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                if self._closed:
                    return
                with contextlib.suppress(NameError, OSError):
                    client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(CHUNK):
                if self.latency_s:
                    time.sleep(self.latency_s)
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
