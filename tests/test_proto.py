"""The committed _pb2 modules are exactly what the .proto files generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_generated_modules_match_protos(tmp_path):
    subprocess.run(["bash", str(ROOT / "proto" / "gen.sh"), str(tmp_path)], check=True,
                   env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"})
    committed = ROOT / "proto" / "pdserve" / "v1"
    generated = sorted((tmp_path / "pdserve" / "v1").glob("*_pb2*"))
    assert {p.name for p in generated} == {p.name for p in committed.glob("*_pb2*")}
    for p in generated:
        assert p.read_bytes() == (committed / p.name).read_bytes(), \
            f"{p.name} is stale: run proto/gen.sh"


def test_public_contract_field_numbers():
    from pdserve.v1 import gateway_pb2

    f = gateway_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    assert {n: f[n].number for n in ("prompt_token_ids", "prompt", "max_tokens", "temperature",
                                     "cache_salt", "request_id")} == {
        "prompt_token_ids": 1, "prompt": 2, "max_tokens": 3, "temperature": 4, "cache_salt": 5,
        "request_id": 6}
    r = gateway_pb2.GenerateResponse.DESCRIPTOR.fields_by_name
    assert {n: r[n].number for n in ("token_ids", "text", "finish_reason", "usage")} == {
        "token_ids": 1, "text": 2, "finish_reason": 3, "usage": 4}
    u = gateway_pb2.Usage.DESCRIPTOR.fields_by_name
    assert [u[n].number for n in ("prompt_tokens", "cached_tokens", "completion_tokens")] == [1, 2,
                                                                                              3]
    svc = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
    assert svc.full_name == "pdserve.v1.Gateway"
    assert svc.methods_by_name["Generate"].server_streaming
    assert "Abort" in svc.methods_by_name
