"""The `tokenwire` command takes its global options (--server, --timeout, --api-key, TLS,
--json) before or after the subcommand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .certs import CertificateAuthority

TOKENWIRE = str(Path(sys.executable).with_name("tokenwire"))  # the installed command
NOWHERE = "127.0.0.1:1"  # nothing listens there


def run(*args, env=None):
    clean = {k: v for k, v in os.environ.items() if k not in ("TOKENWIRE_SERVER", "TOKENWIRE_API_KEY")}
    return subprocess.run([TOKENWIRE, *args], capture_output=True, text=True, timeout=120,
                          env={**clean, **(env or {})})


def ok(*args, env=None) -> str:
    result = run(*args, env=env)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


@pytest.mark.parametrize("order", ["after", "before", "mixed"])
def test_health_and_info_with_options_anywhere(served, order):
    address = served.address
    health, info = {
        "after": (["health", "--server", address], ["info", "--server", address, "--json"]),
        "before": (["--server", address, "health"], ["--server", address, "--json", "info"]),
        "mixed": (["--timeout", "30", "health", "--server", address], ["--json", "info", "--server", address]),
    }[order]
    assert ok(*health).strip() == "SERVING"
    assert json.loads(ok(*info))["architecture"] == "llama"


def test_a_value_before_is_kept_and_one_after_wins(served):
    address = served.address
    # Given before only: the subcommand does not reset it to its default.
    assert ok("--server", address, "--json", "tokenize", "Hello world").startswith("[")
    assert ok("--server", address, "--timeout", "30", "health", "--service", "").strip() == "SERVING"
    # Given on both sides, or over the environment: the later one counts.
    assert ok("--server", NOWHERE, "health", "--server", address).strip() == "SERVING"
    assert ok("health", "--server", address, env={"TOKENWIRE_SERVER": NOWHERE}).strip() == "SERVING"
    out = json.loads(ok("generate", "Hi", "--max-new-tokens", "2", "--seed", "3", "--server", address, "--json"))
    assert out["seed"] == 3 and out["usage"]["completion_tokens"] <= 2
    assert run("health", "--server", NOWHERE, "--timeout", "1").returncode == 2  # the after value is used


def test_tls_and_api_key_after_the_subcommand(start_server, make_engine, tmp_path):
    from tokenwire_server.security import server_credentials

    ca = CertificateAuthority()
    issued = ca.issue("localhost", server=True)
    for name, data in [("ca.crt", ca.pem), ("tls.crt", issued.cert), ("tls.key", issued.key)]:
        (tmp_path / name).write_bytes(data)
    server = start_server(make_engine(kv_cache_tokens=1024), api_keys=frozenset({"sesame"}),
                          credentials=server_credentials(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), None))
    address, ca_file = f"localhost:{server.server.port}", str(tmp_path / "ca.crt")
    info = json.loads(ok("info", "--server", address, "--tls-ca", ca_file, "--api-key", "sesame", "--json"))
    assert info["architecture"] == "llama"
    assert ok("--tls-ca", ca_file, "info", "--server", address, "--api-key", "sesame").startswith("name")
    refused = run("info", "--server", address, "--tls-ca", ca_file, "--api-key", "wrong")
    assert refused.returncode == 2 and "UNAUTHENTICATED" in refused.stderr
