"""The warm client: a per-project process that keeps the SDK imported, so that a call costs little
more than starting Python. Through the CLI as an agent runs it, on the local workspace: a call
answers the same warm or cold, Ctrl+C still cancels, a change of credentials counts at once, a
killed warm process costs one cold call, and nothing is left running after destroy or when idle."""

import json
import os
import signal
import subprocess
import time

from repl_harness import Call, Repl, wait_for



# -- seeing the warm process from outside (Linux /proc) ------------------------------------------------

def _processes():
    """{pid: (ppid, argv)} of every live process we can read (zombies left out)."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                state, ppid = f.read().rsplit(b")", 1)[1].split()[:2]
            if state == b"Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError, ValueError):
            continue
        found[int(name)] = (int(ppid), argv)
    return found


def warm_pids(repl):
    """The warm processes serving this project (normally at most one)."""
    root = os.path.abspath(repl.project_dir)
    return sorted(pid for pid, (_, argv) in _processes().items()
                  if "__warm_serve__" in argv and argv[-1] == root)


def children_of(pid):
    return [child for child, (ppid, _) in _processes().items() if ppid == pid]


def socket_of(pid):
    """The Unix socket a warm process listens on (its argv: __warm_serve__ SOCKET PROJECT)."""
    return _processes()[pid][1][-2]


def warm_process(repl):
    """The one warm process of the project, once it listens (the first call starts it)."""
    pids = wait_for(lambda: warm_pids(repl), 15)
    assert len(pids) == 1, pids
    assert wait_for(lambda: os.path.exists(socket_of(pids[0])), 15)
    return pids[0]


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat", "rb") as f:      # a zombie waiting for init counts as gone
        return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"


def comparable(call):
    """A step's answer without what differs between any two runs: its timing, and its step key
    (NNN_tag) wherever it appears."""
    body = {k: v for k, v in call.body.items() if k != "elapsed_seconds"}
    return json.loads(json.dumps(body).replace(call["cmd_id"], "NNN_tag"))


# -- the stories ---------------------------------------------------------------------------------------

def test_a_step_answers_the_same_warm_and_cold(session):
    daemon = warm_process(session)
    code = "import time\ntime.sleep(1)\nx = 21\nprint(x * 2)\nx"
    proc = session.popen("exec", "--command", code, "--tag", "warm")
    assert wait_for(lambda: children_of(daemon), 15), "the warm process runs the call in a child"
    warm = session.finish(proc)
    cold = session.exec(code, "cold", env={"DBX_REPL_WARM": "0"})
    assert warm.status == cold.status == "Finished" and warm.code == cold.code == 0
    assert warm["stdout_preview"] == "42\n21\n"
    assert comparable(warm) == comparable(cold)

    failed_warm = session.exec("1 / 0", "boom")
    failed_cold = session.exec("1 / 0", "bust", env={"DBX_REPL_WARM": "0"})
    assert failed_warm.status == "Error" and failed_warm.code == failed_cold.code == 1
    assert comparable(failed_warm) == comparable(failed_cold)

    from_stdin = session.run("exec", "--command", "-", "--tag", "stdin", stdin="print('from stdin')\n")
    assert from_stdin["stdout_preview"] == "from stdin\n"
    bad = session.run("exec", "--command", "print(1)", "--tag", "t", "--timeout", "-1")
    assert bad.status == "InvalidTimeout" and bad.code == 2
    assert warm_pids(session) == [daemon]
    steps = session.session()["steps"]
    assert [s["tag"] for s in steps] == ["warm", "cold", "boom", "bust", "stdin"]


def test_ctrl_c_through_the_warm_client_cancels_the_step(session):
    daemon = warm_process(session)
    proc = session.popen("exec", "--command", "import time\ntime.sleep(120)", "--tag", "sleepy")
    assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
    assert children_of(daemon)
    proc.send_signal(signal.SIGINT)
    call = session.finish(proc, timeout=30)
    assert call.status == "Cancelled" and call.code == 130, call
    assert call["message"].startswith("Command interrupted by user.")
    assert session.session()["steps"][-1]["status"] == "Cancelled"
    assert session.exec("print('alive')", "after").status == "Finished"


def test_sigterm_through_the_warm_client_leaves_the_command_running(session):
    warm_process(session)
    proc = session.popen("exec", "--command", "import time\ntime.sleep(2)\nprint('done')", "--tag", "long")
    assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
    proc.send_signal(signal.SIGTERM)
    call = session.finish(proc)
    assert call.status == "Running" and call.code == 3, call
    done = session.run("await", "--timeout", "30")
    assert done.status == "Finished" and done["stdout_preview"] == "done\n"


def test_a_change_of_credentials_counts_on_the_next_call(workspace, session, tmp_path):
    daemon = warm_process(session)
    assert session.exec("print(1)", "env_token").status == "Finished"
    wrong = session.exec("print(2)", "wrong_token", env={"DATABRICKS_TOKEN": "not-the-token"})
    assert wrong.status == "AuthError" and wrong.code == 1, wrong

    # Credentials from the config file instead of the environment; then the file changes.
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
    assert warm_pids(session) == [daemon], "the same warm process served every call"


def test_a_killed_warm_process_costs_one_cold_call_and_loses_nothing(session):
    daemon = warm_process(session)
    socket_path = socket_of(daemon)
    proc = session.popen("exec", "--command", "import time\ntime.sleep(1.5)\nprint('kept')", "--tag", "k")
    assert wait_for(lambda: children_of(daemon), 15)
    os.kill(daemon, signal.SIGKILL)                  # the call in flight runs on in its own process
    call = session.finish(proc)
    assert call.status == "Finished" and call["stdout_preview"] == "kept\n"
    assert wait_for(lambda: gone(daemon), 10)
    assert os.path.exists(socket_path)               # stale: nobody listens on it

    cold = session.exec("print('after')", "after")
    assert cold.status == "Finished" and cold["stdout_preview"] == "after\n"
    replacement = warm_process(session)              # started by the cold call
    assert replacement != daemon
    again = session.exec("print('warm again')", "again")
    assert again.status == "Finished"
    log = session.session()
    assert [(s["tag"], s["status"]) for s in log["steps"]] == [("k", "Finished"), ("after", "Finished"),
                                                            ("again", "Finished")]
    assert log["active_command"] is None


def test_destroy_leaves_no_warm_process(session):
    daemon = warm_process(session)
    socket_path = socket_of(daemon)
    assert session.exec("print(1)", "one").status == "Finished"
    assert session.run("destroy").status == "Destroyed"
    assert wait_for(lambda: gone(daemon) and not warm_pids(session), 15)
    assert not os.path.exists(socket_path)


def test_destroy_with_the_warm_client_off_still_stops_it(session):
    daemon = warm_process(session)
    assert session.run("destroy", env={"DBX_REPL_WARM": "0"}).status == "Destroyed"
    assert wait_for(lambda: gone(daemon) and not warm_pids(session), 15)


def test_an_idle_warm_process_exits(repl):
    repl.env["DBX_REPL_WARM_IDLE"] = "1"
    assert repl.create().status == "Created"
    daemon = warm_process(repl)
    socket_path = socket_of(daemon)
    assert repl.exec("print(1)", "one").status == "Finished"
    assert wait_for(lambda: gone(daemon), 15)
    assert not warm_pids(repl)
    assert not os.path.exists(socket_path)
    assert repl.exec("print(2)", "two").status == "Finished"   # cold, and starts a new one
    repl.run("destroy")
    assert wait_for(lambda: not warm_pids(repl), 15)


def test_warm_off_runs_every_call_in_process(repl):
    repl.env["DBX_REPL_WARM"] = "0"
    assert repl.create().status == "Created"
    assert repl.exec("print(1)", "one").status == "Finished"
    time.sleep(1)                                    # a warm process would have started by now
    assert not warm_pids(repl)
    assert repl.run("destroy").status == "Destroyed"


def test_the_socket_is_private_and_outside_the_project_dir_whatever_its_path_length(workspace, tmp_path):
    project = tmp_path / ("p" * 60) / ("q" * 60)
    project.mkdir(parents=True)
    home = tmp_path / "home"
    home.mkdir()
    repl = Repl(workspace, project, home)
    assert repl.create().status == "Created"
    daemon = warm_process(repl)
    socket_path = socket_of(daemon)
    assert len(socket_path) < 100 and not socket_path.startswith(str(tmp_path))
    assert (os.stat(os.path.dirname(socket_path)).st_mode & 0o777) == 0o700
    assert (os.stat(socket_path).st_mode & 0o777) == 0o600
    assert sorted(os.listdir(project)) == [".dbx_repl.lock", "repl_outputs", "session.json"]
    proc = repl.popen("exec", "--command", "import time\ntime.sleep(1)\nprint('long path')", "--tag", "t")
    assert wait_for(lambda: children_of(daemon), 15)
    assert repl.finish(proc)["stdout_preview"] == "long path\n"
    assert repl.run("destroy").status == "Destroyed"
    assert wait_for(lambda: not warm_pids(repl) and not os.path.exists(socket_path), 15)


def test_a_changed_cli_file_is_never_served_by_the_old_warm_process(workspace, tmp_path, monkeypatch):
    import repl_harness
    copy = tmp_path / "cli" / "dbx_repl.py"
    copy.parent.mkdir()
    with open(repl_harness.CLI, "rb") as f:
        copy.write_bytes(f.read())
    monkeypatch.setattr(repl_harness, "CLI", str(copy))
    project, home = tmp_path / "project", tmp_path / "home"
    project.mkdir()
    home.mkdir()
    repl = Repl(workspace, project, home)
    assert repl.create().status == "Created"
    old = warm_process(repl)
    assert _processes()[old][1][1] == str(copy)
    stamp = os.stat(copy).st_mtime_ns + 5_000_000_000
    os.utime(copy, ns=(stamp, stamp))                # as an upgrade of the file would
    call = repl.exec("print('new code')", "after_upgrade")
    assert call.status == "Finished" and call["stdout_preview"] == "new code\n"
    assert wait_for(lambda: gone(old), 15), "the old warm process refused the call and exited"
    assert warm_process(repl) != old                 # the cold call started a current one
    repl.run("destroy")
    assert wait_for(lambda: not warm_pids(repl), 15)


def test_a_call_whose_warm_child_dies_answers_warm_client_lost_and_await_collects_the_step(session):
    daemon = warm_process(session)
    proc = session.popen("exec", "--command", "import time\ntime.sleep(1.5)\nprint('still ran')", "--tag", "orphan")
    assert wait_for(lambda: (session.session().get("active_command") or {}).get("command_id"), 15)
    children = children_of(daemon)
    assert len(children) == 1
    os.kill(children[0], signal.SIGKILL)
    call = session.finish(proc)
    assert call.status == "WarmClientLost" and call.code == 1, call
    assert "status" in call["hint"] and "DBX_REPL_WARM=0" in call["hint"]
    done = session.run("await", "--timeout", "30")
    assert done.status == "Finished" and done["stdout_preview"] == "still ran\n" and done["cmd_id"] == "001_orphan"


def test_a_large_command_on_stdin_reaches_the_warm_child_whole(session):
    daemon = warm_process(session)
    code = "data = %r\nimport time\ntime.sleep(1)\nprint(len(data), data[-3:])" % ("x" * 3_000_000 + "end")
    proc = subprocess.Popen(session.argv("exec", "--command", "-", "--tag", "big_stdin"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=session.cwd,
                            env=session.env)
    proc.stdin.write(code)
    proc.stdin.close()
    assert wait_for(lambda: children_of(daemon), 15), "served by the warm process"
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    call = Call(proc.args, proc.wait(timeout=60), stdout, stderr)
    assert call.status == "Finished" and call["stdout_preview"] == "3000003 end\n", call
