"""Where the driver's paths live on the host: everything under the workspace's state directory.

One layout, shared by the context workers (file APIs, ``%sh``, Spark), dbutils and the REST
endpoints (DBFS, Files, Workspace), so a file written one way reads back every other way:

    <state>/dbfs/...                      dbfs:/...  and  /dbfs/...   (FileStore: dbfs/FileStore)
    <state>/Volumes/<cat>/<schema>/<vol>  /Volumes/...
    <state>/Workspace/...                 /Workspace/...
    <state>/clusters/<id>/local_disk0     /local_disk0/...            (per cluster, as on a driver)
    <state>/clusters/<id>/tmp             /tmp                        (per cluster)
    <state>/clusters/<id>/driver          /databricks/driver          (the REPL's working directory)
    <state>/clusters/<id>/root            the cluster's own ``/`` (mount points; see sandbox.py)
"""

import os
import posixpath

SHARED_ROOTS = ("dbfs", "Volumes", "Workspace")
CLUSTER_ROOTS = ("local_disk0", "tmp")
DRIVER_DIR = "/databricks/driver"
# The driver paths that must never reach the host's own root (``/tmp`` is the host's too, but a
# process cannot run without one, so only the sandbox can map it).
MAPPED_PREFIXES = tuple("/" + name for name in SHARED_ROOTS + ("local_disk0",))


def cluster_dir(state_dir, cluster_id):
    """``<state>/clusters/<cluster_id>``: the cluster's own part of the state directory."""
    return os.path.join(state_dir, "clusters", cluster_id)


def driver_dir(state_dir, cluster_id):
    """The host dir behind ``/databricks/driver``, the REPL's working directory."""
    return os.path.join(cluster_dir(state_dir, cluster_id), "driver")


def mounts(state_dir, cluster_id):
    """``[(driver path, host dir)]``: every mapped root of one cluster, shared roots first."""
    own = cluster_dir(state_dir, cluster_id)
    pairs = [("/" + name, os.path.join(state_dir, name)) for name in SHARED_ROOTS]
    pairs += [("/" + name, os.path.join(own, name)) for name in CLUSTER_ROOTS]
    pairs.append((DRIVER_DIR, driver_dir(state_dir, cluster_id)))
    return pairs


def make_dirs(state_dir, cluster_id):
    """Create every host dir of ``mounts()`` (idempotent); the cluster's tmp is world-writable
    with the sticky bit, as ``/tmp`` is."""
    for _, host in mounts(state_dir, cluster_id):
        os.makedirs(host, exist_ok=True)
    os.chmod(os.path.join(cluster_dir(state_dir, cluster_id), "tmp"), 0o1777)


def is_mapped(path):
    """True when ``path`` (absolute, normalised or not) names a mapped driver path."""
    norm = posixpath.normpath(path)
    return any(norm == p or norm.startswith(p + "/") for p in MAPPED_PREFIXES)


def host_path(state_dir, cluster_id, path):
    """The host path behind a driver path or URI, or None when it is not a mapped path.

    ``path``: ``dbfs:/x``, ``/dbfs/x``, ``/Volumes/...``, ``/Workspace/...``, ``/local_disk0/...``
    or ``/tmp/...``. ``..`` can never climb out of the root it names (it is normalised first)."""
    if path.startswith("dbfs:"):
        path = "/dbfs/" + path[len("dbfs:"):].lstrip("/")
    if not path.startswith("/"):
        return None
    norm = posixpath.normpath(path)
    parts = norm.strip("/").split("/")
    head = parts[0]
    rest = parts[1:]
    if head in SHARED_ROOTS:
        return os.path.join(state_dir, head, *rest)
    if head in CLUSTER_ROOTS and cluster_id:
        return os.path.join(cluster_dir(state_dir, cluster_id), head, *rest)
    return None


def driver_path(state_dir, cluster_id, host):
    """The driver path a process inside the cluster's view uses for ``host`` (a path under the
    state directory), or None when ``host`` lies outside every mapped root."""
    norm = os.path.normpath(host)
    for driver, root in mounts(state_dir, cluster_id):
        if norm == root or norm.startswith(root + os.sep):
            return driver + norm[len(root):].replace(os.sep, "/")
    return None
