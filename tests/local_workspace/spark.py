"""``spark`` in a context: a SparkSession started on first real use."""


SPARK_MISSING = (
    "pyspark is not installed in this local workspace, so `spark` cannot run anything here. "
    "Install it with: pip install 'databricks-repl[spark]'  (or: pip install pyspark)"
)


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
    """`spark`: a local SparkSession created on first real use (if pyspark exists)."""

    def __init__(self, init):
        self._init = init
        self._session = None
        self.conf = _LazyConf(self)

    def _get_session(self):
        if self._session is None:
            try:
                from pyspark.sql import SparkSession
            except ImportError:
                raise ModuleNotFoundError(SPARK_MISSING, name="pyspark") from None
            builder = (
                SparkSession.builder.master("local[2]")
                .appName("local-workspace-" + self._init["cluster_id"])
                .config("spark.ui.enabled", "false")
                .config("spark.driver.memory", "512m")
                .config("spark.sql.shuffle.partitions", "2")
                .config("spark.driver.bindAddress", "127.0.0.1")
                .config("spark.driver.host", "127.0.0.1")
            )
            self._session = builder.getOrCreate()
        return self._session

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self._get_session(), name)

    def __repr__(self):
        if self._session is None:
            return "<local SparkSession (not started yet)>"
        return repr(self._session)


