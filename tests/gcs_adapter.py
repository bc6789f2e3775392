"""A GCS XML-API protocol adapter in front of fake-gcs-server (test code).

obstore's GCS client speaks the XML API (`PUT /bucket/object`, XML multipart
uploads, `x-goog-if-generation-match`); fake-gcs-server 1.54 routes those
writes to its JSON handler and refuses them (`400 invalid uploadType`).
No emulator installable here takes them (`docs/remote-storage.md`, Limits).
This adapter is the smallest translation that lets the real client's
writes reach the real emulator:

* `PUT /b/o` becomes the emulator's own JSON upload
  (`POST /upload/storage/v1/b/b/o?uploadType=multipart`), with
  `x-goog-if-generation-match` passed as `ifGenerationMatch`; the JSON
  answer's `etag` and `generation` come back as the `ETag` and
  `x-goog-generation` headers the client reads. The emulator's 412 (and any
  other error) is passed through.
* An XML multipart upload (`POST ?uploads`, `PUT ?partNumber&uploadId`,
  `POST ?uploadId`, `DELETE ?uploadId`, `GET /b?uploads`) is kept here, part
  by part; on completion the parts, joined in the listed order, go to the
  emulator as one upload of the same kind (precondition included).
* Everything else (GET, ranged GET, HEAD, list, DELETE) is forwarded
  unchanged.

So storage, generations and the precondition checks are the emulator's;
multipart assembly is this adapter's. Run as a process:
`python -m tests.gcs_adapter --upstream-port P --port Q`; it prints
`serving` once listening. `GET /_adapter/uploads?bucket=b` lists the upload
ids in progress (test introspection, not a GCS call).
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import http.server
import json
import re
import sys
import threading
import urllib.parse
import uuid
import xml.etree.ElementTree as ET

HTTP_TIMEOUT = 60.0
# Headers the adapter sets itself or that describe one hop only.
_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length"}
_PART_RE = re.compile(r"<PartNumber>(\d+)</PartNumber>")


def _xml(tag: str, **fields: str) -> bytes:
    inner = "".join(f"<{k}>{_escape(v)}</{k}>" for k, v in fields.items())
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<{tag} xmlns='
            f'"http://s3.amazonaws.com/doc/2006-03-01/">{inner}</{tag}>').encode()


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _error(code: str, message: str) -> bytes:
    return _xml("Error", Code=code, Message=message)


class _Upload:
    def __init__(self, bucket: str, name: str) -> None:
        self.bucket, self.name = bucket, name
        self.parts: dict[int, bytes] = {}


class Adapter(http.server.ThreadingHTTPServer):
    """The adapter's HTTP server: upstream address and uploads in progress."""

    daemon_threads = True

    def __init__(self, port: int, upstream_port: int) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.upstream_port = upstream_port
        self.uploads: dict[str, _Upload] = {}
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    # Keep-alive, as the real service: obstore pools its connections.
    protocol_version = "HTTP/1.1"
    server: Adapter

    def log_message(self, format: str, *args: object) -> None:
        pass  # a line per request would drown the test output

    # Plumbing ---------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes = b"",
               headers: dict[str, str] | None = None,
               content_type: str = "application/xml") -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body or content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _upstream(self, method: str, target: str, body: bytes,
                  headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port,
                                          timeout=HTTP_TIMEOUT)
        try:
            conn.request(method, target, body=body or None, headers=headers)
            answer = conn.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()

    def _split(self) -> tuple[str, str, dict[str, list[str]]]:
        """`(bucket, object, query)` of an XML-API request path."""
        url = urllib.parse.urlsplit(self.path)
        bucket, _, name = url.path.lstrip("/").partition("/")
        return (urllib.parse.unquote(bucket), urllib.parse.unquote(name),
                urllib.parse.parse_qs(url.query, keep_blank_values=True))

    # Routes -----------------------------------------------------------------

    def _forward(self) -> None:
        body = self._body()
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        status, answer_headers, data = self._upstream(
            self.command, self.path, body, headers)
        self.send_response(status)
        for k, v in answer_headers:
            if k.lower() not in _HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _put_object(self, bucket: str, name: str, data: bytes,
                    if_generation: str | None) -> None:
        """One object through the emulator's JSON multipart upload."""
        boundary = uuid.uuid4().hex
        meta = json.dumps({"name": name}).encode()
        body = b"".join([
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8"
            f"\r\n\r\n".encode(), meta,
            f"\r\n--{boundary}\r\nContent-Type: application/octet-stream"
            f"\r\n\r\n".encode(), data, f"\r\n--{boundary}--\r\n".encode(),
        ])
        query = {"uploadType": "multipart", "name": name}
        if if_generation is not None:
            query["ifGenerationMatch"] = if_generation
        target = (f"/upload/storage/v1/b/{urllib.parse.quote(bucket, safe='')}"
                  f"/o?{urllib.parse.urlencode(query)}")
        status, _, answer = self._upstream(
            "POST", target, body,
            {"Content-Type": f"multipart/related; boundary={boundary}"})
        if status != 200:
            code = "PreconditionFailed" if status == 412 else "Upstream"
            self._reply(status, _error(code, answer.decode(errors="replace")))
            return
        info = json.loads(answer)
        etag = info.get("etag") or hashlib.md5(data).hexdigest()
        self._written = {"ETag": f'"{etag.strip(chr(34))}"',
                         "x-goog-generation": str(info["generation"])}

    def do_GET(self) -> None:
        bucket, name, query = self._split()
        if bucket == "_adapter" and name == "uploads":
            with self.server.lock:
                ids = [i for i, u in self.server.uploads.items()
                       if u.bucket == query.get("bucket", [""])[0]]
            self._reply(200, json.dumps(ids).encode(), content_type="application/json")
            return
        if not name and "uploads" in query:
            self._list_uploads(bucket, query.get("prefix", [""])[0])
            return
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def do_DELETE(self) -> None:
        _, _, query = self._split()
        if "uploadId" in query:
            self._body()
            with self.server.lock:
                found = self.server.uploads.pop(query["uploadId"][0], None)
            if found is None:
                self._reply(404, _error("NoSuchUpload", "no such upload"))
            else:
                self._reply(204, content_type="")
            return
        self._forward()

    def do_PUT(self) -> None:
        bucket, name, query = self._split()
        data = self._body()
        if "uploadId" in query:
            upload_id = query["uploadId"][0]
            number = int(query["partNumber"][0])
            with self.server.lock:
                upload = self.server.uploads.get(upload_id)
                if upload is not None:
                    upload.parts[number] = data
            if upload is None:
                self._reply(404, _error("NoSuchUpload", "no such upload"))
                return
            self._reply(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'},
                        content_type="")
            return
        self._written = None
        self._put_object(bucket, name, data,
                         self.headers.get("x-goog-if-generation-match"))
        if self._written is not None:
            self._reply(200, headers=self._written, content_type="")

    def do_POST(self) -> None:
        bucket, name, query = self._split()
        body = self._body()
        if "uploads" in query:
            upload_id = uuid.uuid4().hex
            with self.server.lock:
                self.server.uploads[upload_id] = _Upload(bucket, name)
            self._reply(200, _xml("InitiateMultipartUploadResult", Bucket=bucket,
                                  Key=name, UploadId=upload_id))
            return
        if "uploadId" in query:
            self._complete(bucket, name, query["uploadId"][0], body)
            return
        self._reply(400, _error("NotImplemented", f"POST {self.path}"))

    def _complete(self, bucket: str, name: str, upload_id: str,
                  body: bytes) -> None:
        with self.server.lock:
            upload = self.server.uploads.get(upload_id)
        if upload is None:
            self._reply(404, _error("NoSuchUpload", "no such upload"))
            return
        numbers = [int(n) for n in _PART_RE.findall(body.decode())]
        missing = [n for n in numbers if n not in upload.parts]
        if missing:
            self._reply(400, _error("InvalidPart", f"parts {missing} not uploaded"))
            return
        self._written = None
        self._put_object(bucket, name, b"".join(upload.parts[n] for n in numbers),
                         self.headers.get("x-goog-if-generation-match"))
        if self._written is None:
            return
        with self.server.lock:
            self.server.uploads.pop(upload_id, None)
        self._reply(200, _xml("CompleteMultipartUploadResult", Bucket=bucket,
                              Key=name, ETag=self._written["ETag"]),
                    headers=self._written)

    def _list_uploads(self, bucket: str, prefix: str) -> None:
        """GCS's ListMultipartUploads (`GET /bucket?uploads`), answered from
        the uploads this adapter holds."""
        root = ET.Element("ListMultipartUploadsResult")
        ET.SubElement(root, "Bucket").text = bucket
        with self.server.lock:
            for upload_id, u in self.server.uploads.items():
                if u.bucket == bucket and u.name.startswith(prefix):
                    item = ET.SubElement(root, "Upload")
                    ET.SubElement(item, "Key").text = u.name
                    ET.SubElement(item, "UploadId").text = upload_id
        self._reply(200, ET.tostring(root, xml_declaration=True, encoding="UTF-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args(argv)
    server = Adapter(args.port, args.upstream_port)
    print("serving", flush=True)
    server.serve_forever(poll_interval=0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
