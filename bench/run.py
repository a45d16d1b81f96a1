"""deltalog benchmark: deltalog side by side with rsync, scp, cp and numpy, as ratios.

    .venv/bin/python bench/run.py                       # default: ~1 GiB model, 5 repeats (~5-8 min)
    .venv/bin/python bench/run.py --size 0.1 --repeat 3 # quick
    .venv/bin/python bench/run.py --write-results       # also rewrite bench/RESULTS.md

Sections (``--only`` picks some): commit, diff, sync, rollback, latency,
serve. A section whose deltalog feature (or system tool) is missing is
skipped with the reason printed, and fills in once it is there. Every
number is the median of ``--repeat`` runs measured side by side in one
process, with the page cache warm for both sides. bench/README.md explains
each measurement; bench/RESULTS.md holds the latest results.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import workload  # noqa: E402
from sshd import Sshd, missing_tools, wire_bytes  # noqa: E402

NOTES_MARKER = "<!-- analysis: kept by run.py --write-results; edit by hand -->"
SECTIONS = ("commit", "diff", "sync", "rollback", "latency", "serve")
PY = sys.executable
PEAKRSS = [PY, "-I", "-S", os.path.join(HERE, "peakrss.py")]
MiB = 1 << 20
GiB = 1 << 30

# name, description, how to compute from results, comparison
TARGETS = [
    ("sync_bytes", "sync bytes <= 1/50 of rsync's", 50.0),
    ("sync_wall", "sync wall <= 1/10 of rsync's", 10.0),
    ("sync_memory", "sync peak memory bounded by changed rows", None),
    ("diff", "diff >= 20x faster than numpy", 20.0),
    ("rollback", "rollback >= 20x faster than full restore", 20.0),
    ("commit", "commit >= 500,000 rows/s", 500_000.0),
    ("serve", "serve-snapshot >= 1/2 of cp's throughput", 0.5),
    ("latency", "p99 update latency A -> B -> C < 1 s at 10,000 rows/s", 1.0),
]
# Issue 15's bound on a sync's memory: peak anon (over an idle interpreter) <= 64 MiB + 2 bytes
# per changed byte, at one minute of change and at --lag-minutes (issue 6 had allowed 4).
MEMORY_PER_CHANGED_BYTE = 2


def memory_budget(changed_bytes: int) -> int:
    return 64 * MiB + MEMORY_PER_CHANGED_BYTE * changed_bytes


LATENCY_TARGET_ROWS = 10_000  # embedding rows/s the root commits for the latency target


# -- small helpers ------------------------------------------------------------------


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return float(np.percentile(np.array(xs), q, method="higher" if q >= 99 else "linear"))


def fmt_bytes(n) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s) -> str:
    if s is None:
        return "n/a"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def fmt_ratio(x) -> str:
    """A ratio a/b as '1/N' when below 1, 'N x' above."""
    if x is None:
        return "n/a"
    return f"{x:.3g}x" if x >= 1 else f"1/{1 / x:.3g}" if x > 0 else "0"


def fmt_speedup(x) -> str:
    """How many times faster (below 1: slower)."""
    if x is None:
        return "n/a"
    return f"{x:.3g}x faster" if x >= 1 else f"{1 / x:.3g}x slower"


def run(argv, *, check=True, timeout=900, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=None):
    """(seconds, CompletedProcess) of a command."""
    started = time.perf_counter()
    proc = subprocess.run(argv, stdout=stdout, stderr=stderr, text=True, timeout=timeout, env=env)
    seconds = time.perf_counter() - started
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {shlex.join(argv)}\n{(proc.stderr or '')[-1500:]}")
    return seconds, proc


def read_json(path):
    with open(path) as f:
        return json.load(f)


def deltalog_cli() -> list[str]:
    script = os.path.join(os.path.dirname(PY), "deltalog")
    return [script] if os.path.exists(script) else [PY, "-m", "deltalog"]


def last_json(text: str):
    """The JSON object a --json command printed (its last line that parses)."""
    for line in reversed((text or "").strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    try:
        return json.loads(text)
    except ValueError:
        return None


def drop_writeback() -> None:
    """Write dirty pages out before a timed step, so one side's writeback does not land in the other's time."""
    os.sync()


# -- latency helpers ----------------------------------------------------------------


def follow_events(path: str) -> list[dict]:
    """The events a ``deltalog sync --follow --json`` wrote so far (one JSON object a line)."""
    events = []
    try:
        with open(path) as f:
            for line in f:
                if line.endswith("\n") and line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    events.append(event)
    except OSError:
        pass
    return events


def follow_stats(events: list[dict], exit_code) -> dict:
    """One follower's rounds that moved rows: how many, rows and seconds per round; retries; its exit code."""
    rounds = [e for e in events if e.get("event") == "sync"]
    moved = [e for e in rounds if e.get("rows_sent")]
    retries = [e for e in events if e.get("event") == "retry"]
    return {"rounds": len(rounds), "rounds_that_moved": len(moved), "exit_code": exit_code,
            "retries": len(retries), "last_retry_error": retries[-1]["error"]["message"] if retries else None,
            "rows_per_round_p50": median([e["rows_sent"] for e in moved]),
            "round_seconds_p50": pct([e["seconds"] for e in moved], 50),
            "round_seconds_p99": pct([e["seconds"] for e in moved], 99),
            "bytes_sent": sum(e.get("bytes_sent") or 0 for e in moved)}


def merge_follow_stats(runs: list[dict]) -> dict:
    """One follower's stats over repeats: medians; retries summed; the first failure kept."""
    out = {k: median([r[k] for r in runs]) for k in ("rounds", "rounds_that_moved", "rows_per_round_p50",
                                                      "round_seconds_p50", "round_seconds_p99", "bytes_sent")}
    out["retries"] = sum(r["retries"] for r in runs)
    out["last_retry_error"] = next((r["last_retry_error"] for r in reversed(runs) if r["last_retry_error"]), None)
    out["exit_code"] = next((r["exit_code"] for r in runs if r["exit_code"] != 0), 0)
    return out


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def replica_head(path: str) -> int:
    from deltalog import Replica

    try:
        with Replica.open(path) as r:
            return r.head
    except Exception:  # noqa: BLE001 - not there yet
        return -1


# -- what is there ------------------------------------------------------------------


def probe_features() -> dict[str, str | None]:
    """feature -> None when usable, else why not."""
    why: dict[str, str | None] = {}
    try:
        import click

        from deltalog.cli import cli

        commands = set(cli.list_commands(click.Context(cli)))  # commands load lazily: list them, not cli.commands
    except Exception as exc:  # noqa: BLE001 - a half-landed module breaks the CLI import
        commands = set()
        cli_error = f"the deltalog CLI does not import ({type(exc).__name__}: {exc})"
    else:
        cli_error = None

    def need(module, attr, command):
        if cli_error:
            return cli_error
        try:
            mod = importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001
            return f"{module} is missing or broken ({type(exc).__name__}: {exc})"
        if not hasattr(mod, attr):
            return f"{module}.{attr} is missing"
        if command not in commands:
            return f"'deltalog {command}' is missing"
        return None

    why["commit"] = None
    why["diff"] = need("deltalog.diff", "diff", "diff")
    why["rollback"] = need("deltalog.rollback", "rollback", "rollback")
    why["sync"] = need("deltalog.sync", "sync", "sync") or need("deltalog.transport.ssh", "open_sink", "serve")
    why["latency"] = why["sync"] or need("deltalog.transport.local", "open_sink", "sync") or \
        need("deltalog.follow", "follow", "sync")
    why["serve"] = need("deltalog.server", "SnapshotServer", "serve-snapshot")
    tools = missing_tools() + ([] if shutil.which("rsync") else ["rsync"])
    if tools and not why["sync"]:
        why["sync"] = "missing " + ", ".join(tools) + " (run: sudo bash bench/setup.sh)"
    if not shutil.which("curl") and not why["serve"]:
        why["serve"] = "missing curl (run: sudo bash bench/setup.sh)"
    return why


def ensure_tools() -> None:
    """Run bench/setup.sh when a tool is missing and we may (root with apt); else the sections say so."""
    missing = missing_tools() + [t for t in ("rsync", "curl") if not shutil.which(t)]
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing missing tools ({', '.join(missing)}) with bench/setup.sh ...", flush=True)
        subprocess.run(["bash", os.path.join(HERE, "setup.sh")], check=False)
    else:
        print(f"missing {', '.join(missing)}: run 'sudo bash bench/setup.sh'; the sections that need them are skipped")


def machine() -> dict:
    info = {"cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
        with open("/proc/meminfo") as f:
            info["memory_gib"] = round(int(next(l for l in f if l.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    info["loadavg"] = os.getloadavg()
    try:  # diff, row reads and digest checks run compiled loops when deltalog._kernels was built
        from deltalog import kernels

        info["row_loops"] = "compiled" if kernels.enabled() else "numpy"
    except ImportError:
        pass
    return info


def disk(path: str) -> dict:
    usage = shutil.disk_usage(path)
    out = {"total_gib": round(usage.total / GiB, 1), "free_gib": round(usage.free / GiB, 1)}
    try:
        src = subprocess.run(["df", "--output=source,fstype", path], capture_output=True, text=True).stdout.split()
        out["device"], out["fstype"] = src[-2], src[-1]
        dev = os.path.basename(out["device"])
        rot = f"/sys/block/{dev}/queue/rotational"
        if os.path.exists(rot):
            out["rotational"] = open(rot).read().strip() == "1"
    except (OSError, IndexError):
        pass
    return out


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True).stdout.strip()
        return rev + (" + uncommitted changes in src/" if dirty else "")
    except OSError:
        return "?"


# -- the benchmark ------------------------------------------------------------------


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = os.path.abspath(os.path.join(args.work, "run"))
        self.A = os.path.join(self.work, "a")  # the primary: the training job commits here
        self.B = os.path.join(self.work, "b")  # its follower, fed over ssh (and the other side of diff)
        self.C = os.path.join(self.work, "c")  # a follower of B (latency: A -> B -> C)
        self.mirror = os.path.join(self.work, "rsync_mirror")  # rsync's copy of A's tensor files
        self.scp_dst = os.path.join(self.work, "scp_copy")
        self.cp_dst = os.path.join(self.work, "cp_copy")
        self.restore = os.path.join(self.work, "restore")
        self.logs = os.path.join(self.work, "logs")
        self.specs = workload.model_spec(args.size)
        self.model_bytes = sum(s.nbytes for s in self.specs)
        self.row_bytes = {s.name: s.row_bytes for s in self.specs}
        self.ra = None
        self.sshd: Sshd | None = None
        self.features = probe_features()
        self.results: dict = {"sections": {}, "skipped": {}, "errors": {}, "commands": {}}
        self.commits: list[dict] = []  # one per simulated minute
        self.pending: dict[str, list[np.ndarray]] = {}  # rows changed at A since B's last sync
        self.b_ready = False
        self.cli = deltalog_cli()
        self._n = 0
        self._sshd_dir: str | None = None
        self._sshd_port = 0

    # -- plumbing

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def logfile(self, name: str) -> str:
        self._n += 1
        return os.path.join(self.logs, f"{self._n:04d}-{name}")

    def enabled(self, section: str) -> bool:
        return self.args.only is None or section in self.args.only

    def skip(self, section: str, reason: str) -> None:
        self.results["skipped"][section] = reason
        self.log(f"[{section}] SKIPPED: {reason}")

    def current(self, name: str, rows: np.ndarray) -> np.ndarray:
        return np.array(self.ra.rows_view(name)[rows])

    # -- setup

    def setup(self) -> None:
        from deltalog import Replica

        os.makedirs(self.args.work, exist_ok=True)
        need = self.model_bytes * 11 + 2 * GiB
        free = shutil.disk_usage(self.args.work).free
        if free < need:
            raise SystemExit(f"not enough disk under {self.args.work}: {fmt_bytes(free)} free, the benchmark at "
                             f"--size {self.args.size} needs about {fmt_bytes(need)} (11 model copies)")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.logs)
        self.log(f"model: {fmt_bytes(self.model_bytes)} in {len(self.specs)} tensors "
                 f"({sum(s.rows for s in self.specs):,} rows); work dir {self.work}")
        t0 = time.perf_counter()
        model = workload.make_model(self.specs, seed=self.args.seed)
        t1 = time.perf_counter()
        self.ra = Replica.init(self.A, model, bucket_rows=self.args.bucket_rows, model_id="deltalog-bench")
        t2 = time.perf_counter()
        del model
        self.log(f"generated the model in {fmt_s(t1 - t0)}, Replica.init in {fmt_s(t2 - t1)}")
        self.results["setup"] = {"generate_seconds": t1 - t0, "init_seconds": t2 - t1}
        self.stream = workload.Stream(self.specs, seed=self.args.seed + 1, zipf=self.args.zipf,
                                      touch=self.args.touch, steps_per_minute=self.args.steps_per_minute)
        self.log("batch draws per step: " + ", ".join(f"{k} {v:,}" for k, v in self.stream.batch.items()))

    # -- the update stream; commit throughput

    def minute(self) -> dict:
        """Commit one simulated minute of training steps at A; the commit calls are timed."""
        rows = nbytes = 0
        seconds = cpu = 0.0
        per_commit = []
        for _ in range(self.args.steps_per_minute):
            updates = self.stream.step(self.current)
            cpu_started = _cpu_seconds()
            started = time.perf_counter()
            self.ra.commit(updates)
            dt = time.perf_counter() - started
            cpu += _cpu_seconds() - cpu_started
            seconds += dt
            per_commit.append(dt)
            rows += sum(len(r) for r, _v in updates.values())
            nbytes += sum(v.nbytes for _r, v in updates.values())
            for name, (r, _v) in updates.items():
                self.pending.setdefault(name, []).append(r)
        entry = {"commits": len(per_commit), "rows": rows, "bytes": nbytes, "seconds": seconds,
                 "rows_per_s": rows / seconds, "mb_per_s": nbytes / seconds / 1e6,
                 "commit_p50_ms": 1000 * median(per_commit), "cpu_ms_per_commit": 1000 * cpu / len(per_commit)}
        self.commits.append(entry)
        return entry

    def pending_changed(self) -> tuple[int, int]:
        """(rows, bytes) changed at A since B's last sync (distinct rows)."""
        rows = nbytes = 0
        for name, parts in self.pending.items():
            n = len(np.unique(np.concatenate(parts)))
            rows += n
            nbytes += n * self.row_bytes[name]
        return rows, nbytes

    # -- ssh

    def start_sshd(self) -> None:
        if self.sshd is None:
            self.sshd = Sshd().start()
            self._sshd_dir, self._sshd_port = self.sshd.dir, self.sshd.port
            self.log(f"sshd on 127.0.0.1:{self.sshd.port} (throwaway host key and client key)")

    def remote(self, path: str) -> str:
        return f"{self.sshd.host}:{path}"

    def remote_deltalog(self, rss_out: str | None = None) -> str:
        cmd = self.cli
        if rss_out:
            cmd = [*PEAKRSS, rss_out, "--", *cmd]
        return shlex.join(cmd)

    # -- sections --------------------------------------------------------------

    def initial_sync(self) -> None:
        """B = a follower of A over ssh (its first sync copies A's snapshot); the rsync/scp/cp copies."""
        self.start_sshd()
        ssh_log = self.logfile("ssh-initial.log")
        argv = [*self.cli, "sync", self.A, self.remote(self.B), "--json", "--ssh-command",
                self.sshd.ssh_command(ssh_log), "--remote-deltalog", self.remote_deltalog()]
        seconds, proc = run(argv)
        out = last_json(proc.stdout) or {}
        self.log(f"initial sync A -> ssh:B (a new replica from A's snapshot, then the log): {fmt_s(seconds)}, "
                 f"{fmt_bytes(out.get('bytes_sent'))} sent, {fmt_bytes(wire_bytes(ssh_log))} on the wire")
        self.results["initial_sync"] = {"seconds": seconds, "bytes_sent": out.get("bytes_sent"),
                                        "wire_bytes": wire_bytes(ssh_log)}
        for d in (self.mirror, self.scp_dst, self.cp_dst):
            os.makedirs(d, exist_ok=True)
        run(["cp", "-a", *self.tensor_files(self.A), self.mirror])
        self.pending.clear()
        self.b_ready = True

    def copy_b(self) -> None:
        """Without sync: B = a byte copy of A (same model, same history), for diff only."""
        with self.ra.writing():
            self.ra.flush()
        shutil.rmtree(self.B, ignore_errors=True)
        run(["cp", "-a", self.A, self.B])
        self.pending.clear()

    def tensor_files(self, replica: str) -> list[str]:
        d = os.path.join(replica, "tensors")
        return sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".bin"))

    def measure_diff(self) -> dict:
        from deltalog import Replica
        from deltalog.diff import ReplicaSide, diff

        out = {}
        rb = Replica.open(self.B)
        try:
            # Fresh maps of B first (what a new process pays: a page fault per 64 KiB
            # window it touches), for each method on its own handle; then both again
            # on the same, now populated, maps: that pair is the ratio (in-process,
            # same memory-mapped tensors), the fresh pair is printed beside it.
            started = time.perf_counter()
            diff(ReplicaSide.at(self.ra), ReplicaSide.at(rb), top=10)
            out["lib_fresh_seconds"] = time.perf_counter() - started
            fresh = Replica.open(self.B)
            try:
                started = time.perf_counter()
                numpy_diff(self.ra, fresh)
                out["numpy_fresh_seconds"] = time.perf_counter() - started
            finally:
                fresh.close()
            # The ratio's diff runs right after numpy streamed 2 GiB: CPU caches and
            # TLB hold nothing of diff's (the conservative case, a one-off diff).
            started = time.perf_counter()
            result = diff(ReplicaSide.at(self.ra), ReplicaSide.at(rb), top=10)
            out["lib_seconds"] = time.perf_counter() - started
            out["lib_changed_rows"] = result.changed_rows
            out["method"] = getattr(result, "method", None)
            # The same diff again at once, its ~23 MB of rows still in L3: what a
            # process diffing repeatedly sees (numpy's 2 GiB never fit, so its
            # repeat below is its only figure).
            started = time.perf_counter()
            diff(ReplicaSide.at(self.ra), ReplicaSide.at(rb), top=10)
            out["lib_repeat_seconds"] = time.perf_counter() - started
            numpy_diff(self.ra, rb)  # populate every page of rb's maps, as diff's warm-up did for its rows
            started = time.perf_counter()
            out["numpy_changed_rows"] = numpy_diff(self.ra, rb)
            out["numpy_seconds"] = time.perf_counter() - started
        finally:
            rb.close()
        argv = [*self.cli, "diff", self.A, self.B, "--json"]
        out["cli_seconds"], proc = run(argv, check=False)
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"deltalog diff exited {proc.returncode}: {proc.stderr[-500:]}")
        self.results["commands"]["diff_cli"] = shlex.join(argv)
        cli = last_json(proc.stdout) or {}
        out["cli_changed_rows"] = cli.get("changed_rows")
        if not (out["lib_changed_rows"] == out["numpy_changed_rows"] == out["cli_changed_rows"]):
            self.log(f"  WARNING: diff disagrees: library {out['lib_changed_rows']}, CLI {out['cli_changed_rows']}, "
                     f"numpy {out['numpy_changed_rows']} changed rows")
            out["disagree"] = True
        return out

    def measure_deltalog_sync(self) -> dict:
        """deltalog sync A -> 127.0.0.1:B over ssh, with the peak memory of both ends."""
        ssh_log, rss_l, rss_r = (self.logfile(n) for n in ("ssh-deltalog.log", "rss-dl-local.json", "rss-dl-remote.json"))
        argv = [*self.cli, "sync", self.A, self.remote(self.B), "--json", "--ssh-command",
                self.sshd.ssh_command(ssh_log), "--remote-deltalog", self.remote_deltalog(rss_r)]
        drop_writeback()
        seconds, proc = run([*PEAKRSS, rss_l, "--", *argv], check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"deltalog sync exited {proc.returncode}: {proc.stderr[-800:]}")
        self.results["commands"]["sync_deltalog"] = shlex.join(argv)
        res = last_json(proc.stdout) or {}
        local, remote = read_json(rss_l), read_json(rss_r)
        self.pending.clear()
        return {"seconds": local["seconds"], "bytes_sent": res.get("bytes_sent"), "rows_sent": res.get("rows_sent"),
                "wire_bytes": wire_bytes(ssh_log), "complete": res.get("complete"),
                "rss_local": local, "rss_remote": remote}

    def measure_sync(self) -> dict:
        out = {}
        changed_rows, changed_bytes = self.pending_changed()
        out["changed_rows"], out["changed_bytes"] = changed_rows, changed_bytes
        out["deltalog"] = self.measure_deltalog_sync()
        # rsync --no-whole-file of the tensor files, same transport
        ssh_log, rss_l, rss_r = (self.logfile(n) for n in ("ssh-rsync.log", "rss-rsync-local.json", "rss-rsync-remote.json"))
        argv = ["rsync", "-a", "--no-whole-file", "--ignore-times", "--stats", "-e", self.sshd.ssh_command(ssh_log),
                "--rsync-path", shlex.join([*PEAKRSS, rss_r, "--", "rsync"]),
                os.path.join(self.A, "tensors") + "/", self.remote(self.mirror) + "/"]
        drop_writeback()
        seconds, proc = run([*PEAKRSS, rss_l, "--", *argv])
        self.results["commands"]["sync_rsync"] = shlex.join(argv)
        stats = parse_rsync_stats(proc.stdout)
        local, remote = read_json(rss_l), read_json(rss_r)
        out["rsync"] = {"seconds": local["seconds"], "bytes": stats.get("sent", 0) + stats.get("received", 0),
                        "literal": stats.get("literal"), "matched": stats.get("matched"),
                        "wire_bytes": wire_bytes(ssh_log), "rss_local": local, "rss_remote": remote}
        # scp of the whole checkpoint, same transport
        files = self.tensor_files(self.A)
        argv = [*self.sshd.scp_args(verbose=True), *files, self.remote(self.scp_dst) + "/"]
        drop_writeback()
        seconds, proc = run(argv)
        self.results["commands"]["sync_scp"] = shlex.join(argv).replace("scp -v", "scp", 1)
        m = re.findall(r"Transferred: sent (\d+), received (\d+) bytes", proc.stderr)
        out["scp"] = {"seconds": seconds, "wire_bytes": sum(int(a) + int(b) for a, b in m) if m else None,
                      "bytes": sum(os.path.getsize(f) for f in files)}
        # cp of the whole checkpoint, local
        argv = ["cp", *files, self.cp_dst + "/"]
        drop_writeback()
        seconds, _ = run(argv)
        self.results["commands"]["sync_cp"] = shlex.join(argv)
        out["cp"] = {"seconds": seconds, "bytes": out["scp"]["bytes"]}
        return out

    def section_diff_sync(self) -> None:
        want_diff, want_sync = self.enabled("diff"), self.enabled("sync")
        do_sync = want_sync and not self.features["sync"]
        do_diff = want_diff and not self.features["diff"]
        if want_sync and self.features["sync"]:
            self.skip("sync", self.features["sync"])
        if want_diff and self.features["diff"]:
            self.skip("diff", self.features["diff"])
        if not (do_sync or do_diff or self.enabled("commit")):
            return
        diff_runs, sync_runs = [], []
        if do_sync or (do_diff and not self.features["sync"]):  # B: a follower of A over ssh
            try:
                self.initial_sync()
            except Exception as exc:  # noqa: BLE001
                self.error("sync", exc)
                do_sync = False
        self.minute()  # warm-up: the first minute after setup is not measured
        if self.b_ready:
            self.sync_quietly(mirror=do_sync)
        section_started = time.monotonic()
        for i in range(self.args.repeat):
            if self.over_budget("diff/sync", section_started, i):
                break
            if do_diff and not self.b_ready:
                self.copy_b()
            m = self.minute()
            line = f"[repeat {i + 1}/{self.args.repeat}] commit {m['rows']:,} rows: {m['rows_per_s']:,.0f} rows/s"
            if do_diff:
                try:
                    d = self.measure_diff()
                    diff_runs.append(d)
                    line += (f" | diff {d['lib_changed_rows']:,} rows: lib {fmt_s(d['lib_seconds'])}, "
                             f"CLI {fmt_s(d['cli_seconds'])}, numpy {fmt_s(d['numpy_seconds'])}")
                except Exception as exc:  # noqa: BLE001
                    self.error("diff", exc)
                    do_diff = False
            if do_sync:
                try:
                    s = self.measure_sync()
                    sync_runs.append(s)
                    line += (f" | sync {fmt_bytes(s['deltalog']['bytes_sent'])} {fmt_s(s['deltalog']['seconds'])}, "
                             f"rsync {fmt_bytes(s['rsync']['bytes'])} {fmt_s(s['rsync']['seconds'])}, "
                             f"scp {fmt_s(s['scp']['seconds'])}, cp {fmt_s(s['cp']['seconds'])}")
                except Exception as exc:  # noqa: BLE001
                    self.error("sync", exc)
                    do_sync = False
            elif self.b_ready:
                self.sync_quietly()
            self.log(line)
        if diff_runs:
            self.results["sections"]["diff"] = summarize_diff(diff_runs)
        if sync_runs:
            self.results["sections"]["sync"] = summary = self.summarize_sync(sync_runs)
            if self.args.lag_minutes:
                try:
                    summary["lag"] = self.measure_lag(summary)
                except Exception as exc:  # noqa: BLE001
                    self.error("sync (lag)", exc)

    def measure_lag(self, summary: dict) -> dict:
        """Memory against the amount of change: one deltalog sync after --lag-minutes minutes (no rsync)."""
        for _ in range(self.args.lag_minutes):
            self.minute()
        changed_rows, changed_bytes = self.pending_changed()
        d = self.measure_deltalog_sync()
        base = summary["memory_baseline"]
        extra = max(d["rss_local"]["peak_anon_kib"], d["rss_remote"]["peak_anon_kib"]) * 1024 - base["peak_anon_kib"] * 1024
        out = {"minutes": self.args.lag_minutes, "changed_rows": changed_rows, "changed_bytes": changed_bytes,
               "seconds": d["seconds"], "bytes_sent": d["bytes_sent"],
               "local_peak_anon_kib": d["rss_local"]["peak_anon_kib"],
               "remote_peak_anon_kib": d["rss_remote"]["peak_anon_kib"], "extra_anon": extra,
               "memory_budget": memory_budget(changed_bytes)}
        one = summary["deltalog_extra_anon"]
        slope = (extra - one) / max(1, changed_bytes - summary["changed_bytes"])
        out["slope"] = slope  # extra anon bytes per extra changed byte
        self.log(f"[sync after {self.args.lag_minutes} minutes of lag] {changed_rows:,} rows ({fmt_bytes(changed_bytes)}) "
                 f"changed: {fmt_s(d['seconds'])}, {fmt_bytes(d['bytes_sent'])}; peak anon sender "
                 f"{fmt_bytes(d['rss_local']['peak_anon_kib'] * 1024)}, receiver "
                 f"{fmt_bytes(d['rss_remote']['peak_anon_kib'] * 1024)} (+{fmt_bytes(extra)} over idle; "
                 f"{slope:.1f} bytes of memory per extra changed byte)")
        return out

    def sync_quietly(self, mirror: bool = False) -> None:
        """Bring B (and with ``mirror`` rsync's copy) up to A, unmeasured."""
        argv = [*self.cli, "sync", self.A, self.remote(self.B), "--quiet", "--ssh-command",
                self.sshd.ssh_command(), "--remote-deltalog", self.remote_deltalog()]
        run(argv)
        self.pending.clear()
        if mirror:
            run(["rsync", "-a", "--no-whole-file", "-I", "-e", self.sshd.ssh_command(),
                 os.path.join(self.A, "tensors") + "/", self.remote(self.mirror) + "/"])

    def over_budget(self, section: str, started: float, done: int) -> bool:
        """True when another repeat would take the section past --section-budget (after at least one)."""
        if done == 0:
            return False
        elapsed = time.monotonic() - started
        if elapsed + elapsed / done <= self.args.section_budget:
            return False
        note = (f"{section}: stopped after {done} of {self.args.repeat} repeats "
                f"(--section-budget {self.args.section_budget:.0f} s; one repeat takes {fmt_s(elapsed / done)})")
        self.results.setdefault("notes", []).append(note)
        self.log(f"[{section}] {note}")
        return True

    def rss_baseline(self) -> dict:
        """Peak memory of an idle interpreter with deltalog's sync modules imported: what a sync adds is above it."""
        code = ("import deltalog.cli, deltalog.sync, deltalog.stdio_server, deltalog.transport.ssh, "
                "deltalog.transport.local, deltalog.replica, numpy, lmdb, zstandard, msgpack, xxhash")
        samples = []
        for _ in range(3):
            out = self.logfile("rss-baseline.json")
            run([*PEAKRSS, out, "--", PY, "-c", code])
            samples.append(read_json(out))
        return {k: median([s[k] for s in samples]) for k in ("maxrss_kib", "peak_anon_kib", "peak_rss_kib")}

    def summarize_sync(self, runs: list[dict]) -> dict:
        base = self.rss_baseline()
        dl = lambda k: median([r["deltalog"][k] for r in runs])  # noqa: E731
        rs = lambda k: median([r["rsync"][k] for r in runs])  # noqa: E731
        mem = {}
        for tool in ("deltalog", "rsync"):
            for side in ("local", "remote"):
                for k in ("maxrss_kib", "peak_anon_kib"):
                    mem[f"{tool}_{side}_{k}"] = median([r[tool][f"rss_{side}"][k] for r in runs])
        changed_bytes = median([r["changed_bytes"] for r in runs])
        extra = max(mem["deltalog_local_peak_anon_kib"], mem["deltalog_remote_peak_anon_kib"]) * 1024 - \
            base["peak_anon_kib"] * 1024
        extra_total = max(mem["deltalog_local_maxrss_kib"], mem["deltalog_remote_maxrss_kib"]) * 1024 - \
            base["maxrss_kib"] * 1024
        s = {
            "runs": runs,
            "changed_rows": median([r["changed_rows"] for r in runs]),
            "changed_bytes": changed_bytes,
            "deltalog_seconds": dl("seconds"), "deltalog_bytes": dl("bytes_sent"), "deltalog_wire": dl("wire_bytes"),
            "deltalog_rows": dl("rows_sent"),
            "rsync_seconds": rs("seconds"), "rsync_bytes": rs("bytes"), "rsync_wire": rs("wire_bytes"),
            "rsync_literal": rs("literal"),
            "scp_seconds": median([r["scp"]["seconds"] for r in runs]),
            "scp_wire": median([r["scp"]["wire_bytes"] for r in runs]),
            "cp_seconds": median([r["cp"]["seconds"] for r in runs]),
            "full_bytes": runs[0]["cp"]["bytes"],
            "memory": mem, "memory_baseline": base,
            "deltalog_extra_anon": extra, "deltalog_extra_maxrss": extra_total,
        }
        s["bytes_ratio"] = s["rsync_bytes"] / s["deltalog_bytes"] if s["deltalog_bytes"] else None
        s["wire_ratio"] = s["rsync_wire"] / s["deltalog_wire"] if s["deltalog_wire"] and s["rsync_wire"] else None
        s["wall_ratio"] = s["rsync_seconds"] / s["deltalog_seconds"]
        s["scp_ratio"] = s["scp_seconds"] / s["deltalog_seconds"]
        s["cp_ratio"] = s["cp_seconds"] / s["deltalog_seconds"]
        s["memory_budget"] = memory_budget(changed_bytes)
        return s

    # -- rollback

    def section_rollback(self) -> None:
        """Each repeat rolls back a fresh window of --rollback-records training commits, then rolls forward.

        Even repeats time the library call, odd ones the CLI (a window can be
        rolled back only once: afterwards it holds the rollback records too)."""
        if not self.enabled("rollback"):
            return
        if self.features["rollback"]:
            return self.skip("rollback", self.features["rollback"])
        from deltalog.rollback import rollback

        depth = self.args.rollback_records
        snap = max(self.ra.snapshots(), key=lambda m: m["offset"])
        snapdir = os.path.join(self.A, "snapshots", f"{snap['offset']:020d}")
        files = [os.path.join(snapdir, e["file"]) for e in snap["tensors"]]
        os.makedirs(self.restore, exist_ok=True)
        run(["cp", *files, self.restore + "/"])  # warm both the source pages and the target files
        runs = []
        section_started = time.monotonic()
        for i in range(self.args.repeat):
            if self.over_budget("rollback", section_started, i):
                break
            mode = "lib" if i % 2 == 0 else "cli"
            fresh = 0
            while fresh < depth:  # a window of training commits only
                fresh += self.minute()["commits"]
            head = self.ra.head
            target = self.find_offset_back(depth)
            r = {"mode": mode, "records": head - target}
            drop_writeback()
            if mode == "lib":
                started = time.perf_counter()
                res = rollback(self.ra, target, reason="bench")
                r["seconds"] = time.perf_counter() - started
                r["rows"] = res.rows
                started = time.perf_counter()
                rollback(self.ra, head, reason="bench: roll forward")
                r["forward_seconds"] = time.perf_counter() - started
            else:
                argv = [*self.cli, "rollback", self.A, "--to", str(target), "--json", "--reason", "bench"]
                r["seconds"], proc = run(argv)
                self.results["commands"]["rollback_cli"] = shlex.join(argv)
                r["rows"] = (last_json(proc.stdout) or {}).get("rows")
                argv = [*self.cli, "rollback", self.A, "--to", str(head), "--json", "--reason", "bench: roll forward"]
                r["forward_seconds"], _ = run(argv)
            argv = ["cp", *files, self.restore + "/"]
            drop_writeback()
            r["cp_seconds"], _ = run(argv)
            self.results["commands"]["rollback_cp"] = shlex.join(argv)
            # A rollback returns durable (its record is fsynced); a restore that survives
            # a power cut is cp followed by an fsync of the files it wrote.
            restored = [os.path.join(self.restore, os.path.basename(f)) for f in files]
            argv = ["sh", "-c", " ".join(["cp", *map(shlex.quote, files), shlex.quote(self.restore + "/"), "&&",
                                          "sync", *map(shlex.quote, restored)])]
            drop_writeback()
            r["cp_durable_seconds"], _ = run(argv)
            self.results["commands"]["rollback_cp_durable"] = argv[2]
            runs.append(r)
            self.log(f"[rollback {i + 1}/{self.args.repeat}] {'library' if mode == 'lib' else 'CLI'}: "
                     f"{r['records']} records, {r['rows']:,} rows: {fmt_s(r['seconds'])} (roll forward "
                     f"{fmt_s(r['forward_seconds'])}); cp of the full copy {fmt_s(r['cp_seconds'])}")
        if self.b_ready:
            self.sync_quietly()
        lib = [r for r in runs if r["mode"] == "lib"]
        cli = [r for r in runs if r["mode"] == "cli"]
        s = {"runs": runs, "lib_runs": len(lib), "cli_runs": len(cli),
             "records": median([r["records"] for r in runs]), "rows": median([r["rows"] for r in runs]),
             "lib_seconds": median([r["seconds"] for r in lib]),
             "lib_forward_seconds": median([r["forward_seconds"] for r in lib]),
             "cli_seconds": median([r["seconds"] for r in cli]),
             "cp_seconds": median([r["cp_seconds"] for r in runs]),
             "cp_durable_seconds": median([r["cp_durable_seconds"] for r in runs])}
        s["ratio"] = s["cp_seconds"] / s["lib_seconds"]
        s["durable_ratio"] = s["cp_durable_seconds"] / s["lib_seconds"]
        s["cli_ratio"] = s["cp_seconds"] / s["cli_seconds"] if s["cli_seconds"] else None
        s["full_bytes"] = sum(os.path.getsize(f) for f in files)
        self.results["sections"]["rollback"] = s

    def find_offset_back(self, depth: int) -> int:
        """The offset ``depth`` records before the head (a retained record offset)."""
        offsets = [s.offset for s in self.ra.iter_summaries(since=max(self.ra.oldest_offset, self.ra.head - 4 * depth))]
        offsets = [o for o in offsets if o <= self.ra.head]
        return offsets[-depth - 1] if len(offsets) > depth else self.ra.oldest_offset

    # -- latency

    def section_latency(self) -> None:
        """Commit-to-leaf latency of ``deltalog sync --follow`` under a steady training-like stream.

        A -> B -> C: two real ``deltalog sync SRC DST --follow`` processes
        (local paths, or over the bench's sshd with --latency-transport ssh:
        A pushes into 127.0.0.1:B, C pulls from it). This process is the
        trainer: it commits one step every --latency-interval seconds, each
        carrying about --latency-rows-per-second x interval embedding rows
        (Zipf, as the rest of the benchmark) and a probe value in a row the
        stream never draws; the dense layers go in one step every
        --latency-dense-interval seconds. A watcher process polls the probe
        row at C every 1 ms; latency = first seen at C - commit returned at A
        (time.monotonic(): one clock for every process of the machine).
        Each repeat starts the followers and the watcher afresh.
        """
        if not self.enabled("latency"):
            return
        if self.features["latency"]:
            return self.skip("latency", self.features["latency"])
        a = self.args
        ssh = a.latency_transport == "ssh"
        if ssh:
            self.start_sshd()
        opts = ["--ssh-command", self.sshd.ssh_command(), "--remote-deltalog", self.remote_deltalog()] if ssh else []
        b = self.remote(self.B) if ssh else self.B
        # B and C exist and are at A's head before the clock starts (a first sync copies a snapshot)
        run([*self.cli, "sync", self.A, b, "--quiet", *opts])
        run([*self.cli, "sync", b, self.C, "--quiet", *opts])
        if self.b_ready:
            self.pending.clear()
        interval = a.latency_interval
        per_step = max(1, round(a.latency_rows_per_second * interval))
        stream = workload.Stream(self.specs, seed=a.seed + 7, zipf=a.zipf, touch=a.touch,
                                 steps_per_minute=a.steps_per_minute)
        stream.set_rows_per_step(per_step)
        dense_every = 0 if a.latency_dense_interval <= 0 else max(1, round(a.latency_dense_interval / interval))
        follow_opts = [*opts, *(["--interval", str(a.sync_interval)] if a.sync_interval else [])]
        hops = {"ab": [*self.cli, "sync", self.A, b, "--follow", "--json", *follow_opts],
                "bc": [*self.cli, "sync", b, self.C, "--follow", "--json", *follow_opts]}
        plan = (f"one step every {interval} s: ~{per_step:,} embedding rows + a probe row"
                + (f", the dense layers every {dense_every} steps ({dense_every * interval:g} s)" if dense_every
                   else ", no dense layers"))
        self.results["commands"]["latency_follow_ab"] = shlex.join(hops["ab"])
        self.results["commands"]["latency_follow_bc"] = shlex.join(hops["bc"])
        self.results["commands"]["latency"] = (f"A (this process) commits {plan}; a watcher (bench/latency.py "
                                               f"watch) polls the probe row at C every 1 ms")
        runs = []
        section_started = time.monotonic()
        for i in range(a.repeat):
            if self.over_budget("latency", section_started, i):
                break
            self.log(f"[latency {i + 1}/{a.repeat}] {max(10, round(a.latency_seconds / interval))} steps at A, {plan}; "
                     f"deltalog sync --follow A -> B -> C ({a.latency_transport}) ...")
            r = self.latency_run(stream, hops, per_step, dense_every)
            runs.append(r)
            self.log(f"[latency {i + 1}/{a.repeat}] A -> B -> C: p50 {fmt_s(r['p50'])}, p99 {fmt_s(r['p99'])}, "
                     f"max {fmt_s(r['max'])} ({r['arrived']}/{r['probes']} probes seen at C); A committed "
                     f"{r['rows_per_s']:,.0f} embedding rows/s ({r['total_rows_per_s']:,.0f} rows/s with the dense "
                     f"layers, {r['mb_per_s']:.1f} MB/s); C equals A: {r['c_equals_a']}")
        s = {k: median([r[k] for r in runs]) for k, v in runs[0].items() if isinstance(v, (int, float))
             and not isinstance(v, bool)}
        s["max"] = max((r["max"] for r in runs if r["max"] is not None), default=None)  # the worst, not a median
        s.update(transport=a.latency_transport, interval=interval, rows_per_step=per_step, dense_every=dense_every,
                 target_rows_per_s=a.latency_rows_per_second, repeats=len(runs),
                 probes=sum(r["probes"] for r in runs), arrived=sum(r["arrived"] for r in runs),
                 c_equals_a=all(r["c_equals_a"] for r in runs),
                 follower_cpu={k: median([r["follower_cpu"][k] for r in runs]) for k in hops},
                 hops={k: merge_follow_stats([r["hops"][k] for r in runs]) for k in hops}, runs=runs)
        self.results.setdefault("checks", {})["c_equals_a_after_follow"] = s["c_equals_a"]
        self.results["sections"]["latency"] = s

    def latency_run(self, stream, hops: dict, per_step: int, dense_every: int) -> dict:
        """Start the followers and the watcher, commit the stream at A on schedule, stop them; the numbers."""
        from deltalog import Replica

        a = self.args
        interval = a.latency_interval
        warmup = max(1, round(1.0 / interval))  # one second of steps before the first probe
        n = max(10, round(a.latency_seconds / interval))
        logs = {k: (self.logfile(f"latency-follow-{k}.jsonl"), self.logfile(f"latency-follow-{k}.err")) for k in hops}
        stop = self.logfile("latency.stop")
        watch_out = self.logfile("latency-watch.json")
        probe = next(s for s in self.specs if s.name == workload.PROBE_TENSOR)
        procs: dict[str, subprocess.Popen] = {}
        files = []
        committed: dict[int, float] = {}
        dense_probe: dict[int, bool] = {}
        commit_s: list[float] = []
        behind: list[float] = []  # how late A was on its schedule after each measured step
        sparse_rows = dense_rows = nbytes = 0
        try:
            for k, argv in hops.items():
                out, err = open(logs[k][0], "w"), open(logs[k][1], "w")
                files += [out, err]
                procs[k] = subprocess.Popen(argv, stdout=out, stderr=err)
            procs["watch"] = subprocess.Popen([PY, os.path.join(HERE, "latency.py"), "watch", self.C, probe.name,
                                               str(probe.rows - 1), stop, watch_out])
            self.wait_for(lambda: all(any(e["event"] == "sync" for e in follow_events(logs[k][0])) for k in hops)
                          and os.path.exists(watch_out + ".ready"),
                          60, "the followers and the watcher did not start", procs)
            next_at = time.monotonic()
            started = None
            cpu0 = {}
            for i in range(warmup + n):
                measuring = i >= warmup
                if measuring and started is None:
                    started = time.monotonic()
                    cpu0 = {k: proc_cpu(procs[k].pid) for k in hops}
                dense = bool(dense_every) and i % dense_every == 0
                if measuring:
                    seq, updates = stream.probe_step(self.current, dense=dense)
                else:
                    updates = stream.step(self.current, dense=dense)
                t0 = time.monotonic()
                # wait: a reader of A that finds a commit in flight may hold A's lock for a moment
                # (Replica.read_rows takes it to repair a writer it believes dead)
                self.ra.commit(updates, wait=1.0)
                t1 = time.monotonic()
                if measuring:
                    committed[seq] = t1
                    dense_probe[seq] = dense
                    commit_s.append(t1 - t0)
                    for name, (r, v) in updates.items():
                        if name in stream.samplers:
                            sparse_rows += len(r)
                        else:
                            dense_rows += len(r)
                        nbytes += v.nbytes
                next_at += interval
                now = time.monotonic()
                if measuring:
                    behind.append(max(0.0, now - next_at))
                # A fixed-rate schedule (open loop): a step that comes late does not move the
                # next ones, so the rate holds whenever A can commit that fast on average.
                time.sleep(max(0.0, next_at - now))
            elapsed = time.monotonic() - started
            cpu = {k: (proc_cpu(procs[k].pid) - cpu0[k]) / elapsed for k in hops}
            last = self.ra.head
            self.wait_for(lambda: replica_head(self.C) >= last, 120, f"C did not reach A's head {last}", procs)
            time.sleep(0.1)
        finally:
            with open(stop, "w"):
                pass
            for k in hops:
                if k in procs and procs[k].poll() is None:
                    procs[k].send_signal(signal.SIGTERM)
            codes = {}
            for k, p in procs.items():
                try:
                    codes[k] = p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    codes[k] = "killed"
            for f in files:
                f.close()
        watched = read_json(watch_out)
        seen = {int(k): v for k, v in watched["seen"].items()}
        probes = [{"seq": k, "latency": max(0.0, seen[k] - t) if k in seen else None, "dense": dense_probe[k],
                   "commit": c} for (k, t), c in zip(committed.items(), commit_s)]
        lat_s = [p["latency"] for p in probes if p["latency"] is not None]
        dense_lat = [p["latency"] for p in probes if p["dense"] and p["latency"] is not None]
        sparse_lat = [p["latency"] for p in probes if not p["dense"] and p["latency"] is not None]
        with Replica.open(self.C) as rc:
            c_ok = rc.head == self.ra.head and all(np.array_equal(self.ra.rows_view(t), rc.rows_view(t))
                                                   for t in self.ra.tensor_names)
        return {"probes": len(committed), "arrived": len(lat_s), "p50": pct(lat_s, 50), "p99": pct(lat_s, 99),
                "max": max(lat_s) if lat_s else None, "seconds": elapsed,
                "rows_per_s": sparse_rows / elapsed, "total_rows_per_s": (sparse_rows + dense_rows) / elapsed,
                "mb_per_s": nbytes / elapsed / 1e6,
                "behind_p99": pct(behind, 99), "behind_max": max(behind) if behind else None,
                "p50_sparse_steps": pct(sparse_lat, 50), "p99_sparse_steps": pct(sparse_lat, 99),
                "p50_dense_steps": pct(dense_lat, 50), "p99_dense_steps": pct(dense_lat, 99),
                "commit_p50": pct(commit_s, 50), "commit_p99": pct(commit_s, 99),
                "follower_cpu": cpu, "c_equals_a": c_ok, "watch_polls": watched.get("polls"),
                "hops": {k: follow_stats(follow_events(logs[k][0]), codes.get(k)) for k in hops},
                "probe_runs": probes}

    def wait_for(self, ready, timeout: float, what: str, procs: dict) -> None:
        """Poll ``ready()`` every 20 ms; RuntimeError after ``timeout`` s or when a process of ``procs`` died."""
        deadline = time.monotonic() + timeout
        while not ready():
            dead = {k: p.returncode for k, p in procs.items() if p.poll() is not None}
            if dead:
                raise RuntimeError(f"{what}: exited early {dead} (logs in {self.logs})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout:.0f} s")
            time.sleep(0.02)

    # -- serve-snapshot

    def section_serve(self) -> None:
        if not self.enabled("serve"):
            return
        if self.features["serve"]:
            return self.skip("serve", self.features["serve"])
        argv = [*self.cli, "serve-snapshot", self.A, "--port", "0", "--json", "--quiet"]
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=open(self.logfile("serve.log"), "w"), text=True)
        try:
            line = server.stdout.readline()
            info = last_json(line) or {}
            url = info.get("url")
            if not url:
                raise RuntimeError(f"serve-snapshot printed no url: {line!r}")
            url = url.rstrip("/") + "/v1/snapshot/latest"
            curl = ["curl", "-s", "-f", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url]
            snap = max(self.ra.snapshots(), key=lambda m: m["offset"])
            snapdir = os.path.join(self.A, "snapshots", f"{snap['offset']:020d}")
            files = [os.path.join(snapdir, e["file"]) for e in snap["tensors"]]
            nbytes_files = sum(os.path.getsize(f) for f in files)
            ceiling = SendfileServer(files)
            ceiling_curl = [*curl[:-1], ceiling.url]
            run(curl)  # warm-up, every side
            run(ceiling_curl)
            for f in files:
                run(["cp", f, "/dev/null"])
            runs = []
            try:
                for i in range(self.args.repeat):
                    seconds, proc = run(curl)
                    size = int(proc.stdout.split()[0])
                    cp_seconds = 0.0
                    for f in files:
                        cp_seconds += run(["cp", f, "/dev/null"])[0]
                    c_seconds, c_proc = run(ceiling_curl)
                    c_size = int(c_proc.stdout.split()[0])
                    runs.append({"curl_seconds": seconds, "curl_bytes": size, "curl_mb_s": size / seconds / 1e6,
                                 "cp_seconds": cp_seconds, "cp_mb_s": nbytes_files / cp_seconds / 1e6,
                                 "ceiling_mb_s": c_size / c_seconds / 1e6})
                    self.log(f"[serve {i + 1}/{self.args.repeat}] curl {fmt_bytes(size)} in {fmt_s(seconds)} "
                             f"({size / seconds / 1e6:,.0f} MB/s); cp from the page cache "
                             f"{nbytes_files / cp_seconds / 1e6:,.0f} MB/s; loopback sendfile ceiling "
                             f"{c_size / c_seconds / 1e6:,.0f} MB/s")
            finally:
                ceiling.close()
            self.results["commands"]["serve"] = shlex.join(argv)
            self.results["commands"]["serve_curl"] = shlex.join(curl)
            self.results["commands"]["serve_cp"] = f"for f in {snapdir}/*.bin; do cp $f /dev/null; done"
            s = {k: median([r[k] for r in runs]) for k in runs[0]}
            s["runs"] = runs
            s["ratio"] = s["curl_mb_s"] / s["cp_mb_s"]
            s["ceiling_ratio"] = s["curl_mb_s"] / s["ceiling_mb_s"]
            self.results["sections"]["serve"] = s
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()

    # -- all

    def error(self, section: str, exc: BaseException) -> None:
        self.results["errors"][section] = f"{type(exc).__name__}: {exc}".strip()
        self.log(f"[{section}] ERROR: {type(exc).__name__}: {exc}")
        if self.args.debug:
            traceback.print_exc()

    def run_all(self) -> None:
        started = time.monotonic()
        self.results["started"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self.results["machine"] = machine()
        self.results["disk"] = disk(self.args.work if os.path.isdir(self.args.work) else REPO)
        self.results["revision"] = git_revision()
        self.results["argv"] = "bench/run.py " + shlex.join(sys.argv[1:]) if sys.argv[1:] else "bench/run.py"
        self.results["config"] = {k: v for k, v in vars(self.args).items() if k not in ("debug",)}
        for name, why in self.features.items():
            if why:
                self.log(f"feature {name}: not available ({why})")
        try:
            self.setup()
            self.results["model_bytes"] = self.model_bytes
            for name, fn in (("diff/sync", self.section_diff_sync), ("rollback", self.section_rollback),
                             ("latency", self.section_latency), ("serve", self.section_serve)):
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others
                    self.error(name, exc)
            if self.enabled("commit") and self.commits:
                measured = self.commits[1:] or self.commits
                self.results["sections"]["commit"] = {
                    "minutes": len(measured),
                    "rows_per_s": median([m["rows_per_s"] for m in measured]),
                    "mb_per_s": median([m["mb_per_s"] for m in measured]),
                    "rows_per_commit": median([m["rows"] / m["commits"] for m in measured]),
                    "commit_p50_ms": median([m["commit_p50_ms"] for m in measured]),
                    "cpu_ms_per_commit": median([m["cpu_ms_per_commit"] for m in measured]),
                    "runs": measured,
                }
            self.verify_copies()
        finally:
            self.results["commands"] = {k: self.tidy(c) for k, c in self.results["commands"].items()}
            if self.ra is not None:
                self.ra.close()
            if self.sshd is not None:
                self.sshd.stop()
            self.results["seconds"] = time.monotonic() - started
            self.results["machine"]["loadavg_end"] = os.getloadavg()
            if not self.args.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    def tidy(self, cmd: str) -> str:
        """A command as printed in the report: placeholders for scratch paths, globs for file lists."""
        cmd = re.sub(r"(\S+/)\d{5}\.bin(?: \1\d{5}\.bin)+", r"\1*.bin", cmd)
        cmd = cmd.replace(self.work, "$W")
        if self.sshd is not None or self._sshd_dir:
            d = self._sshd_dir or (self.sshd.dir if self.sshd else None)
            if d:
                cmd = cmd.replace(d, "$SSHD")
            if self._sshd_port:
                cmd = re.sub(rf"(-[pP] ){self._sshd_port}\b", r"\1$PORT", cmd)
        cmd = cmd.replace(PY, "$PY").replace(REPO + "/", "")
        return re.sub(r"\$W/logs/\d{4}-", "$W/logs/", cmd)

    def verify_copies(self) -> None:
        """The copies the ratios compare must be right: B and the rsync mirror equal A where they were synced."""
        checks = {}
        if "sync" in self.results["sections"] and self.b_ready:
            from deltalog import Replica

            self.sync_quietly(mirror=True)
            with Replica.open(self.B) as rb:
                checks["b_equals_a"] = rb.head == self.ra.head and all(
                    np.array_equal(self.ra.rows_view(n), rb.rows_view(n)) for n in self.ra.tensor_names)
            checks["rsync_mirror_equals_a"] = all(
                filecmp_equal(a, os.path.join(self.mirror, os.path.basename(a))) for a in self.tensor_files(self.A))
            self.log(f"check: B equals A after deltalog sync: {checks['b_equals_a']}; "
                     f"rsync mirror equals A: {checks['rsync_mirror_equals_a']}")
        self.results.setdefault("checks", {}).update(checks)


class SendfileServer:
    """The loopback ceiling: a minimal HTTP server that sendfile()s some files back to back on any GET.

    Not deltalog: the same bytes through the same kernel path (socket.sendfile
    on loopback, curl reading), with nothing else in the way. It tells what
    the transport allows on this machine."""

    def __init__(self, files: list[str]):
        import socket
        import threading

        self.files = files
        self.size = sum(os.path.getsize(f) for f in files)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {self.size}\r\n"
                                 "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n".encode())
                    for path in self.files:
                        with open(path, "rb") as f:
                            conn.sendfile(f)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far, every thread."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def filecmp_equal(a: str, b: str) -> bool:
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    return np.array_equal(np.memmap(a, np.uint8, "r"), np.memmap(b, np.uint8, "r"))


def numpy_diff(ra, rb) -> int:
    """The numpy equivalent of diff: compare every row of the memory-mapped tensors, 32 MiB at a time,
    and compute the same numbers (changed rows, l2, max |delta|, sum |delta|) over the rows that differ."""
    changed = 0
    for name in ra.tensor_names:
        a, b = ra.rows_view(name), rb.rows_view(name)
        bits = np.dtype(f"u{a.dtype.itemsize}")
        step = max(1, (32 << 20) // max(1, a.shape[1] * a.dtype.itemsize))
        l2 = max_abs = sig = 0.0
        for start in range(0, a.shape[0], step):
            x, y = a[start:start + step], b[start:start + step]
            idx = np.flatnonzero(np.any(x.view(bits) != y.view(bits), axis=1))
            if idx.size:
                d = y[idx].astype(np.float64) - x[idx]
                l2 += float((d * d).sum())
                max_abs = max(max_abs, float(np.abs(d).max()))
                sig += float(np.abs(d).sum())
                changed += idx.size
    return changed


def parse_rsync_stats(text: str) -> dict:
    def num(label):
        m = re.search(rf"^{label}:\s*([\d,.]+)", text, re.M)
        return int(float(m.group(1).replace(",", ""))) if m else None

    return {"sent": num("Total bytes sent") or 0, "received": num("Total bytes received") or 0,
            "literal": num("Literal data"), "matched": num("Matched data")}


def summarize_diff(runs: list[dict]) -> dict:
    keys = ("lib_seconds", "cli_seconds", "numpy_seconds", "lib_changed_rows", "lib_fresh_seconds", "numpy_fresh_seconds",
            "lib_repeat_seconds")
    s = {k: median([r[k] for r in runs if k in r]) for k in keys if any(k in r for r in runs)}
    s["ratio"] = s["numpy_seconds"] / s["lib_seconds"]
    if "lib_repeat_seconds" in s:
        s["repeat_ratio"] = s["numpy_seconds"] / s["lib_repeat_seconds"]
    s["fresh_ratio"] = s["numpy_fresh_seconds"] / s["lib_fresh_seconds"]
    s["cli_ratio"] = s["numpy_seconds"] / s["cli_seconds"]
    s["method"] = runs[0].get("method")
    s["agree"] = not any(r.get("disagree") for r in runs)
    s["runs"] = runs
    return s


# -- verdicts and reports -------------------------------------------------------------


def verdicts(results: dict) -> list[dict]:
    sec = results["sections"]
    out = []

    def add(key, desc, measured, ok, note=""):
        out.append({"target": key, "description": desc, "measured": measured,
                    "result": "PASS" if ok else "MISS", "note": note})

    def skipped(key, desc, section):
        why = results["errors"].get(section) or results["skipped"].get(section) or "not run (--only)"
        out.append({"target": key, "description": desc, "measured": "-",
                    "result": "ERROR" if section in results["errors"] else "SKIP", "note": why})

    desc = {k: d for k, d, _ in TARGETS}
    s = sec.get("sync")
    if s:
        add("sync_bytes", desc["sync_bytes"], fmt_ratio(1 / s["bytes_ratio"]), s["bytes_ratio"] >= 50,
            f"{fmt_bytes(s['deltalog_bytes'])} vs {fmt_bytes(s['rsync_bytes'])}")
        add("sync_wall", desc["sync_wall"], fmt_ratio(1 / s["wall_ratio"]), s["wall_ratio"] >= 10,
            f"{fmt_s(s['deltalog_seconds'])} vs {fmt_s(s['rsync_seconds'])}")
        ok = s["deltalog_extra_anon"] <= s["memory_budget"]
        note = (f"budget 64 MiB + {MEMORY_PER_CHANGED_BYTE} x {fmt_bytes(s['changed_bytes'])} changed; "
                f"model {fmt_bytes(results['model_bytes'])}")
        measured = f"+{fmt_bytes(s['deltalog_extra_anon'])} anon"
        lag = s.get("lag")
        if lag:
            ok = ok and lag["extra_anon"] <= lag["memory_budget"]
            note += (f"; after {lag['minutes']} min: +{fmt_bytes(lag['extra_anon'])} for {fmt_bytes(lag['changed_bytes'])} "
                     f"changed ({lag['slope']:.1f} B of memory per changed B)")
        add("sync_memory", desc["sync_memory"], measured, ok, note)
    else:
        for k in ("sync_bytes", "sync_wall", "sync_memory"):
            skipped(k, desc[k], "sync")
    d = sec.get("diff")
    if d:
        repeat = f"; repeated at once {fmt_speedup(d['repeat_ratio'])}" if "repeat_ratio" in d else ""
        add("diff", desc["diff"], fmt_speedup(d["ratio"]), d["ratio"] >= 20,
            f"{fmt_s(d['lib_seconds'])} vs {fmt_s(d['numpy_seconds'])}, CPU caches cold{repeat}; CLI {fmt_s(d['cli_seconds'])}")
    else:
        skipped("diff", desc["diff"], "diff")
    r = sec.get("rollback")
    if r:
        add("rollback", desc["rollback"], fmt_speedup(r["ratio"]), r["ratio"] >= 20,
            f"{fmt_s(r['lib_seconds'])} vs cp {fmt_s(r['cp_seconds'])}; CLI {fmt_s(r['cli_seconds'])}")
    else:
        skipped("rollback", desc["rollback"], "rollback")
    c = sec.get("commit")
    if c:
        add("commit", desc["commit"], f"{c['rows_per_s']:,.0f} rows/s", c["rows_per_s"] >= 500_000,
            f"{c['mb_per_s']:,.0f} MB/s, {c['rows_per_commit']:,.0f} rows/commit")
    else:
        skipped("commit", desc["commit"], "commit")
    v = sec.get("serve")
    if v:
        add("serve", desc["serve"], f"{v['ratio']:.2f} of cp", v["ratio"] >= 0.5,
            f"{v['curl_mb_s']:,.0f} MB/s vs {v['cp_mb_s']:,.0f} MB/s; loopback ceiling {v['ceiling_mb_s']:,.0f} MB/s")
    else:
        skipped("serve", desc["serve"], "serve")
    t = sec.get("latency")
    if t:
        rate_ok = (t["rows_per_s"] or 0) >= 0.95 * LATENCY_TARGET_ROWS
        all_in = t["arrived"] == t["probes"]
        ok = t["p99"] is not None and t["p99"] < 1.0 and rate_ok and all_in and t["c_equals_a"]
        note = (f"p50 {fmt_s(t['p50'])}, max {fmt_s(t['max'])}, {t['arrived']}/{t['probes']} probes; "
                f"A committed {t['rows_per_s']:,.0f} embedding rows/s ({t['total_rows_per_s']:,.0f} with dense) "
                f"over {t['transport']} sync --follow")
        if not rate_ok:
            note += f"; rate below {LATENCY_TARGET_ROWS:,} rows/s"
        if not all_in:
            note += "; probes missing at C"
        if not t["c_equals_a"]:
            note += "; C differs from A"
        add("latency", desc["latency"], f"p99 {fmt_s(t['p99'])}", ok, note)
    else:
        skipped("latency", desc["latency"], "latency")
    return out


def report_text(results: dict) -> str:
    sec = results["sections"]
    lines = []
    m = results["machine"]
    lines.append(f"command: .venv/bin/python {results['argv']}")
    lines.append(f"machine: {m.get('cores')} cores ({m.get('cpu')}), {m.get('memory_gib')} GiB RAM, "
                 f"disk {results['disk'].get('device', '?')} {results['disk'].get('fstype', '')}; "
                 f"load {m['loadavg'][0]:.2f} at start, {m.get('loadavg_end', (0,))[0]:.2f} at end (shared machine); "
                 f"row loops {m.get('row_loops', '?')}")
    lines.append(f"model: {fmt_bytes(results.get('model_bytes'))}; medians of {results['config']['repeat']} runs")
    if "commit" in sec:
        c = sec["commit"]
        lines.append(f"commit (Python API): {c['rows_per_s']:,.0f} rows/s, {c['mb_per_s']:,.0f} MB/s "
                     f"({c['rows_per_commit']:,.0f} rows per commit, p50 {c['commit_p50_ms']:.1f} ms per commit, "
                     f"{c['minutes']} simulated minutes)")
        if c.get("cpu_ms_per_commit"):  # what load moves least: the CPU a commit takes, and the rate it allows
            cores = m.get("cores") or 1
            ceiling = c["rows_per_commit"] / (c["cpu_ms_per_commit"] / 1000 / cores)
            lines.append(f"  CPU time per commit (user + system, every thread): {c['cpu_ms_per_commit']:.1f} ms; "
                         f"on {cores} cores, commits that overlapped perfectly would reach {ceiling:,.0f} rows/s")
    if "sync" in sec:
        s = sec["sync"]
        mem = s["memory"]
        lines.append(f"sync of one minute's changes ({s['changed_rows']:,.0f} rows, {fmt_bytes(s['changed_bytes'])} raw), "
                     f"push over ssh to 127.0.0.1:")
        lines.append(f"  deltalog sync   {fmt_s(s['deltalog_seconds']):>10}  {fmt_bytes(s['deltalog_bytes']):>11} payload "
                     f"{fmt_bytes(s['deltalog_wire']):>11} on the wire")
        lines.append(f"  rsync           {fmt_s(s['rsync_seconds']):>10}  {fmt_bytes(s['rsync_bytes']):>11} payload "
                     f"{fmt_bytes(s['rsync_wire']):>11} on the wire   (literal data {fmt_bytes(s['rsync_literal'])})")
        lines.append(f"  scp (full)      {fmt_s(s['scp_seconds']):>10}  {fmt_bytes(s['full_bytes']):>11}         "
                     f"{fmt_bytes(s['scp_wire']):>11} on the wire")
        lines.append(f"  cp (full,local) {fmt_s(s['cp_seconds']):>10}  {fmt_bytes(s['full_bytes']):>11}")
        inv = lambda x: None if not x else 1 / x  # noqa: E731
        lines.append(f"  ratios deltalog/other: bytes vs rsync {fmt_ratio(inv(s['bytes_ratio']))} "
                     f"(on the wire {fmt_ratio(inv(s['wire_ratio']))}); wall vs rsync {fmt_ratio(inv(s['wall_ratio']))}, "
                     f"vs scp {fmt_ratio(inv(s['scp_ratio']))}, vs local cp {fmt_ratio(inv(s['cp_ratio']))}")
        base = s["memory_baseline"]
        lines.append(f"  peak memory (anon / max RSS incl. mapped file pages), sender | receiver: "
                     f"deltalog {fmt_bytes(mem['deltalog_local_peak_anon_kib'] * 1024)} / "
                     f"{fmt_bytes(mem['deltalog_local_maxrss_kib'] * 1024)} | "
                     f"{fmt_bytes(mem['deltalog_remote_peak_anon_kib'] * 1024)} / "
                     f"{fmt_bytes(mem['deltalog_remote_maxrss_kib'] * 1024)};  rsync "
                     f"{fmt_bytes(mem['rsync_local_peak_anon_kib'] * 1024)} / {fmt_bytes(mem['rsync_local_maxrss_kib'] * 1024)} | "
                     f"{fmt_bytes(mem['rsync_remote_peak_anon_kib'] * 1024)} / {fmt_bytes(mem['rsync_remote_maxrss_kib'] * 1024)}")
        lines.append(f"  (an idle interpreter with deltalog's modules: {fmt_bytes(base['peak_anon_kib'] * 1024)} anon / "
                     f"{fmt_bytes(base['maxrss_kib'] * 1024)}; deltalog's worse side adds "
                     f"{fmt_bytes(s['deltalog_extra_anon'])} anon, {fmt_bytes(s['deltalog_extra_maxrss'])} max RSS)")
    if "sync" in sec and sec["sync"].get("lag"):
        g = sec["sync"]["lag"]
        lines.append(f"  after {g['minutes']} minutes of lag ({g['changed_rows']:,} rows, {fmt_bytes(g['changed_bytes'])} changed): "
                     f"deltalog sync {fmt_s(g['seconds'])}, {fmt_bytes(g['bytes_sent'])}; peak anon sender "
                     f"{fmt_bytes(g['local_peak_anon_kib'] * 1024)} | receiver {fmt_bytes(g['remote_peak_anon_kib'] * 1024)}: "
                     f"+{fmt_bytes(g['extra_anon'])} over idle, {g['slope']:.1f} B of memory per extra changed B")
    if "diff" in sec:
        d = sec["diff"]
        lines.append(f"diff of replicas {d['lib_changed_rows']:,.0f} rows apart (method {d['method']}): library "
                     f"{fmt_s(d['lib_seconds'])}, CLI {fmt_s(d['cli_seconds'])}, numpy over the mmapped tensors "
                     f"{fmt_s(d['numpy_seconds'])} -> library {fmt_speedup(d['ratio'])}, CLI {fmt_speedup(d['cli_ratio'])}"
                     + ("" if d["agree"] else "  WARNING: changed-row counts disagree"))
        if "repeat_ratio" in d:
            lines.append(f"  the same diff repeated at once (its rows still in the CPU cache): library "
                         f"{fmt_s(d['lib_repeat_seconds'])} -> {fmt_speedup(d['repeat_ratio'])} than numpy")
        lines.append(f"  on freshly opened maps of B (a page fault per 64 KiB window touched): library "
                     f"{fmt_s(d['lib_fresh_seconds'])}, numpy {fmt_s(d['numpy_fresh_seconds'])} -> "
                     f"library {fmt_speedup(d['fresh_ratio'])}")
    if "rollback" in sec:
        r = sec["rollback"]
        lines.append(f"rollback of {r['records']:.0f} training commits ({r['rows']:,.0f} rows): library "
                     f"{fmt_s(r['lib_seconds'])} (roll forward {fmt_s(r['lib_forward_seconds'])}; {r['lib_runs']} runs), "
                     f"CLI {fmt_s(r['cli_seconds'])} ({r['cli_runs']} runs); cp of the full copy "
                     f"({fmt_bytes(r['full_bytes'])}) {fmt_s(r['cp_seconds'])} -> library {fmt_speedup(r['ratio'])}, "
                     f"CLI {fmt_speedup(r['cli_ratio'])}")
        lines.append(f"  durable: deltalog's rollback record is fsynced when it returns; cp + fsync of the full copy "
                     f"{fmt_s(r['cp_durable_seconds'])} -> library {fmt_speedup(r['durable_ratio'])}")
    if "latency" in sec:
        t = sec["latency"]
        dense = (f"the dense layers every {t['dense_every']} steps, i.e. every {fmt_s(t['dense_every'] * t['interval'])}"
                 if t["dense_every"] else "no dense layers")
        lines.append(f"update latency A -> B -> C, deltalog sync --follow on each hop ({t['transport']}): p50 "
                     f"{fmt_s(t['p50'])}, p99 {fmt_s(t['p99'])}, max {fmt_s(t['max'])} (worst of {t['repeats']} runs) "
                     f"over {t['arrived']}/{t['probes']} probes (commit returned at A -> first seen at C)")
        lines.append(f"  A: one step every {fmt_s(t['interval'])} (~{t['rows_per_step']:,} embedding rows + a probe row, "
                     f"{dense}) for {t['seconds']:.1f} s: {t['rows_per_s']:,.0f} embedding rows/s, "
                     f"{t['total_rows_per_s']:,.0f} rows/s with the dense layers, {t['mb_per_s']:.1f} MB/s of new values; "
                     f"commit p50 {fmt_s(t['commit_p50'])}, p99 {fmt_s(t['commit_p99'])}; behind schedule p99 "
                     f"{fmt_s(t['behind_p99'])}, max {fmt_s(t['behind_max'])}")
        if t["dense_every"]:
            lines.append(f"  probes in steps without the dense layers: p50 {fmt_s(t['p50_sparse_steps'])}, p99 "
                         f"{fmt_s(t['p99_sparse_steps'])}; in steps with them: p50 {fmt_s(t['p50_dense_steps'])}, "
                         f"p99 {fmt_s(t['p99_dense_steps'])}")
        for k, name in (("ab", "A -> B"), ("bc", "B -> C")):
            h = t["hops"][k]
            lines.append(f"  {name}: {h['rounds']:.0f} rounds ({h['rounds_that_moved']:.0f} moved rows, p50 "
                         f"{h['rows_per_round_p50'] or 0:,.0f} rows), round p50 {fmt_s(h['round_seconds_p50'])}, p99 "
                         f"{fmt_s(h['round_seconds_p99'])}; follower CPU {t['follower_cpu'].get(k, 0):.0%} of a core"
                         + (f"; {h['retries']} retries ({h['last_retry_error']})" if h["retries"] else "")
                         + (f"; exit {h['exit_code']}" if h["exit_code"] != 0 else ""))
    if "serve" in sec:
        v = sec["serve"]
        lines.append(f"serve-snapshot: curl {v['curl_mb_s']:,.0f} MB/s ({fmt_bytes(v['curl_bytes'])} in "
                     f"{fmt_s(v['curl_seconds'])}) vs cp from the page cache {v['cp_mb_s']:,.0f} MB/s -> {v['ratio']:.2f} of cp; "
                     f"a bare sendfile server on loopback (the transport's ceiling here) {v['ceiling_mb_s']:,.0f} MB/s -> "
                     f"deltalog reaches {v['ceiling_ratio']:.2f} of it")
    lines.append("")
    lines.append(f"{'target':44s} {'measured':>22s}  result")
    for v in verdicts(results):
        lines.append(f"{v['description']:44s} {v['measured']:>22s}  {v['result']}  {v['note']}")
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    for k, why in results["skipped"].items():
        lines.append(f"skipped {k}: {why}")
    for k, why in results["errors"].items():
        lines.append(f"error in {k}: {why}")
    for k, c in results.get("checks", {}).items():
        lines.append(f"check {k}: {c}")
    lines.append(f"total {results['seconds']:.0f} s")
    return "\n".join(lines)


def report_markdown(results: dict, text: str) -> str:
    m, dsk = results["machine"], results["disk"]
    out = ["# Benchmark results", "",
           "Written by `bench/run.py --write-results`; bench/README.md says what each number means.", "",
           f"- date: {results['started']}",
           f"- command: `.venv/bin/python {results['argv']}`  (total {results['seconds']:.0f} s)",
           f"- deltalog: {results['revision']}",
           f"- machine: {m.get('cores')} cores ({m.get('cpu')}), {m.get('memory_gib')} GiB RAM, Linux {m.get('kernel')}, "
           f"Python {m.get('python')}; disk {dsk.get('device', '?')} ({dsk.get('fstype', '?')}, "
           f"{dsk.get('total_gib')} GiB, a virtual disk reporting rotational={int(bool(dsk.get('rotational')))})",
           f"- the machine is shared with other engineers' test runs: load average {m['loadavg'][0]:.2f} at the start, "
           f"{m.get('loadavg_end', (0,))[0]:.2f} at the end. Every comparison is measured side by side in one run "
           f"and every number is the median of {results['config']['repeat']} runs.",
           f"- model: {fmt_bytes(results.get('model_bytes'))}; one simulated minute = "
           f"{results['config']['steps_per_minute']} commits touching {results['config']['touch']:.0%} of each table's rows "
           f"(Zipf s = {results['config']['zipf']})", "",
           "## Targets", "", "| target | measured | result | raw |", "|---|---|---|---|"]
    for v in verdicts(results):
        out.append(f"| {v['description']} | {v['measured']} | **{v['result']}** | {v['note']} |")
    out += ["", "## Raw numbers", "", "```", text, "```", "", "## Exact commands (one repeat)", "",
            "`$W` is the scratch directory (bench/work/run), `$SSHD` the throwaway sshd's temporary directory "
            "and `$PORT` its port (bench/sshd.py); `$PY` is .venv/bin/python.", ""]
    for k, c in results["commands"].items():
        out.append(f"- {k}: `{c}`")
    out.append("")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=float, default=1.0, help="model size scale: 1 = ~1 GiB, 0.1 quick, 4 = 4 GiB")
    p.add_argument("--repeat", type=int, default=5, help="runs per measurement (medians are reported)")
    p.add_argument("--only", type=lambda s: set(s.split(",")), default=None,
                   help="comma-separated sections: " + ",".join(SECTIONS))
    p.add_argument("--work", default=os.path.join(HERE, "work"), help="scratch directory (default bench/work, gitignored)")
    p.add_argument("--keep", action="store_true", help="keep the replicas and copies under WORK/run afterwards")
    p.add_argument("--write-results", nargs="?", const=os.path.join(HERE, "RESULTS.md"), default=None, metavar="FILE",
                   help="also write the results as Markdown (default file: bench/RESULTS.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of row popularity")
    p.add_argument("--touch", type=float, default=0.01, help="share of each table's rows a simulated minute touches")
    p.add_argument("--steps-per-minute", type=int, default=12, help="commits per simulated minute")
    p.add_argument("--bucket-rows", type=int, default=1024)
    p.add_argument("--rollback-records", type=int, default=100, help="how many records a rollback undoes")
    p.add_argument("--lag-minutes", type=int, default=3,
                   help="after the sync repeats, one more deltalog sync after this many minutes (memory vs change); 0: none")
    p.add_argument("--section-budget", type=float, default=200.0,
                   help="seconds a repeated section may take; fewer repeats (noted) beyond it")
    p.add_argument("--latency-seconds", type=float, default=30.0, help="how long probes are committed")
    p.add_argument("--latency-interval", type=float, default=0.1,
                   help="seconds between commits at A during the latency section (each one a training step with a probe)")
    p.add_argument("--latency-rows-per-second", type=float, default=float(LATENCY_TARGET_ROWS),
                   help="embedding rows A commits per second during the latency section")
    p.add_argument("--latency-dense-interval", type=float, default=1.0,
                   help="seconds between the steps that also commit the dense layers (0: never)")
    p.add_argument("--sync-interval", type=float, default=None,
                   help="the followers' --interval (longest long-poll wait; default: deltalog's)")
    p.add_argument("--latency-transport", choices=("local", "ssh"), default="local",
                   help="how the A -> B -> C followers reach B")
    p.add_argument("--debug", action="store_true", help="print tracebacks of section errors")
    args = p.parse_args(argv)
    if args.only:
        unknown = args.only - set(SECTIONS)
        if unknown:
            p.error(f"unknown section(s) {sorted(unknown)}; choose from {','.join(SECTIONS)}")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.latency_interval <= 0 or args.latency_rows_per_second <= 0:
        p.error("--latency-interval and --latency-rows-per-second must be positive")
    return args


def claim_work_dir(work: str):
    """An open file holding an exclusive flock on ``work``/run.lock (with this pid in it), kept
    for the whole run. A second run with the same --work would delete this one's replicas at
    its start (and both figures would be the machine shared between them): it stops instead."""
    import fcntl

    os.makedirs(work, exist_ok=True)
    lock = open(os.path.join(work, "run.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        raise SystemExit(f"another bench/run.py (pid {holder}) is running in {work}: wait for it to end, "
                         "or give this one another --work") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.exists(os.path.join(os.path.dirname(PY), "deltalog")):
        print(f"note: {PY} has no deltalog script beside it; run with .venv/bin/python", file=sys.stderr)
    ensure_tools()
    claimed = claim_work_dir(args.work)  # noqa: F841 (held until the process ends)
    bench = Bench(args)
    bench.run_all()
    results = bench.results
    text = report_text(results)
    print()
    print(text)
    os.makedirs(args.work, exist_ok=True)
    with open(os.path.join(args.work, "last.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    md = report_markdown(results, text)
    with open(os.path.join(args.work, "last.md"), "w") as f:
        f.write(md)
    if args.write_results:
        kept = ""
        try:
            with open(args.write_results) as f:
                old = f.read()
            if NOTES_MARKER in old:
                kept = "\n" + old[old.index(NOTES_MARKER):]
        except OSError:
            pass
        with open(args.write_results, "w") as f:
            f.write(md + kept)
        print(f"wrote {args.write_results}")
    print(f"raw results: {os.path.join(args.work, 'last.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
