"""A bounded load test of `resfit serve` on 127.0.0.1: good and bad uploads mixed, zero 5xx expected.

    python benchmarks/serve_load.py [--run RUN_DIR] [--requests 600] [--concurrency 8] [--max-seconds 240]

Starts `python -m resfit serve` as its own process on a free loopback port (with no --run, a ResNet-50
head is first fitted on hymenoptera from the Imagenette source, ~20 s), sends a fixed number of requests
from a few concurrent clients, and prints requests/s, p50/p99 latency for good and bad requests, the
status codes, and the server's peak resident memory (VmHWM). Exits non-zero on any 5xx or transport error.
Only loopback is ever contacted; the run stops after --requests or --max-seconds, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
HOST = "127.0.0.1"  # never anything else
MB = 1024 * 1024


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def request_mix(photos: list[Path], seed: int) -> list[tuple[str, dict, int]]:
    """(kind, httpx kwargs, weight): 75% real photos, the rest every kind of bad upload."""
    noise = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    jpeg = encode(Image.fromarray(noise), "JPEG")
    bad = [
        ("bad: text file", {"files": {"file": ("a.txt", b"hello\n" * 20, "text/plain")}}, 4),
        ("bad: truncated jpeg", {"files": {"file": ("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")}}, 4),
        ("bad: 12 MB file", {"files": {"file": ("big.jpg", b"\xff\xd8\xff" + bytes(12 * MB))}}, 1),
        (
            "bad: png bomb",
            {"files": {"file": ("bomb.png", encode(Image.new("1", (20000, 20000)), "PNG"))}},
            3,
        ),
        ("bad: empty body", {"content": b""}, 4),
        ("bad: wrong field", {"files": {"image": ("a.jpg", jpeg, "image/jpeg")}}, 4),
        ("bad: empty file", {"files": {"file": ("e.jpg", b"", "image/jpeg")}}, 3),
    ]
    good = [("good: photo", {"files": {"file": (p.name, p.read_bytes(), "image/jpeg")}}, 1) for p in photos]
    good_weight = 3 * sum(w for _, _, w in bad) / len(good)
    return [(k, kw, good_weight) for k, kw, _ in good] + bad


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fit_run(work: Path) -> Path:
    out = work / "run"
    cmd = [
        sys.executable,
        "-m",
        "resfit",
        "train",
        str(SHARED / "data" / "hymenoptera"),
        "--model",
        "resnet50",
        "--weights",
        str(SHARED / "weights" / "resnet50-imagenette.pth"),
        "--epochs",
        "0",
        "--out",
        str(out),
        "--quiet",
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


async def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}")
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    raise SystemExit("the server did not become ready")


async def load(url: str, mix, requests: int, concurrency: int, max_seconds: float, seed: int):
    rng = random.Random(seed)
    plan = rng.choices(mix, weights=[w for _, _, w in mix], k=requests)
    records: list[tuple[str, int, float]] = []
    cursor = iter(plan)
    deadline = time.monotonic() + max_seconds

    async def client_loop(client: httpx.AsyncClient) -> None:
        for kind, kwargs, _ in cursor:
            if time.monotonic() > deadline:
                return
            started = time.perf_counter()
            try:
                status = (await client.post("/predict", **kwargs)).status_code
            except httpx.TransportError as error:
                status = f"transport error: {type(error).__name__}"
            records.append((kind, status, time.perf_counter() - started))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return records, wall


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def report(records, wall: float, rss: float, choice: str, concurrency: int) -> bool:
    print(f"server: {choice}")
    print(
        f"{len(records)} requests in {wall:.1f} s from {concurrency} concurrent clients: {len(records) / wall:.1f} requests/s"
    )
    print(f"{'kind':<22} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}  statuses")
    kinds = sorted({kind for kind, _, _ in records}, key=lambda k: (not k.startswith("good"), k))
    for kind in ["all good", "all bad"] + kinds:
        if kind.startswith("all"):
            rows = [r for r in records if r[0].startswith(kind.split()[1])]
        else:
            rows = [r for r in records if r[0] == kind]
        latencies = [seconds for _, _, seconds in rows]
        statuses = Counter(str(status) for _, status, _ in rows)
        shown = ", ".join(f"{code} x{n}" for code, n in sorted(statuses.items()))
        print(
            f"{kind:<22} {len(rows):>5} {percentile(latencies, 50):>8.1f} {percentile(latencies, 99):>8.1f}  {shown}"
        )
    good = [r for r in records if r[0].startswith("good")]
    print(f"good photos: {len(good) / wall:.1f} images/s classified")
    print(f"server peak RSS (VmHWM): {rss:.0f} MiB")
    failures = [r for r in records if not isinstance(r[1], int) or r[1] >= 500]
    wrong = [r for r in records if r[0].startswith("good") and r[1] != 200]
    wrong += [
        r for r in records if r[0].startswith("bad") and not (isinstance(r[1], int) and 400 <= r[1] < 500)
    ]
    print(f"5xx or transport errors: {len(failures)}; unexpected statuses: {len(wrong)}")
    return not failures and not wrong


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", help="run folder to serve (default: fit a ResNet-50 head on hymenoptera)")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    photos = sorted((SHARED / "data" / "hymenoptera" / "val").rglob("*.jpg"))
    mix = request_mix(photos, args.seed)
    with tempfile.TemporaryDirectory(prefix="resfit-load-") as work:
        run = Path(args.run) if args.run else fit_run(Path(work))
        port = free_port()
        env = os.environ | {"RESFIT_CACHE": str(Path(work) / "cache")}
        log = open(
            Path(work) / "server.log", "w"
        )  # a file, not a pipe nobody reads: it never blocks the server
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "resfit",
                "serve",
                str(run),
                "--host",
                HOST,
                "--port",
                str(port),
                "--backend",
                args.backend,
            ],
            stderr=log,
            env=env,
        )
        try:
            url = f"http://{HOST}:{port}"
            asyncio.run(wait_ready(url, server))
            choice = httpx.get(url + "/model").json()["backend"]
            records, wall = asyncio.run(
                load(url, mix, args.requests, args.concurrency, args.max_seconds, args.seed)
            )
            rss = peak_rss_mib(server.pid)
            alive = server.poll() is None
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
        ok = report(
            records,
            wall,
            rss,
            f"{choice['name']} {choice['precision']}: {choice['reason']}",
            args.concurrency,
        )
        print(f"server still up after the test: {alive}")
        if not (ok and alive):
            print("server log (tail):\n" + (Path(work) / "server.log").read_text()[-3000:])
    return 0 if ok and alive else 1


if __name__ == "__main__":
    sys.exit(main())
