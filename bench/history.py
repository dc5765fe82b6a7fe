"""History store benchmark: insert rate, `who` and `query` latency, size, on N stored flows.

The data is a synthetic but gateway-shaped week: inside hosts in 10.0.0.0/16 masqueraded
behind four public addresses (198.51.100.1-4), 5 % port-forwarded inbound flows (DNAT),
TCP/UDP/ICMP mixed, durations exponential around 30 s. Rows go through the stores' real
`apply()` with the real schema and indexes, in the batches the history sink produces.

  load     N flows as DESTROY rows (the bulk path), rate per million as the tables grow
  pairs    NEW then DESTROY for 200k more flows on top (two upserts each, as live traffic)
  who      random public ip:port at a moment inside a known flow (must be found) and at a
           moment with no flow (must be empty): median / p95 / max latency
  query    typical `conntrail query` filters over a one-hour window
  size     bytes on disk per million flows

Run:  python3 bench/history.py [--flows 10000000] [--stores sqlite,postgres] [--dir DIR]
PostgreSQL: a throwaway cluster is started (as the tests do) unless --pg-dsn is given.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from conntrail.filters.parser import parse  # noqa: E402
from conntrail.history.rows import ClosedBy, FlowRow, HistoryBatch  # noqa: E402
from conntrail.history.store import FlowQuery, HistoryStore, WhoQuery  # noqa: E402

WEEK_NS = 7 * 86_400 * 10**9
PUBLIC = [f"198.51.100.{i}" for i in range(1, 5)]
DPORTS = [443] * 50 + [80] * 15 + [53] * 15 + [123] * 3 + [22] * 2 + [993, 587, 8080, 5222]
BATCH = 8192  # rows per transaction: what the sink's merged batches reach under load


def synthetic_flows(count: int, t0: int, seed: int = 7) -> Iterator[FlowRow]:
    """`count` closed flows spread evenly over a week from t0 (deterministic)."""
    rnd = random.Random(seed)
    step = WEEK_NS // count
    for i in range(count):
        start = t0 + i * step + rnd.randrange(step)
        end = start + int(rnd.expovariate(1 / 30) * 1e9) + 1_000_000
        yield _flow(rnd, i, start, end)


def _flow(rnd: random.Random, i: int, start: int, end: int) -> FlowRow:
    roll = rnd.random()
    proto = 1 if roll < 0.02 else 17 if roll < 0.30 else 6
    inside = f"10.0.{rnd.randrange(8)}.{rnd.randrange(1, 255)}"
    public = PUBLIC[rnd.randrange(4)]
    remote = f"203.0.113.{rnd.randrange(1, 255)}" if rnd.random() < 0.5 else \
        f"192.0.2.{rnd.randrange(1, 255)}"
    size = int(rnd.expovariate(1 / 20000))
    if proto == 1:
        ident = rnd.randrange(65536)
        return FlowRow(start, end, ClosedBy.DESTROY, "", i, 2, 1, inside, remote, None, None,
                       remote, public, None, None, 8, 0, ident, 1, 0x18e, None, 0, None,
                       None, 1, 84, 1, 84)
    if rnd.random() < 0.05:  # inbound port forward: outside client → public:8443 → inside:443
        client, cport = remote, rnd.randrange(1024, 65536)
        return FlowRow(start, end, ClosedBy.DESTROY, "", i, 2, proto, client, public, cport,
                       8443, inside, client, 443, cport, None, None, None, 2, 0x1ae,
                       3 if proto == 6 else None, 0, None, None, 10, size, 12, size * 3)
    sport = rnd.randrange(32768, 61000)
    pport = sport if rnd.random() < 0.7 else rnd.randrange(1024, 65536)
    dport = DPORTS[rnd.randrange(len(DPORTS))]
    return FlowRow(start, end, ClosedBy.DESTROY, "", i, 2, proto, inside, remote, sport, dport,
                   remote, public, dport, pport, None, None, None, 1, 0x19e,
                   7 if proto == 6 else None, 0, None, None, 10, size, 12, size * 3)


def as_open(row: FlowRow) -> FlowRow:
    """The row a NEW event writes: no end, no counters yet."""
    return row._replace(end_ns=None, closed_by=ClosedBy.OPEN, orig_packets=None,
                        orig_bytes=None, reply_packets=None, reply_bytes=None)


def chunks(rows: Iterator[FlowRow], size: int) -> Iterator[list[FlowRow]]:
    """Lists of `size` rows."""
    batch: list[FlowRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def load(store: HistoryStore, count: int, t0: int) -> dict[str, Any]:
    """Bulk-load `count` closed flows; the rate per million shows how growth costs."""
    per_million: list[int] = []
    started = mark = time.perf_counter()
    done = 0
    for batch in chunks(synthetic_flows(count, t0), BATCH):
        store.apply(HistoryBatch(upserts=batch))
        done += len(batch)
        if done % 1_000_000 < BATCH and done >= 1_000_000:
            now = time.perf_counter()
            per_million.append(round(1_000_000 / (now - mark)))
            mark = now
            print(f"  loaded {done:,} ({per_million[-1]:,} flows/s for the last million)",
                  flush=True)
    seconds = time.perf_counter() - started
    return {"flows": done, "seconds": round(seconds, 1), "flows_per_s": round(done / seconds),
            "per_million": per_million}


def pairs(store: HistoryStore, count: int, t0: int) -> dict[str, Any]:
    """NEW then DESTROY for `count` more flows (two upserts each), as live traffic writes."""
    rows = list(synthetic_flows(count, t0 + WEEK_NS, seed=11))
    started = time.perf_counter()
    lag: list[FlowRow] = []
    for batch in chunks(iter(rows), BATCH // 2):
        store.apply(HistoryBatch(upserts=[as_open(r) for r in batch] + lag))
        lag = batch  # the DESTROYs come a batch later, with the next NEWs
    store.apply(HistoryBatch(upserts=lag))
    seconds = time.perf_counter() - started
    return {"flows": count, "seconds": round(seconds, 2),
            "flows_per_s": round(count / seconds), "events_per_s": round(2 * count / seconds)}


def timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], list[Any]]:
    """Latencies in ms and results of `repeat` calls."""
    times, results = [], []
    for _ in range(repeat):
        t = time.perf_counter()
        results.append(fn())
        times.append((time.perf_counter() - t) * 1000)
    return times, results


def summary(ms: list[float]) -> dict[str, float]:
    """Median, p95 and max of latencies in ms."""
    ordered = sorted(ms)
    return {"median_ms": round(statistics.median(ordered), 2),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
            "max_ms": round(ordered[-1], 2)}


def who_latency(store: HistoryStore, count: int, t0: int, samples: int = 300) -> dict[str, Any]:
    """`who` on known flows (must be found) and on empty moments (must find nothing)."""
    rnd = random.Random(3)
    wanted = sorted(rnd.sample(range(count), samples))
    known = [row for i, row in enumerate(synthetic_flows(count, t0)) if i in set(wanted)]
    hits: list[float] = []
    found = 0
    for row in known:
        if row.nat == 2:
            address, port = row.orig_dst, row.orig_dport
        else:
            address, port = row.reply_dst or "", row.reply_dport
        moment = (row.start_ns + (row.end_ns or row.start_ns)) // 2
        query = WhoQuery(address, port, moment, moment)
        ms, [matches] = timed(lambda: store.who(query), 1)  # noqa: B023 - called at once
        hits += ms
        found += any(m.row.ct_id == row.ct_id for m in matches)
    misses: list[float] = []
    empty = 0
    for _ in range(samples // 3):
        moment = t0 - rnd.randrange(1, 86_400) * 10**9  # before the data: nothing there
        query = WhoQuery(PUBLIC[0], rnd.randrange(1024, 65536), moment, moment)
        ms, [matches] = timed(lambda: store.who(query), 1)  # noqa: B023 - called at once
        misses += ms
        empty += not matches
    return {"found": f"{found}/{len(known)}", "empty": f"{empty}/{samples // 3}",
            "hit": summary(hits), "miss": summary(misses)}


QUERIES = {
    "one remote host and port, 1 h": "dst == 203.0.113.77 and dport == 443",
    "inside /24, 1 h": "src in 10.0.3.0/24",
    "large transfers, 1 h": "bytes > 200000 and tcp",
}


def query_latency(store: HistoryStore, t0: int) -> dict[str, Any]:
    """Typical `conntrail query` filters over a one-hour window mid-week."""
    start = t0 + WEEK_NS // 2
    out: dict[str, Any] = {}
    for label, text in QUERIES.items():
        query = FlowQuery(parse(text), start, start + 3600 * 10**9, limit=1000)
        ms, results = timed(lambda: list(store.query(query)), 5)  # noqa: B023 - called at once
        out[label] = {**summary(ms), "rows": len(results[0])}
    return out


def disk_bytes(path: Path) -> int:
    """Bytes of the SQLite file and its WAL."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


@contextmanager
def open_bench_store(kind: str, workdir: Path, dsn: str | None) -> Iterator[
        tuple[HistoryStore, Callable[[], int]]]:
    """A fresh store of `kind` and a function giving its size on disk."""
    if kind == "sqlite":
        from conntrail.history.sqlite import SqliteStore

        path = workdir / "bench.sqlite"
        store = SqliteStore(str(path), create=True)
        try:
            yield store, lambda: disk_bytes(path)
        finally:
            store.close()
        return
    from conntrail.history.postgres import PostgresStore

    with pg_server(dsn) as url:
        pg = PostgresStore(url, create=True)
        try:
            yield pg, lambda: pg_size(url)
        finally:
            pg.close()


@contextmanager
def pg_server(dsn: str | None) -> Iterator[str]:
    """The given DSN, or a throwaway cluster (the integration tests' helper)."""
    if dsn:
        yield dsn
        return
    from tests.integration.pg import pg_cluster

    with pg_cluster() as cluster:
        yield cluster.dsn()


def pg_size(url: str) -> int:
    """Bytes of the conntrail schema's tables (every partition) with their indexes."""
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                           "JOIN pg_namespace n ON n.oid = c.relnamespace "
                           "WHERE n.nspname = 'conntrail' AND c.relkind = 'r'").fetchone()
    return int(row[0] or 0) if row else 0


def run_store(kind: str, flows: int, workdir: Path, dsn: str | None) -> dict[str, Any]:
    """Every measurement on one store."""
    t0 = time.time_ns() - 3 * WEEK_NS
    with open_bench_store(kind, workdir, dsn) as (store, size):
        print(f"{kind}: loading {flows:,} flows", flush=True)
        result: dict[str, Any] = {"load": load(store, flows, t0)}
        result["size_bytes"] = size()
        result["bytes_per_million"] = round(result["size_bytes"] / (flows / 1e6))
        print(f"{kind}: who / query latency", flush=True)
        result["who"] = who_latency(store, flows, t0)
        result["query"] = query_latency(store, t0)
        print(f"{kind}: NEW+DESTROY pairs on top", flush=True)
        result["pairs"] = pairs(store, min(200_000, max(flows // 10, 1000)), t0)
    print(json.dumps({kind: result}, indent=1), flush=True)
    return result


def main(argv: list[str]) -> int:
    """Parse options, run each store, write JSON results."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--flows", type=int, default=10_000_000)
    ap.add_argument("--stores", default="sqlite,postgres")
    ap.add_argument("--dir", type=Path, help="where the SQLite file goes (default: a tmp dir)")
    ap.add_argument("--pg-dsn", help="an existing PostgreSQL database (default: throwaway)")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {"flows": args.flows}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for kind in args.stores.split(","):
            results[kind] = run_store(kind, args.flows, Path(tmp), args.pg_dsn)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
