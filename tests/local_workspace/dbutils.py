"""dbutils, the notebook context and ``dbruntime`` as a context sees them."""

import json
import sys


class _NotebookExit(BaseException):
    """Raised by dbutils.notebook.exit(); ends the command with a text result."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value


# ---------------------------------------------------------------- spark, dbutils, dbruntime

class _Option:
    def __init__(self, value):
        self._value = value

    def get(self):
        if self._value is None:
            raise ValueError("None.get")
        return self._value

    def isDefined(self):
        return self._value is not None

    def getOrElse(self, default):
        return default if self._value is None else self._value

    def __repr__(self):
        return "Some(%s)" % self._value if self._value is not None else "None"


class _ScalaMap:
    def __init__(self, mapping):
        self._mapping = dict(mapping)

    def get(self, key):
        return _Option(self._mapping.get(key))

    def apply(self, key):
        return self._mapping[key]

    def contains(self, key):
        return key in self._mapping

    def keys(self):
        return list(self._mapping)

    def toJson(self):
        return json.dumps(self._mapping)

    def __repr__(self):
        return "Map(%s)" % ", ".join("%s -> %s" % kv for kv in self._mapping.items())


class _CommandContext:
    def __init__(self, init):
        self._init = init

    def apiToken(self):
        return _Option(self._init["token"])

    def apiUrl(self):
        return _Option(self._init["host"])

    def browserHostName(self):
        return _Option(self._init["workspace_url"].split(":")[0])

    def workspaceId(self):
        return _Option(self._init["workspace_id"])

    def clusterId(self):
        return _Option(self._init["cluster_id"])

    def notebookPath(self):
        return _Option(None)

    def tags(self):
        return _ScalaMap(self._tags())

    def _tags(self):
        return {
            "clusterId": self._init["cluster_id"],
            "orgId": self._init["workspace_id"],
            "browserHostName": self._init["workspace_url"].split(":")[0],
            "user": self._init.get("user", ""),
            "sparkVersion": self._init.get("spark_version", ""),
        }

    def toJson(self):
        return json.dumps({"tags": self._tags(), "extraContext": {"api_url": self._init["host"]}})


class Py4JError(Exception):
    pass


Py4JError.__module__ = "py4j.protocol"


class _NotebookUtils:
    def __init__(self, init):
        self._init = init

    def getContext(self):
        if self._init.get("shared"):
            raise Py4JError(
                "An error occurred while calling o412.getContext. Trace:\n"
                "py4j.security.Py4JSecurityException: Method public "
                "com.databricks.backend.common.rpc.CommandContext "
                "com.databricks.dbutils_v1.impl.NotebookUtilsImpl.getContext() is not "
                "whitelisted on class class com.databricks.dbutils_v1.impl.NotebookUtilsImpl\n"
                "\tat py4j.security.WhitelistingPy4JSecurityManager.checkCall"
                "(WhitelistingPy4JSecurityManager.java:473)\n"
                "\tat py4j.Gateway.invoke(Gateway.java:305)\n"
            )
        return _CommandContext(self._init)


class _DbutilsJvm:
    def __init__(self, init):
        self._notebook = _NotebookUtils(init)

    def notebook(self):
        return self._notebook


class _EntryPoint:
    def __init__(self, init):
        self._dbutils = _DbutilsJvm(init)

    def getDbutils(self):
        return self._dbutils


class _Notebook:
    def __init__(self, init):
        self.entry_point = _EntryPoint(init)

    def exit(self, value=""):
        raise _NotebookExit(value)

    def __repr__(self):
        return "<dbutils.notebook>"


class RestartPython(BaseException):
    """Raised by dbutils.library.restartPython(): the worker answers, then its Python exits."""


class _Library:
    def restartPython(self):
        raise RestartPython()

    def __repr__(self):
        return "<dbutils.library>"


class _Dbutils:
    def __init__(self, init):
        self.notebook = _Notebook(init)
        self.library = _Library()

    def __repr__(self):
        return "<dbutils (local workspace)>"


class _ReplContext:
    def __init__(self, init):
        self.apiToken = init["token"]
        self.apiUrl = init["host"]
        self.workspaceUrl = init["workspace_url"]
        self.workspaceId = init["workspace_id"]
        self.clusterId = init["cluster_id"]
        self.isInJob = False
        self.isInNotebook = False
        self.notebookPath = None

    def __repr__(self):
        return "DatabricksReplContext(apiUrl=%r, clusterId=%r)" % (self.apiUrl, self.clusterId)


def _install_dbruntime(init):
    import types

    package = types.ModuleType("dbruntime")
    package.__path__ = []
    module = types.ModuleType("dbruntime.databricks_repl_context")

    def get_context():
        return _ReplContext(init)

    module.get_context = get_context
    package.databricks_repl_context = module
    sys.modules["dbruntime"] = package
    sys.modules["dbruntime.databricks_repl_context"] = module


