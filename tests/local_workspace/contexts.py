"""Execution contexts and commands: the backend behind the Command Execution API 1.2.

Every execution context is a real Python process (``worker.py``) on its cluster's runtime
(``runtime.py``: from the cluster's spark_version, built on the cluster's first start; meanwhile
a context is ``Pending``), fed its queue of commands one at a time over pipes. Each running cluster has one
driver (``driver.py``: the JVM its contexts share, started with the cluster's first context).
Cancel asks the driver to cancel the command's Spark job group, then interrupts the context.
Contexts are evicted (least recently used idle first at the limit, or after ``idle_ttl``),
destroyed, and shut down with their cluster (``Clusters.on_state_change``). Every cluster process
runs on the runtime's Python, with its temp dir under the cluster's state dir, started through
``sandbox.wrap_command``. Refusals are domain errors (``errors.py``); the wire layer answers them.
"""

import collections
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import uuid

from . import driver as _driver
from . import paths, sandbox
from .clusters import RUNNABLE_STATES, is_standard
from .config import OWNER, WORKSPACE_ID
from .errors import (ClusterNotReady, CommandNotFound, ContextDisconnected, InvalidParameter,
                     InvalidState, TooManyContexts, UnsupportedLanguage)
from .paths import cluster_dir, driver_dir
from .runtime import CONNECT_RUNTIME, SESSION_TIME_ZONE, at_least, ready_runtime, spark_defaults

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _boot(module):
    """``python -c`` code that runs ``local_workspace.<module>.main(sys.argv)`` without leaving
    tests/ on the process's sys.path (so nothing here shadows user imports)."""
    return ("import sys; sys.path.insert(0, %r); import local_workspace.%s as m; "
            "sys.path.remove(%r); sys.exit(m.main(sys.argv))" % (TESTS_DIR, module, TESTS_DIR))


WORKER_BOOT = _boot("worker")
DRIVER_BOOT = _boot("driver")
DRIVER_START_TIMEOUT = 30.0  # the driver process only (its JVM starts later, on first use)
DRIVER_CANCEL_TIMEOUT = 1.0
LANGUAGES = ("python", "sql")

MAX_NON_TABLE_BYTES = 20 * 1024 * 1024
CANCEL_FIRST_SIGNAL_DELAY = 0.1
CANCEL_RESEND_INTERVAL = 0.25
CANCEL_KILL_AFTER = 10.0
PLOTS_PATH = "dbfs:/FileStore/plots"
# What a DBR <= 16.4 notebook shows instead of output over its limit (quoted in
# DeNederlandscheBank/name_matching #22; see _over_the_text_limit).
OUTPUT_DISCARDED = "*** WARNING: max output size exceeded, skipping output. ***"

CANCELLED_CAUSE = (
    "com.databricks.backend.common.rpc.CommandCancelledException\n"
    "\tat com.databricks.spark.chauffeur.ExecContextState.cancel(ExecContextState.scala:437)\n"
    "\tat com.databricks.spark.chauffeur.ChauffeurState.cancelExecution(ChauffeurState.scala:1252)\n"
    "\tat com.databricks.spark.chauffeur.Chauffeur$$anonfun$receive$1.applyOrElse(Chauffeur.scala:1021)"
)
# A command whose context shuts down under it (eviction, cluster restart): the frames real users
# pasted (paiqo/Databricks-VSCode #132 and #220: S4, S5).
SHUTDOWN_CAUSE = (
    "com.databricks.backend.common.rpc.CommandCancelledException\n"
    "\tat com.databricks.spark.chauffeur.SequenceExecutionState.$anonfun$cancel$5(SequenceExecutionState.scala:132)\n"
    "\tat com.databricks.spark.chauffeur.SequenceExecutionState.cancel(SequenceExecutionState.scala:129)\n"
    "\tat com.databricks.spark.chauffeur.ExecContextState.abortRunningSequence(ExecContextState.scala:758)\n"
    "\tat com.databricks.spark.chauffeur.ExecContextState.$anonfun$shutdown$5(ExecContextState.scala:461)\n"
    "\tat com.databricks.spark.chauffeur.ExecContextState.shutdown(ExecContextState.scala:461)"
)
# Commands sent while a context's Python restarts: an error result with this cause (dbx #813: S27).
KERNEL_RESTARTING = (
    "java.lang.IllegalStateException: jupyter client is not available because the python kernel "
    "is not defined. The kernel may be restarting or the repl may have been shut down.\n"
    "\tat com.databricks.backend.daemon.driver.JupyterDriverLocal.$anonfun$getJupyterKernelListener$2(JupyterDriverLocal.scala:307)\n"
    "\tat com.databricks.backend.daemon.driver.JupyterDriverLocal.executePython(JupyterDriverLocal.scala:562)\n"
    "\tat com.databricks.backend.daemon.driver.JupyterDriverLocal.repl(JupyterDriverLocal.scala:524)"
)


class _Command:
    def __init__(self, command_id, context, code, language="python"):
        self.id = command_id
        self.context = context
        self.code = code
        self.language = language
        self.status = "Queued"
        self.results = None
        self.cancel_requested = False
        self.canceller = None


class _Context:
    def __init__(self, context_id, cluster_id, lock, language="python"):
        self.id = context_id
        self.cluster_id = cluster_id
        self.language = language
        self.status = "Pending"
        self.proc = None
        self.req = None
        self.res = None
        self.cancel_fd = None
        self.queue = collections.deque()
        self.cond = threading.Condition(lock)
        self.commands = {}
        self.current = None
        self.last_active = time.monotonic()
        self.closed = False  # evicted or destroyed
        self.dead = False  # worker process gone
        self.thread = None


class _Driver:
    """A running cluster's driver process (``driver.py``) and the socket it serves."""

    def __init__(self, cluster_id, proc, socket_path):
        self.cluster_id = cluster_id
        self.proc = proc
        self.socket_path = socket_path


class Contexts:
    """The execution contexts of every cluster, their commands, processes and drivers.

    ``config``: the workspace's ``Config``; ``clusters``: its ``Clusters`` (records and state
    changes); ``secrets``: ``{"scope": {"key": "value"}}`` for dbutils.secrets; ``isolation``:
    see ``sandbox.py``. ``start`` gives the state dir and the address contexts call back on."""

    def __init__(self, config, clusters, secrets, isolation):
        self._config = config
        self._clusters = clusters
        self._secrets = secrets
        self._isolation = isolation
        self._lock = threading.RLock()
        self._contexts = {}
        self._drivers = {}  # cluster id -> _Driver (one Spark driver per running cluster)
        self._driver_lock = threading.Lock()
        self._pids = []
        self._shutdown_commands = {}  # command id -> command aborted by its context's shutdown
        self._tmpdir = None
        self.plots_dir = None
        self._host = None
        self._token = None
        self._stopping = threading.Event()
        self._janitor = None
        clusters.on_state_change(self._cluster_changed)

    # ----- lifecycle

    def start(self, state_dir, host, token):
        """Serve contexts whose state lives under ``state_dir`` and whose runtime auth calls
        ``host`` with ``token``."""
        self._tmpdir, self._host, self._token = state_dir, host, token
        # Plots live in the FileStore of the DBFS root, as on a workspace (S24).
        self.plots_dir = paths.host_path(state_dir, None, PLOTS_PATH)
        os.makedirs(self.plots_dir, exist_ok=True)
        self._janitor = threading.Thread(target=self._janitor_loop, name="local-workspace-janitor",
                                         daemon=True)
        self._janitor.start()

    def stop(self):
        self._stopping.set()
        self._close_contexts(self.ids(), grace=0.5)
        self._stop_drivers()
        if self._janitor is not None:
            self._janitor.join(5)

    def runtime_for(self, cluster_id, driver=False):
        """The runtime environment a process of the cluster runs on: the one place a cluster's
        processes get their runtime. Its contexts (and a dedicated cluster's driver) run the
        runtime the cluster's ``spark_version`` names; a standard access mode cluster's
        driver (``driver=True``), whose JVM is a Spark Connect server, runs CONNECT_RUNTIME's
        Spark whatever the cluster's runtime (pyspark 3.5 ships no Connect server). The
        cluster's start built them (``Clusters.when_runtimes_ready``); None while not built."""
        version = self._clusters.runtime_of(cluster_id)
        if driver and version and is_standard(self._clusters.get(cluster_id)):
            version = CONNECT_RUNTIME
        return ready_runtime(version) if version else None

    def _cluster_changed(self, cluster_id, state):
        """A cluster that stops running loses its contexts, and its driver (with its JVM)."""
        if state in RUNNABLE_STATES:
            return
        with self._lock:
            doomed = [c.id for c in self._contexts.values() if c.cluster_id == cluster_id]
        self._close_contexts(doomed)
        self._stop_driver(cluster_id)

    # ----- what the control API and the tests read

    def ids(self):
        with self._lock:
            return list(self._contexts)

    def evict(self, context_id=None):
        """Close one context or all; the ids closed."""
        with self._lock:
            ids = list(self._contexts) if context_id is None else [context_id]
            ids = [i for i in ids if i in self._contexts]
        self._close_contexts(ids)
        return ids

    def listing(self):
        with self._lock:
            return [{"id": c.id, "cluster_id": c.cluster_id, "status": c.status,
                     "pid": c.proc.pid if c.proc else None} for c in self._contexts.values()]

    def pids(self):
        """{context id: pid} of the live contexts."""
        with self._lock:
            return {c.id: c.proc.pid for c in self._contexts.values()
                    if c.proc is not None and not c.dead}

    def all_pids(self):
        """Every process this backend ever started (drivers and contexts)."""
        with self._lock:
            return list(self._pids)

    def driver_pids(self):
        """{cluster id: pid} of the running drivers."""
        with self._lock:
            return {cluster_id: d.proc.pid for cluster_id, d in self._drivers.items()}

    def spark_jobs(self, cluster_id):
        """The ids of the Spark jobs running on the cluster now; None while its Spark has not
        started (or it has no driver)."""
        with self._lock:
            driver = self._drivers.get(cluster_id)
        if driver is None:
            return None
        try:
            return _driver.request(driver.socket_path, {"op": "jobs"}, DRIVER_CANCEL_TIMEOUT)["jobs"]
        except (OSError, ValueError, KeyError):
            return None

    # ----- the 1.2 calls

    def create(self, cluster_id, language="python"):
        """contexts/create: the new context's id; its process starts in the background."""
        cluster = self._clusters.get(cluster_id)
        self._evict_lru_idle_at_limit(cluster_id)
        if language not in LANGUAGES:
            raise UnsupportedLanguage(language)
        with self._lock:
            state = cluster["state"]
            if state not in RUNNABLE_STATES:
                if self._config["not_running_mode"] == "not_ready":
                    raise ClusterNotReady(cluster_id, state)
                raise InvalidState("Cluster %s is in state %s and cannot run commands"
                                   % (cluster_id, state))
            live = sum(1 for c in self._contexts.values()
                       if c.cluster_id == cluster_id and not c.dead)
            limit = self._config["context_limit"]
            if live >= limit:
                raise TooManyContexts(limit)
            context_id = str(random.randint(10 ** 18, 9 * 10 ** 18))
            while context_id in self._contexts:
                context_id = str(random.randint(10 ** 18, 9 * 10 ** 18))
            ctx = _Context(context_id, cluster_id, self._lock, language)
            self._contexts[context_id] = ctx
            if self._fails_at_creation(ctx):
                return context_id
        init = {
            "type": "init",
            "host": self._host,
            "token": self._token,
            "workspace_url": self._host.split("://", 1)[-1],
            "workspace_id": WORKSPACE_ID,
            "cluster_id": cluster_id,
            "cluster_name": cluster["cluster_name"],
            "spark_version": cluster["spark_version"],
            "shared": is_standard(cluster),
            "spark_connect": is_standard(cluster),
            "standard_py4j": self._config["standard_py4j"],
            "user": cluster.get("single_user_name") or OWNER,
            "state_dir": self._tmpdir,
            "secrets": self._secrets,
            "context_env": os.path.join(cluster_dir(self._tmpdir, cluster_id), "contexts",
                                        context_id),
        }
        if not self._clusters.runtimes_ready(cluster_id):  # Pending while it builds
            self._clusters.when_runtimes_ready(cluster_id, lambda: self._start_pending(ctx, init))
            return context_id
        try:
            init["driver_socket"] = self._driver_for(cluster_id).socket_path
            self._spawn(ctx, init)
        except Exception:
            with self._lock:
                self._contexts.pop(context_id, None)
            raise
        return context_id

    def _start_pending(self, ctx, init):
        """Start a context that waited for its cluster's runtime: it ends ``Error`` when the
        driver does not start, and is never started once closed (destroyed, cluster stopped)."""
        with self._lock:
            if ctx.closed:
                return
        try:
            init["driver_socket"] = self._driver_for(ctx.cluster_id).socket_path
            self._spawn(ctx, init)
        except Exception:
            with self._lock:
                ctx.status, ctx.dead = "Error", True
            return
        with self._lock:
            gone = ctx.closed
        if gone:  # closed while its process started
            self._reap(ctx.proc, grace=0)

    def status(self, cluster_id, context_id):
        """contexts/status: {id, status}."""
        self._clusters.get(cluster_id)
        ctx = self._live_context(cluster_id, context_id)
        with self._lock:
            return {"id": ctx.id, "status": ctx.status}

    def destroy(self, cluster_id, context_id):
        self._clusters.get(cluster_id)
        ctx = self._live_context(cluster_id, context_id)
        self._close_contexts([ctx.id])
        return ctx.id

    def execute(self, cluster_id, context_id, code, language="python"):
        """commands/execute: the new command's id; it runs after the context's earlier ones."""
        self._clusters.get(cluster_id)
        if language not in LANGUAGES:
            raise UnsupportedLanguage(language)
        ctx = self._live_context(cluster_id, context_id)
        if not isinstance(code, str):
            raise InvalidParameter("command is required")
        with self._lock:
            if ctx.dead or ctx.closed:
                raise ContextDisconnected(ctx.id)
            cmd = _Command(uuid.uuid4().hex, ctx, code, language)
            ctx.commands[cmd.id] = cmd
            ctx.queue.append(cmd)
            ctx.last_active = time.monotonic()
            ctx.cond.notify_all()
        return cmd.id

    def command_status(self, cluster_id, context_id, command_id):
        """commands/status: {id, status, results once it ended}."""
        _, cmd = self._command(cluster_id, context_id, command_id)
        with self._lock:
            answer = {"id": cmd.id, "status": cmd.status}
            if cmd.status in ("Finished", "Cancelled", "Error"):
                answer["results"] = cmd.results
            return answer

    def cancel(self, cluster_id, context_id, command_id):
        """commands/cancel: a queued command ends at once; a running one is interrupted."""
        ctx, cmd = self._command(cluster_id, context_id, command_id)
        with self._lock:
            if cmd.status in ("Finished", "Cancelled", "Error"):
                return
            if cmd.status == "Queued":
                try:
                    ctx.queue.remove(cmd)
                except ValueError:
                    pass
                else:
                    self._apply_cancel(cmd)
                    return
            cmd.cancel_requested = True
            cmd.status = "Cancelling"
            if cmd.canceller is None:
                cmd.canceller = threading.Thread(target=self._cancel_loop, args=(ctx, cmd),
                                                 name="cancel-%s" % cmd.id, daemon=True)
                cmd.canceller.start()

    def _live_context(self, cluster_id, context_id):
        """The context, or the 'disconnected' error every unknown/closed context gets."""
        with self._lock:
            ctx = self._contexts.get(context_id or "")
        if ctx is None or ctx.cluster_id != cluster_id:
            raise ContextDisconnected(context_id)
        return ctx

    def _command(self, cluster_id, context_id, command_id):
        self._clusters.get(cluster_id)
        with self._lock:
            aborted = self._shutdown_commands.get(command_id or "")
        if aborted is not None and aborted.context.id == context_id:
            return aborted.context, aborted
        ctx = self._live_context(cluster_id, context_id)
        with self._lock:
            cmd = ctx.commands.get(command_id or "")
        if cmd is None:
            raise CommandNotFound(command_id, ctx.id)
        return ctx, cmd

    # ----- the cluster's driver (one per running cluster)

    def _cluster_env(self, cluster_id, extra_path=()):
        """The environment of every process of a cluster: the runtime's Python, its version,
        and the cluster's own temp dir (nothing lands in the host's /tmp)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("DATABRICKS_")
               and k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV",
                             "PYSPARK_GATEWAY_PORT", "PYSPARK_GATEWAY_SECRET")}
        tmp = os.path.join(cluster_dir(self._tmpdir, cluster_id), "tmp")
        os.makedirs(tmp, exist_ok=True)
        runtime = self.runtime_for(cluster_id)
        runtime_bin = os.path.dirname(runtime.python)
        env.update({"DATABRICKS_RUNTIME_VERSION": runtime.version, "MPLBACKEND": "Agg",
                    "PYTHONIOENCODING": "utf-8", "TMPDIR": tmp, "TZ": SESSION_TIME_ZONE,
                    "PYSPARK_PYTHON": runtime.python,
                    "PYSPARK_DRIVER_PYTHON": runtime.python,
                    # Every JVM (spark-submit's launcher too): no /tmp/hsperfdata_<user>, and
                    # its temp files in the cluster's tmp.
                    "JAVA_TOOL_OPTIONS": "-XX:-UsePerfData -Djava.io.tmpdir=%s" % tmp,
                    "PATH": os.pathsep.join(list(extra_path) + [runtime_bin,
                                                                env.get("PATH", "")])})
        return env

    def _driver_for(self, cluster_id):
        """The cluster's driver process, started on first need (its JVM starts later)."""
        with self._driver_lock:
            with self._lock:
                existing = self._drivers.get(cluster_id)
            if existing is not None and existing.proc.poll() is None:
                return existing
            home = cluster_dir(self._tmpdir, cluster_id)
            os.makedirs(home, exist_ok=True)
            socket_path = os.path.join(home, "driver.sock")
            python = self.runtime_for(cluster_id, driver=True).python
            settings = json.dumps(self._spark_settings(cluster_id))
            argv = sandbox.wrap_command([python, "-c", DRIVER_BOOT, self._tmpdir, cluster_id,
                                         socket_path, settings], self._tmpdir, cluster_id,
                                        self._isolation)
            with open(os.path.join(home, "driver.log"), "ab") as log:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                        env=self._cluster_env(cluster_id), cwd=home,
                                        start_new_session=True)
            driver = _Driver(cluster_id, proc, socket_path)
            with self._lock:
                self._drivers[cluster_id] = driver
                self._pids.append(proc.pid)
            deadline = time.monotonic() + DRIVER_START_TIMEOUT
            while True:
                try:
                    _driver.request(socket_path, {"op": "ping"}, 1.0)
                    return driver
                except (OSError, ValueError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        self._stop_driver(cluster_id)
                        raise ClusterNotReady(cluster_id, message="the driver of cluster %s "
                                              "did not start (see %s)"
                                              % (cluster_id, os.path.join(home, "driver.log")))
                    time.sleep(0.05)

    def _spark_settings(self, cluster_id):
        """The driver's settings (``driver.py``): the Spark configuration of the cluster's
        runtime (``runtime.spark_defaults``) and its tags, and whether its Spark is a Spark
        Connect server (standard access mode). A 15.4 standard cluster's server runs on
        Spark 4.0 with 15.4's settings (ANSI off)."""
        cluster = self._clusters.get(cluster_id)
        conf = spark_defaults(self._clusters.runtime_of(cluster_id))
        conf.update({
            "spark.databricks.clusterUsageTags.clusterId": cluster_id,
            "spark.databricks.clusterUsageTags.clusterName": cluster["cluster_name"],
            "spark.databricks.clusterUsageTags.sparkVersion": cluster["spark_version"],
            "spark.databricks.workspaceUrl": self._host.split("://", 1)[-1],
        })
        return {"conf": conf, "connect": is_standard(cluster)}

    def _stop_driver(self, cluster_id):
        """Kill the cluster's driver and its JVM (one process group)."""
        with self._lock:
            driver = self._drivers.pop(cluster_id, None)
        if driver is not None:
            self._reap(driver.proc)

    def _stop_drivers(self):
        with self._lock:
            cluster_ids = list(self._drivers)
        for cluster_id in cluster_ids:
            self._stop_driver(cluster_id)

    def _cancel_spark_jobs(self, cluster_id, command_id):
        """Ask the cluster's driver to cancel the command's job group (if Spark runs)."""
        with self._lock:
            driver = self._drivers.get(cluster_id)
        if driver is None:
            return
        try:
            _driver.request(driver.socket_path, {"op": "cancel", "group": command_id},
                            DRIVER_CANCEL_TIMEOUT)
        except (OSError, ValueError):
            pass  # the interrupt below still ends the command

    # ----- context workers

    def _spawn(self, ctx, init):
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        cancel_r, cancel_w = os.pipe()
        env = self._cluster_env(ctx.cluster_id,
                                extra_path=[os.path.join(init["context_env"], "bin")])
        log_path = os.path.join(cluster_dir(self._tmpdir, ctx.cluster_id),
                                "context-%s.log" % ctx.id)
        try:
            python = self.runtime_for(ctx.cluster_id).python
            argv = sandbox.wrap_command(
                [python, "-c", WORKER_BOOT, str(req_r), str(res_w), str(cancel_r)],
                self._tmpdir, ctx.cluster_id, self._isolation)
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    argv, pass_fds=(req_r, res_w, cancel_r), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=log, env=env,
                    cwd=driver_dir(self._tmpdir, ctx.cluster_id), start_new_session=True)
        except Exception:
            for fd in (req_r, req_w, res_r, res_w, cancel_r, cancel_w):
                os.close(fd)
            raise
        for fd in (req_r, res_w, cancel_r):
            os.close(fd)
        os.set_blocking(cancel_w, False)
        with self._lock:
            ctx.proc = proc
            ctx.req = os.fdopen(req_w, "w", encoding="utf-8")
            ctx.res = os.fdopen(res_r, "r", encoding="utf-8")
            ctx.cancel_fd = cancel_w
            self._pids.append(proc.pid)
        ctx.thread = threading.Thread(target=self._run_context, args=(ctx, init),
                                      name="context-%s" % ctx.id, daemon=True)
        ctx.thread.start()

    def _cancel_loop(self, ctx, cmd):
        time.sleep(CANCEL_FIRST_SIGNAL_DELAY)
        deadline = time.monotonic() + CANCEL_KILL_AFTER
        while not self._stopping.is_set():
            with self._lock:
                if ctx.current is not cmd or ctx.dead or ctx.closed:
                    return
                try:    # first, so the command ends Cancelled however its code ends from here on
                    os.write(ctx.cancel_fd, (cmd.id + "\n").encode())
                except OSError:
                    pass
            # Spark next: its cancelled jobs end a blocked Spark call with an error.
            self._cancel_spark_jobs(ctx.cluster_id, cmd.id)
            with self._lock:
                if ctx.current is not cmd or ctx.dead or ctx.closed:
                    return
                try:
                    os.kill(ctx.proc.pid, signal.SIGINT)
                except OSError:
                    return
            if time.monotonic() > deadline:
                # The user code swallows every interrupt: give up on the REPL, as a real
                # cluster does when it has to restart the Python process.
                self._signal_group(ctx.proc, signal.SIGKILL)
                return
            time.sleep(CANCEL_RESEND_INTERVAL)

    def _apply_cancel(self, cmd):
        if self._config["cancel_mode"] == "finished_error":
            cmd.status = "Finished"
            cmd.results = {
                "resultType": "error",
                "summary": "<span class='ansi-red-fg'>CommandCancelledException</span>: "
                           "Command cancelled",
                "cause": CANCELLED_CAUSE,
            }
        else:
            cmd.status = "Cancelled"
            cmd.results = {"resultType": "error", "summary": "Command cancelled",
                           "cause": CANCELLED_CAUSE}

    def _run_context(self, ctx, init):
        """Feed the context's queue to its worker, one command at a time."""
        try:
            ctx.req.write(json.dumps(init) + "\n")
            ctx.req.flush()
            ready = ctx.res.readline()
            if not ready:
                return self._worker_gone(ctx)
            with self._lock:
                if ctx.closed:
                    return
                ctx.status = "Running"
                ctx.last_active = time.monotonic()  # idle from when it is ready
            while True:
                with ctx.cond:
                    while not ctx.queue and not ctx.closed:
                        ctx.cond.wait()
                    if ctx.closed:
                        return
                    cmd = ctx.queue.popleft()
                    cmd.status = "Running"
                    ctx.current = cmd
                    message = {"type": "exec", "id": cmd.id, "code": cmd.code,
                               "language": cmd.language,
                               "limits": {"image_inline_limit": self._config["image_inline_limit"],
                                          "plots_dir": self.plots_dir,
                                          "plots_mode": self._config["plots_mode"],
                                          "pip_restarts": self._config["pip_restarts"]}}
                ctx.req.write(json.dumps(message) + "\n")
                ctx.req.flush()
                line = ctx.res.readline()
                if not line:
                    return self._worker_gone(ctx)
                reply = json.loads(line)
                with self._lock:
                    ctx.current = None
                    ctx.last_active = time.monotonic()
                    if reply.get("cancelled"):
                        self._apply_cancel(cmd)
                    else:
                        cmd.status = "Finished"
                        cmd.results = self._shape_results(reply.get("results"),
                                                          self._clusters.runtime_of(ctx.cluster_id))
                if reply.get("restart"):
                    return self._restart_python(ctx, init)
        except (OSError, ValueError):
            return self._worker_gone(ctx)
        finally:
            self._release_pipes(ctx)

    def _worker_gone(self, ctx):
        with self._lock:
            if ctx.closed:
                return
            ctx.dead = True
            ctx.status = "Error"
            cmd, ctx.current = ctx.current, None
            if cmd is not None:
                if cmd.cancel_requested:
                    self._apply_cancel(cmd)
                else:
                    cmd.status = "Finished"
                    cmd.results = {
                        "resultType": "error",
                        "summary": "<span class='ansi-red-fg'>Fatal error</span>: The Python "
                                   "kernel is unresponsive.",
                        "cause": _exit_description(ctx.proc.poll()),
                    }
            for queued in ctx.queue:
                queued.status = "Error"
                queued.results = {"resultType": "error",
                                  "summary": "Context ExecutionContextId(%s) is disconnected."
                                             % ctx.id,
                                  "cause": "The Python process of this context exited."}
            ctx.queue.clear()
        self._reap(ctx.proc, grace=0)

    def _shape_results(self, results, version):
        """A command's results as the cluster's runtime returns them: text past the output
        limit of ``version``'s runtime (``_over_the_text_limit``), anything but a table past
        the 20 MB RPC limit an error."""
        if not isinstance(results, dict):
            return results
        if results.get("resultType") == "text":
            results = self._over_the_text_limit(results, version)
        elif results.get("resultType") != "table":
            size = len(json.dumps(results))
            if size > MAX_NON_TABLE_BYTES:
                results = {"resultType": "error",
                           "summary": "<span class='ansi-red-fg'>SparkException</span>: rpc "
                                      "response (of %d bytes) exceeds limit of %d bytes"
                                      % (size, MAX_NON_TABLE_BYTES),
                           "cause": "org.apache.spark.SparkException: rpc response (of %d bytes) "
                                    "exceeds limit of %d bytes" % (size, MAX_NON_TABLE_BYTES)}
        return results

    def _over_the_text_limit(self, results, version):
        """Text output past the runtime's limit (notebook-limitations, S16):

        * DBR 17.0 and above: a cell's output is cut at ``cell_output_mb`` MB (default 10,
          ``%set_cell_max_output_size_in_mb`` takes 1 to 20), "truncated to fit within the
          limit"; here its head is kept, with ``truncated: true`` (how a real cut keeps "as much
          useful output as possible", and whether it sets the flag, is UNVERIFIED);
        * DBR 16.4 and below: text results of at most ``output_limit`` characters (default
          50,000, ``spark.databricks.driver.maxReplOutputLength``), cut to their head with
          ``truncated: true`` (``output_overflow="truncate"``, the default: "text results
          return a maximum of 50,000 characters" in the docs old and new); the current docs
          also say a notebook's output over its limit is "completely discarded"
          (``"discard"``: the text is replaced by the warning a notebook shows)."""
        data = results.get("data") or ""
        if version and at_least(version, "17.0"):
            limit = min(self._config["cell_output_mb"] * 1024 * 1024, MAX_NON_TABLE_BYTES)
            encoded = data.encode("utf-8")
            if len(encoded) <= limit:
                return results
            return dict(results, data=encoded[:limit].decode("utf-8", "ignore"), truncated=True)
        limit = min(self._config["output_limit"], MAX_NON_TABLE_BYTES)
        if len(data) <= limit:
            return results
        if self._config["output_overflow"] == "discard":
            return {"resultType": "text", "data": OUTPUT_DISCARDED}
        return dict(results, data=data[:limit], truncated=True)

    def _close_contexts(self, context_ids, grace=0.0):
        """Evict/destroy: forget the contexts (and their commands), kill the processes."""
        closed = []
        with self._lock:
            for context_id in context_ids:
                ctx = self._contexts.pop(context_id, None)
                if ctx is None:
                    continue
                ctx.closed = True
                ctx.cond.notify_all()
                closed.append(ctx)
                self._abort_for_shutdown(ctx)
        procs = [c.proc for c in closed if c.proc is not None]
        if grace:
            for proc in procs:
                self._signal_group(proc, signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end and any(_exited(p) is False for p in procs):
                time.sleep(0.02)
        for proc in procs:
            self._reap(proc, grace=0)
        for ctx in closed:
            if ctx.thread is not None and ctx.thread is not threading.current_thread():
                ctx.thread.join(5)
            # Notebook-scoped libraries end with their REPL, as on a cluster.
            shutil.rmtree(os.path.join(cluster_dir(self._tmpdir, ctx.cluster_id), "contexts",
                                       ctx.id), ignore_errors=True)

    @staticmethod
    def _signal_group(proc, signum):
        """Signal the worker's whole process group (Spark's JVM, %sh children, pip...).

        Only while Popen has not reaped the worker: until then its pid (= the group id)
        cannot be reused by an unrelated process."""
        if proc.returncode is not None:
            return
        try:
            os.killpg(proc.pid, signum)
        except OSError:
            try:
                proc.send_signal(signum)
            except OSError:
                pass

    def _reap(self, proc, grace=0):
        if proc is None:
            return
        self._signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def _release_pipes(self, ctx):
        with self._lock:
            files = (ctx.req, ctx.res)
            fd, ctx.cancel_fd = ctx.cancel_fd, None
        for f in files:
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    # ----- the awkward parts of a context's life: limit, faults, shutdown, Python restarts

    def _evict_lru_idle_at_limit(self, cluster_id):
        """At the context limit, evict the least recently used idle context of the cluster.

        Real clusters do this (S6: "idle contexts are evicted LRU first" when the limit is
        reached), unless idle-context tracking is off (``idle_context_tracking=False``, the
        switch behind ``spark.databricks.chauffeur.enableIdleContextTracking``). When no context
        is idle, nothing is evicted and ``contexts/create`` refuses."""
        with self._lock:
            if not self._config["idle_context_tracking"]:
                return
            live = [c for c in self._contexts.values()
                    if c.cluster_id == cluster_id and not c.dead]
            if len(live) < self._config["context_limit"]:
                return
            idle = [c for c in live if c.current is None and not c.queue and c.status == "Running"]
            if not idle:
                return
            victim = min(idle, key=lambda c: c.last_active)
        self._close_contexts([victim.id])

    def _fails_at_creation(self, ctx):
        """``context_error_next=N``: the next N new contexts end in status ``Error`` with no
        process, as contexts do under heavy cluster load (dbt-databricks PR #1243: S11)."""
        if not self._config.take("context_error_next"):
            return False
        ctx.status = "Error"
        ctx.dead = True
        return True

    def _abort_for_shutdown(self, ctx):
        """The context is shutting down: its running and queued commands end ``Finished`` with
        the CommandCancelledException of ``ExecContextState.shutdown`` (S4, S5), and their
        status stays readable after the context is gone. Called with the lock held.
        ``shutdown_aborts_commands=False``: they vanish with the context instead (every later
        status call answers "disconnected")."""
        if not self._config["shutdown_aborts_commands"]:
            return
        doomed = ([ctx.current] if ctx.current is not None else []) + list(ctx.queue)
        ctx.queue.clear()
        ctx.current = None
        for cmd in doomed:
            cmd.status = "Finished"
            cmd.results = {"resultType": "error",
                           "summary": "<span class='ansi-red-fg'>CommandCancelledException</span>",
                           "cause": SHUTDOWN_CAUSE}
            self._shutdown_commands[cmd.id] = cmd

    def _restart_python(self, ctx, init):
        """The worker answered a command that restarts Python, and exits. For ``restart_window``
        seconds the context has no interpreter: commands sent to it end ``Finished`` with the
        "jupyter client is not available ... kernel may be restarting" error result (S27).
        Then a fresh interpreter serves the same context id: variables and helpers are gone."""
        old_thread, old_proc = threading.current_thread(), ctx.proc
        window = self._config["restart_window"]

        def restart():
            old_thread.join(5)  # its pipes are released first
            self._reap(old_proc, grace=0)
            deadline = time.monotonic() + window
            with self._lock:
                while not ctx.closed and not self._stopping.is_set():
                    for cmd in ctx.queue:
                        cmd.status = "Finished"
                        cmd.results = {"resultType": "error",
                                       "summary": "<span class='ansi-red-fg'>"
                                                  "IllegalStateException</span>: jupyter client "
                                                  "is not available",
                                       "cause": KERNEL_RESTARTING}
                    ctx.queue.clear()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    ctx.cond.wait(left)
                if ctx.closed or self._stopping.is_set():
                    return
                ctx.status = "Pending"
            self._spawn(ctx, init)
            with self._lock:
                gone = ctx.closed
            if gone:  # closed while the new interpreter started
                self._reap(ctx.proc, grace=0)

        threading.Thread(target=restart, name="restart-%s" % ctx.id, daemon=True).start()

    def _janitor_loop(self):
        while not self._stopping.wait(0.2):
            with self._lock:
                ttl = self._config["idle_ttl"]
                if ttl is None:
                    continue
                now = time.monotonic()
                idle = [c.id for c in self._contexts.values()
                        if c.status == "Running" and c.current is None and not c.queue
                        and now - c.last_active > ttl]
            if idle:
                self._close_contexts(idle)



def _exit_description(returncode):
    """How a cluster reports a Python process that died under a command: "The Python process
    exited with exit code 134 (SIGABRT: Aborted)." (pasted in pymssql #893 and
    insanely-fast-whisper #257)."""
    if returncode is not None and returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
            meaning = signal.strsignal(number) or name
        except ValueError:
            name, meaning = "SIG%d" % number, "signal %d" % number
        return ("The Python process exited with exit code %d (%s: %s)."
                % (128 + number, name, meaning.split(":")[0]))
    return "The Python process exited with exit code %s." % returncode


def _exited(proc):
    """Has the worker exited? (without reaping it, so its group can still be signalled)"""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


