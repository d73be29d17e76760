"""Faults an agent's session must survive: kills, signals, dropped connections, throttling,
concurrent calls, eviction and a broken session.json. Nothing recorded may be lost, no command may
run twice, and every call still answers with one JSON object."""

import json
import os
import signal
import socket
import threading
import time

import pytest

from local_workspace import RUNNING_CLUSTER_ID
import repl_harness
from repl_harness import Repl, gated_step, in_timed_sleep, open_gate, wait_for

EXECUTE = "/api/1.2/commands/execute"
STATUS = "/api/1.2/commands/status"


def assert_log_consistent(repl):
    """session.json parses, and every recorded step's files exist (they are written first)."""
    log = repl.session()
    for entry in log["steps"]:
        for key in ("command_file", "stdout_file", "stderr_file"):
            assert os.path.exists(os.path.join(repl.project_dir, entry[key])), (key, entry)
    leftovers = [n for n in os.listdir(repl.project_dir) if n.startswith(".tmp-")]
    assert not leftovers, leftovers
    return log


def executes(workspace):
    return [r for r in workspace.requests() if r["path"] == EXECUTE and r["method"] == "POST"]


def active_command_id(repl):
    return (repl.session().get("active_command") or {}).get("command_id")


# -- dropped connections and throttling ---------------------------------------------------------------

@pytest.mark.slow
def test_dropped_connections_on_submit_never_run_a_command_twice(workspace, session):
    assert session.exec("hits = 0", "init").status == "Finished"
    before = len(executes(workspace))
    workspace.inject(EXECUTE, method="POST", count=1, mode="drop_after")   # processed, then dropped
    call = session.exec("hits += 1", "bump")
    assert call.status == "SubmitUncertain" and call.code != 0, call
    assert call["cmd_id"] == "002_bump" and "ran once or not at all" in call["message"]
    assert len(executes(workspace)) == before + 1          # not resent
    assert session.session()["active_command"] is None
    assert session.session()["steps"][-1]["status"] == "SubmitUncertain"
    check = session.exec("print(hits)", "check")
    assert check.status == "Finished" and check["stdout_preview"] == "1\n"   # ran exactly once

    workspace.inject(EXECUTE, method="POST", count=1, mode="drop_before")  # never reached the server
    assert session.exec("hits += 1", "lost").status == "SubmitUncertain"
    again = session.exec("print(hits)", "check_again")
    assert again.status == "Finished" and again["stdout_preview"] == "1\n"
    assert_log_consistent(session)


@pytest.mark.slow
def test_throttled_submits_are_retried_after_retry_after_and_run_once(workspace, session):
    assert session.exec("hits = 0", "init").status == "Finished"
    for status in (429, 503):
        workspace.inject(EXECUTE, method="POST", count=1, status=status, retry_after=1)
        call = session.exec("hits += 1\nprint(hits)", f"bump{status}")
        assert call.status == "Finished", call
        assert [r["status"] for r in executes(workspace)][-2:] == [status, 200]
    assert call["stdout_preview"] == "2\n"


@pytest.mark.slow
def test_failed_status_polls_are_retried_not_reported_as_a_failed_command(workspace, session):
    workspace.inject(STATUS, method="GET", count=1, status=503, retry_after=0)
    workspace.inject(STATUS, method="GET", count=1, mode="drop_before")
    workspace.inject(STATUS, method="GET", count=1, mode="drop_after")
    workspace.inject(STATUS, method="GET", count=1, status=500, body={"error_code": "INTERNAL_ERROR",
                                                                       "message": "flaky"})
    call = session.exec("import time\ntime.sleep(0.5)\nprint('survived the flaky polls')", "flaky")
    assert call.status == "Finished", call
    assert call["stdout_preview"] == "survived the flaky polls\n"
    polls = [r for r in workspace.requests() if r["path"] == STATUS]
    assert any(r["status"] == 503 for r in polls) and any(r["dropped"] for r in polls)
    assert session.session()["steps"][-1]["status"] == "Finished"


def test_an_unreachable_host_fails_in_seconds_with_workspace_unreachable(repl):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]           # closed once the block ends: nothing listens there
    started = time.monotonic()
    call = repl.run("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x",
                    env={"DATABRICKS_HOST": f"http://127.0.0.1:{port}", "DBX_REPL_RETRY_TIMEOUT": "1"})
    assert call.status == "WorkspaceUnreachable" and call.code != 0, call
    assert "DBX_REPL_RETRY_TIMEOUT" in call["hint"]
    assert time.monotonic() - started < 30
    assert not os.path.exists(os.path.join(repl.project_dir, "session.json"))


@pytest.mark.slow
def test_a_host_that_never_answers_times_out_per_request(repl):
    with socket.socket() as silent:                # accepts connections, never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        host = "http://127.0.0.1:%d" % silent.getsockname()[1]
        started = time.monotonic()
        call = repl.run("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x",
                        env={"DATABRICKS_HOST": host, "DBX_REPL_RETRY_TIMEOUT": "2",
                             "DBX_REPL_HTTP_TIMEOUT": "1"})
    assert call.status == "WorkspaceUnreachable", call
    assert time.monotonic() - started < 30


# -- signals and kills ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_during_exec_leaves_the_command_running_and_await_collects_it(session):
    proc = session.popen("exec", "--command", "import time\ntime.sleep(2)\nprint('finished anyway')",
                         "--tag", "long", "--timeout", "60")
    command_id = wait_for(lambda: active_command_id(session), 15)
    assert command_id
    proc.send_signal(signal.SIGTERM)
    call = session.finish(proc)
    assert call.status == "Running" and call.code == 3, call
    assert call["command_id"] == command_id and set(call["tip"]) == {"await", "cancel"}
    assert active_command_id(session) == command_id
    done = session.run("await", "--timeout", "30")
    assert done.status == "Finished" and done["stdout_preview"] == "finished anyway\n"
    assert_log_consistent(session)


@pytest.mark.slow
def test_sigkill_mid_exec_loses_nothing_and_await_recovers_the_output(session):
    proc = session.popen("exec", "--command", gated_step("k", "print('kept')"), "--tag", "k")
    assert wait_for(lambda: active_command_id(session), 15)
    proc.kill()
    proc.communicate(timeout=10)
    busy = session.exec("print('too early')", "next")
    assert busy.status == "CommandRunning" and busy.code != 0
    assert "await" in busy["tip"] and "cancel" in busy["tip"]
    open_gate(session, "k")
    done = session.run("await", "--timeout", "30")
    assert done.status == "Finished" and done["stdout_preview"] == "kept\n"
    assert done["cmd_id"] == "001_k"
    log = assert_log_consistent(session)
    assert [s["status"] for s in log["steps"]] == ["Finished"] and log["active_command"] is None


@pytest.mark.slow
def test_sigkill_while_submitting_is_resolved_by_await_as_submit_uncertain(workspace, session):
    assert session.exec("hits = 0", "init").status == "Finished"
    workspace.inject(EXECUTE, method="POST", count=1, status=503, retry_after=5)
    proc = session.popen("exec", "--command", "hits += 1", "--tag", "bump")
    assert wait_for(lambda: any(r["status"] == 503 for r in executes(workspace)), 15)
    assert session.session()["active_command"]["command_id"] is None
    proc.kill()
    proc.communicate(timeout=10)
    call = session.run("await")
    assert call.status == "SubmitUncertain" and call.code != 0
    assert session.session()["steps"][-1]["status"] == "SubmitUncertain"
    check = session.exec("print(hits)", "check")
    assert check.status == "Finished" and check["stdout_preview"] == "0\n"
    assert check["cmd_id"] == "003_check"
    assert_log_consistent(session)


@pytest.mark.slow
@pytest.mark.parametrize("sig, expected, code", [(signal.SIGTERM, "Terminated", 1), (signal.SIGINT, "Interrupted", 130)])
def test_a_signal_while_the_service_declines_the_submit_runs_nothing_and_records_nothing(
        workspace, session, sig, expected, code):
    before = len(executes(workspace))
    workspace.inject(EXECUTE, method="POST", count=1, status=503, retry_after=2)
    proc = session.popen("exec", "--command", "import time\ntime.sleep(30)", "--tag", "held")
    assert wait_for(lambda: any(r["status"] == 503 for r in executes(workspace)), 15)
    assert wait_for(lambda: in_timed_sleep(proc.pid), 15)    # the CLI has read the 503: it waits to retry
    proc.send_signal(sig)
    call = session.finish(proc)
    assert call.status == expected and call.code == code, call
    assert "001_held" in call["message"] and "did not run" in call["message"]
    assert len(executes(workspace)) == before + 1             # declined once, never sent again
    log = assert_log_consistent(session)
    assert log["active_command"] is None and log["steps"] == [] and log["step_counter"] == 0
    again = session.exec("print('next')", "next")
    assert again.status == "Finished" and again["cmd_id"] == "001_next"


@pytest.mark.slow
def test_ctrl_c_during_await_cancels_the_command(session):
    first = session.exec("import time\ntime.sleep(60)", "slow", "--timeout", "0.5")
    assert first.status == "Running"
    polls = len([r for r in session.workspace.requests() if r["path"] == STATUS])
    proc = session.popen("await", "--timeout", "60")
    assert wait_for(lambda: len([r for r in session.workspace.requests() if r["path"] == STATUS]) > polls, 15)
    proc.send_signal(signal.SIGINT)
    call = session.finish(proc, timeout=30)
    assert call.status == "Cancelled" and call.code == 130, call
    assert session.session()["steps"][-1]["status"] == "Cancelled"
    assert session.exec("print('usable')", "after").status == "Finished"


def cli_processes(repl):
    """Live processes (zombies left out) running this CLI for this project: its path and the project
    dir in their argv, with their parent pid (1 for an orphan; Linux /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError, ValueError):
            continue
        if state != b"Z" and repl_harness.CLI in argv and any(repl.project_dir in a for a in argv):
            found.append((int(name), int(ppid), argv))
    return found


@pytest.mark.slow
def test_no_process_of_the_cli_outlives_its_call(session):
    assert session.exec("print(1)", "one").status == "Finished"
    assert session.exec("import time\ntime.sleep(30)", "slow", "--timeout", "0.5").status == "Running"
    assert session.run("status").status == "Busy"                 # progress read through the sidecar
    for sig, answer in ((signal.SIGTERM, "Running"), (signal.SIGINT, "Cancelled")):
        polls = len([r for r in session.workspace.requests() if r["path"] == STATUS])
        proc = session.popen("await", "--timeout", "60")
        assert wait_for(lambda before=polls: len([r for r in session.workspace.requests()
                                                  if r["path"] == STATUS]) > before, 15)
        proc.send_signal(sig)
        assert session.finish(proc, timeout=30).status == answer
    assert session.run("destroy").status == "Destroyed"
    time.sleep(1)                                  # time for a detached process to show itself
    assert cli_processes(session) == []


# -- concurrency ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_exec_while_a_command_is_active_answers_command_running(session):
    proc = session.popen("exec", "--command", gated_step("a", "print('first')"), "--tag", "a")
    assert wait_for(lambda: active_command_id(session), 15)
    second = session.exec("print('second')", "b")
    assert second.status == "CommandRunning" and second.code != 0
    assert "001_a" in second["message"]
    assert set(second["tip"]) == {"await", "cancel"}
    open_gate(session, "a")
    assert session.finish(proc).status == "Finished"
    log = assert_log_consistent(session)
    assert [s["step"] for s in log["steps"]] == [1] and log["step_counter"] == 1


@pytest.mark.slow
def test_racing_execs_on_one_project_run_one_command_and_never_corrupt_the_log(session):
    errors = []

    def read_constantly(stop):
        while not stop.is_set():
            try:
                with open(os.path.join(session.project_dir, "session.json"), encoding="utf-8") as f:
                    json.load(f)
            except Exception as err:  # a half-written file would show here
                errors.append(err)

    stop = threading.Event()
    reader = threading.Thread(target=read_constantly, args=(stop,))
    reader.start()
    try:
        procs = [session.popen("exec", "--command", f"import time\ntime.sleep(3)\nprint({i})", "--tag", f"r{i}")
                 for i in range(3)]
        calls = [session.finish(p) for p in procs]
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[:3]
    statuses = sorted(c.status for c in calls)
    assert statuses == ["CommandRunning"] * 2 + ["Finished"], calls
    log = assert_log_consistent(session)
    assert len(log["steps"]) == 1 and log["active_command"] is None


RENDEZVOUS = """import os, time
os.makedirs({shared!r}, exist_ok=True)
open(os.path.join({shared!r}, {name!r}), "w").close()
deadline = time.time() + 60
while len(os.listdir({shared!r})) < 8 and time.time() < deadline:
    time.sleep(0.05)
print(len(os.listdir({shared!r})))
"""


@pytest.mark.slow
def test_eight_project_dirs_run_fully_in_parallel(workspace, tmp_path):
    shared = tmp_path / "rendezvous"     # each command waits until all eight are running at once
    shared.mkdir()
    repls = []
    for i in range(8):
        project = tmp_path / f"project{i}"
        project.mkdir()
        repls.append(Repl(workspace, project, tmp_path))
    creates = [r.popen("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", f"s{i}")
               for i, r in enumerate(repls)]
    assert all(r.finish(p).status == "Created" for r, p in zip(repls, creates))
    execs = [r.popen("exec", "--command", RENDEZVOUS.format(shared=str(shared), name=f"p{i}"), "--tag", "meet")
             for i, r in enumerate(repls)]
    results = [r.finish(p, timeout=120) for r, p in zip(repls, execs)]
    assert [c["stdout_preview"] for c in results] == ["8\n"] * 8, results
    assert len({r.session()["context_id"] for r in repls}) == 8
    destroys = [r.popen("destroy") for r in repls]
    assert all(r.finish(p).status == "Destroyed" for r, p in zip(repls, destroys))
    for r in repls:
        assert_log_consistent(r)


# -- eviction and a broken session.json --------------------------------------------------------------

@pytest.mark.slow
def test_eviction_mid_command_records_the_step_and_keeps_its_files(workspace, session):
    workspace.configure(shutdown_aborts_commands=False)  # the running command vanishes with it
    assert session.exec("x = 1", "load").status == "Finished"
    proc = session.popen("exec", "--command", "import time\ntime.sleep(30)", "--tag", "doomed")
    assert wait_for(lambda: active_command_id(session), 15)
    workspace.evict()
    call = session.finish(proc, timeout=60)
    assert call.status == "ContextEvicted" and call["failed_step"] == "002_doomed"
    log = assert_log_consistent(session)
    assert [s["status"] for s in log["steps"]] == ["Finished", "Evicted"]


CORRUPT_CONTENTS = [b"{\"status\": \"act", b"\xff\xfe not utf-8", b"[1, 2, 3]",
                    b"{\"status\": \"active\", \"steps\": {}}", b"[" * 100000]


@pytest.mark.slow
def test_a_corrupt_session_file_is_named_and_never_overwritten(repl):
    path = os.path.join(repl.project_dir, "session.json")
    create = ("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "again")
    for index, content in enumerate(CORRUPT_CONTENTS):
        with open(path, "wb") as f:
            f.write(content)
        every = [("exec", "--command", "1", "--tag", "t"), ("await",), ("cancel",), ("destroy",), create]
        for args in every if index == 0 else [every[0], create]:
            call = repl.run(*args)
            assert call.status == "CorruptSession" and call.code != 0, (content[:20], call)
            assert call["session_file"].endswith("session.json") and "session.json" in call["message"]
            assert "guarantees.md" in call["hint"]
            with open(path, "rb") as f:
                assert f.read() == content
    assert not repl.workspace.context_pids()        # create refused before making a context


@pytest.mark.slow
def test_a_corrupt_session_file_is_recovered_by_moving_it_aside(workspace, session):
    assert session.exec("print(1)", "one").status == "Finished"
    path = os.path.join(session.project_dir, "session.json")
    with open(path, "w") as f:
        f.write("{ broken")
    hint = session.exec("print(2)", "two")["hint"]
    assert "mv " in hint
    os.rename(path, path + ".bad")
    workspace.evict()                                   # the old context is unreachable anyway
    assert session.create().status == "Created"
    call = session.exec("print(2)", "two")
    assert call.status == "Finished" and call["cmd_id"] == "002_two"   # numbering continues
    assert os.path.exists(path + ".bad")


@pytest.mark.slow
def test_sigkill_while_submitting_is_also_resolved_by_cancel(workspace, session):
    workspace.inject(EXECUTE, method="POST", count=1, status=503, retry_after=5)
    proc = session.popen("exec", "--command", "print('never sent')", "--tag", "bump")
    assert wait_for(lambda: any(r["status"] == 503 for r in executes(workspace)), 15)
    proc.kill()
    proc.communicate(timeout=10)
    call = session.run("cancel")
    assert call.status == "SubmitUncertain" and call["cmd_id"] == "001_bump"
    assert session.session()["active_command"] is None
    assert session.exec("print('free')", "next").status == "Finished"
    assert_log_consistent(session)
