"""A `tokenwire-server serve` process for a test: started on free ports of 127.0.0.1, its output
in a log file, ready (SERVING) before the test runs, SIGTERMed after it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .test_hardening import health_status
from .test_replicas import free_ports


@contextmanager
def server_process(model, log_path: Path, *flags: str, ready_seconds: float = 180):
    """Yields the server's gRPC address once it is SERVING; the log is in the failure message."""
    port, = free_ports(1)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tokenwire_server.main", "serve", "--model", str(model), "--host", "127.0.0.1",
             "--port", str(port), "--http-port", "0", "--metrics-port", "0", *flags],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    address = f"127.0.0.1:{port}"
    try:
        end = time.monotonic() + ready_seconds
        while health_status(address, "") != "SERVING":
            assert process.poll() is None and time.monotonic() < end, log_path.read_text()
            time.sleep(0.1)
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
