"""Fault injection: real SIGKILLs at many points of every writing command, and a real full disk.

The harness (:func:`crash_campaign`) runs one CLI command in a child
process and kills it with SIGKILL at many points of its run, then checks
the contract: the replica opens, ``verify`` passes, its tensors are exactly
the model at the head it reports (compared with states kept aside per
offset), and re-running the command completes.

Kill points are calibrated to the command: a first, undisturbed run is
timed (and the replica directory watched, so the first change on disk is
known), then the kill delays are stratified over that span, one random
point per stratum, so they spread over the whole run rather than bunching
up. The child is a *warmed-up* interpreter: it imports deltalog and then
waits for its argv on stdin, so the clock starts when the command starts
and no kill is spent on interpreter start-up. Each campaign prints what it
did (``pytest -s`` shows it) and asserts a minimum number of distinct
outcomes (e.g. both the old and the new head), so it fails if kills never
land mid-operation.

Commands: commit, sync (local: the sync process is the destination
writer; ssh push: the client, the remote ``serve --stdio`` that applies,
or the ssh process in between), rollback, compact, replay --in-place.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, bits, run_cli
from sshd_fixture import sshd  # noqa: F401  (fixture)

from deltalog import Replica, tensorfiles
from deltalog import pending as pending_mod
from deltalog.history import values_at
from deltalog.store import LogStore
from deltalog.sync import sync as run_sync
from deltalog.transport import open_sink, open_source
from deltalog.verify import verify

# -- the child: a warmed-up CLI ----------------------------------------------------------------------

_ZYGOTE = r"""
import json, sys
import numpy, lmdb, zstandard, xxhash, msgpack, click, rich.console
import deltalog.cli
from deltalog import replica, writer, receive, sync, compact, replay, rollback, history, checkpoint, verify
from deltalog.transport import local, ssh
from deltalog.cli import main
sys.stdout.write("ready\n")
sys.stdout.flush()
main(json.loads(sys.stdin.readline()))
"""


class Zygote:
    """A child interpreter with deltalog imported, waiting for the argv of one command."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, cwd=REPO,
        )

    def ready(self) -> None:
        line = self.proc.stdout.readline()
        assert line == "ready\n", self.proc.stderr.read()

    def go(self, argv: list[str]) -> float:
        self.ready()
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        return time.monotonic()

    def finish(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err

    def discard(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.communicate()


class ZygotePool:
    """Keeps the next child warming up while the current one is used (start-up off the clock)."""

    def __init__(self, size: int = 2):
        self.size = size
        self.waiting: list[Zygote] = []

    def take(self) -> Zygote:
        while len(self.waiting) < self.size:
            self.waiting.append(Zygote())
        z = self.waiting.pop(0)
        self.waiting.append(Zygote())
        return z

    def close(self) -> None:
        for z in self.waiting:
            z.discard()
        self.waiting = []


# -- processes -----------------------------------------------------------------------------------------


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [p.decode(errors="replace") for p in f.read().split(b"\0") if p]
    except OSError:
        return []


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return found


def remote_servers(path: str) -> list[int]:
    """Pids of the `deltalog serve --stdio PATH` processes our sshd started for ``path``."""
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            argv = _cmdline(int(name))
            if "--stdio" in argv and "serve" in argv and path in argv and any("deltalog" in a for a in argv):
                pids.append(int(name))
    return pids


def wait_until_gone(pids_of: Callable[[], list[int]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while pids_of():
        assert time.monotonic() < deadline, f"processes still running: {pids_of()}"
        time.sleep(0.02)


# -- the harness ---------------------------------------------------------------------------------------


@dataclass
class Workspace:
    root: Path  # watched for changes during calibration
    argv: list[str]
    info: dict = field(default_factory=dict)


@dataclass
class Crashable:
    """One command under test: how to set it up, run it, judge the aftermath and finish it."""

    name: str
    prepare: Callable[[Path], Workspace]  # a fresh workspace in the given (new) directory
    observe: Callable[[Workspace], tuple[str, str]]  # checks the contract; (outcome, detail)
    rerun: Callable[[Workspace], None]  # runs the command again; asserts it completes
    victims: tuple[str, ...] = ("cli",)  # "cli", "remote" (ssh: serve --stdio), "ssh"
    remote_path: Callable[[Workspace], str] | None = None
    from_first_change: bool = False  # start the kill window near the first change on disk
    min_outcomes: int = 2  # distinct outcomes that kills must produce


def _tree_signature(root: Path) -> dict:
    sig = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f in ("lock", "lock.mdb"):
                continue  # readers touch these
            try:
                st = os.stat(os.path.join(dirpath, f))
            except OSError:
                continue
            sig[os.path.join(dirpath, f)] = (st.st_size, st.st_mtime_ns)
    return sig


def _calibrate(c: Crashable, pool: ZygotePool, base: Path) -> tuple[float, float]:
    """(seconds to the first change on disk, seconds to the end) of an undisturbed run, which must succeed."""
    ws = c.prepare(base / "calibrate")
    before = _tree_signature(ws.root)
    z = pool.take()
    start = z.go(ws.argv)
    first = None
    while z.proc.poll() is None:
        if first is None and _tree_signature(ws.root) != before:
            first = time.monotonic() - start
        time.sleep(0.002)
    end = time.monotonic() - start
    code, _out, err = z.finish()
    assert code == 0, f"{c.name}: undisturbed run failed ({code}): {err}"
    if c.remote_path is not None:
        wait_until_gone(lambda: remote_servers(c.remote_path(ws)))
    outcome, _detail = c.observe(ws)
    assert outcome == "new", f"{c.name}: an undisturbed run ended at {outcome}"
    c.rerun(ws)  # re-running a completed command is a no-op that succeeds
    shutil.rmtree(base / "calibrate")
    return (first if first is not None else end), end


def _victim_pid(victim: str, z: Zygote, ws: Workspace, c: Crashable) -> int | None:
    """The pid to kill now (waiting for a remote end to exist); None when the command already ended."""
    while z.proc.poll() is None:
        if victim == "cli":
            return z.proc.pid
        if victim == "remote":
            pids = remote_servers(c.remote_path(ws))
        else:
            pids = [p for p in _children(z.proc.pid) if _cmdline(p)[:1] == ["ssh"]]
        if pids:
            return pids[0]
        time.sleep(0.002)
    return None


def _next_delay(points: list[tuple[float, str]], lo: float, hi: float, rng: np.random.Generator) -> float:
    """A delay inside the transition from the first outcome ("old") to the next ones, as seen so far."""
    olds = [d for d, o in points if o == "old"]
    others = [d for d, o in points if o != "old"]
    a = max(olds) if olds else lo
    later = [d for d in others if d > a]
    b = min(later) if later else hi * 1.5
    return a + rng.random() * (b - a)


def crash_campaign(c: Crashable, base: Path, attempts: int, seed: int = 0, extra: int = 8) -> Counter:
    """Kill ``c``'s command at ``attempts`` calibrated points.

    The first ``attempts`` delays are stratified over the calibrated run. If
    the kills have not produced ``c.min_outcomes`` distinct outcomes, up to
    ``extra`` more probe the transition between the outcomes seen so far
    (e.g. between the last kill that left the old head and the first that
    did not), where the command's durable step lies.
    """
    rng = np.random.default_rng(seed)
    pool = ZygotePool()
    outcomes: Counter = Counter()
    killed_outcomes: set[str] = set()
    details: Counter = Counter()
    points: list[tuple[float, str]] = []
    try:
        first, end = _calibrate(c, pool, base)
        lo = 0.8 * first if c.from_first_change else 0.0
        hi = end * 1.05
        n = 0
        while n < attempts or (len(killed_outcomes) < c.min_outcomes and n < attempts + extra):
            victim = c.victims[n % len(c.victims)]
            if n < attempts:  # stratified: one random point in each of `attempts` equal slices
                delay = lo + (n + rng.random()) / attempts * (hi - lo)
            else:
                delay = _next_delay(points, lo, hi, rng)
            ws = c.prepare(base / f"kill{n}")
            z = pool.take()
            start = z.go(ws.argv)
            time.sleep(max(0.0, start + delay - time.monotonic()))
            pid = _victim_pid(victim, z, ws, c)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            code, _out, err = z.finish()
            killed = code == -signal.SIGKILL if victim == "cli" else pid is not None
            if victim != "cli":  # the client saw its peer vanish: a transport error, cleanly, or it had finished
                assert code in (0, 8), f"{c.name}: {victim} killed, client exited {code}: {err}"
                assert "Traceback" not in err and err.count("\n") <= 1, err
            if c.remote_path is not None:
                wait_until_gone(lambda ws=ws: remote_servers(c.remote_path(ws)))
            outcome, detail = c.observe(ws)
            c.rerun(ws)
            label = outcome if killed else "finished before the kill"
            outcomes[label] += 1
            points.append((delay, outcome if killed else "finished"))
            details[f"{victim}: {outcome}{' ' + detail if detail else ''}"] += 1
            if killed:
                killed_outcomes.add(outcome)
            shutil.rmtree(base / f"kill{n}")
            n += 1
    finally:
        pool.close()
    print(f"\n[crash] {c.name}: {n} kill points ({attempts} stratified over {lo:.3f}..{hi:.3f} s of a {end:.3f} s "
          f"run, first change on disk at {first:.3f} s); outcomes {dict(outcomes)}; by victim {dict(details)}")
    assert len(killed_outcomes) >= c.min_outcomes, (
        f"{c.name}: kills produced only {killed_outcomes} in {n} attempts: they never landed mid-operation")
    return outcomes


# -- checks shared by the commands ------------------------------------------------------------------------


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(bits(a), bits(b))


def raw_state(path) -> tuple[dict, bool]:
    """(meta state, pending partial sync?) read without opening the replica (no repair)."""
    store = LogStore(os.path.join(path, "log"))
    try:
        with store.read() as txn:
            return store.get_meta(txn, "state"), store.get_meta(txn, "sync.pending") is not None
    finally:
        store.close()


def unsettled(state: dict) -> bool:
    return state.get("applying") is not None or state["applied"] != state["head"]


def assert_exact(path, states: dict[int, dict[str, np.ndarray]], target: int | None = None,
                 check: bool = True) -> tuple[int, bool]:
    """Open, verify, and compare with the model at the head (a pending partial sync's rows: at ``target``).

    Returns (head, whether a partial sync is pending). ``check=False`` skips verify (after re-runs).
    """
    with Replica.open(path) as r:
        if check:
            report = verify(r, wait=30)
            assert report.ok, report.problems
        head = r.head
        assert head in states, f"head {head} is not an offset of the model"
        pending = pending_mod.merged_pending(r)
        for name in r.tensor_names:
            info = r.info(name)
            want = np.array(states[head][name])
            assert same(r.read_tensor(name), want), f"{name}: read_tensor is not the model at {head}"
            files = np.array(r.rows_view(name))  # the live file: a pending partial sync's rows are ahead
            flat_want = want.reshape(info.rows, -1)
            if name in pending:
                d = pending[name]
                idx = d.rows.astype(np.intp)
                later = np.array(states[target][name]).reshape(info.rows, -1)
                assert same(d.old, flat_want[idx]), f"{name}: pending chunks did not keep the values at {head}"
                flat_want[idx] = later[idx]
            assert same(files, flat_want), f"{name}: the tensor file is not the model at {head} (+ pending rows)"
        return head, bool(pending)


def cli_inprocess(*argv) -> tuple[int, str, str]:
    """Run the CLI's entry point in this process (re-runs: no start-up cost)."""
    from deltalog.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code or 0
    return code, out.getvalue(), err.getvalue()


# -- the model and its history ------------------------------------------------------------------------------


def make_model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """About 3.5 MiB: big enough that every command does work worth interrupting, small enough to copy fast."""
    return {
        "item_emb": rng.standard_normal((40_000, 16)).astype(np.float32),
        "user_emb": rng.standard_normal((20_000, 16)).astype(np.float16),
        "dense": rng.standard_normal((256, 64)),
        "bias": rng.standard_normal(40_000).astype(np.float32),
        "ids": rng.integers(-9, 9, (10_000, 3)).astype(np.int32),
        "step": np.array(0, np.int64),
    }


def step_update(rng: np.random.Generator, model: dict[str, np.ndarray], step: int) -> dict[str, tuple]:
    """A training step: 15% of the embedding rows, every dense row, the step counter (always a change)."""
    updates = {}
    for name in ("item_emb", "user_emb", "bias"):
        n = model[name].shape[0]
        rows = np.sort(rng.choice(n, n * 15 // 100, replace=False))
        shape = (len(rows), *model[name].shape[1:])
        updates[name] = (rows, (model[name][rows] + rng.standard_normal(shape) * 0.01).astype(model[name].dtype))
    updates["dense"] = (np.arange(256), model["dense"] * 0.999)
    updates["step"] = ([0], np.array([step], np.int64))
    return updates


def apply(model, updates) -> None:
    for name, (rows, values) in updates.items():
        arr = model[name]
        arr.reshape(arr.shape[0] if arr.ndim else 1, -1)[np.asarray(rows)] = np.asarray(values).reshape(len(rows), -1)


@dataclass
class History:
    src: str  # a replica at HEAD with snapshots at 0 only; never modified by the campaigns
    follower: str  # a follower of src synced at FOLLOWER_AT
    states: dict[int, dict[str, np.ndarray]]
    next_checkpoint: str  # the model at HEAD + 1, as an .npz


HEAD, FOLLOWER_AT, ROLLBACK_TO, KEEP_AFTER = 12, 2, 2, 7


@pytest.fixture(scope="module")
def history(tmp_path_factory) -> History:
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(42)
    model = make_model(rng)
    src, follower = str(root / "src"), str(root / "follower")
    states = {0: {k: v.copy() for k, v in model.items()}}
    with Replica.init(src, model, bucket_rows=512, model_id="faults-model") as r:
        for step in range(1, HEAD + 1):
            update = step_update(rng, model, step)
            assert r.commit(update) == step
            apply(model, update)
            states[step] = {k: v.copy() for k, v in model.items()}
            if step == FOLLOWER_AT:
                source, sink = open_source(src), open_sink(follower)
                try:
                    assert run_sync(source, sink, source_name=src, destination_name=follower).complete
                finally:
                    sink.close()
                    source.close()
    update = step_update(rng, model, HEAD + 1)
    apply(model, update)
    states[HEAD + 1] = {k: v.copy() for k, v in model.items()}
    ckpt = str(root / "next.npz")
    np.savez(ckpt, **model)
    return History(src, follower, states, ckpt)


def copy_replica(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def head_outcome(head: int, old: int, new: int) -> str:
    assert head in (old, new), f"head {head}: neither the old head {old} nor the new one {new}"
    return "old" if head == old else "new"


# -- commit -----------------------------------------------------------------------------------------------


def commit_crashable(h: History) -> Crashable:
    def prepare(d: Path) -> Workspace:
        d.mkdir()
        path = copy_replica(h.src, d / "r")
        return Workspace(d, ["commit", path, "--from", h.next_checkpoint, "--json"], {"path": path})

    def observe(ws: Workspace) -> tuple[str, str]:
        state, _ = raw_state(ws.info["path"])
        head, _ = assert_exact(ws.info["path"], h.states)
        return head_outcome(head, HEAD, HEAD + 1), "(recovered)" if unsettled(state) else ""

    def rerun(ws: Workspace) -> None:
        code, out, err = cli_inprocess("commit", ws.info["path"], "--from", h.next_checkpoint, "--json")
        assert code == 0, err
        assert json.loads(out)["offset"] == HEAD + 1
        assert assert_exact(ws.info["path"], h.states, check=False)[0] == HEAD + 1

    return Crashable("commit", prepare, observe, rerun)


def test_kill_9_during_commit(history, tmp_path):
    crash_campaign(commit_crashable(history), tmp_path, attempts=12, seed=1)


# -- sync ----------------------------------------------------------------------------------------------------


def sync_crashable(h: History, name: str, dst_spec: Callable[[str], str] = lambda p: p, extra: tuple = (),
                   victims: tuple = ("cli",), remote: bool = False) -> Crashable:
    def prepare(d: Path) -> Workspace:
        d.mkdir()
        path = copy_replica(h.follower, d / "dst")
        argv = ["sync", h.src, dst_spec(path), "--chunk-bytes", "96K", "--json", *extra]
        return Workspace(d, argv, {"path": path})

    def observe(ws: Workspace) -> tuple[str, str]:
        state, _pending = raw_state(ws.info["path"])
        head, pending = assert_exact(ws.info["path"], h.states, target=HEAD)
        outcome = head_outcome(head, FOLLOWER_AT, HEAD)
        if pending:
            assert outcome == "old"
            outcome = "partial"
        return outcome, "(recovered)" if unsettled(state) else ""

    def rerun(ws: Workspace) -> None:
        code, out, err = cli_inprocess(*ws.argv, "--wait", "30")
        assert code == 0, err
        assert json.loads(out)["complete"] is True
        with Replica.open(ws.info["path"]) as r:
            assert r.pending_sync() is None
        assert assert_exact(ws.info["path"], h.states, check=False)[0] == HEAD

    return Crashable(name, prepare, observe, rerun, victims=victims,
                     remote_path=(lambda ws: ws.info["path"]) if remote else None, from_first_change=remote)


def test_kill_9_during_local_sync(history, tmp_path):
    """The local sync process is the destination's writer: kill it mid-chunk, mid-finish, anywhere."""
    crash_campaign(sync_crashable(history, "sync (local)"), tmp_path, attempts=10, seed=2)


def test_kill_9_during_ssh_push(history, tmp_path, sshd):
    """Push over ssh: kill the client, the remote `serve --stdio` that applies, or the ssh in between."""
    crashable = sync_crashable(
        history, "sync (ssh push)", dst_spec=sshd.location, extra=tuple(sshd.cli_options()),
        victims=("remote", "cli", "ssh"), remote=True,
    )
    crash_campaign(crashable, tmp_path, attempts=6, seed=3)


def reseed_crashable(h: History) -> Crashable:
    """`sync --reseed` into a follower that took a stray commit (its offset 3 is not the source's)."""
    diverged = str(Path(h.src).parent / "diverged")
    stray = {k: v.copy() for k, v in h.states[FOLLOWER_AT].items()}
    rows = np.arange(0, 40_000, 7)
    stray["item_emb"][rows] = 7.0
    if not os.path.exists(diverged):
        shutil.copytree(h.follower, diverged)
        with Replica.open(diverged) as r:
            assert r.commit({"item_emb": (rows, stray["item_emb"][rows])}) == FOLLOWER_AT + 1
    states = {**h.states, FOLLOWER_AT + 1: stray}  # this replica's own offset 3

    def prepare(d: Path) -> Workspace:
        d.mkdir()
        path = copy_replica(diverged, d / "dst")
        return Workspace(d, ["sync", h.src, path, "--reseed", "--chunk-bytes", "96K", "--json"], {"path": path})

    def observe(ws: Workspace) -> tuple[str, str]:
        state, _pending = raw_state(ws.info["path"])
        head, pending = assert_exact(ws.info["path"], states, target=HEAD)
        outcome = {FOLLOWER_AT + 1: "old", 0: "partial" if pending else "rebased", HEAD: "new"}.get(head)
        assert outcome is not None, f"head {head}: neither the old head, the source's snapshot nor its head"
        with Replica.open(ws.info["path"]) as r:
            if outcome != "old":  # once rebased, this replica's own history is gone, never mixed in
                assert r.oldest_offset == 0 and r.state_digest_at(0) == _digest_of(h.src, 0)
        return outcome, "(recovered)" if unsettled(state) else ""

    def rerun(ws: Workspace) -> None:
        code, out, err = cli_inprocess(*ws.argv, "--wait", "30")
        assert code == 0, err
        assert json.loads(out)["complete"] is True
        assert assert_exact(ws.info["path"], h.states, check=False)[0] == HEAD
        with Replica.open(ws.info["path"]) as r:
            assert r.state_digest == _digest_of(h.src, HEAD)
        code, _out, err = cli_inprocess("sync", h.src, ws.info["path"], "--json")  # no longer diverged
        assert code == 0, err

    return Crashable("sync --reseed", prepare, observe, rerun, min_outcomes=2)


def _digest_of(path: str, offset: int) -> int:
    with Replica.open(path) as r:
        return r.state_digest_at(offset)


def test_kill_9_during_reseed(history, tmp_path):
    """A reseed drops the destination's log and rebuilds it from the source's snapshot: a kill at any
    point leaves either the old replica, exactly, or the source's model at an offset of the source."""
    crash_campaign(reseed_crashable(history), tmp_path, attempts=8, seed=7)


# -- rollback ------------------------------------------------------------------------------------------------


def rollback_crashable(h: History) -> Crashable:
    states = {**{k: v for k, v in h.states.items() if k <= HEAD}, HEAD + 1: h.states[ROLLBACK_TO]}

    def prepare(d: Path) -> Workspace:
        d.mkdir()
        path = copy_replica(h.src, d / "r")
        return Workspace(d, ["rollback", path, "--to", str(ROLLBACK_TO), "--reason", "bad model", "--json"],
                         {"path": path})

    def observe(ws: Workspace) -> tuple[str, str]:
        state, _ = raw_state(ws.info["path"])
        head, _ = assert_exact(ws.info["path"], states)
        return head_outcome(head, HEAD, HEAD + 1), "(recovered)" if unsettled(state) else ""

    def rerun(ws: Workspace) -> None:
        code, out, err = cli_inprocess(*ws.argv)
        assert code == 0, err
        assert json.loads(out)["offset"] == HEAD + 1  # appended now, or found already done
        assert assert_exact(ws.info["path"], states, check=False)[0] == HEAD + 1
        with Replica.open(ws.info["path"]) as r:
            summaries = list(r.iter_summaries(since=HEAD))
            assert [(s.kind, s.target, s.reason) for s in summaries] == [("rollback", ROLLBACK_TO, "bad model")]

    return Crashable("rollback", prepare, observe, rerun)


def test_kill_9_during_rollback(history, tmp_path):
    crash_campaign(rollback_crashable(history), tmp_path, attempts=10, seed=4)


# -- compact -------------------------------------------------------------------------------------------------


def compact_crashable(h: History) -> Crashable:
    def prepare(d: Path) -> Workspace:
        d.mkdir()
        path = copy_replica(h.src, d / "r")
        return Workspace(d, ["compact", path, "--keep-after", str(KEEP_AFTER), "--json"], {"path": path})

    def check_offset(r: Replica, offset: int) -> None:
        rows = {i.name: np.arange(i.rows, dtype=np.uint64) for i in r.tensors}
        _head, values = values_at(r, offset, rows)
        for info in r.tensors:
            assert same(values[info.name].reshape(info.shape), h.states[offset][info.name]), (offset, info.name)

    def observe(ws: Workspace) -> tuple[str, str]:
        head, _ = assert_exact(ws.info["path"], h.states)
        assert head == HEAD
        with Replica.open(ws.info["path"]) as r:
            oldest = r.oldest_offset
            assert oldest in (0, KEEP_AFTER)
            check_offset(r, oldest)
            check_offset(r, KEEP_AFTER)
            leftovers = [n for n in os.listdir(os.path.join(ws.info["path"], tensorfiles.SNAPSHOT_DIR))
                         if n.startswith(".compact-")]
        return ("old" if oldest == 0 else "new"), "(staging left)" if leftovers else ""

    def rerun(ws: Workspace) -> None:
        code, out, err = cli_inprocess(*ws.argv)
        assert code == 0, err
        assert json.loads(out)["oldest_offset"] == KEEP_AFTER
        snaps = os.listdir(os.path.join(ws.info["path"], tensorfiles.SNAPSHOT_DIR))
        assert snaps == [tensorfiles.snapshot_dirname(KEEP_AFTER)], snaps  # garbage of the killed run is gone
        with Replica.open(ws.info["path"]) as r:
            assert r.oldest_offset == KEEP_AFTER and r.head == HEAD
            check_offset(r, KEEP_AFTER)

    return Crashable("compact", prepare, observe, rerun)


def test_kill_9_during_compact(history, tmp_path):
    crash_campaign(compact_crashable(history), tmp_path, attempts=8, seed=5)


# -- replay --in-place ---------------------------------------------------------------------------------------

DAMAGED = ("item_emb", "user_emb", "bias", "ids")


def replay_crashable(h: History) -> Crashable:
    def prepare(d: Path) -> Workspace:
        d.mkdir()
        path = copy_replica(h.src, d / "r")
        damaged = {}
        with Replica.open(path) as r:
            for name in DAMAGED:
                file = os.path.join(path, tensorfiles.TENSOR_DIR, r.info(name).file)
                with open(file, "r+b") as f:
                    f.seek(r.info(name).nbytes // 2)
                    f.write(b"\xde\xad\xbe\xef")
                with open(file, "rb") as f:
                    damaged[name] = f.read()
        return Workspace(d, ["replay", path, "--in-place", "--json"], {"path": path, "damaged": damaged})

    def observe(ws: Workspace) -> tuple[str, str]:
        path = ws.info["path"]
        repaired = 0
        with Replica.open(path) as r:
            for info in r.tensors:  # each file is the damaged one or the repaired one: never a mix
                with open(os.path.join(path, tensorfiles.TENSOR_DIR, info.file), "rb") as f:
                    data = f.read()
                good = np.array(h.states[HEAD][info.name]).tobytes()
                if info.name in DAMAGED and data == ws.info["damaged"][info.name]:
                    continue
                assert data == good, f"{info.name}: neither the damaged file nor the repaired one"
                repaired += info.name in DAMAGED
            assert r.head == HEAD
            report = verify(r)
            assert report.ok == (repaired == len(DAMAGED)), report.problems
            for problem in report.problems:
                assert "rows differ" in problem and any(f"'{n}'" in problem for n in DAMAGED), problem
        return ("new" if repaired == len(DAMAGED) else "old" if repaired == 0 else f"{repaired} repaired"), ""

    def rerun(ws: Workspace) -> None:
        code, _out, err = cli_inprocess(*ws.argv)
        assert code == 0, err
        leftovers = [n for n in os.listdir(os.path.join(ws.info["path"], tensorfiles.TENSOR_DIR))
                     if n.endswith(".replay-tmp")]
        assert not leftovers
        assert assert_exact(ws.info["path"], h.states, check=False)[0] == HEAD

    return Crashable("replay --in-place", prepare, observe, rerun)


def test_kill_9_during_replay_in_place(history, tmp_path):
    crash_campaign(replay_crashable(history), tmp_path, attempts=8, seed=6)


# -- init ----------------------------------------------------------------------------------------------------


def test_killed_init_leaves_nothing_behind_once_rerun(tmp_path):
    ckpt = tmp_path / "m.npz"
    np.savez(ckpt, emb=np.random.default_rng(0).standard_normal((500_000, 16)).astype(np.float32))
    target = tmp_path / "r"
    pool = ZygotePool(size=1)
    try:
        z = pool.take()
        z.go(["init", str(target), "--from", str(ckpt)])
        deadline = time.monotonic() + 30
        while not list(tmp_path.glob(".r.init-*")):  # kill it while it builds the replica beside its name
            assert z.proc.poll() is None and time.monotonic() < deadline, "init ended before it could be killed"
            time.sleep(0.001)
        os.kill(z.proc.pid, signal.SIGKILL)
        z.finish()
    finally:
        pool.close()
    assert not target.exists()  # never a partial replica under its name
    assert run_cli("init", target, "--from", ckpt).returncode == 0  # re-running completes
    with Replica.open(target) as r:
        assert verify(r).ok
    assert not list(tmp_path.glob(".r.init-*")), "the killed run's staging directory is still there"


# -- the soak (opt-in) -----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("which", ["commit", "sync", "rollback", "compact", "replay", "ssh-push"])
def test_soak_many_kill_points(history, tmp_path, request, which):
    """The same campaigns with 60 kill points each (30 for ssh push): run with `pytest -m slow -s`."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("opt-in soak: run with -m slow")
    if which == "ssh-push":
        server = request.getfixturevalue("sshd")
        crashable = sync_crashable(history, "sync (ssh push, soak)", dst_spec=server.location,
                                   extra=tuple(server.cli_options()), victims=("remote", "cli", "ssh"), remote=True)
        crash_campaign(crashable, tmp_path, attempts=30, seed=103)
        return
    make = {"commit": commit_crashable, "sync": lambda h: sync_crashable(h, "sync (local, soak)"),
            "rollback": rollback_crashable, "compact": compact_crashable, "replay": replay_crashable}[which]
    crash_campaign(make(history), tmp_path, attempts=60, seed=100 + len(which))


# -- a real full disk ------------------------------------------------------------------------------------------

FS_BYTES = 8 << 20


@pytest.fixture
def small_fs(tmp_path):
    """An 8 MiB tmpfs mounted for the test (root only), unmounted afterwards."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not permitted'})")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill(fs: Path, leave: int) -> None:
    """Take all but ``leave`` bytes of the file system with a filler file."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    with open(fs / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def small_model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"emb": rng.standard_normal((4096, 64)).astype(np.float32), "bias": rng.standard_normal(4096).astype(np.float32)}


def assert_clean_storage_error(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 12, (proc.returncode, proc.stderr)
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("deltalog: error: ")


def assert_unchanged(path, model: dict[str, np.ndarray], head: int) -> None:
    with Replica.open(path) as r:
        assert r.head == head
        report = verify(r)
        assert report.ok, report.problems
        for name, want in model.items():
            assert same(r.read_tensor(name), want), name




def test_init_on_a_full_disk_leaves_nothing(small_fs, tmp_path):
    ckpt = tmp_path / "m.npz"
    np.savez(ckpt, **small_model(1))
    fill(small_fs, 256 << 10)
    proc = run_cli("init", small_fs / "r", "--from", ckpt)
    assert_clean_storage_error(proc)
    assert sorted(os.listdir(small_fs)) == ["filler"]  # no replica, no staging directory


def test_commit_on_a_full_disk_fails_cleanly_and_changes_nothing(small_fs, tmp_path):
    model = small_model(2)
    path = small_fs / "r"
    Replica.init(path, model, bucket_rows=256).close()
    new = {k: (v + 1).astype(v.dtype) for k, v in model.items()}  # every row: a ~2 MiB record
    np.savez(tmp_path / "next.npz", **new)
    fill(small_fs, 64 << 10)
    proc = run_cli("commit", path, "--from", tmp_path / "next.npz")
    assert_unchanged(path, model, 0)
    assert_clean_storage_error(proc)


def test_sync_into_a_full_disk_fails_cleanly_and_changes_nothing(small_fs, tmp_path):
    model = small_model(3)
    src, dst = tmp_path / "src", small_fs / "dst"
    Replica.init(src, model, bucket_rows=256).close()
    assert run_cli("sync", src, dst).returncode == 0
    with Replica.open(src) as r:
        r.commit({"emb": (np.arange(4096), model["emb"] + 1)})
    fill(small_fs, 64 << 10)
    proc = run_cli("sync", src, dst)
    assert_unchanged(dst, model, 0)
    assert_clean_storage_error(proc)


def test_first_sync_into_a_full_disk_fails_cleanly(small_fs, tmp_path):
    model = small_model(4)
    src = tmp_path / "src"
    Replica.init(src, model, bucket_rows=256).close()
    fill(small_fs, 256 << 10)
    proc = run_cli("sync", src, small_fs / "dst")
    assert_clean_storage_error(proc)
    assert not (small_fs / "dst").exists()  # never a partial replica under its name
    os.unlink(small_fs / "filler")
    assert run_cli("sync", src, small_fs / "dst").returncode == 0  # space back: it resumes and completes
    assert_unchanged(small_fs / "dst", model, 0)


def test_first_sync_with_room_for_the_snapshot_but_not_the_replica(small_fs, tmp_path):
    """The snapshot arrives, its copy into the tensor files does not fit: exit 12 (not an internal error),
    the copies are removed so the disk is not left fuller, the message names what stays, and the next
    run, with space back, completes from the snapshot already received without fetching it again."""
    model = small_model(7)
    src = tmp_path / "src"
    Replica.init(src, model, bucket_rows=256).close()
    nbytes = sum(v.nbytes for v in model.values())
    fill(small_fs, int(nbytes * 1.6))
    proc = run_cli("sync", src, small_fs / "dst", "--json")
    assert_clean_storage_error(proc)
    staging = small_fs / ".dst.deltalog-sync"
    assert str(staging) in proc.stderr and "run the sync again" in proc.stderr
    assert not (small_fs / "dst").exists() and not (staging / "tensors").exists()
    os.unlink(small_fs / "filler")
    proc = run_cli("sync", src, small_fs / "dst", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["created"] and out["bytes_sent"] < nbytes / 10  # resumed: the snapshot was not sent again
    assert_unchanged(small_fs / "dst", model, 0)
    assert not staging.exists()


def test_compact_on_a_full_disk_fails_cleanly_and_changes_nothing(small_fs):
    model = small_model(5)
    path = small_fs / "r"
    with Replica.init(path, model, bucket_rows=256) as r:
        r.commit({"bias": ([1, 2], np.array([5.0, 6.0], np.float32))})
    model["bias"][1:3] = [5.0, 6.0]
    fill(small_fs, 256 << 10)
    proc = run_cli("compact", path)
    assert_clean_storage_error(proc)
    assert_unchanged(path, model, 1)
    with Replica.open(path) as r:
        assert r.oldest_offset == 0


@pytest.mark.parametrize("how", ["--in-place", "--out"])
def test_replay_on_a_full_disk_is_a_storage_error(small_fs, how):
    model = small_model(6)
    path = small_fs / "r"
    Replica.init(path, model, bucket_rows=256).close()
    with open(path / "tensors" / "00001.bin", "r+b") as f:  # 'emb': damaged, so --in-place must rebuild it
        f.write(b"\xff" * 8)
    fill(small_fs, 64 << 10)
    args = ["--in-place"] if how == "--in-place" else ["--out", small_fs / "out.npz"]
    proc = run_cli("replay", path, *args)
    assert not [n for n in os.listdir(path / "tensors") if n.endswith(".replay-tmp")]
    assert_clean_storage_error(proc)


def test_init_removes_only_staging_directories_of_dead_inits(tmp_path):
    """A staging directory is removed when its init is gone: never one whose pid lives or whose lock is held."""
    from deltalog.lock import WriterLock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    live_pid = os.getppid()
    for pid in (dead.pid, live_pid, 4242424):
        (tmp_path / f".r.init-{pid}" / "tensors").mkdir(parents=True)
    held = WriterLock(str(tmp_path / ".r.init-4242424"))  # a dead-looking pid, but its lock is held
    held.acquire()
    try:
        Replica.init(tmp_path / "r", {"a": np.zeros(3, np.float32)}).close()
    finally:
        held.release()
    left = sorted(p.name for p in tmp_path.glob(".r.init-*"))
    assert left == sorted([f".r.init-{live_pid}", ".r.init-4242424"])
