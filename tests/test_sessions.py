import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lola_chat.errors import LolaError, SessionLocked, SnapshotError, UsageError
from lola_chat.sessions import DEFAULT_SYSTEM_PROMPT, SessionStore
from lola_chat.storage import FORMAT_VERSION, atomic_write_bytes, validate_name

EXPECT = {"model": "smollm2-fingerprint", "chunk": "64"}


@pytest.fixture
def store(tmp_path):
    return SessionStore(tmp_path / "sessions", keep_snapshots=3)


def state_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.window_k": torch.randn(2, 3, 5, generator=g).to(torch.bfloat16),
        "layers.0.hidden": torch.randn(4, 7, generator=g),
        "layers.0.token_ids": torch.randint(0, 2**40, (9,), generator=g, dtype=torch.int64),
        "layers.1.hidden": torch.randn(7, 4, generator=g).t(),  # not contiguous on purpose
    }


def save(session, seed: int = 0, tokens: int = 100, note: str = "") -> str:
    return session.save_snapshot(state_tensors(seed), {**EXPECT, "tokens_seen": str(tokens)}, note)


def message(role: str, content: str, snapshot: str | None = None, **extra) -> dict:
    return {"type": "message", "role": role, "content": content, "snapshot": snapshot, **extra}


def folder_bytes(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["work", "Día 2", "a.b-c_d", "x" * 64])
def test_good_names_are_accepted(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "x" * 65, "a/b", "a\\b", "..", "a..b", ".hidden", "tab\there", "nl\n", "a*b", " pad", "pad "]
)
def test_bad_names_are_refused(store, name):
    with pytest.raises(UsageError) as err:
        validate_name(name)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError):
        store.create(name)


def test_create_list_rename_delete(store):
    first = store.create("first")
    assert first.system_prompt == DEFAULT_SYSTEM_PROMPT
    store.create("second", system_prompt="Be brief.")
    with pytest.raises(UsageError, match="already exists"):
        store.create("first")
    first.append(message("user", "hello"))
    assert [info.name for info in store.list()] == ["first", "second"]  # most recently used first
    info = store.list()[0]
    assert (info.messages, info.snapshots) == (1, 0) and info.nbytes > 0

    store.rename("first", "renamed")
    assert not store.exists("first") and store.exists("renamed")
    assert first.name == "renamed" and first.history()[0]["content"] == "hello"
    with pytest.raises(UsageError, match="already exists"):
        store.rename("renamed", "second")
    with pytest.raises(LolaError, match="no session named first"):
        store.open("first")

    store.delete("second")
    assert [info.name for info in store.list()] == ["renamed"]
    assert sorted(p.name for p in store.root.iterdir()) == ["renamed"]


def test_list_counts_follow_the_transcript_and_snapshots(store):
    session = store.create("s")
    session.append(message("user", "one"))
    session.append(message("assistant", "two", save(session, tokens=7)))
    session.append({"type": "undo"})
    info = store.list()[0]
    assert (info.messages, info.snapshots, info.tokens_seen) == (0, 1, 7)
    with open(session.dir / "transcript.jsonl", "ab") as f:  # an append by hand: the cache is stale
        f.write((json.dumps(message("user", "three")) + "\n").encode())
    assert store.list()[0].messages == 1


def test_snapshot_round_trip_is_bit_identical(store):
    session = store.create("s")
    original = state_tensors(1)
    snapshot_id = session.save_snapshot(original, {**EXPECT, "tokens_seen": "4242"}, note="after turn 1")
    assert snapshot_id == "000001"
    tensors, meta = session.load_snapshot(EXPECT)
    assert sorted(tensors) == sorted(original)
    for name, t in original.items():
        assert tensors[name].dtype == t.dtype and tensors[name].device.type == "cpu"
        assert torch.equal(tensors[name], t)
        assert (
            tensors[name].view(torch.uint8).numpy().tobytes()
            == t.contiguous().view(torch.uint8).numpy().tobytes()
        )
    assert meta["model"] == EXPECT["model"] and meta["tokens_seen"] == "4242"
    assert meta["format_version"] == str(FORMAT_VERSION) and len(meta["sha256"]) == 64
    info = session.latest_snapshot()
    assert (info.id, info.tokens_seen, info.note) == ("000001", 4242, "after turn 1")
    assert info.nbytes == info.path.stat().st_size


def test_snapshot_metadata_must_be_strings(store):
    session = store.create("s")
    with pytest.raises(ValueError):
        session.save_snapshot(state_tensors(), {"tokens_seen": 5})
    with pytest.raises(ValueError):
        session.save_snapshot(state_tensors(), {"sha256": "x"})


def test_keeps_the_last_snapshots(store):
    session = store.create("s")
    ids = [save(session, seed=i, tokens=i) for i in range(5)]
    assert ids == [f"{i:06d}" for i in range(1, 6)]
    assert [s.id for s in session.snapshots()] == ids[-3:]
    assert not any(p.name.startswith(".") for p in (session.dir / "snapshots").iterdir())


def test_restore_is_loaded_and_survives_until_superseded(store):
    session = store.create("s")
    ids = [save(session, seed=i, tokens=10 * i) for i in range(3)]
    session.restore("1")
    tensors, meta = session.load_snapshot(EXPECT)
    assert meta["tokens_seen"] == "0" and torch.equal(
        tensors["layers.0.hidden"], state_tensors(0)["layers.0.hidden"]
    )
    assert store.list()[0].tokens_seen == 0
    assert session.records()[-1] == {
        "type": "restore",
        "snapshot": ids[0],
        "time": session.records()[-1]["time"],
    }
    newer = save(session, seed=9, tokens=99)
    assert session.load_snapshot(EXPECT)[1]["tokens_seen"] == "99" and newer == "000004"
    with pytest.raises(UsageError, match="no snapshot 000042"):
        session.restore("42")


def test_history_replays_undo_and_restore(store):
    session = store.create("s")
    session.append(message("user", "q1"))
    s1 = save(session)
    session.append(message("assistant", "a1", s1))
    session.append(message("user", "q2"))
    session.append(message("assistant", "a2", save(session)))
    session.append({"type": "system", "content": "new prompt"})
    session.append(message("user", "q3"))
    session.append(message("assistant", "a3", save(session), stopped=True))
    assert [m["content"] for m in session.history()] == ["q1", "a1", "q2", "a2", "q3", "a3"]
    session.append({"type": "undo"})
    assert [m["content"] for m in session.history()] == ["q1", "a1", "q2", "a2"]
    session.restore(s1)
    assert [m["content"] for m in session.history()] == ["q1", "a1"]
    session.append(message("user", "q4"))
    assert [m["content"] for m in session.history()] == ["q1", "a1", "q4"]
    assert len(session.records()) == 10


def test_export(store):
    session = store.create("chat")
    session.append(message("user", "hi"))
    session.append(message("assistant", "hel", save(session), stopped=True))
    assert session.export("markdown") == "# chat\n\n**User:** hi\n\n**Assistant:** hel *(stopped)*\n\n"
    lines = [json.loads(line) for line in session.export("jsonl").splitlines()]
    assert [m["content"] for m in lines] == ["hi", "hel"]
    with pytest.raises(UsageError):
        session.export("pdf")


def test_torn_last_line_is_ignored_then_cut_by_the_next_append(store):
    session = store.create("s")
    session.append(message("user", "kept"))
    path = session.dir / "transcript.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"type": "message", "role": "assistant", "cont')
    torn = path.read_bytes()
    assert [m["content"] for m in session.history()] == ["kept"]
    assert path.read_bytes() == torn
    session.append(message("assistant", "after crash"))
    assert [m["content"] for m in session.history()] == ["kept", "after crash"]


def test_damaged_middle_line_is_reported(store):
    session = store.create("s")
    path = session.dir / "transcript.jsonl"
    path.write_bytes(b'{"type": "undo"}\nnot json\n{"type": "undo"}\n')
    with pytest.raises(LolaError, match="line 2"):
        session.records()


def test_branch_copies_snapshot_and_history(store):
    source = store.create("source", system_prompt="Pirate.")
    source.update_settings(temperature=0.2)
    source.append(message("user", "q1"))
    s1 = save(source, seed=1)
    source.append(message("assistant", "a1", s1))
    source.append(message("user", "q2"))
    source.append(message("assistant", "a2", save(source, seed=2)))

    branch = store.branch("source", "fork", s1)
    assert [m["content"] for m in branch.history()] == ["q1", "a1"]
    assert (branch.system_prompt, branch.settings) == ("Pirate.", {"temperature": 0.2})
    assert branch.latest_snapshot().path.read_bytes() == source._snapshot_path(s1).read_bytes()
    tensors, _ = branch.load_snapshot(EXPECT)
    assert torch.equal(tensors["layers.0.hidden"], state_tensors(1)["layers.0.hidden"])
    assert save(branch) == "000002"
    assert len(source.history()) == 4

    latest = store.branch("source", "fork2")
    assert len(latest.history()) == 4
    with pytest.raises(UsageError):
        store.branch("source", "fork")


def test_branch_refuses_a_damaged_snapshot(store):
    source = store.create("source")
    path = source._snapshot_path(save(source))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError):
        store.branch("source", "fork")
    assert not store.exists("fork")
    assert sorted(p.name for p in store.root.iterdir()) == ["source"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-10])


def _flip_data_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def _rewrite_metadata(path, **changes):
    """Re-save the same tensors with changed metadata, keeping the sha256 entry of the original."""
    from safetensors import safe_open
    from safetensors.torch import save as st_save

    with safe_open(path, "pt") as f:
        metadata = {**f.metadata(), **changes}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    path.write_bytes(st_save(tensors, metadata))


def _tampered_metadata(path):
    _rewrite_metadata(path, model="another-model")


def _newer_format(path):
    _rewrite_metadata(path, format_version=str(FORMAT_VERSION + 1))


def _delete(path):
    path.unlink()


@pytest.mark.parametrize(
    "damage, words",
    [
        (_truncate, "is damaged"),
        (_flip_data_byte, "sha256 mismatch"),
        (_tampered_metadata, "sha256 mismatch"),
        (_newer_format, "upgrade lola-chat"),
        (_delete, "is missing"),
    ],
)
def test_bad_snapshot_is_refused_and_left_untouched(store, damage, words):
    session = store.create("s")
    session.append(message("user", "q"))
    snapshot_id = save(session)
    damage(session._snapshot_path(snapshot_id))
    before = folder_bytes(session.dir)
    with pytest.raises(SnapshotError) as err:
        session.load_snapshot(EXPECT)
    message_text = str(err.value)
    assert words in message_text and "\n" not in message_text and f"snapshot {snapshot_id}" in message_text
    assert folder_bytes(session.dir) == before
    with pytest.raises(SnapshotError):
        session.load_snapshot(EXPECT, snapshot_id)
    assert folder_bytes(session.dir) == before


def test_mismatching_expectation_names_the_key(store):
    session = store.create("s")
    save(session)
    before = folder_bytes(session.dir)
    with pytest.raises(SnapshotError, match=r"different chunk \(64 != 128\)") as err:
        session.load_snapshot({**EXPECT, "chunk": "128"})
    assert "\n" not in str(err.value)
    assert folder_bytes(session.dir) == before


def test_every_flipped_header_byte_is_refused(store):
    session = store.create("s")
    path = session._snapshot_path(save(session))
    original = path.read_bytes()
    header_end = 8 + int.from_bytes(original[:8], "little")
    for position in range(0, header_end, 7):
        data = bytearray(original)
        data[position] ^= 0x01
        path.write_bytes(bytes(data))
        before = folder_bytes(session.dir)
        with pytest.raises(SnapshotError) as err:
            session.load_snapshot(EXPECT)
        assert "\n" not in str(err.value), position
        assert folder_bytes(session.dir) == before


def test_no_snapshot_yet(store):
    session = store.create("s")
    with pytest.raises(SnapshotError, match="no snapshot yet"):
        session.load_snapshot(EXPECT)
    assert session.latest_snapshot() is None


def test_second_session_object_in_this_process_is_refused(store):
    store.create("s")
    holder, other = store.open("s"), SessionStore(store.root).open("s")
    with holder:
        holder.append(message("user", "holder writes"))
        with pytest.raises(SessionLocked, match="pid"):
            other.lock()
        with pytest.raises(SessionLocked):
            other.append(message("user", "refused"))
        store.rename("s", "t")  # the same store acts through the holder
        assert holder.name == "t"
        holder.append(message("assistant", "still writing"))
    other = store.open("t")
    other.append(message("user", "free again"))
    assert len(other.history()) == 3


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from lola_chat.sessions import SessionStore
    session = SessionStore(sys.argv[1]).open("s")
    session.lock()
    print("locked", flush=True)
    sys.stdin.read()
    """
)


@pytest.mark.parametrize("ending", ["exit", "kill"])
def test_lock_held_by_another_process(store, ending):
    session = store.create("s")
    save(session)
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(store.root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout.readline() == b"locked\n"
        with pytest.raises(SessionLocked, match=rf"another lola-chat process \(pid {child.pid}\)"):
            session.lock()
        for mutate in (
            lambda: session.append(message("user", "x")),
            lambda: save(session),
            lambda: session.restore("1"),
            lambda: session.set_system_prompt("x"),
            lambda: session.update_settings(temperature=1.0),
            lambda: store.rename("s", "t"),
            lambda: store.delete("s"),
        ):
            with pytest.raises(SessionLocked):
                mutate()
        assert store.exists("s") and session.load_snapshot(EXPECT)
    finally:
        child.kill() if ending == "kill" else child.stdin.close()
        child.wait(timeout=30)
    with session:
        session.set_system_prompt("mine now")
    assert session.system_prompt == "mine now"


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = tmp_path / "f.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two" and os.listdir(tmp_path) == ["f.json"]


def test_a_settings_mismatch_names_only_the_fields_that_differ():
    from lola_chat.snapshots import describe_difference

    theirs = '{"capacity": 128, "chunk": 64, "policy": "sre"}'
    ours = '{"capacity": 128, "chunk": 64, "normalizer": "shared", "policy": "sre"}'
    assert describe_difference(theirs, ours) == 'normalizer: null != "shared"'
    assert describe_difference("64", "128") == "64 != 128"
    assert describe_difference(None, "x") == "None != x"
