"""`pdserve kvstore stats` and `pdserve kvstore verify`: inspect a stopped store."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

from pdserve.cache.store import BlockStore
from pdserve.config import KVStoreSettings


def run_offline(settings: KVStoreSettings, action: str, as_json: bool) -> int:
    path = settings.data_dir / "kvstore"
    if not path.exists():
        print(f"pdserve kvstore {action}: no store at {path}", file=sys.stderr)
        return 2
    try:
        store = BlockStore(path, read_only=True)
    except Exception as e:  # noqa: BLE001 - RocksDB reports a held lock as a plain error
        print(f"pdserve kvstore {action}: cannot open {path}: {e}\n(is the store running? "
              "use the Stats RPC on a running store)", file=sys.stderr)
        return 2
    try:
        if action == "stats":
            report = {"path": str(path), **asdict(store.stats),
                      "bytes_on_disk": store.bytes_on_disk()}
            print(json.dumps(report) if as_json else "\n".join(
                f"{k:>14}  {v}" for k, v in report.items()))
            return 0
        checked, bad = store.verify_all()
        if as_json:
            print(json.dumps({"path": str(path), "checked": checked,
                              "problems": [{"key": k.hex(), "problem": p} for k, p in bad]}))
        else:
            print(f"{path}: checked {checked} blocks, {len(bad)} problems")
            for k, p in bad:
                print(f"  {k.hex()}: {p}")
        return 1 if bad else 0
    finally:
        store.close()
