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

Refusals are domain errors (``errors.py``); the wire layer answers them with the documented error
codes of each API (RESOURCE_DOES_NOT_EXIST, RESOURCE_ALREADY_EXISTS, MAX_READ_SIZE_EXCEEDED, ...);
the exact message texts are plausible, not verified.
"""

import base64
import os
import shutil
import threading
import uuid

from . import paths
from .config import OWNER, USER_ID
from .errors import (DirectoryNotEmpty, InvalidParameter, MaxBlockSizeExceeded,
                     MaxReadSizeExceeded, ResourceAlreadyExists, ResourceDoesNotExist)

DBFS_MAX_READ = 1024 * 1024
DBFS_MAX_BLOCK = 1024 * 1024
NOTEBOOK_HEADER = {"PYTHON": "# Databricks notebook source", "SQL": "-- Databricks notebook source",
                   "SCALA": "// Databricks notebook source", "R": "# Databricks notebook source"}
NOTEBOOK_SUFFIX = {".py": "PYTHON", ".sql": "SQL", ".scala": "SCALA", ".r": "R"}


def _not_found(path):
    return ResourceDoesNotExist("No file or directory exists on path %s." % path)


def truthy(value):
    """A boolean flag as the APIs take it: ``true`` (JSON) or ``"true"`` (a query string)."""
    return value is True or str(value).lower() == "true"


def _mtime_ms(host):
    return int(os.path.getmtime(host) * 1000)


class Files:
    """DBFS, Files and Workspace over the state directory, plus libraries and the current user.

    ``clusters``: the workspace's ``Clusters`` (libraries/cluster-status names a cluster)."""

    def __init__(self, clusters):
        self._clusters = clusters
        self._tmpdir = None
        self._lock = threading.Lock()
        self._dbfs_streams = {}  # dbfs/create handle -> host path, until dbfs/close
        self._dbfs_last_handle = 0

    def start(self, state_dir):
        self._tmpdir = state_dir

    # ----- DBFS 2.0 (dbfs:/ paths; /Volumes paths too, as the real DBFS API accepts them)

    def _dbfs_host(self, path):
        if not isinstance(path, str) or not path:
            raise InvalidParameter("Missing required field: path")
        if path.startswith("/Volumes/"):
            return paths.host_path(self._tmpdir, None, path)
        rel = path[len("dbfs:"):] if path.startswith("dbfs:") else path
        if not rel.startswith("/"):
            raise InvalidParameter("Path must be absolute: %s" % path)
        return paths.host_path(self._tmpdir, None, "/dbfs" + rel)

    @staticmethod
    def _dbfs_display(path):
        return path[len("dbfs:"):] if path.startswith("dbfs:") else path

    @staticmethod
    def _dbfs_info(display, host):
        is_dir = os.path.isdir(host)
        return {"path": display, "is_dir": is_dir,
                "file_size": 0 if is_dir else os.path.getsize(host),
                "modification_time": _mtime_ms(host)}

    def dbfs_status(self, path):
        host = self._dbfs_host(path)
        if not os.path.exists(host):
            raise _not_found(self._dbfs_display(path))
        return self._dbfs_info(self._dbfs_display(path).rstrip("/") or "/", host)

    def dbfs_list(self, path):
        host = self._dbfs_host(path)
        display = self._dbfs_display(path).rstrip("/")
        if not os.path.exists(host):
            raise _not_found(display or "/")
        if not os.path.isdir(host):
            return [self._dbfs_info(display, host)]
        return [self._dbfs_info(display + "/" + name, os.path.join(host, name))
                for name in sorted(os.listdir(host))]

    def dbfs_read(self, path, offset=None, length=None):
        """Up to ``length`` bytes (default 512 KiB, at most 1 MiB) from ``offset``."""
        host = self._dbfs_host(path)
        try:
            offset = int(offset or 0)
            length = int(length or 512 * 1024)
        except ValueError:
            raise InvalidParameter("offset and length must be integers")
        if length > DBFS_MAX_READ:
            raise MaxReadSizeExceeded("Cannot read more than 1.0MiB")
        if offset < 0 or length < 0:
            raise InvalidParameter("offset and length must be non-negative")
        if not os.path.isfile(host):
            raise _not_found(self._dbfs_display(path))
        with open(host, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def _dbfs_new_file(self, path, overwrite):
        host = self._dbfs_host(path)
        if os.path.isdir(host) or (os.path.exists(host) and not overwrite):
            raise ResourceAlreadyExists("A file or directory already exists at the input path "
                                        "%s." % self._dbfs_display(path))
        os.makedirs(os.path.dirname(host), exist_ok=True)
        return host

    @staticmethod
    def _decoded(contents, limit):
        try:
            data = base64.b64decode(contents or "", validate=True)
        except (ValueError, TypeError):
            raise InvalidParameter("contents must be base64")
        if len(data) > limit:
            raise MaxBlockSizeExceeded("The block of data exceeds 1.0MiB.")
        return data

    def dbfs_put(self, path, contents, overwrite):
        """``contents``: base64, at most 1 MiB decoded."""
        data = self._decoded(contents, DBFS_MAX_BLOCK)
        host = self._dbfs_new_file(path, overwrite)
        with open(host, "wb") as f:
            f.write(data)

    def dbfs_create(self, path, overwrite):
        """An empty file and the handle ``add-block`` appends to; ``close`` ends it."""
        host = self._dbfs_new_file(path, overwrite)
        open(host, "wb").close()
        with self._lock:
            self._dbfs_last_handle += 1
            handle = self._dbfs_last_handle
            self._dbfs_streams[handle] = host
        return handle

    def _dbfs_stream(self, handle):
        with self._lock:
            host = self._dbfs_streams.get(handle)
        if host is None:
            raise ResourceDoesNotExist("No stream with handle %s." % handle)
        return host

    def dbfs_add_block(self, handle, data):
        host = self._dbfs_stream(handle)
        with open(host, "ab") as f:
            f.write(self._decoded(data, DBFS_MAX_BLOCK))

    def dbfs_close(self, handle):
        self._dbfs_stream(handle)
        with self._lock:
            self._dbfs_streams.pop(handle, None)

    def dbfs_delete(self, path, recursive):
        host = self._dbfs_host(path)
        if not os.path.exists(host):
            return  # deleting a missing path succeeds, as documented
        if os.path.isdir(host):
            if os.listdir(host) and not recursive:
                raise DirectoryNotEmpty("Directory %s is not empty; use recursive."
                                        % self._dbfs_display(path))
            shutil.rmtree(host)
        else:
            os.remove(host)

    def dbfs_mkdirs(self, path):
        host = self._dbfs_host(path)
        if os.path.isfile(host):
            raise ResourceAlreadyExists("A file already exists at %s." % self._dbfs_display(path))
        os.makedirs(host, exist_ok=True)

    def dbfs_move(self, source_path, destination_path):
        source = self._dbfs_host(source_path)
        target = self._dbfs_host(destination_path)
        if not os.path.exists(source):
            raise _not_found(self._dbfs_display(source_path))
        if os.path.exists(target):
            raise ResourceAlreadyExists("A file or directory already exists at %s."
                                        % self._dbfs_display(destination_path))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)

    # ----- Files API (/Volumes, /Workspace, /dbfs)

    def files_path_check(self, path):
        """InvalidParameter unless the Files API serves ``path``."""
        self._files_host(path)

    def _files_host(self, path):
        host = paths.host_path(self._tmpdir, None, path)
        if host is None or not path.startswith(("/Volumes/", "/Workspace/", "/dbfs/")):
            raise InvalidParameter("Invalid path: %s. The Files API accepts /Volumes/..., "
                                   "/Workspace/... and /dbfs/... paths." % path)
        return host

    def file_read(self, path):
        """(bytes, modification time in seconds) of the file at ``path``."""
        host = self._files_host(path)
        if not os.path.isfile(host):
            raise ResourceDoesNotExist("The file being accessed is not found.")
        with open(host, "rb") as f:
            return f.read(), os.path.getmtime(host)

    def file_write(self, path, data, overwrite):
        """Write the whole file (parents made), atomically."""
        host = self._files_host(path)
        if os.path.isdir(host):
            raise ResourceAlreadyExists("A directory already exists at %s." % path)
        if os.path.exists(host) and not overwrite:
            raise ResourceAlreadyExists("The file being created already exists.")
        os.makedirs(os.path.dirname(host), exist_ok=True)
        with open(host + ".upload", "wb") as f:
            f.write(data)
        os.replace(host + ".upload", host)

    def file_delete(self, path):
        host = self._files_host(path)
        if not os.path.isfile(host):
            raise ResourceDoesNotExist("The file being accessed is not found.")
        os.remove(host)

    def _directory_host(self, path):
        host = self._files_host(path.rstrip("/") or path)
        if not os.path.isdir(host):
            raise ResourceDoesNotExist("The directory being accessed is not found.")
        return host

    def directory_check(self, path):
        self._directory_host(path)

    def directory_list(self, path):
        """[{path, name, is_directory, last_modified, file_size}] of the directory's entries."""
        host = self._directory_host(path)
        base = path.rstrip("/")
        contents = []
        for name in sorted(os.listdir(host)):
            child = os.path.join(host, name)
            entry = {"path": base + "/" + name, "name": name,
                     "is_directory": os.path.isdir(child), "last_modified": _mtime_ms(child)}
            if not entry["is_directory"]:
                entry["file_size"] = os.path.getsize(child)
            contents.append(entry)
        return contents

    def directory_create(self, path):
        host = self._files_host(path.rstrip("/") or path)
        if os.path.isfile(host):
            raise ResourceAlreadyExists("A file already exists at %s." % path)
        os.makedirs(host, exist_ok=True)

    def directory_delete(self, path):
        host = self._directory_host(path)
        if os.listdir(host):
            raise DirectoryNotEmpty("The directory being deleted is not empty.")
        os.rmdir(host)

    # ----- Workspace 2.0 (/Workspace): files, directories and notebooks (by their source header)

    def _workspace_host(self, path):
        if not isinstance(path, str) or not path.startswith("/"):
            raise InvalidParameter("Path (%s) must be absolute" % path)
        if path.startswith("/Workspace/"):
            path = path[len("/Workspace"):]
        return paths.host_path(self._tmpdir, None, "/Workspace" + path)

    @staticmethod
    def _notebook_language(host):
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

    @staticmethod
    def _workspace_missing(path):
        return ResourceDoesNotExist("Path (%s) doesn't exist." % path)

    def workspace_import(self, path, fmt, language, data, overwrite):
        """Store ``data`` at ``path``: a notebook (SOURCE, or AUTO with a source header, stored
        with its header and without its extension) or a file (RAW, AUTO)."""
        if fmt not in ("SOURCE", "AUTO", "RAW"):
            raise InvalidParameter("The local workspace imports SOURCE, AUTO and RAW, not %s"
                                   % fmt)
        notebook = None
        if fmt == "SOURCE":
            if not language:
                raise InvalidParameter("The language field is required when format is SOURCE")
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
            raise ResourceDoesNotExist("The parent folder (%s) does not exist."
                                       % os.path.dirname(path))
        if os.path.exists(host) and not overwrite:
            raise ResourceAlreadyExists("%s already exists." % path)
        with open(host, "wb") as f:
            f.write(data)

    def workspace_export(self, path):
        """(bytes, notebook language or None) of the object at ``path``."""
        host = self._workspace_host(path)
        if not os.path.isfile(host):
            raise self._workspace_missing(path)
        with open(host, "rb") as f:
            return f.read(), self._notebook_language(host)

    def workspace_status(self, path):
        host = self._workspace_host(path)
        if not os.path.exists(host):
            raise self._workspace_missing(path)
        return self._workspace_object(path, host)

    def workspace_list(self, path):
        host = self._workspace_host(path)
        if not os.path.isdir(host):
            raise self._workspace_missing(path)
        base = path.rstrip("/")
        return [self._workspace_object(base + "/" + name, os.path.join(host, name))
                for name in sorted(os.listdir(host))]

    def workspace_mkdirs(self, path):
        host = self._workspace_host(path)
        if os.path.isfile(host):
            raise ResourceAlreadyExists("%s already exists as a file." % path)
        os.makedirs(host, exist_ok=True)

    def workspace_delete(self, path, recursive):
        host = self._workspace_host(path)
        if not os.path.exists(host):
            raise self._workspace_missing(path)
        if os.path.isdir(host):
            if os.listdir(host) and not recursive:
                raise DirectoryNotEmpty("Folder (%s) is not empty." % path)
            shutil.rmtree(host)
        else:
            os.remove(host)

    # ----- libraries and the current user

    def library_statuses(self, cluster_id):
        """No cluster-installed libraries: ``%pip`` installs are notebook-scoped, not listed."""
        self._clusters.get(cluster_id)
        return []

    @staticmethod
    def me():
        return {"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "id": USER_ID, "userName": OWNER, "displayName": OWNER.split("@")[0].title(),
                "active": True,
                "emails": [{"type": "work", "value": OWNER, "primary": True}],
                "name": {"givenName": OWNER.split("@")[0].title()},
                "groups": [{"display": "users", "type": "direct", "value": "1001",
                            "$ref": "Groups/1001"}],
                "entitlements": [{"value": "allow-cluster-create"},
                                 {"value": "workspace-access"}]}
