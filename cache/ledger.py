"""The request ledger: one row per finished, failed or aborted request, queryable with SQL.

Storage: append-only Parquet segments under `DATA_DIR/ledger/<table>/`, written by one
background thread, so the request path only appends a tuple to a bounded in-memory list.

- A segment is written whole to a temporary name, fsynced, then renamed: a reader (or a
  process killed at any instant) sees complete segments only. A SIGKILL loses at most the
  rows not yet flushed: one batch, at most `flush_records` rows or `flush_s` seconds of rows,
  whichever fills first.
- Segments are numbered `seg-<seq>.parquet`. When `compact_after` of them pile up they are
  merged into `cmp-<lo>-<hi>.parquet` (and the merged files deleted). A file covered by a
  wider `cmp` file is ignored by readers, so a crash between the merge and the deletes can
  never count a row twice; the next writer deletes such leftovers.
- When more than `max_pending` rows wait (the disk is stuck), new rows are dropped and counted
  (`dropped`): memory stays bounded, the request path never blocks.

Reading: `connect_ledger(data_dir)` gives a DuckDB connection with the views `requests` and
`workers`, locked down: no file outside the ledger can be read, nothing can be written, and the
configuration cannot be changed back. `run_query` also refuses any statement but SELECT.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

from pdserve.cache.errors import QueryError

log = logging.getLogger(__name__)

# (name, SQL type, numpy dtype). "ts" is stored from epoch seconds.
REQUEST_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("ts", "TIMESTAMPTZ", np.float64),      # arrival time (UTC)
    ("request_id", "VARCHAR", object),
    ("tenant", "VARCHAR", object),           # sha256(cache_salt)[:16] hex; '' = no salt
    ("model", "VARCHAR", object),
    ("status", "VARCHAR", object),           # OK or the gRPC status code name
    ("finish_reason", "VARCHAR", object),    # stop | length | abort | ''
    ("prompt_tokens", "BIGINT", np.int64),
    ("cached_tokens", "BIGINT", np.int64),
    ("completion_tokens", "BIGINT", np.int64),
    ("ttft_s", "DOUBLE", np.float64),
    ("tpot_s", "DOUBLE", np.float64),        # time per output token after the first
    ("e2e_s", "DOUBLE", np.float64),
    ("prefill_worker", "VARCHAR", object),
    ("decode_worker", "VARCHAR", object),
    ("kv_bytes", "BIGINT", np.int64),        # KV bytes moved prefill -> decode
    ("fetch_s", "DOUBLE", np.float64),       # prefill: reading cached blocks from the store
    ("compute_s", "DOUBLE", np.float64),     # prefill: computing the uncached part
    ("miss_reason", "VARCHAR", object),      # see MISS_REASONS; '' = nothing to explain
    ("error", "VARCHAR", object),
    ("attempts", "BIGINT", np.int64),        # 1, or more after retries / migrations
    ("gateway", "VARCHAR", object),          # the gateway that served it (--gateway-id)
)

WORKER_COLUMNS: tuple[tuple[str, str, Any], ...] = (
    ("ts", "TIMESTAMPTZ", np.float64),
    ("worker_id", "VARCHAR", object),
    ("role", "VARCHAR", object),
    ("in_rotation", "BOOLEAN", np.bool_),
    ("running", "BIGINT", np.int64),
    ("queued_tokens", "BIGINT", np.int64),
    ("used_pages", "BIGINT", np.int64),
    ("total_pages", "BIGINT", np.int64),
    ("interval_s", "DOUBLE", np.float64),    # the time this sample stands for
    ("gateway", "VARCHAR", object),          # the gateway that took the sample
)

TABLES = {"requests": REQUEST_COLUMNS, "workers": WORKER_COLUMNS}



class MissReason(str, enum.Enum):
    """Why the uncached part of a prompt was not a hit (the reason of its first uncached
    token); the ledger's `miss_reason` column."""

    PARTIAL_BLOCK = "partial_block"
    STORE_UNAVAILABLE = "store_unavailable"
    FETCH_FAILED = "fetch_failed"
    EVICTED = "evicted"
    DIFFERENT_SALT = "different_salt"
    NEVER_SEEN = "never_seen"


MISS_REASONS = {
    MissReason.PARTIAL_BLOCK: "only the last, incomplete block (and the final token) was "
                              "computed",
    MissReason.STORE_UNAVAILABLE: "the kvstore could not answer the lookup (down, slow or not "
                                  "set)",
    MissReason.FETCH_FAILED: "the store listed the blocks but they could not be fetched or "
                             "verified",
    MissReason.EVICTED: "the block was stored once and evicted or expired since",
    MissReason.DIFFERENT_SALT: "another tenant (cache salt) sent this prefix; salts never "
                               "share KV",
    MissReason.NEVER_SEEN: "no request sent this prefix before",
}

_SEG = re.compile(r"^seg-(\d{12})\.parquet$")
_CMP = re.compile(r"^cmp-(\d{12})-(\d{12})\.parquet$")


def _ranges(directory: Path) -> list[tuple[int, int, Path]]:
    out = []
    for p in directory.glob("*.parquet"):
        if m := _SEG.match(p.name):
            out.append((int(m[1]), int(m[1]), p))
        elif m := _CMP.match(p.name):
            out.append((int(m[1]), int(m[2]), p))
    return sorted(out)


def live_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """(files to read, files covered by a wider compacted file)."""
    ranges = _ranges(directory)
    live, covered = [], []
    for lo, hi, p in ranges:
        if any(lo2 <= lo and hi <= hi2 and (lo2, hi2) != (lo, hi) for lo2, hi2, _ in ranges):
            covered.append(p)
        else:
            live.append(p)
    return live, covered


def table_files(directory: Path) -> list[Path]:
    """The live segment files of one table: its own directory's (a ledger without a gateway
    id) and every gateway's directory under it."""
    dirs = [directory] + (sorted(p for p in directory.iterdir() if p.is_dir())
                          if directory.is_dir() else [])
    return [f for d in dirs for f in live_files(d)[0]]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentLog:
    """One append-only table: rows in memory until a background flush writes a segment."""

    def __init__(self, directory: Path, columns: Sequence[tuple[str, str, Any]],
                 flush_records: int = 256, flush_s: float = 1.0, max_pending: int = 100_000,
                 compact_after: int = 32) -> None:
        if flush_records < 1 or flush_s <= 0 or max_pending < flush_records:
            raise ValueError("ledger: need flush_records >= 1, flush_s > 0, "
                             "max_pending >= flush_records")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.columns = list(columns)
        self.flush_records = flush_records
        self.flush_s = flush_s
        self.max_pending = max_pending
        self.compact_after = compact_after
        self.dropped = 0
        self.written = 0
        self._pending: list[tuple[Any, ...]] = []
        self._cond = threading.Condition()
        self._io = threading.Lock()  # one segment write or compaction at a time
        self._con = duckdb.connect()
        for p in self.dir.glob("*.tmp"):  # a write cut short by a crash
            p.unlink(missing_ok=True)
        _, covered = live_files(self.dir)
        for p in covered:  # a compaction cut short after its rename
            p.unlink(missing_ok=True)
        ranges = _ranges(self.dir)
        self._seq = (max(hi for _, hi, _ in ranges) + 1) if ranges else 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"ledger-{directory.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def append(self, row: tuple[Any, ...]) -> bool:
        """Queues one row (never blocks on I/O); False when dropped because the queue is full."""
        with self._cond:
            if len(self._pending) >= self.max_pending:
                self.dropped += 1
                return False
            self._pending.append(row)
            if len(self._pending) >= self.flush_records:
                self._cond.notify()
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                deadline = time.monotonic() + self.flush_s
                while not self._stop and len(self._pending) < self.flush_records:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if self._stop:
                    return
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001 - keep the rows, try again next period
                log.error("ledger flush failed", extra={"table": self.dir.name, "why": str(e)})
                time.sleep(self.flush_s)

    def flush(self) -> int:
        """Writes every queued row now; returns how many."""
        with self._io:
            with self._cond:
                rows, self._pending = self._pending, []
            if not rows:
                return 0
            try:
                self._write(rows)
            except Exception:
                with self._cond:  # put them back in front, in order
                    self._pending[:0] = rows
                raise
            self.written += len(rows)
            if sum(1 for p in self.dir.glob("seg-*.parquet")) >= self.compact_after:
                self._compact("seg-")
            if sum(1 for p in self.dir.glob("cmp-*.parquet")) >= self.compact_after:
                self._compact("cmp-")
            return len(rows)

    def _select(self) -> str:
        return ", ".join(f"to_timestamp({n}) AS {n}" if t == "TIMESTAMPTZ" else n
                         for n, t, _ in self.columns)

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        cols = list(zip(*rows))
        data = {n: np.array(cols[i], dtype=dt) for i, (n, _, dt) in enumerate(self.columns)}
        name = f"seg-{self._seq:012d}.parquet"
        tmp = self.dir / (name + ".tmp")
        self._con.register("batch", data)
        try:
            self._con.execute(f"COPY (SELECT {self._select()} FROM batch) TO '{tmp}' "
                              "(FORMAT parquet)")
        finally:
            self._con.unregister("batch")
        self._publish(tmp, self.dir / name)
        self._seq += 1

    def _publish(self, tmp: Path, final: Path) -> None:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        _fsync_dir(self.dir)

    def _compact(self, prefix: str) -> None:
        files = [(lo, hi, p) for lo, hi, p in _ranges(self.dir) if p.name.startswith(prefix)]
        if len(files) < 2:
            return
        lo, hi = files[0][0], max(h for _, h, _ in files)
        name = f"cmp-{lo:012d}-{hi:012d}.parquet"
        tmp = self.dir / (name + ".tmp")
        srcs = ", ".join(f"'{p}'" for _, _, p in files)
        self._con.execute(f"COPY (SELECT * FROM read_parquet([{srcs}])) TO '{tmp}' "
                          "(FORMAT parquet)")
        self._publish(tmp, self.dir / name)
        for _, _, p in files:
            if p.name != name:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        """Stops the writer and flushes everything queued (no row lost on a clean shutdown)."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()
        self.flush()
        self._con.close()


class Ledger:
    """One gateway's two tables: `requests` (one row per request) and `workers` (samples).

    Several gateways share a data directory (or their volumes are gathered later): each writes
    its segments under `<table>/<gateway>/`, and readers read every gateway's directory (and
    the table directory itself, where a ledger without a gateway id writes). Two gateways with
    the same id on one directory are refused (the second fails at start-up naming it)."""

    def __init__(self, data_dir: Path, flush_records: int = 256, flush_s: float = 1.0,
                 max_pending: int = 100_000, compact_after: int = 32,
                 gateway: str = "") -> None:
        from pdserve.supervise import DirLock

        root = ledger_dir(data_dir)
        self.gateway = gateway
        # Before any segment is touched: one writer per gateway id.
        self._lock = DirLock(root, f".writer-{gateway or '_'}.lock", "--gateway-id",
                             "another gateway", repr(gateway))
        self.requests = SegmentLog(root / "requests" / gateway, REQUEST_COLUMNS, flush_records,
                                   flush_s, max_pending, compact_after)
        self.workers = SegmentLog(root / "workers" / gateway, WORKER_COLUMNS, flush_records,
                                  flush_s, max_pending, compact_after)

    def record_request(self, **fields: Any) -> bool:
        fields["gateway"] = self.gateway
        return self.requests.append(tuple(fields[n] for n, _, _ in REQUEST_COLUMNS))

    def record_worker(self, **fields: Any) -> bool:
        fields["gateway"] = self.gateway
        return self.workers.append(tuple(fields[n] for n, _, _ in WORKER_COLUMNS))

    def flush(self) -> None:
        self.requests.flush()
        self.workers.flush()

    def close(self) -> None:
        self.requests.close()
        self.workers.close()
        self._lock.release()


def ledger_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "ledger"


def connect_ledger(data_dir: Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with read-only views over the ledger, locked down."""
    root = ledger_dir(data_dir).resolve()
    con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False})
    con.execute("SET TimeZone = 'UTC'")
    for table, columns in TABLES.items():
        live = table_files(root / table)
        if live:
            files = ", ".join(f"'{p}'" for p in live)
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{files}], "
                        "union_by_name = true)")
        else:
            empty = ", ".join(f"CAST(NULL AS {t}) AS {n}" for n, t, _ in columns)
            con.execute(f"CREATE VIEW {table} AS SELECT {empty} WHERE false")
    con.execute(f"SET allowed_directories = ['{root}/']")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def check_read_only(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(f"query: {e}") from None
    if not statements:
        raise QueryError("query: empty")
    for st in statements:
        if st.type != duckdb.StatementType.SELECT:
            kind = str(st.type).rsplit(".", 1)[-1]
            raise QueryError(f"query: only read-only SELECT statements are allowed, got {kind} "
                             "(the ledger cannot be written, attached or exported from here)")
    if len(statements) > 1:
        raise QueryError("query: one statement at a time")


def run_query(data_dir: Path, sql: str, params: dict[str, Any] | None = None,
              max_rows: int = 100_000) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Runs one read-only SELECT over the ledger; returns (column names, rows)."""
    for attempt in range(3):
        con = connect_ledger(data_dir)
        try:
            check_read_only(con, sql)
            cur = con.execute(sql, params or {})
            rows = cur.fetchmany(max_rows + 1)
            if len(rows) > max_rows:
                raise QueryError(f"query: more than {max_rows} rows; add a LIMIT")
            return [d[0] for d in cur.description], rows
        except duckdb.IOException as e:
            if attempt == 2:  # a compaction removed a file between listing and reading
                raise QueryError(f"query: {e}") from None
        except duckdb.PermissionException as e:
            raise QueryError(f"query refused: {str(e).split(' - ')[0]} - only the ledger "
                             "tables `requests` and `workers` can be read") from None
        except duckdb.Error as e:
            raise QueryError(f"query: {e}") from None
        finally:
            con.close()
    raise AssertionError("unreachable")
