"""The session store, directly (section 3 of dbx_repl.py): session.json written whole or not at all,
under a lock, one line per step; step records and their files; the pending create. No workspace."""

import json
import os
import signal
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dbx_repl


def new_session(steps=()):
    return {"format": dbx_repl.SESSION_FORMAT, "status": "active", "session_name": "s", "cluster_id": "c-1",
            "context_id": "ctx-1", "step_counter": len(steps), "steps": list(steps), "active_command": None}


@pytest.fixture
def project(tmp_path):
    project = dbx_repl.Project(str(tmp_path))
    project.ensure_outputs_dir()
    return project


def leftovers(directory):
    return [n for n in os.listdir(directory) if n.startswith(".tmp-")]


# -- session.json: whole, readable, one line per step ------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
STEPS = st.lists(st.fixed_dictionaries({"step": st.integers(0, 999), "tag": TEXT},
                                       optional={"status": TEXT, "note": st.none() | TEXT | st.integers(),
                                                 "defines": st.lists(TEXT, max_size=3)}), max_size=6)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=STEPS, added=STEPS, name=TEXT)
def test_what_is_saved_is_what_the_next_call_loads_with_one_line_per_step(project, first, added, name):
    writer = dbx_repl.Project(project.root)
    writer.save(dict(new_session(first), session_name=name))
    session = writer.load()                      # served from what this process saved
    session["steps"] += added
    session["steps"][:1] = [dict(s, status="Replaced") for s in session["steps"][:1]]
    writer.save(session)
    loaded = dbx_repl.Project(project.root).load()   # a later call: parses the file
    assert loaded == json.loads(json.dumps(session)) and loaded["session_name"] == name
    with open(project.session_path, encoding="utf-8") as f:
        text = f.read()
    step_lines = [line for line in text.split("\n") if line.startswith("    {")]
    assert len(step_lines) == len(session["steps"])
    assert [json.loads(line.rstrip(",")) for line in step_lines] == loaded["steps"]
    assert leftovers(project.root) == []


def test_a_session_file_replaced_by_another_call_is_read_again(project):
    mine = dbx_repl.Project(project.root)
    mine.save(new_session([{"step": 1, "tag": "a"}]))
    assert len(mine.load()["steps"]) == 1
    dbx_repl.Project(project.root).save(new_session([{"step": 1, "tag": "a"}, {"step": 2, "tag": "b"}]))
    assert [s["tag"] for s in mine.load()["steps"]] == ["a", "b"]


def test_a_copy_from_load_can_be_changed_without_changing_the_next_load(project):
    project.save(new_session([{"step": 1, "tag": "a"}]))
    first = project.load()
    first["steps"].append({"step": 2, "tag": "b"})
    first["cluster_id"] = "changed"
    assert project.load() == new_session([{"step": 1, "tag": "a"}])


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = str(tmp_path / "f.json")
    written = dbx_repl.write_atomic(path, "old")
    assert written.st_size == 3 and os.stat(path).st_ino == written.st_ino
    with pytest.raises(TypeError):
        dbx_repl.write_atomic(path, 12345)        # not text or bytes: fails while writing
    with open(path) as f:
        assert f.read() == "old"
    assert leftovers(tmp_path) == []


def test_the_lock_serialises_two_writers(project):
    order = []

    def second():
        with project.lock():
            order.append("second in")

    with project.lock():
        order.append("first in")
        other = threading.Thread(target=second)
        other.start()
        other.join(0.3)                           # it waits for the lock the first holds
        order.append("first out")
    other.join(10)
    assert order == ["first in", "first out", "second in"]


def test_held_signals_fire_after_the_session_was_saved(project):
    previous = signal.signal(signal.SIGTERM, dbx_repl._raise_terminated)
    saved = []
    try:
        with pytest.raises(dbx_repl.Terminated):
            with dbx_repl.signals_deferred():
                signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)   # as to the one-thread CLI
                project.save(new_session())
                saved.append(os.path.exists(project.session_path))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert saved == [True]


# -- step records ---------------------------------------------------------------------------------------

def active(step, tag, command_id="cmd-%d"):
    return {"step": step, "tag": tag, "command_id": command_id % step, "context_id": "ctx-1",
            "started_at": dbx_repl.now_iso()}


def test_a_recorded_step_has_its_files_relative_to_the_project_and_clears_the_active_command(project):
    project.save(dict(new_session(), active_command=active(1, "load")))
    entry = dbx_repl.step_entry(project, active(1, "load"), "Finished", elapsed=1.23456, note=None, rows=3)
    session = dbx_repl.record_step(project, entry)
    assert session["active_command"] is None and session["steps"] == [entry] == project.load()["steps"]
    assert entry["stdout_file"] == os.path.join(dbx_repl.OUTPUT_DIR, "001_load.stdout")
    assert entry["elapsed_seconds"] == 1.235 and entry["rows"] == 3 and "note" not in entry
    for key in ("stdout_file", "stderr_file"):                     # a step always has its two files
        assert os.path.getsize(os.path.join(project.root, entry[key])) == 0


def test_a_step_finished_twice_is_recorded_once_with_both_records_merged(project):
    project.save(dict(new_session(), active_command=active(1, "load")))
    dbx_repl.record_step(project, dbx_repl.step_entry(project, active(1, "load"), "Cancelled", rows=None,
                                                      cancelled_by="cancel"))
    session = dbx_repl.record_step(project, dbx_repl.step_entry(project, active(1, "load"), "Cancelled",
                                                                elapsed=2.0))
    assert len(session["steps"]) == 1
    assert session["steps"][0]["cancelled_by"] == "cancel" and session["steps"][0]["elapsed_seconds"] == 2.0
    another = dbx_repl.step_entry(project, active(1, "load", command_id="other-%d"), "Finished")
    assert len(dbx_repl.record_step(project, another)["steps"]) == 2   # another command of the same number


def test_an_active_command_of_another_step_stays(project):
    project.save(dict(new_session(), active_command=active(2, "next")))
    session = dbx_repl.record_step(project, dbx_repl.step_entry(project, active(1, "load"), "Finished"))
    assert session["active_command"]["step"] == 2


def test_step_numbers_continue_from_the_files_on_disk(project):
    assert project.highest_step_on_disk() == 0
    for name in ("007_a.stdout", "012_b.cmd.py", "x_013.txt", "responses"):
        open(project.output_path(name), "w").close()
    assert project.highest_step_on_disk() == 12


@pytest.mark.parametrize("status, answer", [("creating", "NoSession"), ("destroyed", "SessionDestroyed")])
def test_only_an_active_session_runs_steps(project, status, answer):
    with pytest.raises(dbx_repl.ReplError) as refused:
        dbx_repl.require_active(project, dict(new_session(), status=status))
    assert refused.value.status == answer and "create" in refused.value.hint
    assert dbx_repl.require_active(project, new_session())["status"] == "active"


def test_elapsed_time_of_a_record_without_a_readable_start_is_zero():
    assert dbx_repl.elapsed_since({"started_at": "yesterday"}) == dbx_repl.elapsed_since({}) == 0.0
    assert 0 <= dbx_repl.elapsed_since({"started_at": dbx_repl.now_iso()}) < 60


# -- a create under way: the pending record -------------------------------------------------------------

def test_a_first_create_leaves_a_placeholder_that_no_other_command_takes_for_a_session(project):
    assert dbx_repl.mark_pending_create(project, "c-1") == []
    placeholder = project.load()
    assert placeholder["status"] == "creating" and placeholder["pending_create"]["cluster_id"] == "c-1"
    with pytest.raises(dbx_repl.ReplError) as refused:
        dbx_repl.require_active(project, placeholder)
    assert refused.value.status == "NoSession"
    dbx_repl.drop_pending_create(project)                       # the create made no context
    assert not os.path.exists(project.session_path)


def test_a_create_that_died_after_the_context_was_made_is_remembered_as_a_possible_orphan(project):
    dbx_repl.mark_pending_create(project, "c-1")
    dbx_repl.mark_pending_create(project, "c-1", context_id="ctx-lost")     # then the call died
    orphans = dbx_repl.mark_pending_create(project, "c-1")                  # the next create
    assert [o["context_id"] for o in orphans] == ["ctx-lost"]
    session = project.load()
    assert session["possible_orphans"][0]["context_id"] == "ctx-lost" and "noted_at" in session["possible_orphans"][0]
    dbx_repl.drop_pending_create(project)
    assert "pending_create" not in project.load()                 # kept: it names a possible orphan
