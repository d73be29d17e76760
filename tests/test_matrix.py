"""The CLI's main paths on both access modes and on the oldest and newest LTS.

Each cell of the matrix (dedicated or standard access mode, on 15.4 or 17.3 LTS) is one CLI
session, driven as a subprocess, on one local workspace shared by the module (each cluster's Spark
starts once). A cell's tests run in file order on that session: exec and SQL, plots, output past
the service's limit, cancel of a running Spark job, progress while a Spark job runs, sub_llm's
authentication, sync/put/get, then replay after an eviction and export --verify. When a cell is
done its cluster is stopped, so at most one cluster's Spark runs at a time.

On standard access mode `spark` is a Spark Connect session (no `sc`): progress comes from the
Connect server's reports (Spark 4), and where the CLI cannot give a feature (Spark 3.5's Connect
reports no progress) it says why, never fails or stays silent.
"""

import hashlib
import json
import os

import pytest

from local_workspace import (DEDICATED_CLUSTER_ID, RUNNING_CLUSTER_ID, SHARED_CLUSTER_ID,
                             STANDARD_CLUSTER_ID)
from conftest import _running_workspace
from repl_harness import Repl, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.spark]

# (access mode, runtime, cluster)
CELLS = [
    ("dedicated", "15.4", RUNNING_CLUSTER_ID),
    ("dedicated", "17.3", DEDICATED_CLUSTER_ID),
    ("standard", "15.4", SHARED_CLUSTER_ID),
    ("standard", "17.3", STANDARD_CLUSTER_ID),
]
SPARK_TIMEOUT = "240"  # a cold JVM (and Connect server) on 2 busy cores
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Cell:
    def __init__(self, mode, runtime, cluster_id, repl):
        self.mode, self.runtime, self.cluster_id, self.repl = mode, runtime, cluster_id, repl

    @property
    def standard(self):
        return self.mode == "standard"

    def exec(self, command, tag, *extra):
        return self.repl.exec(command, tag, "--timeout", SPARK_TIMEOUT, *extra)

    def __repr__(self):
        return "%s-%s" % (self.mode, self.runtime)


@pytest.fixture(scope="module")
def workspace():
    yield from _running_workspace()


# One worker runs a cell's tests (an xdist group each): its session and cluster are set up once.
@pytest.fixture(scope="module", params=[pytest.param(c, id="%s-%s" % c[:2],
                                                     marks=pytest.mark.xdist_group("matrix-%s-%s" % c[:2]))
                                        for c in CELLS])
def cell(request, workspace, tmp_path_factory):
    """One CLI session on the cell's cluster, for all of the cell's tests; the cluster (its
    contexts and its Spark) stops when the cell is done."""
    mode, runtime, cluster_id = request.param
    base = tmp_path_factory.mktemp("matrix-%s-%s" % (mode, runtime))
    (base / "project").mkdir()
    (base / "home").mkdir()
    repl = Repl(workspace, base / "project", base / "home")
    created = repl.create(cluster_id, "matrix")
    assert created.status == "Created", created
    yield Cell(mode, runtime, cluster_id, repl)
    if repl.session().get("status") == "active":
        repl.run("destroy")
    workspace.set_cluster_state(cluster_id, "TERMINATED")


def _stdout(cell, call):
    return cell.repl.read(call["stdout_file"])


# -- exec and exec --sql ---------------------------------------------------------------------------

def test_exec_runs_spark_on_the_cell_s_runtime_and_sql_sees_its_temp_views(cell):
    facts = cell.exec("import pyspark\n"
                      "df = spark.range(5).selectExpr('id', 'id * id AS sq')\n"
                      "df.createOrReplaceTempView('squares')\n"
                      "print(pyspark.__version__, spark.version, df.count(),\n"
                      "      spark.conf.get('spark.sql.ansi.enabled'),\n"
                      "      spark.conf.get('spark.sql.session.timeZone'),\n"
                      "      'sc' in globals())", "facts")
    assert facts.status == "Finished", facts
    client, engine, count, ansi, zone, has_sc = _stdout(cell, facts).split()
    assert client == {"15.4": "3.5.0", "17.3": "4.0.0"}[cell.runtime]
    # A 15.4 standard cluster's Connect server runs on Spark 4.0 with 15.4's settings.
    assert engine == ("4.0.0" if cell.standard else client)
    assert count == "5" and zone == "Etc/UTC"
    assert ansi == ("true" if cell.runtime == "17.3" else "false")
    assert has_sc == str(not cell.standard)
    sql = cell.repl.run("exec", "--sql", "SELECT sum(sq) AS total, count(*) AS n FROM squares",
                        "--tag", "total", "--timeout", SPARK_TIMEOUT)
    assert sql.status == "Finished", sql
    assert sql["table"]["rows"] == 1 and sql["table"]["column_names"] == ["total", "n"]
    assert sql["table"]["column_types"] == ["bigint", "bigint"]
    assert cell.repl.read(sql["table"]["file"]).splitlines() == ["total,n", "30,5"]


def test_pyspark_functions_work_in_a_context_that_has_not_used_spark_yet(cell, workspace, tmp_path):
    # On a cluster Spark is up before a notebook's first line, so col() and a UDF's return type
    # (which ask pyspark for the active SparkContext) work before `spark` is touched.
    (tmp_path / "project").mkdir()
    (tmp_path / "home").mkdir()
    repl = Repl(workspace, tmp_path / "project", tmp_path / "home")
    assert repl.create(cell.cluster_id, "fresh").status == "Created"
    call = repl.exec("from pyspark.sql.functions import col, udf\n"
                     "adult = col('age') >= 18\n"
                     "@udf('long')\n"
                     "def plus_one(v):\n"
                     "    return v + 1\n"
                     "print(type(adult).__name__, spark.range(3).select(plus_one('id')).first()[0])",
                     "first", "--timeout", SPARK_TIMEOUT)
    assert call.status == "Finished", call
    assert repl.read(call["stdout_file"]).split() == ["Column", "1"]
    assert repl.run("destroy").status == "Destroyed"


# -- plots -------------------------------------------------------------------------------------------

def test_a_plot_lands_as_a_png(cell):
    workspace = cell.repl.workspace
    workspace.configure(plots_mode="images")
    try:
        call = cell.exec("import matplotlib.pyplot as plt\n"
                         "rows = spark.range(4).selectExpr('id', 'id * id AS sq').collect()\n"
                         "plt.plot([r.id for r in rows], [r.sq for r in rows])", "plot")
    finally:
        workspace.configure(plots_mode="repr")
    assert call.status == "Finished", call
    assert len(call["images"]) == 1, call
    assert cell.repl.read(call["images"][0], "rb").startswith(PNG_SIGNATURE)


# -- the full output past the service's limit ---------------------------------------------------------

@pytest.mark.parametrize("overflow", ["truncate", "discard"])
def test_the_full_output_arrives_past_the_service_s_limit(cell, overflow):
    workspace = cell.repl.workspace
    # 15.4: past 50,000 characters the service cuts (or discards) the text; 17.3: past the
    # cell's output size (here its smallest, 1 MB) it cuts it, whatever the DBR <= 16.4 switch.
    size = 60_000 if cell.runtime == "15.4" else 1_200_000
    workspace.configure(cell_output_mb=1, output_overflow=overflow)
    try:
        call = cell.exec("print(''.join(chr(97 + i %% 26) for i in range(%d)))" % size,
                         "big_" + overflow)
    finally:
        workspace.configure(cell_output_mb=10, output_overflow="truncate")
    assert call.status == "Finished", call
    expected = "".join(chr(97 + i % 26) for i in range(size)) + "\n"
    assert _stdout(cell, call) == expected
    assert call["stdout_bytes"] == size + 1 and call["truncated"] is False


# -- cancel of a running Spark job --------------------------------------------------------------------

LONG_SPARK_JOB = ("print('started', flush=True)\n"
                  "spark.range(0, 10**12, 1, 4).selectExpr('max(hash(id)) AS h').collect()")


def test_cancel_ends_a_running_spark_job_and_the_session_goes_on(cell):
    workspace = cell.repl.workspace
    running = cell.repl.exec(LONG_SPARK_JOB, "long", "--timeout", "2")
    if running.status == "Running":  # a cold Spark may still be starting: wait for the job
        assert wait_for(lambda: workspace.spark_jobs(cell.cluster_id), timeout=120, interval=0.5)
    assert running.status == "Running", running
    cancelled = cell.repl.run("cancel")
    assert cancelled.status == "Cancelled", cancelled
    # The cancel ended the command's Spark work, not only its Python.
    assert wait_for(lambda: workspace.spark_jobs(cell.cluster_id) == [], timeout=30, interval=0.2)
    after = cell.exec("print(spark.range(3).count())", "after")
    assert after.status == "Finished" and _stdout(cell, after) == "3\n", after


# -- progress while a Spark job runs --------------------------------------------------------------------

SLOW_SPARK_STEP = """print('collecting slowly', flush=True)
from pyspark.sql.functions import udf
@udf('long')
def slow(x):
    import time
    time.sleep(0.05)
    return x
print(spark.range(0, 400, 1, 8).select(slow('id').alias('x')).selectExpr('sum(x) AS s').first().s)
"""

def _status_while_running(cell):
    status = cell.repl.run("status")
    if status.status != "Busy":
        return None
    progress = status.get("progress") or {}
    return status if "collecting slowly" in progress.get("output_tail", "") else None


def test_status_shows_progress_while_a_spark_job_runs(cell):
    running = cell.repl.exec(SLOW_SPARK_STEP, "slow", "--timeout", "1")
    assert running.status == "Running", running
    try:
        seen = wait_for(lambda: _status_while_running(cell), timeout=90, interval=0.5)
        assert seen, cell.repl.run("status").body
        progress = seen["progress"]
        assert "error" not in progress, progress
        if cell.standard and cell.runtime == "15.4":
            # No status tracker over Spark Connect, and Spark 3.5's Connect reports no progress:
            # the answer says so, and why.
            assert "standard access mode" in json.dumps(progress), progress
        else:   # the status tracker (dedicated), or what Spark 4's Connect server reports (standard),
            # whose first report of an operation may come before its stages (tasks 0/0)
            def with_tasks():
                seen = _status_while_running(cell)
                jobs = (seen or {}).get("progress", {}).get("spark_jobs") or []
                return [job for job in jobs if int(job["tasks"].split("/")[1]) >= 8]
            assert wait_for(with_tasks, timeout=90, interval=0.5), cell.repl.run("status").body
    finally:
        finished = cell.repl.run("await", "--timeout", SPARK_TIMEOUT)
    assert finished.status == "Finished", finished
    assert _stdout(cell, finished).splitlines()[-1] == str(sum(range(400)))


# -- sub_llm authentication ---------------------------------------------------------------------------

def test_sub_llm_authenticates_through_the_runtime(cell):
    call = cell.exec("import json\n"
                     "print(json.dumps([sub_llm('upper: matrix ok'), sub_llm_usage()['auth']]))",
                     "llm")
    assert call.status == "Finished", call
    answer, auth = json.loads(_stdout(cell, call).strip().splitlines()[-1])
    assert answer == "MATRIX OK" and auth == "dbruntime"


# -- sync, put and get ---------------------------------------------------------------------------------

def test_sync_put_and_get_move_files_both_ways(cell, tmp_path):
    package = tmp_path / "shapes"
    package.mkdir()
    (package / "__init__.py").write_text("def area(n):\n    return n * n\n")
    synced = cell.repl.run("sync", str(package))
    assert synced.status == "Synced", synced
    payload = os.urandom(300_000)
    local = tmp_path / "blob.bin"
    local.write_bytes(payload)
    remote = "/tmp/matrix/blob.bin"
    put = cell.repl.run("put", str(local), remote)
    assert put.status == "Uploaded" and put["sha256"] == hashlib.sha256(payload).hexdigest(), put
    used = cell.exec("import hashlib, shapes\n"
                     "print(shapes.area(7), hashlib.sha256(open(%r, 'rb').read()).hexdigest())\n"
                     "spark.createDataFrame([(shapes.area(3),)], 'a long').write.mode('overwrite')"
                     ".saveAsTable('areas')" % remote, "use")
    assert used.status == "Finished", used
    assert _stdout(cell, used).split() == ["49", put["sha256"]]
    got = cell.repl.run("get", remote, str(tmp_path / "back.bin"))
    assert got.status == "Downloaded", got
    assert (tmp_path / "back.bin").read_bytes() == payload


# -- replay after an eviction, export --verify ------------------------------------------------------------

def test_replay_after_an_eviction_then_export_verify(cell):
    base = cell.exec("base = spark.range(12).selectExpr('id', 'id % 3 AS k')\n"
                     "base.createOrReplaceTempView('base')", "base")
    assert base.status == "Finished", base
    counts = cell.exec("counts = {r.k: r.c for r in spark.sql("
                       "'SELECT k, count(*) AS c FROM base GROUP BY k').collect()}", "counts")
    assert counts.status == "Finished", counts
    cell.repl.workspace.evict(cell.repl.session()["context_id"])
    evicted = cell.exec("print(sorted(counts.items()), spark.table('areas').first().a)", "report")
    assert evicted.status == "ContextEvicted", evicted
    steps = [int(s) for s in evicted["replay_plan"]["steps"].replace("-", ",").split(",")]
    assert steps, evicted
    replayed = cell.repl.run("replay", "--timeout", SPARK_TIMEOUT)
    assert replayed.status == "Replayed", replayed
    report = cell.exec("print(sorted(counts.items()), spark.table('areas').first().a)", "report")
    assert report.status == "Finished", report
    assert _stdout(cell, report) == "[(0, 4), (1, 4), (2, 4)] 9\n"
    mine = [s["step"] for s in cell.repl.session()["steps"]  # the originals, not their replays
            if s["tag"] in ("base", "counts", "report") and s["status"] == "Finished"
            and "replay_of" not in s]
    exported = cell.repl.run("export", "--steps", ",".join(map(str, mine)), "--verify",
                             "--timeout", SPARK_TIMEOUT)
    assert exported.status == "Exported", exported
    assert exported["verify"]["status"] == "Passed", exported
