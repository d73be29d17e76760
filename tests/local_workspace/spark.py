"""``spark``, ``sc``, ``sqlContext`` in a context: its own SparkSession on the cluster's shared Spark.

As on a Databricks driver, every execution context of a cluster uses the cluster's one JVM
(``driver.py``, started lazily on the first use of Spark by any context), and gets its own
session there, so temp views and SQL settings are per context while tables, the metastore and
``global_temp`` are shared. Nothing starts until the context first uses ``spark``.

* Dedicated access mode: the context wraps the shared JavaSparkContext over py4j and gets its
  own ``newSession()`` of the cluster's root session; ``sc`` and ``sqlContext`` exist. Each
  command runs in its own Spark job group (the command id), so a cancel cancels its jobs.
* Standard access mode: ``spark`` is a Spark Connect session to the cluster's own Spark (its
  driver's Connect server); there is no ``sc`` or ``sqlContext``, ``spark.sparkContext`` raises
  pyspark's own error, and ``SparkContext()`` is refused (``SPARK_CONNECT_MODE_ENABLED``). Each
  command's operations carry its id as their operation tag; a cancel interrupts them by tag.
"""

import os
import signal
import threading

from . import driver as _driver

SPARK_MISSING = (
    "pyspark is not installed in this local workspace's runtime environment, so `spark` cannot run "
    "anything here. Rebuild it with: python tests/local_workspace runtime"
)
GATEWAY_TIMEOUT = 180.0  # a cold JVM + Hive metastore start on a busy machine


class SparkUnavailable(Exception):
    """The cluster's Spark could not be started or reached; the message says why."""


class _LazyConf:
    def __init__(self, lazy):
        self._lazy = lazy

    def _known(self):
        init = self._lazy._init
        return {
            "spark.databricks.workspaceUrl": init["workspace_url"],
            "spark.databricks.clusterUsageTags.clusterId": init["cluster_id"],
            "spark.databricks.clusterUsageTags.clusterName": init.get("cluster_name", ""),
            "spark.databricks.clusterUsageTags.sparkVersion": init.get("spark_version", ""),
        }

    def get(self, key, *default):
        known = self._known()
        if key in known:
            return known[key]
        if self._lazy._session is None and default:
            return default[0]
        return self._lazy._get_session().conf.get(key, *default)

    def set(self, key, value):
        return self._lazy._get_session().conf.set(key, value)

    def __getattr__(self, name):
        return getattr(self._lazy._get_session().conf, name)


class _LazySpark:
    """`spark`: this context's SparkSession on the cluster's shared SparkContext, on first use."""

    def __init__(self, init):
        self._init = init
        self._connect = bool(init.get("spark_connect"))
        self._session = None
        self._sc = None
        self._command = None
        self.conf = _LazyConf(self)
        if self._connect:
            # pyspark's own switch: its functions build Connect columns, SparkContext() refuses.
            os.environ["SPARK_CONNECT_MODE_ENABLED"] = "1"

    # ----- the worker's hooks

    def started(self):
        return self._session is not None

    def begin_command(self, command_id):
        """Run the command's Spark jobs in its own job group, or tag its Spark Connect
        operations with its id (before the user's code runs)."""
        self._command = command_id
        if self._session is not None:
            self._mark_command()

    def _mark_command(self):
        if self._connect:
            self._session.clearTags()
            self._session.addTag(self._command)
        else:
            self._sc.setJobGroup(self._command, "command %s" % self._command,
                                 interruptOnCancel=True)

    def interrupt_command(self):
        """Standard access mode: interrupt the running command's Spark Connect operations by
        their tag, from a thread (the blocked call then ends with an error). Dedicated access
        mode: nothing here (the cluster cancels the command's job group)."""
        if not self._connect or self._session is None or self._command is None:
            return
        session, tag = self._session, self._command
        threading.Thread(target=_interrupt_tag, args=(session, tag), name="interrupt-tag",
                         daemon=True).start()

    def patch_builder(self, session_module):
        """Make ``SparkSession.builder.getOrCreate()`` attach to the cluster's Spark first (it
        then returns this context's session), as a notebook's does."""
        builder = session_module.SparkSession.Builder
        original = builder.getOrCreate
        lazy = self

        def getOrCreate(self):
            session = lazy._get_session()
            # Dedicated: the builder now finds the context's session on the cluster's
            # SparkContext. Standard: the context's Connect session itself.
            return session if lazy._connect else original(self)

        getOrCreate.__doc__ = original.__doc__
        builder.getOrCreate = getOrCreate

    def pend_context(self, context_module):
        """Dedicated access mode: make pyspark's active SparkContext, in the module that defines
        it (imported by the step's code), a `PendingContext` until this context attaches, and
        ``SparkContext.getOrCreate()`` attach it and return the real one."""
        if self._connect:
            return
        spark_context = context_module.SparkContext
        if spark_context._active_spark_context is None:
            spark_context._active_spark_context = PendingContext(self)
        original, lazy = spark_context.getOrCreate.__func__, self

        def getOrCreate(cls, conf=None):
            if isinstance(cls._active_spark_context, PendingContext):
                return lazy._get_session().sparkContext
            return original(cls, conf)

        getOrCreate.__doc__ = original.__doc__
        spark_context.getOrCreate = classmethod(getOrCreate)

    def reset_gateway_connection(self):
        """Drop this thread's py4j connection after an interrupt cut a call short (its answer
        would otherwise be read by the next call)."""
        if self._sc is None or self._connect:
            return
        client = self._sc._gateway._gateway_client
        connection = client.get_thread_connection()
        if connection is not None:
            connection.close(reset=True)

    # ----- attaching

    def _get_session(self):
        if self._session is None:
            try:
                import pyspark  # noqa: F401
            except ImportError:
                raise ModuleNotFoundError(SPARK_MISSING, name="pyspark") from None
            if self._connect:
                self._attach_connect()
            else:
                self._attach()
            if self._command is not None:
                self._mark_command()
        return self._session

    def _ask_driver(self, op):
        try:
            answer = _driver.request(self._init["driver_socket"], {"op": op}, GATEWAY_TIMEOUT)
        except (OSError, ValueError) as e:
            raise SparkUnavailable("the cluster's Spark driver is not reachable: %s" % e) from None
        if "error" in answer:
            raise SparkUnavailable("the cluster's Spark failed to start: %s" % answer["error"])
        return answer

    def _attach_connect(self):
        """This context's own Spark Connect session on the cluster's Connect server."""
        url = self._ask_driver("connect")["url"]
        os.environ["SPARK_REMOTE"] = url  # SparkSession.builder in user code finds it there
        from pyspark.sql.connect.session import SparkSession as ConnectSession

        self._session = ConnectSession.builder.remote(url).getOrCreate()

    def _attach(self):
        answer = self._ask_driver("gateway")
        os.environ["PYSPARK_GATEWAY_PORT"] = str(answer["port"])
        os.environ["PYSPARK_GATEWAY_SECRET"] = answer["secret"]
        from pyspark import SparkConf, SparkContext
        from pyspark.java_gateway import launch_gateway
        from pyspark.sql import SparkSession

        gateway = launch_gateway()  # with PYSPARK_GATEWAY_PORT set: connects, launches nothing
        jvm = gateway.jvm
        jsc = jvm.org.apache.spark.api.java.JavaSparkContext(
            jvm.org.apache.spark.SparkContext.getOrCreate())
        if isinstance(SparkContext._active_spark_context, PendingContext):
            SparkContext._active_spark_context = None       # the real one takes its place
        # SparkContext.__init__ installs its own SIGINT handler (cancel ALL jobs of the shared
        # context, then KeyboardInterrupt): keep the worker's, which cancels only this command.
        handler = signal.getsignal(signal.SIGINT)
        try:
            sc = SparkContext(conf=SparkConf(_jconf=jsc.getConf()), gateway=gateway, jsc=jsc)
        finally:
            signal.signal(signal.SIGINT, handler)
        root = jvm.org.apache.spark.sql.SparkSession.getDefaultSession().get()
        self._session = SparkSession(sc, jsparkSession=root.newSession())
        self._sc = sc

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._session is None and not name.startswith("_"):
            # On a cluster Spark is always up, so looking a method up costs nothing there: here
            # the lookup starts nothing either (and imports nothing of pyspark.sql, which the
            # step's code would see). The session class's source says whether the name exists
            # and is a method; calling it starts Spark. Other attributes start it at once.
            kind = _session_names(self._connect).get(name)
            if kind is None:
                raise AttributeError("'SparkSession' object has no attribute %r" % name)
            if kind == "method":
                return self._started_on_call(name)
        return getattr(self._get_session(), name)

    def _started_on_call(self, name):
        def call(*args, **kwargs):
            return getattr(self._get_session(), name)(*args, **kwargs)
        call.__name__ = call.__qualname__ = name
        return call

    def __repr__(self):
        if self._session is None:
            return "<local SparkSession (not started yet)>"
        return repr(self._session)


_NAMES = {}
# Where pyspark defines SparkSession (classic, with its pandas conversion base class, or Connect).
_SESSION_SOURCES = {False: (("sql", "session.py"), ("sql", "pandas", "conversion.py")),
                    True: (("sql", "connect", "session.py"),)}
_SESSION_CLASSES = ("SparkSession", "SparkConversionMixin")


def _session_names(connect):
    """{public name: "method" or "attribute"} of pyspark's SparkSession, read from its source
    (parsed, not imported), once per process."""
    if connect not in _NAMES:
        import ast
        import importlib.util

        spec = importlib.util.find_spec("pyspark")
        if spec is None:
            raise ModuleNotFoundError(SPARK_MISSING, name="pyspark")
        names = {}
        for parts in _SESSION_SOURCES[connect]:
            with open(os.path.join(spec.submodule_search_locations[0], *parts), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for cls in tree.body:
                if isinstance(cls, ast.ClassDef) and cls.name in _SESSION_CLASSES:
                    for node in cls.body:
                        for name, kind in _class_body_names(node):
                            names.setdefault(name, kind)
        _NAMES[connect] = {name: names.get(kind, "attribute") if kind not in ("method", "attribute") else kind
                           for name, kind in names.items() if not name.startswith("_")}   # aliases resolved
    return _NAMES[connect]


_NOT_METHODS = ("property", "cached_property", "setter", "classmethod", "staticmethod", "classproperty")


def _class_body_names(node):
    """(name, "method" or "attribute") for what one statement of a class body defines."""
    import ast

    if isinstance(node, ast.If):   # e.g. `if not is_remote_only(): def newSession(...)`
        return [found for child in node.body + node.orelse for found in _class_body_names(child)]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
        plain = not any(getattr(d, "id", None) in _NOT_METHODS or getattr(d, "attr", None) in _NOT_METHODS
                        for d in decorators)
        return [(node.name, "method" if plain else "attribute")]
    if isinstance(node, ast.ClassDef):
        return [(node.name, "attribute")]
    targets = node.targets if isinstance(node, ast.Assign) else \
        [node.target] if isinstance(node, ast.AnnAssign) else []
    value = getattr(node, "value", None)   # `addArtifact = addArtifacts`: the kind of the name it names
    kind = value.id if isinstance(value, ast.Name) else "attribute"
    return [(t.id, kind) for t in targets if isinstance(t, ast.Name)]


def _interrupt_tag(session, tag):
    try:
        session.interruptTag(tag)
    except Exception:  # the session is gone or the server stopped: the interrupt follows
        pass


class PendingContext:
    """pyspark's active SparkContext (``SparkContext._active_spark_context``) in a dedicated
    context whose Spark has not started yet. On a cluster it is up before any code runs, so
    pyspark's functions find it (``col('x')``, a UDF's return type, ``SparkContext.getOrCreate()``)
    before ``spark`` is touched; here the first attribute asked of it attaches this context.
    Set (``_LazySpark.pend_context``) when the step's code first imports the module that defines
    SparkContext, one of MODULES, so nothing of pyspark is imported before the step's code does."""

    MODULES = ("pyspark.context", "pyspark.core.context")   # pyspark 3.5, 4.0

    def __init__(self, spark):
        self._spark = spark

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._spark._get_session().sparkContext, name)


class _LazyProxy:
    """`sc` / `sqlContext`: the real object, made on first attribute use."""

    def __init__(self, make, label, spark):
        self._make = make
        self._label = label
        self._spark = spark
        self._obj = None

    def _get(self):
        if self._obj is None:
            self._obj = self._make()
        return self._obj

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get(), name)

    def __repr__(self):
        if self._obj is None and not self._spark.started():
            return "<%s (not started yet)>" % self._label
        return repr(self._get())


def notebook_names(init):
    """The Spark names a notebook has: ``spark``, ``sql``, ``table``, and on a dedicated
    access mode cluster ``sc`` and ``sqlContext`` (standard access mode has neither: S29)."""
    spark = _LazySpark(init)

    def make_sql_context():
        import warnings

        from pyspark.sql import SQLContext

        session = spark._get_session()
        with warnings.catch_warnings():  # "Deprecated in 3.0.0": a notebook shows no such warning
            warnings.simplefilter("ignore", FutureWarning)
            return SQLContext(session.sparkContext, sparkSession=session)

    def sql(sqlQuery, *args, **kwargs):
        return spark.sql(sqlQuery, *args, **kwargs)

    def table(tableName):
        return spark.table(tableName)

    names = {"spark": spark, "sql": sql, "table": table}
    if not spark._connect:
        names.update({
            "sc": _LazyProxy(lambda: spark._get_session().sparkContext, "SparkContext", spark),
            "sqlContext": _LazyProxy(make_sql_context, "SQLContext", spark),
        })
    return names
