"""The agent's workflow end to end: the ten tasks of a working session through the CLI, dependency-aware
replay, an export that runs, answers that stay small, exact tips, and the packaging files."""

import json
import os
import re
import subprocess
import sys

import pytest

from local_workspace import RUNNING_CLUSTER_ID, TERMINATED_CLUSTER_ID
from local_workspace.paths import host_path
from repl_harness import CLI, ROOT, Call, Repl, statuses_in_the_cli

MAX_ANSWER_BYTES = 2048


def small(call):
    """The call's answer, checked to be at most 2 KB (the JSON line, newline excluded)."""
    assert len(call.stdout.rstrip("\n").encode("utf-8")) <= MAX_ANSWER_BYTES, (len(call.stdout), call.body)
    return call


def run(repl, *args, **kwargs):
    return small(repl.run(*args, **kwargs))


def exec_step(repl, code, tag, *extra, **kwargs):
    return small(repl.exec(code, tag, *extra, **kwargs))


# -- the ten tasks -------------------------------------------------------------------------------------

PRIMES = """\
def is_prime(n):
    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))
primes = [n for n in range(2, 10000) if is_prime(n)]
print(len(primes))
"""

MONTE_CARLO_PI = """\
import random
samples = 20000
def inside(_):
    x, y = random.random(), random.random()
    return x * x + y * y <= 1.0
hits = spark.sparkContext.parallelize(range(samples), 2).filter(inside).count()
pi_estimate = 4.0 * hits / samples
print(round(pi_estimate, 1))
"""

IRIS_LOAD = """\
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
iris = load_iris()
X_train, X_test, y_train, y_test = train_test_split(iris.data, iris.target, test_size=0.3, random_state=0)
print(len(X_train), len(X_test))
"""

IRIS_MODEL = """\
from sklearn.linear_model import LogisticRegression
model = LogisticRegression(max_iter=500)
"""

IRIS_EVALUATE = """\
from sklearn.metrics import accuracy_score
accuracy = accuracy_score(y_test, model.predict(X_test))
print(round(accuracy, 2))
"""


@pytest.mark.slow
@pytest.mark.spark
def test_an_agent_works_through_the_ten_tasks_and_exports_a_script_that_runs(workspace, session, tmp_path):
    repl = session
    # 1. counting primes
    primes = exec_step(repl, PRIMES, "primes")
    assert primes.status == "Finished" and primes["stdout_preview"] == "1229\n"

    # 2-4. a timeout, an await and a cancel; the tips repeat the caller's --timeout (before Spark starts:
    # pyspark's own SIGINT handler hides a cancel from the local workspace's context process)
    slow = exec_step(repl, "import time\ntime.sleep(3)\nslept = True", "nap", "--timeout", "0.5")
    assert slow.status == "Running" and slow.code == 3
    assert slow["tip"]["await"].endswith("await --project-dir " + repl.project_dir + " --timeout 0.5")
    awaited = run(repl, "await", "--timeout", "60")
    assert awaited.status == "Finished" and awaited["cmd_id"] == slow["cmd_id"]
    hung = exec_step(repl, "import time\ntime.sleep(120)", "hang", "--timeout", "0.5")
    assert hung.status == "Running"
    cancelled = run(repl, "cancel")
    assert cancelled.status == "Cancelled" and cancelled["cmd_id"] == hung["cmd_id"]

    # 5. Monte Carlo pi on Spark
    pi = exec_step(repl, MONTE_CARLO_PI, "pi", "--timeout", "300", timeout=400)
    assert pi.status == "Finished", pi
    assert 2.9 <= float(pi["stdout_preview"].splitlines()[-1]) <= 3.4    # after Spark's own warnings

    # 6. iris: train, evaluate, persist
    assert exec_step(repl, IRIS_LOAD, "iris_load")["stdout_preview"] == "105 45\n"
    assert exec_step(repl, IRIS_MODEL, "iris_model").status == "Finished"
    assert exec_step(repl, "model.fit(X_train, y_train)", "iris_train").status == "Finished"
    evaluated = exec_step(repl, IRIS_EVALUATE, "iris_evaluate")
    assert evaluated.status == "Finished" and float(evaluated["stdout_preview"]) >= 0.9
    model_path = "/Volumes/main/default/models/iris_model.pkl"          # where the spec persists models
    persisted = exec_step(repl, "import os, pickle\nos.makedirs(os.path.dirname(%r), exist_ok=True)\n"
                                "with open(%r, 'wb') as f:\n    pickle.dump(model, f)\n" % (model_path, model_path),
                          "iris_persist")
    assert persisted.status == "Finished"
    assert os.path.getsize(host_path(workspace._tmpdir, RUNNING_CLUSTER_ID, model_path)) > 0

    # 7. finding a row in a large output: the answer stays small, the file holds every line
    lines = exec_step(repl, "for i in range(200000):\n    print(f'order {i}: total {i % 97}')", "orders")
    assert lines.status == "Finished" and lines["stdout_bytes"] > 3_000_000
    with open(repl.path(lines["stdout_file"]), encoding="utf-8") as f:
        assert [line for line in f if line.startswith("order 31337:")] == [f"order 31337: total {31337 % 97}\n"]

    # 8. fixing an exception: the failed step defined `report` before it failed
    failed = exec_step(repl, "report = {'accuracy': round(accuracy, 2), 'primes': len(primes)}\n"
                             "print(report['acuracy'])", "report")
    assert failed.status == "Error" and failed["error"]["type"] == "KeyError"
    fixed = exec_step(repl, "print(report['accuracy'] >= 0.9, report['primes'])", "report_fixed")
    assert fixed["stdout_preview"] == "True 1229\n"

    # 9. sub_llm_batch classification
    classify = exec_step(repl, "reviews = ['I love it, great value', 'terrible and broken', 'it is a chair']\n"
                               "labels = sub_llm_batch(['sentiment: ' + r for r in reviews])\n"
                               "print(labels)", "classify")
    assert classify.status == "Finished", classify
    assert all(word in classify["stdout_preview"] for word in ("positive", "negative", "neutral"))

    # 10. recovering from an eviction: the plan holds what the next step needs, and no more
    workspace.evict()
    final_code = "print(report['accuracy'] >= 0.9, len(primes), round(accuracy, 2) == report['accuracy'])"
    evicted = exec_step(repl, final_code, "final")
    assert evicted.status == "ContextEvicted", evicted
    plan = evicted["replay_plan"]
    by_tag = {s["step"]: s["tag"] for s in repl.session()["steps"]}
    planned_tags = [by_tag[n] for n in _numbers(plan["steps"])]
    assert planned_tags == ["primes", "iris_load", "iris_model", "iris_train", "iris_evaluate", "report"]
    assert [by_tag[n] for n in plan["partial"]] == ["report"]
    assert evicted["tip"]["replay"].endswith(f"replay --project-dir {repl.project_dir} --timeout 90")  # TIP_TIMEOUT
    assert run(repl, "replay", "--plan")["replay_plan"]["steps"] == plan["steps"]
    replayed = run(repl, "replay", "--timeout", "300", timeout=400)
    assert replayed.status == "Replayed", replayed
    assert [r["tag"] for r in replayed["restored"]] == planned_tags
    assert [r for r in replayed["restored"] if r["tag"] == "report"][0]["lines"] == "1-1"
    assert exec_step(repl, final_code, "final")["stdout_preview"] == "True 1229 True\n"

    # 11. exporting the session after the partial replay: the script runs top to bottom
    exported = run(repl, "export", "--output", str(tmp_path / "analysis.py"), "--verify", "--timeout", "300",
                   timeout=400)
    assert exported.status == "Exported", exported
    assert exported["verify"]["status"] == "Passed", exported
    left_out = {row["tag"]: row["why"] for row in exported["left_out"]}
    assert left_out["orders"] == "exploration: big_output" and left_out["nap"] == "exploration: sleep"
    assert "report" not in left_out and "report_fixed" not in left_out
    script = (tmp_path / "analysis.py").read_text()
    assert script.index("# --- Step 1: primes") < script.index("report = {") \
        < script.index("print(report['accuracy'] >= 0.9, len(primes)")
    assert "acuracy" not in script and "time.sleep" not in script and "order {i}" not in script
    with open(repl.path(exported["verify"]["output_file"]), encoding="utf-8") as f:
        assert "True 1229 True" in f.read()


def _numbers(ranges):
    numbers = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        numbers += range(int(low), int(high or low) + 1)
    return numbers


# -- dependency-aware replay --------------------------------------------------------------------------

@pytest.mark.slow
def test_replay_plan_is_the_smallest_set_the_failed_step_needs_with_costly_steps_flagged(workspace, session):
    exec_step(session, "base = 10", "base")
    exec_step(session, "import time\ntime.sleep(0.2)\nwaited = base", "sleepy")
    exec_step(session, "labels = sub_llm_batch(['upper: a', 'upper: b'])", "llm")
    exec_step(session, "print('x' * 200000)", "big")
    exec_step(session, "scaled = base * labels.count('A')", "scale")
    exec_step(session, "unrelated = 1", "other")
    workspace.evict()
    evicted = exec_step(session, "print(scaled)", "use")
    plan = evicted["replay_plan"]
    assert plan["steps"] == "1,3,5" and plan["count"] == 3
    assert plan["flagged"] == {"3": ["sub_llm"]}
    with open(session.path(plan["file"]), encoding="utf-8") as f:
        full = json.load(f)
    assert full["for_step"] == "007_use" and [s["step"] for s in full["steps"]] == [1, 3, 5]
    shown = run(session, "replay", "--plan")
    assert shown.status == "ReplayPlan" and shown.code == 0 and shown["replay_plan"]["steps"] == "1,3,5"
    assert len(session.session()["steps"]) == 7            # --plan runs nothing
    replayed = run(session, "replay")
    assert [r["step"] for r in replayed["restored"]] == [1, 3, 5]
    assert exec_step(session, "print(scaled)", "use")["stdout_preview"] == "10\n"


@pytest.mark.slow
def test_a_failed_step_that_defined_names_is_replayed_up_to_its_failing_line(workspace, session):
    exec_step(session, "rows = [1, 2, 3]", "rows")
    failed = exec_step(session, "doubled = [r * 2 for r in rows]\ntotal = sum(doubled)\nprint(rows[10])\nlate = 1",
                       "features")
    assert failed.status == "Error" and failed["error"]["type"] == "IndexError"
    exec_step(session, "print(total)", "show")
    workspace.evict()
    evicted = exec_step(session, "print(total + len(doubled))", "next")
    assert evicted["replay_plan"]["steps"] == "1,2" and evicted["replay_plan"]["partial"] == [2]
    replayed = run(session, "replay")
    assert replayed.status == "Replayed" and replayed["restored"][1] == {"step": 2, "tag": "features",
                                                                         "cmd_id": replayed["restored"][1]["cmd_id"],
                                                                         "lines": "1-2"}
    assert session.read(f"repl_outputs/{replayed['restored'][1]['cmd_id']}.cmd.py").endswith("total = sum(doubled)\n")
    assert exec_step(session, "print(total + len(doubled))", "next")["stdout_preview"] == "15\n"


@pytest.mark.slow
def test_replay_all_keeps_the_old_every_finished_step_choice(session):
    exec_step(session, "a = 1", "one")
    exec_step(session, "print('hello')", "two")
    plan = run(session, "replay", "--plan")
    assert plan["replay_plan"]["steps"] == "1"
    every = run(session, "replay", "--all")
    assert [r["step"] for r in every["restored"]] == [1, 2]


# -- export ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_export_puts_a_replayed_step_in_its_originals_place(workspace, session, tmp_path):
    exec_step(session, "data = [1, 2, 3]", "load")
    exec_step(session, "total = sum(data)", "sum")
    exec_step(session, "print(total)", "show")
    workspace.evict()
    assert exec_step(session, "print(total * 2)", "double").status == "ContextEvicted"
    replayed = run(session, "replay")                          # load and sum only: show is not needed
    assert [r["step"] for r in replayed["restored"]] == [1, 2]
    exec_step(session, "print(total * 2)", "double")
    exported = run(session, "export", "--output", str(tmp_path / "out.py"))
    assert exported["steps"] == [1, 2, 3, 7]                   # the replays (5, 6) stand in for 1 and 2
    ran = subprocess.run([sys.executable, str(tmp_path / "out.py")], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout == "6\n12\n"


@pytest.mark.slow
def test_export_orders_steps_by_the_names_they_define_and_use(session, tmp_path):
    exec_step(session, "def scale(v):\n    return v * factor", "helper")
    exec_step(session, "factor = 3", "factor")
    exec_step(session, "print(scale(2))", "use")
    exec_step(session, "factor = 5", "factor")          # the last run of the tag comes after its user
    exported = run(session, "export", "--output", str(tmp_path / "ordered.py"))
    assert exported["steps"] == [4, 1, 3]                      # the last run of `factor` moves first
    ran = subprocess.run([sys.executable, str(tmp_path / "ordered.py")], capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout == "10\n"


@pytest.mark.slow
def test_export_chooses_steps_and_leaves_tags_out(session, tmp_path):
    exec_step(session, "a = 2", "a")
    exec_step(session, "b = 3", "b")
    exec_step(session, "print(a)", "show_a")
    chosen = run(session, "export", "--steps", "1,3", "--output", str(tmp_path / "chosen.py"))
    assert chosen["steps"] == [1, 3]
    excluded = run(session, "export", "--exclude-tags", "b", "--output", str(tmp_path / "excluded.py"))
    assert excluded["steps"] == [1, 3] and excluded["left_out"] == [{"step": 2, "tag": "b", "why": "--exclude-tags"}]
    unknown = run(session, "export", "--steps", "9")
    assert unknown.status == "UnknownStep" and unknown.code == 2


@pytest.mark.slow
def test_export_verify_reports_a_script_that_fails_in_a_fresh_context(workspace, session, tmp_path):
    exec_step(session, "a = 1", "define")
    exec_step(session, "print(a)", "use")
    exported = run(session, "export", "--steps", "2", "--verify", "--timeout", "60",
                   "--output", str(tmp_path / "broken.py"))
    assert exported.status == "VerifyFailed" and exported.code == 1
    assert exported["verify"]["status"] == "Failed" and exported["verify"]["error"]["type"] == "NameError"
    assert (tmp_path / "broken.py").exists()
    assert list(workspace.context_pids()) == [session.session()["context_id"]]    # the fresh one is gone
    assert exec_step(session, "print('still here')", "after").status == "Finished"


@pytest.mark.slow
def test_export_verify_stops_at_its_timeout(workspace, session, tmp_path):
    exec_step(session, "import time\ntime.sleep(0.1)\nprint('short')", "nap")
    exported = run(session, "export", "--steps", "1", "--verify", "--timeout", "0.05",
                   "--output", str(tmp_path / "nap.py"))
    assert exported.status == "VerifyFailed" and exported["verify"]["status"] == "TimedOut"
    assert list(workspace.context_pids()) == [session.session()["context_id"]]


# -- answers stay small ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_context_evicted_after_forty_steps_stays_under_2kb(workspace, session):
    for index in range(40):
        exec_step(session, f"value_{index} = {index}\nprint('step', {index})", f"step_with_a_long_tag_name_{index}")
    workspace.evict()
    evicted = exec_step(session, "print(sum([" + ", ".join(f"value_{i}" for i in range(40)) + "]))", "total")
    assert evicted.status == "ContextEvicted" and evicted["replay_plan"]["count"] == 40
    assert evicted["replay_plan"]["steps"] == "1-40"


@pytest.mark.slow
def test_an_error_with_a_long_traceback_and_output_answers_in_2kb_and_keeps_the_details(session):
    code = ("print('é' * 3000)\nimport sys\nsys.stderr.write('warning ' * 400)\n"
            "def deep(n):\n    return deep(n - 1) if n else {}['k' * 3000]\ndeep(30)")
    failed = exec_step(session, code, "deep")
    assert failed.status == "Error" and failed["error"]["type"] == "KeyError"
    assert "details_file" in failed.body and failed["moved_fields"]
    with open(session.path(failed["details_file"]), encoding="utf-8") as f:
        details = json.load(f)
    assert set(details) == set(failed["moved_fields"])
    assert failed["hint"].startswith("Read ")


@pytest.mark.slow
def test_escape_heavy_output_and_a_pip_step_answer_in_2kb(session):
    quoted = exec_step(session, "print('\"\\\\\\t' * 3000)", "quotes")   # each character doubles in JSON
    assert quoted.status == "Finished" and "stdout_preview" in quoted["moved_fields"]
    assert quoted["stdout_preview"].startswith('"\\\t')
    pip = exec_step(session, "%pip install --help", "deps", "--timeout", "300", timeout=400)
    assert pip.status == "Finished" and pip["stdout_bytes"] > 10_000, pip


# -- exact tips --------------------------------------------------------------------------------------------

def _profile_home(repl, name="dev"):
    with open(os.path.join(str(repl.home), ".databrickscfg"), "w", encoding="utf-8") as f:
        f.write(f"[{name}]\nhost = {repl.workspace.host}\ntoken = {repl.workspace.token}\n")


@pytest.mark.slow
def test_tips_repeat_the_program_as_invoked_the_profile_and_the_timeout(workspace, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (tmp_path / "home").mkdir()
    repl = Repl(workspace, project, tmp_path / "home", cwd=tmp_path)
    _profile_home(repl)
    repl.env = {k: v for k, v in repl.env.items() if k not in ("DATABRICKS_HOST", "DATABRICKS_TOKEN")}
    script = os.path.relpath(CLI, tmp_path)

    def call(*args):
        proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=str(tmp_path),
                              env=repl.env, timeout=120)
        return small(Call(args, proc.returncode, proc.stdout, proc.stderr))

    created = call("create", "--project-dir", "project", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "t",
                   "--profile", "dev")
    assert created.status == "Created", created
    running = call("exec", "--project-dir", "project", "--profile", "dev", "--tag", "slow", "--timeout", "2",
                   "--command", "import time\ntime.sleep(30)")
    assert running.status == "Running"
    program = f"{_interpreter()} {script}"
    assert running["tip"]["await"] == f"{program} await --project-dir project --profile dev --timeout 2"
    assert running["tip"]["cancel"] == f"{program} cancel --project-dir project --profile dev"
    busy = call("exec", "--project-dir", "project", "--profile", "dev", "--tag", "x", "--timeout", "7",
                "--command", "1")
    assert busy.status == "CommandRunning" and busy["tip"]["await"].endswith("--profile dev --timeout 7")
    assert call("cancel", "--project-dir", "project", "--profile", "dev").status == "Cancelled"
    call("destroy", "--project-dir", "project")


def _interpreter():
    import shutil
    name = os.path.basename(sys.executable)
    return name if shutil.which(name) == sys.executable else sys.executable


def test_the_program_is_named_as_invoked_for_the_script_the_folder_the_console_script_and_find_cluster(
        tmp_path, monkeypatch):
    import dbx_repl
    python = "/opt/py/bin/python3"
    skill = tmp_path / "databricks-repl"
    skill.mkdir()
    for name in ("__main__.py", "dbx_repl.py", "find_cluster.py"):
        (skill / name).write_text("")
    monkeypatch.chdir(tmp_path)
    assert dbx_repl.invoked_program("databricks-repl", python) == f"{python} databricks-repl"
    assert dbx_repl.invoked_program(str(skill), python) == f"{python} {skill}"
    assert dbx_repl.invoked_program("databricks-repl/find_cluster.py", python) == f"{python} databricks-repl"
    assert dbx_repl.invoked_program(str(skill / "__main__.py"), python) == f"{python} {skill}"
    monkeypatch.chdir(skill)
    assert dbx_repl.invoked_program(".", python) == f"{python} ."
    assert dbx_repl.invoked_program("find_cluster.py", python) == f"{python} ."
    assert dbx_repl.invoked_program("__main__.py", python) == f"{python} ."
    assert dbx_repl.invoked_program("/usr/lib/python3/site-packages/pytest/__main__.py", python) == "dbx_repl.py"
    assert dbx_repl.invoked_program(".claude/skills/databricks-repl/dbx_repl.py", python) == \
        f"{python} .claude/skills/databricks-repl/dbx_repl.py"
    assert dbx_repl.invoked_program("skills/find_cluster.py", python) == f"{python} skills/dbx_repl.py"
    assert dbx_repl.invoked_program("/nowhere/bin/dbx-repl", python) == "/nowhere/bin/dbx-repl"
    assert dbx_repl.invoked_program("/nowhere/bin/dbx-find-cluster", python) == "/nowhere/bin/dbx-repl"
    assert dbx_repl.invoked_program("dbx-repl", python) == "dbx-repl"


@pytest.mark.slow
def test_an_empty_profile_means_no_profile(repl):
    created = run(repl, "create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "p", "--profile", "")
    assert created.status == "Created", created
    assert repl.session()["profile"] is None
    assert exec_step(repl, "print(1)", "one", "--profile", "")["stdout_preview"] == "1\n"
    found = run(repl, "find-cluster", "--name", "analytics", "--profile", "", project=False)
    assert found.status in ("Found", "Ambiguous")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "find_cluster.py"), '--profile=', "--name",
                           "analytics-dev"], capture_output=True, text=True, env=repl.env, timeout=60)
    assert json.loads(proc.stdout)["status"] == "Found"          # SKILL.md's template with an empty $0
    run(repl, "destroy")


@pytest.mark.slow
def test_status_of_a_lost_context_carries_the_replay_plan(workspace, session):
    exec_step(session, "x = 1", "one")
    exec_step(session, "print('look')", "two")
    workspace.evict()
    lost = run(session, "status")
    assert lost.status == "ContextLost" and lost["replay_plan"]["steps"] == "1"
    assert lost["tip"]["replay"].startswith(_interpreter())


@pytest.mark.slow
def test_replay_plan_flags_costly_and_side_effect_steps(session, tmp_path):
    exec_step(session, "%pip install pip", "deps", "--timeout", "300", timeout=400)
    exec_step(session, "import time\ntime.sleep(0.1)", "nap")
    exec_step(session, "answer = sub_llm('upper: a')", "llm")
    exec_step(session, "open('/tmp/w.txt', 'w').write('x')", "write")
    exec_step(session, "print('y' * 150000)", "big")
    exec_step(session, "items = [1]\nitems.append(2)", "quiet")
    plan = run(session, "replay", "--plan", "--all")
    assert plan.status == "ReplayPlan" and plan["replay_plan"]["steps"] == "1-6"
    assert plan["replay_plan"]["flagged"] == {"1": ["pip"], "2": ["sleep"], "3": ["sub_llm"], "4": ["writes"],
                                              "5": ["big_output"]}
    needed = run(session, "replay", "--plan")          # what defines a name, and the %pip step (packages)
    assert needed["replay_plan"]["steps"] == "1-3,6"


# -- DATABRICKS_CLUSTER_ID is a cluster id ---------------------------------------------------------------

def test_databricks_cluster_id_is_an_id_for_create_smoke_and_find_cluster(repl):
    env = {"DATABRICKS_CLUSTER_ID": RUNNING_CLUSTER_ID}
    created = run(repl, "create", "--session-name", "from-env", env=env)
    assert created.status == "Created" and created["cluster_id"] == RUNNING_CLUSTER_ID
    run(repl, "destroy")
    smoke = run(repl, "smoke", env=env, project=False)
    assert smoke.status == "Passed", smoke
    assert RUNNING_CLUSTER_ID in smoke["phases"][1]["detail"]
    stopped = run(repl, "smoke", env={"DATABRICKS_CLUSTER_ID": TERMINATED_CLUSTER_ID}, project=False)
    assert stopped.status == "Failed" and stopped["failed_phase"] == "cluster" and "TERMINATED" in stopped["message"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "find_cluster.py")], capture_output=True, text=True,
                          env={**repl.env, **env}, timeout=60)
    found = json.loads(proc.stdout)
    assert found["status"] == "Found" and found["cluster_id"] == RUNNING_CLUSTER_ID
    assert found["tip"]["create"].endswith(f"create --cluster-id {RUNNING_CLUSTER_ID} --session-name <session-name>")
    assert found["tip"]["create"].startswith(f"{_interpreter()} {ROOT} create")   # the skill's folder


# -- packaging and SKILL.md -----------------------------------------------------------------------------

def _read_json(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return json.load(f)


def _skill_frontmatter():
    with open(os.path.join(ROOT, "SKILL.md"), encoding="utf-8") as f:
        text = f.read()
    head = text.split("---\n")[1]
    return dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", head, re.MULTILINE)), text


def test_the_plugin_and_marketplace_files_point_at_this_skill():
    plugin = _read_json(".claude-plugin", "plugin.json")
    marketplace = _read_json(".claude-plugin", "marketplace.json")
    front, _ = _skill_frontmatter()
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        version = re.search(r'^version = "([^"]+)"', f.read(), re.MULTILINE).group(1)
    assert plugin["name"] == front["name"] == "databricks-repl" and plugin["version"] == version
    assert os.path.isfile(os.path.join(ROOT, plugin["skills"], "SKILL.md"))
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", marketplace["name"]) and marketplace["owner"]["name"]
    [entry] = marketplace["plugins"]
    assert entry["name"] == plugin["name"] and entry["version"] == version
    assert entry["source"].startswith("./")
    assert os.path.isfile(os.path.join(ROOT, entry["source"], ".claude-plugin", "plugin.json"))


def test_the_evals_follow_the_skill_creator_format_and_cover_the_workflow():
    evals = _read_json("evals", "evals.json")
    front, _ = _skill_frontmatter()
    assert evals["skill_name"] == front["name"]
    ids = [e["id"] for e in evals["evals"]]
    assert ids == list(range(1, len(ids) + 1)) and len(ids) >= 8
    for case in evals["evals"]:
        assert case["prompt"] and case["expected_output"] and case["expectations"]
        assert all(os.path.exists(os.path.join(ROOT, path)) for path in case["files"])
    text = json.dumps(evals)
    for topic in ("NothingToCancel", "Running", "Cancelled", "ContextEvicted", "replay", "export --verify",
                  "sub_llm_batch"):
        assert topic in text, topic
    named = set(re.findall(r"\b[A-Z][a-z]+(?:[A-Z][a-z]+)+\b", text)) - {"KeyError", "NameError"}
    assert named and named <= statuses_in_the_cli(), named - statuses_in_the_cli()
    import dbx_repl
    parser = dbx_repl.build_parser()
    for argv in (["replay", "--plan"], ["export", "--verify"], ["cancel"], ["await", "--timeout", "5"]):
        assert parser.parse_args(argv).handler                   # every command the evals name exists
