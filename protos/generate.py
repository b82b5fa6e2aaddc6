"""Regenerate the Python code of the contract into client/tokenwire/v1 (run: make proto).

Messages (*_pb2.py), stubs (*_pb2_grpc.py) and types (*.pyi) come from grpcio-tools;
tests/unit/test_generated_code.py fails when the committed files are stale."""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    files = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / "tokenwire").rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"  # well-known types shipped with grpcio-tools
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}", f"--pyi_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / "tokenwire" / "v1").glob("*_pb2*.py*"))


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "client"
    for path in generate(out):
        print(path.relative_to(out))
