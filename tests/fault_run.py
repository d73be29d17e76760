#!/usr/bin/env python3
"""Fault run: the CLI under kills, races, injected faults and bad inputs (not a pytest module).

    python tests/fault_run.py               # 10 trials per row, ~5 minutes
    python tests/fault_run.py --trials 3    # a quick look

Each row runs the CLI as an agent does (a subprocess per call) against a fresh LocalWorkspace and
counts what held and what broke: steps lost or recorded twice, commands run twice, contexts left
alive, calls that answered late, answers that were not one JSON object. It prints a Markdown table;
docs/benchmark.md ("Fault run") quotes it.
"""

import argparse
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from local_workspace import LocalWorkspace, RUNNING_CLUSTER_ID  # noqa: E402
from repl_harness import Repl, files_under, wait_for  # noqa: E402
from test_bounds import StallingProxy  # noqa: E402

EXECUTE, STATUS, CREATE = "/api/1.2/commands/execute", "/api/1.2/commands/status", "/api/1.2/contexts/create"


class Row:
    def __init__(self, name):
        self.name, self.trials, self.broken, self.worst = name, 0, [], {}

    def trial(self, seconds=0.0, call="call"):
        """One call (or trial) answered after `seconds`; the worst time is kept per subcommand."""
        self.trials += 1
        self.worst[call] = max(self.worst.get(call, 0.0), seconds)

    def fail(self, why):
        self.broken.append(why)


def fresh(workspace, root, name):
    project = os.path.join(root, name)
    os.makedirs(project)
    return Repl(workspace, project, root)


def steps_ok(repl):
    """No step recorded twice, every recorded step's files present."""
    log = repl.session()
    numbers = [s["step"] for s in log["steps"]]
    problems = []
    if len(numbers) != len(set(numbers)):
        problems.append("a step recorded twice: %s" % numbers)
    for entry in log["steps"]:
        for key in ("command_file", "stdout_file", "stderr_file"):
            if not os.path.exists(os.path.join(repl.project_dir, entry[key])):
                problems.append("%s missing for step %s" % (key, entry["step"]))
    return problems


def timed(repl, *args, **kwargs):
    started = time.monotonic()
    call = repl.run(*args, **kwargs)
    return call, time.monotonic() - started


def kills(workspace, root, trials):
    row = Row("SIGKILL at a random moment of exec, then await")
    repl = fresh(workspace, root, "kills")
    repl.create()
    repl.exec("hits = 0", "init")
    for i in range(trials):
        proc = repl.popen("exec", "--command", "import time\ntime.sleep(0.5)\nhits += 1", "--tag", "k%d" % i)
        time.sleep(random.uniform(0.3, 1.5))
        proc.kill()
        proc.communicate(timeout=10)
        call, seconds = timed(repl, "await", "--timeout", "30")
        row.trial(seconds, "await")
        if call.status not in ("Finished", "NothingToAwait", "SubmitUncertain"):
            row.fail("await answered %s" % call.status)
        row.broken += steps_ok(repl)
    finished = sum(1 for s in repl.session()["steps"] if s["tag"].startswith("k") and s["status"] == "Finished")
    check = repl.exec("print(hits)", "count")
    if check.get("stdout_preview") != "%d\n" % finished:
        row.fail("hits %r but %d steps Finished" % (check.get("stdout_preview"), finished))
    repl.run("destroy")
    return row


def destroy_races(workspace, root, trials):
    row = Row("destroy while an exec waits")
    repl = fresh(workspace, root, "races")
    for i in range(trials):
        repl.create()
        creates = len([r for r in workspace.requests() if r["path"] == CREATE])
        proc = repl.popen("exec", "--command", "import time\ntime.sleep(30)", "--tag", "w%d" % i)
        wait_for(lambda: (repl.session().get("active_command") or {}).get("command_id"), 15)
        time.sleep(random.uniform(0, 0.5))
        started = time.monotonic()
        repl.run("destroy")
        call = repl.finish(proc, timeout=60)
        row.trial(time.monotonic() - started, "destroy + the exec's answer")
        if call.status not in ("Destroyed", "Cancelled"):
            row.fail("the waiting exec answered %s" % call.status)
        row.broken += steps_ok(repl)
        if len([r for r in workspace.requests() if r["path"] == CREATE]) != creates:
            row.fail("a context was created for a destroyed session")
        if not wait_for(lambda: not workspace.context_pids(), 10):
            row.fail("a context outlived destroy")
    return row


def failing_polls(workspace, root, trials, proxy):
    rows = []
    for fault in ("HTTP 500", "dropped", "hanging"):
        row = Row("status polls %s: exec --timeout 2, await --timeout 3, cancel" % fault)
        repl = fresh(workspace, root, "polls-" + fault.replace(" ", ""))
        repl.create()
        for i in range(trials):
            if fault == "HTTP 500":
                workspace.inject(STATUS, method="GET", count=10000, status=500, retry_after=None)
            elif fault == "dropped":
                workspace.inject(STATUS, method="GET", count=10000, mode="drop_before")
            else:
                proxy.stall(STATUS, count=10000)
                repl.env["DATABRICKS_HOST"] = proxy.host
            for args, budget in ((("exec", "--command", "import time\ntime.sleep(60)", "--tag", "p%d" % i,
                                   "--timeout", "2"), 4), (("await", "--timeout", "3"), 5)):
                call, seconds = timed(repl, *args)
                row.trial(seconds, args[0])
                if seconds > budget:
                    row.fail("%s answered after %.1fs" % (args[0], seconds))
                if call.status != "StatusUnknown" or not call.get("status_error"):
                    row.fail("%s answered %s without the error" % (args[0], call.status))
            call, seconds = timed(repl, "cancel")
            row.trial(seconds, "cancel")
            if call.status != "Cancelled":
                row.fail("cancel answered %s" % call.status)
            workspace.clear_injections()
            for rule in proxy.rules:
                rule["count"] = 0
            repl.env["DATABRICKS_HOST"] = workspace.host
            if repl.exec("print('free')", "free%d" % i).status != "Finished":
                row.fail("the session was not usable after cancel")
            row.broken += steps_ok(repl)
        repl.run("destroy")
        rows.append(row)
    return rows


def unreachable(workspace, root, trials):
    row = Row("refused and silent host: exec, status, create (default budget)")
    repl = fresh(workspace, root, "unreachable")
    repl.create()
    os.makedirs(os.path.join(root, "never"))
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))
    refused_host = "http://127.0.0.1:%d" % refused.getsockname()[1]
    refused.close()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        silent_host = "http://127.0.0.1:%d" % silent.getsockname()[1]
        for _ in range(max(1, trials // 5)):
            for host in (refused_host, silent_host):
                env = {"DATABRICKS_HOST": host, "DBX_REPL_RETRY_TIMEOUT": ""}
                create = ("create", "--project-dir", os.path.join(root, "never"), "--cluster-id", RUNNING_CLUSTER_ID,
                          "--session-name", "x")
                for args in (("exec", "--command", "1", "--tag", "u"), ("status",), create):
                    call, seconds = timed(repl, *args, env=env)
                    row.trial(seconds, args[0])
                    if seconds > 15:
                        row.fail("%s answered after %.1fs" % (args[0], seconds))
    workspace.clear_injections()
    repl.run("destroy")
    return row


def uncertain_submits(workspace, root, trials, proxy):
    row = Row("dropped or hanging submit (+ SIGTERM), dropped create")
    repl = fresh(workspace, root, "uncertain")
    repl.create()
    repl.exec("hits = 0", "init")
    sent = 0
    for i in range(trials):
        sent += 1
        if i % 2:
            workspace.inject(EXECUTE, method="POST", count=1, mode="drop_after")
            call, seconds = timed(repl, "exec", "--command", "hits += 1", "--tag", "d%d" % i)
        else:
            repl.env["DATABRICKS_HOST"] = proxy.host
            proxy.stall(EXECUTE, forward=True)
            proc = repl.popen("exec", "--command", "hits += 1", "--tag", "h%d" % i)
            wait_for(lambda i=i: proxy.seen(EXECUTE) > i // 2, 15)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            call = repl.finish(proc, timeout=30)
            seconds = time.monotonic() - started
            repl.env["DATABRICKS_HOST"] = workspace.host
        row.trial(seconds, "exec (dropped)" if i % 2 else "exec (SIGTERM while hanging)")
        if call.status != "SubmitUncertain" or "session is free" in call["message"]:
            row.fail("answered %s: %s" % (call.status, call["message"][:80]))
    check = repl.exec("print(hits)", "count", "--timeout", "60")
    if check.get("stdout_preview") != "%d\n" % sent:
        row.fail("ran %r times for %d submits" % (check.get("stdout_preview"), sent))
    repl.run("destroy")
    other = fresh(workspace, root, "dropped-create")
    before = len([r for r in workspace.requests() if r["path"] == CREATE])
    workspace.inject(CREATE, method="POST", count=1, mode="drop_after")
    call, seconds = timed(other, "create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x")
    row.trial(seconds, "create (dropped)")
    if len([r for r in workspace.requests() if r["path"] == CREATE]) != before + 1:
        row.fail("the create was resent")
    again = other.create()
    if again.get("possible_orphans") != 1:
        row.fail("the possible orphan was not reported")
    other.run("destroy")
    return row


BAD_INPUTS = [("exec", "--tag", "///", "--command", "1"), ("exec", "--tag", "", "--command", "1"),
              ("exec", "--tag", "t", "--command", ""), ("exec", "--tag", "t", "--command", "@missing.py"),
              ("exec", "--tag", "t", "--command", "1", "--timeout", "0"),
              ("exec", "--tag", "t", "--command", "1", "--timeout", "nan"),
              ("exec", "--tag", "t", "--command", "1", "--timeout", "-1"),
              ("exec", "--tag", "t", "--command", "1", "--max-output-bytes", "0"),
              ("exec", "--command", "1"), ("exec", "--tag", "t", "--command", "1", "--bogus"),
              ("await", "--timeout", "inf"), ("cancel", "--run-id", "../../etc"),
              ("create", "--cluster-id", "", "--session-name", "x"),
              ("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", ""),
              ("create", "--cluster-id", "0000-nosuch", "--session-name", "x"),
              ("replay", "--steps", "x-y"), ("replay", "--steps", "999"), ("export", "--output", "/dev/null/x.py"),
              ("get", "/nonexistent", "../outside"), ("frobnicate",)]


def bad_inputs(workspace, root):
    row = Row("bad inputs on a live session (one JSON error, nothing written)")
    repl = fresh(workspace, root, "bad")
    repl.create()
    for args in BAD_INPUTS:
        before = files_under(repl.project_dir)
        try:
            call, seconds = timed(repl, *args)
        except AssertionError as err:   # not one JSON object, or a traceback
            row.trial()
            row.fail("%s: %s" % (args, err))
            continue
        row.trial(seconds, "any")
        if call.code == 0:
            row.fail("%s succeeded" % (args,))
        if files_under(repl.project_dir) != before:
            row.fail("%s wrote files" % (args,))
    for token_args in (("exec", "--command", "1", "--tag", "t"), ("status",)):
        before = files_under(repl.project_dir)
        call, seconds = timed(repl, *token_args, env={"DATABRICKS_TOKEN": "dapi-wrong"})
        row.trial(seconds, "any")
        if call.status != "AuthError" or files_under(repl.project_dir) != before:
            row.fail("wrong token on %s: %s or files written" % (token_args[0], call.status))
    repl.run("destroy")
    return row



def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="dbx-repl-faults-")
    workspace = LocalWorkspace()
    workspace.start()
    proxy = StallingProxy(workspace)
    began = time.monotonic()
    try:
        rows = [kills(workspace, root, args.trials), destroy_races(workspace, root, args.trials)]
        rows += failing_polls(workspace, root, max(1, args.trials // 3), proxy)
        rows += [unreachable(workspace, root, args.trials), uncertain_submits(workspace, root, args.trials, proxy),
                 bad_inputs(workspace, root)]
    finally:
        proxy.stop()
        workspace.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("| row | calls/trials | broken | worst answer |")
    print("|---|---|---|---|")
    for row in rows:
        worst = ", ".join("%s %.1f s" % item for item in row.worst.items())
        print("| %s | %d | %d%s | %s |" % (row.name, row.trials, len(row.broken),
                                          (": " + "; ".join(row.broken[:3])) if row.broken else "", worst))
    print("\nTotal %.0f s, load average %.1f" % (time.monotonic() - began, os.getloadavg()[0]))
    return 1 if any(row.broken for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
