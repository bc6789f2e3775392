"""How the object-store client was chosen: `python -m benchmarks.client_choice`.

Against a local moto S3 server (its own process on 127.0.0.1), each client
writes and reads one object (`--mb`, default 256 MiB) in 8 MiB parts, 8 in
flight, and reports:

* throughput of the put and of the get;
* the client process's CPU seconds per GB (the server's are not counted);
* GIL contention: the iteration rate of a pure-Python thread while the
  transfer runs on another thread of this process, over its rate while the
  same transfer runs in another process (same server load, no shared GIL).
  1.0 means the transfer does not hold the GIL; below 1.0, it does.

Clients: obstore and boto3 (moto brings boto3). s3fs is tried too; pip
resolves it to 0.4.2 next to current botocore here, and it fails to start.
See docs/remote-storage.md for the results and the choice.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

PART = 8 << 20
CONCURRENCY = 8
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r"""
import sys
sys.path.insert(0, {root!r})
from benchmarks.client_choice import transfer
run = transfer(sys.argv[1], sys.argv[2], int(sys.argv[3]), "put")
sys.stdin.readline()
run()
print("done", flush=True)
"""


def transfer(client: str, bucket: str, mb: int, op: str) -> Callable[[], None]:
    """A function that puts (or gets) `mb` MiB with `client`."""
    data = memoryview(os.urandom(mb << 20))
    key = f"choice/{client}/{os.getpid()}"
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    if client == "obstore":
        import obstore
        from obstore.store import S3Store

        store = S3Store(bucket, endpoint=endpoint, virtual_hosted_style_request=False,
                        client_options={"allow_http": True})
        if op == "put":
            return lambda: obstore.put(store, key, data, chunk_size=PART,
                                       max_concurrency=CONCURRENCY)
        obstore.put(store, key, data, chunk_size=PART, max_concurrency=CONCURRENCY)

        def get() -> None:
            import concurrent.futures

            n = len(data)
            with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(lambda s: bytes(obstore.get_range(
                    store, key, start=s, length=min(PART, n - s))) and None,
                    range(0, n, PART)))
        return get
    if client == "boto3":
        import boto3
        from boto3.s3.transfer import TransferConfig

        s3 = boto3.client("s3", endpoint_url=endpoint)
        config = TransferConfig(multipart_chunksize=PART, multipart_threshold=PART,
                                max_concurrency=CONCURRENCY)
        if op == "put":
            return lambda: s3.upload_fileobj(io.BytesIO(data), bucket, key,
                                             Config=config)
        s3.upload_fileobj(io.BytesIO(data), bucket, key, Config=config)
        return lambda: s3.download_fileobj(bucket, key, io.BytesIO(), Config=config)
    if client == "s3fs":
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=endpoint)

        def put() -> None:
            with fs.open(f"{bucket}/{key}", "wb", block_size=PART) as f:
                for i in range(0, len(data), PART):
                    f.write(data[i:i + PART])
        if op == "put":
            return put
        put()
        return lambda: fs.cat_file(f"{bucket}/{key}")
    raise ValueError(f"unknown client {client!r}")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _spin_until(done: threading.Event) -> float:
    n, start = 0, time.perf_counter()
    while not done.is_set():
        n += 1
    return n / (time.perf_counter() - start)


def gil_ratio(client: str, bucket: str, mb: int) -> float:
    run = transfer(client, bucket, mb, "put")
    done = threading.Event()
    t = threading.Thread(target=lambda: (run(), done.set()))
    t.start()
    in_process = _spin_until(done)
    t.join(timeout=600)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(root=_ROOT), client, bucket, str(mb)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    time.sleep(5)  # imports and allocation, outside the measured span
    done = threading.Event()
    threading.Thread(target=lambda: (child.stdout.readline(), done.set()),
                     daemon=True).start()
    child.stdin.write("go\n")
    child.stdin.flush()
    elsewhere = _spin_until(done)
    child.wait(timeout=600)
    return in_process / elsewhere


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client_choice")
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--clients", default="obstore,boto3,s3fs")
    parser.add_argument("--gil-repeats", type=int, default=2)
    args = parser.parse_args(argv)
    sys.path.insert(0, _ROOT)
    from tests.object_servers import MotoServer, s3_environ

    server = MotoServer().start()
    try:
        os.environ.update(s3_environ(server.endpoint))
        bucket = server.create_bucket()
        gb = (args.mb << 20) / 1e9
        for client in args.clients.split(","):
            try:
                for op in ("put", "get"):
                    run = transfer(client, bucket, args.mb, op)
                    cpu, start = _cpu(), time.perf_counter()
                    run()
                    wall, cpu = time.perf_counter() - start, _cpu() - cpu
                    print(f"{client:8} {op}: {gb * 1e3 / wall:6.1f} MB/s, client CPU "
                          f"{cpu / gb:5.2f} s/GB", flush=True)
                ratios = [gil_ratio(client, bucket, args.mb)
                          for _ in range(args.gil_repeats)]
                print(f"{client:8} GIL: a Python thread's rate, transfer in this "
                      f"process / in another: {', '.join(f'{r:.2f}' for r in ratios)}",
                      flush=True)
            except Exception as e:  # report the client that fails, go on
                print(f"{client:8} failed: {type(e).__name__}: {e}", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
