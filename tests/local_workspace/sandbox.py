"""How a cluster's processes see the driver's paths (``paths.py``) at their real names.

Scaffolding: today every process runs on the host's own file system view. The mount-namespace
version replaces ``wrap_command``.
"""


def wrap_command(argv, state_dir, cluster_id):
    """The argv that starts ``argv`` inside the cluster's file system view."""
    return list(argv)
