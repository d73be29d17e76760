"""Bounds an agent can rely on when the workspace misbehaves: every call answers in time, failing
status calls are reported and never trap the session, destroy wins over a waiting exec, signals and
lost answers are told as they are, no context is left untracked, refused calls write nothing, and
transient answers are retried without ever running a command twice."""

import http.client
import json
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from local_workspace import RUNNING_CLUSTER_ID
from repl_harness import command_status, files_under, wait_for

EXECUTE = "/api/1.2/commands/execute"
STATUS = "/api/1.2/commands/status"
CREATE = "/api/1.2/contexts/create"
CONTEXT_STATUS = "/api/1.2/contexts/status"
CANCEL = "/api/1.2/commands/cancel"
DEFAULT_BUDGET = {"DBX_REPL_RETRY_TIMEOUT": ""}     # the CLI's own default, not the harness's 10 s


def requests_to(workspace, path, method=None):
    return [r for r in workspace.requests() if r["path"] == path and method in (None, r["method"])]


def timed(repl, *args, **kwargs):
    started = time.monotonic()
    call = repl.run(*args, **kwargs)
    return call, time.monotonic() - started


def assert_log_consistent(repl):
    log = repl.session()
    for entry in log["steps"]:
        for key in ("command_file", "stdout_file", "stderr_file"):
            assert os.path.exists(os.path.join(repl.project_dir, entry[key])), (key, entry)
    numbers = [s["step"] for s in log["steps"]]
    assert len(numbers) == len(set(numbers)), numbers          # each step recorded once
    return log


class StallingProxy:
    """An HTTP proxy in front of the local workspace that can hold chosen requests unanswered.

    `stall(path, forward=...)`: the next request to `path` is held until the proxy stops; with
    forward=True it first reaches the workspace (the service acts, its answer never arrives), else it
    never does. Every other request is relayed. `seen(path)` counts the stalled ones."""

    def __init__(self, workspace):
        self.workspace, self.rules, self.stalled = workspace, [], []
        self.lock, self.release = threading.Lock(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.handle(self, "GET")

            def do_POST(self):
                proxy.handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stall(self, path, forward=False, count=1):
        with self.lock:
            self.rules.append({"path": path, "forward": forward, "count": count})

    def seen(self, path):
        with self.lock:
            return sum(1 for p in self.stalled if p == path)

    def handle(self, handler, method):
        body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        path = handler.path.split("?")[0]
        rule = None
        with self.lock:
            for candidate in self.rules:
                if candidate["path"] == path and candidate["count"] > 0:
                    candidate["count"] -= 1
                    rule = candidate
                    break
        answer = None
        if rule is None or rule["forward"]:
            upstream = http.client.HTTPConnection("127.0.0.1", self.workspace.port, timeout=30)
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
            upstream.request(method, handler.path, body=body or None, headers=headers)
            reply = upstream.getresponse()
            answer = (reply.status, reply.getheaders(), reply.read())
            upstream.close()
        if rule is not None:
            with self.lock:
                self.stalled.append(path)
            self.release.wait(120)
            handler.close_connection = True
            return
        status, headers, data = answer
        handler.send_response(status)
        for key, value in headers:
            if key.lower() not in ("content-length", "connection", "transfer-encoding", "server", "date"):
                handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy(workspace):
    p = StallingProxy(workspace)
    yield p
    p.stop()


# -- 1. deadlines --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_refused_or_silent_host_is_answered_within_15_seconds_by_every_subcommand(session):
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_host = "http://127.0.0.1:%d" % refused.getsockname()[1]
    refused.close()                                       # nothing listens there now
    with socket.socket() as silent:                       # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        silent_host = "http://127.0.0.1:%d" % silent.getsockname()[1]
        for host in (refused_host, silent_host):
            env = dict(DEFAULT_BUDGET, DATABRICKS_HOST=host)
            for args in (("exec", "--command", "print(1)", "--tag", "t"), ("status",)):
                call, seconds = timed(session, *args, env=env)
                # A silent host took the submit and never answered: it may run, so the step says so.
                expected = "SubmitUncertain" if host == silent_host and args[0] == "exec" else "WorkspaceUnreachable"
                assert call.status == expected and call.code != 0, call
                assert seconds < 15, (host, args, seconds)
        assert [s["status"] for s in session.session()["steps"]] == ["SubmitUncertain"]   # refused: no step
        call, seconds = timed(session, "destroy", env=dict(DEFAULT_BUDGET, DATABRICKS_HOST=silent_host))
    # The way out works offline: the session ends, and the answer names the context that may live on.
    assert call.status == "Destroyed" and seconds < 15, (seconds, call)
    assert call["context_destroyed"] is False and call["context_id"] in call["message"]
    assert session.session()["status"] == "destroyed"
    other = os.path.join(os.path.dirname(session.project_dir), "other")
    os.mkdir(other)
    call, seconds = timed(session, "create", "--project-dir", other, "--cluster-id", RUNNING_CLUSTER_ID,
                          "--session-name", "x", env=dict(DEFAULT_BUDGET, DATABRICKS_HOST=refused_host))
    assert call.status == "WorkspaceUnreachable" and seconds < 15, (seconds, call)
    assert os.listdir(other) == []
    session.run("destroy")                                # the context, through the real host


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["http500", "dropped", "hanging"])
def test_exec_and_await_answer_within_timeout_plus_2_seconds_whatever_the_status_polls_do(
        workspace, session, proxy, fault):
    if fault == "http500":
        workspace.inject(STATUS, method="GET", count=1000, status=500, retry_after=None,
                         body={"error_code": "INTERNAL_ERROR", "message": "status store unavailable"})
    elif fault == "dropped":
        workspace.inject(STATUS, method="GET", count=1000, mode="drop_before")
    else:
        proxy.stall(STATUS, count=1000)
        session.env = dict(session.env, DATABRICKS_HOST=proxy.host)
    for args in (("exec", "--command", "import time\ntime.sleep(60)", "--tag", "slow", "--timeout", "2"),
                 ("await", "--timeout", "3")):
        call, seconds = timed(session, *args)
        budget = float(args[-1]) + 2
        assert seconds < budget, (fault, args, seconds, call)
        assert call.status == "StatusUnknown" and call.code == 3, call
        assert call["status_error"] and call["status_error"] in call["message"]
        assert set(call["tip"]) == {"await", "cancel", "destroy"}


# -- 2. failing status calls: reported, and a way out ------------------------------------------------------

@pytest.mark.slow
def test_failing_status_calls_are_reported_and_cancel_frees_the_session(workspace, session):
    workspace.inject(STATUS, method="GET", count=10000, status=500, retry_after=None,
                     body={"error_code": "INTERNAL_ERROR", "message": "status store unavailable"})
    first = session.exec("import time\ntime.sleep(60)", "stuck", "--timeout", "1")
    assert first.status == "StatusUnknown" and "status store unavailable" in first["message"], first
    waited = session.run("await", "--timeout", "1")
    assert waited.status == "StatusUnknown" and "status store unavailable" in waited["status_error"], waited.body
    probe = session.run("status")
    assert probe.status == "Busy" and "status store unavailable" in probe["active_command"]["remote_error"], probe
    call, seconds = timed(session, "cancel")
    assert call.status == "Cancelled" and call["cancel_confirmed"] is False, call
    assert "status store unavailable" in call["message"] and seconds < 15
    log = assert_log_consistent(session)
    assert log["active_command"] is None and log["steps"][-1]["status"] == "Cancelled"
    assert log["steps"][-1]["cancel_confirmed"] is False
    workspace.clear_injections()                          # the status store recovers
    assert session.exec("print('free again')", "next").status == "Finished"


@pytest.mark.slow
def test_destroy_frees_a_session_whose_status_calls_keep_failing(workspace, session):
    workspace.inject(STATUS, method="GET", count=10000, status=500, retry_after=None)
    assert session.exec("import time\ntime.sleep(60)", "stuck", "--timeout", "1").status == "StatusUnknown"
    call = session.run("destroy")
    assert call.status == "Destroyed" and call["context_destroyed"] is True, call
    assert session.session()["steps"][-1]["status"] == "Cancelled"
    assert not workspace.context_pids()


# -- 3. destroy during a wait ----------------------------------------------------------------------------

@pytest.mark.slow
def test_destroy_during_a_waiting_exec_records_the_step_once_and_leaves_no_context(workspace, session):
    for trial in range(10):
        if trial:
            assert session.create().status == "Created"
        creates = len(requests_to(workspace, CREATE))
        proc = session.popen("exec", "--command", "import time\ntime.sleep(30)", "--tag", f"wait{trial}")
        assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
        destroyed = session.run("destroy")
        assert destroyed.status == "Destroyed", destroyed
        call = session.finish(proc, timeout=60)
        assert call.status in ("Destroyed", "Cancelled") and call.code != 0, (trial, call)
        log = assert_log_consistent(session)
        mine = [s for s in log["steps"] if s["tag"] == f"wait{trial}"]
        assert len(mine) == 1 and mine[0]["status"] in ("Cancelled", "Destroyed"), mine
        assert log["status"] == "destroyed"
        assert len(requests_to(workspace, CREATE)) == creates      # no new context for a destroyed session
        assert wait_for(lambda: not workspace.context_pids(), 10), workspace.context_pids()


# -- 4. signals and uncertain submits -------------------------------------------------------------------

@pytest.mark.slow
def test_sigint_then_sigterm_answers_what_the_service_did(workspace, session):
    proc = session.popen("exec", "--command", "import time\ntime.sleep(30)", "--tag", "stop")
    assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
    proc.send_signal(signal.SIGINT)
    assert wait_for(lambda: requests_to(workspace, CANCEL), 15)   # the cancel is under way
    proc.send_signal(signal.SIGTERM)
    call = session.finish(proc, timeout=30)
    assert call.status in ("Cancelled", "Cancelling"), call
    if call.status == "Cancelled":
        assert session.session()["steps"][-1]["status"] == "Cancelled"
        assert command_status(session, session.session()["steps"][-1]) == "Cancelled"
    else:
        assert session.run("await", "--timeout", "30").status == "Cancelled"


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 1), (signal.SIGINT, 130)])
def test_a_signal_during_a_submit_that_hangs_says_the_command_may_run_and_the_next_exec_waits_behind_it(
        workspace, session, proxy, sig, code):
    session.env = dict(session.env, DATABRICKS_HOST=proxy.host)
    assert session.exec("hits = 0", "init").status == "Finished"
    proxy.stall(EXECUTE, forward=True)                  # the service runs it; its answer never comes
    proc = session.popen("exec", "--command", "import time\ntime.sleep(2)\nhits += 1", "--tag", "bump")
    assert wait_for(lambda: proxy.seen(EXECUTE), 15)
    started = time.monotonic()
    proc.send_signal(sig)
    call = session.finish(proc, timeout=30)
    assert time.monotonic() - started < 5
    assert call.status == "SubmitUncertain" and call.code == code, call
    assert "may still be running" in call["message"] and "next exec waits behind it" in call["message"]
    assert "session is free" not in call["message"]
    assert session.session()["steps"][-1]["status"] == "SubmitUncertain"
    after = session.exec("print(hits)", "check", "--timeout", "30")
    assert after.status == "Finished" and after["stdout_preview"] == "1\n", after   # it ran, once
    assert "002_bump" in after["message"] and "waited behind it" in after["message"]


@pytest.mark.slow
def test_a_dropped_submit_answer_says_the_command_may_still_run(workspace, session):
    workspace.inject(EXECUTE, method="POST", count=1, mode="drop_after")
    call = session.exec("import time\ntime.sleep(1)", "dropped")
    assert call.status == "SubmitUncertain"
    assert "may still be running" in call["message"] and "session is free" not in call["message"]


# -- 5. no silent orphans ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_dropped_create_answer_is_never_resent_and_is_noted_as_a_possible_orphan(workspace, repl):
    workspace.inject(CREATE, method="POST", count=1, mode="drop_after")
    call = repl.create()
    assert call.status == "CreateUncertain" and call.code != 0, call
    assert "cannot list contexts" in call["hint"]
    assert len(requests_to(workspace, CREATE)) == 1                 # not resent
    assert repl.session()["pending_create"]["cluster_id"] == RUNNING_CLUSTER_ID
    again = repl.create()
    assert again.status == "Created" and again["possible_orphans"] == 1, again
    assert len(repl.session()["possible_orphans"]) == 1 and "pending_create" not in repl.session()
    repl.run("destroy")


@pytest.mark.slow
def test_a_create_killed_after_the_context_was_made_is_cleaned_up_by_the_next_create(workspace, repl, proxy):
    repl.env = dict(repl.env, DATABRICKS_HOST=proxy.host)
    proxy.stall(CONTEXT_STATUS, forward=True)               # the create answered; the CLI waits on the context
    proc = repl.popen("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "killed")
    assert wait_for(lambda: proxy.seen(CONTEXT_STATUS), 15)
    proc.kill()
    proc.communicate(timeout=10)
    pending = repl.session()["pending_create"]
    assert pending["context_id"] in workspace.context_pids()
    call = repl.create()
    assert call.status == "Created" and call["possible_orphans"] == 1, call
    assert pending["context_id"] not in workspace.context_pids()     # the known leftover was destroyed
    assert set(workspace.context_pids()) == {call["context_id"]}
    repl.run("destroy")


@pytest.mark.slow
def test_sigterm_during_a_create_that_hangs_says_a_context_may_be_left(workspace, repl, proxy):
    repl.env = dict(repl.env, DATABRICKS_HOST=proxy.host)
    proxy.stall(CREATE, forward=True)                   # the context is made; the answer never comes
    proc = repl.popen("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "hung")
    assert wait_for(lambda: proxy.seen(CREATE), 15)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    call = repl.finish(proc, timeout=30)
    assert time.monotonic() - started < 5
    assert call.status == "CreateUncertain" and "SIGTERM" in call["message"], call
    assert "cannot list contexts" in call["hint"]
    assert len(workspace.context_pids()) == 1            # the leak it warns about is real
    assert repl.create().get("possible_orphans") == 1
    repl.run("destroy")


# -- 7. scale ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_session_with_10000_steps_keeps_working_and_stays_readable(session):
    path = os.path.join(session.project_dir, "session.json")
    log = session.session()
    log["steps"] = [{"step": n, "tag": f"t{n}", "status": "Finished", "command_file": f"repl_outputs/{n:03d}_t{n}.cmd.py",
                     "stdout_file": f"repl_outputs/{n:03d}_t{n}.stdout", "stderr_file": f"repl_outputs/{n:03d}_t{n}.stderr",
                     "started_at": "2026-01-01T00:00:00.000+00:00", "finished_at": "2026-01-01T00:00:01.000+00:00",
                     "elapsed_seconds": 1.0, "command_id": f"c{n}", "context_id": log["context_id"]}
                    for n in range(1, 10001)]
    log["step_counter"] = 10000
    with open(path, "w") as f:
        json.dump(log, f)
    call = session.exec("print('ten thousand and one')", "next")
    assert call.status == "Finished" and call["cmd_id"] == "10001_next", call
    after = session.session()
    assert len(after["steps"]) == 10001 and after["steps"][:10000] == log["steps"]
    assert after["step_counter"] == 10001 and after["active_command"] is None
    assert set(after) >= {"status", "cluster_id", "context_id", "step_counter", "steps", "active_command"}


# -- 8. no writes on refusal ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_wrong_token_writes_nothing(workspace, session):
    before = files_under(session.project_dir)
    for args in (("exec", "--command", "print(1)", "--tag", "t"), ("status",)):
        call = session.run(*args, env={"DATABRICKS_TOKEN": "dapi-wrong"})
        assert call.status == "AuthError" and call.code != 0, call
    assert files_under(session.project_dir) == before


def test_create_with_a_bad_cluster_id_writes_nothing(repl):
    for cluster_id in ("0000-000000-nosuch00", "../x"):
        assert repl.create(cluster_id).status == "ClusterNotFound"
    assert os.listdir(repl.project_dir) == []


# -- 9. transient answers are retried, execute never resent -----------------------------------------------

@pytest.mark.slow
def test_a_context_that_comes_up_in_error_is_destroyed_and_the_create_retried(workspace, repl):
    workspace.inject(CONTEXT_STATUS, method="GET", count=1, status=200, retry_after=None,
                     body={"status": "Error"})
    call = repl.create()
    assert call.status == "Created", call
    assert len(requests_to(workspace, CREATE)) == 2
    assert len(requests_to(workspace, "/api/1.2/contexts/destroy")) == 1
    assert set(workspace.context_pids()) == {call["context_id"]}
    repl.run("destroy")


CLUSTER_NOT_READY = {"error": "ClusterNotReadyException: Cluster is not ready yet (state PENDING)"}
TOKEN_BUCKET = {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "RPC token bucket limit has been exceeded"}
RATE_LIMITED = {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "Your request was rejected"}


@pytest.mark.slow
def test_transient_answers_are_retried_and_the_command_runs_once(workspace, repl):
    workspace.inject(CREATE, method="POST", count=2, status=500, retry_after=None, body=CLUSTER_NOT_READY)
    assert repl.create().status == "Created"
    assert [r["status"] for r in requests_to(workspace, CREATE)] == [500, 500, 200]
    assert repl.exec("hits = 0", "init").status == "Finished"
    for status, body in ((500, CLUSTER_NOT_READY), (400, TOKEN_BUCKET), (400, RATE_LIMITED), (500, RATE_LIMITED)):
        workspace.inject(EXECUTE, method="POST", count=1, status=status, retry_after=None, body=body)
        workspace.inject(STATUS, method="GET", count=1, status=status, retry_after=None, body=body)
        call = repl.exec("hits += 1", f"bump{status}")
        assert call.status == "Finished", (body, call)
        assert requests_to(workspace, EXECUTE)[-2]["status"] == status
    check = repl.exec("print(hits)", "check")
    assert check["stdout_preview"] == "4\n"                    # each ran exactly once
    repl.run("destroy")


def test_a_cluster_that_stays_not_ready_is_answered_with_the_services_error_within_the_budget(workspace, repl):
    workspace.inject(CREATE, method="POST", count=1000, status=500, retry_after=None, body=CLUSTER_NOT_READY)
    call, seconds = timed(repl, "create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x",
                          env={"DBX_REPL_RETRY_TIMEOUT": "3"})
    assert call.status == "ApiError" and "ClusterNotReadyException" in call["message"], call
    assert seconds < 3 + 2 and len(requests_to(workspace, CREATE)) >= 2
    assert not os.path.exists(os.path.join(repl.project_dir, "session.json"))   # nothing was created
    assert not workspace.context_pids()
