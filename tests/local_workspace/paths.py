"""Where the driver's paths live on the host: everything under the workspace's state directory.

One layout, shared by the context workers (file APIs, ``%sh``, Spark), dbutils and the REST
endpoints (DBFS, Files, Workspace), so a file written one way reads back every other way:

    <state>/dbfs/...                      dbfs:/...  and  /dbfs/...   (FileStore: dbfs/FileStore)
    <state>/Volumes/<cat>/<schema>/<vol>  /Volumes/...
    <state>/Workspace/...                 /Workspace/...
    <state>/clusters/<id>/local_disk0     /local_disk0/...            (per cluster, as on a driver)
    <state>/clusters/<id>/tmp             /tmp                        (per cluster)
"""

import os
import posixpath

SHARED_ROOTS = ("dbfs", "Volumes", "Workspace")
CLUSTER_ROOTS = ("local_disk0", "tmp")


def cluster_dir(state_dir, cluster_id):
    """``<state>/clusters/<cluster_id>``: the cluster's own part of the state directory."""
    return os.path.join(state_dir, "clusters", cluster_id)


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
