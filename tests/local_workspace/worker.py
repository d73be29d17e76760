"""One execution context of the local workspace: a Python REPL process.

Started by ``cluster.py`` as ``python -c <boot> REQ_FD RES_FD CANCEL_FD`` (the boot line imports
this module and takes ``tests/`` off ``sys.path`` again, so nothing here shadows user imports).
The protocol never touches fd 0/1/2 (user code may write to fd 1 through
``os.system`` or a subprocess); it runs on three inherited pipes:

* REQ_FD (server -> worker): JSON lines. First ``{"type": "init", ...}`` with the
  host, token and cluster facts (and the cluster driver's socket and the context's own venv
  dir), then ``{"type": "exec", "id", "code", "language", ...}``
  (``language``: "python" or "sql").
* RES_FD (worker -> server): JSON lines. ``{"type": "ready", "pid"}`` after the
  init, then one ``{"type": "result", "id", "results", "cancelled"}`` per exec.
* CANCEL_FD (server -> worker): command ids (one per line) whose cancellation
  was asked for. The server writes the id, then sends SIGINT; the SIGINT
  handler reads this pipe and interrupts the running command only if its id is
  there, so a late signal can never hit the next command.

It runs on the runtime environment's Python (``runtime.py``); pandas, matplotlib and
pyspark are imported only when user code brings them in. User code runs in the main thread.
"""

import ast
import json
import os
import signal
import sys

from . import sandbox
from .dbutils import RestartPython, _Dbutils, _install_dbruntime, _NotebookExit, redact
from .paths import host_path
from .spark import notebook_names

# The runtime's own frames (this package) are hidden from tracebacks, as a cluster hides its own.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

MAX_TABLE_ROWS = 10_000
MAX_TABLE_BYTES = 2 * 1024 * 1024
MAX_RESULT_CHARS = 20 * 1024 * 1024
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RED = "\x1b[0;31m"
GREEN = "\x1b[0;32m"
CYAN = "\x1b[0;36m"
RESET = "\x1b[0m"

STATE = {
    "current": None,  # id of the running command
    "cancelled": set(),  # ids whose cancel was asked for
    "display": None,  # last display() result of the running command
    "exit": None,
    "counter": 0,
    "init": {},
    "limits": {},
    "first_signal": None,  # monotonic time of the running command's first cancel signal
    "py4j_cut": False,  # an interrupt cut a py4j call short: its connection is out of step
}
# While a py4j call (Spark) is in flight, a cancel first waits this long for the cancelled job
# group to end the call; only then does it interrupt the call itself.
PY4J_INTERRUPT_GRACE = 1.2




# ---------------------------------------------------------------- cancellation

def _drain_cancel_pipe(fd):
    try:
        data = os.read(fd, 65536)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        return
    for line in data.decode("utf-8", "replace").split("\n"):
        line = line.strip()
        if line:
            STATE["cancelled"].add(line)


def _in_py4j_call(frame):
    while frame is not None:
        if os.sep + "py4j" + os.sep in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _make_sigint_handler(cancel_fd):
    """The worker's SIGINT handler: interrupt the running command only if its cancel was asked.

    Spark's jobs are cancelled by the cluster (the command's job group), which ends a blocked
    py4j call with an error; an interrupt inside that call would leave the py4j connection out of
    step, so it comes only when the call has not ended within PY4J_INTERRUPT_GRACE."""
    import time

    def handler(signum, frame):
        _drain_cancel_pipe(cancel_fd)
        current = STATE["current"]
        if current is None or current not in STATE["cancelled"]:
            return  # a stray SIGINT (idle worker, or aimed at an earlier command): ignore
        now = time.monotonic()
        if STATE["first_signal"] is None:
            STATE["first_signal"] = now
        if _in_py4j_call(frame):
            if now - STATE["first_signal"] < PY4J_INTERRUPT_GRACE:
                return
            STATE["py4j_cut"] = True
        raise KeyboardInterrupt

    return handler


# ---------------------------------------------------------------- output capture

class _Capture:
    """A text stream that collects stdout and stderr in the order written."""

    encoding = "utf-8"
    errors = "replace"

    def __init__(self, parts):
        self._parts = parts
        self._size = 0

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError("write() argument must be str, not %s" % type(s).__name__)
        if self._size <= MAX_RESULT_CHARS:
            self._parts.append(s)
            self._size += len(s)
        return len(s)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass

    def isatty(self):
        return False

    def readable(self):
        return False

    def writable(self):
        return True

    def fileno(self):
        import io

        raise io.UnsupportedOperation("fileno")


# ---------------------------------------------------------------- display()

def _spark_type(value):
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    import datetime

    if isinstance(value, datetime.datetime):
        return "timestamp"
    if isinstance(value, datetime.date):
        return "date"
    return "string"


def _json_cell(value):
    import datetime
    import math

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, (list, tuple, dict)):
        try:
            return json.dumps(value, default=str)
        except (TypeError, ValueError):
            return str(value)
    # numpy / pandas scalars
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _json_cell(item())
        except Exception:
            pass
    isoformat = getattr(value, "isoformat", None)
    if callable(isoformat):
        try:
            return isoformat()
        except Exception:
            pass
    return str(value)


def _table_result(columns, types, rows):
    data = []
    size = 2
    truncated = False
    for row in rows:
        if len(data) >= MAX_TABLE_ROWS:
            truncated = True
            break
        cells = [_json_cell(v) for v in row]
        row_size = len(json.dumps(cells, default=str)) + 1
        if size + row_size > MAX_TABLE_BYTES:
            truncated = True
            break
        size += row_size
        data.append(cells)
    schema = [
        {"name": str(name), "type": json.dumps(t), "metadata": "{}"}
        for name, t in zip(columns, types)
    ]
    return {
        "resultType": "table",
        "data": data,
        "schema": schema,
        "isJsonSchema": True,
        "truncated": truncated,
    }


def _pandas_type(dtype):
    kind = getattr(dtype, "kind", "O")
    if kind == "b":
        return "boolean"
    if kind in "iu":
        return "long"
    if kind == "f":
        return "double"
    if kind == "M":
        return "timestamp"
    return "string"


def _pandas_table(df):
    columns = [str(c) for c in df.columns]
    types = [_pandas_type(df.dtypes.iloc[i]) for i in range(len(columns))]
    head = df.head(MAX_TABLE_ROWS + 1)
    rows = head.itertuples(index=False, name=None)
    result = _table_result(columns, types, rows)
    if len(df) > MAX_TABLE_ROWS:
        result["truncated"] = True
    return result


_SPARK_TYPE_NAMES = {
    "LongType": "long", "IntegerType": "integer", "ShortType": "short", "ByteType": "byte",
    "DoubleType": "double", "FloatType": "float", "BooleanType": "boolean",
    "TimestampType": "timestamp", "TimestampNTZType": "timestamp_ntz", "DateType": "date",
    "StringType": "string",
}


def _spark_table(df):
    fields = df.schema.fields
    columns = [f.name for f in fields]
    types = [_SPARK_TYPE_NAMES.get(type(f.dataType).__name__, "string") for f in fields]
    rows = [tuple(r) for r in df.take(MAX_TABLE_ROWS + 1)]
    return _table_result(columns, types, rows)


def _rows_table(rows, columns=None):
    rows = list(rows)
    if rows and all(isinstance(r, dict) for r in rows):
        names = []
        for r in rows:
            for k in r:
                if k not in names:
                    names.append(k)
        tuples = [tuple(r.get(k) for k in names) for r in rows]
    else:
        tuples = [tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in rows]
        width = max((len(t) for t in tuples), default=len(columns or []))
        names = list(columns) if columns else ["_%d" % (i + 1) for i in range(width)]
        tuples = [t + (None,) * (len(names) - len(t)) for t in tuples]
    types = []
    for i in range(len(names)):
        t = "string"
        for row in tuples:
            if i < len(row) and row[i] is not None:
                t = _spark_type(row[i])
                break
        types.append(t)
    return _table_result(names, types, tuples)


def _image_result(png):
    limits = STATE["limits"]
    inline_limit = limits.get("image_inline_limit", 512 * 1024)
    if len(png) > inline_limit and limits.get("plots_dir"):
        import uuid

        name = "%s.png" % uuid.uuid4()
        plots_dir = sandbox.local_path(STATE["init"].get("state_dir"),
                                       STATE["init"]["cluster_id"], limits["plots_dir"])
        path = os.path.join(plots_dir, name)
        with open(path + ".tmp", "wb") as f:
            f.write(png)
        os.replace(path + ".tmp", path)
        return {"resultType": "images", "fileNames": ["/plots/" + name]}
    import base64

    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"resultType": "images", "fileNames": [url]}


def _figure_png(fig):
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _is_instance_of(obj, module_prefix, class_name):
    for klass in type(obj).__mro__:
        if klass.__name__ == class_name and (klass.__module__ or "").startswith(module_prefix):
            return True
    return False


def display(obj=None, *args, **kwargs):
    """Show a table (DataFrame, list of dicts/rows) or an image (Figure, PNG bytes)."""
    if _is_instance_of(obj, "pandas", "DataFrame"):
        result = _pandas_table(obj)
    elif _is_instance_of(obj, "pyspark", "DataFrame"):
        result = _spark_table(obj)
    elif _is_instance_of(obj, "matplotlib", "Figure"):
        if STATE["limits"].get("plots_mode") == "repr":
            print(repr(obj))  # only the figure's text form reaches the API (S23)
            return
        result = _image_result(_figure_png(obj))
    elif isinstance(obj, (bytes, bytearray)) and bytes(obj[:8]) == PNG_MAGIC:
        result = _image_result(bytes(obj))
    elif isinstance(obj, (list, tuple)) and (not obj or isinstance(obj[0], (dict, list, tuple))):
        result = _rows_table(obj, kwargs.get("columns") or (args[0] if args else None))
    elif _is_instance_of(obj, "pandas", "Series"):
        result = _pandas_table(obj.to_frame())
    else:
        result = {"resultType": "text", "data": str(obj)}
    STATE["display"] = result


def displayHTML(html):
    STATE["display"] = {"resultType": "text", "data": str(html)}


def _show_open_figures(plt, close=True):
    nums = plt.get_fignums()
    for num in nums:
        display(plt.figure(num))
    if close and nums:
        plt.close("all")


def _patch_pyplot(plt):
    if getattr(plt, "_local_workspace_patched", False):
        return

    def show(*args, **kwargs):
        _show_open_figures(plt)

    plt.show = show
    plt._local_workspace_patched = True


class _PatchOnImport:
    """Run ``patch(module)`` as soon as the module ``name`` is imported (a meta path finder)."""

    def __init__(self, name, patch):
        self._name = name
        self._patch = patch

    def find_spec(self, name, path=None, target=None):
        if name != self._name:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        original = getattr(loader, "exec_module", None)
        if original is None:
            return spec
        patch = self._patch

        class _Loader:
            def create_module(self, spec):
                create = getattr(loader, "create_module", None)
                return create(spec) if create else None

            def exec_module(self, module):
                original(module)
                patch(module)

        spec.loader = _Loader()
        return spec



# ---------------------------------------------------------------- driver paths

def _driver_paths(init):
    """How this context reaches the driver paths (``/Volumes``, ``dbfs:/``...): a function
    driver path -> the path to open. Inside the cluster's own view they are the real names;
    on the host's view the mapped ones are refused to user code (``sandbox.install_guard``)
    and dbutils reaches them in the state directory."""
    state_dir, cluster_id = init.get("state_dir"), init["cluster_id"]
    if sandbox.isolated():
        return lambda path: path
    why = os.environ.get(sandbox.SANDBOX_ENV, "none: isolation is switched off")
    sandbox.install_guard(state_dir, cluster_id, why.split(": ", 1)[-1])
    if not state_dir:
        return lambda path: path
    return lambda path: host_path(state_dir, cluster_id, path) or path


# ---------------------------------------------------------------- errors

def _summary(exc_type, message):
    import html

    text = "<span class='ansi-red-fg'>%s</span>" % html.escape(exc_type)
    if message:
        text += ": " + html.escape(message)
    return text


def _exc_name(exc):
    return type(exc).__name__


def _error_result(exc, filename):
    import linecache
    import traceback

    name = _exc_name(exc)
    message = str(exc)
    lines = [RED + "-" * 75 + RESET]
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        lines.append("  File " + GREEN + "%s:%s" % (exc.filename, exc.lineno) + RESET)
        if exc.text:
            lines.append("    " + exc.text.rstrip("\n"))
            if exc.offset:
                lines.append("    " + " " * (exc.offset - 1) + "^")
        lines.append(RED + name + RESET + ": " + (exc.msg or ""))
        return {
            "resultType": "error",
            "summary": _summary(name, exc.msg or ""),
            "cause": "\n".join(lines),
        }
    lines.append(
        RED + name + RESET + " " * max(1, 42 - len(name)) + "Traceback (most recent call last)"
    )
    frames = traceback.extract_tb(exc.__traceback__)
    # Drop the worker's own frames that precede the user's code.
    while frames and frames[0].filename != filename:
        frames.pop(0)
    # ... and the runtime's own frames (the lazy `spark`, dbutils), as a cluster hides its own.
    frames = [f for f in frames
              if os.path.dirname(os.path.abspath(f.filename)) != _PACKAGE_DIR]
    for frame in frames:
        lines.append("File " + GREEN + "%s:%s" % (frame.filename, frame.lineno) + RESET
                     + (", in " + CYAN + frame.name + RESET if frame.name != "<module>" else ""))
        source = frame.line or linecache.getline(frame.filename, frame.lineno).strip()
        if source:
            lines.append(GREEN + "----> %d" % frame.lineno + RESET + " " + source)
        lines.append("")
    lines.append(RED + name + RESET + ": " + message)
    return {
        "resultType": "error",
        "summary": _summary(name, message),
        "cause": "\n".join(lines),
    }


# ---------------------------------------------------------------- magics

def _run_process(argv, shell=False):
    import subprocess

    proc = subprocess.run(
        argv,
        shell=shell,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sys.stdout.write(proc.stdout.decode("utf-8", "replace"))
    return proc.returncode


def _magic(kind, arg):
    import shlex

    if kind == "pip":
        _pip(shlex.split(arg))
        return None
    if kind == "sh":
        _run_process(arg, shell=True)
        return None
    raise _UsageError("Line magic function `%%%s` not found." % kind)


def _pip(args):
    """``%pip``: pip in the context's own environment (notebook-scoped libraries).

    The context's venv sees the runtime's packages (a .pth file), so pip installs only what is
    missing, into the context's site dir, which is first on this process's sys.path; pip never
    uninstalls the runtime's copy of a package (it is outside the context's environment)."""
    import importlib

    python = _context_env()
    code = _run_process([python, "-m", "pip", "--disable-pip-version-check"] + args)
    importlib.invalidate_caches()
    return code


def _context_env():
    """The context's own venv (made once, kept across a Python restart): its python."""
    import sysconfig
    import venv

    root = STATE["init"]["context_env"]
    python = os.path.join(root, "bin", "python")
    if not os.path.exists(python):
        venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
        with open(os.path.join(_context_site(), "runtime.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")  # this runtime's own site dir
        pip = os.path.join(root, "bin", "pip")
        with open(pip, "w") as f:
            f.write('#!/bin/sh\nexec "%s" -m pip "$@"\n' % python)
        os.chmod(pip, 0o755)
    return python


def _context_site():
    version = "python%d.%d" % sys.version_info[:2]
    return os.path.join(STATE["init"]["context_env"], "lib", version, "site-packages")


class _IPython:
    """``get_ipython()``: the parts notebook code commonly calls."""

    def run_line_magic(self, name, line):
        return _magic(name, line)

    def run_cell_magic(self, name, line, cell):
        if name in ("sh", "bash"):
            return _magic("sh", cell)
        raise _UsageError("Cell magic `%%%%%s` not found." % name)

    def system(self, cmd):
        _run_process(cmd, shell=True)

    def getoutput(self, cmd):
        import subprocess

        out = subprocess.run(cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        return out.stdout.decode("utf-8", "replace").splitlines()

    @property
    def user_ns(self):
        return STATE["namespace"]


class _UsageError(Exception):
    pass


_UsageError.__name__ = "UsageError"


def _transform_magics(code):
    """Turn %pip / %sh / ! lines into calls; a leading %%sh makes the whole cell shell."""
    stripped = code.lstrip()
    if stripped.startswith("%%"):
        first, _, body = stripped.partition("\n")
        name = first[2:].split()[0] if first[2:].split() else ""
        if name in ("sh", "bash"):
            return "__local_magic__('sh', %r)\n" % body
        raise _UsageError("Cell magic `%%%%%s` not found." % name)
    out = []
    changed = False
    for line in code.split("\n"):
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        if body.startswith("%") and not body.startswith("%%"):
            head, _, rest = body[1:].partition(" ")
            out.append("%s__local_magic__(%r, %r)" % (indent, head.strip(), rest.strip()))
            changed = True
        elif body.startswith("!"):
            out.append("%s__local_magic__('sh', %r)" % (indent, body[1:].strip()))
            changed = True
        else:
            out.append(line)
    return "\n".join(out) if changed else code


# ---------------------------------------------------------------- execution

def _execute(code, namespace):
    import linecache

    STATE["counter"] += 1
    n = STATE["counter"]
    filename = "<command-%d>" % (4_000_000_000 + os.getpid() * 1000 + n)
    parts = []
    capture = _Capture(parts)
    STATE["display"] = None
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = capture
    value = None
    try:
        try:
            source = _transform_magics(_dedent_cell(code))
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            tree = ast.parse(source, filename, "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, filename, "exec"), namespace)
            if last is not None:
                value = eval(compile(last, filename, "eval"), namespace)
            plt = sys.modules.get("matplotlib.pyplot")
            if plt is not None and STATE["display"] is None and _open_figures_become_images():
                _show_open_figures(plt)
        finally:
            _close_all_figures()
            sys.stdout, sys.stderr = old_out, old_err
    except _NotebookExit as e:
        return {"resultType": "text", "data": str(e.value)}
    except RestartPython:
        STATE["restart"] = True
        return {"resultType": "text", "data": ""}
    except KeyboardInterrupt:
        if STATE["current"] in STATE["cancelled"]:
            raise
        return _error_result(KeyboardInterrupt(), filename)
    except _UsageError as e:
        return {
            "resultType": "error",
            "summary": _summary("UsageError", str(e)),
            "cause": RED + "UsageError" + RESET + ": " + str(e),
        }
    except BaseException as e:  # noqa: B902 - user code may raise SystemExit etc.
        return _error_result(e, filename)
    if STATE["display"] is not None:
        return STATE["display"]
    text = "".join(parts)
    if value is not None:
        namespace["_"] = value
        try:
            shown = repr(value)
        except Exception as e:  # a broken __repr__
            return _error_result(e, filename)
        if text and not text.endswith("\n"):
            text += "\n"
        text += "Out[%d]: %s" % (n, shown)
    return _text_result(text)


def _text_result(text):
    """Text as the service returns it: without its final newline (``print(1)`` gives ``"1"``:
    the Go SDK's, databricks-vscode's and terraform's live tests, S18/S13/S19)."""
    if text.endswith("\n"):
        text = text[:-1]
    return {"resultType": "text", "data": text[: MAX_RESULT_CHARS + 1]}


def _dedent_cell(code):
    """A uniformly indented cell runs: IPython strips the common indent (the SDK's dbutils proxy
    sends code that way: S8, S15)."""
    import textwrap

    return textwrap.dedent(code)


def _open_figures_become_images():
    """In ``plots_mode="images"`` figures still open at the end become images, as the inline
    backend shows them; in ``"repr"`` nothing but their text comes back (S23)."""
    return STATE["limits"].get("plots_mode") != "repr"


def _close_all_figures():
    """As the inline backend does, no figure outlives its command, shown or not."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        try:
            plt.close("all")
        except Exception:
            pass


def _restarts_python(code):
    """Does this command end with a Python restart? ``dbutils.library.restartPython()`` always;
    ``%pip`` only when the cluster restarts Python after it (``pip_restarts``)."""
    if STATE.pop("restart", False):
        return True
    return bool(STATE["limits"].get("pip_restarts")) and any(
        line.lstrip().startswith("%pip") for line in code.split("\n"))


def _install_runtime_auth(init, namespace):
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


def _execute_sql(code, namespace):
    """A ``language: sql`` command: the statement(s) on this context's SparkSession; the last
    statement's result as a table (same caps as display())."""
    spark = namespace["spark"]
    statements = [s for s in _split_sql(code) if s.strip()]
    try:
        df = None
        for statement in statements:
            df = spark.sql(statement)
        if df is None:
            return {"resultType": "text", "data": ""}
        return _spark_table(df)
    except Exception as e:  # a cancel (KeyboardInterrupt) ends the command as cancelled
        name = _exc_name(e)
        message = str(e).strip().split("\n")[0]
        return {"resultType": "error", "summary": _summary(name, message),
                "cause": RED + name + RESET + ": " + str(e)}


def _split_sql(code):
    """Statements split on ';' outside quotes."""
    parts, current, quote = [], [], None
    for ch in code:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in ("'", '"', "`"):
            quote = ch
            current.append(ch)
        elif ch == ";":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _send(res_file, message):
    res_file.write(json.dumps(message) + "\n")
    res_file.flush()


def main(argv):
    req_fd, res_fd, cancel_fd = (int(a) for a in argv[1:4])
    os.set_blocking(cancel_fd, False)
    req = os.fdopen(req_fd, "r", encoding="utf-8", closefd=True)
    res = os.fdopen(res_fd, "w", encoding="utf-8", closefd=True)
    signal.signal(signal.SIGINT, _make_sigint_handler(cancel_fd))

    init = json.loads(req.readline())
    STATE["init"] = init
    sys.meta_path.insert(0, _PatchOnImport("matplotlib.pyplot", _patch_pyplot))
    _install_dbruntime(init)
    dbutils = _Dbutils(init, _driver_paths(init))
    if init.get("context_env"):
        # The context's own venv: `%pip`, and `pip`/`python` in `%sh`, install into it, never
        # into the runtime's environment; its packages come first on sys.path.
        _context_env()
        sys.path.insert(0, _context_site())
    ipython = _IPython()
    namespace = {
        "__name__": "__main__",
        "__builtins__": __builtins__,
        "display": display,
        "displayHTML": displayHTML,
        "dbutils": dbutils,
        "get_ipython": lambda: ipython,
        "__local_magic__": _magic,
    }
    namespace.update(notebook_names(init))
    STATE["namespace"] = namespace
    spark = namespace["spark"]
    # `SparkSession.builder.getOrCreate()` in user code gets this context's session on the
    # cluster's Spark, never a JVM of its own.
    sys.meta_path.insert(0, _PatchOnImport("pyspark.sql.session", spark.patch_builder))
    _install_runtime_auth(init, namespace)
    real_out, real_err = sys.stdout, sys.stderr
    _send(res, {"type": "ready", "pid": os.getpid()})

    while True:
        try:
            line = req.readline()
        except KeyboardInterrupt:  # pragma: no cover - the handler does not raise when idle
            continue
        if not line:
            return 0
        message = json.loads(line)
        if message.get("type") != "exec":
            continue
        STATE["limits"] = message.get("limits", {})
        command_id = message["id"]
        run = _execute_sql if message.get("language") == "sql" else _execute
        STATE["first_signal"] = None
        STATE["py4j_cut"] = False
        STATE["current"] = command_id
        outcome = None
        while outcome is None:
            try:
                try:
                    _drain_cancel_pipe(cancel_fd)
                    if command_id in STATE["cancelled"]:
                        raise KeyboardInterrupt
                    spark.begin_command(command_id)
                    results = run(message["code"], namespace)
                    # A cancelled Spark job ends the command with an error, not an interrupt:
                    # it was still cancelled.
                    _drain_cancel_pipe(cancel_fd)
                    outcome = (results, command_id in STATE["cancelled"])
                except KeyboardInterrupt:
                    outcome = (None, True)
            except KeyboardInterrupt:  # a repeated SIGINT landed inside the handler above
                outcome = (None, True)
        while True:  # once `current` is None the SIGINT handler can no longer raise
            try:
                STATE["current"] = None
                break
            except KeyboardInterrupt:
                continue
        sys.stdout, sys.stderr = real_out, real_err
        if STATE["py4j_cut"]:
            spark.reset_gateway_connection()
        results, cancelled = outcome
        results = redact(results, dbutils.secrets)
        STATE["cancelled"].discard(command_id)
        restart = not cancelled and _restarts_python(message["code"])
        _send(res, {"type": "result", "id": command_id, "results": results,
                    "cancelled": cancelled, "restart": restart})
        if restart:
            return 0  # the cluster starts a fresh interpreter for this context

