"""An agent follows the CLI's tips as written, with only the <...> placeholders filled.

Every answer the suite meets has its tips checked by the harness (repl_harness.check_tip: the CLI's
parser accepts them, a waiting command carries --timeout). These stories run the tips themselves,
through the shell's word splitting, the way an agent pastes them."""

import shlex
import subprocess
import uuid

import pytest

from local_workspace import RUNNING_CLUSTER_ID, TERMINATED_CLUSTER_ID
from repl_harness import PLACEHOLDER, Call


def follow(repl, call, name, **fill):
    """Run `call`'s tip `name` as written (placeholders filled from `fill`, e.g. code=...)."""
    line = call["tip"][name]
    values = {f"<{key.replace('_', '-')}>": value for key, value in fill.items()}
    unfilled = set(PLACEHOLDER.findall(line)) - set(values)
    assert not unfilled, f"fill {unfilled} to follow {line!r}"
    line = PLACEHOLDER.sub(lambda m: shlex.quote(values[m.group(0)]), line)
    proc = subprocess.run(shlex.split(line), capture_output=True, text=True, timeout=150, cwd=repl.cwd,
                          env=repl.env)
    return Call(shlex.split(line), proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.slow
def test_an_agent_goes_from_create_to_a_new_session_by_tips_alone(repl):
    created = repl.create(RUNNING_CLUSTER_ID, "first")
    assert created.status == "Created"
    step = follow(repl, created, "exec", tag="load", code="x = 41\nprint(x + 1)")
    assert step.status == "Finished" and repl.read(step["stdout_file"]) == "42\n"

    running = repl.exec("import time\ntime.sleep(3)\nprint('slept')", "nap", "--timeout", "0.3")
    assert running.status == "Running"
    busy = repl.run("status")
    assert busy.status == "Busy" and "--timeout" in busy["tip"]["await"]
    collected = follow(repl, busy, "await")
    assert collected.status == "Finished" and repl.read(collected["stdout_file"]) == "slept\n"

    active = repl.run("status")
    assert active.status == "Active"
    destroyed = repl.run("destroy")
    assert destroyed.status == "Destroyed" and RUNNING_CLUSTER_ID in destroyed["tip"]["create"]
    after = repl.run("status")
    assert after.status == "Destroyed" and after["tip"]["create"] == destroyed["tip"]["create"]
    again = follow(repl, after, "create", session_name="second")
    assert again.status == "Created" and again["session_name"] == "second"
    assert repl.run("destroy").status == "Destroyed"


@pytest.mark.slow
def test_after_an_eviction_the_replay_tip_then_the_retry_tip_finish_the_failed_step(workspace, session):
    session.exec("base = 20", "load")
    session.exec("base = base + 1", "transform")
    workspace.evict()
    evicted = session.exec("print(base * 2)", "report")
    assert evicted.status == "ContextEvicted"
    assert list(evicted["tip"]) == ["replay", "plan", "retry"]
    replayed = follow(session, evicted, "replay")
    assert replayed.status == "Replayed" and [r["step"] for r in replayed["restored"]] == [1, 2]
    retried = follow(session, evicted, "retry")
    assert retried.status == "Finished" and session.read(retried["stdout_file"]) == "42\n"
    assert retried["cmd_id"].endswith("_report")


def test_a_stopped_cluster_offers_a_consented_start_and_a_way_to_watch_it(repl, workspace):
    refused = repl.create(TERMINATED_CLUSTER_ID, "prod")
    assert refused.status == "ClusterNotRunning"
    start = refused["tip"]["start"]
    assert "--start-cluster" in start and TERMINATED_CLUSTER_ID in start and "--timeout" in start
    workspace.set_cluster_state(TERMINATED_CLUSTER_ID, "TERMINATING")
    try:
        stopping = repl.create(TERMINATED_CLUSTER_ID, "prod")
        assert stopping.status == "ClusterNotRunning" and "start" not in stopping["tip"]
        watched = follow(repl, stopping, "find")
        assert watched.status == "Found" and watched["cluster_id"] == TERMINATED_CLUSTER_ID
        assert watched["state"] == "TERMINATING"
    finally:
        workspace.set_cluster_state(TERMINATED_CLUSTER_ID, "TERMINATED")


@pytest.mark.slow
@pytest.mark.spark
def test_a_name_an_unreplayed_step_defined_is_named_with_the_replay_that_restores_it(workspace, session):
    session.exec("rates = {'eur': 1.1}", "rates")
    session.exec("df = spark.range(3)\ndf.createOrReplaceTempView('orders')", "orders")
    session.exec("total = 10", "total")
    workspace.evict()
    evicted = session.exec("print(total)", "report")
    assert evicted.status == "ContextEvicted"
    assert follow(session, evicted, "replay").status == "Replayed"   # the plan restores total only
    failed = session.exec("print(rates['eur'])", "convert")
    assert failed.status == "Error" and failed["error"]["type"] == "NameError"
    assert failed["left_out_step"] == 1 and "not replayed" in failed["message"]
    assert failed["tip"]["replay"].endswith("--steps 1")
    assert follow(session, failed, "replay").status == "Replayed"
    again = follow(session, failed, "retry")
    assert again.status == "Finished" and session.read(again["stdout_file"]) == "1.1\n"
    view = session.exec("print(spark.table('orders').count())", "count")
    assert view.status == "Error" and view["left_out_step"] == 2, view.body
    assert view["tip"]["replay"].endswith("--steps 2")
    plain = session.exec("print(never_defined)", "typo")
    assert plain.status == "Error" and "left_out_step" not in plain.body and "tip" not in plain.body


@pytest.mark.slow
def test_export_names_the_steps_with_side_effects_and_verifies_without_them_on_request(session, tmp_path):
    log = f"/tmp/{uuid.uuid4().hex}.log"
    session.exec(f"log = {log!r}\ndata = [1, 2, 3]", "load")
    session.exec("with open(log, 'a') as f:\n    f.write('written\\n')", "save")
    session.exec("print(sum(data))", "report")
    exported = session.run("export", "--output", str(tmp_path / "job.py"), "--steps", "1-3")
    assert exported.status == "Exported"
    assert exported["side_effects"] == [{"step": 2, "tag": "save", "flags": ["writes"]}]
    assert set(exported["tip"]) == {"verify", "verify_without_side_effects"}
    assert "--steps 1-3" in exported["tip"]["verify"]
    written = f"print(open({log!r}).read().count('written'))"
    assert session.exec(written, "count").get("stdout_preview") == "1\n"

    skipped = follow(session, exported, "verify_without_side_effects")
    assert skipped.status == "Exported" and skipped["verify"]["skipped_steps"] == [2], skipped.body
    assert session.exec(written, "count").get("stdout_preview") == "1\n"     # nothing written again

    verified = follow(session, exported, "verify")
    assert verified.status == "Exported" and "step(s) 2 again" in verified["message"]
    assert "skipped_steps" not in verified["verify"]
    assert session.exec(written, "count").get("stdout_preview") == "2\n"


@pytest.mark.slow
def test_export_names_a_cancelled_step_it_leaves_out(session):
    session.exec("x = 1", "load")
    running = session.exec("import time\ntime.sleep(60)", "stuck", "--timeout", "0.3")
    assert running.status == "Running"
    assert session.run("cancel").status == "Cancelled"
    exported = session.run("export")
    assert exported.status == "Exported" and exported["steps"] == [1]
    assert exported["left_out"] == [{"step": 2, "tag": "stuck", "why": "status Cancelled"}]


@pytest.mark.parametrize("error_type, message, name", [
    ("NameError", "name 'rates' is not defined", "rates"),
    ("UnboundLocalError", "cannot access local variable 'n' where it is not associated with a value", None),
    ("AnalysisException", "[TABLE_OR_VIEW_NOT_FOUND] The table or view `orders` cannot be found. Verify the "
                          "spelling and correctness of the schema and catalog.", "sql:orders"),
    ("AnalysisException", "Table or view not found: main.sales.Orders; line 1 pos 14", "sql:orders"),
    ("KeyError", "'discount'", None),
])
def test_the_missing_name_of_a_failed_step_is_read_from_its_error(error_type, message, name):
    import dbx_repl
    assert dbx_repl.missing_name(error_type, message) == name


@pytest.mark.parametrize("start", ["folder", "main_file", "dash_m"])
def test_the_skill_folder_runs_its_own_cli_however_it_is_started_and_its_tips_name_the_folder(
        repl, tmp_path, start):
    import os
    import shutil
    import sys

    from repl_harness import ROOT
    skills = tmp_path / "skills"
    skill = skills / "databricks-repl"
    skill.mkdir(parents=True)
    for name in ("__main__.py", "dbx_repl.py", "find_cluster.py"):
        shutil.copy(os.path.join(ROOT, name), skill / name)
    argv = {"folder": [str(skill)], "main_file": [str(skill / "__main__.py")],
            "dash_m": ["-m", "databricks-repl"]}[start]
    proc = subprocess.run([sys.executable, *argv, "create", "--project-dir", repl.project_dir, "--cluster-id",
                           RUNNING_CLUSTER_ID, "--session-name", "copy"], capture_output=True, text=True,
                          timeout=120, cwd=skills, env=repl.env)
    created = Call(proc.args, proc.returncode, proc.stdout, proc.stderr)
    assert created.status == "Created", created
    assert shlex.split(created["tip"]["exec"])[1] == str(skill)      # this copy, not the repository's
    step = follow(repl, created, "exec", tag="t", code="print(6 * 7)")
    assert step.status == "Finished" and repl.read(step["stdout_file"]) == "42\n"
    assert sorted(os.listdir(skill)) == ["__main__.py", "__pycache__", "dbx_repl.py", "find_cluster.py"]
    assert repl.run("destroy").status == "Destroyed"
