#!/usr/bin/env python3
"""Resolve a Databricks cluster name (or part of it) to cluster ids, as one JSON object on stdout.

    python find_cluster.py [--profile PROFILE] --name SUBSTRING
    python find_cluster.py [--profile PROFILE] --cluster-id ID   # one cluster, by id
    python find_cluster.py [--profile PROFILE]          # the cluster whose id is $DATABRICKS_CLUSTER_ID

One match answers {"status": "Found", "cluster_id", "cluster_name", "state", "all_purpose",
"access_mode", ...}; several answer {"status": "Ambiguous", "matches": [...]}; none answers
{"status": "ClusterNotFound"}. An empty --profile means the SDK's default auth. The logic lives in
dbx_repl.py (`find-cluster`), next to this file; its tips name that file.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dbx_repl  # noqa: E402


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    return dbx_repl.main(["find-cluster", *argv])


def _console_main():
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
