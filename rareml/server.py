"""gunicorn as the API runs it: workers that read each request whole before a thread sees it (slow
clients cannot hold a worker), and a master that drains on SIGTERM (/ready says 503 at once,
requests keep being answered for `drain` seconds, then the workers finish what they hold and exit).

Why not plain sync workers: a sync worker reads a request's headers and body itself, so two
clients that send a byte every few seconds held both workers (measured: /health p50 29.5 s). And
gunicorn's gthread worker hands a connection to a thread as soon as its first byte arrives; the
thread then blocks reading the rest. Here the worker's event loop reads every connection without
blocking until its request is complete (headers, and the body its Content-Length or chunked
framing announces), with a deadline for the whole request (`read_timeout`, then 408), and only
then gives it to a thread, which parses it from memory. A buffering proxy in front (nginx) does
the same, at the price of a second server to install, configure and run everywhere the API runs.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import selectors
import signal
import time
from collections import deque
from dataclasses import dataclass
from functools import partial

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers.gthread import TConn, ThreadWorker

log = logging.getLogger(__name__)

MAX_HEADER = 64 * 1024  # bytes of request line and headers; past this the parser refuses the request
COMPLETE, INCOMPLETE, OVERSIZE = "complete", "incomplete", "oversize"


@dataclass(frozen=True)
class Framing:
    """How far a buffered HTTP/1.x request is: `state`, and whether the client waits for a 100 Continue."""

    state: str
    expects_continue: bool = False
    close_after: bool = False  # the body is not all here (too large): answer, then close the connection


def framing(buf: bytes | bytearray, max_body: int) -> Framing:
    """Whether `buf` holds one whole request. A body longer than `max_body` is not waited for:
    with a Content-Length the request goes on (the app answers 413 from the header alone and the
    connection is closed); chunked, the worker answers 413 itself (OVERSIZE). Anything malformed
    counts as complete: gunicorn's parser then answers it 400."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return Framing(COMPLETE if len(buf) > MAX_HEADER else INCOMPLETE)
    head = bytes(buf[:end]).lower()
    length, chunked, expects = None, False, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip(), value.strip()
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            chunked = value.endswith(b"chunked")
        elif name == b"expect":
            expects = value == b"100-continue"
    start = end + 4
    if chunked:
        return _chunked(buf, start, max_body, expects)
    if length is None:
        return Framing(COMPLETE)
    if not length.isdigit():
        return Framing(COMPLETE)
    if int(length) > max_body:
        return Framing(COMPLETE, close_after=True)
    return Framing(COMPLETE if len(buf) - start >= int(length) else INCOMPLETE, expects)


def _chunked(buf: bytes | bytearray, pos: int, max_body: int, expects: bool) -> Framing:
    """Walk the chunks of a chunked body from `pos`: complete once the last chunk and the trailer
    section have arrived."""
    total = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return Framing(INCOMPLETE, expects)
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return Framing(COMPLETE)  # the parser names the problem
        if size == 0:  # the last chunk: trailer fields, if any, then an empty line
            line = eol + 2
            while (end := buf.find(b"\r\n", line)) > line:
                line = end + 2
            return Framing(COMPLETE if end == line else INCOMPLETE, expects)
        total += size
        if total > max_body:
            return Framing(OVERSIZE)
        pos = eol + 2 + size + 2
        if len(buf) < pos:
            return Framing(INCOMPLETE, expects)


def _json_answer(status: str, reason: str, message: str) -> bytes:
    body = b'{"error": "%s", "reason": "%s", "field": null}' % (message.encode(), reason.encode())
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (status.encode(), len(body), body))


class BufferedWorker(ThreadWorker):
    """gunicorn's threaded worker, with each request read whole by the event loop first."""

    read_timeout = 15.0  # seconds for a whole request, from its first byte (or the connection's start)
    max_body = 16 * 2**20

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reading: deque[TConn] = deque()

    def init_signals(self) -> None:
        super().init_signals()
        signal.signal(signal.SIGINT, self.handle_exit)  # Ctrl-C: finish what is accepted, as SIGTERM

    def accept(self, listener) -> None:
        try:
            client, address = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._read(TConn(self.cfg, client, address, listener.getsockname()))  # TConn: non-blocking

    def _read(self, conn: TConn, buffered: bytes = b"") -> None:
        conn.buffer, conn.deadline, conn.continued = bytearray(buffered), time.monotonic() + self.read_timeout, False
        conn.close_after = False
        if buffered and self._advance(conn):
            return
        self.reading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, conn))

    def _on_readable(self, conn: TConn, sock) -> None:
        try:
            data = sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its request was whole
            self._forget(conn)
            return
        conn.buffer += data
        if self._advance(conn):
            self.poller.unregister(sock)
            self.reading.remove(conn)

    def _advance(self, conn: TConn) -> bool:
        """Hand a whole request to a thread, or refuse it; False while more bytes are due."""
        state = framing(conn.buffer, self.max_body)
        if state.state == INCOMPLETE:
            if state.expects_continue and not conn.continued:
                conn.continued = True
                _send_quietly(conn.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
            return False
        if state.state == OVERSIZE:
            _send_quietly(conn.sock, _json_answer("413 Request Entity Too Large", "body_too_large",
                                                  f"the body is larger than {self.max_body} bytes"))
            self._close(conn)
            return True
        conn.close_after = state.close_after
        conn.data_ready = True
        self.enqueue_req(conn)
        return True

    def handle(self, conn: TConn):
        """In a thread: the buffered request goes to gunicorn's parser, which reads it from memory."""
        buffered, conn.buffer = bytes(conn.buffer), bytearray()
        conn.sock.setblocking(True)
        conn.init()
        if buffered:
            conn.parser.unreader.unread(buffered)
        return super().handle(conn)

    def _keepalive_after(self, conn: TConn, keepalive: bool) -> bool:
        if conn.close_after:  # a body too large to read: never drain it, close
            return False
        return super()._keepalive_after(conn, keepalive)

    def on_client_socket_readable(self, conn: TConn, client) -> None:
        """A kept-alive connection has a new request coming: read it whole first, as a new one."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._read(conn, conn.parser.unreader.take_buffered() if conn.parser else b"")

    def finish_request(self, conn: TConn, fs) -> None:
        super().finish_request(conn, fs)
        # a pipelined request already read with the previous one: the socket may never turn readable
        if conn in self.keepalived_conns and conn.parser is not None and conn.parser.unreader.buf.tell():
            self.poller.unregister(conn.sock)
            self.keepalived_conns.remove(conn)
            self._read(conn, conn.parser.unreader.take_buffered())

    def murder_pending(self) -> None:
        super().murder_pending()
        now = time.monotonic()
        while self.reading and self.reading[0].deadline <= now:
            conn = self.reading.popleft()
            self.poller.unregister(conn.sock)
            if conn.buffer:  # a request had started: say why it is dropped
                _send_quietly(conn.sock, _json_answer("408 Request Timeout", "request_timeout",
                                                      f"the request was not complete within {self.read_timeout:g} s"))
            self._close(conn)

    def set_accept_enabled(self, enabled: bool) -> None:
        if not enabled and not self.alive:  # shutting down: take what already waits in the backlog
            for listener in self.sockets:
                for _ in range(10_000):
                    try:
                        client, address = listener.accept()
                    except OSError:
                        break
                    self.nr_conns += 1
                    self._read(TConn(self.cfg, client, address, listener.getsockname()))
        super().set_accept_enabled(enabled)

    def _forget(self, conn: TConn) -> None:
        self.poller.unregister(conn.sock)
        self.reading.remove(conn)
        self._close(conn)

    def _close(self, conn: TConn) -> None:
        self.nr_conns -= 1
        conn.close()


def _send_quietly(sock, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass


class Lifecycle:
    """State the master shares with its workers (shared memory, inherited at fork): draining."""

    def __init__(self):
        self._draining = multiprocessing.RawValue(ctypes.c_bool, False)

    @property
    def draining(self) -> bool:
        return self._draining.value

    def drain(self) -> None:
        self._draining.value = True


class DrainingArbiter(Arbiter):
    """SIGTERM: /ready turns 503 (the workers read `lifecycle.draining`) while the API keeps
    answering for `drain` seconds, so a load balancer stops sending; then the usual graceful stop
    (workers finish what they have accepted, the backlog included). A second SIGTERM, or SIGINT
    (Ctrl-C), stops gracefully at once."""

    def __init__(self, app, lifecycle: Lifecycle, drain: float):
        super().__init__(app)
        self.lifecycle, self.drain_seconds, self.drain_until = lifecycle, drain, None

    def handle_term(self):
        if self.drain_seconds <= 0 or self.drain_until is not None:
            raise StopIteration
        self.lifecycle.drain()
        self.drain_until = time.monotonic() + self.drain_seconds
        self.log.info("SIGTERM: draining for %g s (/ready answers 503), then stopping", self.drain_seconds)

    def handle_int(self):
        raise StopIteration  # graceful, not gunicorn's quick stop that cuts requests in flight

    def murder_workers(self):
        super().murder_workers()
        if self.drain_until is not None and time.monotonic() >= self.drain_until:
            raise StopIteration


class Server(BaseApplication):
    """gunicorn configured in code: `options` are gunicorn settings; `load` builds the app in
    each worker (never in the master: XGBoost's thread pool does not survive a fork)."""

    def __init__(self, load, options: dict, lifecycle: Lifecycle, drain: float):
        self._load, self.options, self.lifecycle, self.drain = load, options, lifecycle, drain
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        return self._load()

    def run(self):
        DrainingArbiter(self, self.lifecycle, self.drain).run()
