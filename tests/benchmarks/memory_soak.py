"""Memory soak: a real server under `tokenwire bench` at concurrency 32 for a while, its
resident memory sampled every few seconds. Flat after warm-up is the goal.

    .venv/bin/python tests/benchmarks/memory_soak.py [--minutes 10] [--concurrency 32]

Prints RSS over time, the growth after the first minute, and the bench report."""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import threading
import time

from tokenwire import Client
from tokenwire.bench import format_report, run

from serving_bench import free_port, rss_mib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--every", type=float, default=10, help="seconds between RSS samples")
    args = ap.parse_args()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tokenwire_server.main", "serve", "--port", str(port),
                               "--host", "127.0.0.1", "--metrics-port", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, float]] = []
    done = threading.Event()
    try:
        with Client(f"127.0.0.1:{port}") as c:
            while True:
                try:
                    if c.health(timeout=1) == "SERVING":
                        break
                except Exception:
                    time.sleep(0.5)
        start = time.monotonic()

        def sample():
            while not done.is_set():
                samples.append((time.monotonic() - start, rss_mib(server.pid)))
                done.wait(args.every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        report = asyncio.run(run(f"127.0.0.1:{port}", concurrency=args.concurrency,
                                 duration=args.minutes * 60, progress=False))
        done.set()
        sampler.join()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    print(format_report(report))
    print("\n  t (s)   RSS (MiB)")
    for t, rss in samples:
        print(f"{t:7.0f}   {rss:9.0f}")
    warm = [rss for t, rss in samples if t >= 60]
    if warm:
        print(f"\nafter the first minute: min {min(warm):.0f}, max {max(warm):.0f}, "
              f"first {warm[0]:.0f}, last {warm[-1]:.0f} MiB (growth {warm[-1] - warm[0]:+.0f} MiB)")


if __name__ == "__main__":
    main()
