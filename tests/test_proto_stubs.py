"""The committed gRPC stubs are exactly what scripts/gen_proto.sh generates from proto/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "translator" / "proto"


def test_committed_stubs_match_the_proto(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env)
    fresh = {p.relative_to(tmp_path / "translator" / "proto"): p.read_text()
             for p in (tmp_path / "translator" / "proto").rglob("*") if p.is_file()}
    committed = {p.relative_to(STUBS): p.read_text() for p in STUBS.rglob("*")
                 if p.is_file() and "__pycache__" not in p.parts}
    assert sorted(map(str, fresh)) == sorted(map(str, committed))
    for name, text in fresh.items():
        assert committed[name] == text, f"{name} differs: run scripts/gen_proto.sh and commit the result"


def test_stubs_import_as_package_modules() -> None:
    from translator.proto.translator.v1 import translator_pb2, translator_pb2_grpc

    assert translator_pb2.DESCRIPTOR.package == "translator.v1"
    assert translator_pb2_grpc.__name__ == "translator.proto.translator.v1.translator_pb2_grpc"
