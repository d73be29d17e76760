"""One execution context of the local workspace: a Python REPL process, its protocol and loop.

Started by ``contexts.py`` as ``python -c <boot> REQ_FD RES_FD CANCEL_FD`` (the boot line imports
this module and takes ``tests/`` off ``sys.path`` again, so nothing here shadows user imports).
The protocol never touches fd 0/1/2 (user code may write to fd 1 through
``os.system`` or a subprocess); it runs on three inherited pipes:

* REQ_FD (server -> worker): JSON lines. First ``{"type": "init", ...}`` with the
  host, token and cluster facts (and the cluster driver's socket and the context's own venv
  dir), then ``{"type": "exec", "id", "code", "language", "limits"}``
  (``language``: "python" or "sql").
* RES_FD (worker -> server): JSON lines. ``{"type": "ready", "pid"}`` after the
  init, then one ``{"type": "result", "id", "results", "cancelled", "restart"}`` per exec.
* CANCEL_FD (server -> worker): command ids (one per line) whose cancellation
  was asked for. The server writes the id, then sends SIGINT; the SIGINT
  handler reads this pipe and interrupts the running command only if its id is
  there, so a late signal can never hit the next command.

User code runs in the main thread, in the ``__dict__`` of a real module registered as
``sys.modules["__main__"]`` (as IPython gives a notebook), so what a command defines can be
pickled by reference and used by ``multiprocessing``. A Python command runs through ``cell.py``, a
SQL command through ``sql.py``. It runs on the runtime environment's Python (``runtime.py``);
pandas, matplotlib and pyspark are imported only when user code brings them in.
"""

import json
import os
import signal
import sys

from . import cell, display, magics, sandbox, sql
from .dbutils import _Dbutils, _install_dbruntime, install_runtime_auth, redact
from .paths import host_path
from .spark import PendingContext, notebook_names

_STATE = {
    "current": None,  # id of the running command
    "cancelled": set(),  # ids whose cancel was asked for
    "first_signal": None,  # monotonic time of the running command's first cancel signal
    "py4j_cut": False,  # an interrupt cut a py4j call short: its connection is out of step
    "on_cancel": None,  # called at a command's first cancel signal (Spark Connect: interrupt)
}
# While a Spark call (py4j, or Spark Connect's gRPC) is in flight, a cancel first waits this
# long for the cancelled job group (or the interrupted operations) to end the call; only then
# does it interrupt the call itself.
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
            _STATE["cancelled"].add(line)


def _in_spark_call(frame):
    """``"py4j"``, ``"connect"`` (a Spark Connect call: gRPC) or None."""
    connect = os.sep.join(("pyspark", "sql", "connect", ""))
    while frame is not None:
        filename = frame.f_code.co_filename
        if os.sep + "py4j" + os.sep in filename:
            return "py4j"
        if os.sep + "grpc" + os.sep in filename or connect in filename:
            return "connect"
        frame = frame.f_back
    return None


def _make_sigint_handler(cancel_fd):
    """The worker's SIGINT handler: interrupt the running command only if its cancel was asked.

    Spark's jobs are cancelled by the cluster (the command's job group), or on standard access
    mode by the context itself (its Spark Connect operations, by their tag: ``on_cancel``),
    which ends a blocked Spark call with an error; an interrupt inside a py4j call would leave
    the py4j connection out of step, so it comes only when the call has not ended within
    PY4J_INTERRUPT_GRACE."""
    import time

    def handler(signum, frame):
        _drain_cancel_pipe(cancel_fd)
        current = _STATE["current"]
        if current is None or current not in _STATE["cancelled"]:
            return  # a stray SIGINT (idle worker, or aimed at an earlier command): ignore
        now = time.monotonic()
        if _STATE["first_signal"] is None:
            _STATE["first_signal"] = now
            if _STATE["on_cancel"] is not None:
                _STATE["on_cancel"]()
        call = _in_spark_call(frame)
        if call:
            if now - _STATE["first_signal"] < PY4J_INTERRUPT_GRACE:
                return
            _STATE["py4j_cut"] = call == "py4j"
        raise KeyboardInterrupt

    return handler

# ---------------------------------------------------------------- the context's namespace

def _cancelling():
    return _STATE["current"] in _STATE["cancelled"]


def main_namespace(names):
    """The namespace user code runs in: the ``__dict__`` of a fresh module registered as
    ``sys.modules["__main__"]`` holding ``names`` (the notebook's ``spark``, ``dbutils``,
    ``display``...), so ``pickle`` finds a function a command defined as ``__main__.f``, and a
    forked ``multiprocessing`` worker finds it too. Nothing of the worker itself is in it."""
    import builtins
    import types

    module = types.ModuleType("__main__")
    module.__dict__.update(names, __builtins__=builtins)
    sys.modules["__main__"] = module
    return module.__dict__


class PatchOnImport:
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


# ---------------------------------------------------------------- the protocol

def _send(res_file, message):
    res_file.write(json.dumps(message) + "\n")
    res_file.flush()


def _setup(init):
    """Everything a context has before its first command; its namespace."""
    sys.meta_path.insert(0, PatchOnImport("matplotlib.pyplot", display.patch_pyplot))
    _install_dbruntime(init)
    display.setup(init)
    dbutils = _Dbutils(init, _driver_paths(init))
    ipython = magics.IPython()
    names = {"display": display.display, "displayHTML": display.displayHTML,
             "dbutils": dbutils, "get_ipython": lambda: ipython}
    names.update(notebook_names(init))
    namespace = main_namespace(names)
    magics.setup(init, namespace)
    if init.get("context_env"):
        # The context's own venv: `%pip`, and `pip`/`python` in `%sh`, install into it, never
        # into the runtime's environment; its packages come first on sys.path.
        magics.context_env()
        sys.path.insert(0, magics.context_site())
    # `SparkSession.builder.getOrCreate()` in user code gets this context's session on the
    # cluster's Spark, never a JVM of its own; pyspark's functions find an active SparkContext.
    spark = namespace["spark"]
    sys.meta_path.insert(0, PatchOnImport("pyspark.sql.session", spark.patch_builder))
    for name in PendingContext.MODULES:
        sys.meta_path.insert(0, PatchOnImport(name, spark.pend_context))
    install_runtime_auth(init, namespace)
    return namespace


def _run_command(message, namespace, cancel_fd):
    """(results, cancelled) of one exec message."""
    command_id = message["id"]
    run = sql.run if message.get("language") == "sql" else (
        lambda code, ns: cell.run(code, ns, _cancelling))
    spark = namespace["spark"]
    _STATE["first_signal"] = None
    _STATE["py4j_cut"] = False
    _STATE["current"] = command_id
    outcome = None
    while outcome is None:
        try:
            try:
                _drain_cancel_pipe(cancel_fd)
                if command_id in _STATE["cancelled"]:
                    raise KeyboardInterrupt
                spark.begin_command(command_id)
                results = run(message["code"], namespace)
                # A cancelled Spark job ends the command with an error, not an interrupt:
                # it was still cancelled.
                _drain_cancel_pipe(cancel_fd)
                outcome = (results, command_id in _STATE["cancelled"])
            except KeyboardInterrupt:
                outcome = (None, True)
        except KeyboardInterrupt:  # a repeated SIGINT landed inside the handler above
            outcome = (None, True)
    while True:  # once `current` is None the SIGINT handler can no longer raise
        try:
            _STATE["current"] = None
            break
        except KeyboardInterrupt:
            continue
    return outcome


def main(argv):
    req_fd, res_fd, cancel_fd = (int(a) for a in argv[1:4])
    os.set_blocking(cancel_fd, False)
    req = os.fdopen(req_fd, "r", encoding="utf-8", closefd=True)
    res = os.fdopen(res_fd, "w", encoding="utf-8", closefd=True)
    signal.signal(signal.SIGINT, _make_sigint_handler(cancel_fd))

    init = json.loads(req.readline())
    namespace = _setup(init)
    dbutils, spark = namespace["dbutils"], namespace["spark"]
    _STATE["on_cancel"] = spark.interrupt_command
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
        limits = message.get("limits", {})
        display.begin(limits)
        results, cancelled = _run_command(message, namespace, cancel_fd)
        sys.stdout, sys.stderr = real_out, real_err
        if _STATE["py4j_cut"]:
            spark.reset_gateway_connection()
        results = redact(results, dbutils.secrets)
        _STATE["cancelled"].discard(message["id"])
        restart = not cancelled and cell.restarts_python(message["code"], limits)
        _send(res, {"type": "result", "id": message["id"], "results": results,
                    "cancelled": cancelled, "restart": restart})
        if restart:
            return 0  # the cluster starts a fresh interpreter for this context
