"""Beyond a plain REPL: starting a stopped cluster with consent, SQL steps, local modules synced to
the driver, and watching a running step. Every test drives the CLI as a subprocess on the local
workspace."""

import csv
import json
import os

import pytest

from local_workspace import TERMINATED_CLUSTER_ID
from repl_harness import wait_for


def _starts(workspace):
    return [r for r in workspace.requests() if r["path"] == "/api/2.1/clusters/start"]


# -- starting a stopped cluster, only with consent ---------------------------------------------------

def test_create_without_consent_refuses_a_terminated_cluster_and_starts_nothing(repl, workspace):
    refused = repl.create(TERMINATED_CLUSTER_ID)
    assert refused.status == "ClusterNotRunning" and refused.code == 1, refused
    assert refused["cluster_state"] == "TERMINATED"
    assert "--start-cluster" in refused["tip"]["start"] and "consent" in refused["hint"]
    assert _starts(workspace) == []
    assert repl.run("find-cluster", "--name", "analytics-prod", project=False)["state"] == "TERMINATED"


@pytest.mark.slow
def test_create_with_start_cluster_starts_a_terminated_cluster_and_opens_the_session(repl, workspace):
    workspace.configure(start_delay=2.0)
    created = repl.create(TERMINATED_CLUSTER_ID, "started", "--start-cluster", "--timeout", "60")
    assert created.status == "Created", created
    assert len(_starts(workspace)) == 1
    assert repl.exec("print(6 * 7)", "answer")["stdout_preview"].strip() == "42"
    repl.run("destroy")


@pytest.mark.slow
def test_a_cluster_still_starting_at_the_deadline_answers_cluster_starting_with_the_same_create(repl, workspace):
    workspace.configure(start_delay=30.0)
    starting = repl.create(TERMINATED_CLUSTER_ID, "slow", "--start-cluster", "--timeout", "3")
    assert starting.status == "ClusterStarting" and starting.code == 3, starting
    assert starting["cluster_state"] == "PENDING"
    again = starting["tip"]["create"]
    assert "--start-cluster" in again and "--timeout 3" in again and "--session-name slow" in again
    assert not os.path.exists(os.path.join(repl.project_dir, "session.json"))
    # Called again, it waits for the same start instead of starting twice.
    workspace.configure(start_delay=30.0)
    still = repl.create(TERMINATED_CLUSTER_ID, "slow", "--start-cluster", "--timeout", "1")
    assert still.status == "ClusterStarting", still
    assert len(_starts(workspace)) == 1


def test_find_cluster_says_which_clusters_can_be_started_and_why_they_are_off(repl):
    found = repl.run("find-cluster", "--name", "analytics-prod", project=False)
    assert found.status == "Found", found
    assert found["startable"] is True and found["state"] == "TERMINATED"
    assert "inactive" in found["state_message"].lower()
    assert "--start-cluster" in found["tip"]["start"] and "consent" in found["hint"]
    running = repl.run("find-cluster", "--name", "analytics-dev", project=False)
    assert running["startable"] is False


# These Spark tests share the module's workspace (one JVM), each with a session of its own.
SHARED_SPARK = pytest.mark.xdist_group("beyond_spark")


# -- SQL steps ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.spark
@SHARED_SPARK
def test_a_sql_step_writes_every_row_of_its_result_with_the_schema(spark_session):
    made = spark_session.exec("df = spark.range(5000).selectExpr('id', 'id * 2 AS twice', "
                        "'concat(\"n\", id) AS label')\ndf.createOrReplaceTempView('numbers')", "view")
    assert made.status == "Finished", made
    queried = spark_session.run("exec", "--sql", "SELECT id, twice, label FROM numbers ORDER BY id", "--tag", "all_rows")
    assert queried.status == "Finished", queried
    table = queried["table"]
    assert table["rows"] == 5000 and table["total_rows"] == 5000 and table["truncated"] is False
    with open(spark_session.path(table["file"]), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "twice", "label"]
    assert len(rows) == 5001 and rows[-1] == ["4999", "9998", "n4999"]
    schema = json.loads(spark_session.read(table["schema_file"]))
    assert [(c["name"], c["type"]) for c in schema["columns"]] == [("id", "bigint"), ("twice", "bigint"),
                                                                   ("label", "string")]
    assert "id" in queried["stdout_preview"] and "| twice" in queried["stdout_preview"]
    assert table["column_names"] == ["id", "twice", "label"]        # plain names, as the CSV's header
    assert table["column_types"] == ["bigint", "bigint", "string"]


@pytest.mark.slow
@pytest.mark.spark
@SHARED_SPARK
def test_a_failing_sql_step_names_the_spark_exception(spark_session):
    missing = spark_session.run("exec", "--sql", "SELECT * FROM no_such_view", "--tag", "missing")
    assert missing.status == "Error", missing
    assert missing["error"]["type"].endswith("AnalysisException"), missing["error"]
    assert "no_such_view" in missing["error"]["message"]
    garbled = spark_session.run("exec", "--sql", "SELEKT 1", "--tag", "garbled")
    assert garbled["error"]["type"].endswith("ParseException"), garbled["error"]


@pytest.mark.slow
@pytest.mark.spark
@SHARED_SPARK
def test_sql_steps_export_as_spark_sql_and_replay_their_views(spark_session, spark_workspace):
    assert spark_session.run("exec", "--sql", "CREATE OR REPLACE TEMP VIEW small AS SELECT id FROM range(10)",
                       "--tag", "make_view").status == "Finished"
    assert spark_session.exec("print('unrelated')", "noise").status == "Finished"
    counted = spark_session.exec("print(spark.table('small').count())", "count")
    assert counted["stdout_preview"].strip() == "10"
    exported = spark_session.run("export", "--output", "script.py")
    assert exported.status == "Exported", exported
    script = spark_session.read(exported["output_file"])
    assert "display(spark.sql('CREATE OR REPLACE TEMP VIEW small AS SELECT id FROM range(10)'))" in script
    assert "_dbx_repl" not in script
    spark_workspace.evict()
    evicted = spark_session.exec("print(spark.table('small').count())", "count_again")
    assert evicted.status == "ContextEvicted", evicted
    assert evicted["replay_plan"]["steps"] == "1"
    assert spark_session.run("replay").status == "Replayed"
    assert spark_session.exec("print(spark.table('small').count())", "count_after")["stdout_preview"].strip() == "10"


# -- local modules on the cluster ---------------------------------------------------------------------

def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_synced_package_imports_picks_up_changes_and_comes_back_after_an_eviction(session, workspace, tmp_path):
    package = tmp_path / "src" / "shapes"
    _write(package / "__init__.py", "from .area import square\n")
    _write(package / "area.py", "def square(x):\n    return x * x\n")
    _write(package / "notes" / "big.csv", "x\n" * 10)
    _write(package / "scratch.log", "noise\n")
    _write(package / ".gitignore", "*.log\nnotes/\n")
    synced = session.run("sync", str(package))
    assert synced.status == "Synced", synced
    assert synced["files"] == 3 and synced["sent_count"] == 3      # __init__, area, .gitignore
    used = session.exec("import shapes\nprint(shapes.square(7))", "use")
    assert used["stdout_preview"].strip() == "49", used

    _write(package / "area.py", "def square(x):\n    return x * x + 1\n")
    again = session.run("sync", str(package))
    assert again.status == "Synced" and again["sent"] == ["area.py"], again
    assert "shapes.area" in again["reloaded"]
    assert session.exec("print(shapes.area.square(7))", "changed")["stdout_preview"].strip() == "50"

    unchanged = session.run("sync", str(package))
    assert unchanged["sent_count"] == 0

    workspace.evict()
    evicted = session.exec("print(shapes.square(3))", "after_eviction")
    assert evicted.status == "ContextEvicted", evicted
    assert evicted["synced_folders"] == ["shapes"] and "syncs" in evicted["hint"]
    replayed = session.run("replay")
    assert replayed.status == "Replayed", replayed
    assert replayed["synced"] == ["shapes"]
    assert session.exec("print(shapes.square(3))", "restored")["stdout_preview"].strip() == "10"


def test_sync_refuses_a_folder_over_the_cap_and_sends_nothing(session, tmp_path):
    folder = tmp_path / "heavy"
    _write(folder / "data.bin", "x" * 5000)
    refused = session.run("sync", str(folder), "--max-bytes", "1000")
    assert refused.status == "TooLarge" and refused.code == 1, refused
    assert "syncs" not in session.session()


# -- watching a running step ---------------------------------------------------------------------------

SLOW_SPARK_STEP = """
print('warming up the shuffle', flush=True)
def slowly(rows):
    import time
    for row in rows:
        time.sleep(0.04)
        yield row
pairs = sc.parallelize(range(400), 8).mapPartitions(slowly).map(lambda x: (x % 4, x))
print('summing by key', flush=True)
print(sorted(pairs.reduceByKey(lambda a, b: a + b).collect()))
"""


@pytest.mark.slow
@pytest.mark.spark
@SHARED_SPARK
def test_status_shows_the_spark_tasks_and_latest_output_of_a_running_step(spark_session, spark_workspace):
    assert spark_session.exec("print(spark.range(3).count())", "warm")["stdout_preview"].strip() == "3"
    running = spark_session.exec(SLOW_SPARK_STEP, "shuffle", "--timeout", "1")
    assert running.status == "Running", running
    assert "progress" in running.body
    assert "tasks" not in running.stderr               # no live line when stderr is not a terminal

    def spark_progress():
        status = spark_session.run("status")
        if status.status != "Busy":
            return None
        jobs = status["progress"].get("spark_jobs") or []
        return status if jobs and "summing by key" in status["progress"].get("output_tail", "") else None

    seen = wait_for(spark_progress, timeout=60, interval=0.5)
    assert seen, spark_session.run("status").body
    job = seen["progress"]["spark_jobs"][0]
    done, total = (int(n) for n in job["tasks"].split("/"))
    assert total >= 8 and 0 <= done <= total and len(job["stages"]) == 2, job
    assert job["description"]
    sidecar = spark_session.session()["sidecar_context_id"]
    assert sidecar and sidecar != spark_session.session()["context_id"]

    finished = spark_session.run("await", "--timeout", "90")
    assert finished.status == "Finished", finished
    assert "(0, 19800)" in spark_session.read(finished["stdout_file"])
    assert spark_session.session()["sidecar_context_id"] == sidecar          # one sidecar per session
    spark_session.run("destroy")
    assert sidecar not in spark_workspace.context_pids()


@pytest.mark.slow
def test_await_follow_streams_progress_lines_then_answers_as_usual(session):
    step = "import time\nfor i in range(8):\n    print('tick', i, flush=True)\n    time.sleep(0.5)\n"
    assert session.exec(step, "ticks", "--timeout", "1").status == "Running"
    followed = session.run("await", "--follow", "--timeout", "60")
    assert followed.status == "Finished", followed
    lines = [line for line in followed.stderr.splitlines() if line.startswith("001_ticks")]
    assert lines and any("tick" in line for line in lines), followed.stderr


@pytest.mark.slow
def test_exec_on_a_terminal_shows_a_live_status_line_on_stderr(session):
    import pty
    import subprocess
    import threading
    master, slave = pty.openpty()
    step = "import time\nfor i in range(10):\n    print('tick', i, flush=True)\n    time.sleep(0.5)\n"
    proc = subprocess.Popen(session.argv("exec", "--command", step, "--tag", "live", "--timeout", "60"),
                            stdout=subprocess.PIPE, stderr=slave, text=True, cwd=session.cwd, env=session.env)
    os.close(slave)
    seen = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            seen.append(chunk.decode("utf-8", "replace"))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=90)
    reader.join(5)
    os.close(master)
    body = json.loads(stdout)
    assert body["status"] == "Finished", body
    terminal = "".join(seen)
    assert "001_live" in terminal and "tick" in terminal, terminal
    assert terminal.endswith("\r\x1b[K"), repr(terminal[-40:])       # the line is cleared before the answer


@pytest.mark.slow
def test_a_sidecar_lost_to_an_eviction_is_replaced_on_the_next_read(session, workspace):
    step = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second', flush=True)\ntime.sleep(30)\n"
    running = session.exec(step, "long", "--timeout", "1")
    assert running.status == "Running" and "output_tail" in running["progress"], running
    old = session.session()["sidecar_context_id"]
    workspace.evict(old)
    seen = wait_for(lambda: "second" in (session.run("status").get("progress") or {}).get("output_tail", ""),
                    timeout=30, interval=0.5)
    assert seen
    new = session.session()["sidecar_context_id"]
    assert new != old and new in workspace.context_pids()
    assert session.run("cancel").status == "Cancelled"
