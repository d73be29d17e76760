"""The local workspace: ``LocalWorkspace`` puts the wire layer and the backends together.

An HTTP server on 127.0.0.1 that speaks the REST endpoints databricks-repl uses. The parts:

* the wire layer: ``wire.py`` (HTTP/1.1 server, auth, injected faults, latency, request log,
  domain errors -> HTTP answers) and ``routes.py`` (the route table and its handlers, the control
  API under ``/_local/...`` among them);
* the backends, each with its own state and lock, all reading one ``config.Config``:
  ``clusters.Clusters`` (records, lifecycle, events), ``contexts.Contexts`` (execution contexts,
  commands, their processes and the clusters' drivers), ``files.Files`` (DBFS, Files, Workspace,
  libraries, the current user) and ``serving.Serving`` (model serving).

``LocalWorkspace`` is the Python control API tests use. See ``tests/local_workspace/README.md``.
"""

import argparse
import json
import os
import shutil
import signal
import tempfile
import threading

from . import paths, sandbox
from .clusters import (DEDICATED_CLUSTER_ID, JOB_CLUSTER_ID,  # noqa: F401  (re-exported)
                       RUNNING_CLUSTER_ID, SHARED_CLUSTER_ID, SPARK_VERSION, STANDARD_CLUSTER_ID,
                       TERMINATED_CLUSTER_ID, Clusters, default_runtimes)
from .config import Config
from .contexts import Contexts
from .files import Files
from .routes import ROUTES
from .serving import Serving, chat_answer  # noqa: F401  (chat_answer is re-exported)
from .wire import HttpServer, Wire


class LocalWorkspace:
    """The local workspace server. ``start()``, use ``host``/``token``, ``stop()``."""

    def __init__(self, token="local-token", secrets=None, isolation="auto", **settings):
        """``secrets``: ``{"scope": {"key": "value"}}`` for dbutils.secrets. ``isolation``:
        "auto" (each cluster's processes in their own file system view where the OS allows) or
        "none" (the host's view; driver paths refused); see sandbox.py. Any other keyword is a
        ``configure`` setting (config.DEFAULTS: output_limit, context_limit, cancel_mode, ...)."""
        if isolation not in sandbox.ISOLATION_MODES:
            raise ValueError("isolation must be one of %s" % (sandbox.ISOLATION_MODES,))
        self.token = token
        self.host = None
        self.port = None
        self._tmpdir = None
        self._config = Config(**settings)
        secrets = {str(scope): {str(k): str(v) for k, v in keys.items()}
                   for scope, keys in (secrets or {}).items()}
        self.clusters = Clusters(self._config)
        self.contexts = Contexts(self._config, self.clusters, secrets, isolation)
        self.files = Files(self.clusters)
        self.serving = Serving(self._config)
        self._wire = Wire(ROUTES, self, token, self._config)
        self._server = None
        self._server_thread = None

    # ----- lifecycle

    def start(self, port=0):
        self._tmpdir = tempfile.mkdtemp(prefix="local-workspace-")
        for root in paths.SHARED_ROOTS:
            os.makedirs(os.path.join(self._tmpdir, root), exist_ok=True)
        self._server = HttpServer(("127.0.0.1", port), self._wire)
        self.port = self._server.server_address[1]
        self.host = "http://127.0.0.1:%d" % self.port
        try:
            self.files.start(self._tmpdir)
            self.contexts.start(self._tmpdir, self.host, self.token)
        except BaseException:  # nothing of a failed start stays behind
            self._server.server_close()
            self._server = None
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name="local-workspace-http", daemon=True)
        self._server_thread.start()
        return self

    def stop(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._server_thread.join(5)
        self.clusters.stop()
        self.contexts.stop()
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self):
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # ----- Python control API

    def configure(self, **settings):
        """Change settings (any constructor setting); the new settings."""
        return self._config.update(**settings)

    @property
    def config(self):
        return self._config.snapshot()

    @property
    def plots_dir(self):
        return self.contexts.plots_dir

    def evict(self, context_id=None):
        """Close one context or all of them; the ids evicted."""
        return self.contexts.evict(context_id)

    def set_cluster_state(self, cluster_id, state, message=None, reason=None):
        """Any cluster state; leaving RUNNING/RESIZING ends its contexts and its driver.
        ``reason``: a TERMINATED cluster's ``termination_reason`` (default: a user's request)."""
        self.clusters.set_state(cluster_id, state, message, reason)

    def inject(self, path, **rule):
        """An injected fault: see ``wire.Wire.inject`` (method, count, status, retry_after,
        body, mode)."""
        return self._wire.inject(path, **rule)

    def throttle(self, path, **rule):
        """REQUEST_LIMIT_EXCEEDED, unprocessed: see ``wire.Wire.throttle`` (method, count,
        http_429)."""
        return self._wire.throttle(path, **rule)

    def clear_injections(self):
        """Forget every injected fault not yet used."""
        self._wire.clear_injections()

    def events(self, cluster_id=None):
        """What happened to the clusters, oldest first: [{cluster_id, timestamp, type, details}]."""
        return self.clusters.events(cluster_id)

    def requests(self):
        """[{method, path, query, status, dropped, ts}] of every API request (not /_local/)."""
        return self._wire.requests()

    def connections(self):
        """How many connections the server has accepted (keep-alive: one per client, ideally)."""
        return self._server.accepted if self._server is not None else 0

    def context_pids(self):
        return self.contexts.pids()

    def all_pids(self):
        return self.contexts.all_pids()

    def driver_pids(self):
        """{cluster id: pid} of the running clusters' drivers."""
        return self.contexts.driver_pids()

    def spark_jobs(self, cluster_id):
        """The ids of the Spark jobs running on the cluster now (its driver's status tracker);
        None while its Spark has not started."""
        return self.contexts.spark_jobs(cluster_id)

    # tests/benchmark.py reads the drivers this way (cluster_rss); driver_pids() is the API.
    @property
    def _lock(self):
        return self.contexts._lock

    @property
    def _drivers(self):
        return self.contexts._drivers


# ------------------------------------------------------------------ CLI

def _serve(args):
    secrets = None
    if args.secrets:
        with open(args.secrets, encoding="utf-8") as f:
            secrets = json.load(f)
        if not isinstance(secrets, dict) or not all(isinstance(v, dict)
                                                    for v in secrets.values()):
            raise SystemExit('--secrets: expected a JSON object {"scope": {"key": "value"}}')
    ws = LocalWorkspace(token=args.token, secrets=secrets, latency_ms=args.latency_ms)
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    evictions = threading.Event()

    def on_evict(signum, frame):
        evictions.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_evict)
    ws.start(port=args.port)
    print("# Local Databricks workspace on %s (Ctrl+C to stop)" % ws.host)
    print("# kill -USR1 %d evicts every execution context, as a cluster does with idle ones" % os.getpid())
    print("export DATABRICKS_HOST=%s" % ws.host)
    print("export DATABRICKS_TOKEN=%s" % ws.token)
    for c in ws.clusters.all():
        print("# cluster %s  %-22s %-10s %s %s" % (c["cluster_id"], c["cluster_name"], c["state"],
                                                   c["cluster_source"], c["data_security_mode"]))
    print("export DATABRICKS_CLUSTER_ID=%s" % RUNNING_CLUSTER_ID, flush=True)
    try:
        while not stop.wait(0.2):
            if evictions.is_set():
                evictions.clear()
                ws.evict()
                print("# evicted every execution context", flush=True)
    finally:
        ws.stop()
        print("# stopped", flush=True)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="A local Databricks workspace for databricks-repl")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve until Ctrl+C")
    serve.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: free)")
    serve.add_argument("--token", default="local-token", help="the PAT clients must send")
    serve.add_argument("--secrets", metavar="FILE",
                       help='JSON {"scope": {"key": "value"}} for dbutils.secrets')
    serve.add_argument("--latency-ms", type=int, default=0, metavar="N",
                       help="delay every API answer by N ms, as a real round trip does")
    sub.add_parser("runtime", add_help=False,
                   help="build (or check) Databricks Runtime environments (--version V, --all)")
    args, rest = parser.parse_known_args(argv)
    if args.command == "runtime":
        from .runtime import main as runtime_main
        return runtime_main(rest, default_versions=default_runtimes())
    return _serve(parser.parse_args(argv))
