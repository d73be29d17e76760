"""Files over REST: DBFS, the Files API, the Workspace API, plus the small identity/library calls.

Every endpoint here reads and writes the same host directories as the paths inside a cluster
(``paths.py``): ``dbfs:/x`` and ``/dbfs/x`` are ``<state>/dbfs/x``, ``/Volumes/...`` is
``<state>/Volumes/...`` and ``/Workspace/...`` is ``<state>/Workspace/...``. A file written in a
context with ``dbutils.fs.put`` or ``open('/Volumes/...')`` reads back through these calls, and
the other way round.

* DBFS 2.0: ``get-status``, ``list``, ``read``, ``put``, ``create``/``add-block``/``close``,
  ``delete``, ``mkdirs``, ``move`` (JSON, base64 contents, 1 MiB per read/block);
* Files API: ``/api/2.0/fs/files{path}`` GET/PUT/HEAD/DELETE and
  ``/api/2.0/fs/directories{path}`` GET/PUT/HEAD/DELETE (raw bytes, metadata in headers);
* Workspace 2.0: ``import`` (JSON or multipart), ``export``, ``get-status``, ``list``,
  ``mkdirs``, ``delete``;
* ``GET /api/2.0/libraries/cluster-status`` and ``GET /api/2.0/preview/scim/v2/Me``.

Error answers follow the documented error codes (RESOURCE_DOES_NOT_EXIST, RESOURCE_ALREADY_EXISTS,
MAX_READ_SIZE_EXCEEDED, ...); the exact message texts are plausible, not verified.
"""

import base64
import email.parser
import email.policy
import os
import shutil
import uuid
from email.utils import formatdate

from . import paths
from .cluster import OWNER
from .errors import ApiError, param_error as _param_error

DBFS_MAX_READ = 1024 * 1024
DBFS_MAX_BLOCK = 1024 * 1024
FILES_PREFIX = "/api/2.0/fs/files"
DIRECTORIES_PREFIX = "/api/2.0/fs/directories"
NOTEBOOK_HEADER = {"PYTHON": "# Databricks notebook source", "SQL": "-- Databricks notebook source",
                   "SCALA": "// Databricks notebook source", "R": "# Databricks notebook source"}
NOTEBOOK_SUFFIX = {".py": "PYTHON", ".sql": "SQL", ".scala": "SCALA", ".r": "R"}
USER_ID = "4242424242424242"


class RawBody:
    """A response body that is not JSON (a Files API download)."""

    def __init__(self, data, content_type="application/octet-stream"):
        self.data = data
        self.content_type = content_type


def parse_multipart(raw, content_type):
    """A multipart/form-data body as {field: str or bytes} (the SDK's workspace.upload)."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw)
    fields = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        fields[name] = payload if part.get_filename() or name == "content" else payload.decode()
    return fields


def _not_found(path):
    return ApiError(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                          "message": "No file or directory exists on path %s." % path})


def _truthy(value):
    return value is True or str(value).lower() == "true"


def _mtime_ms(host):
    return int(os.path.getmtime(host) * 1000)


class WorkspaceFiles:
    """DBFS, Files and Workspace REST over the state directory (a mixin of LocalWorkspace)."""

    # ----- routing

    def _takes_raw_body(self, method, path):
        return method == "PUT" and path.startswith(FILES_PREFIX + "/")

    def _files_route(self, method, path, query, body):
        """(status, body, headers) for the endpoints of this module, None for any other path."""
        flat = {k: v[-1] for k, v in query.items()}
        if path.startswith(FILES_PREFIX + "/"):
            return self._files_api(method, path[len(FILES_PREFIX):], flat, body)
        if path.startswith(DIRECTORIES_PREFIX + "/"):
            return self._directories_api(method, path[len(DIRECTORIES_PREFIX):], flat)
        args = flat if method == "GET" else body
        handler = {
            ("GET", "/api/2.0/dbfs/get-status"): self._dbfs_get_status,
            ("GET", "/api/2.0/dbfs/list"): self._dbfs_list,
            ("GET", "/api/2.0/dbfs/read"): self._dbfs_read,
            ("POST", "/api/2.0/dbfs/put"): self._dbfs_put,
            ("POST", "/api/2.0/dbfs/create"): self._dbfs_create,
            ("POST", "/api/2.0/dbfs/add-block"): self._dbfs_add_block,
            ("POST", "/api/2.0/dbfs/close"): self._dbfs_close,
            ("POST", "/api/2.0/dbfs/delete"): self._dbfs_delete,
            ("POST", "/api/2.0/dbfs/mkdirs"): self._dbfs_mkdirs,
            ("POST", "/api/2.0/dbfs/move"): self._dbfs_move,
            ("POST", "/api/2.0/workspace/import"): self._workspace_import,
            ("GET", "/api/2.0/workspace/export"): self._workspace_export,
            ("GET", "/api/2.0/workspace/get-status"): self._workspace_get_status,
            ("GET", "/api/2.0/workspace/list"): self._workspace_list,
            ("POST", "/api/2.0/workspace/mkdirs"): self._workspace_mkdirs,
            ("POST", "/api/2.0/workspace/delete"): self._workspace_delete,
            ("GET", "/api/2.0/libraries/cluster-status"): self._libraries_cluster_status,
            ("GET", "/api/2.0/preview/scim/v2/Me"): self._scim_me,
        }.get((method, path))
        if handler is None:
            return None
        answer = handler(args)
        if isinstance(answer, tuple):
            return answer
        return 200, answer, {}

    # ----- DBFS 2.0 (dbfs:/ paths; /Volumes paths too, as the real DBFS API accepts them)

    def _dbfs_host(self, path):
        if not isinstance(path, str) or not path:
            raise _param_error("Missing required field: path")
        if path.startswith("/Volumes/"):
            host = paths.host_path(self._tmpdir, None, path)
        else:
            rel = path[len("dbfs:"):] if path.startswith("dbfs:") else path
            if not rel.startswith("/"):
                raise _param_error("Path must be absolute: %s" % path)
            host = paths.host_path(self._tmpdir, None, "/dbfs" + rel)
        return host

    @staticmethod
    def _dbfs_display(path):
        return path[len("dbfs:"):] if path.startswith("dbfs:") else path

    def _dbfs_info(self, display, host):
        is_dir = os.path.isdir(host)
        return {"path": display, "is_dir": is_dir,
                "file_size": 0 if is_dir else os.path.getsize(host),
                "modification_time": _mtime_ms(host)}

    def _dbfs_get_status(self, args):
        path = args.get("path")
        host = self._dbfs_host(path)
        if not os.path.exists(host):
            raise _not_found(self._dbfs_display(path))
        return self._dbfs_info(self._dbfs_display(path).rstrip("/") or "/", host)

    def _dbfs_list(self, args):
        path = args.get("path")
        host = self._dbfs_host(path)
        display = self._dbfs_display(path).rstrip("/")
        if not os.path.exists(host):
            raise _not_found(display or "/")
        if not os.path.isdir(host):
            return {"files": [self._dbfs_info(display, host)]}
        return {"files": [self._dbfs_info(display + "/" + name, os.path.join(host, name))
                          for name in sorted(os.listdir(host))]}

    def _dbfs_read(self, args):
        path = args.get("path")
        host = self._dbfs_host(path)
        try:
            offset = int(args.get("offset") or 0)
            length = int(args.get("length") or 512 * 1024)
        except ValueError:
            raise _param_error("offset and length must be integers")
        if length > DBFS_MAX_READ:
            raise ApiError(400, {"error_code": "MAX_READ_SIZE_EXCEEDED",
                                 "message": "Cannot read more than 1.0MiB"})
        if offset < 0 or length < 0:
            raise _param_error("offset and length must be non-negative")
        if not os.path.isfile(host):
            raise _not_found(self._dbfs_display(path))
        with open(host, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return {"bytes_read": len(data), "data": base64.b64encode(data).decode("ascii")}

    def _dbfs_new_file(self, path, overwrite):
        host = self._dbfs_host(path)
        if os.path.isdir(host) or (os.path.exists(host) and not _truthy(overwrite)):
            raise ApiError(400, {"error_code": "RESOURCE_ALREADY_EXISTS",
                                 "message": "A file or directory already exists at the input "
                                            "path %s." % self._dbfs_display(path)})
        os.makedirs(os.path.dirname(host), exist_ok=True)
        return host

    @staticmethod
    def _decoded(contents, limit):
        try:
            data = base64.b64decode(contents or "", validate=True)
        except (ValueError, TypeError):
            raise _param_error("contents must be base64")
        if len(data) > limit:
            raise ApiError(400, {"error_code": "MAX_BLOCK_SIZE_EXCEEDED",
                                 "message": "The block of data exceeds 1.0MiB."})
        return data

    def _dbfs_put(self, args):
        data = self._decoded(args.get("contents"), DBFS_MAX_BLOCK)
        host = self._dbfs_new_file(args.get("path"), args.get("overwrite"))
        with open(host, "wb") as f:
            f.write(data)
        return {}

    def _dbfs_create(self, args):
        host = self._dbfs_new_file(args.get("path"), args.get("overwrite"))
        open(host, "wb").close()
        with self._lock:
            self._dbfs_last_handle += 1
            handle = self._dbfs_last_handle
            self._dbfs_streams[handle] = host
        return {"handle": handle}

    def _dbfs_handle(self, args):
        with self._lock:
            host = self._dbfs_streams.get(args.get("handle"))
        if host is None:
            raise ApiError(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                 "message": "No stream with handle %s." % args.get("handle")})
        return host

    def _dbfs_add_block(self, args):
        host = self._dbfs_handle(args)
        with open(host, "ab") as f:
            f.write(self._decoded(args.get("data"), DBFS_MAX_BLOCK))
        return {}

    def _dbfs_close(self, args):
        self._dbfs_handle(args)
        with self._lock:
            self._dbfs_streams.pop(args.get("handle"), None)
        return {}

    def _dbfs_delete(self, args):
        host = self._dbfs_host(args.get("path"))
        if not os.path.exists(host):
            return {}  # deleting a missing path succeeds, as documented
        if os.path.isdir(host):
            if os.listdir(host) and not _truthy(args.get("recursive")):
                raise ApiError(400, {"error_code": "IO_ERROR",
                                     "message": "Directory %s is not empty; use recursive."
                                                % self._dbfs_display(args["path"])})
            shutil.rmtree(host)
        else:
            os.remove(host)
        return {}

    def _dbfs_mkdirs(self, args):
        host = self._dbfs_host(args.get("path"))
        if os.path.isfile(host):
            raise ApiError(400, {"error_code": "RESOURCE_ALREADY_EXISTS",
                                 "message": "A file already exists at %s."
                                            % self._dbfs_display(args["path"])})
        os.makedirs(host, exist_ok=True)
        return {}

    def _dbfs_move(self, args):
        source = self._dbfs_host(args.get("source_path"))
        target = self._dbfs_host(args.get("destination_path"))
        if not os.path.exists(source):
            raise _not_found(self._dbfs_display(args["source_path"]))
        if os.path.exists(target):
            raise ApiError(400, {"error_code": "RESOURCE_ALREADY_EXISTS",
                                 "message": "A file or directory already exists at %s."
                                            % self._dbfs_display(args["destination_path"])})
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
        return {}

    # ----- Files API (/Volumes, /Workspace, /dbfs)

    def _files_host(self, path):
        host = paths.host_path(self._tmpdir, None, path)
        if host is None or not path.startswith(("/Volumes/", "/Workspace/", "/dbfs/")):
            raise ApiError(400, {"error_code": "INVALID_PARAMETER_VALUE",
                                 "message": "Invalid path: %s. The Files API accepts /Volumes/..., "
                                            "/Workspace/... and /dbfs/... paths." % path})
        return host

    @staticmethod
    def _file_headers(host):
        return {"Content-Length": os.path.getsize(host),
                "Last-Modified": formatdate(os.path.getmtime(host), usegmt=True)}

    def _files_api(self, method, path, query, body):
        host = self._files_host(path)
        missing = ApiError(404, {"error_code": "NOT_FOUND",
                                 "message": "The file being accessed is not found."})
        if method in ("GET", "HEAD"):
            if not os.path.isfile(host):
                raise missing
            with open(host, "rb") as f:
                data = f.read()
            return 200, RawBody(data), self._file_headers(host)
        if method == "PUT":
            if os.path.isdir(host):
                raise ApiError(409, {"error_code": "ALREADY_EXISTS",
                                     "message": "A directory already exists at %s." % path})
            if os.path.exists(host) and not _truthy(query.get("overwrite", "false")):
                raise ApiError(409, {"error_code": "ALREADY_EXISTS",
                                     "message": "The file being created already exists."})
            os.makedirs(os.path.dirname(host), exist_ok=True)
            with open(host + ".upload", "wb") as f:
                f.write(body if isinstance(body, bytes) else b"")
            os.replace(host + ".upload", host)
            return 204, None, {}
        if method == "DELETE":
            if not os.path.isfile(host):
                raise missing
            os.remove(host)
            return 204, None, {}
        raise ApiError(405, {"error_code": "BAD_REQUEST",
                             "message": "Method %s is not allowed on files." % method})

    def _directories_api(self, method, path, query):
        host = self._files_host(path.rstrip("/") or path)
        missing = ApiError(404, {"error_code": "NOT_FOUND",
                                 "message": "The directory being accessed is not found."})
        if method == "HEAD":
            if not os.path.isdir(host):
                raise missing
            return 200, None, {}
        if method == "GET":
            if not os.path.isdir(host):
                raise missing
            base = path.rstrip("/")
            contents = []
            for name in sorted(os.listdir(host)):
                child = os.path.join(host, name)
                entry = {"path": base + "/" + name, "name": name,
                         "is_directory": os.path.isdir(child),
                         "last_modified": _mtime_ms(child)}
                if not entry["is_directory"]:
                    entry["file_size"] = os.path.getsize(child)
                contents.append(entry)
            return 200, {"contents": contents} if contents else {}, {}
        if method == "PUT":
            if os.path.isfile(host):
                raise ApiError(409, {"error_code": "ALREADY_EXISTS",
                                     "message": "A file already exists at %s." % path})
            os.makedirs(host, exist_ok=True)
            return 204, None, {}
        if method == "DELETE":
            if not os.path.isdir(host):
                raise missing
            if os.listdir(host):
                raise ApiError(409, {"error_code": "DIRECTORY_NOT_EMPTY",
                                     "message": "The directory being deleted is not empty."})
            os.rmdir(host)
            return 204, None, {}
        raise ApiError(405, {"error_code": "BAD_REQUEST",
                             "message": "Method %s is not allowed on directories." % method})

    # ----- Workspace 2.0 (/Workspace): files, directories and notebooks (by their source header)

    def _workspace_host(self, path):
        if not isinstance(path, str) or not path.startswith("/"):
            raise _param_error("Path (%s) must be absolute" % path)
        if path.startswith("/Workspace/"):
            path = path[len("/Workspace"):]
        return paths.host_path(self._tmpdir, None, "/Workspace" + path)

    def _notebook_language(self, host):
        """The language of a notebook (a file that starts with a notebook source header)."""
        try:
            with open(host, "rb") as f:
                head = f.read(64).decode("utf-8", "replace")
        except OSError:
            return None
        for language, header in NOTEBOOK_HEADER.items():
            if head.startswith(header):
                return language
        return None

    def _workspace_object(self, path, host):
        is_dir = os.path.isdir(host)
        info = {"path": path.rstrip("/") or "/",
                "object_id": int(uuid.uuid5(uuid.NAMESPACE_URL, host).int % 10 ** 15),
                "modified_at": _mtime_ms(host), "created_at": _mtime_ms(host)}
        language = None if is_dir else self._notebook_language(host)
        if is_dir:
            info["object_type"] = "DIRECTORY"
        elif language:
            info.update(object_type="NOTEBOOK", language=language)
        else:
            info.update(object_type="FILE", size=os.path.getsize(host))
        return info

    def _workspace_missing(self, path):
        return ApiError(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                              "message": "Path (%s) doesn't exist." % path})

    def _workspace_import(self, args):
        path = args.get("path")
        fmt = (args.get("format") or "SOURCE").upper()
        language = (args.get("language") or "").upper() or None
        content = args.get("content") or b""
        data = content if isinstance(content, bytes) else base64.b64decode(content)
        if fmt not in ("SOURCE", "AUTO", "RAW"):
            raise _param_error("The local workspace imports SOURCE, AUTO and RAW, not %s" % fmt)
        notebook = None
        if fmt == "SOURCE":
            if not language:
                raise _param_error("The language field is required when format is SOURCE")
            notebook = language
        elif fmt == "AUTO":
            notebook = next((lang for lang, header in NOTEBOOK_HEADER.items()
                             if data.startswith(header.encode())), None)
        if notebook:
            stem, suffix = os.path.splitext(path)
            if NOTEBOOK_SUFFIX.get(suffix.lower()) == notebook:
                path = stem  # a notebook's extension is removed on import
            header = NOTEBOOK_HEADER[notebook].encode()
            if not data.startswith(header):
                data = header + b"\n" + data
        host = self._workspace_host(path)
        if not os.path.isdir(os.path.dirname(host)):
            raise ApiError(404, {"error_code": "RESOURCE_DOES_NOT_EXIST",
                                 "message": "The parent folder (%s) does not exist."
                                            % os.path.dirname(path)})
        if os.path.exists(host) and not _truthy(args.get("overwrite")):
            raise ApiError(400, {"error_code": "RESOURCE_ALREADY_EXISTS",
                                 "message": "%s already exists." % path})
        with open(host, "wb") as f:
            f.write(data)
        return {}

    def _workspace_export(self, args):
        path = args.get("path")
        host = self._workspace_host(path)
        if not os.path.isfile(host):
            raise self._workspace_missing(path)
        with open(host, "rb") as f:
            data = f.read()
        if _truthy(args.get("direct_download")):
            return 200, RawBody(data), {}
        return {"content": base64.b64encode(data).decode("ascii"),
                "file_type": "py" if self._notebook_language(host) == "PYTHON" else ""}

    def _workspace_get_status(self, args):
        path = args.get("path")
        host = self._workspace_host(path)
        if not os.path.exists(host):
            raise self._workspace_missing(path)
        return self._workspace_object(path, host)

    def _workspace_list(self, args):
        path = args.get("path")
        host = self._workspace_host(path)
        if not os.path.isdir(host):
            raise self._workspace_missing(path)
        base = path.rstrip("/")
        objects = [self._workspace_object(base + "/" + name, os.path.join(host, name))
                   for name in sorted(os.listdir(host))]
        return {"objects": objects} if objects else {}

    def _workspace_mkdirs(self, args):
        path = args.get("path")
        host = self._workspace_host(path)
        if os.path.isfile(host):
            raise ApiError(400, {"error_code": "RESOURCE_ALREADY_EXISTS",
                                 "message": "%s already exists as a file." % path})
        os.makedirs(host, exist_ok=True)
        return {}

    def _workspace_delete(self, args):
        path = args.get("path")
        host = self._workspace_host(path)
        if not os.path.exists(host):
            raise self._workspace_missing(path)
        if os.path.isdir(host):
            if os.listdir(host) and not _truthy(args.get("recursive")):
                raise ApiError(400, {"error_code": "DIRECTORY_NOT_EMPTY",
                                     "message": "Folder (%s) is not empty." % path})
            shutil.rmtree(host)
        else:
            os.remove(host)
        return {}

    # ----- libraries and the current user

    def _libraries_cluster_status(self, args):
        """No cluster-installed libraries: ``%pip`` installs are notebook-scoped, not listed."""
        cluster_id = args.get("cluster_id")
        self._cluster_or_error(cluster_id)
        return {"cluster_id": cluster_id, "library_statuses": []}

    def _scim_me(self, args):
        return {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "id": USER_ID, "userName": OWNER, "displayName": OWNER.split("@")[0].title(),
                "active": True,
                "emails": [{"type": "work", "value": OWNER, "primary": True}],
                "name": {"givenName": OWNER.split("@")[0].title()},
                "groups": [{"display": "users", "type": "direct", "value": "1001",
                            "$ref": "Groups/1001"}],
                "entitlements": [{"value": "allow-cluster-create"},
                                 {"value": "workspace-access"}]}
