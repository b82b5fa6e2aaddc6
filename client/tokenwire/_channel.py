"""One gRPC channel to one server or to many replicas: the target, load balancing and retries.

A target is what grpc takes (``host:port``, ``dns:///name:port``, ``ipv4:a:p,b:p``, ``unix:path``),
or several ``host:port`` addresses, as a list or separated by commas. Several addresses become one
channel over all of them, balanced round robin; so does a ``dns:///`` name with several A records.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
from collections.abc import Sequence

log = logging.getLogger("tokenwire")

SERVICE = "tokenwire.v1.Tokenwire"
# Safe to run twice: they read the model and change nothing on the server.
IDEMPOTENT_METHODS = ("Tokenize", "Detokenize", "Score", "ModelInfo")

# gRFC A6 (github.com/grpc/proposal/blob/master/A6-client-retries.md). The deadline covers all
# attempts together. Backoff 0.1 s, doubling, at most 1 s (about 1.5 s over the 4 retries with
# grpcio 1.85); 5 attempts is the client-side cap (higher values are treated as 5). UNAVAILABLE is
# what a replica answers while its model loads or it drains, and what the channel reports when a
# connection fails: the request was not processed. Each attempt is a new pick, so round robin sends
# a retry to the next replica. A call is retried only while no response headers have arrived (see
# below): the server must not send initial metadata before it knows the outcome, or every
# rejection is final (tests/e2e/test_client_balancing.py checks that).
#
# No "retryThrottling": with the usual settings (maxTokens 10, tokenRatio 0.1) it stops retrying
# once more than about one attempt in eleven fails, so with one replica of two stuck loading (half
# the first attempts fail) it would soon let that replica's share of calls fail instead of moving
# them to the healthy one. maxAttempts already bounds the extra load to 5x.
RETRY_POLICY = {"maxAttempts": 5, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}

# Generate gets the same policy, and that is safe because gRPC retries only calls that are not
# yet *committed*, and a call commits as soon as the client receives response headers (A6, "When
# Retries are Valid"); grpc servers send the headers with the first response message, and an error
# before any message goes back as Trailers-Only. So an attempt is retried only when the caller has
# seen nothing of it: the server rejected it (no model loaded, draining: UNAVAILABLE before any
# work), or the connection failed before the first message (the tokenwire server sends InputInfo
# right after prefill, so at worst one prefill on a dying replica is wasted; nothing the caller
# sees is duplicated). Once InputInfo has arrived the call is committed: a stream cut off later
# raises to the caller and is never re-run. (Checked with grpcio 1.85: an aborted stream is
# attempted 5 times before its first message and once after it; tests/e2e/test_client_balancing.py.)
# Without a policy for Generate, every generation sent to a loading or draining replica would fail,
# the common case during a rolling restart.
GENERATE_METHODS = ("Generate",)

# Schemes grpc resolves itself: a target with one of them is handed to grpc as it is.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:", "google-c2p:")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ADDRESS = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})$")


def service_config(retries: bool = True) -> dict:
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retries:
        config["methodConfig"] = [
            {"name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS], "retryPolicy": RETRY_POLICY},
            {"name": [{"service": SERVICE, "method": m} for m in GENERATE_METHODS], "retryPolicy": RETRY_POLICY},
        ]
    return config


def channel_options(target: str | Sequence[str], *, retries: bool = True) -> tuple[str, list[tuple[str, object]]]:
    """The grpc target and channel options for `target` (see the module docstring)."""
    grpc_target, authority = resolve_target(target)
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", 64 * 2**20),
        ("grpc.service_config", json.dumps(service_config(retries))),
        ("grpc.enable_retries", 1 if retries else 0),
    ]
    if authority is not None:
        # The ":authority" of every call and the name TLS checks the certificate against: the first
        # address as given (the default would be the whole list). grpc sends a multi-address target
        # through HTTP_PROXY as one bogus host and ignores NO_PROXY for it (grpc/grpc#40366), so
        # such a channel connects directly.
        options += [("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)]
    return grpc_target, options


def resolve_target(target: str | Sequence[str]) -> tuple[str, str | None]:
    """(grpc target, authority override). One address or grpc target passes through unchanged;
    several host:port addresses become one ipv4:/ipv6: target listing every address they resolve to."""
    if isinstance(target, str):
        target = target.strip()
        if _has_scheme(target):
            if target.startswith("dns:") and "," in target:
                raise ValueError(f"{target!r}: a dns: target names one host; give several addresses as "
                                 "host:port,host:port")
            return target, None
        addresses = [a.strip() for a in target.split(",") if a.strip()]
    else:
        addresses = [a.strip() for a in target if a.strip()]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:  # grpc's own DNS resolver: every address of the name, re-resolved
        return addresses[0], None
    for a in addresses:
        if _has_scheme(a):
            raise ValueError(f"{a!r}: a list holds host:port addresses; a grpc target (scheme:...) stands alone")

    # grpc's Python API takes no custom name resolver (grpc/grpc#31275: a plugin system is only
    # planned) and its dns: resolver takes a single name, so hostnames are resolved here, once, with
    # getaddrinfo, and the channel gets the literal addresses (grpc's ipv4:/ipv6: schemes take
    # comma-separated lists). A changed DNS record is not followed: for a changing set of replicas,
    # give one DNS name with every replica behind it (dns:///name:port, a Kubernetes headless
    # Service), which grpc re-resolves itself.
    parsed = []
    for a in addresses:
        m = _ADDRESS.match(a)
        if m is None or not 0 < int(m["port"]) < 65536:
            raise ValueError(f"{a!r}: expected host:port (an IPv6 address as [addr]:port)")
        parsed.append((a, m["v6"] or m["host"], int(m["port"])))
    resolved: list[tuple[int, str, int]] = []
    failed = []
    for a, host, port in parsed:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            failed.append(a)
            log.warning("tokenwire: cannot resolve %s (%s); leaving it out", a, e)
            continue
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr[0], port) not in resolved:
                resolved.append((family, sockaddr[0], port))
    if not resolved:
        raise OSError(f"cannot resolve any of {', '.join(failed)}")
    if all(family == socket.AF_INET for family, _, _ in resolved):
        grpc_target = "ipv4:" + ",".join(f"{ip}:{port}" for _, ip, port in resolved)
    else:  # one scheme per target: IPv4 addresses go in IPv4-mapped form (::ffff:a.b.c.d)
        grpc_target = "ipv6:" + ",".join(f"[{_v6(ip)}]:{port}" for _, ip, port in resolved)
    return grpc_target, addresses[0]


def _has_scheme(target: str) -> bool:
    return target.startswith(_SCHEMES) or _URI.match(target) is not None


def _v6(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return f"::ffff:{ip}" if addr.version == 4 else ip
