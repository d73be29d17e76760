"""Beyond the spec: status, replay, export, put/get and smoke, run as an agent runs them."""

import hashlib
import os
import subprocess
import sys

import pytest

from local_workspace import JOB_CLUSTER_ID, RUNNING_CLUSTER_ID, TERMINATED_CLUSTER_ID
from repl_harness import command_status, wait_for


# -- status ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_status_summarises_a_live_session(session):
    session.exec("x = 1", "one")
    session.exec("1/0", "two")
    call = session.run("status")
    assert call.status == "Active" and call.code == 0
    assert call["steps"] == 2 and call["steps_by_status"] == {"Finished": 1, "Error": 1}
    assert call["last_step"]["cmd_id"] == "002_two" and call["context_alive"] is True
    assert call["cluster_state"] == "RUNNING" and call.get("active_command") is None


@pytest.mark.slow
def test_status_shows_a_running_command_with_its_remote_state(session):
    assert session.exec("import time\ntime.sleep(30)", "wait", "--timeout", "0.5").status == "Running"
    call = session.run("status")
    assert call.status == "Busy"
    assert call["active_command"]["cmd_id"] == "001_wait"
    assert call["active_command"]["remote_status"] == "Running"
    session.run("cancel")


@pytest.mark.slow
def test_status_shows_an_evicted_context(workspace, session):
    workspace.evict()
    call = session.run("status")
    assert call.status == "ContextLost" and call.code != 0 and call["context_alive"] is False
    assert "replay" in call["hint"]


def test_status_shows_a_stopped_cluster(workspace, session):
    workspace.set_cluster_state(RUNNING_CLUSTER_ID, "TERMINATED")
    call = session.run("status")
    assert call.status == "ClusterNotRunning" and call["cluster_state"] == "TERMINATED"


def test_status_of_a_destroyed_session_needs_no_workspace(session):
    session.run("destroy")
    call = session.run("status", env={"DATABRICKS_HOST": "http://127.0.0.1:9", "DATABRICKS_TOKEN": "x"})
    assert call.status == "Destroyed" and call["session_status"] == "destroyed"


# -- replay ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_replay_after_eviction_restores_state(workspace, session):
    session.exec("data = [1, 2, 3]", "load")
    session.exec("data = [v * 10 for v in data]", "transform")
    session.exec("1/0", "oops")
    workspace.evict()
    evicted = session.exec("print(sum(data))", "report")
    assert evicted.status == "ContextEvicted"
    assert evicted["replay_plan"]["steps"] == "1,2" and evicted["replay_plan"]["count"] == 2
    replay = session.run("replay")
    assert replay.status == "Replayed", replay
    assert [r["step"] for r in replay["restored"]] == [1, 2]
    assert session.exec("print(sum(data))", "report")["stdout_preview"] == "60\n"
    replays = [s for s in session.session()["steps"] if s.get("replay_of")]
    assert [s["replay_of"] for s in replays] == [1, 2]
    assert [s["tag"] for s in replays] == ["load", "transform"]


@pytest.mark.slow
def test_replay_of_chosen_steps_stops_at_the_first_failure(session):
    session.exec("a = 1", "one")
    session.exec("b = undefined_name", "two")
    session.exec("c = 3", "three")
    call = session.run("replay", "--steps", "1,2,3")
    assert call.status == "ReplayFailed" and call.code != 0
    assert [r["step"] for r in call["restored"]] == [1]
    assert call["failed"]["step"] == 2 and call["failed"]["error"]["type"] == "NameError"
    assert call["not_run"] == [3]


@pytest.mark.slow
def test_replay_range_can_skip_failed_steps(session):
    session.exec("a = 1", "one")
    session.exec("b = undefined_name", "two")
    session.exec("c = a + 2", "three")
    call = session.run("replay", "--from", "1", "--to", "3", "--skip-failed")
    assert call.status == "Replayed" and [r["step"] for r in call["restored"]] == [1, 3]


@pytest.mark.slow
def test_replay_rejects_unknown_steps(session):
    session.exec("a = 1", "one")
    assert session.run("replay", "--steps", "9").status == "UnknownStep"
    assert session.run("replay", "--steps", "x").status == "InvalidSteps"


# -- export ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_keeps_the_last_good_run_per_tag_and_runs_top_to_bottom(session, tmp_path):
    assert session.exec("%pip install pip", "deps").status == "Finished"
    session.exec("import json\ntotal = sum(range(5))", "compute")
    session.exec("import json\nprint(json.dumps({'total': totl}))", "report")      # a typo: fails
    session.exec("import json\nprint(json.dumps({'total': total}))", "report")     # the retry
    call = session.run("export", "--output", "pipeline.py")
    assert call.status == "Exported" and call["steps"] == [1, 2, 4]
    script = session.read(call["output_file"])
    assert script.startswith("# Requires: pip\n")
    assert "# --- Step 2: compute ---" in script and "# --- Step 4: report ---" in script
    assert "totl" not in script and script.count("import json") == 1
    assert "test-session" in script
    ran = subprocess.run([sys.executable, session.path(call["output_file"])], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout == '{"total": 10}\n'
    again = session.run("export", "--output", "pipeline2.py")
    assert session.read(again["output_file"]) == script


def test_export_writes_where_the_user_says_even_outside_the_project(session, tmp_path):
    session.exec("x = 1\nprint(x)", "one")
    call = session.run("export", "--output", str(tmp_path / "elsewhere.py"))
    assert call.status == "Exported" and (tmp_path / "elsewhere.py").read_text().endswith("print(x)\n")
    into_dir = session.run("export", "--output", str(tmp_path))
    assert into_dir.status == "Exported" and (tmp_path / "test-session_export.py").exists()


# -- put / get ---------------------------------------------------------------------------------------

def test_put_and_get_round_trip_a_binary_file_byte_for_byte(session, tmp_path):
    payload = os.urandom(5 * 1024 * 1024)
    local = tmp_path / "blob.bin"
    local.write_bytes(payload)
    remote = str(tmp_path / "driver" / "blob.bin")
    put = session.run("put", str(local), remote)
    assert put.status == "Uploaded" and put["bytes"] == len(payload)
    assert put["sha256"] == hashlib.sha256(payload).hexdigest()
    check = session.exec(f"import hashlib\nprint(hashlib.sha256(open({remote!r}, 'rb').read()).hexdigest())",
                         "check")
    assert check["stdout_preview"].strip() == put["sha256"]
    got = session.run("get", remote, "copy/blob.bin")
    assert got.status == "Downloaded" and got["bytes"] == len(payload)
    assert session.read(got["local"], "rb") == payload
    assert [t["direction"] for t in session.session()["transfers"]] == ["put", "get"]


@pytest.mark.slow
def test_get_enforces_the_size_cap_and_honours_any_local_path_as_cp_would(session, tmp_path):
    remote = str(tmp_path / "big.txt")
    session.exec(f"import os\nos.makedirs({str(tmp_path)!r}, exist_ok=True)\n"
                 f"open({remote!r}, 'w').write('x' * 10000)", "make")
    capped = session.run("get", remote, "big.txt", "--max-bytes", "1000")
    assert capped.status == "TooLarge" and not os.path.exists(os.path.join(session.project_dir, "big.txt"))
    outside = session.run("get", remote, str(tmp_path / "outside.txt"))
    assert outside.status == "Downloaded" and (tmp_path / "outside.txt").read_text() == "x" * 10000
    (tmp_path / "inbox").mkdir()
    into_dir = session.run("get", remote, str(tmp_path / "inbox"))
    assert into_dir.status == "Downloaded" and (tmp_path / "inbox" / "big.txt").stat().st_size == 10000
    missing = session.run("get", str(tmp_path / "nope.txt"), "nope.txt")
    assert missing.status == "RemoteFileError"


def test_put_of_a_missing_file_is_a_usage_error(session, tmp_path):
    call = session.run("put", str(tmp_path / "missing.bin"), "/tmp/x")
    assert call.status == "InvalidPath" and call.code == 2


# -- smoke -------------------------------------------------------------------------------------------

def _smoke(repl, *args, env=None):
    return repl.run("smoke", *args, env=env, project=False)


def test_smoke_passes_on_the_local_workspace_with_sub_llm(repl):
    call = _smoke(repl, "--cluster-name", "analytics-dev", "--llm-endpoint", "default-llm-endpoint")
    assert call.status == "Passed" and call.code == 0, call
    assert [p["phase"] for p in call["phases"]] == ["auth", "cluster", "create", "exec", "sub_llm", "destroy"]
    assert all(p["status"] == "Passed" for p in call["phases"])
    assert os.listdir(repl.project_dir) == []          # it works in a temporary dir


def test_smoke_fails_on_a_stopped_cluster_naming_the_phase(repl):
    call = _smoke(repl, "--cluster-id", TERMINATED_CLUSTER_ID)
    assert call.status == "Failed" and call.code != 0 and call["failed_phase"] == "cluster"
    assert "TERMINATED" in call["message"]


def test_smoke_fails_on_a_bad_token_naming_the_phase(repl):
    call = _smoke(repl, "--cluster-id", RUNNING_CLUSTER_ID, env={"DATABRICKS_TOKEN": "bad-token"})
    assert call.status == "Failed" and call["failed_phase"] == "cluster"
    assert call["phases"][-1]["error"] == "AuthError"


def test_smoke_refuses_a_job_cluster(repl):
    call = _smoke(repl, "--cluster-id", JOB_CLUSTER_ID)
    assert call.status == "Failed" and call["failed_phase"] == "create"


@pytest.mark.slow
def test_replay_right_after_an_eviction_starts_a_fresh_context_first(workspace, session):
    session.exec("base = 40", "one")
    session.exec("base += 2", "two")
    old_context = session.session()["context_id"]
    workspace.evict()
    assert session.run("status").status == "ContextLost"
    call = session.run("replay")
    assert call.status == "Replayed" and [r["step"] for r in call["restored"]] == [1, 2]
    assert session.session()["context_id"] != old_context
    assert session.exec("print(base)", "check")["stdout_preview"] == "42\n"


def test_status_says_when_a_timed_out_step_has_ended_and_await_collects_it(session):
    running = session.exec("import time\ntime.sleep(1.5)\nprint('late')", "late", "--timeout", "0.3")
    assert running.status == "Running"
    assert wait_for(lambda: command_status(session) == "Finished", 15)
    call = session.run("status")
    assert call.status == "Busy" and call["active_command"]["remote_status"] == "Finished"
    assert "await" in call["hint"] and "not collected" in call["message"]
    assert session.run("await")["stdout_preview"] == "late\n"
