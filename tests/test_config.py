"""Settings: flag > environment > default, and a bad value stops a service at start-up with a
message that names it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.cli import _parser
from pdserve.config import DecodeSettings, SettingsError, load_settings
from tests.helpers import wait_until

pytestmark = pytest.mark.integration  # starts processes

def run_cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_flag_beats_environment_beats_default(monkeypatch):
    monkeypatch.setenv("PDSERVE_NUM_PAGES", "77")
    assert load_settings(DecodeSettings).num_pages == 77
    args = _parser().parse_args(["decode", "--num-pages", "12"])
    assert load_settings(DecodeSettings, args).num_pages == 12
    monkeypatch.delenv("PDSERVE_NUM_PAGES")
    assert load_settings(DecodeSettings).num_pages == 512


def test_bad_flag_stops_the_service_naming_it():
    r = run_cli("decode", "--num-pages", "-1")
    assert r.returncode == 2
    assert "--num-pages (PDSERVE_NUM_PAGES)" in r.stderr
    assert "greater than or equal to 1" in r.stderr


def test_bad_environment_value_stops_the_service_naming_it():
    r = run_cli("kvstore", env={"PDSERVE_SYNC": "sometimes"})
    assert r.returncode == 2
    assert "--sync (PDSERVE_SYNC)" in r.stderr and "sometimes" in r.stderr


def test_unknown_flag_is_refused():
    r = run_cli("decode", "--no-such-flag", "1")
    assert r.returncode == 2 and "--no-such-flag" in r.stderr


def test_missing_model_file_is_a_clear_start_up_error(tmp_path):
    r = run_cli("prefill", "--model", str(tmp_path / "nope.gguf"), "--port", "0")
    assert r.returncode == 2
    assert "model path does not exist" in r.stderr


def test_gateway_is_not_serving_until_workers_join(tmp_path):
    ready = tmp_path / "gw.json"
    proc = subprocess.Popen([sys.executable, "-m", "pdserve", "gateway", "--port", "0",
                             "--kvstore", "", "--ready-file", str(ready)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def started() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()
            return ready.exists()

        wait_until(started, 120, what="the gateway ready")
        port = json.loads(ready.read_text())["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for service in ("", "pdserve.v1.Gateway"):
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        proc.terminate()
        assert proc.wait(30) == 0  # graceful shutdown on SIGTERM


def test_settings_error_message_lists_every_bad_field():
    try:
        load_settings(DecodeSettings, max_batch=0, lease_s=-1)
    except SettingsError as e:
        assert "--max-batch" in str(e) and "--lease-s" in str(e)
    else:
        raise AssertionError("no error")


def test_an_ep_group_set_up_wrong_stops_the_worker_naming_the_setting(tmp_path):
    r = run_cli("decode", "--ep-size", "2")
    assert r.returncode == 2 and "dist_init: an EP group needs its rendezvous" in r.stderr
    r = run_cli("decode", "--ep-size", "2", "--ep-rank", "2", "--ep-group", "g",
                "--dist-init", f"file://{tmp_path}/rv")
    assert r.returncode == 2 and "ep_rank 2 must be below ep_size 2" in r.stderr
    r = run_cli("decode", "--ep-size", "2", "--ep-group", "g", "--dist-init",
                f"file://{tmp_path}/rv", "--port", "0")  # the default model is dense
    assert r.returncode == 2
    assert "--ep-size 2: expert parallelism needs a mixture-of-experts model" in r.stderr


def test_startup_phases_add_up_and_print_in_order():
    """pdserve/startup.py: each mark ends a phase (time since the previous mark, the first
    since the process started); a phase marked twice adds up; the summary keeps their order."""
    import time

    from pdserve import startup

    saved, last = dict(startup.PHASES), startup._last
    try:
        startup.PHASES.clear()
        startup._last = None
        startup.phase("first")
        assert startup.PHASES["first"] > 0  # the process started before this test
        startup._last = time.monotonic() - 0.5
        startup.phase("model load")
        startup._last = time.monotonic() - 0.25
        startup.phase("model load")
        assert 0.75 <= startup.PHASES["model load"] < 1.0
        text = startup.summary({"a": 1.0, "tiny": 0.01, "b": 2.5})
        assert text == "3.5 s: a 1.0, b 2.5"
    finally:
        startup.PHASES.clear()
        startup.PHASES.update(saved)
        startup._last = last
