"""The clusters of the local workspace: their records, lifecycle, events and readiness.

The backend behind clusters list/get/start/restart/events. It owns the cluster records (the
``clusters/get`` shape), their state machine (TERMINATED -> PENDING -> RUNNING after
``start_delay``, RUNNING -> RESTARTING -> RUNNING), the event log, and when a running cluster
serves the 1.2 API again (``ready_delay`` after it reaches RUNNING). Whoever needs to know when a
cluster changes state (the contexts backend: a cluster that stops running loses its contexts and
its driver) subscribes with ``on_state_change``.

Each cluster runs the Databricks Runtime its ``spark_version`` names (``runtime.py``), built on
the cluster's first start on this machine: meanwhile a starting cluster stays PENDING (its
``state_message`` says what it installs) and the contexts of a cluster already RUNNING stay
``Pending``. When the runtime cannot be had (no interpreter, pip failed), the cluster fails to
start: TERMINATED with a ``termination_reason`` and the reason as its ``state_message``, as a
cluster with a bad configuration does.
"""

import base64
import collections
import copy
import json
import threading
import time

from .config import OWNER
from .errors import ClusterNotFound, ClusterNotReady, InvalidParameter, InvalidState
from .runtime import CONNECT_RUNTIME, Builds, runtime_version, spark_version_of

RUNNING_CLUSTER_ID = "0101-000001-devrun01"
TERMINATED_CLUSTER_ID = "0101-000002-prodoff2"
JOB_CLUSTER_ID = "0101-000003-jobrun03"
SHARED_CLUSTER_ID = "0101-000004-shared04"
DEDICATED_CLUSTER_ID = "0101-000005-dedic173"  # 17.3 LTS, dedicated access mode
STANDARD_CLUSTER_ID = "0101-000006-stand173"  # 17.3 LTS, standard access mode

SPARK_VERSION = spark_version_of("15.4")  # RUNNING_CLUSTER_ID's

CLUSTER_STATES = ("PENDING", "RUNNING", "RESTARTING", "RESIZING", "TERMINATING", "TERMINATED",
                  "ERROR", "UNKNOWN")
RUNNABLE_STATES = ("RUNNING", "RESIZING")
# While a cluster is in one of these states, the 1.2 API answers ClusterNotReadyException.
STARTING_STATES = ("PENDING", "RESTARTING")
SHARED_MODES = ("USER_ISOLATION", "DATA_SECURITY_MODE_STANDARD")

# clusters/events types (compute.EventType) for each state a cluster enters.
_EVENT_OF_STATE = {"PENDING": "STARTING", "RUNNING": "RUNNING", "RESTARTING": "RESTARTING",
                   "TERMINATING": "TERMINATING", "TERMINATED": "TERMINATING",
                   "RESIZING": "RESIZING", "ERROR": "DRIVER_UNAVAILABLE",
                   "UNKNOWN": "DRIVER_NOT_RESPONDING"}


class Clusters:
    """The workspace's clusters. ``config``: the workspace's ``Config`` (start/ready delays)."""

    def __init__(self, config):
        self._config = config
        self._lock = threading.RLock()
        self._clusters = _default_clusters()
        self._events = []  # {cluster_id, timestamp, type, details}, oldest first
        self._ready_at = {}  # cluster id -> time.monotonic() when the 1.2 API serves it again
        self._timers = []
        self._listeners = []
        self._stopping = threading.Event()
        self._builds = Builds()
        for cluster in self._clusters.values():  # each default cluster's history so far
            history = ["CREATING", "RUNNING"] + (["TERMINATING"] if cluster["state"] == "TERMINATED"
                                                 else [])
            for minute, event_type in enumerate(history):
                self._record_event(cluster["cluster_id"], event_type,
                                   {"user": OWNER} if event_type == "CREATING" else {},
                                   timestamp=cluster["start_time"] + minute * 60_000)

    def on_state_change(self, listener):
        """Call ``listener(cluster_id, state)`` after every state change."""
        self._listeners.append(listener)

    def stop(self):
        self._stopping.set()
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._builds.stop()

    # ----- reading

    def get(self, cluster_id):
        """A copy of the cluster's record; ClusterNotFound for an unknown id."""
        with self._lock:
            cluster = self._clusters.get(cluster_id or "")
            if cluster is None:
                raise ClusterNotFound(cluster_id)
            return copy.deepcopy(cluster)

    def all(self):
        with self._lock:
            return [copy.deepcopy(c) for c in self._clusters.values()]

    def list_page(self, states=(), sources=(), page_size=2, page_token=None):
        """clusters/list: {clusters, next_page_token, prev_page_token}, ``page_size`` a page."""
        if page_size < 1 or page_size > 100:
            raise InvalidParameter("page_size must be between 1 and 100")
        offset = 0
        if page_token:
            try:
                offset = int(json.loads(base64.urlsafe_b64decode(page_token.encode()))["offset"])
            except Exception:
                raise InvalidParameter("Invalid page token: %s" % page_token)
        clusters = [c for c in self.all()
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

    def events(self, cluster_id=None):
        """What happened to the clusters, oldest first: [{cluster_id, timestamp, type, details}]."""
        with self._lock:
            return [dict(e) for e in self._events
                    if cluster_id is None or e["cluster_id"] == cluster_id]

    def events_page(self, cluster_id, query):
        """clusters/events: {events, next_page, total_count}, newest first by default;
        ``next_page`` is the body of the next request (offset/limit paging)."""
        self.get(cluster_id)
        try:
            offset = int(query.get("offset") or 0)
            limit = int(query.get("limit") or query.get("page_size") or 50)
        except (TypeError, ValueError):
            raise InvalidParameter("offset and limit must be integers")
        if offset < 0 or not 1 <= limit <= 500:
            raise InvalidParameter("limit must be between 1 and 500 and offset non-negative")
        types = set(query.get("event_types") or [])
        start, end = query.get("start_time"), query.get("end_time")
        events = [e for e in self.events(cluster_id)
                  if (not types or e["type"] in types)
                  and (start is None or e["timestamp"] >= int(start))
                  and (end is None or e["timestamp"] <= int(end))]
        if (query.get("order") or "DESC") == "DESC":
            events.reverse()
        answer = {"events": events[offset:offset + limit], "total_count": len(events)}
        if offset + limit < len(events):
            answer["next_page"] = dict(query, offset=offset + limit, limit=limit)
        return answer

    def check_ready(self, cluster_id):
        """ClusterNotReady while the cluster is PENDING or RESTARTING, or RUNNING for less than
        ``ready_delay`` seconds (terraform-provider-databricks #217: S7). An unknown cluster
        passes: the call itself refuses it."""
        with self._lock:
            cluster = self._clusters.get(cluster_id or "")
            if cluster is None:
                return
            state = cluster["state"]
            warming = (state in RUNNABLE_STATES
                       and time.monotonic() < self._ready_at.get(cluster_id, 0))
        if state in STARTING_STATES or warming:
            raise ClusterNotReady(cluster_id, state)

    # ----- runtimes

    def runtime_of(self, cluster_id):
        """The Databricks Runtime the cluster's ``spark_version`` names ("15.4"), or None when
        the local workspace has no such runtime."""
        with self._lock:
            return runtime_version(self._record(cluster_id)["spark_version"])

    def runtimes_ready(self, cluster_id):
        """Is every runtime the cluster needs built here? (never builds)"""
        with self._lock:
            return self._builds.ready(_runtimes_needed(self._record(cluster_id)))

    def when_runtimes_ready(self, cluster_id, then):
        """Build the runtimes the cluster needs in the background, then ``then()``. When one
        cannot be had, the cluster fails to start (TERMINATED, the reason in its
        ``state_message`` and ``termination_reason``) and ``then`` is never called."""
        with self._lock:
            needed = _runtimes_needed(self._record(cluster_id))
        self._builds.then(needed, then, lambda error: self._runtime_failed(cluster_id, error))

    def _runtime_failed(self, cluster_id, error):
        with self._lock:
            spark_version = self._record(cluster_id)["spark_version"]
        message = "The Databricks Runtime %s cannot start here: %s" % (spark_version, error)
        self.set_state(cluster_id, "TERMINATED", message,
                       reason={"code": error.code, "type": "CLIENT_ERROR",
                               "parameters": {"databricks_error_message": message}})

    # ----- lifecycle

    def start(self, cluster_id):
        """TERMINATED -> PENDING -> RUNNING after ``start_delay``; any other state is refused
        with INVALID_STATE "Cluster X is in unexpected state Running." (databricks/cli
        PR #6288, sdk-py PR #283, databrickslabs/migrate #204)."""
        with self._lock:
            cluster = self._record(cluster_id)
            if cluster["state"] != "TERMINATED":
                raise _unexpected_state(cluster)
            cluster["start_time"] = _now_ms()
        self.set_state(cluster_id, "PENDING")
        self._after_start_delay(cluster_id, "PENDING")

    def restart(self, cluster_id):
        """RUNNING -> RESTARTING (every context shuts down) -> RUNNING after ``start_delay``.
        A cluster that is not running is refused like ``start`` refuses a running one."""
        with self._lock:
            cluster = self._record(cluster_id)
            if cluster["state"] not in RUNNABLE_STATES:
                raise _unexpected_state(cluster)
        self.set_state(cluster_id, "RESTARTING")
        self._after_start_delay(cluster_id, "RESTARTING")

    def set_state(self, cluster_id, state, message=None, reason=None):
        """Any state; ValueError for an unknown state, ClusterNotFound for an unknown cluster.
        ``reason``: a TERMINATED cluster's ``termination_reason`` (default: a user's request)."""
        if state not in CLUSTER_STATES:
            raise ValueError("unknown cluster state %r" % state)
        with self._lock:
            cluster = self._record(cluster_id)
            cluster["state"] = state
            cluster["state_message"] = message if message is not None else _state_message(state)
            now = _now_ms()
            if state == "TERMINATED":
                cluster["terminated_time"] = now
                cluster["termination_reason"] = reason or {
                    "code": "USER_REQUEST", "type": "SUCCESS", "parameters": {"username": OWNER}}
            elif state == "RUNNING":
                cluster.pop("termination_reason", None)
                cluster["last_restarted_time"] = now
                self._ready_at[cluster_id] = time.monotonic() + self._config["ready_delay"]
            self._record_event(cluster_id, _EVENT_OF_STATE.get(state, state),
                               _event_details(cluster, state))
        for listener in self._listeners:
            listener(cluster_id, state)

    def _record(self, cluster_id):
        cluster = self._clusters.get(cluster_id or "")
        if cluster is None:
            raise ClusterNotFound(cluster_id)
        return cluster

    def _after_start_delay(self, cluster_id, from_state):
        timer = threading.Timer(self._config["start_delay"], self._started,
                                args=(cluster_id, from_state))
        timer.daemon = True
        with self._lock:
            self._timers.append(timer)
        timer.start()

    def _started(self, cluster_id, from_state):
        with self._lock:
            cluster = self._clusters.get(cluster_id)
            if cluster is None or cluster["state"] != from_state or self._stopping.is_set():
                return
            ready = self._builds.ready(_runtimes_needed(cluster))
            if not ready:
                # Its runtime's first start on this machine builds it: still starting till then.
                cluster["state_message"] = (
                    "Installing the Databricks Runtime %s LTS environment (its first start on "
                    "this machine takes a few minutes)" % runtime_version(cluster["spark_version"]))
        if not ready:
            self.when_runtimes_ready(cluster_id, lambda: self._started(cluster_id, from_state))
            return
        self.set_state(cluster_id, "RUNNING")

    def _record_event(self, cluster_id, event_type, details, timestamp=None):
        with self._lock:
            self._events.append({"cluster_id": cluster_id,
                                 "timestamp": _now_ms() if timestamp is None else timestamp,
                                 "type": event_type, "details": details})


def _runtimes_needed(cluster):
    """The runtimes a cluster's processes run on: the one its ``spark_version`` names (None
    when the local workspace has no such runtime), and on a standard access mode cluster the
    one whose Spark runs its Spark Connect server (``Contexts.runtime_for``)."""
    own = runtime_version(cluster["spark_version"])
    if is_standard(cluster) and own != CONNECT_RUNTIME:
        return [own, CONNECT_RUNTIME]
    return [own]


def is_standard(cluster):
    """Standard (formerly shared) access mode: Python's ``spark`` is a Spark Connect session."""
    return cluster["data_security_mode"] in SHARED_MODES


def _unexpected_state(cluster):
    return InvalidState("Cluster %s is in unexpected state %s."
                        % (cluster["cluster_id"], cluster["state"].capitalize()))


def _event_details(cluster, state):
    if state in ("PENDING", "RESTARTING"):
        return {"user": OWNER}
    if state == "RUNNING":
        return {"current_num_workers": cluster["num_workers"],
                "target_num_workers": cluster["num_workers"]}
    if state == "TERMINATED":
        return {"reason": cluster.get("termination_reason", {})}
    return {}


def _page_token(offset):
    return base64.urlsafe_b64encode(json.dumps({"offset": offset}).encode()).decode()


def _now_ms():
    return int(time.time() * 1000)


def _state_message(state):
    return {"PENDING": "Starting Spark", "RESTARTING": "Restarting Spark",
            "TERMINATING": "Terminating", "TERMINATED": "Terminated by user",
            "RESIZING": "Resizing cluster"}.get(state, "")


def _cluster(cluster_id, name, state, runtime, shape):
    """A cluster's details; ``runtime``: its Databricks Runtime ("15.4"); ``shape``: source,
    mode (access mode) and optionally single_user, num_workers, autotermination."""
    source, mode, single_user = shape["source"], shape["mode"], shape.get("single_user")
    num_workers, autotermination = shape.get("num_workers", 2), shape.get("autotermination", 120)
    now = _now_ms()
    details = {
        "cluster_id": cluster_id,
        "cluster_name": name,
        "state": state,
        "state_message": _state_message(state),
        "cluster_source": source,
        "data_security_mode": mode,
        "spark_version": spark_version_of(runtime),
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
    """The clusters every local workspace starts with; their runtimes are built on first use."""
    clusters = [
        _cluster(RUNNING_CLUSTER_ID, "analytics-dev", "RUNNING", "15.4",
                 dict(source="UI", mode="SINGLE_USER", single_user=OWNER)),
        _cluster(TERMINATED_CLUSTER_ID, "analytics-prod", "TERMINATED", "15.4",
                 dict(source="UI", mode="DATA_SECURITY_MODE_DEDICATED", single_user=OWNER,
                      num_workers=8)),
        _cluster(JOB_CLUSTER_ID, "job-20250101-run-42", "RUNNING", "15.4",
                 dict(source="JOB", mode="SINGLE_USER", single_user=OWNER, num_workers=1,
                      autotermination=0)),
        _cluster(SHARED_CLUSTER_ID, "shared-analytics", "RUNNING", "15.4",
                 dict(source="UI", mode="USER_ISOLATION", num_workers=4)),
        _cluster(DEDICATED_CLUSTER_ID, "ml-dedicated-17", "RUNNING", "17.3",
                 dict(source="UI", mode="DATA_SECURITY_MODE_DEDICATED", single_user=OWNER)),
        _cluster(STANDARD_CLUSTER_ID, "bi-standard-17", "RUNNING", "17.3",
                 dict(source="UI", mode="DATA_SECURITY_MODE_STANDARD", num_workers=4)),
    ]
    return collections.OrderedDict((c["cluster_id"], c) for c in clusters)


def default_runtimes():
    """The runtimes of the default clusters (what ``runtime`` builds by default), oldest first."""
    versions = {runtime_version(c["spark_version"]) for c in _default_clusters().values()}
    return sorted(versions, key=lambda v: tuple(map(int, v.split("."))))
