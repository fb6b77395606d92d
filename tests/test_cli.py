"""The command line on the tiny model: turns across processes, memory reports, exit codes, and damaged
snapshots refused without touching any file."""

import json

import pytest

from lola_chat import cli
from lola_chat.config import Paths
from lola_chat.sessions import SessionStore


@pytest.fixture
def tiny_cli(tiny_loaded, lola_home, monkeypatch):
    """`lola-chat` whose weights are the tiny model (each run gets the same weights, like a new process)."""
    import lola_chat.weights

    monkeypatch.setattr(lola_chat.weights, "load_model", lambda *a, **k: tiny_loaded)
    return lola_home


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def session_files(home):
    return {p: p.read_bytes() for p in sorted((home / "data").rglob("*")) if p.is_file() and p.name != "lock"}


def test_ask_twice_continues_the_same_memory(tiny_cli, capsys):
    code, out, _ = run(capsys, "ask", "--session", "t", "--max-new-tokens", "5", "hello world")
    assert code == 0 and out.endswith("\n")
    code, out, _ = run(capsys, "memory", "t", "--json")
    first = json.loads(out)["tokens_seen"]
    assert run(capsys, "ask", "--session", "t", "--max-new-tokens", "5", "what is my name?")[0] == 0
    report = json.loads(run(capsys, "memory", "t", "--json")[1])
    assert report["tokens_seen"] > first
    assert report["state_bytes"] == sum(
        layer["window_bytes"] + layer["cache_bytes"] + layer["hidden_state_bytes"]
        for layer in report["layers"]
    )


def test_the_policy_flag_chooses_the_eviction_and_names_the_known_ones(tiny_cli, capsys):
    argv = ("ask", "--session", "j", "--max-new-tokens", "3", "--policy")
    assert run(capsys, *argv, "joint-relative-novelty", "hello world")[0] == 0
    report = json.loads(run(capsys, "memory", "j", "--json", "--policy", "joint-relative-novelty")[1])
    assert report["tokens_seen"] > 0
    code, out, err = run(capsys, *argv, "bogus", "hello")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "unknown eviction policy 'bogus'" in err and "joint-relative-novelty" in err


def test_the_pooling_and_cap_flags_choose_their_settings_and_a_saved_state_opens_under_others(
    tiny_cli, capsys
):
    """The pooling, like the policy, decides only what later evictions fold, the cap only how the hidden
    state is read: a conversation saved under some opens under others and is saved with the settings it
    now runs."""
    argv = ("ask", "--session", "p", "--max-new-tokens", "3", "--policy", "joint-relative-novelty")
    assert run(capsys, *argv, "--linear-cap", "64", "hello world")[0] == 0
    assert run(capsys, *argv, "--joint-power", "4", "--joint-span", "1", "--linear-cap", "8", "again")[0] == 0
    store = SessionStore(Paths.from_env().sessions, 10)
    session = store.open("p")
    _, meta = session.load_snapshot({})
    saved = json.loads(meta["lola"])
    assert (saved["joint_power"], saved["joint_span"], saved["linear_cap"]) == (4, 1, 8)
    # The memory report names the settings it runs under.
    report = json.loads(run(capsys, "memory", "p", "--json", "--policy", "joint-relative-novelty")[1])
    assert (
        report["settings"]["policy"] == "joint-relative-novelty" and "joint_power" not in report["settings"]
    )
    text = run(capsys, "memory", "p", "--policy", "joint-relative-novelty", "--joint-power", "4")[1]
    assert "policy joint-relative-novelty" in text and "joint_power 4" in text
    code, out, err = run(capsys, *argv, "--joint-power", "0", "again")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "joint pooling power" in err
    # A pooling flag under a per-head policy would be ignored: refused, the conversation untouched.
    before = session_files(tiny_cli)
    per_head = ("ask", "--session", "p", "--policy", "relative-novelty", "--joint-span", "1", "again")
    code, out, err = run(capsys, *per_head)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--joint-span applies to a joint policy" in err and "relative-novelty" in err
    assert session_files(tiny_cli) == before


def test_no_save_leaves_the_session_unchanged(tiny_cli, capsys):
    run(capsys, "ask", "--session", "t", "--max-new-tokens", "3", "hello")
    before = session_files(tiny_cli)
    assert run(capsys, "ask", "--session", "t", "--no-save", "--max-new-tokens", "3", "again")[0] == 0
    assert session_files(tiny_cli) == before


def test_memory_bytes_are_the_same_after_short_and_long_feeds(tiny_cli, capsys, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Paris is the capital. " * 50)
    assert run(capsys, "feed", "--session", "f", str(doc))[0] == 0
    short = json.loads(run(capsys, "memory", "f", "--json")[1])
    doc.write_text("hello world, what is my name? " * 400)
    assert run(capsys, "feed", "--session", "f", str(doc))[0] == 0
    long = json.loads(run(capsys, "memory", "f", "--json")[1])
    assert long["tokens_seen"] > 4 * short["tokens_seen"]
    assert long["state_bytes"] == short["state_bytes"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_snapshot_is_refused_and_left_untouched(tiny_cli, capsys, damage):
    run(capsys, "ask", "--session", "t", "--max-new-tokens", "3", "hello")
    (snapshot,) = (tiny_cli / "data").rglob("*.safetensors")
    data = snapshot.read_bytes()
    if damage == "truncate":
        snapshot.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        snapshot.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        snapshot.unlink()
    before = session_files(tiny_cli)
    code, out, err = run(capsys, "ask", "--session", "t", "--max-new-tokens", "3", "hello again")
    assert code in (1, 2)
    assert err.count("\n") == 1 and "Traceback" not in err and "--rebuild" in err
    assert session_files(tiny_cli) == before
    assert run(capsys, "ask", "--session", "t", "--rebuild", "--max-new-tokens", "3", "hello again")[0] == 0


def test_usage_errors_exit_2(tiny_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ask", "--max-new-tokens", "-3", "x"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    code, _, err = run(capsys, "ask", "--session", "../evil", "x")
    assert code == 2 and err.count("\n") == 1
    code, _, err = run(capsys, "feed", "--session", "t", "/no/such/file")
    assert code == 2 and "no such file" in err


def test_sessions_commands(tiny_cli, capsys, tmp_path):
    run(capsys, "ask", "--session", "a", "--max-new-tokens", "3", "hello")
    code, out, _ = run(capsys, "sessions", "list")
    assert code == 0 and out.startswith("a\t")
    assert run(capsys, "sessions", "branch", "a", "b")[0] == 0
    code, out, _ = run(capsys, "sessions", "export", "b", "--format", "markdown")
    assert code == 0 and "hello" in out
    snapshot = run(capsys, "sessions", "show", "a")[1].split("snapshot ")[1].split("\t")[0]
    assert run(capsys, "sessions", "restore", "a", snapshot)[0] == 0
    assert run(capsys, "sessions", "rm", "b")[0] == 0
    code, _, err = run(capsys, "memory", "nosuch")
    assert code == 1 and "nosuch" in err


def test_paths_follow_lola_chat_home(tiny_cli, capsys):
    code, out, _ = run(capsys, "paths", "--json")
    assert code == 0 and all(v.startswith(str(tiny_cli)) for v in json.loads(out).values())


def test_version_and_help(capsys):
    for flag in ("--version", "--help"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([flag])
        assert exit_info.value.code == 0
    assert "examples" in capsys.readouterr().out
