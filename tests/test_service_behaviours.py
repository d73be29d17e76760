"""The real service's awkward behaviours, each through the real databricks-sdk.

One story per behaviour of `tests/local_workspace/README.md` ("Behaviours of the real service"),
plus the SDK's own command-execution examples and integration-test expectations.
"""

import base64
import io
import os
import re
import subprocess
import sys
import time

import pytest
import requests
from databricks.sdk import WorkspaceClient
from databricks.sdk.core import Config
from databricks.sdk.errors import (BadRequest, DatabricksError, InvalidParameterValue,
                                   InvalidState, NotFound, OperationFailed, ResourceAlreadyExists,
                                   ResourceDoesNotExist)
from databricks.sdk.service.compute import (CommandStatus, ContextStatus, EventType, Language,
                                            ResultType, State)
from databricks.sdk.service.workspace import ImportFormat, ObjectType

from local_workspace import RUNNING_CLUSTER_ID, TERMINATED_CLUSTER_ID, paths
from local_workspace.config import OWNER
from test_local_workspace import (new_context, run, status, submit, text, wait_done, wait_for)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SHUTDOWN_FRAME = "ExecContextState.shutdown"
KERNEL_RESTARTING = "jupyter client is not available because the python kernel is not defined"


def host_file(workspace, path):
    """Where a driver path (`/Volumes/...`, `/dbfs/...`, `/Workspace/...`) lives on the host."""
    return paths.host_path(workspace._tmpdir, RUNNING_CLUSTER_ID, path)


def raw(workspace, method, path, **kwargs):
    """One HTTP call with no SDK retries: to see the exact answer the SDK would retry."""
    return requests.request(method, workspace.host + path, timeout=10,
                            headers={"Authorization": "Bearer " + workspace.token}, **kwargs)


# ------------------------------------------------------------------ 1, 2: text and indentation

def test_printed_text_comes_back_without_its_final_newline(sdk_client):
    ctx = new_context(sdk_client)
    assert text(sdk_client, ctx, "print(1)") == "1"
    assert text(sdk_client, ctx, "print('a')\nprint('b')") == "a\nb"
    assert text(sdk_client, ctx, "print('gap\\n')") == "gap\n"  # only the final newline goes


def test_a_uniformly_indented_cell_runs_as_ipython_strips_the_indent(sdk_client):
    ctx = new_context(sdk_client)
    cell = "\n        import json\n        value = json.dumps({'a': 1})\n        print(value)\n"
    assert text(sdk_client, ctx, cell) == '{"a": 1}'


# ------------------------------------------------------------------ 3: plots

def test_plots_come_back_as_their_text_repr_by_default(sdk_client):
    ctx = new_context(sdk_client)
    shown = run(sdk_client, ctx, "import matplotlib.pyplot as plt\n"
                                 "plt.plot([1, 3, 2])\nplt.show()")
    assert shown.result_type == ResultType.TEXT
    assert shown.data == "<Figure size 640x480 with 1 Axes>"
    handle = text(sdk_client, ctx, "plt.plot([1, 2])")
    assert re.fullmatch(r"Out\[\d+\]: \[<matplotlib\.lines\.Line2D .*>\]", handle)


@pytest.mark.parametrize("plots_mode", ["repr", "images"])
def test_a_figure_shown_in_one_step_never_comes_back_in_the_next(sdk_client, workspace,
                                                                  plots_mode):
    workspace.configure(plots_mode=plots_mode)
    ctx = new_context(sdk_client)
    first = run(sdk_client, ctx, "import matplotlib.pyplot as plt\n"
                                 "fig, ax = plt.subplots()\nax.plot([1, 2, 3])\n"
                                 "display([{'rows': 1}])")  # a table wins; the figure stays open
    assert first.result_type == ResultType.TABLE
    second = run(sdk_client, ctx, "print(len(plt.get_fignums()))")
    assert second.result_type == ResultType.TEXT and second.data == "0"


# ------------------------------------------------------------------ 4: shutdown under a command

def test_a_context_evicted_under_a_running_command_ends_it_with_command_cancelled_exception(
        sdk_client, workspace):
    ctx = new_context(sdk_client)
    cmd = submit(sdk_client, ctx, "import time; time.sleep(60)")
    wait_for(lambda: status(sdk_client, ctx, cmd).status == CommandStatus.RUNNING)
    workspace.evict(ctx)
    done = status(sdk_client, ctx, cmd)  # still readable after the context is gone
    assert done.status == CommandStatus.FINISHED
    assert done.results.result_type == ResultType.ERROR
    assert "com.databricks.backend.common.rpc.CommandCancelledException" in done.results.cause
    assert SHUTDOWN_FRAME in done.results.cause and "abortRunningSequence" in done.results.cause
    with pytest.raises(BadRequest, match="disconnected"):
        sdk_client.command_execution.context_status(cluster_id=RUNNING_CLUSTER_ID,
                                                    context_id=ctx)
    with pytest.raises(BadRequest, match="disconnected"):
        submit(sdk_client, ctx, "1")


# ------------------------------------------------------------------ 5: Python restarts

@pytest.mark.slow
def test_restart_python_answers_then_fails_commands_during_the_window_then_starts_fresh(
        sdk_client, workspace):
    workspace.configure(restart_window=1.5)
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "kept = 'before restart'")
    old_pid = workspace.context_pids()[ctx]
    restarted = run(sdk_client, ctx, "dbutils.library.restartPython()")
    assert restarted.result_type == ResultType.TEXT
    during = wait_done(sdk_client, ctx, submit(sdk_client, ctx, "print('too early')"))
    assert during.status == CommandStatus.FINISHED
    assert during.results.result_type == ResultType.ERROR
    assert KERNEL_RESTARTING in during.results.cause
    assert "The kernel may be restarting" in during.results.cause
    # After the window, a new interpreter serves the same context id.
    wait_for(lambda: workspace.context_pids().get(ctx) not in (None, old_pid), timeout=10)
    after = run(sdk_client, ctx, "kept")
    assert after.result_type == ResultType.ERROR and "NameError" in after.summary
    assert text(sdk_client, ctx, "print(type(dbutils).__name__)") == "_Dbutils"


@pytest.mark.parametrize("pip_restarts", [False, True])
def test_pip_restarts_python_only_when_the_cluster_does(sdk_client, workspace, pip_restarts):
    workspace.configure(pip_restarts=pip_restarts, restart_window=0.2)
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "kept = 1")
    pid = workspace.context_pids()[ctx]
    assert text(sdk_client, ctx, "%pip --version").startswith("pip ")
    wait_for(lambda: workspace.context_pids().get(ctx) not in (None, pid) if pip_restarts
             else True, timeout=10)
    after = run(sdk_client, ctx, "kept")
    if pip_restarts:
        assert after.result_type == ResultType.ERROR and "NameError" in after.summary
    else:
        assert after.data == "Out[3]: 1" and workspace.context_pids()[ctx] == pid


# ------------------------------------------------------------------ 6: cluster lifecycle

def test_starting_a_running_cluster_is_refused_with_invalid_state(sdk_client):
    with pytest.raises(InvalidState, match=r"Cluster 0101-000001-devrun01 is in unexpected "
                                           r"state Running\.") as info:
        sdk_client.clusters.start(cluster_id=RUNNING_CLUSTER_ID)
    assert info.value.error_code == "INVALID_STATE"
    sdk_client.clusters.ensure_cluster_is_running(RUNNING_CLUSTER_ID)  # the SDK's own helper


@pytest.mark.slow
def test_a_cluster_just_running_answers_cluster_not_ready_which_the_sdk_waits_out(
        sdk_client, workspace):
    workspace.configure(start_delay=0.3, ready_delay=4.0)
    details = sdk_client.clusters.start_and_wait(TERMINATED_CLUSTER_ID)
    assert details.state == State.RUNNING
    refused = raw(workspace, "POST", "/api/1.2/contexts/create",
                  json={"clusterId": TERMINATED_CLUSTER_ID, "language": "python"})
    assert refused.status_code == 500
    assert refused.json()["error"].startswith("ClusterNotReadyException: ")
    ctx = sdk_client.command_execution.create_and_wait(cluster_id=TERMINATED_CLUSTER_ID,
                                                       language=Language.PYTHON)
    assert ctx.status == ContextStatus.RUNNING
    creates = [r["status"] for r in workspace.requests()
               if r["path"] == "/api/1.2/contexts/create"]
    assert creates[0] == 500 and creates[-1] == 200


@pytest.mark.slow
def test_restart_drops_every_context_and_the_events_tell_what_happened(sdk_client, workspace):
    workspace.configure(start_delay=1.0, ready_delay=0.0)
    ctx = new_context(sdk_client)
    cmd = submit(sdk_client, ctx, "import time; time.sleep(60)")
    wait_for(lambda: status(sdk_client, ctx, cmd).status == CommandStatus.RUNNING)
    waiter = sdk_client.clusters.restart(cluster_id=RUNNING_CLUSTER_ID)
    assert sdk_client.clusters.get(RUNNING_CLUSTER_ID).state == State.RESTARTING
    for call in (("GET", "/api/1.2/contexts/status?clusterId=%s&contextId=%s"
                  % (RUNNING_CLUSTER_ID, ctx), None),
                 ("POST", "/api/1.2/commands/execute",
                  {"clusterId": RUNNING_CLUSTER_ID, "contextId": ctx, "command": "1"})):
        answer = raw(workspace, call[0], call[1], json=call[2])
        assert answer.status_code == 500 and "ClusterNotReadyException" in answer.json()["error"]
    assert waiter.result().state == State.RUNNING
    done = status(sdk_client, ctx, cmd)
    assert done.status == CommandStatus.FINISHED and SHUTDOWN_FRAME in done.results.cause
    with pytest.raises(BadRequest, match="disconnected"):
        sdk_client.command_execution.context_status(cluster_id=RUNNING_CLUSTER_ID,
                                                    context_id=ctx)
    events = list(sdk_client.clusters.events(cluster_id=RUNNING_CLUSTER_ID, limit=1))
    types = [e.type for e in events]  # newest first, one per page
    assert types[:2] == [EventType.RUNNING, EventType.RESTARTING]
    assert all(e.cluster_id == RUNNING_CLUSTER_ID and e.timestamp for e in events)
    assert events[1].details.user == OWNER


# ------------------------------------------------------------------ 7, 8: contexts under load

@pytest.mark.slow
def test_a_new_context_can_end_in_error_at_creation(sdk_client, workspace):
    workspace.configure(context_error_next=1)
    with pytest.raises(OperationFailed, match="ERROR"):
        sdk_client.command_execution.create_and_wait(cluster_id=RUNNING_CLUSTER_ID,
                                                     language=Language.PYTHON)
    retried = sdk_client.command_execution.create_and_wait(cluster_id=RUNNING_CLUSTER_ID,
                                                           language=Language.PYTHON)
    assert retried.status == ContextStatus.RUNNING  # dbt-databricks retries: the next one works


def test_at_the_limit_the_least_recently_used_idle_context_is_evicted_first(
        sdk_client, workspace):
    workspace.configure(context_limit=2)
    older, newer = new_context(sdk_client), new_context(sdk_client)
    run(sdk_client, older, "used = True")  # `newer` is now the least recently used
    third = new_context(sdk_client)
    assert set(workspace.context_pids()) == {older, third}
    with pytest.raises(BadRequest, match="disconnected"):
        submit(sdk_client, newer, "1")
    busy = [submit(sdk_client, c, "import time; time.sleep(30)") for c in (older, third)]
    wait_for(lambda: all(status(sdk_client, c, b).status == CommandStatus.RUNNING
                         for c, b in zip((older, third), busy)))
    with pytest.raises(InvalidParameterValue, match="Limit set currently to 2"):
        sdk_client.command_execution.create(cluster_id=RUNNING_CLUSTER_ID,
                                            language=Language.PYTHON)


# ------------------------------------------------------------------ 9: throttling

@pytest.mark.slow
@pytest.mark.parametrize("http_429", [True, False])
def test_request_limit_exceeded_is_retried_by_the_sdk_with_and_without_429(
        sdk_client, workspace, http_429):
    ctx = new_context(sdk_client)
    if http_429:
        rule = workspace.throttle("/api/1.2/commands/execute")
    else:  # through the control API, as a CLI test in another process would
        rule = raw(workspace, "POST", "/_local/throttle",
                   json={"path": "/api/1.2/commands/execute", "http_429": False}).json()["rule"]
        assert "RPC token bucket limit has been exceeded" in rule["body"]["message"]
    assert rule["body"]["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert text(sdk_client, ctx, "print('through')") == "through"
    statuses = [r["status"] for r in workspace.requests()
                if r["path"] == "/api/1.2/commands/execute"]
    assert statuses == [429 if http_429 else 400, 200]


# ------------------------------------------------------------------ 10: request validation

def test_requests_are_validated_as_the_real_service_does(sdk_client, workspace):
    # sdk-py tests/integration/test_commands.py: the real answer, error_code None.
    with pytest.raises(DatabricksError) as info:
        sdk_client.command_execution.execute(cluster_id="__non_existing__")
    assert "requirement failed: missing contextId" in str(info.value)
    assert info.value.error_code is None
    ctx = new_context(sdk_client)
    with pytest.raises(BadRequest, match="not found") as unknown:
        status(sdk_client, ctx, "0123456789abcdef")
    assert unknown.value.error_code is None
    with pytest.raises(BadRequest, match="language") as language:
        sdk_client.api_client.do("POST", "/api/1.2/commands/execute",
                                 body={"clusterId": RUNNING_CLUSTER_ID, "contextId": ctx,
                                       "language": "cobol", "command": "1"})
    assert language.value.error_code is None


# ------------------------------------------------------------------ 11: REST over the driver paths

def test_the_files_api_reads_and_writes_the_same_volume_files_as_the_context(
        sdk_client, workspace):
    ctx = new_context(sdk_client)
    written = "/Volumes/main/default/landing/from_context.txt"
    run(sdk_client, ctx, "import os\nos.makedirs(os.path.dirname(%r), exist_ok=True)\n"
                         "open(%r, 'w').write('written in the context')" % (written, written))
    download = sdk_client.files.download("/Volumes/main/default/landing/from_context.txt")
    assert download.contents.read() == b"written in the context"
    meta = sdk_client.files.get_metadata("/Volumes/main/default/landing/from_context.txt")
    assert meta.content_length == len(b"written in the context")
    sdk_client.files.upload("/Volumes/main/default/landing/from_api.bin", io.BytesIO(b"\x00api"))
    with pytest.raises(DatabricksError):
        sdk_client.files.upload("/Volumes/main/default/landing/from_api.bin",
                                io.BytesIO(b"again"), overwrite=False)
    seen = "/Volumes/main/default/landing/from_api.bin"
    assert text(sdk_client, ctx, "print(open(%r, 'rb').read())" % seen) == "b'\\x00api'"
    names = sorted(e.name for e in sdk_client.files.list_directory_contents(
        "/Volumes/main/default/landing"))
    assert names == ["from_api.bin", "from_context.txt"]
    sdk_client.files.create_directory("/Volumes/main/default/landing/empty")
    sdk_client.files.get_directory_metadata("/Volumes/main/default/landing/empty")
    sdk_client.files.delete_directory("/Volumes/main/default/landing/empty")
    sdk_client.files.delete("/Volumes/main/default/landing/from_api.bin")
    with pytest.raises(NotFound):
        sdk_client.files.download("/Volumes/main/default/landing/from_api.bin")


def test_dbfs_rest_calls_see_what_the_context_wrote_under_dbfs(sdk_client, workspace):
    ctx = new_context(sdk_client)
    written = "/dbfs/FileStore/reports/summary.csv"
    run(sdk_client, ctx, "import os\nos.makedirs(os.path.dirname(%r), exist_ok=True)\n"
                         "open(%r, 'w').write('a,b\\n1,2\\n')" % (written, written))
    status_ = sdk_client.dbfs.get_status("dbfs:/FileStore/reports/summary.csv")
    assert not status_.is_dir and status_.file_size == len("a,b\n1,2\n")
    assert [f.path for f in sdk_client.dbfs.list("dbfs:/FileStore/reports")] == [
        "/FileStore/reports/summary.csv"]
    read = sdk_client.dbfs.read("dbfs:/FileStore/reports/summary.csv")
    assert base64.b64decode(read.data) == b"a,b\n1,2\n"
    sdk_client.dbfs.mkdirs("dbfs:/tmp/uploads")
    sdk_client.dbfs.put("dbfs:/tmp/uploads/small.txt", contents=base64.b64encode(b"put").decode())
    with pytest.raises(ResourceAlreadyExists):
        sdk_client.dbfs.put("dbfs:/tmp/uploads/small.txt",
                            contents=base64.b64encode(b"x").decode())
    sdk_client.dbfs.upload("dbfs:/tmp/uploads/stream.bin", io.BytesIO(b"s" * 3000),
                           overwrite=True)
    assert sdk_client.dbfs.download("dbfs:/tmp/uploads/stream.bin").read() == b"s" * 3000
    seen = "/dbfs/tmp/uploads/small.txt"
    assert text(sdk_client, ctx, "print(open(%r).read())" % seen) == "put"
    sdk_client.dbfs.delete("dbfs:/tmp/uploads", recursive=True)
    with pytest.raises(ResourceDoesNotExist):
        sdk_client.dbfs.get_status("dbfs:/tmp/uploads")


def test_workspace_files_and_notebooks_import_list_and_read_back(sdk_client, workspace):
    sdk_client.workspace.mkdirs("/Users/%s/project" % OWNER)
    base = "/Users/%s/project" % OWNER
    sdk_client.workspace.upload(base + "/util.py", b"def f():\n    return 1\n",
                                format=ImportFormat.AUTO)
    sdk_client.workspace.upload(base + "/etl.py", b"print('etl')\n", language=None)
    with pytest.raises(ResourceAlreadyExists):
        sdk_client.workspace.upload(base + "/util.py", b"x = 2\n", format=ImportFormat.AUTO)
    kinds = {o.path: o.object_type for o in sdk_client.workspace.list(base)}
    assert kinds == {base + "/util.py": ObjectType.FILE, base + "/etl": ObjectType.NOTEBOOK}
    assert sdk_client.workspace.get_status(base + "/etl").language.value == "PYTHON"
    assert sdk_client.workspace.download(base + "/util.py").read() == b"def f():\n    return 1\n"
    host = host_file(workspace, "/Workspace" + base + "/util.py")
    assert open(host, "rb").read() == b"def f():\n    return 1\n"
    with pytest.raises(ResourceDoesNotExist):
        sdk_client.workspace.get_status(base + "/missing.py")


def test_libraries_current_user_and_serving_endpoints_answer_like_a_workspace(sdk_client):
    assert list(sdk_client.libraries.cluster_status(RUNNING_CLUSTER_ID)) == []
    me = sdk_client.current_user.me()
    assert me.user_name == OWNER and me.active and me.emails[0].value == OWNER
    names = [e.name for e in sdk_client.serving_endpoints.list()]
    assert "default-llm-endpoint" in names
    endpoint = sdk_client.serving_endpoints.get("default-llm-endpoint")
    assert endpoint.state.ready.value == "READY" and endpoint.task == "llm/v1/chat"


# ------------------------------------------------------------------ 12: the SDK inside a context

@pytest.mark.slow
def test_workspace_client_with_no_arguments_works_inside_a_context(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "from databricks.sdk import WorkspaceClient\n"
                                   "w = WorkspaceClient()\n"
                                   "print(w.config.auth_type, w.current_user.me().user_name)",
                  timeout=20)
    assert results.result_type == ResultType.TEXT, results
    assert results.data == "runtime %s" % OWNER


# ------------------------------------------------------------------ 13: latency

def test_latency_ms_delays_every_api_answer(sdk_client, workspace):
    workspace.configure(latency_ms=300)
    started = time.monotonic()
    sdk_client.clusters.get(RUNNING_CLUSTER_ID)
    assert time.monotonic() - started >= 0.3
    workspace.configure(latency_ms=0)


def test_serve_takes_latency_ms():
    proc = subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "local_workspace"), "serve",
                             "--latency-ms", "250"], stdout=subprocess.PIPE, text=True)
    try:
        host = None
        for line in proc.stdout:
            if line.startswith("export DATABRICKS_HOST="):
                host = line.strip().split("=", 1)[1]
                break
        w = WorkspaceClient(config=Config(host=host, token="local-token",
                                          retry_timeout_seconds=10))
        started = time.monotonic()
        assert w.clusters.get(RUNNING_CLUSTER_ID).state == State.RUNNING
        assert time.monotonic() - started >= 0.25
    finally:
        proc.terminate()
        proc.wait(10)


# ------------------------------------------------------------------ the SDK's own examples

@pytest.mark.slow
def test_the_sdk_command_execution_examples_hold(sdk_client, workspace):
    context = sdk_client.command_execution.create_and_wait(cluster_id=RUNNING_CLUSTER_ID,
                                                           language=Language.PYTHON)
    assert sdk_client.command_execution.context_status(
        cluster_id=RUNNING_CLUSTER_ID, context_id=context.id).status == ContextStatus.RUNNING
    done = sdk_client.command_execution.execute_and_wait(
        cluster_id=RUNNING_CLUSTER_ID, context_id=context.id, language=Language.PYTHON,
        command="print(1)")
    assert done.status == CommandStatus.FINISHED and done.results.data == "1"
    assert sdk_client.command_execution.command_status(
        cluster_id=RUNNING_CLUSTER_ID, context_id=context.id,
        command_id=done.id).results.data == "1"
    long = submit(sdk_client, context.id, "import time; time.sleep(60)")
    wait_for(lambda: status(sdk_client, context.id, long).status == CommandStatus.RUNNING)
    cancelled = sdk_client.command_execution.cancel_and_wait(
        cluster_id=RUNNING_CLUSTER_ID, context_id=context.id, command_id=long)
    assert cancelled.status == CommandStatus.CANCELLED
    sdk_client.command_execution.destroy(cluster_id=RUNNING_CLUSTER_ID, context_id=context.id)
    with pytest.raises(BadRequest, match="disconnected"):
        sdk_client.command_execution.context_status(cluster_id=RUNNING_CLUSTER_ID,
                                                    context_id=context.id)


@pytest.mark.slow
def test_the_sdk_starts_a_terminated_cluster_and_runs_on_it(sdk_client, workspace):
    workspace.configure(start_delay=0.3, ready_delay=0.5)
    sdk_client.clusters.ensure_cluster_is_running(TERMINATED_CLUSTER_ID)
    assert sdk_client.clusters.get(TERMINATED_CLUSTER_ID).state == State.RUNNING
    ctx = new_context(sdk_client, TERMINATED_CLUSTER_ID)
    assert text(sdk_client, ctx, "print('up')", TERMINATED_CLUSTER_ID) == "up"
