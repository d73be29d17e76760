"""The HTTP server and its routes: the REST surface of the local workspace.

An HTTP server on 127.0.0.1 that speaks the REST endpoints databricks-repl uses: the Command
Execution API 1.2 (``cluster.ExecutionContexts``: every execution context is a real Python
process, ``worker.py``), clusters list/get/start, DBFS read for stored plots, and model serving
(``serving.ModelServing``). A control API under ``/_local/...`` lets tests evict contexts, change
limits, flip cluster states and inject failures. See ``references/local-workspace.md``.
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

from . import sandbox
from .cluster import (CANCEL_MODES, OWNER, RUNNABLE_STATES, RUNTIME_VERSION,
                      ExecutionContexts)
from .errors import ApiError, param_error as _param_error
from .paths import host_path
from .serving import ModelServing, chat_answer  # noqa: F401  (chat_answer is re-exported)

RUNNING_CLUSTER_ID = "0101-000001-devrun01"
TERMINATED_CLUSTER_ID = "0101-000002-prodoff2"
JOB_CLUSTER_ID = "0101-000003-jobrun03"
SHARED_CLUSTER_ID = "0101-000004-shared04"

SPARK_VERSION = RUNTIME_VERSION + ".x-scala2.12"

CLUSTER_STATES = ("PENDING", "RUNNING", "RESTARTING", "RESIZING", "TERMINATING", "TERMINATED",
                  "ERROR", "UNKNOWN")
DBFS_MAX_READ = 1024 * 1024

DEFAULTS = {
    "output_limit": 50_000,
    "context_limit": 145,
    "idle_ttl": None,
    "cancel_mode": "cancelled",
    "not_running_mode": "error",
    "start_delay": 2.0,
    "llm_latency": 0.0,
    "image_inline_limit": 512 * 1024,
    "latency_ms": 0,
}
NOT_RUNNING_MODES = ("error", "not_ready")


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

    def _handle(self, method):
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        status, body, headers, drop = self.server.workspace._dispatch(
            method, self.path, raw, self.headers)
        if drop:
            self.close_connection = True
            return
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, str(value))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


# ------------------------------------------------------------------ the workspace

class LocalWorkspace(ExecutionContexts, ModelServing):
    """The local workspace server. ``start()``, use ``host``/``token``, ``stop()``."""

    def __init__(self, token="local-token", output_limit=50_000, context_limit=145,
                 idle_ttl=None, cancel_mode="cancelled", not_running_mode="error",
                 start_delay=2.0, llm_latency=0.0, image_inline_limit=512 * 1024, secrets=None,
                 isolation="auto"):
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
                       llm_latency=llm_latency, image_inline_limit=image_inline_limit)
        self._contexts = {}
        self._clusters = _default_clusters()
        self._injections = []
        self._requests = []
        self._pids = []
        self._timers = []
        self._rate_limit_seen = collections.Counter()
        self._server = None
        self._server_thread = None
        self._janitor = None
        self._stopping = threading.Event()
        self._tmpdir = None
        self.plots_dir = None

    # ----- lifecycle

    def start(self, port=0):
        self._tmpdir = tempfile.mkdtemp(prefix="local-workspace-")
        self.plots_dir = host_path(self._tmpdir, None, "dbfs:/FileStore/plots")
        os.makedirs(self.plots_dir)
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
        self._close_contexts(list(self._contexts), grace=0.5)
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
        for key in ("output_limit", "context_limit", "image_inline_limit", "latency_ms"):
            if key in settings and (not isinstance(settings[key], int) or settings[key] < 0):
                raise ValueError("%s must be a non-negative integer" % key)
        for key in ("idle_ttl", "start_delay", "llm_latency"):
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

    def set_cluster_state(self, cluster_id, state, message=None):
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
                cluster["termination_reason"] = {"code": "USER_REQUEST", "type": "SUCCESS",
                                                 "parameters": {"username": OWNER}}
            elif state == "RUNNING":
                cluster.pop("termination_reason", None)
                cluster["last_restarted_time"] = now
            doomed = [] if state in RUNNABLE_STATES else [
                c.id for c in self._contexts.values() if c.cluster_id == cluster_id]
        self._close_contexts(doomed)

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
        handler = {
            ("POST", "/api/1.2/contexts/create"): self._contexts_create,
            ("GET", "/api/1.2/contexts/status"): self._contexts_status,
            ("POST", "/api/1.2/contexts/destroy"): self._contexts_destroy,
            ("POST", "/api/1.2/commands/execute"): self._commands_execute,
            ("GET", "/api/1.2/commands/status"): self._commands_status,
            ("POST", "/api/1.2/commands/cancel"): self._commands_cancel,
            ("GET", "/api/2.0/dbfs/read"): self._dbfs_read,
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
        cluster = self._cluster_or_error(cluster_id)
        with self._lock:
            if cluster["state"] != "TERMINATED":
                return
            cluster["state"] = "PENDING"
            cluster["state_message"] = "Starting Spark"
            cluster["start_time"] = _now_ms()
            timer = threading.Timer(self._config["start_delay"], self._cluster_started,
                                    args=(cluster_id,))
            timer.daemon = True
            self._timers.append(timer)
        timer.start()

    def _cluster_started(self, cluster_id):
        with self._lock:
            cluster = self._clusters.get(cluster_id)
            if cluster is None or cluster["state"] != "PENDING" or self._stopping.is_set():
                return
        self.set_cluster_state(cluster_id, "RUNNING")


    # ----- DBFS (plots only)

    def _dbfs_read(self, query):
        path = query.get("path") or ""
        rel = path[len("dbfs:"):] if path.startswith("dbfs:") else path
        name = rel[len("/FileStore/plots/"):] if rel.startswith("/FileStore/plots/") else None
        try:
            offset = int(query.get("offset") or 0)
            length = int(query.get("length") or 512 * 1024)
        except ValueError:
            raise _param_error("offset and length must be integers")
        if length > DBFS_MAX_READ:
            raise ApiError(400, {"error_code": "MAX_READ_SIZE_EXCEEDED",
                                 "message": "Cannot read more than 1.0MiB"})
        if offset < 0 or length < 0:
            raise _param_error("offset and length must be non-negative")
        file_path = os.path.join(self.plots_dir, name) if name and "/" not in name else None
        if file_path is None or not os.path.isfile(file_path):
            raise ApiError(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                 "message": "No file or directory exists on path %s." % rel})
        with open(file_path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return {"bytes_read": len(data), "data": base64.b64encode(data).decode("ascii")}



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


def _cluster(cluster_id, name, state, source, mode, single_user=None, num_workers=2,
             autotermination=120):
    now = _now_ms()
    details = {
        "cluster_id": cluster_id,
        "cluster_name": name,
        "state": state,
        "state_message": _state_message(state),
        "cluster_source": source,
        "data_security_mode": mode,
        "spark_version": SPARK_VERSION,
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
    clusters = [
        _cluster(RUNNING_CLUSTER_ID, "analytics-dev", "RUNNING", "UI", "SINGLE_USER",
                 single_user=OWNER),
        _cluster(TERMINATED_CLUSTER_ID, "analytics-prod", "TERMINATED", "UI",
                 "DATA_SECURITY_MODE_DEDICATED", single_user=OWNER, num_workers=8),
        _cluster(JOB_CLUSTER_ID, "job-20250101-run-42", "RUNNING", "JOB", "SINGLE_USER",
                 single_user=OWNER, num_workers=1, autotermination=0),
        _cluster(SHARED_CLUSTER_ID, "shared-analytics", "RUNNING", "UI", "USER_ISOLATION",
                 num_workers=4),
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
    ws = LocalWorkspace(token=args.token, secrets=secrets)
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
    args = parser.parse_args(argv)
    return _serve(args)
