"""Each cluster runs the Databricks Runtime its spark_version names: the runtime's Python, its
Apache Spark and the release notes' libraries; a runtime that cannot be had here fails the
cluster's start the way a bad configuration does; builds waiting on one another say so."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from databricks.sdk.errors import DatabricksError, OperationFailed
from databricks.sdk.service.compute import ResultType, State

from conftest import _client_for, _running_workspace
from local_workspace import (DEDICATED_CLUSTER_ID, RUNNING_CLUSTER_ID, STANDARD_CLUSTER_ID,
                             TERMINATED_CLUSTER_ID)
from local_workspace.paths import cluster_dir
from local_workspace.runtime import PYTHONS_ENV, RUNTIMES, cache_root, pin, runtime_dir
from local_workspace.sandbox import HOST_ALIASES
from test_local_workspace import new_context, run, text, wait_for

pytestmark = pytest.mark.xdist_group("runtimes")   # one worker runs the module: its module-scoped workspace starts once

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REAL_CACHE = cache_root()  # the runtimes' cache as this test run found it


@pytest.fixture(scope="module")
def workspace_17():
    """One workspace for this module's 17.3 contexts (its Spark JVM starts once)."""
    yield from _running_workspace()


@pytest.fixture(scope="module")
def client_17(workspace_17):
    return _client_for(workspace_17)


# -- the runtime follows the cluster's spark_version -----------------------------------------------

def test_a_17_3_context_runs_python_3_12_with_pyspark_4_and_the_runtime_s_libraries(client_17):
    context = new_context(client_17, DEDICATED_CLUSTER_ID)
    out = text(client_17, context,
               "import os, sys, pyspark, cloudpickle, pandas\n"
               "print('%d.%d' % sys.version_info[:2], pyspark.__version__,\n"
               "      cloudpickle.__version__, pandas.__version__,\n"
               "      os.environ['DATABRICKS_RUNTIME_VERSION'])",
               DEDICATED_CLUSTER_ID)
    runtime = RUNTIMES["17.3"]
    assert out.split() == ["3.12", "4.0.0", pin(runtime, "cloudpickle"), pin(runtime, "pandas"),
                           "17.3"]


def test_the_standard_17_3_cluster_runs_the_same_runtime(client_17):
    context = new_context(client_17, STANDARD_CLUSTER_ID)
    assert text(client_17, context, "import sys, pyspark; print(sys.version_info[:2], "
                                    "pyspark.__version__)", STANDARD_CLUSTER_ID) \
        == "(3, 12) 4.0.0"


@pytest.mark.slow
@pytest.mark.spark
def test_spark_on_a_17_3_cluster_is_apache_spark_4(client_17):
    context = new_context(client_17, DEDICATED_CLUSTER_ID)
    results = run(client_17, context,  # the JVM's cold start: up to a minute on 2 busy cores
                  "print(spark.version, spark.range(5).selectExpr('sum(id) AS s').first().s)",
                  DEDICATED_CLUSTER_ID, timeout=180)
    assert results.result_type == ResultType.TEXT, results
    assert results.data == "4.0.0 10"
    # DBR 17.0 and above, with Spark 4.0: ANSI mode is on, so a division by zero fails.
    assert text(client_17, context, "print(spark.conf.get('spark.sql.ansi.enabled'))",
                DEDICATED_CLUSTER_ID) == "true"
    divided = run(client_17, context, "spark.sql('SELECT 1 / 0 AS q').collect()",
                  DEDICATED_CLUSTER_ID)
    assert divided.result_type == ResultType.ERROR and "DIVIDE_BY_ZERO" in divided.summary


@pytest.mark.slow
def test_a_15_4_context_imports_the_release_notes_libraries(sdk_client):
    context = new_context(sdk_client)
    runtime = RUNTIMES["15.4"]
    out = text(sdk_client, context,
               "import sys, cloudpickle, statsmodels, seaborn, plotly, databricks.sdk\n"
               "print('%d.%d' % sys.version_info[:2], cloudpickle.__version__,\n"
               "      statsmodels.__version__, databricks.sdk.version.__version__)")
    assert out.split() == ["3.11", pin(runtime, "cloudpickle"), pin(runtime, "statsmodels"),
                           pin(runtime, "databricks-sdk")]


@pytest.mark.slow
def test_a_runtime_cached_under_tmp_is_seen_by_contexts_and_tmp_stays_the_cluster_s(
        sdk_client, workspace, tmp_path, monkeypatch):
    # A newcomer's XDG_CACHE_HOME under /tmp holds the runtimes (here: the same ones, through a
    # symlink). The cluster's own /tmp hides that path, yet the context runs on the runtime,
    # seen under the host-path alias, and neither the cluster's /tmp nor the host's gains
    # anything from it.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    os.symlink(REAL_CACHE, os.path.join(str(tmp_path), "databricks-repl"))
    venv = runtime_dir(RUNTIMES["15.4"])
    assert venv.startswith(str(tmp_path) + "/")
    context = new_context(sdk_client)
    out = text(sdk_client, context, "import json, os, sys, pandas, sklearn\n"
                                    "print(json.dumps([sys.prefix, os.listdir('/tmp')]))")
    prefix, seen = json.loads(out)
    assert prefix == HOST_ALIASES + venv
    host_top = str(tmp_path).split("/")[2]  # /tmp/<host_top>/...: the host's, not the cluster's
    assert host_top not in seen
    cluster_tmp = os.path.join(cluster_dir(workspace._tmpdir, RUNNING_CLUSTER_ID), "tmp")
    state_mount = os.path.basename(workspace._tmpdir)  # the state dir keeps its own path
    assert [n for n in os.listdir(cluster_tmp) if n != state_mount] == []


# -- a runtime that cannot be had here -------------------------------------------------------------

@pytest.mark.slow
def test_a_cluster_whose_runtime_has_no_interpreter_here_fails_to_start(
        sdk_client, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing built there
    monkeypatch.setenv(PYTHONS_ENV, str(tmp_path / "no-pythons"))  # and no interpreter
    with pytest.raises(OperationFailed) as failed:
        sdk_client.clusters.start_and_wait(TERMINATED_CLUSTER_ID)
    assert "TERMINATED" in str(failed.value) and "Python 3.11 is not installed" in str(failed.value)
    cluster = sdk_client.clusters.get(TERMINATED_CLUSTER_ID)
    assert cluster.state == State.TERMINATED
    assert "15.4.x-scala2.12" in cluster.state_message
    assert "pyenv install 3.11" in cluster.state_message
    assert cluster.termination_reason.code.value == "SPARK_IMAGE_NOT_FOUND"
    assert cluster.termination_reason.type.value == "CLIENT_ERROR"
    assert cluster.termination_reason.parameters["databricks_error_message"] \
        == cluster.state_message


def test_a_running_cluster_whose_runtime_is_missing_stops_at_its_first_context(
        sdk_client, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv(PYTHONS_ENV, str(tmp_path / "no-pythons"))
    context_id = sdk_client.command_execution.create(cluster_id=DEDICATED_CLUSTER_ID).context_id
    cluster = wait_for(lambda: (lambda c: c if c.state == State.TERMINATED else None)(
        sdk_client.clusters.get(DEDICATED_CLUSTER_ID)))
    assert "Python 3.12 is not installed" in cluster.state_message
    assert cluster.termination_reason.code.value == "SPARK_IMAGE_NOT_FOUND"
    with pytest.raises(DatabricksError):  # its context went with it
        sdk_client.command_execution.context_status(cluster_id=DEDICATED_CLUSTER_ID,
                                                    context_id=context_id)
    # The other clusters are unaffected.
    assert sdk_client.clusters.get(RUNNING_CLUSTER_ID).state == State.RUNNING


# -- builds that wait on one another ---------------------------------------------------------------

HOLD_LOCK = ("import fcntl, os, sys, time\n"
             "os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)\n"
             "f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX)\n"
             "print('held', flush=True); time.sleep(120)")


@pytest.mark.slow
def test_a_build_waiting_on_another_says_so_with_how_long_it_has_waited(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    lock = os.path.join(str(tmp_path), "databricks-repl", "runtime-15.4-py3.11.lock")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    waiter = None
    try:
        assert holder.stdout.readline() == "held\n"
        waiter = subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "local_workspace"),
                                   "runtime", "--version", "15.4"], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        said = []
        deadline = time.monotonic() + 60
        while len(said) < 2 and time.monotonic() < deadline:
            line = waiter.stderr.readline()
            if not line:
                break
            if "waiting for another build" in line:
                said.append(line)
        assert len(said) == 2, said
        assert "15.4" in said[0] and lock in said[0] and said[0].rstrip().endswith("0 s so far")
        waited = int(said[1].rsplit(":", 1)[1].split()[0])
        assert waited >= 10  # the second report comes after the first interval
        # nothing was built while it waited
        assert os.listdir(os.path.dirname(lock)) == [os.path.basename(lock)]
    finally:
        for proc in (waiter, holder):
            if proc is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
