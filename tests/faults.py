"""A fault-injecting TCP proxy, to put between a server under test and a
database it shares with others (PostgreSQL): the test breaks the server's
connections without touching the database server itself.

    proxy = FaultyProxy("127.0.0.1", 5432)   # listens on proxy.port at once
    proxy.cut()          # a database restart: every live connection closed, new ones welcome
    proxy.refuse(10)     # an outage: cut, and every new connection closed at once for 10 s
    proxy.restore()      # back now (ends a refuse early)
    proxy.close()

Threads, not asyncio: the tests driving it are synchronous and the proxy
must keep forwarding while they block on a server's stream.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class FaultyProxy:
    """Forwards ``127.0.0.1:<port>`` to ``host:port``, byte for byte."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()
        self._refusing_until = 0.0
        self.refused = 0  # connections closed on arrival (a test may wait for one)
        self._closed = False
        threading.Thread(target=self._accept, name="faulty-proxy", daemon=True).start()

    # --- faults ---
    def cut(self) -> None:
        """Close every live connection, both ways (the database restarted)."""
        with self._lock:
            live, self._live = self._live, set()
        for sock in live:
            _close(sock)

    def refuse(self, seconds: float) -> None:
        """Cut, and close every new connection on arrival for ``seconds``
        (the database is down that long, then back on its own)."""
        with self._lock:
            self._refusing_until = time.monotonic() + seconds
        self.cut()

    def restore(self) -> None:
        with self._lock:
            self._refusing_until = 0.0

    @property
    def refusing(self) -> bool:
        return time.monotonic() < self._refusing_until

    def close(self) -> None:
        self._closed = True
        _close(self._listener)
        self.cut()

    # --- forwarding ---
    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                self.refused += 1
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._live.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._live.discard(source)
                self._live.discard(sink)
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
