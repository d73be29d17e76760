"""The route table of the local workspace: every endpoint it serves and the handler behind it.

A handler turns one request (``wire.Request``: query, body, path parameters) into calls on the
backends (``ws.clusters``, ``ws.contexts``, ``ws.files``, ``ws.serving``) and their results into
the answer: a dict (200, JSON) or a ``wire.Reply``. Refusals are domain errors; ``wire`` answers
them as the route's API does (its ``family``). Checks that belong to the request's shape (a
field's name, its presence, the 1.2 gateway's preconditions) are made here.
"""

import base64
from email.utils import formatdate

from .errors import (EndpointNotFound, InvalidParameter, MethodNotAllowed, RequirementFailed)
from .files import truthy
from .wire import Raw, Reply, RouteTable

OCTET_STREAM = "application/octet-stream"


def _required(value, message):
    if not value:
        raise InvalidParameter(message)
    return value


def _cluster_id(args):
    """The ``cluster_id`` of a 2.x call."""
    return _required(args.get("cluster_id"), "Missing required field: cluster_id")


# ------------------------------------------------------------------ clusters 2.0 / 2.1

def clusters_list(ws, req):
    try:
        page_size = int(req.query.get("page_size") or 2)
    except ValueError:
        raise InvalidParameter("page_size must be an integer")
    return ws.clusters.list_page(states=req.query_lists.get("filter_by.cluster_states") or [],
                                 sources=req.query_lists.get("filter_by.cluster_sources") or [],
                                 page_size=page_size, page_token=req.query.get("page_token"))


def clusters_get(ws, req):
    return ws.clusters.get(_cluster_id(req.query))


def clusters_start(ws, req):
    ws.clusters.start(_cluster_id(req.body))
    return {}


def clusters_restart(ws, req):
    ws.clusters.restart(_cluster_id(req.body))
    return {}


def clusters_events(ws, req):
    return ws.clusters.events_page(_cluster_id(req.body), req.body)


def clusters_unknown(ws, req):
    raise EndpointNotFound("No API found for '%s /api/2.1/clusters/%s'"
                           % (req.method, req.params["op"]))


# ------------------------------------------------------------------ Command Execution API 1.2
# Before a call reaches a context, the gateway refuses: an execute without contextId (400
# "requirement failed: missing contextId" with no error_code, even for a cluster that does not
# exist: sdk-py tests/integration/test_commands.py, S1); and, for contexts/create, execute and
# both status calls, a cluster that is starting, restarting or just RUNNING (ClusterNotReady:
# terraform-provider-databricks #217, S7; the SDK retries it).

def _cluster_id_1_2(args):
    return _required(args.get("clusterId"), "clusterId is required")


def _ready(ws, args):
    ws.clusters.check_ready(args.get("clusterId"))
    return _cluster_id_1_2(args)


def contexts_create(ws, req):
    cluster_id = _ready(ws, req.body)
    return {"id": ws.contexts.create(cluster_id, req.body.get("language") or "python")}


def contexts_status(ws, req):
    cluster_id = _ready(ws, req.query)
    return ws.contexts.status(cluster_id, req.query.get("contextId"))


def contexts_destroy(ws, req):
    cluster_id = _cluster_id_1_2(req.body)
    return {"id": ws.contexts.destroy(cluster_id, req.body.get("contextId"))}


def commands_execute(ws, req):
    body = req.body
    if not body.get("contextId"):
        raise RequirementFailed("missing contextId")
    cluster_id = _ready(ws, body)
    return {"id": ws.contexts.execute(cluster_id, body.get("contextId"), body.get("command"),
                                      body.get("language") or "python")}


def commands_status(ws, req):
    cluster_id = _ready(ws, req.query)
    return ws.contexts.command_status(cluster_id, req.query.get("contextId"),
                                      req.query.get("commandId"))


def commands_cancel(ws, req):
    cluster_id = _cluster_id_1_2(req.body)
    ws.contexts.cancel(cluster_id, req.body.get("contextId"), req.body.get("commandId"))
    return {}


# ------------------------------------------------------------------ DBFS 2.0

def dbfs_get_status(ws, req):
    return ws.files.dbfs_status(req.args.get("path"))


def dbfs_list(ws, req):
    return {"files": ws.files.dbfs_list(req.args.get("path"))}


def dbfs_read(ws, req):
    args = req.args
    data = ws.files.dbfs_read(args.get("path"), args.get("offset"), args.get("length"))
    return {"bytes_read": len(data), "data": base64.b64encode(data).decode("ascii")}


def dbfs_put(ws, req):
    args = req.args
    ws.files.dbfs_put(args.get("path"), args.get("contents"), truthy(args.get("overwrite")))
    return {}


def dbfs_create(ws, req):
    args = req.args
    return {"handle": ws.files.dbfs_create(args.get("path"), truthy(args.get("overwrite")))}


def dbfs_add_block(ws, req):
    ws.files.dbfs_add_block(req.args.get("handle"), req.args.get("data"))
    return {}


def dbfs_close(ws, req):
    ws.files.dbfs_close(req.args.get("handle"))
    return {}


def dbfs_delete(ws, req):
    ws.files.dbfs_delete(req.args.get("path"), truthy(req.args.get("recursive")))
    return {}


def dbfs_mkdirs(ws, req):
    ws.files.dbfs_mkdirs(req.args.get("path"))
    return {}


def dbfs_move(ws, req):
    ws.files.dbfs_move(req.args.get("source_path"), req.args.get("destination_path"))
    return {}


# ------------------------------------------------------------------ Files API

def _files_path(req):
    return "/" + req.params["path"]


def file_download(ws, req):
    """GET and HEAD: the bytes, with their length and modification time."""
    data, mtime = ws.files.file_read(_files_path(req))
    return Reply(200, Raw(data, OCTET_STREAM),
                 {"Content-Length": len(data), "Last-Modified": formatdate(mtime, usegmt=True)})


def file_upload(ws, req):
    data = req.body if isinstance(req.body, bytes) else b""
    ws.files.file_write(_files_path(req), data, truthy(req.query.get("overwrite", "false")))
    return Reply(204)


def file_delete(ws, req):
    ws.files.file_delete(_files_path(req))
    return Reply(204)


def file_other(ws, req):
    ws.files.files_path_check(_files_path(req))
    raise MethodNotAllowed("Method %s is not allowed on files." % req.method)


def directory_list(ws, req):
    contents = ws.files.directory_list(_files_path(req))
    return {"contents": contents} if contents else {}


def directory_check(ws, req):
    ws.files.directory_check(_files_path(req))
    return Reply(200)


def directory_create(ws, req):
    ws.files.directory_create(_files_path(req))
    return Reply(204)


def directory_delete(ws, req):
    ws.files.directory_delete(_files_path(req))
    return Reply(204)


def directory_other(ws, req):
    path = _files_path(req)
    ws.files.files_path_check(path.rstrip("/") or path)
    raise MethodNotAllowed("Method %s is not allowed on directories." % req.method)


# ------------------------------------------------------------------ Workspace 2.0

def workspace_import(ws, req):
    """JSON (base64 ``content``) or multipart (the SDK's ``w.workspace.upload``)."""
    args = req.args
    content = args.get("content") or b""
    data = content if isinstance(content, bytes) else base64.b64decode(content)
    ws.files.workspace_import(args.get("path"), (args.get("format") or "SOURCE").upper(),
                              (args.get("language") or "").upper() or None, data,
                              truthy(args.get("overwrite")))
    return {}


def workspace_export(ws, req):
    data, language = ws.files.workspace_export(req.args.get("path"))
    if truthy(req.args.get("direct_download")):
        return Reply(200, Raw(data, OCTET_STREAM))
    return {"content": base64.b64encode(data).decode("ascii"),
            "file_type": "py" if language == "PYTHON" else ""}


def workspace_get_status(ws, req):
    return ws.files.workspace_status(req.args.get("path"))


def workspace_list(ws, req):
    objects = ws.files.workspace_list(req.args.get("path"))
    return {"objects": objects} if objects else {}


def workspace_mkdirs(ws, req):
    ws.files.workspace_mkdirs(req.args.get("path"))
    return {}


def workspace_delete(ws, req):
    ws.files.workspace_delete(req.args.get("path"), truthy(req.args.get("recursive")))
    return {}


# ------------------------------------------------------------------ libraries, identity

def libraries_cluster_status(ws, req):
    cluster_id = _cluster_id(req.args)
    return {"cluster_id": cluster_id, "library_statuses": ws.files.library_statuses(cluster_id)}


def scim_me(ws, req):
    return ws.files.me()


def well_known_config(ws, req):
    return {}


# ------------------------------------------------------------------ model serving

def serving_list(ws, req):
    return {"endpoints": ws.serving.endpoints()}


def serving_get(ws, req):
    return ws.serving.endpoint(req.params["name"])


def serving_invoke(ws, req):
    answer = ws.serving.invoke(req.params["name"], req.body.get("messages"))
    return Reply(200, answer, {"served-model-name": answer["model"]})


# ------------------------------------------------------------------ control API (/_local/...)

def control_evict(ws, req):
    return {"evicted": ws.evict(req.body.get("context_id"))}


def control_config(ws, req):
    try:
        return {"config": ws.configure(**req.body)}
    except (ValueError, TypeError) as e:
        raise InvalidParameter(str(e))


def control_cluster_state(ws, req):
    try:
        ws.set_cluster_state(req.body.get("cluster_id"), req.body.get("state"))
    except ValueError as e:
        raise InvalidParameter(str(e))
    return {}


def control_inject(ws, req):
    body = req.body
    if "path" not in body:
        raise InvalidParameter("path is required")
    kwargs = {k: body[k] for k in ("method", "count", "status", "retry_after", "body", "mode")
              if k in body}
    try:
        return {"rule": ws.inject(body["path"], **kwargs)}
    except ValueError as e:
        raise InvalidParameter(str(e))


def control_throttle(ws, req):
    body = req.body
    if "path" not in body:
        raise InvalidParameter("path is required")
    kwargs = {k: body[k] for k in ("method", "count", "http_429") if k in body}
    return {"rule": ws.throttle(body["path"], **kwargs)}


def control_requests(ws, req):
    return {"requests": ws.requests()}


def control_connections(ws, req):
    return {"connections": ws.connections()}


def control_contexts(ws, req):
    return {"contexts": ws.contexts.listing()}


def control_unknown(ws, req):
    raise EndpointNotFound("No control API at %s %s" % (req.method, req.path))


# ------------------------------------------------------------------ the table

def build_routes():
    table = RouteTable()
    add = table.add
    add("GET", "/.well-known/databricks-config", well_known_config, family="public",
        raw_body=True)

    for version in ("2.0", "2.1"):
        prefix = "/api/%s/clusters/" % version
        add("GET", prefix + "list", clusters_list)
        add("GET", prefix + "get", clusters_get)
        add("POST", prefix + "start", clusters_start)
        add("POST", prefix + "restart", clusters_restart)
        add("POST", prefix + "events", clusters_events)
        add("*", prefix + "{op:path}", clusters_unknown)

    add("POST", "/api/1.2/contexts/create", contexts_create, family="1.2")
    add("GET", "/api/1.2/contexts/status", contexts_status, family="1.2")
    add("POST", "/api/1.2/contexts/destroy", contexts_destroy, family="1.2")
    add("POST", "/api/1.2/commands/execute", commands_execute, family="1.2")
    add("GET", "/api/1.2/commands/status", commands_status, family="1.2")
    add("POST", "/api/1.2/commands/cancel", commands_cancel, family="1.2")

    add("GET", "/api/2.0/dbfs/get-status", dbfs_get_status, family="dbfs")
    add("GET", "/api/2.0/dbfs/list", dbfs_list, family="dbfs")
    add("GET", "/api/2.0/dbfs/read", dbfs_read, family="dbfs")
    add("POST", "/api/2.0/dbfs/put", dbfs_put, family="dbfs")
    add("POST", "/api/2.0/dbfs/create", dbfs_create, family="dbfs")
    add("POST", "/api/2.0/dbfs/add-block", dbfs_add_block, family="dbfs")
    add("POST", "/api/2.0/dbfs/close", dbfs_close, family="dbfs")
    add("POST", "/api/2.0/dbfs/delete", dbfs_delete, family="dbfs")
    add("POST", "/api/2.0/dbfs/mkdirs", dbfs_mkdirs, family="dbfs")
    add("POST", "/api/2.0/dbfs/move", dbfs_move, family="dbfs")

    files = "/api/2.0/fs/files/{path:path}"
    add("GET", files, file_download, family="files")
    add("HEAD", files, file_download, family="files")
    add("PUT", files, file_upload, family="files", raw_body=True)
    add("DELETE", files, file_delete, family="files")
    add("*", files, file_other, family="files")
    directories = "/api/2.0/fs/directories/{path:path}"
    add("GET", directories, directory_list, family="files")
    add("HEAD", directories, directory_check, family="files")
    add("PUT", directories, directory_create, family="files")
    add("DELETE", directories, directory_delete, family="files")
    add("*", directories, directory_other, family="files")

    add("POST", "/api/2.0/workspace/import", workspace_import)
    add("GET", "/api/2.0/workspace/export", workspace_export)
    add("GET", "/api/2.0/workspace/get-status", workspace_get_status)
    add("GET", "/api/2.0/workspace/list", workspace_list)
    add("POST", "/api/2.0/workspace/mkdirs", workspace_mkdirs)
    add("POST", "/api/2.0/workspace/delete", workspace_delete)

    add("GET", "/api/2.0/libraries/cluster-status", libraries_cluster_status)
    add("GET", "/api/2.0/preview/scim/v2/Me", scim_me)

    add("GET", "/api/2.0/serving-endpoints", serving_list)
    add("GET", "/api/2.0/serving-endpoints/{name}", serving_get)
    add("POST", "/serving-endpoints/{name}/invocations", serving_invoke)

    add("POST", "/_local/evict", control_evict)
    add("POST", "/_local/config", control_config)
    add("POST", "/_local/clusters/state", control_cluster_state)
    add("POST", "/_local/inject", control_inject)
    add("POST", "/_local/throttle", control_throttle)
    add("GET", "/_local/requests", control_requests)
    add("GET", "/_local/connections", control_connections)
    add("GET", "/_local/contexts", control_contexts)
    add("*", "/_local/{rest:path}", control_unknown)
    return table


ROUTES = build_routes()
