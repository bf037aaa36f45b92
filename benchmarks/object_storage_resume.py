"""What a killed and resumed pretraining run reads again from an S3-protocol store, against an uninterrupted one.

Starts a real S3-protocol server on the loopback (moto's server mode, in this process) whose WSGI app is wrapped
to record every request any process sends it: method, key, the Range asked, the bytes the response holds
(what the store was asked to send) and the bytes it handed to the socket before the client hung up. Counting at
the server sees both ranks (and the launcher's reads) without touching the training code. A shard set
(photo-sized JPEGs, about 100 KB each) is uploaded, and the tiny profile pretrains from it on 2 CPU ranks
through the `deepspeed` runner under the Slurm relay (mixmae_scale.cluster.signal_relay), in three ways:

  uninterrupted  N steps in one launch
  sigterm        SIGTERM to the whole process group once step K is logged (Slurm's preemption; the ranks save at
                 the next step boundary), then a second launch to N
  sigkill        SIGKILL to the whole process group once step K is logged (a lost node; the last periodic
                 checkpoint, every C steps, is where the second launch resumes), then a second launch to N

N is kept under one epoch of each rank's run, so a train byte read by both launches of a pair is a re-read, not
the next epoch's. For each launch: GETs and bytes by kind (the manifest and other small JSON, the tars' indexes,
train tars, held-out tars), per image the schedule trains (N x global batch), and for a pair the train-tar bytes
both launches fetched, in samples (each sample's image, header and label bytes, by the tars' indexes).

    python benchmarks/object_storage_resume.py --steps 24 --kill-at 13 --every 5 --shuffle-buffer 64 --label window64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
CHUNK = 64 << 10  # the response is handed to the socket in pieces of this size, counted as each is taken


class Recorder:
    """Wraps the moto server's WSGI app: one record per request."""

    def __init__(self, app) -> None:
        self.app, self.records, self.lock = app, [], threading.Lock()

    def __call__(self, environ, start_response):
        record = {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                  "query": environ.get("QUERY_STRING", ""), "range": environ.get("HTTP_RANGE", ""), "status": 0,
                  "body": 0, "sent": 0}
        with self.lock:
            self.records.append(record)

        def recording_start(status, headers, exc_info=None):
            record["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        body = self.app(environ, recording_start)
        return self._counted(body, record)

    @staticmethod
    def _counted(body, record):
        try:
            for piece in body:
                record["body"] += len(piece)
                for at in range(0, len(piece), CHUNK):
                    part = piece[at:at + CHUNK]
                    yield part  # werkzeug writes it before asking for the next one
                    record["sent"] += len(part)
        finally:
            if hasattr(body, "close"):
                body.close()

    def mark(self) -> int:
        with self.lock:
            return len(self.records)

    def since(self, mark: int) -> list[dict]:
        with self.lock:
            return list(self.records[mark:])


def start_server() -> tuple[object, Recorder]:
    from object_storage import start_server as start  # benchmarks/object_storage.py: moto on the loopback

    server, _ = start()
    deadline = time.time() + 10
    while getattr(server, "_server", None) is None and time.time() < deadline:
        time.sleep(0.05)
    recorder = Recorder(server._server.app)
    server._server.app = recorder
    return server, recorder


def build_photos(work: Path, train: int, val: int, per_shard: int) -> Path:
    """Photo-sized JPEGs (benchmarks/shards.py's generator, about 100 KB each) in 10 classes, `val` of them in a
    validation split (what the held-out loss reads)."""
    import shutil

    from shards import make_tree

    from mixmae_scale.shards.convert import ConvertOptions, convert

    out = work / "shards"
    if not (out / "dataset.json").exists():
        shutil.rmtree(work / "images", ignore_errors=True)
        make_tree(work / "images", train)
        shutil.rmtree(work / "images" / "val")
        make_tree(work / "val-images", val, seed=1)
        shutil.move(work / "val-images" / "train", work / "images" / "val")
        convert(work / "images", out, ConvertOptions(layout="imagenet", samples_per_shard=per_shard, shard_bytes=None,
                                                     workers=2))
    return out


TRAIN_TARS: set[str] = set()  # the train split's tars, as request paths (/bucket/key)


def kind_of(record: dict) -> str:
    path = record["path"]
    if record["method"] != "GET":
        return record["method"]
    if "list-type=" in record["query"]:
        return "LIST"
    if path.endswith(".idx"):
        return "index"
    if path.endswith(".tar"):
        return "train tar" if path in TRAIN_TARS else "held-out tar"
    return "json"


def summarise(records: list[dict]) -> dict:
    kinds: dict[str, dict[str, int]] = defaultdict(lambda: {"requests": 0, "body": 0, "sent": 0})
    for record in records:
        row = kinds[kind_of(record)]
        row["requests"] += 1
        row["body"] += record["body"]
        row["sent"] += record["sent"]
    gets = [r for r in records if r["method"] == "GET"]
    return {"by_kind": dict(kinds), "gets": len(gets), "get_body_bytes": sum(r["body"] for r in gets),
            "get_sent_bytes": sum(r["sent"] for r in gets), "requests": len(records)}


def train_intervals(records: list[dict]) -> dict[str, list[tuple[int, int]]]:
    """Per train tar, the byte intervals handed to the socket (a range from its start, as many bytes as sent)."""
    spans: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for record in records:
        if kind_of(record) != "train tar" or not record["sent"]:
            continue
        start = int(record["range"].split("=")[1].split("-")[0]) if record["range"] else 0
        spans[record["path"]].append((start, start + record["sent"]))
    return spans


def covered(intervals: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(a <= start and end <= b for a, b in intervals)


def samples_read(spans: dict[str, list[tuple[int, int]]], local: Path) -> dict[str, set[int]]:
    """Per train tar, the samples (index lines) whose header, image and label bytes some interval holds."""
    from mixmae_scale.data.shard_index import TAR_HEADER, parse_index

    found: dict[str, set[int]] = {}
    for path, intervals in spans.items():
        name = path.split("/shards/", 1)[1]
        index = parse_index((local / name).with_suffix(".idx").read_text(), name)  # the tar's own, uploaded
        hit = set()
        for i in range(len(index)):
            start = int(index.image_offset[i]) - TAR_HEADER
            end = int(index.image_offset[i] + index.image_size[i])
            if index.label_size[i]:
                end = max(end, int(index.label_offset[i] + index.label_size[i]))
            if covered(intervals, start, end):
                hit.add(i)
        found[name] = hit
    return found


def launch(run: Path, location: str, work: Path, steps: int, args) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    port = _free_port()
    command = [sys.executable, "-m", "mixmae_scale.cluster.signal_relay", str(bin_dir / "deepspeed"), "--num_gpus",
               "2", "--master_port", str(port), "--module", "mixmae_scale.cli", "pretrain", "--profile", "tiny",
               "--run-dir", str(run), "--max-steps", str(steps), "--set", f"data.shards={location}",
               "precision.dtype=fp32", f"data.shuffle_buffer={args.shuffle_buffer}", "logging.every_steps=1",
               "logging.heldout_batches=1", "logging.visualize_every_steps=0",
               f"checkpoint.every_steps={args.every}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    log = (work / f"{run.name}.log").open("a")
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    proc.port = port
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def logged_steps(run: Path) -> int:
    metrics = run / "metrics.csv"
    if not metrics.exists():
        return 0
    lines = metrics.read_text().splitlines()[1:]
    return int(lines[-1].split(",")[0]) if lines and lines[-1].split(",")[0].isdigit() else 0


def wait(proc: subprocess.Popen, run: Path, work: Path) -> None:
    if proc.wait(timeout=1200):
        tail = (work / f"{run.name}.log").read_text()[-3000:]
        raise RuntimeError(f"{run.name}: exit {proc.returncode}\n{tail}")


def kill_at(proc: subprocess.Popen, run: Path, work: Path, step: int, sig: int) -> int:
    """Signal the process group once `step` is logged; returns the last step logged when it was sent."""
    deadline = time.time() + 900
    while logged_steps(run) < step:
        if proc.poll() is not None or time.time() > deadline:
            tail = (work / f"{run.name}.log").read_text()[-3000:]
            raise RuntimeError(f"{run.name} ended before step {step}: {tail}")
        time.sleep(0.05)
    at = logged_steps(run)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=300)
    if sig == signal.SIGKILL:  # nothing ran DeepSpeed's clean-up: its CPU all-reduce buffers of this port
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{proc.port}_*"):
            leftover.unlink(missing_ok=True)
    return at


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name[4:12]) for p in (run / "checkpoints").glob("step*") if (p / "COMPLETE").exists())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1536, help="train images (photo-sized JPEGs)")
    parser.add_argument("--val", type=int, default=160, help="validation images (the held-out loss reads them)")
    parser.add_argument("--shard-samples", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24, help="N: kept under one epoch of each rank's run")
    parser.add_argument("--kill-at", type=int, default=15, help="K: the step logged when the signal is sent")
    parser.add_argument("--every", type=int, default=10, help="checkpoint.every_steps (where SIGKILL resumes)")
    parser.add_argument("--shuffle-buffer", type=int, default=64)
    parser.add_argument("--modes", nargs="+", default=["uninterrupted", "sigterm", "sigkill"])
    parser.add_argument("--label", default="", help="a name for this measurement in the results file")
    parser.add_argument("--out", type=Path, default=RESULTS / "object_storage_resume.json")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mixmae-resume-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    local = build_photos(args.work, args.train, args.val, args.shard_samples)
    server, recorder = start_server()
    from object_storage import upload_set

    from mixmae_scale.data.manifest import load_split

    remote = upload_set(local)
    train = load_split(str(local), "train")
    TRAIN_TARS.update("/bench/shards/" + Path(train.tar_url(i)).relative_to(local).as_posix()
                      for i in range(len(train.samples_per_shard)))
    micro, global_batch = 16, 32  # the tiny profile's, on 2 ranks
    per_rank = sum(train.samples_per_shard) // 2
    if args.steps * micro > per_rank:
        raise SystemExit(f"--steps {args.steps} x {micro} passes one epoch of a rank's run ({per_rank} samples)")
    sample_bytes = sum(train.bytes_per_shard) / sum(train.samples_per_shard)
    runs_root = Path(tempfile.mkdtemp(dir=args.work, prefix="runs-"))
    rows: dict[str, dict] = {}
    for mode in args.modes:
        run = runs_root / mode
        launches = []
        mark = recorder.mark()
        proc = launch(run, remote, args.work, args.steps, args)
        if mode == "uninterrupted":
            wait(proc, run, args.work)
            launches.append({"records": recorder.since(mark), "stop": "end"})
        else:
            sig = signal.SIGTERM if mode == "sigterm" else signal.SIGKILL
            logged = kill_at(proc, run, args.work, args.kill_at, sig)
            time.sleep(1.0)  # a request the server still answers after the kill belongs to the first launch
            first = recorder.since(mark)
            saved = checkpoint_steps(run)
            launches.append({"records": first, "stop": f"{signal.Signals(sig).name} after step {logged} was logged",
                             "logged": logged, "resumes_from": saved[-1] if saved else 0})
            mark = recorder.mark()
            proc = launch(run, remote, args.work, args.steps, args)
            wait(proc, run, args.work)
            launches.append({"records": recorder.since(mark), "stop": "end"})
        summary = json.loads((run / "summary.json").read_text())
        assert summary["steps"] == args.steps, summary
        row = {"launches": [], "total": summarise([r for item in launches for r in item["records"]])}
        for item in launches:
            entry = {k: v for k, v in item.items() if k != "records"}
            entry.update(summarise(item["records"]))
            entry["tar_gets"] = [[r["path"].rsplit("/", 1)[1], r["range"].removeprefix("bytes="), r["sent"]]
                                 for r in item["records"] if kind_of(r) in ("train tar", "held-out tar")]
            row["launches"].append(entry)
        if len(launches) == 2:
            first, second = (samples_read(train_intervals(item["records"]), local) for item in launches)
            both = sum(len(first.get(name, set()) & second.get(name, set())) for name in set(first) | set(second))
            row["train_samples_fetched"] = [sum(map(len, first.values())), sum(map(len, second.values()))]
            row["train_samples_fetched_by_both"] = both
            resumed = launches[0]["resumes_from"]
            row["resumed_from_step"] = resumed
            row["predicted_window_reread"] = 2 * ((resumed * micro) % min(args.shuffle_buffer, per_rank))
        else:
            row["train_samples_fetched"] = [sum(map(len, samples_read(train_intervals(launches[0]["records"]),
                                                                      local).values()))]
        rows[mode] = row
    server.stop()
    images = args.steps * global_batch
    base = rows.get("uninterrupted")
    print(f"\ntiny profile, 2 CPU ranks x micro {micro}, {args.steps} steps ({images} images), shuffle_buffer "
          f"{args.shuffle_buffer}, checkpoint every {args.every}, {sum(train.samples_per_shard)} train images in "
          f"{len(train.samples_per_shard)} tars (mean {sample_bytes / 1024:.1f} KiB per sample), moto on the loopback")
    print(f"{'run':>14} {'launch':>34} {'GETs':>5} {'tar':>4} {'idx':>4} {'json':>4} {'MB sent':>8} "
          f"{'GET/img':>8} {'B/img':>8} {'x GETs':>7} {'x bytes':>8}")
    for mode, row in rows.items():
        for number, entry in enumerate(row["launches"] + [dict(row["total"], stop="total")]):
            kinds = entry["by_kind"]
            tars = kinds.get("train tar", {}).get("requests", 0) + kinds.get("held-out tar", {}).get("requests", 0)
            what = entry["stop"] if entry["stop"] == "total" else f"{number + 1}: {entry['stop']}"
            ratio = (f"{entry['gets'] / base['total']['gets']:>7.2f} "
                     f"{entry['get_sent_bytes'] / base['total']['get_sent_bytes']:>8.2f}"
                     if base and entry["stop"] == "total" else f"{'':>7} {'':>8}")
            print(f"{mode:>14} {what[:34]:>34} {entry['gets']:>5} {tars:>4} "
                  f"{kinds.get('index', {}).get('requests', 0):>4} {kinds.get('json', {}).get('requests', 0):>4} "
                  f"{entry['get_sent_bytes'] / 1e6:>8.2f} {entry['gets'] / images:>8.3f} "
                  f"{entry['get_sent_bytes'] / images:>8.0f} {ratio}")
        if "train_samples_fetched_by_both" in row:
            print(f"{'':>14} train samples fetched by launch 1, 2: {row['train_samples_fetched']}; by both: "
                  f"{row['train_samples_fetched_by_both']} (resumed from step {row['resumed_from_step']}; the "
                  f"consumed part of the resumed shuffle window, 2 ranks: {row['predicted_window_reread']})")
    result = {"benchmark": "object_storage_resume", "label": args.label, "date": time.strftime("%Y-%m-%d"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "command": " ".join(sys.argv), "server": "moto ThreadedMotoServer on 127.0.0.1, WSGI app wrapped",
              "counted_at": "the server (every process's requests)", "train_images": sum(train.samples_per_shard),
              "train_tars": len(train.samples_per_shard), "mean_sample_bytes": sample_bytes,
              "steps": args.steps, "kill_at": args.kill_at, "checkpoint_every": args.every,
              "shuffle_buffer": args.shuffle_buffer, "micro": micro, "global_batch": global_batch,
              "images_scheduled": images, "runs": rows}
    from mixmae_scale.atomic_file import write_text

    args.out.parent.mkdir(exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    measurements = previous.get("measurements", {}) if isinstance(previous, dict) else {}
    measurements[args.label or "default"] = result
    write_text(args.out, json.dumps({"benchmark": "object_storage_resume", "measurements": measurements}, indent=2))
    print(f"wrote {args.out} ({args.label or 'default'})")


if __name__ == "__main__":
    main()
