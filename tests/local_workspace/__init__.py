"""A local stand-in for a Databricks workspace, for tests and offline use.

The wire layer (HTTP in and out):

* ``wire``     - the HTTP/1.1 server, auth, injected faults, the request log, errors -> answers;
* ``routes``   - the route table: every endpoint and its handler (the control API too);

the backends (each with its own state and lock, all reading one ``config.Config``):

* ``clusters`` - cluster records, lifecycle, events and readiness;
* ``contexts`` - execution contexts and commands: the worker processes behind the 1.2 API;
* ``files``    - DBFS, Files and Workspace REST over the driver paths (``paths``), libraries, SCIM;
* ``serving``  - model serving with a deterministic chat model;
* ``errors``   - the domain errors they raise;

the processes of a cluster:

* ``driver``   - a cluster's driver: the one JVM/SparkContext its contexts share;
* ``runtime``  - the Databricks Runtimes (per cluster, from its spark_version), built lazily;
* ``worker``   - one execution context: the pipe protocol and main loop of a Python REPL process,
  with ``cell`` (running a Python command), ``capture`` (stdout/stderr), ``display`` (tables,
  images), ``magics`` (%pip, %sh, !), ``sql`` (SQL commands), ``dbutils`` (dbutils, the notebook
  context, ``dbruntime`` and runtime auth) and ``spark`` (``spark``, ``sc``, ``sqlContext``);
* ``server``   - ``LocalWorkspace``, which puts it all together, and the ``serve`` command.

    python tests/local_workspace serve [--port N] [--token T] [--latency-ms N] [--secrets FILE]
    python tests/local_workspace runtime [--version V | --all]   # build runtimes (once; cached)

See ``tests/local_workspace/README.md``.
"""

from .server import (DEDICATED_CLUSTER_ID, JOB_CLUSTER_ID, RUNNING_CLUSTER_ID, SHARED_CLUSTER_ID,
                     SPARK_VERSION, STANDARD_CLUSTER_ID, TERMINATED_CLUSTER_ID, LocalWorkspace,
                     chat_answer, main)

__all__ = ["DEDICATED_CLUSTER_ID", "JOB_CLUSTER_ID", "RUNNING_CLUSTER_ID", "SHARED_CLUSTER_ID",
           "SPARK_VERSION", "STANDARD_CLUSTER_ID", "TERMINATED_CLUSTER_ID", "LocalWorkspace",
           "chat_answer", "main"]
