"""A cluster's driver: the one JVM (one SparkContext) that every execution context of the cluster shares.

On a Databricks cluster the driver runs one Spark application; each notebook's Python REPL attaches
to it and gets its own SparkSession. Here, ``contexts.py`` starts this process (on the runtime's
Python, ``runtime.py``) once per running cluster, with the cluster's Spark settings (the runtime's
defaults and the cluster's tags, a JSON argument). It starts the JVM and the SparkContext lazily,
on a context's first use of ``spark``, and serves, on a Unix socket in the cluster's state dir,
JSON-line requests, one per connection:

* ``{"op": "gateway"}`` -> ``{"port": N, "secret": "..."}`` (dedicated access mode): the JVM's
  py4j gateway; the context attaches to it (``spark.py``) and wraps the shared JavaSparkContext;
* ``{"op": "connect"}`` -> ``{"url": "sc://127.0.0.1:PORT"}`` (standard access mode): the JVM
  runs a Spark Connect server (``SparkConnectPlugin``) on a free loopback port; each context
  opens its own Connect session there and never touches the JVM;
* ``{"op": "cancel", "group": "<command id>"}`` -> ``{"cancelled": bool}``: cancel that command's
  Spark job group (``False`` while Spark has not started, and on a Connect driver, where a
  context interrupts its own operations by their tag);
* ``{"op": "jobs"}`` -> ``{"jobs": [ids]}``: the Spark jobs running now (``None`` while Spark
  has not started), in either access mode;
* ``{"op": "ping"}`` -> ``{"spark": bool}``.

Everything the JVM writes (spark.local.dir, java.io.tmpdir, the warehouse, the Derby metastore,
Hive's scratch dirs) lives under ``<state>/clusters/<id>/``. The process exits when its parent
(the local workspace) goes away; pyspark's JVM exits when this process does (it watches its stdin).

    python -c <boot> driver STATE_DIR CLUSTER_ID SOCKET_PATH SETTINGS_JSON

``SETTINGS_JSON``: ``{"conf": {key: value}, "connect": bool}``.
"""

import json
import os
import socket
import threading
import time

from .paths import cluster_dir

STATE = {"sc": None, "connect_url": None, "settings": {"conf": {}, "connect": False}}
START_LOCK = threading.Lock()
CONNECT_PLUGIN = "org.apache.spark.sql.connect.SparkConnectPlugin"
CONNECT_START_TIMEOUT = 60.0


def spark_conf_pairs(state_dir, cluster_id):
    """The Spark configuration of a cluster's shared SparkContext: (key, value) pairs."""
    home = cluster_dir(state_dir, cluster_id)
    tmp = os.path.join(home, "tmp")
    spark_dir = os.path.join(home, "spark")
    java_options = " ".join([
        "-Djava.io.tmpdir=%s" % tmp,
        "-Dderby.system.home=%s" % spark_dir,
        "-Dderby.stream.error.file=%s" % os.path.join(spark_dir, "derby.log"),
        "-XX:-UsePerfData",  # else the JVM writes /tmp/hsperfdata_<user>/<pid>
        # A local driver's jobs are tiny: the client compiler alone and one GC thread start Spark with
        # about half the CPU (8 s against 14.5 s to a first count on 2 cores); nothing Spark does changes.
        "-XX:TieredStopAtLevel=1",
        "-XX:+UseSerialGC",
    ])
    return [
        ("spark.master", "local[2]"),
        ("spark.app.name", "Databricks Shell"),
        ("spark.ui.enabled", "false"),
        ("spark.driver.memory", "512m"),
        ("spark.sql.shuffle.partitions", "2"),
        ("spark.driver.bindAddress", "127.0.0.1"),
        ("spark.driver.host", "127.0.0.1"),
        ("spark.driver.extraJavaOptions", java_options),
        ("spark.local.dir", os.path.join(spark_dir, "local")),
        ("spark.sql.warehouse.dir", os.path.join(spark_dir, "warehouse")),
        ("spark.sql.catalogImplementation", "hive"),
        ("spark.hadoop.javax.jdo.option.ConnectionURL",
         "jdbc:derby:;databaseName=%s;create=true" % os.path.join(spark_dir, "metastore_db")),
        ("spark.hadoop.hive.exec.scratchdir", os.path.join(spark_dir, "hive-scratch")),
        ("spark.hadoop.hive.exec.local.scratchdir", os.path.join(spark_dir, "hive-local")),
        ("spark.hadoop.hive.downloaded.resources.dir", os.path.join(spark_dir, "hive-resources")),
    ]


def _connect_pairs(port):
    """A Spark Connect server in the driver's JVM, on ``port`` of the loopback interface
    (pyspark 4.0's package ships its jar, spark-connect_2.13)."""
    return [("spark.plugins", CONNECT_PLUGIN),
            ("spark.connect.grpc.binding.address", "127.0.0.1"),
            ("spark.connect.grpc.binding.port", str(port))]


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("the Spark Connect server did not listen on port %d within "
                                   "%.0f s" % (port, timeout)) from None
            time.sleep(0.1)


def _start_spark(state_dir, cluster_id):
    """The shared SparkContext and the cluster's root SparkSession (started once); on a
    standard access mode cluster with its Spark Connect server listening."""
    with START_LOCK:
        if STATE["sc"] is None:
            from pyspark import SparkConf, SparkContext
            from pyspark.sql import SparkSession

            os.makedirs(os.path.join(cluster_dir(state_dir, cluster_id), "spark", "local"),
                        exist_ok=True)
            settings = STATE["settings"]
            pairs = spark_conf_pairs(state_dir, cluster_id) + sorted(settings["conf"].items())
            port = _free_port() if settings["connect"] else None
            if port is not None:
                pairs += _connect_pairs(port)
            conf = SparkConf().setAll(pairs)
            sc = SparkContext(conf=conf)
            sc.setLogLevel("ERROR")
            SparkSession(sc)  # the root session; every context gets a newSession() of it
            if port is not None:
                _wait_for_port(port, CONNECT_START_TIMEOUT)
                STATE["connect_url"] = "sc://127.0.0.1:%d" % port
            STATE["sc"] = sc
        return STATE["sc"]


def _answer(request, state_dir, cluster_id):
    op = request.get("op")
    if op == "ping":
        return {"spark": STATE["sc"] is not None}
    connect = STATE["settings"]["connect"]
    if op == "gateway" and not connect:
        sc = _start_spark(state_dir, cluster_id)
        params = sc._gateway.gateway_parameters
        return {"port": params.port, "secret": params.auth_token}
    if op == "connect" and connect:
        _start_spark(state_dir, cluster_id)
        return {"url": STATE["connect_url"]}
    if op in ("gateway", "connect"):
        return {"error": "this cluster's Spark is %s, not %s" % (
            "a Spark Connect server (standard access mode)" if connect else
            "classic (dedicated access mode)", op)}
    if op == "jobs":
        sc = STATE["sc"]
        return {"jobs": None if sc is None else sorted(sc.statusTracker().getActiveJobsIds())}
    if op == "cancel":
        sc = STATE["sc"]
        if sc is None or connect:
            return {"cancelled": False}
        sc.cancelJobGroup(str(request.get("group")))
        return {"cancelled": True}
    return {"error": "unknown op %r" % op}


def _serve_one(conn, state_dir, cluster_id):
    with conn:
        try:
            line = conn.makefile("r", encoding="utf-8").readline()
            answer = _answer(json.loads(line), state_dir, cluster_id)
        except Exception as e:  # the context gets the reason (e.g. the JVM failed to start)
            answer = {"error": "%s: %s" % (type(e).__name__, e)}
        try:
            conn.sendall((json.dumps(answer) + "\n").encode("utf-8"))
        except OSError:
            pass


def _exit_with_parent(parent):
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def request(socket_path, message, timeout):
    """One request to a driver (from a context or the cluster): the decoded answer.

    Raises OSError when the driver cannot be reached within ``timeout`` seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall((json.dumps(message) + "\n").encode("utf-8"))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise OSError("the driver closed the connection without an answer")
    return json.loads(data.decode("utf-8"))


def main(argv):
    state_dir, cluster_id, socket_path = argv[1:4]
    STATE["settings"] = json.loads(argv[4])
    parent = os.getppid()
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    try:
        os.unlink(socket_path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(socket_path)
    server.listen(64)  # the cluster waits until the socket answers a ping
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_one, args=(conn, state_dir, cluster_id),
                         daemon=True).start()
