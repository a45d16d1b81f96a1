"""Corruption: damaged bytes are named by `verify` (exit 5) and never become wrong numbers.

Damage is done to copies of one small replica whose model at every offset
is kept aside: bytes flipped and files truncated in the LMDB data file (at
targeted structures and at seeded random places), in the live tensor files,
in the snapshot files, and in one record rewritten through the store API.

Then a battery of commands runs against the damaged copy in a child process
(LMDB does not checksum its pages, so damaged pages can crash the process
that reads them: never in the test runner). Each command must either work
EXACTLY (its numbers, checkpoints and destinations compared with the kept
states) or fail cleanly: a documented exit code, one line on stderr, no
traceback, no death by a signal. Where bytes are damaged in a place nothing
reads (LMDB free pages) every command may simply work.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import REPO, apply_update, bits, random_model, random_update, run_cli
from record_layout import v2_spans

from deltalog import Replica
from deltalog import record as rec
from deltalog.checkpoint import read_checkpoint
from deltalog.errors import EXIT_CODES
from deltalog.verify import verify

MODEL_ID = "corruption-test-model"
HEAD = 11
LOW = 3  # the older side of diff and the rollback target

# Runs each JSON argv line through the CLI's single entry point in one
# interpreter (one start-up for the whole battery) and prints one JSON
# line per command as soon as it ends, so a crash names its command.
_BATTERY = r"""
import contextlib, io, json, sys
from deltalog.cli import main
for line in sys.stdin:
    argv = json.loads(line)
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    print(json.dumps({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}), flush=True)
"""


@dataclass
class Outcome:
    argv: list[str]
    code: int  # negative: killed by that signal
    stdout: str
    stderr: str

    @property
    def name(self) -> str:
        return self.argv[0]

    def json(self) -> dict:
        return json.loads(self.stdout)


def run_battery(commands: list[list[str]], timeout: float = 120) -> list[Outcome]:
    """Run the commands in order in one child; a command the child died in gets the signal as its code."""
    proc = subprocess.run(
        [sys.executable, "-c", _BATTERY], input="".join(json.dumps(c) + "\n" for c in commands),
        capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False,
    )
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    outcomes = [Outcome(c, r["code"] or 0, r["stdout"], r["stderr"]) for c, r in zip(commands, results)]
    if len(outcomes) < len(commands):  # the child died mid-command
        outcomes.append(Outcome(commands[len(outcomes)], proc.returncode, "", proc.stderr[-2000:]))
    return outcomes


# -- the template replica and its states ------------------------------------------------------


@dataclass
class Template:
    path: str
    states: dict[int, dict[str, np.ndarray]]
    infos: list  # TensorInfo, in id order


def copy_states(model):
    return {k: np.array(v) for k, v in model.items()}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Template:
    root = tmp_path_factory.mktemp("corruption")
    rng = np.random.default_rng(20240607)
    model = random_model(rng, rows=300)
    path = str(root / "template")
    states = {0: copy_states(model)}
    with Replica.init(path, model, bucket_rows=16, model_id=MODEL_ID) as r:
        while r.head < HEAD:
            update = random_update(rng, model)
            before = r.head
            offset = r.commit(update)
            apply_update(model, update)
            if offset != before:
                states[offset] = copy_states(model)
        infos = r.tensors
    return Template(path, states, infos)


def damaged_copy(template: Template, tmp_path, name: str = "damaged") -> str:
    path = str(tmp_path / name)
    shutil.copytree(template.path, path)
    return path


def flip(path: str, position: int, mask: int = 0x5A) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def raw_tensors(path: str, infos) -> dict[str, np.ndarray]:
    """The live tensor files read straight from disk (no LMDB: safe on a damaged log)."""
    out = {}
    for info in infos:
        flat = np.fromfile(os.path.join(path, "tensors", info.file), dtype=info.storage)
        out[info.name] = flat.reshape(info.shape)
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(bits(a), bits(b))


def expected_diff(template: Template, lo: int, hi: int) -> dict[str, int]:
    a, b = template.states[lo], template.states[hi]
    out = {}
    for name in a:
        rows = a[name].shape[0] if a[name].ndim else 1
        differs = np.any(bits(a[name]).reshape(rows, -1) != bits(b[name]).reshape(rows, -1), axis=1)
        out[name] = int(differs.sum())
    return out


# -- the battery and its judge --------------------------------------------------------------------


def battery_commands(path: str, scratch) -> list[list[str]]:
    return [
        ["verify", path, "--json"],
        ["status", path, "--json"],
        ["diff", f"{path}@{LOW}", path, "--json"],
        ["replay", path, "--to", str(HEAD), "--out", str(scratch / "replayed.npz"), "--json"],
        ["sync", path, str(scratch / "dst"), "--json"],
        ["rollback", path, "--to", str(LOW), "--json"],  # the only writer: last
    ]


def judge(template: Template, path: str, scratch, outcomes: list[Outcome]) -> tuple[list[str], list[str]]:
    """(wrong data, unclean failures) in the battery's outcomes."""
    wrong, unclean = [], []
    documented = set(EXIT_CODES) - {20}  # 20 is "internal error: a bug"
    for o in outcomes:
        tag = f"{o.name} exit {o.code}"
        if o.code < 0:
            unclean.append(f"{tag}: killed by signal {-o.code}")
            continue
        if "Traceback" in o.stderr:
            unclean.append(f"{tag}: traceback")
        if o.name == "verify" and o.code == 5 and not o.stderr:  # --json: the problems are on stdout
            if o.json()["ok"] or not o.json()["problems"]:
                unclean.append(f"{tag}: no problems named: {o.stdout[:300]!r}")
            continue
        if o.code not in (0, 1):
            lines = [ln for ln in o.stderr.splitlines() if not ln.startswith("damaged: ")]
            if o.code not in documented or len(lines) != 1 or not lines[0].startswith("deltalog: error: "):
                unclean.append(f"{tag}: {o.stderr.strip()[-300:]!r}")
            continue
        # It worked: then it must be exact.
        if o.name == "status" and o.json()["head"] != HEAD:
            wrong.append(f"status reports head {o.json()['head']}, the replica holds the model at {HEAD}")
        elif o.name == "diff":
            data = o.json()
            got = {t["name"]: t["changed_rows"] for t in data["tensors"]}
            want = expected_diff(template, LOW, HEAD)
            if (data["a_offset"], data["b_offset"]) != (LOW, HEAD) or got != want:
                wrong.append(f"diff {data['a_offset']}->{data['b_offset']} changed rows {got}, truth {LOW}->{HEAD} {want}")
        elif o.name == "replay":
            ckpt = read_checkpoint(str(scratch / "replayed.npz"))
            bad = [n for n, a in template.states[HEAD].items() if not same(np.asarray(ckpt[n].array), a)]
            if bad:
                wrong.append(f"replay --out wrote wrong values for {bad}")
        elif o.name == "sync":
            with Replica.open(str(scratch / "dst")) as d:
                truth = template.states.get(d.head)
                bad = [n for n in d.tensor_names if truth is None or not same(d.read_tensor(n), truth[n])]
                if d.head != HEAD or bad:
                    wrong.append(f"sync made a destination at head {d.head} whose tensors {bad} are not the model at it")
        elif o.name == "rollback":
            data = o.json()
            files = raw_tensors(path, template.infos)
            bad = [n for n, a in template.states[LOW].items() if not same(files[n], a)]
            if data["target"] != LOW or data["offset"] != HEAD + 1 or bad:
                wrong.append(f"rollback to {LOW} reported {data} and left tensors {bad} differing from offset {LOW}")
        elif o.name == "verify" and not o.json()["ok"]:
            wrong.append("verify exited 0 but reported problems")
    return wrong, unclean


def assert_battery(template: Template, path: str, scratch, verify_must_fail: bool = True) -> list[Outcome]:
    outcomes = run_battery(battery_commands(path, scratch))
    wrong, unclean = judge(template, path, scratch, outcomes)
    assert not wrong, "WRONG DATA: " + "; ".join(wrong)
    assert not unclean, "unclean failure: " + "; ".join(unclean)
    if verify_must_fail:
        assert outcomes[0].code == 5, f"verify did not notice: {outcomes[0].stdout[:300]}"
    return outcomes


# -- LMDB data.mdb: targeted structures ----------------------------------------------------------------

PSIZE = 4096
P_BRANCH, P_LEAF = 0x01, 0x02


def _data_mdb(path: str) -> str:
    return os.path.join(path, "log", "data.mdb")


def _all(data: bytes, needle: bytes) -> list[int]:
    found, start = [], 0
    while (i := data.find(needle, start)) >= 0:
        found.append(i)
        start = i + 1
    return found


def damage_meta_page_magic(path: str) -> None:
    """Both LMDB meta pages lose their magic: the environment cannot be opened at all."""
    for page in (0, 1):
        flip(_data_mdb(path), page * PSIZE + 16)


def damage_one_meta_page(path: str) -> None:
    """Only the meta page LMDB would pick (the newer txn); it falls back to the other one or refuses."""
    flip(_data_mdb(path), 16)


def damage_db_catalog(path: str) -> None:
    """The main DB page that names the four named databases (LMDB's catalog)."""
    with open(_data_mdb(path), "rb") as f:
        data = f.read()
    page = data.find(b"snapshots", 2 * PSIZE) // PSIZE  # the catalog leaf holds the names as keys
    flip(_data_mdb(path), page * PSIZE + 16)


def damage_record_pages_type(path: str) -> None:
    """Every leaf page holding record blobs claims to be a branch page: LMDB says MDB_CORRUPTED."""
    with open(_data_mdb(path), "r+b") as f:
        data = f.read()
        pages = {i // PSIZE for i in _all(data, b"DLRC")}
        for page in sorted(pages - {0, 1}):
            content = data[page * PSIZE : (page + 1) * PSIZE]
            if b"snapshots" in content or b"bucket_rows" in content:
                continue  # maybe the catalog or meta leaf (pages are not zeroed: stale bytes linger)
            flags = int.from_bytes(data[page * PSIZE + 10 : page * PSIZE + 12], "little")
            if flags & P_LEAF:
                f.seek(page * PSIZE + 10)
                f.write(((flags & ~P_LEAF) | P_BRANCH).to_bytes(2, "little"))


def damage_state_head(path: str) -> None:
    """meta/state's msgpack 'head' says one less (every copy, live and stale): still decodable."""
    with open(_data_mdb(path), "r+b") as f:
        data = f.read()
        for i in _all(data, b"\xa4head"):
            value = data[i + 5]
            if value == HEAD:  # a positive fixint
                f.seek(i + 5)
                f.write(bytes([HEAD - 1]))


def damage_model_meta(path: str) -> None:
    """meta/model's first tensor loses its 'dtype' key (renamed): still decodable msgpack."""
    with open(_data_mdb(path), "r+b") as f:
        data = f.read()
        for i in _all(data, b"\xabbucket_rows"):
            j = data.find(b"\xa5dtype", i)
            f.seek(j + 5)
            f.write(b"f")


def damage_snapshot_registry(path: str) -> None:
    """The xxh3 digests in the LMDB snapshot registry (not the files) no longer match."""
    with open(_data_mdb(path), "r+b") as f:
        data = f.read()
        for i in _all(data, b"\xa4xxh3"):
            f.seek(i + 7)  # key, then the str8 header of the hex digest: its first hex digit
            digit = data[i + 7 : i + 8]
            f.write(b"0" if digit != b"0" else b"1")


def damage_bucket_index(path: str) -> None:
    """One bucket's version in the index says it was last written long ago (via the store API)."""
    with Replica.open(path) as r:
        info = r.info("item_emb")
        bucket, (version, sig) = max(r.bucket_index("item_emb").items(), key=lambda kv: kv[1][0])
        assert version > LOW
        r.store.write(lambda txn: r.store.put_bucket(txn, info.id, bucket, 1, sig))


def damage_truncate_log(fraction: float):
    def damage(path: str) -> None:
        size = os.path.getsize(_data_mdb(path))
        os.truncate(_data_mdb(path), int(size * fraction) // PSIZE * PSIZE)

    damage.__name__ = f"truncate_log_{fraction}"
    return damage


def damage_truncate_log_to(size: int):
    def damage(path: str) -> None:
        os.truncate(_data_mdb(path), size)

    return damage


@pytest.mark.parametrize(
    "damage, verify_must_fail",
    [
        pytest.param(damage_meta_page_magic, True, id="both-meta-pages"),
        pytest.param(damage_one_meta_page, False, id="newest-meta-page"),
        pytest.param(damage_db_catalog, True, id="db-catalog"),
        pytest.param(damage_snapshot_registry, True, id="snapshot-registry"),
        pytest.param(damage_truncate_log_to(0), True, id="log-truncated-to-0"),
        pytest.param(damage_truncate_log_to(100), True, id="log-truncated-to-100"),
        pytest.param(damage_record_pages_type, True, id="record-pages-type"),
        pytest.param(damage_truncate_log(0.5), True, id="log-truncated-half"),
        pytest.param(damage_model_meta, True, id="model-meta"),
        pytest.param(damage_state_head, True, id="state-head"),
        # diff takes the changed rows from the (checksummed) log when it covers the range,
        # so a damaged bucket version can no longer hide a bucket's rows; verify names it.
        pytest.param(damage_bucket_index, True, id="bucket-index"),
    ],
)
def test_damaged_log_structures(template, tmp_path, damage, verify_must_fail):
    path = damaged_copy(template, tmp_path)
    damage(path)
    assert_battery(template, path, tmp_path, verify_must_fail=verify_must_fail)


def test_flipped_bytes_anywhere_in_the_log_never_give_wrong_data(template, tmp_path):
    """Seeded random flips over the whole data file (free pages included): exact results or a refusal.

    Clean failure is pinned by the targeted cases above (some of them are
    known bugs), so here only crashes by a signal and wrong numbers fail.
    """
    size = os.path.getsize(_data_mdb(template.path))
    rng = np.random.default_rng(5)
    positions = sorted(int(p) for p in rng.integers(2 * PSIZE, size, 6))
    report = []
    for n, position in enumerate(positions):
        scratch = tmp_path / f"case{n}"
        scratch.mkdir()
        path = damaged_copy(template, scratch)
        flip(_data_mdb(path), position)
        outcomes = run_battery(battery_commands(path, scratch))
        wrong, unclean = judge(template, path, scratch, outcomes)
        assert not wrong, f"flip at byte {position}: WRONG DATA: {wrong}"
        assert all(o.code >= 0 for o in outcomes), f"flip at byte {position}: {unclean}"
        report.append((position, [o.code for o in outcomes]))
        shutil.rmtree(scratch)
    print("\nflipped data.mdb bytes -> exit codes of verify/status/diff/replay/sync/rollback:")
    for position, codes in report:
        print(f"  byte {position:6d} (page {position // PSIZE:3d}): {codes}")


# -- one record, rewritten through the store API -------------------------------------------------------


def _first_writer_after(path: str, low: int, offset: int, name: str) -> bool:
    """Whether record ``offset`` is the first record after ``low`` to write some row of ``name``:
    then the values at ``low`` of that row are the undo values of that record."""
    with Replica.open(path) as r:
        earlier, mine = set(), set()
        for o in range(low + 1, offset + 1):
            for t in rec.decode(r.record_blob(o), rows_only=True).tensors:
                if t.name == name:
                    (mine if o == offset else earlier).update(t.rows.tolist())
    return bool(mine - earlier)


@pytest.mark.parametrize("part", ["header", "index", "new", "old"])
def test_record_with_a_flipped_byte(template, tmp_path, part):
    """verify names the record; a command refuses exactly when it reads the damaged bytes; the others stay exact.

    A record (encoding v2) checks its header and then each section as it is
    read: a damaged value section does not stop what needs only the rows
    (sync sends the head's values), and damaged undo values do not stop
    what needs only the new ones (replay).
    """
    path = damaged_copy(template, tmp_path)
    bad = 6
    with Replica.open(path) as r:
        blob = bytearray(r.record_blob(bad))
        assert blob[4:6] == b"\x00\x02"
        header_span, sections = v2_spans(blob)
        name = max((n for n, key in sections if key == "new"), key=lambda n: sections[(n, "new")][1] - sections[(n, "new")][0])
        start, stop = header_span if part == "header" else sections[(name, part)]
        blob[(start + stop) // 2] ^= 0x10

        def rewrite(txn):
            txn.put(bytes.fromhex(f"{bad:016x}"), bytes(blob), db=r.store.dbs["records"])

        r.store.write(rewrite)
    outcomes = run_battery([
        ["verify", path],
        ["diff", f"{path}@{LOW}", path, "--json"],  # (3, 11] holds record 6
        ["sync", path, str(tmp_path / "dst"), "--json"],
        ["replay", path, "--to", str(HEAD), "--out", str(tmp_path / "late.npz")],
        ["replay", path, "--to", str(bad - 1), "--out", str(tmp_path / "early.npz"), "--json"],
        ["diff", f"{path}@{bad}", path, "--json"],  # needs only records after 6
        ["rollback", path, "--to", str(LOW)],
        ["replay", path, "--in-place"],
    ])
    codes = [o.code for o in outcomes]
    # diff and rollback need the values at 3, here the undo values of record 6 (new and old: old is
    # stored XORed with new); replay needs the new values; sync, only rows and the head's values.
    assert _first_writer_after(template.path, LOW, bad, name)
    want = {
        "header": [5, 5, 5, 5, 0, 1, 5, 5],  # every reader of record 6 needs these bytes
        "index": [5, 5, 5, 5, 0, 1, 5, 5],
        "new": [5, 5, 0, 5, 0, 1, 5, 5],
        "old": [5, 5, 0, 0, 0, 1, 5, 0],
    }[part]
    assert codes == want, [(o.argv[0], o.code, o.stderr) for o in outcomes]
    assert f"record {bad}: " in outcomes[0].stderr and "checksum mismatch" in outcomes[0].stderr
    for o in outcomes:
        assert "Traceback" not in o.stderr
        if o.code == 5 and o.name != "verify":
            assert o.stderr.count("\n") == 1 and f"record {bad}" in o.stderr, o.stderr
    early = read_checkpoint(str(tmp_path / "early.npz"))
    for tensor, want_values in template.states[bad - 1].items():
        assert same(np.asarray(early[tensor].array), want_values), tensor
    if outcomes[3].code == 0:
        replayed = read_checkpoint(str(tmp_path / "late.npz"))
        assert all(same(np.asarray(replayed[n].array), a) for n, a in template.states[HEAD].items())
    late = outcomes[5].json()
    assert {t["name"]: t["changed_rows"] for t in late["tensors"]} == expected_diff(template, bad, HEAD)
    if outcomes[1].code == 1:
        got = {t["name"]: t["changed_rows"] for t in outcomes[1].json()["tensors"]}
        assert got == expected_diff(template, LOW, HEAD)
    if (tmp_path / "dst").exists():  # exact at whatever head it reached (0 when the sync stopped after the snapshot)
        with Replica.open(tmp_path / "dst") as d:
            assert d.head == (HEAD if outcomes[2].code == 0 else 0) and verify(d).ok
            assert all(same(d.read_tensor(n), a) for n, a in template.states[d.head].items())
    files = raw_tensors(path, template.infos)  # nothing was written: still the model at the head
    assert all(same(files[n], a) for n, a in template.states[HEAD].items())


# -- live tensor files -----------------------------------------------------------------------------------


def _tensor_file(path: str, template: Template, name: str) -> str:
    info = next(i for i in template.infos if i.name == name)
    return os.path.join(path, "tensors", info.file)


@pytest.mark.parametrize("how", ["truncated", "missing", "grown"])
def test_tensor_file_of_the_wrong_size_is_refused_and_repaired(template, tmp_path, how):
    path = damaged_copy(template, tmp_path)
    target = _tensor_file(path, template, "item_emb")
    if how == "truncated":
        os.truncate(target, os.path.getsize(target) - 5)
    elif how == "missing":
        os.unlink(target)
    else:
        with open(target, "ab") as f:
            f.write(b"\0" * 64)
    outcomes = assert_battery(template, path, tmp_path)
    assert "item_emb" in outcomes[0].stdout
    assert outcomes[3].code == 0  # replay never reads the live files: exact (checked by the judge)
    assert [o.code for o in outcomes[1:]].count(5) >= 2  # diff and sync needed the file and refused
    repaired = run_cli("replay", path, "--in-place", "--json")
    assert repaired.returncode == 0, repaired.stderr
    assert json.loads(repaired.stdout)["repaired"] == ["item_emb"]
    with Replica.open(path) as r:
        assert verify(r).ok
        for name, want in template.states[HEAD].items():
            assert same(r.read_tensor(name), want), name


def test_every_tensor_file_damaged_differently_is_named_and_repaired(template, tmp_path):
    """One verify names each damaged tensor; one replay --in-place repairs them all (CLI)."""
    path = damaged_copy(template, tmp_path)
    damage = {"item_emb": "flip", "user_emb": "truncate", "dense": "delete", "bias": "zero", "ids": "flip"}
    for name, how in damage.items():
        target = _tensor_file(path, template, name)
        if how == "flip":
            flip(target, os.path.getsize(target) // 2)
        elif how == "truncate":
            os.truncate(target, 3)
        elif how == "delete":
            os.unlink(target)
        else:
            size = os.path.getsize(target)
            with open(target, "r+b") as f:
                f.write(b"\0" * size)
    proc = run_cli("verify", path)
    assert proc.returncode == 5 and "Traceback" not in proc.stderr
    for name in damage:
        assert f"'{name}'" in proc.stderr, (name, proc.stderr)
    assert "'step'" not in proc.stderr  # the intact one is not blamed
    assert proc.stderr.strip().splitlines()[-1].startswith("deltalog: error: ")
    proc = run_cli("replay", path, "--in-place", "--json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(proc.stdout)["repaired"]) == sorted(damage)
    assert not [n for n in os.listdir(os.path.join(path, "tensors")) if n.endswith(".replay-tmp")]
    proc = run_cli("verify", path, "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["ok"], proc.stdout
    files = raw_tensors(path, template.infos)
    for name, want in template.states[HEAD].items():
        assert same(files[name], want), name


def _rot_a_row_sync_will_send(template: Template, path: str) -> tuple[str, int]:
    """Flip a byte of a row written after LOW (a row sync and diff will read) in the live file."""
    name = "item_emb"
    a, b = template.states[LOW][name], template.states[HEAD][name]
    row = int(np.flatnonzero(np.any(bits(a) != bits(b), axis=1))[0])
    info = next(i for i in template.infos if i.name == name)
    flip(_tensor_file(path, template, name), row * info.row_bytes + 3, 0x01)  # an exponent bit: x4 or /4
    return name, row


def test_bit_rot_in_a_live_tensor_file_is_found_by_verify_and_repaired(template, tmp_path):
    path = damaged_copy(template, tmp_path)
    name, row = _rot_a_row_sync_will_send(template, path)
    proc = run_cli("verify", path)
    assert proc.returncode == 5 and f"tensor '{name}': 1 rows differ" in proc.stderr and f"row {row}" in proc.stderr
    out = tmp_path / "exported.npz"
    assert run_cli("replay", path, "--out", out).returncode == 0  # the log is intact: the export is exact
    ckpt = read_checkpoint(str(out))
    assert all(same(np.asarray(ckpt[n].array), a) for n, a in template.states[HEAD].items())
    assert run_cli("replay", path, "--in-place").returncode == 0
    assert run_cli("verify", path).returncode == 0


def test_sync_never_ships_a_bit_rotted_row(template, tmp_path):
    """The source reads its rows through Replica.read_rows, which checks them against their row digests."""
    path = damaged_copy(template, tmp_path)
    name, row = _rot_a_row_sync_will_send(template, path)
    dst = tmp_path / "dst"
    proc = run_cli("sync", path, dst)
    if proc.returncode == 0:  # the damaged row would have been shipped silently: say what arrived
        with Replica.open(dst) as d:
            assert same(d.read_tensor(name)[row], template.states[HEAD][name][row]), "the damaged row was shipped"
    # The source reads the row to ship it: its digest must catch the damage (exit 5, the row named).
    assert proc.returncode == 5 and "Traceback" not in proc.stderr, proc.stderr
    assert f"tensor '{name}' row {row}" in proc.stderr and "replay" in proc.stderr and "--in-place" in proc.stderr
    assert run_cli("replay", path, "--in-place").returncode == 0  # the hint's repair, then the sync works
    assert run_cli("sync", path, dst).returncode == 0
    with Replica.open(dst) as d:
        assert same(d.read_tensor(name), template.states[HEAD][name])


def test_diff_never_reports_a_bit_rotted_row(template, tmp_path):
    """diff reads the head's rows through Replica.read_rows: the damaged row fails its digest (exit 5, named)."""
    path = damaged_copy(template, tmp_path)
    name, row = _rot_a_row_sync_will_send(template, path)
    outcomes = run_battery([["diff", f"{path}@{LOW}", path, "--json"]])
    wrong, unclean = judge(template, path, tmp_path, outcomes)
    assert not wrong and not unclean, (wrong, unclean)
    # diff reads the damaged row at the head: its digest must catch it (exit 5, the row and the repair named)
    assert outcomes[0].code == 5, outcomes[0]
    error = outcomes[0].json()["error"]
    assert f"tensor '{name}' row {row}" in error["message"] and "--in-place" in error["hint"], error
    assert run_cli("replay", path, "--in-place").returncode == 0
    outcomes = run_battery([["diff", f"{path}@{LOW}", path, "--json"]])  # repaired: now it must work exactly
    wrong, unclean = judge(template, path, tmp_path, outcomes)
    assert outcomes[0].code == 1 and not wrong and not unclean, (outcomes[0], wrong, unclean)
    with Replica.open(path) as r:  # and the max_abs it reports is the true one
        data = outcomes[0].json()
        item = next(t for t in data["tensors"] if t["name"] == "item_emb")
        a = template.states[LOW]["item_emb"].astype(np.float64)
        b = template.states[HEAD]["item_emb"].astype(np.float64)
        assert item["nonfinite_rows"] == 0
        assert item["l2"] == pytest.approx(float(np.sqrt(((b - a) ** 2).sum())), rel=1e-9)
        assert r.head == HEAD


# -- snapshot files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_only_snapshot(template, tmp_path, how):
    """The snapshot at 0 is the only base: replay and a new follower refuse; diff and rollback need only the log."""
    path = damaged_copy(template, tmp_path)
    snap = os.path.join(path, "snapshots", f"{0:020d}", next(i for i in template.infos if i.name == "dense").file)
    if how == "flip":
        flip(snap, 5)
    else:
        os.truncate(snap, 7)
    outcomes = assert_battery(template, path, tmp_path)
    assert "snapshot 0, tensor 'dense'" in outcomes[0].stdout
    by_name = {o.name: o.code for o in outcomes}
    assert by_name["replay"] == 5 and by_name["sync"] == 5
    assert by_name["diff"] == 1 and by_name["rollback"] == 0  # worked, and the judge found them exact
    assert not (tmp_path / "dst").exists()


def test_damaged_newest_snapshot_falls_back_to_an_older_one(template, tmp_path):
    path = damaged_copy(template, tmp_path)
    with Replica.open(path) as r, r.writing():
        r.make_snapshot()  # a second snapshot, at the head
    snap_dir = os.path.join(path, "snapshots", f"{HEAD:020d}")
    for name in os.listdir(snap_dir):
        if name.endswith(".bin"):
            flip(os.path.join(snap_dir, name), 0)
    proc = run_cli("verify", path)
    assert proc.returncode == 5 and f"snapshot {HEAD}" in proc.stderr and "snapshot 0" not in proc.stderr
    out = tmp_path / "at-head.npz"
    proc = run_cli("replay", path, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["snapshots_used"] == [0]
    ckpt = read_checkpoint(str(out))
    assert all(same(np.asarray(ckpt[n].array), a) for n, a in template.states[HEAD].items())
    # a new follower is offered the newest snapshot: its checksum fails at the destination, cleanly
    proc = run_cli("sync", path, tmp_path / "dst")
    assert proc.returncode == 5 and "checksum" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "dst").exists()


def test_damaged_marker_file(template, tmp_path):
    path = damaged_copy(template, tmp_path)
    with open(os.path.join(path, "DELTALOG"), "w") as f:
        f.write("deltalog replica\nformat x\n")
    for args in (["status", path], ["verify", path], ["diff", path, path], ["sync", path, str(tmp_path / "d")]):
        proc = run_cli(*args)
        assert proc.returncode == 5 and "marker" in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)
