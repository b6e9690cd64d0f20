"""Load test of ``atssdet serve`` on 127.0.0.1: dynamic batching (--max-batch 8) vs --max-batch 1, same run.

    python benchmarks/bench_serve.py [--requests 200] [--concurrency 16] [--rounds 2] [--mixed]

Starts two servers as subprocesses (res18 reference weights from ../shared/reference/megengine, test
size 256/416 unless --short/--max say otherwise), one with ``--max-batch 8`` and one with
``--max-batch 1``. Each round sends ``--requests`` POST /v1/detect uploads of cat.jpg (``--mixed``:
cycling through three images of different padded sizes) from ``--concurrency`` concurrent clients to
each server in turn (the order alternates between rounds, so machine load hits both alike). Prints
p50/p99 latency, throughput and the mean batch size per round, then medians over rounds and the
throughput ratio. Every request is bounded by a timeout; the script stops the servers and exits
non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import machine_line  # noqa: E402

REFERENCE = REPO_ROOT.parent / "shared" / "reference" / "megengine"
R18 = "atss_res18_coco_3x_800size"


@dataclass
class RoundResult:
    ok: int
    errors: int
    p50_ms: float
    p99_ms: float
    throughput: float  # requests per second
    mean_batch: float


def start_server(
    max_batch: int, *, short: int, max_size: int, max_wait_ms: float
) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "atssdet",
        "serve",
        "--model",
        R18,
        "--weights",
        str(REFERENCE / f"{R18}.seed0.pkl.gz"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--max-batch",
        str(max_batch),
        "--max-wait-ms",
        str(max_wait_ms),
        "--set",
        f"test_image_short_size={short}",
        "--set",
        f"test_image_max_size={max_size}",
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    deadline = time.monotonic() + 300
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(r"listening on (http://\S+/)", line)
        if match:
            return proc, match.group(1)
    proc.kill()
    raise RuntimeError("server did not start:\n" + "".join(seen))


async def load(
    url: str, uploads: list[tuple[str, bytes]], *, requests: int, concurrency: int, timeout: float
) -> RoundResult:
    latencies: list[float] = []
    batches: list[int] = []
    errors = 0
    next_index = 0

    async def client(c: httpx.AsyncClient) -> None:
        nonlocal next_index, errors
        while next_index < requests:
            i = next_index
            next_index += 1
            name, data = uploads[i % len(uploads)]
            start = time.perf_counter()
            try:
                resp = await c.post("v1/detect", files={"file": (name, data)})
            except httpx.HTTPError as exc:
                errors += 1
                print(f"  request {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            if resp.status_code != 200:
                errors += 1
                print(f"  request {i}: HTTP {resp.status_code}: {resp.text[:200]}", file=sys.stderr)
                continue
            latencies.append(time.perf_counter() - start)
            batches.append(int(resp.json()["batch_size"]))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as c:
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat_ms = np.asarray(latencies) * 1000.0 if latencies else np.asarray([np.nan])
    return RoundResult(
        ok=len(latencies),
        errors=errors,
        p50_ms=float(np.percentile(lat_ms, 50)),
        p99_ms=float(np.percentile(lat_ms, 99)),
        throughput=len(latencies) / elapsed,
        mean_batch=float(np.mean(batches)) if batches else float("nan"),
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--short", type=int, default=256, help="test_image_short_size")
    parser.add_argument("--max", dest="max_size", type=int, default=416, help="test_image_max_size")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=8, help="--max-batch of the batched server")
    parser.add_argument("--mixed", action="store_true", help="three images of different padded sizes")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, s")
    args = parser.parse_args()

    names = ["cat.jpg", "synth_600x900.png", "synth_1000x700.png"] if args.mixed else ["cat.jpg"]
    uploads = [(n, (REFERENCE / n).read_bytes()) for n in names]
    print(f"# {machine_line()}, {os.cpu_count()} cores")
    print(
        f"# {R18} (reference weights), test size {args.short}/{args.max_size}, images: {', '.join(names)}; "
        f"{args.requests} requests x {args.rounds} rounds from {args.concurrency} concurrent clients"
    )
    configs = {f"max-batch {args.batch}": args.batch, "max-batch 1": 1}
    servers = {}
    try:
        for label, mb in configs.items():
            servers[label] = start_server(
                mb, short=args.short, max_size=args.max_size, max_wait_ms=args.max_wait_ms
            )
        for _, url in servers.values():  # warm-up: first calls allocate and JIT-select kernels
            asyncio.run(load(url, uploads, requests=16, concurrency=args.concurrency, timeout=args.timeout))
        results: dict[str, list[RoundResult]] = {label: [] for label in configs}
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            for label in order:
                res = asyncio.run(
                    load(
                        servers[label][1],
                        uploads,
                        requests=args.requests,
                        concurrency=args.concurrency,
                        timeout=args.timeout,
                    )
                )
                results[label].append(res)
                print(
                    f"round {r + 1} {label:>12}: {res.ok} ok, {res.errors} errors, p50 {res.p50_ms:7.0f} ms, "
                    f"p99 {res.p99_ms:7.0f} ms, {res.throughput:6.2f} req/s, mean batch {res.mean_batch:.2f}",
                    flush=True,
                )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print(f"\nmedian over {args.rounds} rounds:")
    print("| server | p50 latency (ms) | p99 latency (ms) | throughput (req/s) | mean batch | errors |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    med = {}
    for label, rs in results.items():
        med[label] = statistics.median(r.throughput for r in rs)
        print(
            f"| {label} | {statistics.median(r.p50_ms for r in rs):.0f} | "
            f"{statistics.median(r.p99_ms for r in rs):.0f} | {med[label]:.2f} | "
            f"{statistics.median(r.mean_batch for r in rs):.2f} | {sum(r.errors for r in rs)} |"
        )
    batched, single = med[f"max-batch {args.batch}"], med["max-batch 1"]
    print(f"\nthroughput max-batch {args.batch} / max-batch 1: {batched / single:.2f}x")
    errors = sum(r.errors for rs in results.values() for r in rs)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
