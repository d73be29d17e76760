"""Standard access mode: Python's `spark` is a Spark Connect session to the cluster's own Spark.

The cluster here is the 15.4 USER_ISOLATION one: its contexts run pyspark 3.5's Connect client
against a Connect server on Spark 4.0 (pyspark 3.5 ships none), the hardest pairing. Its JVM
starts once for the module. What the CLI does on both modes is in test_matrix.py.
"""

import time

import pytest
from databricks.sdk.service.compute import CommandStatus, Language, ResultType

from conftest import _client_for, _running_workspace
from local_workspace import SHARED_CLUSTER_ID
from test_local_workspace import new_context, run, text, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.spark,
              pytest.mark.xdist_group("access_modes")]   # one worker runs the module: its module-scoped workspace starts once

CLUSTER = SHARED_CLUSTER_ID
LONG_JOB = "spark.range(0, 10**12, 1, 2).selectExpr('max(hash(id)) AS h').collect()"


@pytest.fixture(scope="module")
def workspace():
    yield from _running_workspace()


@pytest.fixture(scope="module")
def client(workspace):
    return _client_for(workspace)


@pytest.fixture(scope="module")
def two_contexts(client):
    return new_context(client, CLUSTER), new_context(client, CLUSTER)


def test_spark_is_a_connect_session_and_there_is_no_spark_context(client, two_contexts):
    first, _ = two_contexts
    out = run(client, first, "import pyspark\n"
                             "from pyspark.sql import SparkSession\n"
                             "mine = SparkSession.builder.appName('mine').getOrCreate()\n"
                             "print(type(mine).__module__, mine is SparkSession.getActiveSession(),\n"
                             "      pyspark.__version__, mine.version, mine.range(3).count(),\n"
                             "      'sc' in globals(), 'sqlContext' in globals())",
              CLUSTER, timeout=240)  # the JVM and its Connect server start here
    assert out.result_type == ResultType.TEXT, (out.summary, out.cause)
    assert out.data.split() == ["pyspark.sql.connect.session", "True", "3.5.0", "4.0.0", "3",
                                "False", "False"]
    no_context = run(client, first, "spark.sparkContext", CLUSTER)
    assert no_context.result_type == ResultType.ERROR
    assert "sparkContext" in no_context.summary and "NOT_IMPLEMENTED" in no_context.summary
    refused = run(client, first, "from pyspark import SparkContext\nSparkContext.getOrCreate()",
                  CLUSTER)
    assert refused.result_type == ResultType.ERROR
    assert "CONTEXT_UNAVAILABLE_FOR_REMOTE_CLIENT" in refused.summary


def test_the_15_4_settings_hold_on_the_connect_server(client, two_contexts):
    first, _ = two_contexts
    out = text(client, first, "print(spark.conf.get('spark.sql.ansi.enabled'),\n"
                              "      spark.conf.get('spark.sql.session.timeZone'),\n"
                              "      spark.conf.get('spark.databricks.clusterUsageTags.clusterId'),\n"
                              "      spark.sql('SELECT 1 / 0 AS q').first().q)", CLUSTER)
    assert out.split() == ["false", "Etc/UTC", CLUSTER, "None"]


def test_python_udfs_run_on_the_cluster_s_python(client, two_contexts):
    first, _ = two_contexts
    out = text(client, first, "import pandas as pd\n"
                              "from pyspark.sql.functions import pandas_udf, udf\n"
                              "@udf('string')\n"
                              "def version(x):\n"
                              "    import sys\n"
                              "    return '%d.%d' % sys.version_info[:2]\n"
                              "@pandas_udf('long')\n"
                              "def plus(s: pd.Series) -> pd.Series:\n"
                              "    return s + 1\n"
                              "row = spark.range(1).select(version('id'), plus('id')).first()\n"
                              "print(row[0], row[1])", CLUSTER)
    assert out == "3.11 1"


def test_temp_views_are_per_context_and_tables_are_shared(client, two_contexts):
    first, second = two_contexts
    text(client, first, "spark.range(4).createOrReplaceTempView('mine')\n"
                        "spark.range(3).createOrReplaceGlobalTempView('everyone')\n"
                        "spark.range(5).write.mode('overwrite').saveAsTable('kept')", CLUSTER)
    assert text(client, second, "print(spark.table('kept').count(),\n"
                                "      spark.table('global_temp.everyone').count())",
                CLUSTER) == "5 3"
    missing = run(client, second, "spark.table('mine').count()", CLUSTER)
    assert missing.result_type == ResultType.ERROR and "TABLE_OR_VIEW_NOT_FOUND" in missing.summary
    assert text(client, first, "print(spark.table('mine').count())", CLUSTER) == "4"


def _start(client, context_id, code):
    return client.command_execution.execute(cluster_id=CLUSTER, context_id=context_id,
                                            language=Language.PYTHON, command=code).response.id


def _status(client, context_id, command_id):
    return client.command_execution.command_status(cluster_id=CLUSTER, context_id=context_id,
                                                   command_id=command_id).status


def test_a_cancel_interrupts_only_its_command_s_operations(client, workspace, two_contexts):
    first, second = two_contexts
    mine, theirs = _start(client, first, LONG_JOB), _start(client, second, LONG_JOB)
    assert wait_for(lambda: len(workspace.spark_jobs(CLUSTER) or []) == 2, timeout=60)
    client.command_execution.cancel(cluster_id=CLUSTER, context_id=first, command_id=mine)
    assert wait_for(lambda: _status(client, first, mine) == CommandStatus.CANCELLED)
    # Its operations ended by their tag: one job is left, the other context's, still running.
    assert wait_for(lambda: len(workspace.spark_jobs(CLUSTER)) == 1, timeout=30)
    time.sleep(1.0)  # give a wrongly cancelled job the time to end (it must not)
    assert _status(client, second, theirs) == CommandStatus.RUNNING
    client.command_execution.cancel(cluster_id=CLUSTER, context_id=second, command_id=theirs)
    assert wait_for(lambda: _status(client, second, theirs) == CommandStatus.CANCELLED)
    assert wait_for(lambda: workspace.spark_jobs(CLUSTER) == [], timeout=30)
    # Both sessions go on.
    assert [text(client, c, "print(spark.range(2).count())", CLUSTER) for c in two_contexts] \
        == ["2", "2"]
