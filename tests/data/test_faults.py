"""Fault tests of the image stream (slow: a real Ray cluster, a real moto S3 server, real Ray Data).

Each prints its figure as one `FIGURE ...` line (run with `-s` to see it):
- an S3 outage of some seconds mid-epoch: every image used exactly once; retried attempts and
  seconds lost against the same epoch without the outage;
- 1% bad files of seven kinds: each counted and named, every good image used; and the same data
  under a lower `data.max_bad_fraction` stops with an error naming the fraction;
- a file that cannot be read (gone after the listing) stops the stream naming it, or, opted in,
  is skipped and named.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections import Counter

import numpy as np
import pytest
import ray

from pipelines.data import stream as stream_module
from pipelines.data.listing import list_split
from pipelines.data.stream import bad_file_counter, build_dataset, stream_stop_error
from tests.data.test_data import encode, noise, upload, write_tree
from xtra_core.config import DataConfig

SIZE = 16


class RelayToS3:
    """A TCP relay on 127.0.0.1 in front of the S3 server, so that the test can count what an
    outage costs the S3 client: every connection it cannot pass on (the server is down) is one
    failed attempt that the client's retry strategy then repeats. `cut()` drops every live
    connection, as a network outage does (a stopped server may keep serving keep-alive ones)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.failed_attempts = 0
        self._live: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=2)
                upstream.settimeout(None)
            except OSError:
                with self._lock:
                    self.failed_attempts += 1
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()  # reset: the client sees a network error
                continue
            with self._lock:
                self._live.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *socks: socket.socket) -> None:
        for s in socks:
            with self._lock:
                self._live.discard(s)
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def cut(self) -> None:
        with self._lock:
            live = list(self._live)
        self._close(*live)

    def close(self) -> None:
        self.listener.close()
        self.cut()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.mark.slow
def test_s3_outage_mid_epoch_loses_no_image(ray_cluster, aws_test_env, monkeypatch) -> None:
    import boto3

    outage_s, n = 5.0, 400
    port = free_port()
    servers = [start_moto(port)]  # moto keeps its buckets in-process: a restart on `port` has them
    relay = RelayToS3(port)
    restart = threading.Timer(outage_s, lambda: servers.append(start_moto(port)))
    try:
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
        s3.create_bucket(Bucket="outage")
        for i in range(n):
            s3.put_object(Bucket="outage", Key=f"ds/train/c{i % 4}/{i:04d}.png",
                          Body=encode(noise(20, 20, seed=i)))
        data = DataConfig(uri="s3://outage/ds", s3_endpoint=f"http://127.0.0.1:{relay.port}",
                          s3_max_attempts=10)
        listing = list_split(data, "train")
        # blocks of 8 files: 50 decode tasks, most of them still to run when the outage starts
        monkeypatch.setattr(stream_module, "MIN_ROWS_PER_BLOCK", 8)
        monkeypatch.setattr(stream_module, "MAX_ROWS_PER_BLOCK", 8)

        def epoch(e: int, outage: bool, rows: int | None = None) -> tuple[Counter, float, ray.actor.ActorHandle]:
            counter = bad_file_counter()
            ds = build_dataset(data, SIZE, "train", e, train=True, listing=listing, bad_files=counter,
                               with_paths=True, num_rows=rows)
            seen: Counter = Counter()
            t0 = time.perf_counter()
            for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
                if outage and not seen:  # mid-epoch: the first images are in
                    servers[0].stop()
                    relay.cut()
                    restart.start()
                seen.update(batch["path"].tolist())
            return seen, time.perf_counter() - t0, counter

        epoch(0, outage=False, rows=32)  # warm-up: worker processes, S3 clients
        _, base_s, _ = epoch(0, outage=False)
        seen, outage_epoch_s, counter = epoch(1, outage=True)
    finally:
        relay.close()
        if restart.is_alive():
            restart.join()
        for server in servers[1:] if restart.finished.is_set() else servers:
            server.stop()

    expected = {f"s3://{p}" for p in listing.table["path"].to_pylist()}
    assert len(servers) == 2, "the server was never stopped and started: no outage happened"
    assert relay.failed_attempts > 0, "no read met the outage (the epoch ended before it)"
    assert seen == Counter({p: 1 for p in expected})  # every image exactly once
    assert ray.get(counter.count.remote()) == 0  # a network error is not a bad file
    print(f"\nFIGURE s3 outage {outage_s:.0f} s mid-epoch: {n} images each used once, "
          f"{relay.failed_attempts} failed attempts retried, 0 bad files; epoch {outage_epoch_s:.1f} s "
          f"vs {base_s:.1f} s without the outage: {outage_epoch_s - base_s:.1f} s lost")


def seven_bad_files() -> dict[str, bytes]:
    """One file of each kind the stream must skip (limits: 50 kB, 1M pixels, side >= 2)."""
    jpg = encode(noise(64, 64), "JPEG", quality=90)
    rng = np.random.default_rng(0)
    return {
        "corrupt.jpg": jpg[:200] + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "truncated.jpg": jpg[: len(jpg) // 2],
        "empty.jpg": b"",
        "text.jpg": b"<html>this is not an image</html>\n",
        "bomb.png": encode(np.zeros((1200, 1200), np.uint8)),  # 1.44M pixels, ~5 kB
        "oversized.png": encode(noise(160, 160)),  # a fine image over data.max_image_bytes
        "one_pixel.png": encode(noise(1, 1)),
    }


@pytest.fixture(scope="module")
def one_percent_bad(s3_server) -> tuple[str, set[str], dict[str, str]]:
    """s3://.../ds with 693 good images and 7 bad ones (1%): (uri, good URIs, {bad URI: kind})."""
    bucket = s3_server.make_bucket("onepct")
    files = {f"train/c{i % 5}/{i:04d}.png": encode(noise(12, 12, seed=i)) for i in range(693)}
    bad = {f"train/c{i % 5}/{name}": body for i, (name, body) in enumerate(seven_bad_files().items())}
    upload(s3_server, bucket, "ds", {**files, **bad})
    uri = f"s3://{bucket}/ds"
    return uri, {f"{uri}/{k}" for k in files}, {f"{uri}/{k}": k.rsplit("/", 1)[1] for k in bad}


LIMITS = {"max_image_bytes": 50_000, "max_image_pixels": 1_000_000, "min_image_side": 2}


@pytest.mark.slow
def test_one_percent_bad_files_are_counted_named_and_every_good_image_used(
    ray_cluster, s3_server, one_percent_bad
) -> None:
    uri, good, bad = one_percent_bad
    data = DataConfig(uri=uri, s3_endpoint=s3_server.endpoint, **LIMITS)
    counter = bad_file_counter()
    t0 = time.perf_counter()
    rows = build_dataset(data, SIZE, "train", 0, train=True, bad_files=counter, with_paths=True).take_all()
    seconds = time.perf_counter() - t0
    assert Counter(r["path"] for r in rows) == Counter({p: 1 for p in good})
    summary = ray.get(counter.summary.remote())
    assert summary["count"] == 7 and summary["rows"] == 700
    assert set(summary["files"]) == set(bad)
    reasons = {bad[u]: r for u, r in summary["files"].items()}
    assert "empty" in reasons["empty.jpg"]
    assert "not an image" in reasons["text.jpg"]
    assert "bomb" in reasons["bomb.png"]
    assert "> data.max_image_bytes=50000" in reasons["oversized.png"]
    assert "1x1 image < data.min_image_side=2" in reasons["one_pixel.png"]
    print(f"\nFIGURE 1% bad files: 7 of 700 counted and named ({', '.join(sorted(reasons))}), "
          f"693 good images each used once, {seconds:.1f} s")


@pytest.mark.slow
def test_bad_files_over_the_fraction_stop_the_stream_with_a_clear_error(
    ray_cluster, s3_server, one_percent_bad
) -> None:
    uri, _, _ = one_percent_bad
    data = DataConfig(uri=uri, s3_endpoint=s3_server.endpoint, max_bad_fraction=0.005, **LIMITS)
    counter = bad_file_counter()
    ds = build_dataset(data, SIZE, "train", 0, train=True, bad_files=counter)
    with pytest.raises(Exception, match=r"bad files in \d+ images seen .* passes data.max_bad_fraction=0.005"):
        ds.take_all()
    error = stream_stop_error(counter)  # the reason as one line, for the driver to re-raise
    assert error is not None and "\n" not in str(error)
    assert str(error).startswith("xtra data: ") and "passes data.max_bad_fraction=0.005" in str(error)


@pytest.mark.slow
def test_a_file_unreadable_after_listing_stops_the_stream_or_is_skipped_when_opted_in(
    ray_cluster, tmp_path
) -> None:
    write_tree(str(tmp_path), {f"train/a/{i}.png": encode(noise(10, 10, seed=i)) for i in range(6)})
    data = DataConfig(uri=str(tmp_path))
    listing = list_split(data, "train")
    gone = f"{tmp_path}/train/a/3.png"
    os.remove(gone)
    counter = bad_file_counter()
    with pytest.raises(Exception, match=f"{gone}: still unreadable after 1 attempt"):
        build_dataset(data, SIZE, "train", 0, train=False, listing=listing, bad_files=counter).take_all()
    assert str(stream_stop_error(counter)).startswith(f"{gone}: still unreadable after 1 attempt")

    data.skip_unreadable_files = True
    data.max_bad_fraction = 0.5  # 1 file of 6
    counter = bad_file_counter()
    rows = build_dataset(data, SIZE, "train", 0, train=False, listing=listing, bad_files=counter,
                         with_paths=True).take_all()
    assert sorted(r["path"] for r in rows) == sorted(f"{tmp_path}/train/a/{i}.png" for i in range(6) if i != 3)
    files = ray.get(counter.summary.remote())["files"]
    assert list(files) == [gone] and "unreadable" in files[gone]
