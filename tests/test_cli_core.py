"""The CLI's core story, run as an agent runs it: one subprocess per call, JSON out, files on disk."""

import json
import os
import signal
import time


import pytest

from local_workspace import JOB_CLUSTER_ID, RUNNING_CLUSTER_ID, SHARED_CLUSTER_ID, TERMINATED_CLUSTER_ID
from repl_harness import FIND_CLUSTER, Call, Repl, wait_for

STEP_FIELDS = {"step", "tag", "status", "command_file", "started_at", "finished_at", "elapsed_seconds"}
SESSION_FIELDS = {"status", "cluster_id", "context_id", "session_name", "step_counter", "created_at",
                  "profile", "steps", "active_command"}


# -- the spec's five evals ----------------------------------------------------------------------------

def test_fibonacci_prints_55(session):
    call = session.exec("def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nprint(fib(10))",
                        "fib")
    assert call.status == "Finished" and call.code == 0
    assert call["cmd_id"] == "001_fib"
    assert call["stdout_preview"] == "55\n"
    assert session.read(call["stdout_file"]) == "55\n"
    assert call["stdout_bytes"] == 3 and call["stderr_bytes"] == 0


def test_cancel_with_nothing_running_says_nothing_to_cancel(session):
    call = session.run("cancel")
    assert call.status == "NothingToCancel" and call.code != 0
    assert "hint" in call.body


@pytest.mark.slow
def test_cancel_a_long_sleep_from_another_terminal_and_keep_using_the_session(session):
    session.exec("marker = 'still here'", "setup")
    waiting = session.popen("exec", "--command", "import time\ntime.sleep(120)", "--tag", "sleep")
    assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
    started = time.monotonic()
    cancel = session.run("cancel")
    assert cancel.status == "Cancelled" and cancel.code == 0, cancel
    assert cancel["cmd_id"] == "002_sleep"
    exec_call = session.finish(waiting)
    assert time.monotonic() - started < 10
    assert exec_call.status == "Cancelled"  # the waiting exec sees the cancellation too
    after = session.exec("print(marker)", "after")
    assert after.status == "Finished" and after["stdout_preview"] == "still here\n"
    steps = {s["step"]: s["status"] for s in session.session()["steps"]}
    assert steps[2] == "Cancelled"
    assert session.session()["active_command"] is None


@pytest.mark.slow
def test_timeout_then_await_collects_the_result(session):
    first = session.exec("import time\ntime.sleep(7)\nprint('done')", "slow", "--timeout", "5")
    assert first.status == "Running" and first.code == 3
    assert first["command_id"] and first["elapsed_seconds"] >= 5
    assert set(first["tip"]) == {"await", "cancel"}
    assert session.session()["active_command"]["command_id"] == first["command_id"]
    second = session.run("await", "--timeout", "30")
    assert second.status == "Finished" and second["stdout_preview"] == "done\n"
    assert session.session()["active_command"] is None
    assert session.run("await").status == "NothingToAwait"


@pytest.mark.slow
def test_timeout_then_cancel(session):
    first = session.exec("import time\ntime.sleep(60)", "slow", "--timeout", "1")
    assert first.status == "Running"
    cancel = session.run("cancel")
    assert cancel.status == "Cancelled" and cancel["command_id"] == first["command_id"]
    assert session.run("await").status == "NothingToAwait"
    assert session.exec("print(1 + 1)", "next").status == "Finished"


# -- create ------------------------------------------------------------------------------------------

def test_create_writes_the_session_file_with_the_spec_fields(repl):
    call = repl.create(RUNNING_CLUSTER_ID, "churn-analysis")
    assert call.status == "Created" and call.code == 0
    assert call["context_id"] and call["cluster_id"] == RUNNING_CLUSTER_ID
    session = repl.session()
    assert SESSION_FIELDS <= set(session)
    assert session["status"] == "active" and session["session_name"] == "churn-analysis"
    assert session["context_id"] == call["context_id"] and session["steps"] == []
    assert repl.workspace.token not in json.dumps(session)
    repl.run("destroy")


def test_second_create_on_a_live_session_answers_session_exists(session):
    again = session.create()
    assert again.status == "SessionExists" and again.code != 0
    assert again["context_id"] == session.session()["context_id"]


def test_create_on_a_stopped_cluster_names_its_state_quickly(repl):
    started = time.monotonic()
    call = repl.create(TERMINATED_CLUSTER_ID)
    assert call.status == "ClusterNotRunning" and call.code != 0
    assert "TERMINATED" in call["message"] and call["cluster_state"] == "TERMINATED"
    assert time.monotonic() - started < 10
    assert not os.path.exists(os.path.join(repl.project_dir, "session.json"))


def test_create_on_an_unknown_or_job_cluster_is_refused(repl):
    assert repl.create("0000-000000-nosuch00").status == "ClusterNotFound"
    assert repl.create(JOB_CLUSTER_ID).status == "ClusterNotSupported"


def test_context_limit_answers_context_limit_reached(workspace, repl, tmp_path):
    workspace.configure(context_limit=1, idle_context_tracking=False)  # no LRU eviction
    assert repl.create().status == "Created"
    other = tmp_path / "other"
    other.mkdir()
    call = Repl(workspace, other, repl.home).create()
    assert call.status == "ContextLimitReached" and call.code != 0
    assert "Destroy unused sessions" in call["hint"]
    repl.run("destroy")


def test_bad_token_answers_auth_error_without_the_secret(repl):
    call = repl.run("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x",
                    env={"DATABRICKS_TOKEN": "dapi-wrong-secret-token"})
    assert call.status == "AuthError" and call.code != 0
    assert "dapi-wrong-secret-token" not in call.stdout + call.stderr


def test_unknown_profile_answers_auth_error(repl):
    call = repl.run("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x",
                    "--profile", "nosuchprofile", env={"DATABRICKS_HOST": "", "DATABRICKS_TOKEN": ""})
    assert call.status == "AuthError"
    assert "nosuchprofile" in call["message"]


def test_profile_from_databrickscfg_is_used_and_remembered(repl):
    cfg = os.path.join(repl.home, ".databrickscfg")
    with open(cfg, "w") as f:
        f.write(f"[local]\nhost = {repl.workspace.host}\ntoken = {repl.workspace.token}\n")
    env = {"DATABRICKS_HOST": "", "DATABRICKS_TOKEN": ""}
    created = repl.run("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "p",
                       "--profile", "local", env=env)
    assert created.status == "Created", created
    assert repl.session()["profile"] == "local"
    # later calls reuse the session's profile without --profile
    assert repl.exec("print('via profile')", "p", env=env).status == "Finished"
    assert repl.run("destroy", env=env).status == "Destroyed"


@pytest.mark.slow
def test_a_change_of_credentials_counts_on_the_next_call(workspace, session, tmp_path):
    assert session.exec("print(1)", "env_token").status == "Finished"
    wrong = session.exec("print(2)", "wrong_token", env={"DATABRICKS_TOKEN": "not-the-token"})
    assert wrong.status == "AuthError" and wrong.code == 1, wrong
    # Credentials from a config file instead of the environment; then the file changes.
    config = tmp_path / "databrickscfg"
    config.write_text(f"[DEFAULT]\nhost = {workspace.host}\ntoken = {workspace.token}\n\n"
                      f"[other]\nhost = {workspace.host}\ntoken = {workspace.token}\n")
    session.env = {k: v for k, v in session.env.items() if k not in ("DATABRICKS_HOST", "DATABRICKS_TOKEN")}
    session.env["DATABRICKS_CONFIG_FILE"] = str(config)
    assert session.exec("print(3)", "file_token").status == "Finished"
    config.write_text(f"[DEFAULT]\nhost = {workspace.host}\ntoken = stale-token\n\n"
                      f"[other]\nhost = {workspace.host}\ntoken = {workspace.token}\n")
    assert session.exec("print(4)", "stale_file_token").status == "AuthError"
    by_profile = session.exec("print(5)", "other_profile", "--profile", "other")
    assert by_profile.status == "Finished" and by_profile["stdout_preview"] == "5\n"


# -- exec ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_state_persists_across_execs_and_steps_are_logged(session):
    assert session.exec("import math\nx = 21", "define").status == "Finished"
    call = session.exec("x * 2", "use")
    assert call["stdout_preview"].strip() == "42"
    log = session.session()
    assert [s["step"] for s in log["steps"]] == [1, 2]
    assert log["step_counter"] == 2
    for entry in log["steps"]:
        assert STEP_FIELDS <= set(entry)
        assert entry["status"] == "Finished"
    assert session.read(log["steps"][0]["command_file"]) == "import math\nx = 21"


@pytest.mark.slow
def test_python_exception_is_an_error_with_the_type_and_message(session):
    call = session.exec("print('before')\n1/0", "boom")
    assert call.status == "Error" and call.code == 1
    assert call["error"] == {"type": "ZeroDivisionError", "message": "division by zero"}
    assert "ZeroDivisionError: division by zero" in call["stderr_preview"]
    stderr = session.read(call["stderr_file"])
    assert "\x1b" not in stderr and "ZeroDivisionError" in stderr and "_dbx_repl" not in stderr
    assert session.read(call["stdout_file"]) == "before\n"
    assert session.session()["steps"][-1]["status"] == "Error"


def test_command_from_file_and_from_stdin(session, tmp_path):
    script = tmp_path / "step.py"
    script.write_text("print('from file')\n")
    assert session.exec(f"@{script}", "file")["stdout_preview"] == "from file\n"
    call = session.run("exec", "--command", "-", "--tag", "stdin", stdin="print('from stdin')\n")
    assert call["stdout_preview"] == "from stdin\n"


@pytest.mark.slow
def test_a_large_command_on_stdin_arrives_whole(session):
    code = "data = %r\nprint(len(data), data[-3:])" % ("x" * 3_000_000 + "end")
    call = session.run("exec", "--command", "-", "--tag", "big_stdin", stdin=code)
    assert call.status == "Finished" and call["stdout_preview"] == "3000003 end\n", call
    assert session.read(call["outputs"][0]["path"]) == code


@pytest.mark.slow
def test_ctrl_c_cancels_the_remote_command_and_records_the_step(session):
    proc = session.popen("exec", "--command", "import time\ntime.sleep(120)", "--tag", "sleepy")
    assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
    proc.send_signal(signal.SIGINT)
    call = session.finish(proc, timeout=30)
    assert call.status == "Cancelled" and call.code != 0
    assert call["message"].startswith("Command interrupted by user.")
    assert call["cmd_id"] == "001_sleepy"
    assert session.session()["steps"][-1]["status"] == "Cancelled"
    assert session.exec("print('alive')", "after").status == "Finished"


def test_paths_in_responses_work_from_the_callers_directory(workspace, tmp_path):
    caller = tmp_path / "caller"
    project = caller / "work" / "proj"
    project.mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    repl = Repl(workspace, os.path.join("work", "proj"), home, cwd=caller)
    assert repl.create().status == "Created"
    call = repl.exec("print('hi')", "hello")
    assert call["stdout_file"] == os.path.join("work", "proj", "repl_outputs", "001_hello.stdout")
    with open(os.path.join(caller, call["stdout_file"])) as f:
        assert f.read() == "hi\n"
    repl.run("destroy")


@pytest.mark.slow
def test_step_numbers_never_repeat_across_destroy_and_create(session):
    session.exec("a = 1", "one")
    session.exec("a += 1", "two")
    assert session.run("destroy").status == "Destroyed"
    assert session.create().status == "Created"
    call = session.exec("print('three')", "three")
    assert call["cmd_id"] == "003_three"
    archived = os.listdir(os.path.join(session.project_dir, "repl_outputs", "previous_sessions"))
    assert len(archived) == 1


def test_tags_are_sanitised_into_safe_file_names(session):
    call = session.exec("print(1)", "../../etc/passwd me")
    assert call.status == "Finished"
    assert call["cmd_id"] == "001_etc_passwd_me"
    assert os.path.dirname(session.path(call["stdout_file"])).endswith("repl_outputs")


# -- eviction ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_exec_after_eviction_reports_the_replay_plan_and_a_fresh_context(workspace, session):
    session.exec("x = 1", "load")
    session.exec("x = x + 1", "transform")
    old_context = session.session()["context_id"]
    workspace.evict(old_context)
    call = session.exec("print(x)", "report")
    assert call.status == "ContextEvicted" and call.code != 0
    assert call["old_context_id"] == old_context and call["new_context_id"] != old_context
    assert call["replay_plan"]["steps"] == "1,2"
    assert os.path.exists(session.path(call["replay_plan"]["file"]))
    assert session.session()["context_id"] == call["new_context_id"]
    assert session.session()["steps"][-1]["status"] == "Evicted"
    after = session.exec("print('fresh')", "fresh")
    assert after.status == "Finished"
    missing = session.exec("print(x)", "gone")
    assert missing.status == "Error" and missing["error"]["type"] == "NameError"


@pytest.mark.slow
def test_await_after_eviction_reports_context_evicted(workspace, session):
    workspace.configure(shutdown_aborts_commands=False)  # the running command vanishes with it
    running = session.exec("import time\ntime.sleep(60)", "long", "--timeout", "0.5")
    assert running.status == "Running"
    workspace.evict()
    call = session.run("await", "--timeout", "10")
    assert call.status == "ContextEvicted"
    assert session.session()["active_command"] is None


def test_a_bad_parameter_error_does_not_rebuild_the_context(session):
    before = session.session()["context_id"]
    call = session.run("cancel", "--run-id", "0" * 32)
    assert call.status not in ("ContextEvicted", "Cancelled")
    assert session.session()["context_id"] == before


# -- destroy, await, no session ----------------------------------------------------------------------

@pytest.mark.slow
def test_destroy_keeps_the_steps_and_tolerates_a_gone_context(workspace, session):
    session.exec("print(1)", "one")
    workspace.evict()
    call = session.run("destroy")
    assert call.status == "Destroyed" and call.code == 0
    log = session.session()
    assert log["status"] == "destroyed" and len(log["steps"]) == 1
    assert session.run("destroy").status == "Destroyed"
    assert session.exec("print(1)", "late").status == "SessionDestroyed"


def test_commands_without_a_session_say_no_session(repl):
    for args in (("exec", "--command", "1", "--tag", "t"), ("await",), ("cancel",), ("destroy",)):
        call = repl.run(*args)
        assert call.status == "NoSession" and call.code != 0
        assert "create" in call["hint"]


def test_usage_errors_are_json_too(repl):
    call = repl.run("exec", "--tag", "t")
    assert call.status == "UsageError" and call.code == 2
    call = repl.run("frobnicate", project=False)
    assert call.status == "UsageError"


# -- find_cluster --------------------------------------------------------------------------------------

def _find(repl, *args):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, FIND_CLUSTER, *args], capture_output=True, text=True,
                          env=repl.env, timeout=60)
    return Call([FIND_CLUSTER, *args], proc.returncode, proc.stdout, proc.stderr)


def test_find_cluster_one_match_is_an_object_with_the_choice_fields(repl):
    call = _find(repl, "--name", "DEV")
    assert call.status == "Found" and call.code == 0
    assert call["cluster_id"] == RUNNING_CLUSTER_ID and call["state"] == "RUNNING"
    assert call["all_purpose"] is True and call["access_mode"]


def test_find_cluster_several_matches_rank_the_exact_name_first(repl):
    call = _find(repl, "--name", "analytics")
    assert call.status == "Ambiguous" and len(call["matches"]) >= 2
    exact = _find(repl, "--name", "shared-analytics")
    assert exact.status == "Found" and exact["cluster_id"] == SHARED_CLUSTER_ID
    job = _find(repl, "--name", "job-")
    assert job["all_purpose"] is False


def test_find_cluster_with_no_match(repl):
    call = _find(repl, "--name", "no-such-cluster")
    assert call.status == "ClusterNotFound" and call.code != 0


@pytest.mark.slow
def test_a_repl_that_lost_its_helpers_gets_them_back_and_runs_the_step(session):
    # A Python restart (dbutils.library.restartPython()) clears the REPL, bootstrap included.
    assert session.exec("del _dbx_repl", "forget").status == "Finished"
    call = session.exec("print(sub_llm('upper: back'))", "after_restart")
    assert call.status == "Finished", call
    assert call["stdout_preview"] == "BACK\n"
    assert "installed again" in call["message"]
    assert session.exec("print('normal')", "next")["message"] == "The command finished."


def test_installed_console_scripts_speak_the_same_json(repl):
    import subprocess
    import sysconfig
    for script, args in (("dbx-repl", ["find-cluster", "--name", "dev"]), ("dbx-find-cluster", ["--name", "dev"])):
        path = os.path.join(sysconfig.get_path("scripts"), script)
        assert os.path.exists(path), f"{script} is not installed: run pip install -e ."
        proc = subprocess.run([path, *args], capture_output=True, text=True, env=repl.env, timeout=60)
        call = Call([script, *args], proc.returncode, proc.stdout, proc.stderr)
        assert call.status == "Found" and call["cluster_id"] == RUNNING_CLUSTER_ID
