"""The committed code in client/tokenwire/v1 is exactly what protos/ generates (run `make proto`)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = generate.generate(tmp_path)
    committed = ROOT / "client" / "tokenwire" / "v1"
    assert fresh, "protoc produced nothing"
    for path in fresh:
        assert (committed / path.name).read_text() == path.read_text(), f"{path.name} is stale: run make proto"
    assert {p.name for p in committed.glob("*_pb2*.py*")} == {p.name for p in fresh}
