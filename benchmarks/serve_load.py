"""Closed-loop load on `encoder_jax.serve` and on a transformers-pipeline peer serving the same run.

    python benchmarks/serve_load.py --workdir runs/agnews --texts ag_news/dev.csv.gz \
        [--clients 1,8,64] [--seconds 20] [--texts_per_request 1] [--peer_python PYTHON] [--out F]

For one trained classification run: exports it (`--mode export` artifact, and the Hugging Face
directory through `python -m encoder_jax.interop export`, the same checkpoint), starts
(a) `python -m encoder_jax.serve` and (b) `benchmarks/peer_pipeline_server.py` under
`--peer_python` (a Python with torch, transformers, fastapi, uvicorn), one after the other on
the same machine; for each client count, N clients each send requests back to back
for `--seconds` after a warm-up, and the table gives requests/s, texts/s and p50/p95/p99
latency. Both servers' labels on the first texts are compared (same model, same answers).
The clients run in this process and take CPU from the server: the same for both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def read_texts(path: str, limit: int = 5000) -> list[str]:
    """Texts of a csv/tsv(.gz): every non-label column joined (AG News: title + description)."""
    opener = gzip.open if path.endswith(".gz") else open
    delimiter = "\t" if ".tsv" in path or ".txt" in path else ","
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    texts = [" ".join(cell for cell in row if not cell.strip().isdigit()) for row in rows[:limit]]
    return [t for t in texts if t.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], url: str, timeout: float = 600) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": ROOT})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{command[:3]} not ready after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams: at 64 concurrent connections
    httpx's pool, not the server, was the bottleneck (about 130 requests/s even on /health)."""

    def __init__(self, host: str, port: int):
        self.host, self.port, self.reader, self.writer = host, port, None, None

    async def post(self, path: str, payload: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = json.dumps(payload).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def closed_loop(url: str, texts: list[str], clients: int, seconds: float, warmup: float,
                      per_request: int = 1) -> dict[str, float]:
    """`clients` loops of requests of `per_request` texts; latencies of those begun after warm-up."""
    host, port = url.split("//")[1].split(":")
    latencies, errors = [], 0
    start = time.monotonic()
    measure_from, end = start + warmup, start + warmup + seconds

    async def client(i: int):
        nonlocal errors
        rng, connection = random.Random(i), Connection(host, int(port))
        while (now := time.monotonic()) < end:
            batch = [rng.choice(texts) for _ in range(per_request)]
            try:
                status, _ = await connection.post("/v1/classify", {"texts": batch})
            except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
                status, connection = None, Connection(host, int(port))
            done = time.monotonic()
            if status != 200:
                errors += 1
            elif now >= measure_from:
                latencies.append(done - now)
        connection.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    lat = np.asarray(latencies) * 1000
    return {"clients": clients, "requests": len(lat), "errors": errors,
            "requests_per_s": len(lat) / seconds, "texts_per_s": len(lat) * per_request / seconds,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99))}


def labels_of(url: str, texts: list[str]) -> list[str]:
    import httpx

    return [httpx.post(f"{url}/v1/classify", json={"texts": [t]}, timeout=60).json()["results"][0]["label"]
            for t in texts]


def prepare(workdir: str) -> tuple[str, str]:
    """(artifact dir, Hugging Face dir) of the run, both from the checkpoint predict uses."""
    from encoder_jax import artifact, export, interop

    exported = os.path.join(workdir, export.EXPORT_DIR)
    if not artifact.is_artifact(exported):
        exported = export.export_run(None, workdir)
    hf_dir = os.path.join(workdir, "hf_export")
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        assert interop.main(["export", workdir, hf_dir]) == 0
    return exported, hf_dir


def measure(name: str, command: list[str], url: str, args, texts) -> list[dict]:
    proc = start(command, url)
    try:
        rows = []
        for clients in args.clients:
            row = asyncio.run(closed_loop(url, texts, clients, args.seconds, args.warmup,
                                          args.texts_per_request))
            rows.append({"server": name, **row})
            print(json.dumps(rows[-1]), flush=True)
        labels = labels_of(url, texts[:args.check])
    finally:
        stop(proc)
    return rows, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained classification run")
    parser.add_argument("--texts", required=True, help="csv/tsv(.gz) whose texts are sent")
    parser.add_argument("--clients", default="1,8,64", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--texts_per_request", type=int, default=1)
    parser.add_argument("--check", type=int, default=200, help="texts whose labels must agree")
    parser.add_argument("--peer_python", default=sys.executable)
    parser.add_argument("--serve_flags", default="", help="extra flags for encoder_jax.serve")
    parser.add_argument("--skip_peer", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    texts = read_texts(args.texts)
    exported, hf_dir = prepare(args.workdir)
    with open(os.path.join(exported, "model.json")) as f:
        max_len = json.load(f)["encoding"]["max_len"]  # both truncate to what the run trained on
    port = free_port()
    ours, our_labels = measure("encoder_jax.serve", [
        sys.executable, "-m", "encoder_jax.serve", exported, "--port", str(port),
        "--log_level", "warning", *args.serve_flags.split()], f"http://127.0.0.1:{port}", args, texts)
    results = {"ours": ours}
    if not args.skip_peer:
        port = free_port()
        peer, peer_labels = measure("transformers pipeline", [
            args.peer_python, os.path.join(ROOT, "benchmarks", "peer_pipeline_server.py"), hf_dir,
            "--port", str(port), "--max_length", str(max_len)], f"http://127.0.0.1:{port}", args, texts)
        agree = float(np.mean([a == b for a, b in zip(our_labels, peer_labels)]))
        results.update(peer=peer, label_agreement=agree)
        print(f"\nlabels agree on {agree:.1%} of {len(our_labels)} texts")
        print("\n| clients | ours req/s | peer req/s | ratio | ours p50/p95/p99 ms | peer p50/p95/p99 ms |")
        print("| --- | --- | --- | --- | --- | --- |")
        for a, b in zip(ours, peer):
            print(f"| {a['clients']} | {a['requests_per_s']:.1f} | {b['requests_per_s']:.1f} | "
                  f"{a['requests_per_s'] / max(b['requests_per_s'], 1e-9):.2f}x | "
                  f"{a['p50_ms']:.1f} / {a['p95_ms']:.1f} / {a['p99_ms']:.1f} | "
                  f"{b['p50_ms']:.1f} / {b['p95_ms']:.1f} / {b['p99_ms']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
