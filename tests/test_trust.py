"""Trust, as a user would test it: secrets stay redacted, nothing printed is lost in silence, remote
paths mean what users type, a refused credential loses no step, an eviction lists the steps to
replay, and a cancel says what it leaves running. Every story runs through the CLI on the local
workspace (real SDK, real processes)."""

import json
import os
import shlex
import subprocess

import pytest

from local_workspace import LocalWorkspace
from local_workspace.paths import host_path
from repl_harness import Call, files_under, wait_for

SECRET = "tok-9f8e7d6c5b4a3e2d"
SECRETS = {"prod": {"api_token": SECRET, "pem": "-----BEGIN KEY-----\nline-one-abc\nline-two-xyz\n-----END KEY-----"}}


@pytest.fixture
def workspace():
    """A local workspace whose secret scope `prod` holds SECRET (and a multi-line key)."""
    ws = LocalWorkspace(secrets=SECRETS)
    ws.start()
    try:
        yield ws
    finally:
        ws.stop()


def driver_file(session, path):
    """Where a driver path of the session's cluster lives on the host."""
    return host_path(session.workspace._tmpdir, session.session()["cluster_id"], path)


def assert_nowhere(session, calls, *values):
    """No value appears in any answer, in the CLI's stderr, or in any file under the project dir."""
    for call in calls:
        for value in values:
            assert value not in call.stdout and value not in call.stderr, (value, call)
    for path, data in files_under(session.project_dir).items():
        for value in values:
            assert value.encode() not in data, (value, path)


# -- secrets -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_printed_secret_stays_redacted(session):
    calls = [session.exec("token = dbutils.secrets.get('prod', 'api_token')\n"
                          "pem = dbutils.secrets.get('prod', 'pem')\nprint('read')", "read")]
    calls.append(session.exec(
        "import json, logging, os, sys\n"
        "print(token)\nprint(f'Authorization: Bearer {token}')\nprint(repr(token), {'k': token})\n"
        "print(json.dumps({'t': token}))\nprint(pem)\n"
        "sys.stdout.write(token[:7]); sys.stdout.write(token[7:] + '\\n')\n"
        "os.system('echo shell ' + token)\nlogging.getLogger('t').warning('logged %s', token)\n"
        "print(token.encode().decode())", "show"))
    shown = session.read(calls[-1]["stdout_file"])
    assert shown.count("[REDACTED]") >= 9 and "Bearer [REDACTED]" in shown and "shell [REDACTED]" in shown
    assert calls[-1]["truncated"] is False
    calls.append(session.exec("raise ValueError('the token ' + token + ' was refused')", "fail"))
    assert calls[-1].status == "Error" and calls[-1]["error"]["message"] == "the token [REDACTED] was refused"
    calls.append(session.run("exec", "--command", "import time\nprint('working with', token, flush=True)\n"
                                                  "time.sleep(4)", "--tag", "slow", "--timeout", "2"))
    assert calls[-1].status == "Running"
    assert "[REDACTED]" in json.dumps(calls[-1].get("progress"))
    calls.append(session.run("await", "--timeout", "30"))
    calls.append(session.exec("open('/tmp/conf.txt', 'w').write('token=' + token + '\\n')", "write"))
    calls.append(session.run("get", "/tmp/conf.txt", "conf.txt"))
    assert calls[-1].status == "Downloaded" and calls[-1]["redacted"] == 1
    assert session.read("conf.txt") == "token=[REDACTED]\n"
    calls.append(session.run("export"))
    assert_nowhere(session, calls, SECRET, "line-one-abc", "line-two-xyz")


@pytest.mark.slow
@pytest.mark.spark
def test_a_secret_in_a_sql_result_stays_redacted(session):
    calls = [session.exec("token = dbutils.secrets.get('prod', 'api_token')\n"
                          "spark.createDataFrame([(token, 1)], 'v string, n int').createOrReplaceTempView('s')",
                          "view")]
    calls.append(session.run("exec", "--sql", "SELECT v, n FROM s", "--tag", "sql"))
    assert calls[-1].status == "Finished", calls[-1]
    assert "[REDACTED]" in session.read(calls[-1]["table"]["file"])
    assert_nowhere(session, calls, SECRET)


# -- nothing printed is lost -------------------------------------------------------------------------

@pytest.mark.slow
def test_output_of_subprocesses_and_forked_children_is_kept_in_order(session):
    call = session.exec(
        "import multiprocessing, os, subprocess\nprint('parent first')\n"
        "subprocess.run(['echo', 'from a subprocess'])\nos.system('echo from os.system >&2')\n"
        "child = multiprocessing.get_context('fork').Process(target=lambda: print('from a forked child'))\n"
        "child.start(); child.join()\nprint('parent last')", "children")
    assert call.status == "Finished" and call["truncated"] is False
    assert session.read(call["stdout_file"]) == ("parent first\nfrom a subprocess\nfrom os.system\n"
                                                 "from a forked child\nparent last\n")


@pytest.mark.slow
def test_output_written_between_steps_is_kept_and_named_by_the_next_answer(session):
    started = session.exec(
        "import logging, sys, threading, time\nlog = logging.getLogger('between')\n"
        "log.addHandler(logging.StreamHandler(sys.stdout))\n"
        "def later():\n    time.sleep(0.5)\n    log.warning('a handler wrote this between steps')\n"
        "    print('and a thread printed this')\n"
        "threading.Thread(target=later).start()\nprint('started')", "background")
    assert session.read(started["stdout_file"]) == "started\n"
    late = driver_file(session, "/tmp/dbx_repl_%s/%s.late" % (session.session()["session_id"], started["cmd_id"]))
    assert wait_for(lambda: os.path.exists(late) and os.path.getsize(late) >= 60, 15)
    nxt = session.exec("print('next')", "next")
    assert nxt.status == "Finished" and session.read(nxt["stdout_file"]) == "next\n"
    assert nxt["late_output"]["after_step"] == started["cmd_id"]
    assert session.read(nxt["late_output"]["file"]) == ("a handler wrote this between steps\n"
                                                         "and a thread printed this\n")
    assert started["cmd_id"] in nxt["message"] and "truncated" not in nxt["late_output"]


@pytest.mark.slow
def test_a_copy_the_cli_cannot_check_is_flagged_truncated_with_a_note(session):
    # the step removes its own driver copies: its record cannot be written, so the file cannot be shown whole
    call = session.exec("import shutil\nprint('partial')\nshutil.rmtree(_dbx_repl.out_dir)", "lost_copy")
    assert call.status == "Finished" and call["truncated"] is True
    assert "record" in call["message"] or "gone" in call["message"]


# -- remote paths ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_remote_paths_mean_what_users_type(session, tmp_path):
    local = tmp_path / "data.csv"
    local.write_text("a,b\n1,2\n")
    put = session.run("put", str(local), "dbfs:/landing/data.csv")
    assert put.status == "Uploaded" and put["remote"] == "/dbfs/landing/data.csv"
    assert open(driver_file(session, "/dbfs/landing/data.csv")).read() == "a,b\n1,2\n"
    assert not os.path.exists(os.path.join(session.project_dir, "dbfs:"))
    # onto an existing driver folder, as cp does
    session.exec("import os\nos.makedirs('/Volumes/main/raw/files', exist_ok=True)", "mkdir")
    put = session.run("put", str(local), "/Volumes/main/raw/files")
    assert put.status == "Uploaded" and put["remote"] == "/Volumes/main/raw/files/data.csv"
    # relative to the driver's working directory
    put = session.run("put", str(local), "work/data.csv")
    assert put.status == "Uploaded" and put["remote"].endswith("/work/data.csv")
    got = session.run("get", "dbfs:/landing/data.csv", str(tmp_path / "back.csv"))
    assert got.status == "Downloaded" and (tmp_path / "back.csv").read_text() == "a,b\n1,2\n"
    before = files_under(session.project_dir)
    for remote in ("s3://bucket/key", "C:\\data\\x.csv", "../../etc/passwd", "/Volumes/../etc/passwd"):
        refused = session.run("put", str(local), remote)
        assert refused.status == "InvalidPath" and refused.code == 2, refused
        assert session.run("get", remote, str(tmp_path / "x")).status == "InvalidPath"
    assert files_under(session.project_dir) == before      # nothing written on refusal
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("VALUE = 7\n")
    synced = session.run("sync", str(pkg), "--to", "dbfs:/code/mypkg")
    assert synced.status == "Synced" and synced["remote"] == "/dbfs/code/mypkg"
    assert session.exec("import mypkg\nprint(mypkg.VALUE)", "use").body["stdout_preview"] == "7\n"


# -- a refused credential ----------------------------------------------------------------------------

@pytest.mark.slow
def test_a_refused_credential_never_loses_the_step(session):
    proc = session.popen("exec", "--command", "import time\ntime.sleep(3)\nprint('done')", "--tag", "slow",
                         "--timeout", "30")
    assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
    session.workspace.inject("/api/1.2/commands/status", method="GET", count=1000, status=403,
                             body={"error_code": "PERMISSION_DENIED", "message": "Invalid access token."})
    call = session.finish(proc)
    assert call.status == "StatusUnknown" and call.code == 3 and call["credentials_refused"] is True
    assert call["cmd_id"] == "001_slow" and call["command_id"] and "may still be running" in call["message"]
    assert set(call["tip"]) >= {"await", "cancel"}
    assert session.session()["active_command"]["step"] == 1      # still known, not lost
    session.workspace.clear_injections()
    # the credentials work again: a later exec checks the earlier step before anything else
    assert wait_for(lambda: session.run("status").get("active_command", {}).get("remote_status") == "Finished", 15)
    nxt = session.exec("print('next')", "next")
    assert nxt.status == "Finished" and nxt["earlier_step"]["cmd_id"] == "001_slow"
    assert nxt["earlier_step"]["status"] == "Finished"
    assert session.read("repl_outputs/001_slow.stdout") == "done\n"


@pytest.mark.slow
def test_exec_behind_a_running_step_checks_before_saying_it_runs(session):
    proc = session.popen("exec", "--command", "import time\ntime.sleep(60)", "--tag", "slow", "--timeout", "1")
    assert session.finish(proc).status == "Running"
    busy = session.exec("print('x')", "x")
    assert busy.status == "CommandRunning" and "the service says so" in busy["message"]
    assert set(busy["tip"]) == {"await", "cancel"}


# -- eviction: the original skill's contract ---------------------------------------------------------

@pytest.mark.slow
def test_context_evicted_lists_the_previous_steps_as_the_original_skill_did(session):
    for index in range(8):
        assert session.exec(f"v{index} = {index}", f"step{index}").status == "Finished"
    session.workspace.evict()
    call = session.exec("print(v7)", "after")
    assert call.status == "ContextEvicted"
    shown = call["previous_steps"]
    assert [s["step"] for s in shown] == [4, 5, 6, 7, 8, 9] and call["previous_steps_count"] == 9
    assert shown[0] == {"step": 4, "tag": "step3", "command_file": shown[0]["command_file"]}
    assert shown[0]["command_file"].endswith("repl_outputs/004_step3.cmd.py")
    every = json.loads(session.read(call["previous_steps_file"]))["previous_steps"]
    assert [s["step"] for s in every] == list(range(1, 10))
    assert len(call.stdout.encode()) <= 2048


# -- cancel says what it leaves running --------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.spark
def test_cancel_names_the_streaming_queries_it_leaves_running(session):
    proc = session.popen("exec", "--command",
                         "q = spark.readStream.format('rate').load().writeStream.format('memory')"
                         ".queryName('ticks').start()\nprint('stream started', flush=True)\n"
                         "import time\ntime.sleep(120)", "--tag", "stream")
    tail = lambda: (session.run("status").get("progress") or {}).get("output_tail") or ""
    assert wait_for(lambda: "stream started" in tail(), 90, interval=1.0)
    cancelled = session.run("cancel")
    session.finish(proc)
    assert cancelled.status == "Cancelled", cancelled
    assert cancelled["still_running"]["count"] == 1
    assert cancelled["still_running"]["streaming_queries"][0]["name"] == "ticks"
    stop = subprocess.run(shlex.split(cancelled["tip"]["stop_streams"]), capture_output=True, text=True,
                          cwd=session.cwd, env=session.env, timeout=120)
    assert Call(stop.args, stop.returncode, stop.stdout, stop.stderr).status == "Finished"
    assert session.exec("print(len(spark.streams.active))", "count")["stdout_preview"] == "0\n"
