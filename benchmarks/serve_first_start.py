"""How long `resfit serve` takes to answer on its first start (fresh export cache), and what it does next.

    python benchmarks/serve_first_start.py RUN_DIR [--starts 2] [--wait-int8 900]

Each start runs `resfit serve RUN_DIR` as a user would, from an empty export cache (a new temporary
RESFIT_CACHE), and records: seconds until /health answers, the first /predict (one of the run's validation
photos) and its answer, the backend line; then, where serve quantizes int8 in the background (every CPU
since a444cd3), seconds until that step says what it decided ("switched to int8" or "staying on ..."), or
that --wait-int8 ran out; last, the exit code and seconds of a Ctrl-C (SIGINT) and whether any quantizing
child process outlived it. With
--stop-early S the Ctrl-C comes S seconds after the first answer instead, while int8 is still being quantized.
Run it where nothing else runs; under the AVX2 stand-in set ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2 (the serve processes inherit it). The JSON (machine, commit, command) goes to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from provenance import record, stamp

from resfit.run_folder import read_meta

REPO = Path(__file__).resolve().parents[1]
DECIDED = ("resfit: switched to int8", "resfit: staying on")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def a_validation_photo(run: Path) -> Path:
    meta = read_meta(run)
    root = Path(meta["data"]["path"])
    return next(p for p in sorted((root / "val").rglob("*")) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})


def children_of(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (Linux /proc), e.g. the spawned quantizing child."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[-80:]
    except OSError:
        return f"{pid} (gone)"


def one_start(run: Path, photo: Path, wait_int8: float, stop_early: float | None) -> dict:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="serve-first-start-") as cache:
        log = Path(cache) / "serve.log"
        env = os.environ | {"RESFIT_CACHE": cache}
        with open(log, "w") as stderr:
            started = time.perf_counter()
            server = subprocess.Popen(
                [sys.executable, "-m", "resfit", "serve", str(run), "--port", str(port)],
                stderr=stderr,
                stdout=subprocess.DEVNULL,
                env=env,
            )
        url = f"http://127.0.0.1:{port}"
        row: dict = {}
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"serve exited with {server.returncode}:\n{log.read_text()}")
                try:
                    if httpx.get(url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            row["ready_s"] = round(time.perf_counter() - started, 2)
            answer = httpx.post(
                url + "/predict", files={"file": (photo.name, photo.read_bytes())}, timeout=120
            )
            row["first_answer_s"] = round(time.perf_counter() - started, 2)
            row["first_answer"] = answer.json().get("predicted")
            row["health_at_first_answer"] = httpx.get(url + "/health", timeout=5).json()
            lines = log.read_text().splitlines()
            row["backend_line"] = next((line for line in lines if line.startswith("resfit: backend ")), None)
            row["int8_in_background"] = "in the background" in (row["backend_line"] or "")
            if stop_early is not None:
                time.sleep(stop_early)
            elif row["int8_in_background"]:
                deadline = started + wait_int8
                while time.perf_counter() < deadline:
                    decided = [line for line in log.read_text().splitlines() if line.startswith(DECIDED)]
                    if decided:
                        row["int8_decided_s"] = round(time.perf_counter() - started, 1)
                        row["int8_decision"] = decided[0]
                        break
                    time.sleep(0.5)
                else:
                    row["int8_decision"] = f"not decided within {wait_int8:.0f} s"
                row["health_after"] = httpx.get(url + "/health", timeout=5).json()
            children = children_of(server.pid)
            row["children_before_ctrl_c"] = len(children)
        finally:
            stopping = time.perf_counter()
            server.send_signal(signal.SIGINT)
            try:
                row["exit_code"] = server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
                row["exit_code"] = "killed after 120 s"
            row["ctrl_c_s"] = round(time.perf_counter() - stopping, 2)
        time.sleep(5)  # multiprocessing's resource tracker ends once it sees the server's pipe close
        row["children"] = [_name(pid) for pid in children]
        row["children_left_5s_after"] = [_name(pid) for pid in children if Path(f"/proc/{pid}").exists()]
        row["stderr_tail"] = log.read_text().splitlines()[-6:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a trained resfit run folder whose data is on this machine")
    parser.add_argument("--starts", type=int, default=2, help="first starts, each from an empty cache")
    parser.add_argument("--wait-int8", type=float, default=900, help="seconds to wait for int8's decision")
    parser.add_argument(
        "--stop-early", type=float, metavar="S", help="Ctrl-C S seconds after the first answer"
    )
    args = parser.parse_args()
    run = Path(args.run).resolve()
    photo = a_validation_photo(run)
    out = REPO / "benchmarks" / "results" / f"serve_first_start-{stamp()}.json"
    rows = []
    for index in range(args.starts):
        rows.append(one_start(run, photo, args.wait_int8, args.stop_early))
        print(json.dumps({"start": index, **rows[-1]}), flush=True)
        out.write_text(
            json.dumps({"provenance": record(), "args": vars(args), "rows": rows}, indent=1) + "\n"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
