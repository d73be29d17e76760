"""Shared fixtures: a fresh local workspace per test and an SDK client for it."""

import os
import sys

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from local_workspace import LocalWorkspace  # noqa: E402
from local_workspace.runtime import RuntimeBuildError, ensure_runtime  # noqa: E402
from local_workspace.clusters import default_runtimes  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _default_clusters_runtimes():
    """The default clusters' Databricks Runtimes (15.4 and 17.3), built before the first test
    when missing (once, cached; minutes each, progress on stderr): a cluster builds its runtime
    lazily, and no test waits that long for a context. One that cannot be built here is said
    on stderr; the tests on its clusters then fail with their cluster's state message."""
    for version in default_runtimes():
        try:
            ensure_runtime(version)
        except RuntimeBuildError as e:
            sys.stderr.write("[local workspace] runtime %s: %s\n" % (version, e))


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _running_workspace(**options):
    """Start a LocalWorkspace(**options), yield it, stop it, and check that none of its processes
    survive."""
    ws = LocalWorkspace(**options)
    ws.start()
    try:
        yield ws
    finally:
        ws.stop()
        leaked = [pid for pid in ws.all_pids() if _pid_alive(pid)]
        assert not leaked, "cluster processes still alive after stop(): %s" % leaked


@pytest.fixture
def workspace():
    """A started LocalWorkspace on a free port; teardown checks no context process survives."""
    yield from _running_workspace()


def _client_for(ws):
    from databricks.sdk import WorkspaceClient
    from databricks.sdk.core import Config

    config = Config(host=ws.host, token=ws.token, retry_timeout_seconds=20)
    return WorkspaceClient(config=config)


@pytest.fixture
def sdk_client(workspace):
    """A real databricks-sdk WorkspaceClient (PAT auth) pointed at the local workspace."""
    return _client_for(workspace)


@pytest.fixture(scope="module")
def spark_workspace():
    """One local workspace for a whole test module: its cluster's Spark (a JVM) starts once.

    Teardown checks that no process of it (driver, JVM, context) survives stop()."""
    yield from _running_workspace()


@pytest.fixture(scope="module")
def spark_client(spark_workspace):
    """A real databricks-sdk WorkspaceClient on the module's shared local workspace."""
    return _client_for(spark_workspace)


# -- the CLI, run as a subprocess against the local workspace ---------------------------------------

def _repl_on(ws, tmp_path):
    from repl_harness import Repl
    project = tmp_path / "project"
    project.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    return Repl(ws, project, home)


def _live_session(repl):
    created = repl.create()
    assert created.status == "Created", created
    yield repl
    if repl.session().get("status") == "active":
        repl.run("destroy")


@pytest.fixture
def repl(workspace, tmp_path):
    """The CLI bound to a fresh project dir (and an empty HOME) on the local workspace."""
    return _repl_on(workspace, tmp_path)


@pytest.fixture
def session(repl):
    """A live session on the running all-purpose cluster; destroyed at teardown."""
    yield from _live_session(repl)


@pytest.fixture
def spark_session(spark_workspace, tmp_path):
    """A live session of its own (fresh project dir and HOME) on the module's shared workspace, so
    the module's Spark tests share one JVM; give them one xdist_group so one worker runs them."""
    yield from _live_session(_repl_on(spark_workspace, tmp_path))
