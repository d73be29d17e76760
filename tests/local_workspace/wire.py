"""The wire layer: HTTP in, calls on the backends, HTTP out.

* ``RouteTable``: (method, path pattern) -> handler, matched in order. A pattern is a literal
  path with ``{name}`` (one path segment) and ``{name:path}`` (the rest, slashes included)
  parameters. The table itself, with its handlers, is in ``routes.py``.
* ``error_answer``: the one place a domain error (``errors.py``) becomes the service's answer:
  ``{"error": ...}`` on the Command Execution API 1.2 for the errors it reports that way,
  ``{"error_code", "message"}`` everywhere else, with the status of the API the call went to.
* ``Wire``: what happens to every request around its handler: the Bearer token check, injected
  faults (``inject``/``throttle``), latency (``latency_ms``), and the request log.
* ``HttpServer``: HTTP/1.1 with keep-alive on 127.0.0.1; it counts accepted connections.
"""

import collections
import hmac
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

from . import errors

# ------------------------------------------------------------------ requests, answers, routes


class Request:
    """One request as a handler sees it. ``query``: the last value of each query key;
    ``query_lists``: every value; ``body``: the JSON object, the multipart fields, or the raw
    bytes (routes that take a raw body); ``params``: the path pattern's parameters."""

    def __init__(self, method, path, query_lists, body, params=None):
        self.method = method
        self.path = path
        self.query_lists = query_lists
        self.query = {k: v[-1] for k, v in query_lists.items()}
        self.body = body
        self.params = params or {}

    @property
    def args(self):
        """The call's arguments: the query string of a GET, the body of anything else."""
        return self.query if self.method == "GET" else self.body


class Reply:
    """An answer other than 200 with a JSON body: ``body`` is a dict, None (no body) or a
    ``Raw`` (bytes with their content type)."""

    def __init__(self, status=200, body=None, headers=None):
        self.status = status
        self.body = body
        self.headers = headers or {}


Raw = collections.namedtuple("Raw", "data content_type")

Route = collections.namedtuple("Route", "method pattern handler family raw_body regex")


class RouteTable:
    """(method, path pattern) -> handler, first match wins. ``method`` ``"*"`` matches any.
    ``family`` names the API the route belongs to: "1.2", "dbfs", "files", "2.x" (the shape of
    its error answers, see ``error_answer``) or "public" (no token needed, no injected faults);
    ``raw_body``: the handler gets the body's bytes, unparsed."""

    def __init__(self):
        self.routes = []

    def add(self, method, pattern, handler, family="2.x", raw_body=False):
        self.routes.append(Route(method, pattern, handler, family, raw_body, _compile(pattern)))

    def match(self, method, path):
        """(route, params) of the first route for ``method`` and ``path``, or (None, {})."""
        for route in self.routes:
            if route.method not in ("*", method):
                continue
            found = route.regex.fullmatch(path)
            if found:
                return route, found.groupdict()
        return None, {}


def _compile(pattern):
    out, pos = [], 0
    for param in re.finditer(r"\{(\w+)(:path)?\}", pattern):
        out.append(re.escape(pattern[pos:param.start()]))
        out.append("(?P<%s>%s)" % (param.group(1), ".*" if param.group(2) else "[^/]+"))
        pos = param.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out), re.S)


# ------------------------------------------------------------------ domain errors -> answers

# (status, error_code) of each error on the 2.x APIs; a subclass answers as its nearest mapped
# ancestor. ServiceError itself (an error with no answer of its own) is an internal error.
ERROR_CODES = {
    errors.ServiceError: (500, "INTERNAL_ERROR"),
    errors.InvalidParameter: (400, "INVALID_PARAMETER_VALUE"),
    errors.MalformedRequest: (400, "MALFORMED_REQUEST"),
    errors.InvalidState: (400, "INVALID_STATE"),
    errors.TooManyContexts: (400, "INVALID_PARAMETER_VALUE"),
    errors.ResourceDoesNotExist: (404, "RESOURCE_DOES_NOT_EXIST"),
    errors.ResourceAlreadyExists: (400, "RESOURCE_ALREADY_EXISTS"),
    errors.DirectoryNotEmpty: (400, "DIRECTORY_NOT_EMPTY"),
    errors.MaxReadSizeExceeded: (400, "MAX_READ_SIZE_EXCEEDED"),
    errors.MaxBlockSizeExceeded: (400, "MAX_BLOCK_SIZE_EXCEEDED"),
    errors.MethodNotAllowed: (405, "BAD_REQUEST"),
    errors.BadRequest: (400, "BAD_REQUEST"),
    errors.EndpointNotFound: (404, "ENDPOINT_NOT_FOUND"),
    errors.InternalError: (500, "INTERNAL_ERROR"),
    errors.Throttled: (429, "REQUEST_LIMIT_EXCEEDED"),
    errors.Unauthenticated: (401, "UNAUTHENTICATED"),
    errors.PermissionDenied: (403, "PERMISSION_DENIED"),
}
# Where an API answers an error its own way: the Files API (/api/2.0/fs/...) and DBFS.
FAMILY_ERROR_CODES = {
    "files": {errors.ResourceDoesNotExist: (404, "NOT_FOUND"),
              errors.ResourceAlreadyExists: (409, "ALREADY_EXISTS"),
              errors.DirectoryNotEmpty: (409, "DIRECTORY_NOT_EMPTY")},
    "dbfs": {errors.DirectoryNotEmpty: (400, "IO_ERROR")},
}
# The Command Execution API 1.2 answers these as {"error": prefix + message} (S1, S7); any other
# error on a 1.2 route (a context limit, a malformed body) has the 2.x shape there too.
COMMANDS_ERRORS = {
    errors.InvalidParameter: (400, "java.lang.IllegalArgumentException: "),
    errors.RequirementFailed: (400, "requirement failed: "),
    errors.InvalidState: (400, "java.lang.IllegalStateException: "),
    errors.ClusterNotReady: (500, "ClusterNotReadyException: "),
    errors.ContextDisconnected: (400, ""),
    errors.CommandNotFound: (400, ""),
}


def _nearest(table, error):
    for klass in type(error).__mro__:
        if klass in table:
            return table[klass]
    return None


def error_answer(error, family="2.x"):
    """(status, body, headers) the service answers ``error`` (a ServiceError) with on a route
    of ``family`` ("1.2", "files", "dbfs" or "2.x")."""
    if family == "1.2":
        found = _nearest(COMMANDS_ERRORS, error)
        if found is not None:
            status, prefix = found
            return status, {"error": prefix + error.message}, {}
    status, code = (_nearest(FAMILY_ERROR_CODES.get(family, {}), error)
                    or _nearest(ERROR_CODES, error))
    headers = {}
    if isinstance(error, errors.Throttled) and error.retry_after is not None:
        headers["Retry-After"] = str(error.retry_after)
    return status, {"error_code": code, "message": error.message}, headers


def parse_json_body(raw):
    if not raw:
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except ValueError:
        raise errors.MalformedRequest("Request body is not valid JSON.")
    if not isinstance(body, dict):
        raise errors.MalformedRequest("Request body must be a JSON object.")
    return body


def parse_multipart(raw, content_type):
    """A multipart/form-data body as {field: str or bytes} (the SDK's workspace.upload)."""
    import email.parser
    import email.policy

    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        fields[name] = payload if part.get_filename() or name == "content" else payload.decode()
    return fields


# ------------------------------------------------------------------ around every request

class Wire:
    """Auth, injected faults, latency and the request log around ``routes``' handlers.

    ``handler(ws, request)`` returns a dict (200 JSON), or a ``Reply``; ``ws`` is the object
    the handlers call (the workspace with its backends). ``config``: the workspace's Config
    (``latency_ms``)."""

    def __init__(self, routes, ws, token, config):
        self._routes = routes
        self._ws = ws
        self._token = token
        self._config = config
        self._lock = threading.Lock()
        self._injections = []
        self._requests = []

    # ----- faults and the log

    INJECTION_DEFAULTS = {"method": "POST", "count": 1, "status": 503, "retry_after": 1, "body": None,
                          "mode": "respond"}

    def inject(self, path, **fields):
        """The next ``count`` requests to ``path`` (and ``method``) meet a fault: ``mode``
        "respond" answers ``status`` with ``body`` (the status's service error by default) and
        ``retry_after``; "drop_before"/"drop_after" close the connection before/after handling."""
        unknown = set(fields) - set(self.INJECTION_DEFAULTS)
        if unknown:
            raise TypeError("unknown injection field(s): %s" % ", ".join(sorted(unknown)))
        rule = {**self.INJECTION_DEFAULTS, **fields, "path": path}
        if rule["mode"] not in ("respond", "drop_before", "drop_after"):
            raise ValueError("mode must be respond, drop_before or drop_after")
        if rule["body"] is None:
            rule["body"] = _default_error_body(rule["status"])
        rule.update(method=rule["method"].upper() if rule["method"] else None, count=int(rule["count"]),
                    status=int(rule["status"]))
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

    def clear_injections(self):
        with self._lock:
            self._injections.clear()

    def requests(self):
        with self._lock:
            return [dict(r) for r in self._requests]

    def _take_injection(self, method, path):
        with self._lock:
            for rule in self._injections:
                if rule["count"] > 0 and rule["path"] == path and rule["method"] in (None, method):
                    rule["count"] -= 1
                    return dict(rule)
            self._injections = [r for r in self._injections if r["count"] > 0]
        return None

    # ----- one request

    def dispatch(self, method, raw_path, raw_body, headers):
        """(status, body, headers, drop) for one request; ``drop``: close without answering."""
        parts = urlsplit(raw_path)
        path = unquote(parts.path)
        query = parse_qs(parts.query, keep_blank_values=True)
        started = time.time()
        drop = False
        extra_headers = {}
        route, params = self._routes.match(method, path)
        family = route.family if route is not None else "2.x"
        try:
            rule = None
            if route is None or route.family != "public":
                self._check_auth(headers)
                rule = None if path.startswith("/_local/") else self._take_injection(method, path)
            if rule is not None and rule["mode"] == "drop_before":
                status, body, drop = 0, None, True
            elif rule is not None and rule["mode"] == "respond":
                status, body = rule["status"], rule["body"]
                if rule["retry_after"] is not None:
                    extra_headers["Retry-After"] = str(rule["retry_after"])
            else:
                payload = _payload(route, raw_body, headers.get("Content-Type") or "")
                if route is None:
                    raise errors.EndpointNotFound("No API found for '%s %s'" % (method, path))
                answer = route.handler(self._ws, Request(method, path, query, payload, params))
                if not isinstance(answer, Reply):
                    answer = Reply(200, answer)
                status, body, extra_headers = answer.status, answer.body, answer.headers
                if rule is not None:  # drop_after: processed, but never answered
                    drop = True
        except errors.ServiceError as e:
            status, body, extra_headers = error_answer(e, family)
        except Exception as e:  # a bug here must still answer like a server would
            status, body = 500, {"error_code": "INTERNAL_ERROR",
                                 "message": "%s: %s" % (type(e).__name__, e)}
        if not path.startswith("/_local/"):
            latency_ms = self._config["latency_ms"]
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
            raise errors.Unauthenticated("Credential was not sent or was of an unsupported "
                                         "type for this API.")
        if not hmac.compare_digest(value[7:].strip().encode(), self._token.encode()):
            raise errors.PermissionDenied("Invalid access token.")


def _payload(route, raw_body, content_type):
    if route is not None and route.raw_body:
        return raw_body
    if content_type.startswith("multipart/form-data"):
        return parse_multipart(raw_body, content_type)
    return parse_json_body(raw_body)


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


def _loggable_query(query):
    out = {}
    for key, values in query.items():
        if key.lower() in ("token", "access_token", "api_token"):
            continue
        out[key] = values[0] if len(values) == 1 else list(values)
    return out


# ------------------------------------------------------------------ HTTP/1.1 server

class HttpServer(ThreadingHTTPServer):
    """The workspace's HTTP server: ``wire.dispatch`` answers every request; connections stay
    open between requests (HTTP/1.1 keep-alive). ``accepted`` counts accepted connections."""

    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a burst of parallel sub_llm calls overflowed it
    # (connection resets, 1 s SYN retries). The real service accepts many concurrent connections.
    request_queue_size = 128

    def __init__(self, address, wire):
        self.wire = wire
        self.accepted = 0
        self._conns = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
            self.accepted += 1
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
        status, body, headers, drop = self.server.wire.dispatch(method, self.path, raw,
                                                                self.headers)
        if drop:
            self.close_connection = True
            return
        if isinstance(body, Raw):
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
            if "Content-Length" not in headers and status != 204:  # a 204 has no body, no length
                self.send_header("Content-Length", str(len(data)))
            for key, value in headers.items():
                self.send_header(key, str(value))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
