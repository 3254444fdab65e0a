"""The request ledger: durable segments, compaction, bounded memory, SIGKILL, read-only SQL."""

from __future__ import annotations

import mmap
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pdserve.cache.ledger import (
    REQUEST_COLUMNS,
    Ledger,
    QueryError,
    SegmentLog,
    ledger_dir,
    live_files,
    run_query,
)
from tests.helpers import ledger_row, wait_until


def ids(data_dir: Path) -> list[int]:
    _, rows = run_query(data_dir, "SELECT request_id FROM requests")
    return sorted(int(r[0][1:]) for r in rows)


def test_rows_survive_flushes_compaction_and_reopen(tmp_path):
    led = Ledger(tmp_path, flush_records=1000, flush_s=60, compact_after=3)
    for i in range(10):
        led.record_request(**ledger_row(i))
        led.requests.flush()  # one segment per row: forces two rounds of compaction
    led.close()
    files = sorted(p.name for p in (ledger_dir(tmp_path) / "requests").iterdir())
    assert all(f.endswith(".parquet") for f in files) and len(files) < 10
    assert any(f.startswith("cmp-") for f in files)
    assert ids(tmp_path) == list(range(10))  # nothing lost, nothing twice
    # A new writer continues the numbering; old and new rows read together.
    led = Ledger(tmp_path, flush_records=1000, flush_s=60, compact_after=3)
    led.record_request(**ledger_row(10))
    led.close()
    assert ids(tmp_path) == list(range(11))


def test_a_compaction_cut_short_never_counts_a_row_twice(tmp_path):
    import duckdb

    d = ledger_dir(tmp_path) / "requests"
    log = SegmentLog(d, REQUEST_COLUMNS, flush_records=10, flush_s=60, compact_after=100)
    for i in range(3):
        log.append(tuple(ledger_row(i)[n] for n, _, _ in REQUEST_COLUMNS))
        log.flush()
    log.close()
    segs = sorted(d.glob("seg-*.parquet"))
    assert len(segs) == 3
    # What a crash between the compacted file's rename and the deletes leaves behind, plus a
    # torn temporary file:
    files = ", ".join(f"'{p}'" for p in segs)
    duckdb.connect().execute(f"COPY (SELECT * FROM read_parquet([{files}])) TO "
                             f"'{d}/cmp-000000000000-000000000002.parquet' (FORMAT parquet)")
    (d / "seg-000000000009.parquet.tmp").write_bytes(b"half a write")
    live, covered = live_files(d)
    assert [p.name for p in live] == ["cmp-000000000000-000000000002.parquet"]
    assert sorted(covered) == segs
    assert ids(tmp_path) == [0, 1, 2]
    # The next writer removes the leftovers and the torn file, and numbers on from 3.
    log = SegmentLog(d, REQUEST_COLUMNS, compact_after=100)
    log.append(tuple(ledger_row(3)[n] for n, _, _ in REQUEST_COLUMNS))
    log.close()
    names = sorted(p.name for p in d.iterdir())
    assert names == ["cmp-000000000000-000000000002.parquet", "seg-000000000003.parquet"]
    assert ids(tmp_path) == [0, 1, 2, 3]


def test_memory_is_bounded_and_drops_are_counted(tmp_path):
    log = SegmentLog(tmp_path / "requests", REQUEST_COLUMNS, flush_records=50, flush_s=3600,
                     max_pending=50)
    log._io.acquire()  # the disk is stuck: the writer cannot write
    try:
        accepted = [log.append(tuple(ledger_row(i)[n] for n, _, _ in REQUEST_COLUMNS))
                    for i in range(80)]
        assert accepted == [True] * 50 + [False] * 30
        assert log.pending == 50 and log.dropped == 30
    finally:
        log._io.release()
    log.close()
    assert log.written == 50 and log.pending == 0


def test_close_writes_everything_queued(tmp_path):
    led = Ledger(tmp_path, flush_records=10_000, flush_s=3600)
    for i in range(1234):
        led.record_request(**ledger_row(i))
    led.close()
    assert ids(tmp_path) == list(range(1234))


WRITER = r"""
import mmap, struct, sys, time
from pathlib import Path
from pdserve.cache.ledger import Ledger
sys.path.insert(0, sys.argv[3])
from tests.helpers import ledger_row
led = Ledger(Path(sys.argv[1]), flush_records=int(sys.argv[2]), flush_s=0.2)
f = open(sys.argv[1] + "/count", "r+b")
m = mmap.mmap(f.fileno(), 8)
i = 0
while True:
    led.record_request(**ledger_row(i))
    i += 1
    m[:8] = struct.pack("<q", i)  # rows handed to the ledger, visible after a SIGKILL
    if i % 50 == 0:
        time.sleep(0.01)
"""


@pytest.mark.integration
@pytest.mark.parametrize("kill_after_s", [0.7, 1.3, 2.1])
def test_sigkill_loses_at_most_the_unflushed_batch(tmp_path, kill_after_s):
    """The writer appends ~4,000 rows/s with batches of 200 rows or 0.2 s; SIGKILL at a random
    point keeps a readable ledger holding rows 0..k-1 exactly, k >= handed - one batch."""
    batch = 200
    (tmp_path / "count").write_bytes(b"\0" * 8)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(batch),
                          str(Path(__file__).resolve().parents[2])])
    def handed_so_far() -> int:
        return struct.unpack("<q", (tmp_path / "count").read_bytes()[:8])[0]

    def writing() -> bool:
        assert p.poll() is None, "the writer died"
        return handed_so_far() > 0

    wait_until(writing, 60)  # the writer is up (imports take a while on a busy machine)
    time.sleep(kill_after_s)  # the kill at a chosen moment of the writing: the experiment
    p.send_signal(signal.SIGKILL)
    p.wait()
    with open(tmp_path / "count", "rb") as f:
        handed = struct.unpack("<q", mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_READ)[:8])[0]
    got = ids(tmp_path)
    assert got == list(range(len(got)))  # a prefix: no gap, no duplicate, no torn file
    assert handed > 0 and len(got) > 0
    # Lost: what was queued since the last flush, at most one batch (200 rows or 0.2 s of
    # rows, here ~800 at most), plus the one batch being written when the signal came.
    assert handed - len(got) <= 2 * max(batch, 0.2 * 4000 + 50)


@pytest.mark.parametrize("sql,why", [
    ("DELETE FROM requests", "got DELETE"),
    ("INSERT INTO requests SELECT * FROM requests", "got INSERT"),
    ("CREATE TABLE x AS SELECT 1", "got CREATE"),
    ("COPY requests TO '/tmp/out.csv'", "got COPY"),
    ("ATTACH '/tmp/other.db'", "got ATTACH"),
    ("SET enable_external_access = true", "got SET"),
    ("INSTALL httpfs", "got"),
    ("SELECT * FROM read_csv('/etc/passwd')", "Permission Error"),
    ("SELECT * FROM read_text('/etc/hostname')", "Permission Error"),
    ("SELECT 1; DROP VIEW requests", "DROP"),
    ("SELECT 1; SELECT 2", "one statement"),
    ("SELEC 1", "syntax error"),
])
def test_queries_that_write_attach_or_read_files_are_refused(tmp_path, sql, why):
    led = Ledger(tmp_path)
    led.record_request(**ledger_row(0))
    led.close()
    with pytest.raises(QueryError, match=why):
        run_query(tmp_path, sql)
    assert ids(tmp_path) == [0]  # and the ledger is untouched


def test_select_works_on_an_empty_and_a_full_ledger(tmp_path):
    assert run_query(tmp_path, "SELECT count(*) FROM requests")[1] == [(0,)]
    assert run_query(tmp_path, "SELECT count(*) FROM workers")[1] == [(0,)]
    led = Ledger(tmp_path)
    for i in range(5):
        led.record_request(**ledger_row(i, cached_tokens=i))
    led.record_worker(ts=1.7e9, worker_id="p0", role="prefill", in_rotation=True, running=1,
                      queued_tokens=10, used_pages=3, total_pages=8, interval_s=1.0)
    led.close()
    cols, rows = run_query(tmp_path, "SELECT sum(cached_tokens) AS c, max(ts) AS t FROM requests")
    assert cols == ["c", "t"] and rows[0][0] == 10
    assert rows[0][1].timestamp() == pytest.approx(1_700_000_004.0)
    assert run_query(tmp_path, "SELECT used_pages FROM workers")[1] == [(3,)]
    with pytest.raises(QueryError, match="add a LIMIT"):
        run_query(tmp_path, "SELECT * FROM range(10)", max_rows=5)
