"""The HTTP server and its routes: the REST surface of the local workspace.

An HTTP server on 127.0.0.1 that speaks the REST endpoints databricks-repl uses: the Command
Execution API 1.2 (``cluster.ExecutionContexts``: every execution context is a real Python
process, ``worker.py``), clusters list/get/start/restart/events, DBFS, Files and Workspace over
the state directory (``files.WorkspaceFiles``), and model serving (``serving.ModelServing``).
A control API under ``/_local/...`` lets tests evict contexts, change settings (the switches of
the real service's awkward behaviours among them), flip cluster states, inject failures and
throttle. See ``references/local-workspace.md``.
"""

import argparse
import base64
import collections
import hmac
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from . import paths, sandbox
from .cluster import CANCEL_MODES, OWNER, RUNNABLE_STATES, ExecutionContexts
from .errors import ApiError, param_error as _param_error
from .files import RawBody, WorkspaceFiles, parse_multipart
from .runtime import ClusterRuntimes, runtime_version, spark_version_of
from .serving import ModelServing, chat_answer  # noqa: F401  (chat_answer is re-exported)

RUNNING_CLUSTER_ID = "0101-000001-devrun01"
TERMINATED_CLUSTER_ID = "0101-000002-prodoff2"
JOB_CLUSTER_ID = "0101-000003-jobrun03"
SHARED_CLUSTER_ID = "0101-000004-shared04"
DEDICATED_CLUSTER_ID = "0101-000005-dedic173"  # 17.3 LTS, dedicated access mode
STANDARD_CLUSTER_ID = "0101-000006-stand173"  # 17.3 LTS, standard access mode

SPARK_VERSION = spark_version_of("15.4")  # RUNNING_CLUSTER_ID's

CLUSTER_STATES = ("PENDING", "RUNNING", "RESTARTING", "RESIZING", "TERMINATING", "TERMINATED",
                  "ERROR", "UNKNOWN")

DEFAULTS = {
    "output_limit": 50_000,
    "context_limit": 145,
    "idle_ttl": None,
    "cancel_mode": "cancelled",
    "not_running_mode": "error",
    "start_delay": 2.0,
    "llm_latency": 0.0,
    "image_inline_limit": 512 * 1024,
    # The awkward behaviours of the real service (references/local-workspace.md, "Behaviours"):
    "plots_mode": "repr",
    "pip_restarts": False,
    "restart_window": 2.0,
    "ready_delay": 1.0,
    "idle_context_tracking": True,
    "shutdown_aborts_commands": True,
    "context_error_next": 0,
    "latency_ms": 0,
}
NOT_RUNNING_MODES = ("error", "not_ready")
PLOTS_MODES = ("repr", "images")
# While a cluster is in one of these states, the 1.2 API answers ClusterNotReadyException.
STARTING_STATES = ("PENDING", "RESTARTING")


# ------------------------------------------------------------------ HTTP plumbing

class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a burst of parallel sub_llm calls overflowed it
    # (connection resets, 1 s SYN retries). The real service accepts many concurrent connections.
    request_queue_size = 128

    def __init__(self, address, workspace):
        self.workspace = workspace
        self._conns = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self):
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "LocalDatabricks/1.0"
    # Headers and body go out in two writes; with Nagle on, a keep-alive connection stalls ~40 ms
    # on the client's delayed ACK before the body. The real service has no such per-call stall.
    disable_nagle_algorithm = True

    def log_message(self, fmt, *args):  # keep test output clean
        pass

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_HEAD(self):
        self._handle("HEAD")

    def _handle(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        status, body, headers, drop = self.server.workspace._dispatch(
            method, self.path, raw, self.headers)
        if drop:
            self.close_connection = True
            return
        if isinstance(body, RawBody):
            data, content_type = body.data, body.content_type
        else:
            data = b"" if body is None else json.dumps(body).encode("utf-8")
            content_type = "application/json"
        if self.command == "HEAD":
            headers = dict(headers, **{"Content-Length": len(data)})
            data = b""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, str(value))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


# ------------------------------------------------------------------ the workspace

class LocalWorkspace(ExecutionContexts, ModelServing, WorkspaceFiles, ClusterRuntimes):
    """The local workspace server. ``start()``, use ``host``/``token``, ``stop()``."""

    def __init__(self, token="local-token", output_limit=50_000, context_limit=145,
                 idle_ttl=None, cancel_mode="cancelled", not_running_mode="error",
                 start_delay=2.0, llm_latency=0.0, image_inline_limit=512 * 1024, secrets=None,
                 isolation="auto", **settings):
        """``secrets``: ``{"scope": {"key": "value"}}`` for dbutils.secrets. ``isolation``:
        "auto" (each cluster's processes in their own file system view where the OS allows) or
        "none" (the host's view; driver paths refused); see sandbox.py."""
        self.token = token
        self._secrets = {str(scope): {str(k): str(v) for k, v in keys.items()}
                         for scope, keys in (secrets or {}).items()}
        if isolation not in sandbox.ISOLATION_MODES:
            raise ValueError("isolation must be one of %s" % (sandbox.ISOLATION_MODES,))
        self._isolation = isolation
        self.host = None
        self.port = None
        self._config = dict(DEFAULTS)
        self._lock = threading.RLock()
        self.configure(output_limit=output_limit, context_limit=context_limit,
                       idle_ttl=idle_ttl, cancel_mode=cancel_mode,
                       not_running_mode=not_running_mode, start_delay=start_delay,
                       llm_latency=llm_latency, image_inline_limit=image_inline_limit, **settings)
        self._contexts = {}
        self._drivers = {}  # cluster id -> cluster._Driver (one Spark driver per running cluster)
        self._driver_lock = threading.Lock()
        self._runtime_threads = []  # runtime.ClusterRuntimes: builds under way
        self._runtime_locks = {}
        self._clusters = _default_clusters()
        self._injections = []
        self._requests = []
        self._pids = []
        self._timers = []
        self._rate_limit_seen = collections.Counter()
        self._shutdown_commands = {}  # command id -> command aborted by its context's shutdown
        self._dbfs_streams = {}  # dbfs/create handle -> host path, until dbfs/close
        self._dbfs_last_handle = 0
        self._events = []  # clusters/events: {cluster_id, timestamp, type, details}, oldest first
        self._ready_at = {}  # cluster id -> time.monotonic() when the 1.2 API serves it again
        for cluster in self._clusters.values():  # each default cluster's history so far
            history = ["CREATING", "RUNNING"] + (["TERMINATING"] if cluster["state"] == "TERMINATED"
                                                 else [])
            for minute, event_type in enumerate(history):
                self._record_event(cluster["cluster_id"], event_type,
                                   {"user": OWNER} if event_type == "CREATING" else {},
                                   timestamp=cluster["start_time"] + minute * 60_000)
        self._server = None
        self._server_thread = None
        self._janitor = None
        self._stopping = threading.Event()
        self._tmpdir = None
        self.plots_dir = None

    # ----- lifecycle

    def start(self, port=0):
        # Each cluster's runtime is built on its first start, not here (runtime.py).
        self._tmpdir = tempfile.mkdtemp(prefix="local-workspace-")
        # Plots live in the FileStore of the DBFS root, as on a workspace (S24).
        self.plots_dir = paths.host_path(self._tmpdir, None, "dbfs:/FileStore/plots")
        os.makedirs(self.plots_dir)
        for root in paths.SHARED_ROOTS:
            os.makedirs(os.path.join(self._tmpdir, root), exist_ok=True)
        self._server = _Server(("127.0.0.1", port), self)
        self.port = self._server.server_address[1]
        self.host = "http://127.0.0.1:%d" % self.port
        self._server_thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name="local-workspace-http", daemon=True)
        self._server_thread.start()
        self._janitor = threading.Thread(target=self._janitor_loop, name="local-workspace-janitor",
                                         daemon=True)
        self._janitor.start()
        return self

    def stop(self):
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_connections()
            self._server_thread.join(5)
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._end_runtime_builds()
        self._close_contexts(list(self._contexts), grace=0.5)
        self._stop_drivers()
        if self._janitor is not None:
            self._janitor.join(5)
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
        unknown = set(settings) - set(DEFAULTS)
        if unknown:
            raise ValueError("unknown setting(s): %s" % ", ".join(sorted(unknown)))
        if "cancel_mode" in settings and settings["cancel_mode"] not in CANCEL_MODES:
            raise ValueError("cancel_mode must be one of %s" % (CANCEL_MODES,))
        if ("not_running_mode" in settings
                and settings["not_running_mode"] not in NOT_RUNNING_MODES):
            raise ValueError("not_running_mode must be one of %s" % (NOT_RUNNING_MODES,))
        if "plots_mode" in settings and settings["plots_mode"] not in PLOTS_MODES:
            raise ValueError("plots_mode must be one of %s" % (PLOTS_MODES,))
        for key in ("pip_restarts", "idle_context_tracking", "shutdown_aborts_commands"):
            if key in settings and not isinstance(settings[key], bool):
                raise ValueError("%s must be true or false" % key)
        for key in ("output_limit", "context_limit", "image_inline_limit", "context_error_next",
                    "latency_ms"):
            if key in settings and (not isinstance(settings[key], int) or settings[key] < 0):
                raise ValueError("%s must be a non-negative integer" % key)
        for key in ("idle_ttl", "start_delay", "llm_latency", "restart_window", "ready_delay"):
            if key in settings and settings[key] is not None:
                settings[key] = float(settings[key])
        with self._lock:
            self._config.update(settings)
            return dict(self._config)

    @property
    def config(self):
        with self._lock:
            return dict(self._config)

    def evict(self, context_id=None):
        with self._lock:
            ids = list(self._contexts) if context_id is None else [context_id]
            ids = [i for i in ids if i in self._contexts]
        self._close_contexts(ids)
        return ids

    def set_cluster_state(self, cluster_id, state, message=None, reason=None):
        """``reason``: a TERMINATED cluster's ``termination_reason`` (default: a user's
        request)."""
        if state not in CLUSTER_STATES:
            raise ValueError("unknown cluster state %r" % state)
        with self._lock:
            cluster = self._clusters.get(cluster_id)
            if cluster is None:
                raise KeyError(cluster_id)
            cluster["state"] = state
            cluster["state_message"] = message if message is not None else _state_message(state)
            now = _now_ms()
            if state == "TERMINATED":
                cluster["terminated_time"] = now
                cluster["termination_reason"] = reason or {
                    "code": "USER_REQUEST", "type": "SUCCESS", "parameters": {"username": OWNER}}
            elif state == "RUNNING":
                cluster.pop("termination_reason", None)
                cluster["last_restarted_time"] = now
                self._ready_at[cluster_id] = time.monotonic() + self._config["ready_delay"]
            self._record_event(cluster_id, _EVENT_OF_STATE.get(state, state),
                               _event_details(cluster, state))
            doomed = [] if state in RUNNABLE_STATES else [
                c.id for c in self._contexts.values() if c.cluster_id == cluster_id]
        self._close_contexts(doomed)
        if state not in RUNNABLE_STATES:  # the driver (and its JVM) goes with the cluster
            self._stop_driver(cluster_id)

    def inject(self, path, method="POST", count=1, status=503, retry_after=1, body=None,
               mode="respond"):
        if mode not in ("respond", "drop_before", "drop_after"):
            raise ValueError("mode must be respond, drop_before or drop_after")
        if body is None:
            body = _default_error_body(status)
        rule = {"path": path, "method": method.upper() if method else None, "count": int(count),
                "status": int(status), "retry_after": retry_after, "body": body, "mode": mode}
        with self._lock:
            self._injections.append(rule)
        return dict(rule)

    def throttle(self, path, method="POST", count=1, http_429=True):
        """The next ``count`` matching requests answer ``REQUEST_LIMIT_EXCEEDED``, unprocessed.

        ``http_429=True``: 429 with ``Retry-After: 1`` (the SDK waits and retries).
        ``http_429=False``: 400 with no Retry-After and the "RPC token bucket limit has been
        exceeded" message the platform sends without a 429 (sdk-py #274, PR #395: S33); the SDK
        retries that message too. Returns the injection rule."""
        if http_429:
            return self.inject(path, method=method, count=count, status=429, retry_after=1)
        name = "".join(p.capitalize() for p in re.split(r"[/\-_.]", path.rsplit("/", 2)[-1]) if p)
        body = {"error_code": "REQUEST_LIMIT_EXCEEDED",
                "message": "%sRequest RPC token bucket limit has been exceeded." % name}
        return self.inject(path, method=method, count=count, status=400, retry_after=None,
                           body=body)

    def events(self, cluster_id=None):
        """What happened to the clusters, oldest first: [{cluster_id, timestamp, type, details}]."""
        with self._lock:
            return [dict(e) for e in self._events
                    if cluster_id is None or e["cluster_id"] == cluster_id]

    def requests(self):
        with self._lock:
            return [dict(r) for r in self._requests]

    def context_pids(self):
        with self._lock:
            return {c.id: c.proc.pid for c in self._contexts.values()
                    if c.proc is not None and not c.dead}

    def all_pids(self):
        with self._lock:
            return list(self._pids)

    # ----- request dispatch

    def _dispatch(self, method, raw_path, raw_body, headers):
        parts = urlsplit(raw_path)
        path = unquote(parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        started = time.time()
        drop = False
        extra_headers = {}
        try:
            if path == "/.well-known/databricks-config" and method == "GET":
                status, body = 200, {}
            else:
                self._check_auth(headers)
                rule = None if path.startswith("/_local/") else self._take_injection(method, path)
                if rule is not None and rule["mode"] == "drop_before":
                    status, body, drop = 0, None, True
                elif rule is not None and rule["mode"] == "respond":
                    status, body = rule["status"], rule["body"]
                    if rule["retry_after"] is not None:
                        extra_headers["Retry-After"] = str(rule["retry_after"])
                else:
                    content_type = headers.get("Content-Type") or ""
                    if self._takes_raw_body(method, path):
                        payload = raw_body
                    elif content_type.startswith("multipart/form-data"):
                        payload = parse_multipart(raw_body, content_type)
                    else:
                        payload = _parse_body(raw_body)
                    status, body, extra_headers = self._route(method, path, query, payload)
                    if rule is not None:  # drop_after: processed, but never answered
                        drop = True
        except ApiError as e:
            status, body, extra_headers = e.status, e.body, e.headers
        except Exception as e:  # a bug here must still answer like a server would
            status, body = 500, {"error_code": "INTERNAL_ERROR",
                                 "message": "%s: %s" % (type(e).__name__, e)}
        if not path.startswith("/_local/"):
            latency_ms = self.config["latency_ms"]
            if latency_ms:
                time.sleep(latency_ms / 1000.0)  # a real round trip (--latency-ms)
            entry = {"method": method, "path": path, "query": _loggable_query(query),
                     "status": None if drop else status, "dropped": drop, "ts": started}
            with self._lock:
                self._requests.append(entry)
        return status, body, extra_headers, drop

    def _check_auth(self, headers):
        value = headers.get("Authorization") or ""
        if not value.startswith("Bearer ") or not value[7:].strip():
            raise ApiError(401, {"error_code": "UNAUTHENTICATED",
                                 "message": "Credential was not sent or was of an unsupported "
                                            "type for this API."})
        if not hmac.compare_digest(value[7:].strip().encode(), self.token.encode()):
            raise ApiError(403, {"error_code": "PERMISSION_DENIED",
                                 "message": "Invalid access token."})

    def _take_injection(self, method, path):
        with self._lock:
            for rule in self._injections:
                if rule["count"] > 0 and rule["path"] == path and rule["method"] in (None, method):
                    rule["count"] -= 1
                    return dict(rule)
            self._injections = [r for r in self._injections if r["count"] > 0]
        return None

    def _route(self, method, path, query, body):
        if path.startswith("/_local/"):
            return self._control(method, path, body)
        if path.startswith("/api/2.0/clusters/") or path.startswith("/api/2.1/clusters/"):
            return self._clusters_api(method, path[len("/api/2.x/clusters/"):], query, body)
        if path.startswith("/api/1.2/"):
            self._check_1_2_request(path, _flat(query) if method == "GET" else body)
        files_answer = self._files_route(method, path, query, body)
        if files_answer is not None:
            return files_answer
        handler = {
            ("POST", "/api/1.2/contexts/create"): self._contexts_create,
            ("GET", "/api/1.2/contexts/status"): self._contexts_status,
            ("POST", "/api/1.2/contexts/destroy"): self._contexts_destroy,
            ("POST", "/api/1.2/commands/execute"): self._commands_execute,
            ("GET", "/api/1.2/commands/status"): self._commands_status,
            ("POST", "/api/1.2/commands/cancel"): self._commands_cancel,
            ("GET", "/api/2.0/serving-endpoints"): self._serving_list,
        }.get((method, path))
        if handler is not None:
            args = _flat(query) if method == "GET" else body
            return 200, handler(args), {}
        match = re.fullmatch(r"/serving-endpoints/([^/]+)/invocations", path)
        if match and method == "POST":
            return self._serving_invoke(match.group(1), body)
        match = re.fullmatch(r"/api/2\.0/serving-endpoints/([^/]+)", path)
        if match and method == "GET":
            return 200, self._serving_get(match.group(1)), {}
        raise ApiError(404, {"error_code": "ENDPOINT_NOT_FOUND",
                             "message": "No API found for '%s %s'" % (method, path)})

    # ----- control API over HTTP

    def _control(self, method, path, body):
        if method == "POST" and path == "/_local/evict":
            return 200, {"evicted": self.evict(body.get("context_id"))}, {}
        if method == "POST" and path == "/_local/config":
            try:
                return 200, {"config": self.configure(**body)}, {}
            except (ValueError, TypeError) as e:
                raise _param_error(str(e))
        if method == "POST" and path == "/_local/clusters/state":
            try:
                self.set_cluster_state(body.get("cluster_id"), body.get("state"))
            except KeyError:
                raise _param_error("Cluster %s does not exist" % body.get("cluster_id"))
            except ValueError as e:
                raise _param_error(str(e))
            return 200, {}, {}
        if method == "POST" and path == "/_local/inject":
            if "path" not in body:
                raise _param_error("path is required")
            kwargs = {k: body[k] for k in ("method", "count", "status", "retry_after", "body",
                                           "mode") if k in body}
            try:
                return 200, {"rule": self.inject(body["path"], **kwargs)}, {}
            except ValueError as e:
                raise _param_error(str(e))
        if method == "POST" and path == "/_local/throttle":
            if "path" not in body:
                raise _param_error("path is required")
            kwargs = {k: body[k] for k in ("method", "count", "http_429") if k in body}
            return 200, {"rule": self.throttle(body["path"], **kwargs)}, {}
        if method == "GET" and path == "/_local/requests":
            return 200, {"requests": self.requests()}, {}
        if method == "GET" and path == "/_local/contexts":
            with self._lock:
                items = [{"id": c.id, "cluster_id": c.cluster_id, "status": c.status,
                          "pid": c.proc.pid if c.proc else None}
                         for c in self._contexts.values()]
            return 200, {"contexts": items}, {}
        raise ApiError(404, {"error_code": "ENDPOINT_NOT_FOUND",
                             "message": "No control API at %s %s" % (method, path)})

    # ----- clusters

    def _clusters_api(self, method, op, query, body):
        if method == "GET" and op == "list":
            return 200, self._clusters_list(query), {}
        if method == "GET" and op == "get":
            cluster = self._cluster_or_error(_flat(query).get("cluster_id"))
            with self._lock:
                return 200, json.loads(json.dumps(cluster)), {}
        if method == "POST" and op == "start":
            self._cluster_start(body.get("cluster_id"))
            return 200, {}, {}
        if method == "POST" and op == "restart":
            self._cluster_restart(body.get("cluster_id"))
            return 200, {}, {}
        if method == "POST" and op == "events":
            return 200, self._cluster_events(body), {}
        raise ApiError(404, {"error_code": "ENDPOINT_NOT_FOUND",
                             "message": "No API found for '%s /api/2.1/clusters/%s'" % (method, op)})

    def _cluster_or_error(self, cluster_id):
        if not cluster_id:
            raise _param_error("Missing required field: cluster_id")
        with self._lock:
            cluster = self._clusters.get(cluster_id)
        if cluster is None:
            raise _param_error("Cluster %s does not exist" % cluster_id)
        return cluster

    def _clusters_list(self, query):
        states = query.get("filter_by.cluster_states") or []
        sources = query.get("filter_by.cluster_sources") or []
        flat = _flat(query)
        try:
            page_size = int(flat.get("page_size") or 2)
        except ValueError:
            raise _param_error("page_size must be an integer")
        if page_size < 1 or page_size > 100:
            raise _param_error("page_size must be between 1 and 100")
        offset = 0
        token = flat.get("page_token")
        if token:
            try:
                offset = int(json.loads(base64.urlsafe_b64decode(token.encode()))["offset"])
            except Exception:
                raise _param_error("Invalid page token: %s" % token)
        with self._lock:
            clusters = [json.loads(json.dumps(c)) for c in self._clusters.values()
                        if (not states or c["state"] in states)
                        and (not sources or c["cluster_source"] in sources)]
        page = clusters[offset:offset + page_size]
        answer = {}
        if page:
            answer["clusters"] = page
        if offset + page_size < len(clusters):
            answer["next_page_token"] = _page_token(offset + page_size)
        if offset > 0:
            answer["prev_page_token"] = _page_token(max(0, offset - page_size))
        return answer

    def _cluster_start(self, cluster_id):
        """TERMINATED -> PENDING -> RUNNING after ``start_delay``; any other state is refused
        with 400 INVALID_STATE "Cluster X is in unexpected state Running." (databricks/cli
        PR #6288, sdk-py PR #283, databrickslabs/migrate #204)."""
        cluster = self._cluster_or_error(cluster_id)
        with self._lock:
            if cluster["state"] != "TERMINATED":
                raise _invalid_state(cluster)
            cluster["start_time"] = _now_ms()
        self.set_cluster_state(cluster_id, "PENDING")
        self._after_start_delay(cluster_id, "PENDING")

    def _cluster_restart(self, cluster_id):
        """RUNNING -> RESTARTING (every context shuts down) -> RUNNING after ``start_delay``.
        A cluster that is not running is refused like ``start`` refuses a running one."""
        cluster = self._cluster_or_error(cluster_id)
        with self._lock:
            if cluster["state"] not in RUNNABLE_STATES:
                raise _invalid_state(cluster)
        self.set_cluster_state(cluster_id, "RESTARTING")
        self._after_start_delay(cluster_id, "RESTARTING")

    def _after_start_delay(self, cluster_id, from_state):
        with self._lock:
            timer = threading.Timer(self._config["start_delay"], self._cluster_started,
                                    args=(cluster_id, from_state))
            timer.daemon = True
            self._timers.append(timer)
        timer.start()

    def _cluster_started(self, cluster_id, from_state="PENDING", runtime_ready=False):
        with self._lock:
            cluster = self._clusters.get(cluster_id)
            if cluster is None or cluster["state"] != from_state or self._stopping.is_set():
                return
        if not runtime_ready and self._runtime_of(cluster_id) is None:
            # Its runtime's first start on this machine builds it: still starting till then.
            self._install_runtime_then(
                cluster_id, lambda: self._cluster_started(cluster_id, from_state, True))
            return
        self.set_cluster_state(cluster_id, "RUNNING")

    def _cluster_events(self, body):
        """POST /api/2.1/clusters/events: {events, next_page, total_count}, newest first by
        default; ``next_page`` is the body of the next request (offset/limit paging)."""
        cluster_id = body.get("cluster_id")
        self._cluster_or_error(cluster_id)
        try:
            offset = int(body.get("offset") or 0)
            limit = int(body.get("limit") or body.get("page_size") or 50)
        except (TypeError, ValueError):
            raise _param_error("offset and limit must be integers")
        if offset < 0 or not 1 <= limit <= 500:
            raise _param_error("limit must be between 1 and 500 and offset non-negative")
        types = set(body.get("event_types") or [])
        start, end = body.get("start_time"), body.get("end_time")
        events = [e for e in self.events(cluster_id)
                  if (not types or e["type"] in types)
                  and (start is None or e["timestamp"] >= int(start))
                  and (end is None or e["timestamp"] <= int(end))]
        if (body.get("order") or "DESC") == "DESC":
            events.reverse()
        answer = {"events": events[offset:offset + limit], "total_count": len(events)}
        if offset + limit < len(events):
            answer["next_page"] = dict(body, offset=offset + limit, limit=limit)
        return answer

    def _record_event(self, cluster_id, event_type, details, timestamp=None):
        with self._lock:
            self._events.append({"cluster_id": cluster_id,
                                 "timestamp": _now_ms() if timestamp is None else timestamp,
                                 "type": event_type, "details": details})

    # ----- 1.2 requests the real service refuses before they reach a context

    def _check_1_2_request(self, path, args):
        """Validation and cluster readiness that precede every 1.2 endpoint.

        * execute without ``contextId``: 400 ``{"error": "requirement failed: missing
          contextId"}`` with no error_code, even for a cluster that does not exist (sdk-py
          tests/integration/test_commands.py: S1).
        * a cluster PENDING or RESTARTING, or RUNNING for less than ``ready_delay`` seconds:
          500 ``{"error": "ClusterNotReadyException: ..."}`` for contexts/create, execute and
          the status calls (terraform-provider-databricks #217: S7). The SDK retries it."""
        if path == "/api/1.2/commands/execute" and not args.get("contextId"):
            raise ApiError(400, {"error": "requirement failed: missing contextId"})
        if path not in ("/api/1.2/contexts/create", "/api/1.2/commands/execute",
                        "/api/1.2/contexts/status", "/api/1.2/commands/status"):
            return
        cluster_id = args.get("clusterId")
        with self._lock:
            cluster = self._clusters.get(cluster_id or "")
            if cluster is None:
                return
            state = cluster["state"]
            warming = (state in RUNNABLE_STATES
                       and time.monotonic() < self._ready_at.get(cluster_id, 0))
        if state in STARTING_STATES or warming:
            raise ApiError(500, {"error": "ClusterNotReadyException: Cluster %s is not currently "
                                          "ready for driver client (state %s)"
                                          % (cluster_id, state)})



def _default_error_body(status):
    if status == 503:
        return {"error_code": "TEMPORARILY_UNAVAILABLE",
                "message": "The service is temporarily unavailable. Please try again later."}
    if status == 429:
        return {"error_code": "REQUEST_LIMIT_EXCEEDED",
                "message": "Request limit exceeded. Please try again later."}
    if status == 500:
        return {"error_code": "INTERNAL_ERROR", "message": "Injected internal error."}
    return {"error_code": "INJECTED_ERROR", "message": "Injected HTTP %d." % status}


def _invalid_state(cluster):
    return ApiError(400, {"error_code": "INVALID_STATE",
                          "message": "Cluster %s is in unexpected state %s."
                                     % (cluster["cluster_id"], cluster["state"].capitalize())})


# clusters/events types (compute.EventType) for each state a cluster enters.
_EVENT_OF_STATE = {"PENDING": "STARTING", "RUNNING": "RUNNING", "RESTARTING": "RESTARTING",
                   "TERMINATING": "TERMINATING", "TERMINATED": "TERMINATING",
                   "RESIZING": "RESIZING", "ERROR": "DRIVER_UNAVAILABLE",
                   "UNKNOWN": "DRIVER_NOT_RESPONDING"}


def _event_details(cluster, state):
    if state in ("PENDING", "RESTARTING"):
        return {"user": OWNER}
    if state == "RUNNING":
        return {"current_num_workers": cluster["num_workers"],
                "target_num_workers": cluster["num_workers"]}
    if state == "TERMINATED":
        return {"reason": cluster.get("termination_reason", {})}
    return {}


def _parse_body(raw):
    if not raw:
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise ApiError(400, {"error_code": "MALFORMED_REQUEST",
                             "message": "Request body is not valid JSON."})
    if not isinstance(body, dict):
        raise ApiError(400, {"error_code": "MALFORMED_REQUEST",
                             "message": "Request body must be a JSON object."})
    return body


def _flat(query):
    return {k: v[-1] for k, v in query.items()}


def _loggable_query(query):
    out = {}
    for key, values in query.items():
        if key.lower() in ("token", "access_token", "api_token"):
            continue
        out[key] = values[0] if len(values) == 1 else list(values)
    return out


def _page_token(offset):
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _now_ms():
    return int(time.time() * 1000)


def _state_message(state):
    return {"PENDING": "Starting Spark", "RESTARTING": "Restarting Spark",
            "TERMINATING": "Terminating", "TERMINATED": "Terminated by user",
            "RESIZING": "Resizing cluster"}.get(state, "")


def _cluster(cluster_id, name, state, runtime, shape):
    """A cluster's details; ``runtime``: its Databricks Runtime ("15.4"); ``shape``: source,
    mode (access mode) and optionally single_user, num_workers, autotermination."""
    source, mode, single_user = shape["source"], shape["mode"], shape.get("single_user")
    num_workers, autotermination = shape.get("num_workers", 2), shape.get("autotermination", 120)
    now = _now_ms()
    details = {
        "cluster_id": cluster_id,
        "cluster_name": name,
        "state": state,
        "state_message": _state_message(state),
        "cluster_source": source,
        "data_security_mode": mode,
        "spark_version": spark_version_of(runtime),
        "node_type_id": "i3.xlarge",
        "driver_node_type_id": "i3.xlarge",
        "num_workers": num_workers,
        "autotermination_minutes": autotermination,
        "creator_user_name": OWNER,
        "runtime_engine": "STANDARD",
        "start_time": now - 86_400_000,
        "spark_conf": {},
        "custom_tags": {},
        "default_tags": {"Vendor": "Databricks", "Creator": OWNER, "ClusterName": name,
                         "ClusterId": cluster_id},
    }
    if single_user:
        details["single_user_name"] = single_user
    if state == "RUNNING":
        details["last_restarted_time"] = now - 3_600_000
    if state == "TERMINATED":
        details["terminated_time"] = now - 7_200_000
        details["termination_reason"] = {"code": "INACTIVITY", "type": "SUCCESS",
                                         "parameters": {"inactivity_duration_min": "120"}}
        details["state_message"] = "Inactive cluster terminated (inactive for 120 minutes)."
    return details


def _default_clusters():
    """The clusters every local workspace starts with; their runtimes are built on first use."""
    clusters = [
        _cluster(RUNNING_CLUSTER_ID, "analytics-dev", "RUNNING", "15.4",
                 dict(source="UI", mode="SINGLE_USER", single_user=OWNER)),
        _cluster(TERMINATED_CLUSTER_ID, "analytics-prod", "TERMINATED", "15.4",
                 dict(source="UI", mode="DATA_SECURITY_MODE_DEDICATED", single_user=OWNER,
                      num_workers=8)),
        _cluster(JOB_CLUSTER_ID, "job-20250101-run-42", "RUNNING", "15.4",
                 dict(source="JOB", mode="SINGLE_USER", single_user=OWNER, num_workers=1,
                      autotermination=0)),
        _cluster(SHARED_CLUSTER_ID, "shared-analytics", "RUNNING", "15.4",
                 dict(source="UI", mode="USER_ISOLATION", num_workers=4)),
        _cluster(DEDICATED_CLUSTER_ID, "ml-dedicated-17", "RUNNING", "17.3",
                 dict(source="UI", mode="DATA_SECURITY_MODE_DEDICATED", single_user=OWNER)),
        _cluster(STANDARD_CLUSTER_ID, "bi-standard-17", "RUNNING", "17.3",
                 dict(source="UI", mode="DATA_SECURITY_MODE_STANDARD", num_workers=4)),
    ]
    return collections.OrderedDict((c["cluster_id"], c) for c in clusters)


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

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    ws.start(port=args.port)
    print("# Local Databricks workspace on %s (Ctrl+C to stop)" % ws.host)
    print("export DATABRICKS_HOST=%s" % ws.host)
    print("export DATABRICKS_TOKEN=%s" % ws.token)
    with ws._lock:
        clusters = list(ws._clusters.values())
    for c in clusters:
        print("# cluster %s  %-22s %-10s %s %s" % (c["cluster_id"], c["cluster_name"], c["state"],
                                                   c["cluster_source"], c["data_security_mode"]))
    print("export DATABRICKS_CLUSTER_ID=%s" % RUNNING_CLUSTER_ID, flush=True)
    try:
        while not stop.wait(0.5):
            pass
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


def default_runtimes():
    """The runtimes of the default clusters (what ``runtime`` builds by default), oldest first."""
    versions = {runtime_version(c["spark_version"]) for c in _default_clusters().values()}
    return sorted(versions, key=lambda v: tuple(map(int, v.split("."))))
