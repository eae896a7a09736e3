"""Single objects vs WebDataset shards on object storage, read through the product's training stream.

The same `--images` ImageNet-like JPEGs (500x375 q90, `benchmarks.bench_data`'s generator) go to
a local S3 server (moto, in this process) twice: one object per image (class folders) and as
shards of `--shard-size` (`xtra data prepare --format shards`, the product's writer). Each layout
is read by `pipelines.data.stream.build_dataset(train=True)` (RandomResizedCrop to 224 px + flip),
one epoch after a warm-up epoch, through a small HTTP proxy in front of the server that adds a
fixed latency to every request (0, 20, 50 ms: object storage in another region) and counts them.

Reported per layout and latency:
- images/s per decode core: images / wall s / the cores Ray decodes on (`num_cpus` = this
  machine's cores); also images per CPU-second of the decode tasks (Ray's worker processes);
- GET requests per image (object GETs; HEADs and LISTs counted apart);
- the time to list the split (`list_split`, through the proxy).

    .venv/bin/python -m benchmarks.bench_shards [--images 2000] [--shard-size 256]
        [--latencies-ms 0 20 50] [--results-dir D]

Prints a Markdown table and writes benchmarks/results/shards.json.
"""

from __future__ import annotations

import argparse
import http.client
import logging
import os
import shutil
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ray

from benchmarks.bench_data import (
    CIFAR_CANDIDATES,
    cifar_subset,
    find_cifar,
    tree_cpu_seconds,
    write_datasets,
)
from benchmarks.common import load_avg, machine, markdown_table, write_result
from pipelines.data.commands import prepare
from pipelines.data.listing import list_split
from pipelines.data.stream import build_dataset
from xtra_core.config import XTRAConfig

FAKE_AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true"}


class LatencyProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 that sleeps `latency_s` before forwarding each request to
    `upstream` (host:port) and counts requests by kind: GET (object), HEAD, LIST (GET on a bucket)."""

    def __init__(self, upstream: str) -> None:
        self.latency_s = 0.0
        self.counts: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self
        local = threading.local()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def forward(self) -> None:
                path = self.path.split("?", 1)[0].strip("/")
                kind = self.command if "/" in path else "LIST" if self.command == "GET" else self.command
                with proxy.lock:
                    proxy.counts[kind] = proxy.counts.get(kind, 0) + 1
                time.sleep(proxy.latency_s)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if getattr(local, "conn", None) is None:
                    local.conn = http.client.HTTPConnection(upstream, timeout=60)
                local.conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                resp = local.conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                head = self.command == "HEAD"  # keeps the object's Content-Length
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection") and (head or k.lower() != "content-length"):
                        self.send_header(k, v)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self, latency_s: float) -> None:
        with self.lock:
            self.latency_s, self.counts = latency_s, {}

    def close(self) -> None:
        self.server.shutdown()


def read_epoch(cfg: XTRAConfig, epoch: int) -> dict[str, Any]:
    """List, then stream one training epoch; wall and decode-task CPU."""
    t0 = time.perf_counter()
    listing = list_split(cfg.data, "train")
    list_s = time.perf_counter() - t0
    c0 = tree_cpu_seconds()
    t0 = time.perf_counter()
    ds = build_dataset(cfg.data, cfg.model.image_size, "train", epoch, train=True, listing=listing)
    n = sum(b["image"].shape[0] for b in ds.iter_batches(batch_size=256, batch_format="numpy"))
    wall = time.perf_counter() - t0
    c1 = tree_cpu_seconds()
    cpu = sum(t - c0.get(pid, (kind, 0.0))[1] for pid, (kind, t) in c1.items() if kind == "ray workers")
    return {"images": n, "wall_s": wall, "decode_cpu_s": cpu, "list_s": list_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000, help="ImageNet-like 500x375 JPEGs")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--latencies-ms", type=float, nargs="+", default=[0.0, 20.0, 50.0])
    p.add_argument("--texture-std", type=float, default=20.0)
    p.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 JPEG root (train/<class>/)")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    cifar = find_cifar(args.cifar)
    if cifar is None:
        raise SystemExit(f"bench_shards: no CIFAR-10 JPEGs in {args.cifar or CIFAR_CANDIDATES}")
    os.environ.update(FAKE_AWS)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(k, None)
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="xbs", dir="/tmp"))
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    direct = f"http://{host}:{port}"
    proxy = LatencyProxy(f"{host}:{port}")
    rows, results = [], []
    try:
        local = tmp / "imagenet_like"
        stats = write_datasets([], cifar_subset(cifar, args.images), tmp / "unused", local, args.texture_std)
        s3 = boto3.client("s3", endpoint_url=direct)
        s3.create_bucket(Bucket="bench")
        for f in sorted((local / "train").rglob("*.jpg")):
            s3.put_object(Bucket="bench", Key=f"single/{f.relative_to(local)}", Body=f.read_bytes())
        prepare(str(local), "s3://bench/shards", direct, shard_size=args.shard_size)
        ray.init(num_cpus=cores, include_dashboard=False, _temp_dir=str(tmp / "ray"),
                 log_to_driver=False, configure_logging=False)
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for latency in args.latencies_ms:
            for layout, uri in (("single objects", "s3://bench/single"), ("shards", "s3://bench/shards")):
                cfg = XTRAConfig()
                cfg.data.uri, cfg.data.s3_endpoint, cfg.model.image_size = uri, proxy.endpoint, 224
                proxy.reset(0.0)
                read_epoch(cfg, 0)  # warm-up (imports, worker start-up)
                proxy.reset(latency / 1000)
                r = read_epoch(cfg, 1)
                counts = dict(proxy.counts)
                r.update(layout=layout, latency_ms=latency, requests=counts,
                         images_per_s_per_core=r["images"] / r["wall_s"] / cores,
                         images_per_decode_cpu_s=r["images"] / max(r["decode_cpu_s"], 1e-9),
                         gets_per_image=counts.get("GET", 0) / r["images"])
                results.append(r)
                rows.append([f"{latency:.0f}", layout, r["images_per_s_per_core"], r["images_per_decode_cpu_s"],
                             r["gets_per_image"], counts.get("HEAD", 0), counts.get("LIST", 0), r["list_s"]])
                print(f"  {latency:.0f} ms, {layout}: {r['images_per_s_per_core']:.1f} images/s/core, "
                      f"{r['gets_per_image']:.4f} GET/image, load {load_avg()}", flush=True)
    finally:
        ray.shutdown()
        proxy.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    table = markdown_table(
        ["latency ms", "layout", "images/s per core", "images per decode CPU-s", "GETs per image",
         "HEADs", "LISTs", "list s"], rows)
    print(table)
    ratios = {}
    for latency in args.latencies_ms:
        by = {r["layout"]: r for r in results if r["latency_ms"] == latency}
        ratios[f"{latency:.0f}"] = by["shards"]["images_per_s_per_core"] / by["single objects"]["images_per_s_per_core"]
    print("shards / single objects, images/s per core: "
          + ", ".join(f"{k} ms: {v:.2f}x" for k, v in ratios.items()))
    payload = {"machine": machine(), "cores": cores, "images": args.images, "shard_size": args.shard_size,
               "output_px": 224, "data": stats, "results": results, "shards_over_single": ratios,
               "table": table}
    write_result("shards", payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
