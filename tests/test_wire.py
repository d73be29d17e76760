"""The local workspace's wire layer on its own: route matching, error answers, dispatch.

No server, no processes: the route table, the domain-error mapping and ``Wire.dispatch`` are
called directly (the end-to-end behaviour is in test_local_workspace.py).
"""

import inspect
import json

import pytest

from local_workspace import errors, routes, wire
from local_workspace.config import Config, validated
from local_workspace.wire import Reply, RouteTable, Wire, error_answer

AUTH = {"Authorization": "Bearer t"}


# ------------------------------------------------------------------ the route table

def _table():
    table = RouteTable()
    table.add("GET", "/api/2.0/thing", "get-thing")
    table.add("GET", "/api/2.0/things/{name}", "one-thing")
    table.add("POST", "/api/2.0/things/{name}/run", "run-thing")
    table.add("*", "/api/2.0/fs/{path:path}", "any-fs")
    return table


@pytest.mark.parametrize("method, path, handler, params", [
    ("GET", "/api/2.0/thing", "get-thing", {}),
    ("GET", "/api/2.0/things/a-b_c.d", "one-thing", {"name": "a-b_c.d"}),
    ("POST", "/api/2.0/things/x/run", "run-thing", {"name": "x"}),
    ("DELETE", "/api/2.0/fs/Volumes/a/b c/d.txt", "any-fs", {"path": "Volumes/a/b c/d.txt"}),
    ("GET", "/api/2.0/fs/", "any-fs", {"path": ""}),
])
def test_a_route_matches_its_method_and_pattern_and_gives_its_parameters(method, path, handler,
                                                                          params):
    route, found = _table().match(method, path)
    assert (route.handler, found) == (handler, params)


@pytest.mark.parametrize("method, path", [
    ("POST", "/api/2.0/thing"),            # another method
    ("GET", "/api/2.0/things/a/b"),        # {name} is one segment
    ("GET", "/api/2x0/thing"),             # the dot is literal
    ("GET", "/api/2.0/thing/"),            # the whole path must match
    ("GET", "/api/2.0/fs"),                # {path:path} follows its slash
])
def test_a_path_no_route_matches_gives_none(method, path):
    assert _table().match(method, path) == (None, {})


def test_the_first_matching_route_wins():
    table = RouteTable()
    table.add("GET", "/a/b", "exact")
    table.add("*", "/a/{rest:path}", "fallback")
    assert table.match("GET", "/a/b")[0].handler == "exact"
    assert table.match("POST", "/a/b")[0].handler == "fallback"


@pytest.mark.parametrize("method, path, handler, params", [
    ("GET", "/api/2.1/clusters/list", routes.clusters_list, {}),
    ("GET", "/api/2.0/clusters/get", routes.clusters_get, {}),
    ("POST", "/api/2.1/clusters/resize", routes.clusters_unknown, {"op": "resize"}),
    ("POST", "/api/1.2/commands/execute", routes.commands_execute, {}),
    ("GET", "/api/1.2/commands/status", routes.commands_status, {}),
    ("HEAD", "/api/2.0/fs/files/Volumes/c/s/v/f", routes.file_download,
     {"path": "Volumes/c/s/v/f"}),
    ("PUT", "/api/2.0/fs/files/Volumes/c/s/v/f", routes.file_upload, {"path": "Volumes/c/s/v/f"}),
    ("POST", "/api/2.0/fs/files/Volumes/c/s/v/f", routes.file_other,
     {"path": "Volumes/c/s/v/f"}),
    ("GET", "/api/2.0/fs/directories/Volumes/c/", routes.directory_list, {"path": "Volumes/c/"}),
    ("GET", "/api/2.0/serving-endpoints", routes.serving_list, {}),
    ("GET", "/api/2.0/serving-endpoints/my-llm", routes.serving_get, {"name": "my-llm"}),
    ("POST", "/serving-endpoints/my-llm/invocations", routes.serving_invoke, {"name": "my-llm"}),
    ("GET", "/_local/connections", routes.control_connections, {}),
    ("PUT", "/_local/whatever/else", routes.control_unknown, {"rest": "whatever/else"}),
])
def test_the_workspace_routes_reach_their_handlers(method, path, handler, params):
    route, found = routes.ROUTES.match(method, path)
    assert (route.handler, found) == (handler, params)


def test_only_put_on_files_takes_a_raw_body_and_only_the_config_probe_is_public():
    raw = {(r.method, r.pattern) for r in routes.ROUTES.routes if r.raw_body}
    public = {(r.method, r.pattern) for r in routes.ROUTES.routes if r.family == "public"}
    assert raw == {("PUT", "/api/2.0/fs/files/{path:path}"),
                   ("GET", "/.well-known/databricks-config")}
    assert public == {("GET", "/.well-known/databricks-config")}


def test_the_1_2_routes_answer_as_the_1_2_api_and_the_files_routes_as_the_files_api():
    families = {}
    for route in routes.ROUTES.routes:
        families.setdefault(route.family, set()).add(route.pattern.split("/")[2])
    assert families["1.2"] == {"1.2"}
    assert {r.pattern.split("/")[4] for r in routes.ROUTES.routes if r.family == "files"} == {
        "files", "directories"}
    assert {r.pattern.split("/")[3] for r in routes.ROUTES.routes if r.family == "dbfs"} == {
        "dbfs"}


# ------------------------------------------------------------------ domain errors -> answers

@pytest.mark.parametrize("error, family, answer", [
    (errors.ContextDisconnected("7"), "1.2",
     (400, {"error": "Context ExecutionContextId(7) is disconnected."}, {})),
    (errors.CommandNotFound("c", "7"), "1.2", (400, {"error": "Command c not found in context 7"},
                                               {})),
    (errors.RequirementFailed("missing contextId"), "1.2",
     (400, {"error": "requirement failed: missing contextId"}, {})),
    (errors.ClusterNotFound("x"), "1.2",
     (400, {"error": "java.lang.IllegalArgumentException: Cluster x does not exist"}, {})),
    (errors.UnsupportedLanguage("r"), "1.2",
     (400, {"error": "java.lang.IllegalArgumentException: language 'r' is not supported by the "
                     "local workspace (python and sql only)"}, {})),
    (errors.InvalidState("Cluster x is in state PENDING and cannot run commands"), "1.2",
     (400, {"error": "java.lang.IllegalStateException: Cluster x is in state PENDING and cannot "
                     "run commands"}, {})),
    (errors.ClusterNotReady("x", "PENDING"), "1.2",
     (500, {"error": "ClusterNotReadyException: Cluster x is not currently ready for driver "
                     "client (state PENDING)"}, {})),
    (errors.TooManyContexts(3), "1.2",  # the one 1.2 refusal with an error_code (S6)
     (400, {"error_code": "INVALID_PARAMETER_VALUE",
            "message": "Too many execution contexts are open right now.(Limit set currently to "
                       "3)"}, {})),
    (errors.MalformedRequest("Request body is not valid JSON."), "1.2",
     (400, {"error_code": "MALFORMED_REQUEST", "message": "Request body is not valid JSON."}, {})),
    (errors.ClusterNotFound("x"), "2.x",
     (400, {"error_code": "INVALID_PARAMETER_VALUE", "message": "Cluster x does not exist"}, {})),
    (errors.InvalidState("Cluster x is in unexpected state Running."), "2.x",
     (400, {"error_code": "INVALID_STATE", "message": "Cluster x is in unexpected state Running."},
      {})),
    (errors.ResourceDoesNotExist("gone"), "2.x",
     (404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "gone"}, {})),
    (errors.ResourceDoesNotExist("gone"), "files", (404, {"error_code": "NOT_FOUND",
                                                          "message": "gone"}, {})),
    (errors.ResourceAlreadyExists("there"), "dbfs",
     (400, {"error_code": "RESOURCE_ALREADY_EXISTS", "message": "there"}, {})),
    (errors.ResourceAlreadyExists("there"), "files", (409, {"error_code": "ALREADY_EXISTS",
                                                            "message": "there"}, {})),
    (errors.DirectoryNotEmpty("full"), "2.x", (400, {"error_code": "DIRECTORY_NOT_EMPTY",
                                                     "message": "full"}, {})),
    (errors.DirectoryNotEmpty("full"), "files", (409, {"error_code": "DIRECTORY_NOT_EMPTY",
                                                       "message": "full"}, {})),
    (errors.DirectoryNotEmpty("full"), "dbfs", (400, {"error_code": "IO_ERROR",
                                                      "message": "full"}, {})),
    (errors.MethodNotAllowed("no"), "files", (405, {"error_code": "BAD_REQUEST",
                                                    "message": "no"}, {})),
    (errors.Throttled("slow down", retry_after="1"), "2.x",
     (429, {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"},
      {"Retry-After": "1"})),
    (errors.Throttled("slow down", retry_after=None), "2.x",
     (429, {"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}, {})),
    (errors.EndpointNotFound("none"), "1.2", (404, {"error_code": "ENDPOINT_NOT_FOUND",
                                                    "message": "none"}, {})),
    (errors.Unauthenticated("who"), "2.x", (401, {"error_code": "UNAUTHENTICATED",
                                                  "message": "who"}, {})),
    (errors.PermissionDenied("no"), "2.x", (403, {"error_code": "PERMISSION_DENIED",
                                                  "message": "no"}, {})),
])
def test_each_domain_error_answers_as_the_api_of_its_route(error, family, answer):
    assert error_answer(error, family) == answer


def _error_classes():
    return [c for _, c in inspect.getmembers(errors, inspect.isclass)
            if issubclass(c, errors.ServiceError) and c is not errors.ServiceError]


@pytest.mark.parametrize("klass", _error_classes(), ids=lambda c: c.__name__)
def test_every_domain_error_is_mapped_not_left_to_the_internal_error_fallback(klass):
    mapped = set(wire.ERROR_CODES) | set(wire.COMMANDS_ERRORS)
    assert any(k in mapped for k in klass.__mro__[:klass.__mro__.index(errors.ServiceError)])


# ------------------------------------------------------------------ one request, in process

class _Workspace:
    """What the handlers below call: records the calls."""

    def __init__(self):
        self.calls = []


def _wire(latency_ms=0):
    table = RouteTable()

    def ok(ws, req):
        ws.calls.append((req.method, req.path, req.query, req.body, req.params))
        return {"ok": True}

    def refuse(ws, req):
        raise errors.ContextDisconnected(req.body.get("contextId"))

    def broken(ws, req):
        raise KeyError("boom")

    table.add("GET", "/api/2.0/ok/{name}", ok)
    table.add("POST", "/api/1.2/refuse", refuse, family="1.2")
    table.add("GET", "/api/2.0/broken", broken)
    table.add("GET", "/public", lambda ws, req: Reply(204), family="public")
    ws = _Workspace()
    return Wire(table, ws, "t", Config(latency_ms=latency_ms)), ws


def test_dispatch_turns_a_request_into_a_handler_call_and_its_answer():
    layer, ws = _wire()
    assert layer.dispatch("GET", "/api/2.0/ok/n%20m?a=1&a=2&b=", b"", AUTH) == (
        200, {"ok": True}, {}, False)
    assert ws.calls == [("GET", "/api/2.0/ok/n m", {"a": "2", "b": ""}, {}, {"name": "n m"})]
    assert layer.requests()[0]["query"] == {"a": ["1", "2"], "b": ""}


def test_dispatch_answers_domain_errors_bad_bodies_unknown_paths_and_bugs():
    layer, _ = _wire()
    refused = layer.dispatch("POST", "/api/1.2/refuse", json.dumps({"contextId": "9"}).encode(),
                            AUTH)
    assert refused == (400, {"error": "Context ExecutionContextId(9) is disconnected."}, {},
                       False)
    assert layer.dispatch("POST", "/api/1.2/refuse", b"[1]", AUTH)[:2] == (
        400, {"error_code": "MALFORMED_REQUEST", "message": "Request body must be a JSON object."})
    assert layer.dispatch("GET", "/nowhere", b"", AUTH)[:2] == (
        404, {"error_code": "ENDPOINT_NOT_FOUND", "message": "No API found for 'GET /nowhere'"})
    assert layer.dispatch("GET", "/api/2.0/broken", b"", AUTH)[:2] == (
        500, {"error_code": "INTERNAL_ERROR", "message": "KeyError: 'boom'"})


def test_dispatch_checks_the_token_except_on_public_routes():
    layer, ws = _wire()
    assert layer.dispatch("GET", "/api/2.0/ok/x", b"", {})[0] == 401
    assert layer.dispatch("GET", "/api/2.0/ok/x", b"", {"Authorization": "Bearer u"})[0] == 403
    assert layer.dispatch("GET", "/public", b"", {})[0] == 204
    assert ws.calls == []


def test_injected_faults_answer_or_drop_and_the_log_records_them():
    layer, ws = _wire()
    layer.inject("/api/2.0/ok/x", method="GET", count=1, status=503)
    layer.inject("/api/2.0/ok/x", method=None, count=1, mode="drop_after")
    layer.throttle("/api/2.0/ok/x", method="GET", http_429=False)
    first = layer.dispatch("GET", "/api/2.0/ok/x", b"", AUTH)
    assert first == (503, {"error_code": "TEMPORARILY_UNAVAILABLE",
                           "message": "The service is temporarily unavailable. Please try again "
                                      "later."}, {"Retry-After": "1"}, False)
    assert layer.dispatch("GET", "/api/2.0/ok/x", b"", AUTH)[3] is True  # processed, then dropped
    assert layer.dispatch("GET", "/api/2.0/ok/x", b"", AUTH)[:2] == (
        400, {"error_code": "REQUEST_LIMIT_EXCEEDED",
              "message": "XRequest RPC token bucket limit has been exceeded."})
    assert layer.dispatch("GET", "/api/2.0/ok/x", b"", AUTH)[0] == 200
    assert len(ws.calls) == 2
    assert [(r["status"], r["dropped"]) for r in layer.requests()] == [
        (503, False), (None, True), (400, False), (200, False)]


def test_cleared_injections_are_gone():
    layer, _ = _wire()
    layer.inject("/api/2.0/ok/x", method="GET", status=500)
    layer.clear_injections()
    assert layer.dispatch("GET", "/api/2.0/ok/x", b"", AUTH)[0] == 200


# ------------------------------------------------------------------ settings

@pytest.mark.parametrize("settings, message", [
    ({"nope": 1}, "unknown setting(s): nope"),
    ({"cancel_mode": "x"}, "cancel_mode must be one of ('cancelled', 'finished_error')"),
    ({"pip_restarts": 1}, "pip_restarts must be true or false"),
    ({"context_limit": -1}, "context_limit must be a non-negative integer"),
])
def test_a_bad_setting_is_refused_with_its_name(settings, message):
    with pytest.raises(ValueError) as refused:
        validated(settings)
    assert str(refused.value) == message


def test_settings_count_down_and_seconds_become_floats():
    config = Config(context_error_next=1, idle_ttl=2)
    assert config["idle_ttl"] == 2.0 and isinstance(config["idle_ttl"], float)
    assert [config.take("context_error_next") for _ in range(2)] == [True, False]
    assert config.snapshot()["context_error_next"] == 0
