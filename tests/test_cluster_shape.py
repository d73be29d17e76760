"""A local cluster has a real cluster's shape: one driver, one Spark shared by every context, the
Databricks Runtime's Python, notebook-scoped libraries, SQL contexts, cancel that ends Spark jobs,
and nothing left behind on the host.

Most tests share one workspace (``spark_workspace``, module-scoped): its JVM starts once.
"""

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest
from databricks.sdk.errors import DatabricksError
from databricks.sdk.service.compute import Language

from local_workspace import RUNNING_CLUSTER_ID
from local_workspace.paths import host_path
from local_workspace.runtime import RUNTIMES, cache_root, ensure_runtime, pin
from local_workspace.sandbox import HOST_ALIASES
from repl_harness import Repl, process_tree

# The module shares one workspace, whose Spark (a JVM) its tests use; one worker runs it all.
pytestmark = [pytest.mark.slow, pytest.mark.spark, pytest.mark.xdist_group("cluster_shape")]

CANCEL_DEADLINE = 2.0  # a cancelled command must end within this (the behaviour under test)
SPARK_SLEEPING_JOB = ("import time\n"
                      "spark.range(2).repartition(2).rdd.map(lambda r: time.sleep(60)).count()")


def _context(client, language=Language.PYTHON):
    return client.command_execution.create_and_wait(cluster_id=RUNNING_CLUSTER_ID,
                                                    language=language).id


def _run(client, context_id, code, language=Language.PYTHON):
    """Run code in a context; the command's results (status must be Finished)."""
    response = client.command_execution.execute_and_wait(
        cluster_id=RUNNING_CLUSTER_ID, context_id=context_id, command=code, language=language)
    assert response.status.value == "Finished", response
    return response.results


def _text(client, context_id, code):
    results = _run(client, context_id, code)
    assert results.result_type.value == "text", (results.summary, results.cause)
    return results.data


@pytest.fixture(scope="module")
def two_contexts(spark_client):
    return _context(spark_client), _context(spark_client)


# -- one Spark per cluster -----------------------------------------------------------------------

def test_a_table_saved_in_one_context_is_read_in_another(spark_client, two_contexts):
    first, second = two_contexts
    _text(spark_client, first,
          "spark.createDataFrame([(1, 'a'), (2, 'b')], 'n long, s string')"
          ".write.saveAsTable('shared_numbers')")
    assert _text(spark_client, second,
                 "print(sorted(r.s for r in spark.table('shared_numbers').collect()))") \
        == "['a', 'b']"


def test_pyspark_functions_find_the_spark_context_before_spark_is_used(spark_client):
    # On a cluster the SparkContext is up before a notebook's first line: col() and a UDF's
    # return type need it, and SparkContext.getOrCreate() returns it rather than a JVM of its own.
    functions_first, get_or_create_first = _context(spark_client), _context(spark_client)
    out = _text(spark_client, functions_first,
                "from pyspark.sql.functions import col, udf\n"
                "adult = col('age') >= 18\n"
                "@udf('long')\n"
                "def plus_one(v):\n"
                "    return v + 1\n"
                "print(type(adult).__name__, spark.range(3).select(plus_one('id')).first()[0])")
    assert out == "Column 1"
    out = _text(spark_client, get_or_create_first,
                "from pyspark import SparkContext\n"
                "found = SparkContext.getOrCreate()\n"
                "print(type(found).__name__, found.applicationId == spark.sparkContext.applicationId)")
    assert out == "SparkContext True"


def test_global_temp_views_are_shared_and_temp_views_are_not(spark_client, two_contexts):
    first, second = two_contexts
    _text(spark_client, first, "spark.range(3).createOrReplaceGlobalTempView('g_numbers')\n"
                               "spark.range(5).createOrReplaceTempView('my_numbers')")
    assert _text(spark_client, second,
                 "print(spark.table('global_temp.g_numbers').count())") == "3"
    missing = _run(spark_client, second, "spark.table('my_numbers').count()")
    assert missing.result_type.value == "error"
    assert "my_numbers" in missing.summary and "AnalysisException" in missing.summary
    assert _text(spark_client, first, "print(spark.table('my_numbers').count())") == "5"


def test_every_context_has_the_notebook_names(spark_client, two_contexts):
    first, _ = two_contexts
    out = _text(spark_client, first,
                "spark.range(2).createOrReplaceTempView('two_rows')\n"
                "print(sc.defaultParallelism > 0, sqlContext.sql('select 1 as x').first().x,\n"
                "      sql('select 2 as y').first().y, table('two_rows').count(),\n"
                "      callable(display), callable(displayHTML), dbutils is not None)\n"
                "ip = get_ipython()\n"
                "ip.system('echo from-system')\n"
                "print(sc.applicationId == spark.sparkContext.applicationId)")
    assert out == "True 1 2 2 True True True\nfrom-system\nTrue"


def test_the_runtime_s_spark_defaults_are_set(spark_client, two_contexts):
    first, _ = two_contexts
    out = _text(spark_client, first,
                "import time\n"
                "print(spark.conf.get('spark.sql.execution.arrow.pyspark.enabled'),\n"
                "      spark.conf.get('spark.sql.session.timeZone'),\n"
                "      spark.conf.get('spark.sql.ansi.enabled'),\n"
                "      spark.sql('SELECT 1 / 0 AS q').first().q, time.strftime('%Z'),\n"
                "      sc.getConf().get('spark.databricks.clusterUsageTags.clusterId'))")
    # 15.4 (Spark 3.5): Arrow on, UTC, ANSI off (a division by zero is NULL).
    assert out.split() == ["true", "Etc/UTC", "false", "None", "UTC", RUNNING_CLUSTER_ID]


def test_every_context_shares_one_spark_application(spark_client, two_contexts):
    first, second = two_contexts
    apps = {_text(spark_client, ctx, "print(sc.applicationId)") for ctx in (first, second)}
    # notebook code that asks the builder first gets its context's session on the same Spark
    builder_first = _context(spark_client)
    apps.add(_text(spark_client, builder_first,
                   "from pyspark.sql import SparkSession\n"
                   "session = SparkSession.builder.appName('mine').getOrCreate()\n"
                   "print(session.sparkContext.applicationId)"))
    assert len(apps) == 1
    assert _text(spark_client, builder_first,  # one session: the builder's is `spark`
                 "session.range(1).createOrReplaceTempView('via_builder')\n"
                 "print(spark.table('via_builder').count())") == "1"


# -- the Databricks Runtime's Python ---------------------------------------------------------------

def _seen_from_a_context(host_path):
    """The paths a context may see ``host_path`` at: its own, or its alias where a driver path
    (the cluster's /tmp) hides it (sandbox.py)."""
    return (host_path, HOST_ALIASES + host_path)


def test_spark_version_is_the_pinned_runtime_s(spark_client, spark_workspace, two_contexts):
    runtime = RUNTIMES["15.4"]  # RUNNING_CLUSTER_ID's
    first, _ = two_contexts
    out = _text(spark_client, first,
                "import os, sys, pandas\n"
                "print(spark.version, os.environ['DATABRICKS_RUNTIME_VERSION'], pandas.__version__)\n"
                "print(sys.executable)")
    versions, executable = out.splitlines()
    assert versions.split() == [runtime.spark, runtime.version, pin(runtime, "pandas")]
    assert executable in _seen_from_a_context(ensure_runtime("15.4", progress=None).python)
    assert executable != sys.executable
    cluster = spark_client.clusters.get(RUNNING_CLUSTER_ID)
    assert cluster.spark_version == "15.4.x-scala2.12"


def test_create_dataframe_from_pandas_with_string_columns(spark_client, two_contexts):
    first, _ = two_contexts
    out = _text(spark_client, first,
                "import pandas as pd\n"
                "pdf = pd.DataFrame({'name': ['ada', 'bob'], 'team': ['x', 'y'], 'n': [1, 2]})\n"
                "df = spark.createDataFrame(pdf)\n"
                "print(df.dtypes)\n"
                "print(df.toPandas().to_dict('list'))")
    assert out == ("[('name', 'string'), ('team', 'string'), ('n', 'bigint')]\n"
                   "{'name': ['ada', 'bob'], 'team': ['x', 'y'], 'n': [1, 2]}")


def test_an_iris_workflow_runs_unchanged(spark_client, spark_workspace):
    context = _context(spark_client)
    model_path = host_path(spark_workspace._tmpdir, RUNNING_CLUSTER_ID,
                           "/Volumes/main/default/models/iris/model.joblib")
    _text(spark_client, context, "model_path = %r" % model_path)
    out = _text(spark_client, context, """
import os
import joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.model_selection import train_test_split

iris = load_iris(as_frame=True)
sdf = spark.createDataFrame(iris.frame)
print(sdf.count(), len(sdf.columns))
pdf = sdf.toPandas()
X_train, X_test, y_train, y_test = train_test_split(
    pdf.drop(columns=["target"]), pdf["target"], test_size=0.3, random_state=0)
model = LogisticRegression(max_iter=500).fit(X_train, y_train)
accuracy = accuracy_score(y_test, model.predict(X_test))
os.makedirs(os.path.dirname(model_path), exist_ok=True)
joblib.dump(model, model_path)
reloaded = joblib.load(model_path)
print(accuracy > 0.9, (reloaded.predict(X_test) == model.predict(X_test)).all())
""")
    assert out == "150 5\nTrue True"
    assert os.path.isfile(model_path) and model_path.startswith(spark_workspace._tmpdir)


# -- notebook-scoped libraries ---------------------------------------------------------------------

def _tiny_wheel(directory, name):
    """A pure-Python wheel built by hand (no network): ``<name>.WHERE`` says where it was found."""
    dist = "%s-0.1" % name
    files = {
        "%s/__init__.py" % name: "import os\nWHERE = os.path.dirname(__file__)\n",
        "%s.dist-info/METADATA" % dist: "Metadata-Version: 2.1\nName: %s\nVersion: 0.1\n" % name,
        "%s.dist-info/WHEEL" % dist: ("Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                      "Tag: py3-none-any\n"),
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append("%s,sha256=%s,%d" % (path, digest.decode(), len(text.encode())))
    record.append("%s.dist-info/RECORD,," % dist)
    files["%s.dist-info/RECORD" % dist] = "\n".join(record) + "\n"
    wheel = os.path.join(str(directory), "%s-py3-none-any.whl" % dist)
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def test_pip_install_stays_in_its_own_context(spark_client, spark_workspace):
    name = "lw_tiny_pkg_%d" % os.getpid()
    # The wheel sits on the driver (its /tmp), where %pip can read it, as a file put there would.
    built = _tiny_wheel(host_path(spark_workspace._tmpdir, RUNNING_CLUSTER_ID, "/tmp"), name)
    wheel = "/tmp/" + os.path.basename(built)
    installer, other = _context(spark_client), _context(spark_client)
    out = _text(spark_client, installer,
                "%%pip install --no-index %s\nimport %s\nprint(%s.WHERE)" % (wheel, name, name))
    assert "Successfully installed %s-0.1" % name.replace("_", "-") in out
    where = out.strip().splitlines()[-1]
    assert where.startswith(spark_workspace._tmpdir)  # the context's own environment
    runtime = ensure_runtime("15.4", progress=None)
    assert not where.startswith(_seen_from_a_context(runtime.site_packages))
    assert not os.path.exists(os.path.join(runtime.site_packages, name))
    missing = _run(spark_client, other, "import %s" % name)
    assert missing.result_type.value == "error" and "ModuleNotFoundError" in missing.summary
    host = subprocess.run([sys.executable, "-c", "import %s" % name], capture_output=True)
    assert host.returncode != 0 and b"ModuleNotFoundError" in host.stderr
    # `python` and `pip` in the shell are the context's too
    prefix = _text(spark_client, installer, "!python -c 'import sys; print(sys.prefix)'").strip()
    assert os.path.dirname(where).startswith(prefix + os.sep)
    # pip saw the runtime's packages: nothing of the runtime was installed a second time
    assert _text(spark_client, installer, "import pandas, os\nprint(pandas.__file__)") \
        .startswith(_seen_from_a_context(runtime.site_packages))


# -- SQL contexts ----------------------------------------------------------------------------------

def test_a_sql_context_answers_with_a_table(spark_client, two_contexts):
    python_context, _ = two_contexts
    _text(spark_client, python_context,
          "spark.createDataFrame([(1, 'a'), (2, 'b')], 'n long, s string')"
          ".write.mode('overwrite').saveAsTable('sql_numbers')")
    context = _context(spark_client, Language.SQL)
    results = _run(spark_client, context,
                   "CREATE OR REPLACE TEMP VIEW evens AS SELECT * FROM sql_numbers WHERE n % 2 = 0;\n"
                   "SELECT n, s FROM sql_numbers ORDER BY n", Language.SQL)
    assert results.result_type.value == "table"
    assert results.data == [[1, "a"], [2, "b"]]
    assert [c["name"] for c in results.schema] == ["n", "s"]
    assert results.truncated is False


def test_a_sql_result_is_capped_like_a_table(spark_client):
    context = _context(spark_client, Language.SQL)
    results = _run(spark_client, context, "SELECT id FROM range(20000)", Language.SQL)
    assert results.result_type.value == "table"
    assert len(results.data) == 10_000 and results.truncated is True


def test_a_language_the_cluster_cannot_run_is_refused(spark_client):
    with pytest.raises(DatabricksError) as refused:
        spark_client.command_execution.create(cluster_id=RUNNING_CLUSTER_ID,
                                              language=Language.SCALA).result()
    assert "scala" in str(refused.value)


# -- cancel with Spark running ---------------------------------------------------------------------

def _wait_terminal(client, context_id, command_id, deadline):
    while True:
        status = client.command_execution.command_status(
            cluster_id=RUNNING_CLUSTER_ID, context_id=context_id, command_id=command_id)
        if status.status.value in ("Finished", "Cancelled", "Error"):
            return status
        if time.monotonic() > deadline:
            return status
        time.sleep(0.05)


@pytest.mark.parametrize("cancel_mode", ["cancelled", "finished_error"])
def test_cancel_with_spark_running_keeps_the_session(spark_client, spark_workspace, cancel_mode):
    spark_workspace.configure(cancel_mode=cancel_mode)
    try:
        context = _context(spark_client)
        _text(spark_client, context, "kept = 41\nprint(spark.range(3).count())")
        command_id = spark_client.command_execution.execute(
            cluster_id=RUNNING_CLUSTER_ID, context_id=context, command=SPARK_SLEEPING_JOB,
            language=Language.PYTHON).command_id
        _wait_for_spark_job(spark_client, context)
        spark_client.command_execution.cancel(cluster_id=RUNNING_CLUSTER_ID, context_id=context,
                                              command_id=command_id)
        ended = _wait_terminal(spark_client, context, command_id,
                               time.monotonic() + CANCEL_DEADLINE)
        if cancel_mode == "cancelled":
            assert ended.status.value == "Cancelled", ended
        else:
            assert ended.status.value == "Finished", ended
            assert "CommandCancelledException" in ended.results.summary
        assert _text(spark_client, context, "kept += 1\nprint(kept, spark.range(4).count())") \
            == "42 4"
    finally:
        spark_workspace.configure(cancel_mode="cancelled")


def test_cancel_of_a_blocking_spark_call_that_is_no_job_keeps_spark_usable(spark_client):
    # A JVM call that no job group can cancel: the interrupt cuts it after a grace period, and the
    # context's py4j connection (out of step) is replaced, so Spark keeps answering correctly.
    context = _context(spark_client)
    _text(spark_client, context, "kept = 7\nprint(spark.range(2).count())")
    command_id = spark_client.command_execution.execute(
        cluster_id=RUNNING_CLUSTER_ID, context_id=context,
        command="sc._jvm.java.lang.Thread.sleep(60000)", language=Language.PYTHON).command_id
    _wait_running(spark_client, context, command_id)
    _wait_for_jvm_sleep(spark_client)
    spark_client.command_execution.cancel(cluster_id=RUNNING_CLUSTER_ID, context_id=context,
                                          command_id=command_id)
    ended = _wait_terminal(spark_client, context, command_id, time.monotonic() + CANCEL_DEADLINE)
    assert ended.status.value == "Cancelled", ended
    assert _text(spark_client, context,
                 "print(kept, spark.range(3).count(), spark.range(4).count())") == "7 3 4"


def _wait_running(client, context, command_id, timeout=30):
    deadline = time.monotonic() + timeout
    while client.command_execution.command_status(
            cluster_id=RUNNING_CLUSTER_ID, context_id=context,
            command_id=command_id).status.value != "Running":
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.05)


JVM_SLEEPING_FOR_PY4J = """
threads = sc._jvm.java.lang.Thread.getAllStackTraces()
print(sum(1 for t in threads.keySet()
          if any(f.getMethodName() == 'sleep' for f in list(threads.get(t))[:3])
          and any(f.getClassName().startswith('py4j.') for f in threads.get(t))))
"""


def _wait_for_jvm_sleep(client, timeout=30):
    """Until a JVM thread serving a py4j call sleeps in Thread.sleep (the blocking call has begun)."""
    probe = _context(client)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _text(client, probe, JVM_SLEEPING_FOR_PY4J) != "0\n":
            return
        time.sleep(0.1)
    raise AssertionError("the blocking JVM call never started")


def _wait_for_spark_job(client, context, timeout=60):
    """Until a Spark job of the cluster is running (the sleeping job has started)."""
    probe = _context(client)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _text(client, probe, "print(len(sc.statusTracker().getActiveJobsIds()))") != "0\n":
            return
        time.sleep(0.2)
    raise AssertionError("the Spark job never started")


def test_cancel_from_the_cli_with_spark_running_keeps_the_session(spark_workspace, tmp_path):
    repl = Repl(spark_workspace, tmp_path / "project", tmp_path / "home")
    (tmp_path / "project").mkdir()
    (tmp_path / "home").mkdir()
    assert repl.create().status == "Created"
    assert repl.exec("kept = 'still here'\nprint(spark.range(2).count())", "warm").status \
        == "Finished"
    running = repl.exec(SPARK_SLEEPING_JOB, "spark_sleep", "--timeout", "3")
    assert running.status == "Running", running
    cancel = repl.run("cancel")
    assert cancel.status == "Cancelled" and cancel["command_id"] == running["command_id"], cancel
    after = repl.exec("print(kept, spark.range(3).count())", "after")
    assert after.status == "Finished" and after["stdout_preview"] == "still here 3\n", after
    repl.run("destroy")


# -- clean: nothing left behind --------------------------------------------------------------------

def _all_end(pids, timeout=5.0):
    """Do all these processes end within ``timeout`` s (a SIGKILL takes effect asynchronously)?"""
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# Runs in a child process: a workspace that uses Spark, then stop(); reports what is left.
WORKSPACE_LIFETIME = """
import json, os, sys
sys.path.insert(0, %(tests)r)
import test_cluster_shape as t
from conftest import _client_for
from local_workspace import LocalWorkspace, RUNNING_CLUSTER_ID
before = sorted(os.listdir("/tmp"))
ws = LocalWorkspace().start()
try:
    client = _client_for(ws)
    context = t._context(client)
    out = t._text(client, context, "spark.range(10).write.saveAsTable('t')\\n"
                                   "import tempfile; tempfile.mkstemp()\\n"
                                   "print(spark.table('t').count())")
    driver = ws.driver_pids()[RUNNING_CLUSTER_ID]
    tree = sorted(t.process_tree([driver]) | set(ws.context_pids().values()))
    java = any("java" in open("/proc/%%d/cmdline" %% p).read() for p in tree if t._alive(p))
    state_dir = ws._tmpdir
finally:
    ws.stop()
print(json.dumps({"out": out, "java": java, "ended": t._all_end(tree),
                  "state_dir_left": os.path.exists(state_dir),
                  "tmp_before": before, "tmp_after": sorted(os.listdir("/tmp"))}))
"""


# An empty /tmp (tmpfs) in a mount namespace, with the host's /tmp entries the child needs bound
# back at their paths, then the command. The old /tmp is still the shell's working directory, so
# "./x" names the host's /tmp/x (--no-canonicalize: mount would turn it into the new /tmp/x).
PRIVATE_TMP = """cd /tmp && mount -t tmpfs tmpfs /tmp || exit 1
while [ "$1" != -- ]; do
  mkdir -p "$1" && mount --no-canonicalize --bind "./${1#/tmp/}" "$1" || exit 1; shift
done
shift; cd / && exec "$@"
"""


def _private_tmp_prefix(keep):
    """``unshare`` argv that gives a child an empty /tmp of its own (so only its own litter
    shows) but for the paths in ``keep`` (a checkout, a venv or a cache that lives under the
    host's /tmp), or [] where mount namespaces are not allowed (then the host's /tmp is
    compared)."""
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", PRIVATE_TMP, "sh"]
    under_tmp = sorted({os.path.abspath(p) for p in keep if os.path.abspath(p).startswith("/tmp/")})
    outermost = [p for p in under_tmp if not any(p.startswith(q + "/") for q in under_tmp)]
    try:
        probe = subprocess.run(prefix + outermost + ["--", "true"], capture_output=True,
                               timeout=10)
        if probe.returncode == 0:
            return prefix + outermost + ["--"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return []


def test_a_workspace_that_used_spark_leaves_no_process_and_nothing_in_tmp():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = WORKSPACE_LIFETIME % {"tests": tests_dir}
    os.makedirs(cache_root(), exist_ok=True)  # where the runtimes are (bound back if under /tmp)
    keep = [os.path.dirname(tests_dir), sys.prefix, sys.base_prefix, cache_root()]
    proc = subprocess.run(_private_tmp_prefix(keep) + [sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["out"] == "10" and report["java"]
    assert report["ended"], "a driver, JVM or context process outlived stop()"
    assert not report["state_dir_left"]
    assert sorted(set(report["tmp_after"]) - set(report["tmp_before"])) == []


def test_terminating_a_cluster_ends_its_driver_and_jvm(spark_client, spark_workspace):
    # Last in this module: it terminates the shared workspace's cluster.
    context = _context(spark_client)
    _text(spark_client, context, "print(spark.range(1).count())")
    driver_pid = spark_workspace.driver_pids()[RUNNING_CLUSTER_ID]
    tree = sorted(process_tree([driver_pid]))
    assert len(tree) >= 2  # the driver and its JVM
    spark_workspace.set_cluster_state(RUNNING_CLUSTER_ID, "TERMINATED")
    assert _all_end(tree)
    assert RUNNING_CLUSTER_ID not in spark_workspace.driver_pids()
