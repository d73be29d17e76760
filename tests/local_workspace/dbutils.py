"""dbutils, the notebook context and ``dbruntime`` as a context sees them.

``dbutils`` has ``fs``, ``secrets``, ``widgets``, ``library``, ``jobs.taskValues``, ``notebook``
and ``help()``, with a real cluster's return types (``FileInfo``, ``SecretMetadata``,
``SecretScope``: the namedtuples databricks-sdk's own dbutils defines) and its error texts. The
evidence for each is in tests/local_workspace/README.md ("dbutils").
"""

import collections
import itertools
import json
import os
import shutil
import sys


class _NotebookExit(BaseException):
    """Raised by dbutils.notebook.exit(); ends the command with a text result."""

    def __init__(self, value):
        super().__init__(value)
        self.value = value


class RestartPython(BaseException):
    """Raised by dbutils.library.restartPython(): the context's interpreter is replaced by a fresh
    one (same context id; variables, imports and helpers are gone). A BaseException, so user
    code's ``except Exception`` cannot swallow it."""


# ---------------------------------------------------------------- errors as a cluster raises them

class Py4JJavaError(Exception):
    """A JVM-side exception surfaced through py4j: ``An error occurred while calling oN.m.``"""


class ExecutionError(Exception):
    """What dbutils.fs raises on a cluster for a JVM-side failure."""


Py4JJavaError.__module__ = "py4j.protocol"
_JAVA_OBJECT_IDS = itertools.count(401)


def _java_error(kind, method, java_text):
    """``kind('An error occurred while calling oN.method.\n: <java text>')``."""
    return kind("An error occurred while calling o%d.%s.\n: %s" % (next(_JAVA_OBJECT_IDS),
                                                                   method, java_text))


# The SDK's own dbutils (databricks/sdk/dbutils.py) defines these shapes.
class FileInfo(collections.namedtuple("FileInfo", ["path", "name", "size", "modificationTime"])):
    pass


class SecretScope(collections.namedtuple("SecretScope", ["name"])):
    def getName(self):
        return self.name


class SecretMetadata(collections.namedtuple("SecretMetadata", ["key"])):
    pass


# ---------------------------------------------------------------- dbutils.fs

class _Fs:
    """dbutils.fs over the driver paths: ``dbfs:/x`` (or ``/x``), ``/Volumes/...`` (or
    ``dbfs:/Volumes/...``) and ``file:/x`` (the driver's own disk).

    ``local(path)`` turns a driver path into the path this process opens (the same path inside
    the cluster's own view; the state directory's path where the OS could not isolate)."""

    def __init__(self, local):
        self._local = local

    # ----- paths

    def _resolve(self, path, method):
        """``(uri shown back, local path)``; dbfs paths are normalised, ``..`` cannot escape."""
        import posixpath

        if not isinstance(path, str) or not path:
            raise _java_error(ExecutionError, method, "java.lang.IllegalArgumentException: "
                              "Can not create a Path from an empty string")
        if path.startswith("file:"):
            local = posixpath.normpath("/" + path[len("file:"):].lstrip("/"))
            return "file:" + local, local
        if path.startswith("dbfs:"):
            path = path[len("dbfs:"):]
        elif ":" in path.split("/")[0]:
            scheme = path.split(":")[0]
            raise _java_error(ExecutionError, method, "org.apache.hadoop.fs."
                              "UnsupportedFileSystemException: No FileSystem for scheme \"%s\""
                              % scheme)
        norm = posixpath.normpath("/" + path.lstrip("/"))
        if norm == "/Volumes" or norm.startswith("/Volumes/"):
            local = self._local(norm)
        else:
            local = self._local("/dbfs" + ("" if norm == "/" else norm))
        return "dbfs:" + norm, local

    @staticmethod
    def _child(uri, name, is_dir):
        return uri.rstrip("/") + "/" + name + ("/" if is_dir else "")

    @staticmethod
    def _missing(method, uri):
        return _java_error(ExecutionError, method,
                           "java.io.FileNotFoundException: File %s does not exist." % uri)

    @staticmethod
    def _info(uri, local, name):
        st = os.stat(local)
        is_dir = os.path.isdir(local)
        return FileInfo(uri + ("/" if is_dir and not uri.endswith("/") else ""),
                        name + ("/" if is_dir else ""), 0 if is_dir else st.st_size,
                        int(st.st_mtime * 1000))

    # ----- the commands

    def ls(self, dir):
        """``[FileInfo(path, name, size, modificationTime)]`` sorted by name; directories end
        in '/' with size 0; a file lists itself. Missing: java.io.FileNotFoundException."""
        uri, local = self._resolve(dir, "ls")
        if not os.path.exists(local):
            raise self._missing("ls", uri)
        if not os.path.isdir(local):
            return [self._info(uri, local, os.path.basename(local))]
        infos = []
        for name in sorted(os.listdir(local)):
            child = os.path.join(local, name)
            infos.append(self._info(self._child(uri, name, False), child, name))
        return infos

    def mkdirs(self, dir):
        """Create ``dir`` and its parents; True (also when it exists)."""
        uri, local = self._resolve(dir, "mkdirs")
        if os.path.isfile(local):
            raise _java_error(ExecutionError, "mkdirs", "org.apache.hadoop.fs."
                              "FileAlreadyExistsException: Path is a file: %s" % uri)
        os.makedirs(local, exist_ok=True)
        return True

    def put(self, file, contents, overwrite=False):
        """Write ``contents`` (str, UTF-8) to ``file``; prints 'Wrote N bytes.'; True. An existing
        file without ``overwrite=True`` raises FileAlreadyExistsException."""
        uri, local = self._resolve(file, "put")
        if os.path.exists(local) and not overwrite:
            raise _java_error(ExecutionError, "put", "org.apache.hadoop.fs."
                              "FileAlreadyExistsException: File already exists: %s" % uri)
        if os.path.isdir(local):
            raise _java_error(ExecutionError, "put", "java.io.IOException: "
                              "Cannot overwrite a directory: %s" % uri)
        data = str(contents).encode("utf-8")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(data)
        print("Wrote %d bytes." % len(data))
        return True

    def head(self, file, maxBytes=65536):
        """The first ``maxBytes`` bytes of ``file`` as UTF-8 text (a cut character is replaced);
        prints '[Truncated to first N bytes]' when the file is longer."""
        uri, local = self._resolve(file, "head")
        if not os.path.exists(local):
            raise self._missing("head", uri)
        if os.path.isdir(local):
            raise _java_error(ExecutionError, "head", "java.lang.IllegalArgumentException: "
                              "Cannot head a directory: %s" % uri)
        with open(local, "rb") as f:
            data = f.read(int(maxBytes) + 1)
        if len(data) > maxBytes:
            print("[Truncated to first %d bytes]" % maxBytes)
            data = data[:maxBytes]
        return data.decode("utf-8", "replace")

    def cp(self, from_, to, recurse=False):
        """Copy a file, or a directory with ``recurse=True``; True."""
        src_uri, src = self._resolve(from_, "cp")
        _, dst = self._resolve(to, "cp")
        if not os.path.exists(src):
            raise self._missing("cp", src_uri)
        if os.path.isdir(src):
            if not recurse:
                raise _java_error(ExecutionError, "cp", "java.io.IOException: Cannot copy "
                                  "directory unless recurse is set to true")
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(src, dst)
        return True

    def mv(self, from_, to, recurse=False):
        """Move a file, or a directory with ``recurse=True``; True."""
        src_uri, src = self._resolve(from_, "mv")
        _, dst = self._resolve(to, "mv")
        if not os.path.exists(src):
            raise self._missing("mv", src_uri)
        if os.path.isdir(src) and not recurse:
            raise _java_error(ExecutionError, "mv", "java.io.IOException: Cannot move "
                              "directory unless recurse is set to true")
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.move(src, dst)
        return True

    def rm(self, dir, recurse=False):
        """Remove a file, or a directory (a non-empty one needs ``recurse=True``). True when
        something was removed, False when there was nothing to remove."""
        uri, local = self._resolve(dir, "rm")
        if not os.path.lexists(local):
            return False
        if os.path.isdir(local) and not os.path.islink(local):
            if os.listdir(local) and not recurse:
                raise _java_error(ExecutionError, "rm", "java.io.IOException: Path: %s is a "
                                  "non-empty directory. Please use recurse=True" % uri)
            shutil.rmtree(local)
        else:
            os.remove(local)
        return True

    def help(self, method=None):
        print(_FS_HELP)

    def __repr__(self):
        return "<dbutils.fs>"


_FS_HELP = """dbutils.fs provides utilities for working with FileSystems.

cp(from: String, to: String, recurse: boolean = false): boolean -> Copies a file or directory
head(file: String, maxBytes: int = 65536): String -> Returns up to the first maxBytes bytes
    of the file as a String encoded in UTF-8
ls(dir: String): Seq -> Lists the contents of a directory
mkdirs(dir: String): boolean -> Creates the directory if it does not exist, with its parents
mv(from: String, to: String, recurse: boolean = false): boolean -> Moves a file or directory
put(file: String, contents: String, overwrite: boolean = false): boolean -> Writes the
    String to a file, encoded in UTF-8
rm(dir: String, recurse: boolean = false): boolean -> Removes a file or directory
"""


# ---------------------------------------------------------------- dbutils.secrets

class _Secrets:
    """dbutils.secrets over the scopes the workspace was given (``{"scope": {"key": "value"}}``).
    Every value read is remembered, so the context's text output shows it as [REDACTED]."""

    def __init__(self, scopes):
        self._scopes = {str(s): {str(k): str(v) for k, v in keys.items()}
                        for s, keys in (scopes or {}).items()}
        self.read_values = set()

    def _value(self, scope, key, method):
        value = self._scopes.get(scope, {}).get(key)
        if value is None:
            raise _java_error(Py4JJavaError, method, "java.lang.IllegalArgumentException: "
                              "Secret does not exist with scope: %s and key: %s" % (scope, key))
        if value:
            self.read_values.add(value)
        return value

    def get(self, scope, key):
        """The secret's value (str)."""
        return self._value(scope, key, "get")

    def getBytes(self, scope, key):
        """The secret's value (bytes, UTF-8)."""
        return self._value(scope, key, "getBytes").encode("utf-8")

    def list(self, scope):
        """``[SecretMetadata(key=...)]`` of a scope, sorted by key."""
        if scope not in self._scopes:
            raise _java_error(Py4JJavaError, "list", "com.databricks.common.client."
                              "DatabricksServiceHttpClientException: RESOURCE_DOES_NOT_EXIST: "
                              "Scope %s does not exist!" % scope)
        return [SecretMetadata(key) for key in sorted(self._scopes[scope])]

    def listScopes(self):
        """``[SecretScope(name=...)]`` sorted by name."""
        return [SecretScope(name) for name in sorted(self._scopes)]

    def help(self, method=None):
        print("dbutils.secrets provides utilities for leveraging secrets within notebooks.\n\n"
              "get(scope: String, key: String): String -> Gets the string representation of a "
              "secret value\n"
              "getBytes(scope: String, key: String): byte[] -> Gets the bytes of a secret value\n"
              "list(scope: String): Seq -> Lists secret metadata for secrets within a scope\n"
              "listScopes: Seq -> Lists secret scopes")

    def __repr__(self):
        return "<dbutils.secrets>"


REDACTED = "[REDACTED]"


def redact(results, secrets):
    """``results`` with every secret value read so far shown as [REDACTED] in its text parts
    (longest first, so a value containing another is redacted whole)."""
    if not secrets.read_values or not isinstance(results, dict):
        return results
    values = sorted(secrets.read_values, key=len, reverse=True)
    shown = dict(results)
    for field in ("data", "summary", "cause"):
        text = shown.get(field)
        if isinstance(text, str):
            for value in values:
                text = text.replace(value, REDACTED)
            shown[field] = text
    return shown


# ---------------------------------------------------------------- dbutils.widgets

class _Widgets:
    """Input widgets of the context. A widget's value is its default (nobody moves a widget
    here); defining an existing name again keeps the first definition, as a notebook does."""

    def __init__(self):
        self._widgets = collections.OrderedDict()

    def _define(self, name, defaultValue, choices=None, label=None, method="text"):
        if choices is not None:
            choices = [str(c) for c in choices]
            defaults = str(defaultValue).split(",") if method == "multiselect" else [
                str(defaultValue)]
            if method != "combobox" and any(d not in choices for d in defaults):
                raise _java_error(Py4JJavaError, method, "com.databricks.dbutils_v1."
                                  "InvalidInputWidgetDefinition: Default value %s is not one of "
                                  "the choices %s" % (defaultValue, choices))
        self._widgets.setdefault(str(name), str(defaultValue))

    def text(self, name, defaultValue, label=None):
        self._define(name, defaultValue, None, label, "text")

    def dropdown(self, name, defaultValue, choices, label=None):
        self._define(name, defaultValue, choices, label, "dropdown")

    def combobox(self, name, defaultValue, choices, label=None):
        self._define(name, defaultValue, choices, label, "combobox")

    def multiselect(self, name, defaultValue, choices, label=None):
        self._define(name, defaultValue, choices, label, "multiselect")

    def _not_defined(self, name, method):
        return _java_error(Py4JJavaError, method, "com.databricks.dbutils_v1."
                           "InputWidgetNotDefined: No input widget named %s is defined" % name)

    def get(self, name):
        """The widget's value (str); InputWidgetNotDefined when there is none."""
        if name not in self._widgets:
            raise self._not_defined(name, "getArgument")
        return self._widgets[name]

    def getArgument(self, name, defaultValue=None):
        """Deprecated form of get(): ``defaultValue`` when the widget does not exist."""
        print("getArgument is deprecated. Use get instead.", file=sys.stderr)
        return self._widgets.get(name, defaultValue)

    def getAll(self):
        """``{name: value}`` of every widget."""
        return dict(self._widgets)

    def remove(self, name):
        if name not in self._widgets:
            raise self._not_defined(name, "removeArgument")
        del self._widgets[name]

    def removeAll(self):
        self._widgets.clear()

    def help(self, method=None):
        print("dbutils.widgets provides utilities for working with notebook widgets.\n\n"
              "combobox, dropdown, multiselect, text (name, defaultValue[, choices], label)\n"
              "get(name: String): String -> Retrieves current value of an input widget\n"
              "getAll: map -> Retrieves a map of all widget names and their values\n"
              "remove(name: String): void -> Removes an input widget from the notebook\n"
              "removeAll: void -> Removes all widgets in the notebook")

    def __repr__(self):
        return "<dbutils.widgets>"


# ---------------------------------------------------------------- dbutils.jobs, library

class _TaskValues:
    """dbutils.jobs.taskValues outside a job run, as the docs describe it: set() checks the
    value is JSON and keeps nothing; get() returns ``debugValue``, or raises TypeError."""

    def set(self, key, value):
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise TypeError("Value for key %r must be JSON-serializable: %s" % (key, e)) from None

    def get(self, taskKey, key, default=None, debugValue=None):
        if debugValue is None:
            raise TypeError("Must pass debugValue when calling get outside of a job context. "
                            "debugValue cannot be None.")
        return debugValue

    def help(self, method=None):
        print("dbutils.jobs.taskValues: set(key, value); get(taskKey, key, default, debugValue)")

    def __repr__(self):
        return "<dbutils.jobs.taskValues>"


class _Jobs:
    def __init__(self):
        self.taskValues = _TaskValues()

    def help(self, method=None):
        print("dbutils.jobs provides utilities for leveraging jobs features.\n\n"
              "taskValues: TaskValuesUtils -> Provides utilities for leveraging job task values")


class _Library:
    def restartPython(self):
        """Restart the context's Python interpreter (raises RestartPython; see its docstring)."""
        raise RestartPython("restartPython")

    def help(self, method=None):
        print("dbutils.library provides utilities for session isolated libraries.\n\n"
              "restartPython: void -> Restart python process for the current notebook session")


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
    """The notebook's command context (``getContext()``). On a standard access mode cluster
    (``standard_py4j="context_methods"``, the default) every method of it is refused as not
    whitelisted: ``tags()`` as real users report it (S30), the others by the same whitelist."""

    def __init__(self, init):
        self._init = init
        self._refused = (init.get("shared")
                         and init.get("standard_py4j", "context_methods") == "context_methods")

    def _allowed(self, method, returns):
        if self._refused:
            raise _not_whitelisted(
                "o413.%s" % method,
                "%s com.databricks.backend.common.rpc.CommandContext.%s()" % (returns, method),
                "com.databricks.backend.common.rpc.CommandContext")

    def apiToken(self):
        self._allowed("apiToken", "scala.Option")
        return _Option(self._init["token"])

    def apiUrl(self):
        self._allowed("apiUrl", "scala.Option")
        return _Option(self._init["host"])

    def browserHostName(self):
        self._allowed("browserHostName", "scala.Option")
        return _Option(self._init["workspace_url"].split(":")[0])

    def workspaceId(self):
        self._allowed("workspaceId", "scala.Option")
        return _Option(self._init["workspace_id"])

    def clusterId(self):
        self._allowed("clusterId", "scala.Option")
        return _Option(self._init["cluster_id"])

    def notebookPath(self):
        self._allowed("notebookPath", "scala.Option")
        return _Option(None)

    def tags(self):
        self._allowed("tags", "scala.collection.immutable.Map")
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
        self._allowed("toJson", "java.lang.String")
        return json.dumps({"tags": self._tags(), "extraContext": {"api_url": self._init["host"]}})


class Py4JError(Exception):
    pass


Py4JError.__module__ = "py4j.protocol"


class _NotebookUtils:
    def __init__(self, init):
        self._init = init

    def getContext(self):
        """Standard access mode refuses py4j calls into the notebook context as not
        whitelisted: by default at its methods (``_CommandContext``); with
        ``standard_py4j="get_context"`` at this call already."""
        if self._init.get("shared") and self._init.get("standard_py4j") == "get_context":
            raise _not_whitelisted(
                "o412.getContext", "com.databricks.backend.common.rpc.CommandContext "
                "com.databricks.dbutils_v1.impl.NotebookUtilsImpl.getContext()",
                "com.databricks.dbutils_v1.impl.NotebookUtilsImpl")
        return _CommandContext(self._init)


def _not_whitelisted(call, method, cls):
    """The Py4JError a standard access mode cluster raises for a py4j call it does not allow."""
    return Py4JError(
        "An error occurred while calling %s. Trace:\n"
        "py4j.security.Py4JSecurityException: Method public %s is not whitelisted on class "
        "class %s\n"
        "\tat py4j.security.WhitelistingPy4JSecurityManager.checkCall"
        "(WhitelistingPy4JSecurityManager.java:473)\n"
        "\tat py4j.Gateway.invoke(Gateway.java:305)\n" % (call, method, cls))


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


class _Dbutils:
    """``dbutils`` of one context. ``local``: driver path -> the path this process opens."""

    def __init__(self, init, local=None):
        self.notebook = _Notebook(init)
        self.fs = _Fs(local or (lambda path: path))
        self.secrets = _Secrets(init.get("secrets"))
        self.widgets = _Widgets()
        self.jobs = _Jobs()
        self.library = _Library()

    def help(self, method=None):
        print(_HELP)

    def __repr__(self):
        return "<dbutils (local workspace)>"


_HELP = """This module provides various utilities for users to interact with the rest of Databricks.

fs: DbfsUtils -> Manipulates the Databricks filesystem (DBFS) from the console
jobs: JobsUtils -> Utilities for leveraging jobs features
library: LibraryUtils -> Utilities for session isolated libraries
notebook: NotebookUtils -> Utilities for the control flow of a notebook
secrets: SecretUtils -> Provides utilities for leveraging secrets within notebooks
widgets: WidgetsUtils -> Methods to create and get bound value of input widgets inside notebooks
"""


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


def install_runtime_auth(init, namespace):
    """What databricks-sdk's runtime auth (``runtime_native_auth``, used when
    ``DATABRICKS_RUNTIME_VERSION`` is set) imports on a cluster:

    * ``dbruntime.sdk_credential_provider``: ``init_runtime_native_unified()`` gives the host,
      account id, workspace id and a header factory; ``init_runtime_native_auth()`` the older
      (host, header factory) pair;
    * ``dbruntime.UserNamespaceInitializer``: the notebook's namespace, through which
      ``databricks.sdk.runtime`` takes ``dbutils``, ``spark``, ``display``... and, on SDKs
      without the unified provider, ``init_runtime_native_auth``.

    The host is the local workspace's own ``http://`` URL, so ``WorkspaceClient()`` with no
    arguments works in a context, with old and new SDKs alike (the REPL-context fallback builds
    ``https://`` and would retry a TLS handshake for the SDK's whole 300 s budget)."""
    import types

    module = types.ModuleType("dbruntime.sdk_credential_provider")

    def inner():
        return {"Authorization": "Bearer %s" % init["token"]}

    def init_runtime_native_unified():
        return init["host"], None, init["workspace_id"], inner

    def init_runtime_native_auth():
        return init["host"], inner

    module.init_runtime_native_unified = init_runtime_native_unified
    module.init_runtime_native_auth = init_runtime_native_auth
    sys.modules["dbruntime.sdk_credential_provider"] = module
    sys.modules["dbruntime"].sdk_credential_provider = module

    class UserNamespaceInitializer:
        @classmethod
        def getOrCreate(cls):
            return cls()

        def get_namespace_globals(self):
            return dict(namespace, init_runtime_native_auth=init_runtime_native_auth)

    sys.modules["dbruntime"].UserNamespaceInitializer = UserNamespaceInitializer
