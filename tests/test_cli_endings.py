"""Every way a step ends gets its own honest answer, and nothing it printed is lost.

Each test drives the CLI as a subprocess against the local workspace and checks the three things an
agent acts on: the status (and exit code), what is on disk, and a hint that works when followed.
references/statuses.md lists the same endings.
"""

import os
import signal
import stat

import pytest

from local_workspace.paths import host_path
from repl_harness import printed_so_far, wait_for

RESTART_TEXT = ("java.lang.IllegalStateException: jupyter client is not available because the python kernel "
                "is not defined. The kernel may be restarting or the repl may have been shut down.")


def active_command_id(session):
    return (session.session().get("active_command") or {}).get("command_id")


def driver_copies(session):
    """Where the session's output copies on the driver (its /tmp) live on the host."""
    return host_path(session.workspace._tmpdir, session.session()["cluster_id"],
                     "/tmp/dbx_repl_" + session.session()["session_id"])


# -- finished and raised ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_custom_exception_keeps_its_qualified_name_and_its_whole_message(session):
    call = session.exec("class MyError(Exception):\n    pass\nraise MyError('first line\\nsecond line')", "mine")
    assert call.status == "Error" and call.code == 1, call
    assert call["error"] == {"type": "MyError", "message": "first line\nsecond line"}
    assert session.read(call["stderr_file"]).endswith("MyError: first line\nsecond line\n")

    module_error = ("import sys, types\n"
                    "mymod = sys.modules['mymod'] = types.ModuleType('mymod')\n"
                    "exec('class MyError(Exception):\\n    pass', mymod.__dict__)\n"
                    "raise mymod.MyError('from a module')")
    call = session.exec(module_error, "module")
    assert call["error"] == {"type": "mymod.MyError", "message": "from a module"}
    assert call["message"] == "The command raised mymod.MyError: from a module"
    assert "fix the code" in call["hint"]


@pytest.mark.slow
def test_a_huge_multi_line_message_is_whole_in_the_file_and_bounded_in_the_response(session):
    call = session.exec("raise ValueError('\\n'.join('line %04d' % i for i in range(2000)))", "long")
    assert call.status == "Error"
    assert call["error"]["message"].startswith("line 0000\nline 0001\n")
    assert len(call["error"]["message"]) <= 500 and call["error"]["message"].endswith("...")
    assert len(call.stdout.encode()) < 4096
    stderr = session.read(call["stderr_file"])
    assert "line 1999" in stderr and stderr.count("\nline ") == 1999


@pytest.mark.slow
def test_sys_exit_0_is_a_normal_end_and_keeps_the_variables(session):
    call = session.exec("kept = 41\nprint('bye')\nimport sys\nsys.exit(0)", "exit0")
    assert call.status == "Finished" and call.code == 0, call
    assert "sys.exit(0)" in call["message"] and "error" not in call.body
    assert session.read(call["stdout_file"]) == "bye\n"
    assert session.exec("print(kept + 1)", "after")["stdout_preview"] == "42\n"

    bare = session.exec("import sys\nsys.exit()", "bare_exit")
    assert bare.status == "Finished" and bare.code == 0


@pytest.mark.slow
def test_sys_exit_with_a_code_is_an_error_that_names_the_exit_and_not_a_bug(session):
    call = session.exec("print('partial')\nraise SystemExit(3)", "exit3")
    assert call.status == "Error" and call.code == 1
    assert call["error"] == {"type": "SystemExit", "message": "3"}
    assert "sys.exit(3)" in call["hint"] and "fix the code" not in call["hint"]
    assert session.read(call["stdout_file"]) == "partial\n"


# -- cancelled ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["cancelled", "finished_error"])
def test_a_cancel_keeps_what_the_step_printed_before_it(workspace, session, mode):
    workspace.configure(cancel_mode=mode)
    waiting = session.popen("exec", "--command", "import time\nprint('started', flush=True)\ntime.sleep(60)",
                            "--tag", "nap")
    assert wait_for(lambda: printed_so_far(session, "001_nap") == "started\n", 15)
    cancel = session.run("cancel")
    assert cancel.status == "Cancelled" and cancel.code == 0, cancel
    call = session.finish(waiting)
    assert call.status == "Cancelled" and call.code == 1 and "error" not in call.body, call
    assert session.read(call["stdout_file"]) == "started\n"
    assert "variables are intact" in call["hint"]
    assert [s["status"] for s in session.session()["steps"]] == ["Cancelled"]


@pytest.mark.slow
def test_a_cancel_from_another_client_is_a_cancel_with_the_output_kept(session, sdk_client):
    waiting = session.popen("exec", "--command", "import time\nprint('step one', flush=True)\ntime.sleep(60)",
                            "--tag", "elsewhere")
    command_id = wait_for(lambda: active_command_id(session), 15)
    assert wait_for(lambda: printed_so_far(session, "001_elsewhere") == "step one\n", 15)
    log = session.session()
    sdk_client.api_client.do("POST", "/api/1.2/commands/cancel", body={
        "clusterId": log["cluster_id"], "contextId": log["context_id"], "commandId": command_id})
    call = session.finish(waiting)
    assert call.status == "Cancelled" and "error" not in call.body, call
    assert session.read(call["stdout_file"]) == "step one\n"


@pytest.mark.slow
def test_a_keyboard_interrupt_result_is_reported_as_a_cancel_not_an_error(session):
    # pyspark's SIGINT handler turns a cancel into KeyboardInterrupt; the service then answers
    # Finished with that error, whichever client asked for the cancel.
    call = session.exec("print('working')\nraise KeyboardInterrupt", "interrupted")
    assert call.status == "Cancelled" and "error" not in call.body, call
    assert session.read(call["stdout_file"]) == "working\n"
    assert session.exec("print('alive')", "after")["stdout_preview"] == "alive\n"


# -- the context dies under the step ------------------------------------------------------------------

@pytest.mark.slow
def test_a_crash_says_the_variables_are_lost_keeps_the_printed_lines_and_never_advises_get(session):
    assert session.exec("x = 1", "setup").status == "Finished"
    old_context = session.session()["context_id"]
    call = session.exec("y = x + 1\nprint('before the crash')\nimport os\nos._exit(1)", "crash")
    assert call.status == "ContextLost" and call.code == 1, call
    assert "died" in call["message"] and "variables" in call["message"]
    assert " get " not in call.stdout and "get --project-dir" not in call.stdout
    assert call["old_context_id"] == old_context != call["new_context_id"]
    assert call["failed_step"] == "002_crash" and "replay" in call["tip"]
    assert "printed before the loss (17 bytes) is in repl_outputs/002_crash.stdout" in call["message"]
    with open(os.path.join(session.project_dir, "repl_outputs", "002_crash.stdout")) as f:
        assert f.read() == "before the crash\n"
    assert [s["status"] for s in session.session()["steps"]] == ["Finished", "ContextLost"]
    # following the tip restores the state
    replayed = session.run("replay", "--steps", "1")
    assert replayed.status == "Replayed", replayed
    assert session.exec("print(x)", "check")["stdout_preview"] == "1\n"


@pytest.mark.slow
def test_a_crash_that_also_took_the_driver_copy_says_the_output_is_lost(session):
    code = "import os, shutil\nprint('gone soon')\nshutil.rmtree(_dbx_repl.out_dir)\nos._exit(1)"
    call = session.exec(code, "wiped")
    assert call.status == "ContextLost", call
    assert "printed before the loss is lost too" in call["message"]
    with open(os.path.join(session.project_dir, "repl_outputs", "001_wiped.stdout"), "rb") as f:
        assert f.read() == b""


@pytest.mark.slow
def test_ctrl_c_during_exec_cancels_and_keeps_what_was_printed(session):
    waiting = session.popen("exec", "--command", "import time\nprint('begun', flush=True)\ntime.sleep(60)",
                            "--tag", "interrupted")
    assert wait_for(lambda: printed_so_far(session, "001_interrupted") == "begun\n", 15)
    waiting.send_signal(signal.SIGINT)
    call = session.finish(waiting)
    assert call.status == "Cancelled" and call.code == 130, call
    assert call["message"].startswith("Command interrupted by user.")
    assert session.read(call["stdout_file"]) == "begun\n"


@pytest.mark.slow
def test_a_python_restart_under_a_step_says_the_variables_are_gone(session):
    # The shape of a REPL whose Python restarted mid-step (the context lives on, fresh): the step
    # fails and the helpers are gone. Built here by forgetting the helpers and the interpreter mark.
    code = ("import sys\nprint('before restart')\ndel sys._dbx_repl_installed\n"
            "del globals()['_dbx_repl']\nraise RuntimeError('the kernel died')")
    call = session.exec(code, "restarted")
    assert call.status == "ContextLost" and call.code == 1, call
    assert "restarted while the step ran" in call["message"] and "variables" in call["message"]
    assert call["context_id"] == session.session()["context_id"]
    assert "get --project-dir" not in call.stdout
    assert session.read(os.path.join("repl_outputs", "001_restarted.stdout")) == "before restart\n"
    assert session.exec("print('on')", "after")["stdout_preview"] == "on\n"


@pytest.mark.slow
def test_a_step_that_removed_the_helpers_still_reports_its_own_error(session):
    call = session.exec("print('x')\ndel globals()['_dbx_repl']\nraise ValueError('mine')", "no_helpers")
    assert call.status == "Error" and call["error"] == {"type": "ValueError", "message": "mine"}, call
    assert session.read(call["stdout_file"]) == "x\n"


@pytest.mark.slow
def test_an_eviction_under_a_running_step_salvages_its_printed_lines(workspace, session):
    waiting = session.popen("exec", "--command", "import time\nprint('halfway', flush=True)\ntime.sleep(60)",
                            "--tag", "doomed")
    assert wait_for(lambda: printed_so_far(session, "001_doomed") == "halfway\n", 15)
    workspace.evict()
    call = session.finish(waiting)
    assert call.status == "ContextEvicted", call
    assert "variables and imports are gone" in call["message"]
    with open(os.path.join(session.project_dir, "repl_outputs", "001_doomed.stdout")) as f:
        assert f.read() == "halfway\n"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cancelled", "finished_error"])
def test_code_that_swallows_the_cancel_gets_killed_and_the_answer_says_the_state_is_gone(workspace, session, mode):
    # The service interrupts for ~10 s, then kills the Python process. In finished_error mode the
    # step then ends Finished with CommandCancelledException, exactly like a user cancel: only the
    # probe of the context tells them apart.
    workspace.configure(cancel_mode=mode)
    code = ("import time\nprint('stubborn', flush=True)\nwhile True:\n"
            "    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass")
    running = session.exec(code, "stubborn", "--timeout", "1")
    assert running.status == "Running", running
    cancel = session.run("cancel", timeout=60)
    if cancel.status == "Cancelling":   # the service's kill came after cancel's 10 s confirmation window
        assert cancel.code == 1 and "await" in cancel["hint"], cancel
        cancel = session.run("await", "--timeout", "30", timeout=60)
    assert cancel.status == "ContextLost" and cancel.code == 1, cancel
    assert "KeyboardInterrupt" in cancel["message"] and "variables" in cancel["message"]
    assert "change the failed step" in cancel["hint"]
    assert session.session()["steps"][-1]["status"] == "ContextLost"
    with open(os.path.join(session.project_dir, "repl_outputs", "001_stubborn.stdout")) as f:
        assert f.read() == "stubborn\n"
    assert session.exec("print('fresh')", "fresh")["stdout_preview"] == "fresh\n"


# -- restart windows ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_restart_window_on_submit_is_waited_out_and_the_step_runs_once(workspace, session):
    workspace.inject("/api/1.2/commands/execute", method="POST", count=2, status=500, retry_after=None,
                     body={"error": RESTART_TEXT})
    call = session.exec("print('ran')", "after_restart")
    assert call.status == "Finished" and call.code == 0, call
    assert session.read(call["stdout_file"]) == "ran\n"
    statuses = [r["status"] for r in workspace.requests() if r["path"] == "/api/1.2/commands/execute"]
    assert statuses.count(500) == 2


@pytest.mark.slow
def test_a_python_step_that_met_a_restart_window_is_run_again_once(session):
    # The step's command reaches a REPL whose Python is not there: the error result carries the
    # restart text and nothing of the step ran.
    setup = session.exec("runs = []\n_dbx_repl.run = lambda *args: (_ for _ in ()).throw(RuntimeError(%r))"
                         % RESTART_TEXT, "break_once")
    assert setup.status == "Finished"
    call = session.exec("runs.append(1)\nprint(len(runs))", "counted")
    assert call.status == "Finished", call
    assert session.read(call["stdout_file"]) == "1\n"


@pytest.mark.slow
def test_a_magic_step_that_restarted_python_is_not_run_again(session, tmp_path):
    marker = tmp_path / "installs.txt"
    setup = session.exec("_dbx_repl.begin_magic = lambda *args: (_ for _ in ()).throw(RuntimeError(%r))"
                         % RESTART_TEXT, "break_magic")
    assert setup.status == "Finished"
    call = session.exec(f"!echo installed >> {marker}", "pip_like")
    assert call.status == "Finished" and call.code == 0, call
    assert "Python restarted" in call["message"] and "replay" in call["hint"]
    assert not marker.exists()  # the REPL never ran it, and the CLI did not send it again
    assert session.exec("print('helpers back')", "after")["stdout_preview"] == "helpers back\n"


# -- nothing lost -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_logging_handler_from_an_earlier_step_lands_in_error_and_table_steps(session):
    setup = ("import logging, sys\nlog = logging.getLogger('pipeline')\n"
             "log.addHandler(logging.StreamHandler(sys.stdout))\nlog.setLevel(logging.INFO)")
    assert session.exec(setup, "logger").status == "Finished"
    failed = session.exec("log.info('loading failed')\n1/0", "fails")
    assert failed.status == "Error"
    assert session.read(failed["stdout_file"]) == "loading failed\n"
    table = session.exec("log.info('rows ready')\ndisplay([[1, 'a']], columns=['k', 'v'])", "table")
    assert session.read(table["stdout_file"]).startswith("rows ready\n")
    big = session.exec("log.info('start')\nprint('x' * 60000)\nlog.info('end')", "long")
    assert session.read(big["stdout_file"]) == "start\n" + "x" * 60000 + "\nend\n"


@pytest.mark.slow
def test_the_notebook_exit_value_is_its_own_field_and_display_html_follows_the_printed_text(session):
    exited = session.exec("print('before exit')\ndbutils.notebook.exit('the value')", "exit_value")
    assert exited.status == "Finished", exited
    assert exited["exit_value"] == "the value" and exited["truncated"] is False
    assert session.read(exited["stdout_file"]) == "before exit\n"
    # printed text that contains the exit value does not swallow it
    same = session.exec("print('42')\ndbutils.notebook.exit('42')", "exit_same")
    assert same["exit_value"] == "42" and session.read(same["stdout_file"]) == "42\n"
    html = session.exec("print('report')\ndisplayHTML('<b>bold</b>')", "html")
    assert html.status == "Finished"
    assert session.read(html["stdout_file"]) == "report\n<b>bold</b>\n"


@pytest.mark.slow
def test_a_magic_step_keeps_its_output_even_when_cancelled(session):
    done = session.exec("!echo hello from the shell", "shell")
    assert done.status == "Finished"
    assert session.read(done["stdout_file"]).rstrip("\n") == "hello from the shell"
    waiting = session.popen("exec", "--command", "!echo first\n!sleep 60", "--tag", "slow_shell")
    assert wait_for(lambda: printed_so_far(session, "002_slow_shell") == "first\n", 15)
    assert session.run("cancel").status == "Cancelled"
    call = session.finish(waiting)
    assert call.status == "Cancelled"
    assert session.read(call["stdout_file"]) == "first\n"


# -- plots --------------------------------------------------------------------------------------------

PLOTS = """
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
shown, ax = plt.subplots(figsize=(3, 2))
ax.plot([1, 3, 2])
display(shown)
plt.figure(figsize=(2, 2)); plt.plot([3, 1])
plt.show()
plt.figure(figsize=(4, 1)); plt.plot([1, 1])
class Dot:
    def _repr_png_(self):
        import io
        fig = matplotlib.figure.Figure(figsize=(1, 1))
        fig.add_subplot().plot([0, 1])
        buffer = io.BytesIO()
        fig.savefig(buffer, format='png')
        return buffer.getvalue()
display(Dot())
"""


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.slow
def test_every_kind_of_plot_is_saved_once_by_the_driver(session):
    call = session.exec(PLOTS, "plots")
    assert call.status == "Finished", call
    sizes = [png_size(session.read(path, "rb")) for path in call["images"]]
    # display(fig), plt.show(), _repr_png_, then the figure left open at the end of the step
    assert sizes == [(300, 200), (200, 200), (100, 100), (400, 100)]
    again = session.exec("print(len(plt.get_fignums()))", "later")
    assert "images" not in again.body and again["stdout_preview"] == "0\n"


# -- previews, consoles, indentation ------------------------------------------------------------------

def test_a_progress_bar_preview_shows_only_its_last_frame_and_the_file_keeps_every_frame(session):
    code = "import sys\nfor i in range(0, 101, 10):\n    sys.stdout.write('\\rprogress %3d%%' % i)\nprint()\nprint('done')"
    call = session.exec(code, "progress")
    assert call["stdout_preview"] == "progress 100%\ndone\n"
    raw = session.read(call["stdout_file"], "rb")
    assert raw.count(b"\r") == 11 and raw.startswith(b"\rprogress   0%")


@pytest.mark.parametrize("encoding", ["cp1252", "ascii"])
def test_the_response_is_valid_json_on_a_console_that_cannot_encode_the_output(session, encoding):
    text = "h\u00e9llo \u2713 \u4e16\u754c"
    call = session.exec(f"print({text!r})", "unicode_" + encoding, env={"PYTHONIOENCODING": encoding})
    assert call.status == "Finished" and call.code == 0, call
    assert call.stdout.isascii() and call["stdout_preview"] == text + "\n"
    with open(session.path(call["stdout_file"]), encoding="utf-8") as f:
        assert f.read() == text + "\n"
    assert session.session()["steps"][-1]["status"] == "Finished"


@pytest.mark.slow
def test_a_uniformly_indented_cell_runs_as_the_service_runs_it(session):
    call = session.exec("    total = 0\n    for i in range(4):\n        total += i\n    print(total)", "indented")
    assert call.status == "Finished", call
    assert session.read(call["stdout_file"]) == "6\n"
    broken = session.exec("  x = 1\n y = 2", "bad_indent")
    assert broken.status == "Error" and broken["error"]["type"] == "IndentationError"


# -- driver copies ------------------------------------------------------------------------------------

def test_driver_copies_are_private_and_removed_on_destroy(session):
    call = session.exec("print('secret-ish')", "private")
    assert call.status == "Finished"
    copies = driver_copies(session)
    copy = os.path.join(copies, call["cmd_id"] + ".out")
    assert stat.S_IMODE(os.stat(copy).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(copies).st_mode) == 0o700
    assert session.run("destroy").status == "Destroyed"
    assert not os.path.exists(copies)


@pytest.mark.slow
def test_create_replacing_a_session_removes_the_old_sessions_copies(workspace, session):
    assert session.exec("print('old')", "old").status == "Finished"
    copies = driver_copies(session)
    workspace.evict()  # destroy then cannot reach a REPL to clean up
    assert session.run("destroy").status == "Destroyed"
    assert os.path.isdir(copies)
    old_session_id = session.session()["session_id"]
    assert session.create().status == "Created"
    assert not os.path.exists(copies)
    assert session.session()["session_id"] != old_session_id
