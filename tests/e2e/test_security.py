"""TLS, mutual TLS (certificates made here), API keys, and the plaintext health port."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tokenwire import Client, TokenwireError
from tokenwire.v1 import tokenwire_pb2 as pb
from tokenwire.v1 import tokenwire_pb2_grpc as pb_grpc
from tokenwire_server.errors import ConfigError
from tokenwire_server.security import load_api_keys, server_credentials
from tokenwire_server.server import LIVENESS_SERVICE

from .certs import CertificateAuthority

UNAVAILABLE, UNAUTHENTICATED = grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Files the server reads: CA, server certificate and key; client certificates in memory."""
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = CertificateAuthority(), CertificateAuthority("some other CA")
    server = ca.issue("localhost", server=True)
    for name, data in [("ca.crt", ca.pem), ("tls.crt", server.cert), ("tls.key", server.key)]:
        (d / name).write_bytes(data)
    return dict(dir=d, ca=ca.pem, client=ca.issue("good-client", server=False),
                rogue=rogue.issue("rogue-client", server=False))


def creds(pki, mutual=False):
    d = pki["dir"]
    return server_credentials(str(d / "tls.crt"), str(d / "tls.key"), str(d / "ca.crt") if mutual else None)


def generate_ok(client: Client):
    return client.generate("Hello", temperature=0, max_new_tokens=3, ignore_eos=True).usage.completion_tokens == 3


def test_tls(start_server, make_engine, pki):
    server = start_server(make_engine(kv_cache_tokens=1024), credentials=creds(pki))
    target = f"localhost:{server.server.port}"
    with Client(target, timeout=30, root_certificates=pki["ca"]) as c:
        assert generate_ok(c)
    with Client(target, timeout=5, retries=False) as plain:  # plaintext against TLS: no connection
        with pytest.raises(TokenwireError) as e:
            plain.info()
        assert e.value.code == UNAVAILABLE
    with Client(target, timeout=5, retries=False, root_certificates=CertificateAuthority().pem) as wrong_ca:
        with pytest.raises(TokenwireError) as e:
            wrong_ca.info()
        assert e.value.code == UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(start_server, make_engine, pki):
    server = start_server(make_engine(kv_cache_tokens=1024), credentials=creds(pki, mutual=True))
    target = f"localhost:{server.server.port}"
    good = pki["client"]
    with Client(target, timeout=30, root_certificates=pki["ca"], private_key=good.key,
                certificate_chain=good.cert) as c:
        assert generate_ok(c)
    rogue = pki["rogue"]
    for extra in ({}, dict(private_key=rogue.key, certificate_chain=rogue.cert)):
        with Client(target, timeout=5, retries=False, root_certificates=pki["ca"], **extra) as c:
            with pytest.raises(TokenwireError) as e:
                c.info()
            assert e.value.code == UNAVAILABLE
    assert server.stats.generated_tokens == 3  # only the good client's request ran


def test_api_keys_right_wrong_and_missing(start_server, make_engine):
    server = start_server(make_engine(kv_cache_tokens=1024), api_keys=frozenset({"key-one", "key-two"}))
    with Client(server.address, timeout=30, api_key="key-two") as c:
        assert generate_ok(c)
        assert c.tokenize("hi")[0].token_count >= 1
    for key in (None, "key-three", "key-on", "key-one2", "KEY-ONE", ""):
        with Client(server.address, timeout=10, api_key=key) as c:
            for call in (lambda: c.generate("Hello", max_new_tokens=3), lambda: c.score(["a b c"]),
                         c.info, lambda: c.tokenize("hi")):
                with pytest.raises(TokenwireError) as e:
                    call()
                assert e.value.code == UNAUTHENTICATED, key
                assert "authorization: Bearer" in e.value.message
            assert c.health() == "SERVING"  # probes need no key
    # Denied calls did no work: only the good Generate produced tokens.
    assert server.stats.generated_tokens == 3 and server.stats.scored_items == 0
    denied = server.server.metrics.rpcs.labels(protocol="grpc", method="Generate", code="UNAUTHENTICATED")._value.get()
    assert denied == 6
    # The key under another scheme is refused too.
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.TokenwireStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.ModelInfo(pb.ModelInfoRequest(), metadata=[("authorization", "Basic key-one")], timeout=5)
        assert e.value.code() == UNAUTHENTICATED


def test_health_port_serves_plaintext_health_alone(start_server, make_engine, pki):
    server = start_server(make_engine(kv_cache_tokens=1024), credentials=creds(pki), health_port=0,
                          api_keys=frozenset({"k"}))
    port = server.server.health_port
    assert port and port != server.server.port
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tokenwire.v1.Tokenwire", LIVENESS_SERVICE):
            assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
    with Client(f"127.0.0.1:{port}", timeout=5, retries=False, api_key="k") as c:
        with pytest.raises(TokenwireError) as e:  # nothing but health on that port
            c.info()
        assert e.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_liveness_is_serving_while_readiness_waits_for_the_model(start_server):
    bare = start_server()
    with Client(bare.address, timeout=10) as c:
        assert c.health() == "NOT_SERVING" and c.health(LIVENESS_SERVICE) == "SERVING"


def test_api_keys_from_file_and_environment(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# operators\nalpha\n\n  beta  \n")
    assert load_api_keys(str(f), {"TOKENWIRE_API_KEYS": "gamma, delta,"}) == {"alpha", "beta", "gamma", "delta"}
    assert load_api_keys(None, {}) == frozenset()
    f.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        load_api_keys(str(f), {})
    with pytest.raises(ConfigError, match="No such file"):
        load_api_keys(str(tmp_path / "missing"), {})


def test_tls_configuration_errors(pki):
    d = pki["dir"]
    with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
        server_credentials(str(d / "tls.crt"), None, None)
    with pytest.raises(ConfigError, match="both"):
        server_credentials(None, None, str(d / "ca.crt"))
    with pytest.raises(ConfigError, match="--tls-key .*missing"):
        server_credentials(str(d / "tls.crt"), str(d / "missing"), None)


def test_a_taken_port_is_a_clear_error(start_server):
    from tokenwire_server.server import TokenwireServer

    bare = start_server(metrics_port=0)

    async def start(port=0, **options):  # on the server loop's thread, as grpc.aio needs
        await TokenwireServer("127.0.0.1", port, **options).start()

    with pytest.raises(ConfigError, match="--port .* cannot listen"):
        bare.run(start(bare.server.port))
    with pytest.raises(ConfigError, match="--health-port"):
        bare.run(start(health_port=bare.server.port))
    with pytest.raises(ConfigError, match="--metrics-port"):
        bare.run(start(metrics_port=bare.server.metrics_port))
    with_http = start_server(http_port=0)
    with pytest.raises(ConfigError, match="--http-port .* cannot listen"):
        bare.run(start(http_port=with_http.server.http_port))
