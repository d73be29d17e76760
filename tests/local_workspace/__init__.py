"""A local stand-in for a Databricks workspace, for tests and offline use.

The parts, each readable on its own:

* ``server``  - the HTTP server, its routes and the control API (``LocalWorkspace``);
* ``cluster`` - execution contexts and commands: the worker processes behind the 1.2 API;
* ``driver``  - a cluster's driver: the one JVM/SparkContext its contexts share;
* ``runtime`` - the Databricks Runtimes (per cluster, from its spark_version), built lazily;
* ``worker``  - one execution context: a Python REPL process (with ``dbutils`` and ``spark``);
* ``dbutils`` - dbutils, the notebook context and ``dbruntime`` inside a context;
* ``spark``   - ``spark``, ``sc``, ``sqlContext`` inside a context, on the cluster's Spark;
* ``files``   - DBFS, Files and Workspace REST over the driver paths (``paths``);
* ``serving`` - model serving with a deterministic chat model.

    python tests/local_workspace serve [--port N] [--token T] [--latency-ms N] [--secrets FILE]
    python tests/local_workspace runtime [--version V | --all]   # build runtimes (once; cached)

See ``references/local-workspace.md``.
"""

from .errors import ApiError
from .server import (DEDICATED_CLUSTER_ID, JOB_CLUSTER_ID, RUNNING_CLUSTER_ID, SHARED_CLUSTER_ID,
                     SPARK_VERSION, STANDARD_CLUSTER_ID, TERMINATED_CLUSTER_ID, LocalWorkspace,
                     chat_answer, main)

__all__ = ["ApiError", "DEDICATED_CLUSTER_ID", "JOB_CLUSTER_ID", "RUNNING_CLUSTER_ID",
           "SHARED_CLUSTER_ID", "SPARK_VERSION", "STANDARD_CLUSTER_ID", "TERMINATED_CLUSTER_ID",
           "LocalWorkspace", "chat_answer", "main"]
