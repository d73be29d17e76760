"""The local workspace, driven through the real databricks-sdk WorkspaceClient."""

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from databricks.sdk import WorkspaceClient
from databricks.sdk.core import Config
from databricks.sdk.errors import (BadRequest, InvalidParameterValue, InvalidState, NotFound,
                                   PermissionDenied, ResourceDoesNotExist, Unauthenticated)
from databricks.sdk.service.compute import (CommandStatus, ContextStatus, Language, ResultType,
                                            State)
from databricks.sdk.service.serving import ChatMessage, ChatMessageRole

from local_workspace import (DEDICATED_CLUSTER_ID, JOB_CLUSTER_ID, RUNNING_CLUSTER_ID,
                             SHARED_CLUSTER_ID, STANDARD_CLUSTER_ID, TERMINATED_CLUSTER_ID,
                             LocalWorkspace)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
DONE = (CommandStatus.FINISHED, CommandStatus.ERROR, CommandStatus.CANCELLED)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ helpers (real SDK calls)

def wait_for(predicate, timeout=20.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %ss" % timeout)
        time.sleep(interval)


def new_context(w, cluster_id=RUNNING_CLUSTER_ID):
    context_id = w.command_execution.create(cluster_id=cluster_id,
                                            language=Language.PYTHON).context_id
    wait_for(lambda: w.command_execution.context_status(
        cluster_id=cluster_id, context_id=context_id).status == ContextStatus.RUNNING)
    return context_id


def submit(w, context_id, code, cluster_id=RUNNING_CLUSTER_ID):
    return w.command_execution.execute(cluster_id=cluster_id, context_id=context_id,
                                       command=code, language=Language.PYTHON).command_id


def status(w, context_id, command_id, cluster_id=RUNNING_CLUSTER_ID):
    return w.command_execution.command_status(cluster_id=cluster_id, context_id=context_id,
                                              command_id=command_id)


def wait_done(w, context_id, command_id, cluster_id=RUNNING_CLUSTER_ID, timeout=30.0):
    return wait_for(lambda: (lambda s: s if s.status in DONE else None)(
        status(w, context_id, command_id, cluster_id)), timeout=timeout)


def run(w, context_id, code, cluster_id=RUNNING_CLUSTER_ID, timeout=30.0):
    """Execute and return the Results of a Finished command."""
    done = wait_done(w, context_id, submit(w, context_id, code, cluster_id), cluster_id,
                     timeout=timeout)
    assert done.status == CommandStatus.FINISHED, done
    return done.results


def text(w, context_id, code, cluster_id=RUNNING_CLUSTER_ID):
    results = run(w, context_id, code, cluster_id)
    assert results.result_type == ResultType.TEXT, results
    return results.data


def api(workspace, method, path, token=None, **kwargs):
    headers = {"Authorization": "Bearer %s" % (token or workspace.token)}
    return requests.request(method, workspace.host + path, headers=headers, timeout=30, **kwargs)


def chat(workspace, prompt, endpoint="default-llm-endpoint", system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}]
    return api(workspace, "POST", "/serving-endpoints/%s/invocations" % endpoint,
               json={"messages": messages, "max_tokens": 64, "temperature": 0})


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ------------------------------------------------------------------ REPL semantics

def test_state_persists_across_commands_and_is_isolated_between_contexts(sdk_client):
    first = new_context(sdk_client)
    second = new_context(sdk_client)
    assert first != second and first.isdigit() and len(first) >= 18
    run(sdk_client, first, "counter = 41")
    assert text(sdk_client, first, "counter += 1\nprint(counter)") == "42"
    isolated = run(sdk_client, second, "counter")
    assert isolated.result_type == ResultType.ERROR
    assert "NameError" in isolated.summary and "counter" in isolated.summary


def test_what_a_command_defines_pickles_and_maps_over_a_fork_pool_in_a_later_command(sdk_client):
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "def square(x):\n    return x * x\n\nclass Point:\n    pass")
    assert text(sdk_client, ctx, "import pickle\n"
                                 "print(pickle.loads(pickle.dumps(square))(7), "
                                 "type(pickle.loads(pickle.dumps(Point()))).__name__)") == "49 Point"
    assert text(sdk_client, ctx, "import multiprocessing\n"
                                 "with multiprocessing.get_context('fork').Pool(2) as pool:\n"
                                 "    print(pool.map(square, range(6)))") == "[0, 1, 4, 9, 16, 25]"
    # The namespace is __main__'s own, and holds nothing of the worker (a magic ran first).
    assert text(sdk_client, ctx, "%sh true\nimport sys\n"
                                 "print(sys.modules['__main__'].__dict__ is globals(), __name__, "
                                 "sorted(n for n in globals() if 'local' in n.lower()))") == (
        "True __main__ []")


def test_a_client_makes_all_its_calls_over_one_kept_alive_connection(workspace):
    w = WorkspaceClient(host=workspace.host, token=workspace.token, auth_type="pat")
    before = workspace.connections()
    for _ in range(5):
        assert w.clusters.get(RUNNING_CLUSTER_ID).cluster_id == RUNNING_CLUSTER_ID
    assert workspace.connections() - before == 1
    assert api(workspace, "GET", "/_local/connections").json()["connections"] == (
        workspace.connections())


@pytest.mark.slow
def test_the_sdk_waiters_work_end_to_end(sdk_client):
    ctx = sdk_client.command_execution.create(cluster_id=RUNNING_CLUSTER_ID,
                                              language=Language.PYTHON).result()
    assert ctx.status == ContextStatus.RUNNING
    done = sdk_client.command_execution.execute(cluster_id=RUNNING_CLUSTER_ID, context_id=ctx.id,
                                                command="print('hello')",
                                                language=Language.PYTHON).result()
    assert done.status == CommandStatus.FINISHED
    assert done.results.result_type == ResultType.TEXT and done.results.data == "hello"


def test_a_new_context_is_pending_until_its_python_process_is_up(sdk_client, workspace):
    created = sdk_client.command_execution.create(cluster_id=RUNNING_CLUSTER_ID,
                                                  language=Language.PYTHON)
    first = sdk_client.command_execution.context_status(cluster_id=RUNNING_CLUSTER_ID,
                                                        context_id=created.context_id)
    assert first.status == ContextStatus.PENDING  # the process takes ~0.1 s to boot
    wait_for(lambda: sdk_client.command_execution.context_status(
        cluster_id=RUNNING_CLUSTER_ID, context_id=created.context_id).status
        == ContextStatus.RUNNING)
    assert created.context_id in workspace.context_pids()


def test_a_trailing_expression_is_shown_as_out_n_after_printed_text(sdk_client):
    ctx = new_context(sdk_client)
    assert text(sdk_client, ctx, "x = 2") == ""
    assert text(sdk_client, ctx, "print('hi')\nx * 21") == "hi\nOut[2]: 42"
    assert text(sdk_client, ctx, "'abc'") == "Out[3]: 'abc'"
    assert text(sdk_client, ctx, "None") == ""
    assert text(sdk_client, ctx, "import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')") \
        == "a\nb\nc"


def test_an_uncaught_exception_finishes_with_an_ipython_style_error(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "print('lost output')\ndef f():\n    return 1/0\nf()")
    assert results.result_type == ResultType.ERROR
    assert results.summary == ("<span class='ansi-red-fg'>ZeroDivisionError</span>: "
                               "division by zero")
    assert "\x1b[" in results.cause
    plain = ANSI.sub("", results.cause)
    assert plain.startswith("-" * 20)
    assert "Traceback (most recent call last)" in plain
    assert "return 1/0" in plain and ", in f" in plain
    assert plain.rstrip().endswith("ZeroDivisionError: division by zero")
    assert "lost output" not in plain and results.data is None
    # The REPL survives its user's mistakes.
    assert text(sdk_client, ctx, "1 + 1") == "Out[2]: 2"


def test_a_syntax_error_is_an_error_result(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "def broken(:\n    pass")
    assert results.result_type == ResultType.ERROR
    assert "SyntaxError" in results.summary
    assert "def broken(:" in ANSI.sub("", results.cause)


def test_text_past_the_15_4_limit_is_cut_or_discarded_as_configured(sdk_client, workspace):
    ctx = new_context(sdk_client)
    # DBR <= 16.4, by default: text results of at most 50,000 characters, cut to their head.
    results = run(sdk_client, ctx, "print('x' * 60000)")
    assert len(results.data) == 50_000 and results.truncated is True
    at_limit = run(sdk_client, ctx, "print('x' * 50000)")
    assert at_limit.data == "x" * 50_000 and not at_limit.truncated
    workspace.configure(output_limit=100)
    results = run(sdk_client, ctx, "for i in range(100): print(i)")
    assert results.data == "".join("%d\n" % i for i in range(100))[:100]
    assert results.truncated is True
    short = run(sdk_client, ctx, "print('short')")
    assert short.data == "short" and not short.truncated
    # ... or discarded, as the current docs say of a notebook's output over its limit.
    workspace.configure(output_overflow="discard")
    results = run(sdk_client, ctx, "for i in range(100): print(i)")
    assert results.data == "*** WARNING: max output size exceeded, skipping output. ***"
    assert not results.truncated


def test_a_17_3_cell_keeps_up_to_its_output_size_in_mb(sdk_client, workspace):
    ctx = new_context(sdk_client, DEDICATED_CLUSTER_ID)
    # DBR >= 17.0: 10 MB of output by default, far past 15.4's 50,000 characters ...
    wide = run(sdk_client, ctx, "print('x' * 60000)", DEDICATED_CLUSTER_ID)
    assert wide.data == "x" * 60_000 and not wide.truncated
    # ... and past the limit (1 to 20 MB) the output is cut, not discarded.
    workspace.configure(cell_output_mb=1)
    cut = run(sdk_client, ctx, "print('é' * 600000)", DEDICATED_CLUSTER_ID)
    assert cut.truncated is True and cut.data == "é" * (1024 * 1024 // 2)
    with pytest.raises(ValueError, match="between 1 and 20"):
        workspace.configure(cell_output_mb=21)


def test_dbutils_notebook_exit_ends_the_command_with_its_value(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "print('dropped')\ndbutils.notebook.exit('{\"ok\": 1}')\n"
                                   "print('never')")
    assert results.data == '{"ok": 1}'


# ------------------------------------------------------------------ display()

def test_display_of_a_list_of_dicts_returns_a_table_with_json_schema(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "print('dropped')\n"
                                   "display([{'id': 1, 'name': 'a', 'score': 0.5, 'ok': True},"
                                   " {'id': 2, 'name': None, 'score': 1.5, 'ok': False}])")
    assert results.result_type == ResultType.TABLE
    assert results.is_json_schema is True and results.truncated is False
    assert [(c["name"], json.loads(c["type"])) for c in results.schema] == [
        ("id", "long"), ("name", "string"), ("score", "double"), ("ok", "boolean")]
    assert results.data == [[1, "a", 0.5, True], [2, None, 1.5, False]]


def test_display_of_rows_with_columns_and_the_last_display_wins(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "display([{'a': 1}])\n"
                                   "display([(1, 'x'), (2, 'y')], columns=['n', 's'])")
    assert [c["name"] for c in results.schema] == ["n", "s"]
    assert results.data == [[1, "x"], [2, "y"]]


def test_display_of_a_pandas_dataframe_is_capped_at_10000_rows(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx,
                  "import pandas as pd\n"
                  "df = pd.DataFrame({'i': range(25000), 'x': [i / 2 for i in range(25000)],"
                  " 'ts': pd.date_range('2024-01-01', periods=25000, freq='min')})\n"
                  "display(df)")
    assert results.result_type == ResultType.TABLE and results.truncated is True
    assert len(results.data) == 10_000
    assert [json.loads(c["type"]) for c in results.schema] == ["long", "double", "timestamp"]
    assert results.data[1][:2] == [1, 0.5] and results.data[0][2].startswith("2024-01-01")


def test_a_table_over_2_mb_of_json_is_cut_and_marked_truncated(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "display([{'blob': 'y' * 50000} for _ in range(100)])")
    assert results.truncated is True
    assert 0 < len(results.data) < 100
    assert len(json.dumps(results.data)) <= 2 * 1024 * 1024


def test_plt_show_returns_the_figure_as_an_inline_png(sdk_client, workspace):
    workspace.configure(plots_mode="images")
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "import matplotlib.pyplot as plt\n"
                                   "plt.plot([1, 3, 2])\nplt.title('demo')\nplt.show()")
    assert results.result_type == ResultType.IMAGES
    (url,) = results.file_names
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_large_image_is_stored_and_readable_through_the_dbfs_read_api(sdk_client, workspace):
    workspace.configure(image_inline_limit=1000, plots_mode="images")
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "import matplotlib.pyplot as plt\n"
                                   "fig, ax = plt.subplots()\nax.plot([1, 2, 3])\ndisplay(fig)")
    (name,) = results.file_names
    assert re.fullmatch(r"/plots/[0-9a-f-]{36}\.png", name)
    read = sdk_client.dbfs.read("dbfs:/FileStore" + name, offset=0, length=1_000_000)
    png = base64.b64decode(read.data)
    assert read.bytes_read == len(png) > 1000 and png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(BadRequest):
        sdk_client.dbfs.read("dbfs:/FileStore" + name, length=2 * 1024 * 1024)
    with pytest.raises(NotFound):
        sdk_client.dbfs.read("dbfs:/FileStore/plots/missing.png")


# ------------------------------------------------------------------ cancel and queueing

@pytest.mark.parametrize("cancel_mode", ["cancelled", "finished_error"])
def test_cancel_interrupts_a_sleeping_command_within_a_second(sdk_client, workspace, cancel_mode):
    workspace.configure(cancel_mode=cancel_mode)
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "kept = 'still here'")
    cmd = submit(sdk_client, ctx, "import time\ntime.sleep(60)")
    wait_for(lambda: status(sdk_client, ctx, cmd).status == CommandStatus.RUNNING)
    started = time.monotonic()
    sdk_client.command_execution.cancel(cluster_id=RUNNING_CLUSTER_ID, context_id=ctx,
                                        command_id=cmd)
    assert status(sdk_client, ctx, cmd).status == CommandStatus.CANCELLING
    final = wait_done(sdk_client, ctx, cmd, timeout=5)
    assert time.monotonic() - started < 1.0
    assert final.results.result_type == ResultType.ERROR
    if cancel_mode == "cancelled":
        assert final.status == CommandStatus.CANCELLED
    else:
        assert final.status == CommandStatus.FINISHED
        assert "com.databricks.backend.common.rpc.CommandCancelledException" in final.results.cause
    assert text(sdk_client, ctx, "kept") == "Out[3]: 'still here'"


def test_cancel_keeps_interrupting_code_that_swallows_keyboard_interrupt(sdk_client):
    ctx = new_context(sdk_client)
    cmd = submit(sdk_client, ctx, "import time\nswallowed = 0\nwhile True:\n"
                                  "    try:\n        time.sleep(10)\n"
                                  "    except KeyboardInterrupt:\n        swallowed += 1\n"
                                  "        if swallowed == 3:\n            raise\n")
    wait_for(lambda: status(sdk_client, ctx, cmd).status == CommandStatus.RUNNING)
    sdk_client.command_execution.cancel(cluster_id=RUNNING_CLUSTER_ID, context_id=ctx,
                                        command_id=cmd)
    assert wait_done(sdk_client, ctx, cmd, timeout=5).status == CommandStatus.CANCELLED
    assert text(sdk_client, ctx, "swallowed") == "Out[2]: 3"


def test_commands_queue_in_submission_order_and_a_queued_one_can_be_cancelled(sdk_client):
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "order = []")
    first = submit(sdk_client, ctx, "import time\ntime.sleep(0.5)\norder.append(1)")
    second = submit(sdk_client, ctx, "order.append(2)")
    third = submit(sdk_client, ctx, "order.append(3)")
    assert status(sdk_client, ctx, third).status == CommandStatus.QUEUED
    assert status(sdk_client, ctx, third).results is None
    sdk_client.command_execution.cancel(cluster_id=RUNNING_CLUSTER_ID, context_id=ctx,
                                        command_id=second)
    assert status(sdk_client, ctx, second).status == CommandStatus.CANCELLED
    assert wait_done(sdk_client, ctx, third).status == CommandStatus.FINISHED
    assert wait_done(sdk_client, ctx, first).status == CommandStatus.FINISHED
    assert text(sdk_client, ctx, "order") == "Out[4]: [1, 3]"  # the cancelled one never ran
    # Cancelling a finished command is a harmless no-op.
    sdk_client.command_execution.cancel(cluster_id=RUNNING_CLUSTER_ID, context_id=ctx,
                                        command_id=first)
    assert status(sdk_client, ctx, first).status == CommandStatus.FINISHED


def test_the_sdk_execute_waiter_raises_when_the_command_is_cancelled(sdk_client):
    from databricks.sdk.errors import OperationFailed

    ctx = new_context(sdk_client)
    waiter = sdk_client.command_execution.execute(cluster_id=RUNNING_CLUSTER_ID, context_id=ctx,
                                                  command="import time; time.sleep(30)",
                                                  language=Language.PYTHON)
    wait_for(lambda: status(sdk_client, ctx, waiter.command_id).status == CommandStatus.RUNNING)
    sdk_client.command_execution.cancel(cluster_id=RUNNING_CLUSTER_ID, context_id=ctx,
                                        command_id=waiter.command_id)
    wait_done(sdk_client, ctx, waiter.command_id, timeout=5)
    with pytest.raises(OperationFailed, match="CANCELLED"):
        waiter.result()


# ------------------------------------------------------------------ context lifecycle

def test_evicted_destroyed_and_unknown_contexts_all_answer_the_same_disconnected_error(
        sdk_client, workspace):
    evicted, destroyed = new_context(sdk_client), new_context(sdk_client)
    pid = workspace.context_pids()[evicted]
    workspace.evict(evicted)
    assert not pid_alive(pid)
    sdk_client.command_execution.destroy(cluster_id=RUNNING_CLUSTER_ID, context_id=destroyed)
    for ctx in (evicted, destroyed, "1234567890123456789"):
        expected = "Context ExecutionContextId(%s) is disconnected." % ctx
        with pytest.raises(BadRequest) as info:
            submit(sdk_client, ctx, "1")
        assert str(info.value) == expected and info.value.error_code is None
        with pytest.raises(BadRequest, match=re.escape(expected)):
            sdk_client.command_execution.context_status(cluster_id=RUNNING_CLUSTER_ID,
                                                        context_id=ctx)
        with pytest.raises(BadRequest, match=re.escape(expected)):
            status(sdk_client, ctx, "0" * 32)


def test_a_finished_command_of_an_evicted_context_gets_the_context_error(sdk_client, workspace):
    ctx = new_context(sdk_client)
    cmd = submit(sdk_client, ctx, "1 + 1")
    wait_done(sdk_client, ctx, cmd)
    workspace.evict()
    with pytest.raises(BadRequest, match="disconnected"):
        status(sdk_client, ctx, cmd)
    with pytest.raises(BadRequest, match="not found"):
        status(sdk_client, new_context(sdk_client), cmd)


@pytest.mark.slow
def test_evicting_a_context_also_kills_the_processes_its_code_started(sdk_client, workspace):
    ctx = new_context(sdk_client)
    child = int(text(sdk_client, ctx, "import subprocess\n"
                                      "p = subprocess.Popen(['sleep', '60'])\n"
                                      "print(p.pid)"))
    assert pid_alive(child)
    workspace.evict(ctx)
    wait_for(lambda: not pid_alive(child), timeout=5)


def test_a_python_process_that_dies_leaves_an_error_context(sdk_client, workspace):
    ctx = new_context(sdk_client)
    crashed = run(sdk_client, ctx, "import os\nos._exit(3)")
    assert crashed.result_type == ResultType.ERROR and "Fatal error" in crashed.summary
    assert sdk_client.command_execution.context_status(
        cluster_id=RUNNING_CLUSTER_ID, context_id=ctx).status == ContextStatus.ERROR
    with pytest.raises(BadRequest, match="disconnected"):
        submit(sdk_client, ctx, "1")


def test_idle_contexts_are_evicted_after_idle_ttl(sdk_client, workspace):
    workspace.configure(idle_ttl=0.3)
    ctx = new_context(sdk_client)
    wait_for(lambda: ctx not in workspace.context_pids(), timeout=5)
    with pytest.raises(BadRequest, match="disconnected"):
        submit(sdk_client, ctx, "1")


def test_the_context_limit_refuses_new_contexts(sdk_client, workspace):
    workspace.configure(context_limit=2, idle_context_tracking=False)
    new_context(sdk_client)
    new_context(sdk_client)
    with pytest.raises(InvalidParameterValue, match=r"Limit set currently to 2"):
        sdk_client.command_execution.create(cluster_id=RUNNING_CLUSTER_ID,
                                            language=Language.PYTHON)
    assert new_context(sdk_client, SHARED_CLUSTER_ID)  # the limit is per cluster


def test_only_python_and_sql_are_supported(sdk_client):
    with pytest.raises(BadRequest, match="python and sql only"):
        sdk_client.command_execution.create(cluster_id=RUNNING_CLUSTER_ID,
                                            language=Language.SCALA)


def test_a_terminated_cluster_refuses_contexts_at_once_by_default(sdk_client):
    started = time.monotonic()
    with pytest.raises(BadRequest, match="TERMINATED") as info:
        sdk_client.command_execution.create(cluster_id=TERMINATED_CLUSTER_ID,
                                            language=Language.PYTHON)
    assert "ClusterNotReadyException" not in str(info.value)
    assert time.monotonic() - started < 1.0
    with pytest.raises(BadRequest, match="does not exist"):
        sdk_client.command_execution.create(cluster_id="0000-000000-nothere0",
                                            language=Language.PYTHON)


@pytest.mark.slow
def test_not_ready_mode_makes_the_sdk_retry_until_the_cluster_runs(sdk_client, workspace):
    workspace.configure(not_running_mode="not_ready", start_delay=0.5)
    sdk_client.clusters.start(cluster_id=TERMINATED_CLUSTER_ID)
    ctx = new_context(sdk_client, TERMINATED_CLUSTER_ID)
    assert text(sdk_client, ctx, "1 + 1", TERMINATED_CLUSTER_ID) == "Out[1]: 2"
    creates = [r for r in workspace.requests() if r["path"] == "/api/1.2/contexts/create"]
    assert creates[0]["status"] == 500 and creates[-1]["status"] == 200


def test_terminating_a_cluster_kills_its_contexts(sdk_client, workspace):
    ctx = new_context(sdk_client)
    pid = workspace.context_pids()[ctx]
    workspace.set_cluster_state(RUNNING_CLUSTER_ID, "TERMINATED")
    assert not pid_alive(pid)
    assert sdk_client.clusters.get(RUNNING_CLUSTER_ID).state == State.TERMINATED


# ------------------------------------------------------------------ failures and retries

@pytest.mark.slow
def test_503_and_429_with_retry_after_are_retried_by_the_sdk(sdk_client, workspace):
    ctx = new_context(sdk_client)
    cmd = submit(sdk_client, ctx, "print('ok')")
    workspace.inject("/api/1.2/commands/status", method="GET", count=1, status=503,
                     retry_after=1)
    workspace.inject("/api/1.2/commands/status", method="GET", count=1, status=429,
                     retry_after=1)
    started = time.monotonic()
    answer = status(sdk_client, ctx, cmd)
    assert answer.status in DONE or answer.status == CommandStatus.RUNNING
    assert time.monotonic() - started >= 2.0
    polls = [r["status"] for r in workspace.requests() if r["path"] == "/api/1.2/commands/status"]
    assert polls == [503, 429, 200]
    assert all("Bearer" not in json.dumps(r) and workspace.token not in json.dumps(r)
               for r in workspace.requests())


@pytest.mark.slow
def test_a_response_dropped_after_execute_makes_the_sdk_submit_the_command_twice(
        sdk_client, workspace):
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "runs = 0")
    workspace.inject("/api/1.2/commands/execute", count=1, mode="drop_after")
    cmd = submit(sdk_client, ctx, "runs += 1")
    wait_done(sdk_client, ctx, cmd)
    assert text(sdk_client, ctx, "runs") == "Out[4]: 2"
    executes = [r for r in workspace.requests() if r["path"] == "/api/1.2/commands/execute"]
    assert [r["dropped"] for r in executes[-3:-1]] == [True, False]


@pytest.mark.slow
def test_a_connection_dropped_before_processing_is_retried(sdk_client, workspace):
    workspace.inject("/api/2.1/clusters/get", method="GET", count=1, mode="drop_before")
    assert sdk_client.clusters.get(RUNNING_CLUSTER_ID).cluster_name == "analytics-dev"
    gets = [r["dropped"] for r in workspace.requests() if r["path"] == "/api/2.1/clusters/get"]
    assert gets == [True, False]


def test_missing_token_is_401_and_a_wrong_token_is_403(workspace):
    assert requests.get(workspace.host + "/.well-known/databricks-config").json() == {}
    missing = requests.get(workspace.host + "/api/2.1/clusters/list", timeout=10)
    assert missing.status_code == 401 and missing.json()["error_code"] == "UNAUTHENTICATED"
    wrong = WorkspaceClient(config=Config(host=workspace.host, token="wrong",
                                          retry_timeout_seconds=5))
    with pytest.raises(PermissionDenied, match="Invalid access token"):
        wrong.clusters.get(RUNNING_CLUSTER_ID)
    no_bearer = requests.get(workspace.host + "/_local/requests",
                             headers={"Authorization": "Basic abc"}, timeout=10)
    assert no_bearer.status_code == 401
    with pytest.raises(Unauthenticated):
        WorkspaceClient(config=Config(host=workspace.host, token=" ",
                                      retry_timeout_seconds=5)).clusters.get(RUNNING_CLUSTER_ID)


# ------------------------------------------------------------------ clusters

def test_clusters_list_pages_through_every_cluster(sdk_client, workspace):
    clusters = list(sdk_client.clusters.list())
    assert [c.cluster_id for c in clusters] == [RUNNING_CLUSTER_ID, TERMINATED_CLUSTER_ID,
                                                JOB_CLUSTER_ID, SHARED_CLUSTER_ID,
                                                DEDICATED_CLUSTER_ID, STANDARD_CLUSTER_ID]
    lists = [r for r in workspace.requests() if r["path"] == "/api/2.1/clusters/list"]
    assert len(lists) == 3 and "page_token" in lists[2]["query"]
    names = {c.cluster_name for c in clusters}
    assert [n for n in names if "analytics" in n.lower()] and \
        [n for n in names if "prod" in n.lower()] == ["analytics-prod"]
    from databricks.sdk.service.compute import ListClustersFilterBy
    running = list(sdk_client.clusters.list(
        filter_by=ListClustersFilterBy(cluster_states=[State.RUNNING]), page_size=1))
    assert {c.cluster_id for c in running} == {RUNNING_CLUSTER_ID, JOB_CLUSTER_ID,
                                               SHARED_CLUSTER_ID, DEDICATED_CLUSTER_ID,
                                               STANDARD_CLUSTER_ID}


def test_clusters_get_describes_each_default_cluster(sdk_client):
    shared = sdk_client.clusters.get(SHARED_CLUSTER_ID)
    assert shared.data_security_mode.value == "USER_ISOLATION"
    assert shared.state == State.RUNNING and shared.spark_version.startswith("15.4")
    job = sdk_client.clusters.get(JOB_CLUSTER_ID)
    assert job.cluster_source.value == "JOB"
    dev = sdk_client.clusters.get(RUNNING_CLUSTER_ID)
    assert dev.single_user_name and dev.cluster_source.value == "UI"
    assert dev.spark_version == "15.4.x-scala2.12"  # the oldest LTS
    dedicated = sdk_client.clusters.get(DEDICATED_CLUSTER_ID)
    assert dedicated.state == State.RUNNING and dedicated.spark_version == "17.3.x-scala2.13"
    assert dedicated.data_security_mode.value == "DATA_SECURITY_MODE_DEDICATED"
    assert dedicated.single_user_name
    standard = sdk_client.clusters.get(STANDARD_CLUSTER_ID)
    assert standard.state == State.RUNNING and standard.spark_version == "17.3.x-scala2.13"
    assert standard.data_security_mode.value == "DATA_SECURITY_MODE_STANDARD"
    assert not standard.single_user_name
    with pytest.raises(ResourceDoesNotExist, match="does not exist"):
        sdk_client.clusters.get("0000-000000-nothere0")


def test_starting_a_terminated_cluster_goes_pending_then_running(sdk_client, workspace):
    workspace.configure(start_delay=0.3)
    waiter = sdk_client.clusters.start(cluster_id=TERMINATED_CLUSTER_ID)
    assert sdk_client.clusters.get(TERMINATED_CLUSTER_ID).state == State.PENDING
    assert waiter.result().state == State.RUNNING
    with pytest.raises(InvalidState, match="unexpected state Running"):
        sdk_client.clusters.start(cluster_id=RUNNING_CLUSTER_ID)
    assert sdk_client.clusters.get(RUNNING_CLUSTER_ID).state == State.RUNNING


# ------------------------------------------------------------------ on-cluster facts

def test_dbutils_spark_conf_and_dbruntime_answer_like_a_cluster(sdk_client, workspace):
    ctx = new_context(sdk_client)
    port = str(workspace.port)
    answer = text(sdk_client, ctx, "\n".join([
        "c = dbutils.notebook.entry_point.getDbutils().notebook().getContext()",
        "from dbruntime.databricks_repl_context import get_context",
        "r = get_context()",
        "print(c.apiToken().get(), c.apiUrl().get(), c.workspaceId().get(), c.clusterId().get())",
        "print(c.tags().get('clusterId').get())",
        "print(spark.conf.get('spark.databricks.workspaceUrl'))",
        "print(spark.conf.get('spark.databricks.clusterUsageTags.clusterId'))",
        "print(r.apiToken, r.apiUrl, r.workspaceUrl, r.workspaceId, r.clusterId)",
        "print(spark)",
        "print(hasattr(spark, 'no_such_method'), callable(spark.range))",
        "print(spark)",
    ]))
    lines = answer.splitlines()
    assert lines[0].split() == [workspace.token, workspace.host, "1234567890123456",
                                RUNNING_CLUSTER_ID]
    assert lines[1] == RUNNING_CLUSTER_ID
    assert lines[2] == "127.0.0.1:" + port
    assert lines[3] == RUNNING_CLUSTER_ID
    assert lines[4].split() == [workspace.token, workspace.host, "127.0.0.1:" + port,
                                "1234567890123456", RUNNING_CLUSTER_ID]
    assert "not started" in lines[5]  # reading the conf did not start Spark
    assert lines[6] == "False True" and "not started" in lines[7]   # nor did looking methods up


def test_the_shared_cluster_refuses_the_py4j_context_but_not_dbruntime(sdk_client, workspace):
    ctx = new_context(sdk_client, SHARED_CLUSTER_ID)
    # By default getContext() answers and its methods are refused (S30: tags()) ...
    assert text(sdk_client, ctx, "c = dbutils.notebook.entry_point.getDbutils().notebook()"
                                 ".getContext()\nprint(type(c).__name__)", SHARED_CLUSTER_ID) \
        == "_CommandContext"
    for method, returns in (("tags", "scala.collection.immutable.Map"),
                            ("apiToken", "scala.Option")):
        refused = run(sdk_client, ctx, "c.%s()" % method, SHARED_CLUSTER_ID)
        assert refused.result_type == ResultType.ERROR
        assert ("py4j.security.Py4JSecurityException: Method public %s "
                "com.databricks.backend.common.rpc.CommandContext.%s() is not whitelisted on "
                "class class com.databricks.backend.common.rpc.CommandContext"
                % (returns, method)) in refused.cause
    # ... or, switched, getContext() itself is.
    workspace.configure(standard_py4j="get_context")
    ctx = new_context(sdk_client, SHARED_CLUSTER_ID)
    blocked = run(sdk_client, ctx, "dbutils.notebook.entry_point.getDbutils().notebook()"
                                   ".getContext().apiToken().get()", SHARED_CLUSTER_ID)
    assert blocked.result_type == ResultType.ERROR
    assert ("py4j.security.Py4JSecurityException: Method public "
            "com.databricks.backend.common.rpc.CommandContext "
            "com.databricks.dbutils_v1.impl.NotebookUtilsImpl.getContext() is not whitelisted "
            "on class class com.databricks.dbutils_v1.impl.NotebookUtilsImpl") in blocked.cause
    assert text(sdk_client, ctx, "from dbruntime.databricks_repl_context import get_context\n"
                                 "get_context().apiToken", SHARED_CLUSTER_ID) \
        == "Out[2]: %r" % workspace.token
    # A dedicated cluster's context answers.
    own = new_context(sdk_client)
    assert text(sdk_client, own, "dbutils.notebook.entry_point.getDbutils().notebook()"
                                 ".getContext().tags().get('clusterId').get()") \
        == "Out[1]: %r" % RUNNING_CLUSTER_ID


def test_the_context_env_looks_like_a_cluster_without_databricks_credentials(
        sdk_client, workspace, monkeypatch):
    monkeypatch.setenv("DATABRICKS_TOKEN", "leaky")
    monkeypatch.setenv("DATABRICKS_HOST", "http://leaky")
    ctx = new_context(sdk_client)
    answer = text(sdk_client, ctx, "import os\nsorted(k for k in os.environ if "
                                   "k.startswith('DATABRICKS_'))")
    assert answer == "Out[1]: ['DATABRICKS_RUNTIME_VERSION']"


SESSION_NAMES_CHECK = """
import inspect, json, sys
sys.path.insert(0, sys.argv[1])
from local_workspace.spark import _session_names
import pyspark.sql.connect.session as connect, pyspark.sql.session as classic
found = {}
for is_connect, cls in ((False, classic.SparkSession), (True, connect.SparkSession)):
    real = {k: "method" if inspect.isfunction(inspect.getattr_static(cls, k)) else "attribute"
            for k in dir(cls) if not k.startswith("_")}
    found[str(is_connect)] = [real == _session_names(is_connect), len(real)]
print(json.dumps(found))
"""


@pytest.mark.slow
@pytest.mark.parametrize("version", ["15.4", "17.3"])
def test_spark_methods_are_known_before_spark_starts_as_pyspark_defines_them(version):
    """`spark.x` before Spark started answers from SparkSession's source (local_workspace/spark.py):
    the same names, and the same methods, as pyspark's classes (classic and Connect) of the runtime."""
    from local_workspace.runtime import ensure_runtime
    python = ensure_runtime(version).python
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    answer = subprocess.run([python, "-c", SESSION_NAMES_CHECK, tests_dir], capture_output=True, text=True,
                            timeout=120)
    assert answer.returncode == 0, answer.stderr
    found = json.loads(answer.stdout)
    assert found["False"][0] and found["True"][0] and min(found["False"][1], found["True"][1]) > 20, found


@pytest.mark.slow
@pytest.mark.spark
def test_spark_runs_a_monte_carlo_pi(sdk_client):
    ctx = new_context(sdk_client)
    code = ("import random\n"
            "n = 20000\n"
            "inside = spark.range(n).rdd.map(lambda _: random.random() ** 2 + random.random() ** 2"
            " <= 1).filter(bool).count()\n"
            "4.0 * inside / n")
    results = run(sdk_client, ctx, code, timeout=240)
    assert results.result_type == ResultType.TEXT, results
    assert 2.9 < float(results.data.split("Out[1]:")[1]) < 3.4


# ------------------------------------------------------------------ magics

def test_pip_magic_runs_pip_in_the_context_interpreter(sdk_client):
    ctx = new_context(sdk_client)
    results = run(sdk_client, ctx, "%pip --version")
    assert results.data.startswith("pip ") and "python 3" in results.data
    mixed = text(sdk_client, ctx, "before = 1\n%pip --version\nprint('after', before)")
    assert mixed.startswith("pip ") and mixed.endswith("after 1")


def test_sh_magic_runs_the_shell_and_unknown_magics_are_errors(sdk_client):
    ctx = new_context(sdk_client)
    assert text(sdk_client, ctx, "%sh echo from-shell") == "from-shell"
    assert text(sdk_client, ctx, "%%sh\necho one\necho two") == "one\ntwo"
    unknown = run(sdk_client, ctx, "%timeit 1")
    assert unknown.result_type == ResultType.ERROR and "UsageError" in unknown.summary


def test_writes_to_fd_1_do_not_break_the_protocol(sdk_client):
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "import os\nos.write(1, b'{\"type\": \"result\"}\\n')\n"
                         "os.system('echo noise')")
    assert text(sdk_client, ctx, "'still fine'") == "Out[2]: 'still fine'"


# ------------------------------------------------------------------ model serving

def test_the_serving_model_follows_its_documented_rules(workspace):
    cases = {
        "reverse: hello": "olleh",
        "upper: make me loud": "MAKE ME LOUD",
        "sum: 1 2 3.5": "6.5",
        "sum: 1 2 3": "6",
        "sentiment: I love this great product": "positive",
        "sentiment: terrible and awful": "negative",
        "sentiment: it is a table": "neutral",
        "count: one two three four": "4",
        "what is spark?": "echo: what is spark?",
    }
    for prompt, expected in cases.items():
        reply = chat(workspace, prompt)
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": expected}
        assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                                 + body["usage"]["completion_tokens"])
        assert reply.headers["served-model-name"] == body["model"]
    as_json = chat(workspace, "upper: hi", system="Answer in JSON.").json()
    assert json.loads(as_json["choices"][0]["message"]["content"]) == {"answer": "HI"}
    listed = chat(workspace, "reverse: abc [list-content]").json()
    content = listed["choices"][0]["message"]["content"]
    assert content[0]["type"] == "reasoning" and content[-1] == {"type": "text", "text": "cba"}


def test_the_sdk_can_query_and_list_serving_endpoints(sdk_client):
    names = {e.name for e in sdk_client.serving_endpoints.list()}
    assert names == {"default-llm-endpoint", "databricks-meta-llama-3-3-70b-instruct"}
    reply = sdk_client.serving_endpoints.query(
        "databricks-meta-llama-3-3-70b-instruct",
        messages=[ChatMessage(role=ChatMessageRole.USER, content="count: a b c")])
    assert reply.choices[0].message.content == "3"
    assert reply.served_model_name
    with pytest.raises(NotFound):
        sdk_client.serving_endpoints.query("no-such-endpoint", messages=[
            ChatMessage(role=ChatMessageRole.USER, content="hi")])


def test_serving_markers_fail_rate_limit_and_slow_down(workspace):
    assert chat(workspace, "hi", endpoint="nope").json()["error_code"] == "ENDPOINT_NOT_FOUND"
    for _ in range(2):
        failed = chat(workspace, "reverse: x [fail]")
        assert failed.status_code == 500 and failed.json()["error_code"] == "INTERNAL_ERROR"
    prompt = "upper: ok [rate-limit:2]"
    limited = [chat(workspace, prompt) for _ in range(3)]
    assert [r.status_code for r in limited] == [429, 429, 200]
    assert limited[0].headers["Retry-After"] == "1"
    assert limited[0].json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
    assert limited[2].json()["choices"][0]["message"]["content"] == "OK"
    started = time.monotonic()
    assert chat(workspace, "echo [slow:0.5]").status_code == 200
    assert time.monotonic() - started >= 0.5


def test_the_serving_endpoint_answers_many_concurrent_requests(workspace):
    workspace.configure(llm_latency=0.5)
    replies = []
    threads = [threading.Thread(target=lambda i=i: replies.append(chat(workspace, "count: %s"
                                                                       % ("w " * i))))
               for i in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started < 3.0
    assert sorted(int(r.json()["choices"][0]["message"]["content"]) for r in replies) == \
        list(range(16))


# ------------------------------------------------------------------ control API, lifecycle

@pytest.mark.slow
def test_the_control_api_works_over_http(sdk_client, workspace):
    ctx = new_context(sdk_client)
    contexts = api(workspace, "GET", "/_local/contexts").json()["contexts"]
    assert [(c["id"], c["status"]) for c in contexts] == [(ctx, "Running")]
    assert api(workspace, "POST", "/_local/config", json={"output_limit": 10}).json()[
        "config"]["output_limit"] == 10
    assert run(sdk_client, ctx, "print('0123456789abc')").data == "0123456789"
    assert api(workspace, "POST", "/_local/config", json={"bogus": 1}).status_code == 400
    assert api(workspace, "POST", "/_local/inject", json={
        "path": "/api/2.1/clusters/get", "method": "GET", "status": 503}).status_code == 200
    assert sdk_client.clusters.get(JOB_CLUSTER_ID).cluster_id == JOB_CLUSTER_ID
    api(workspace, "POST", "/_local/clusters/state",
        json={"cluster_id": JOB_CLUSTER_ID, "state": "TERMINATED"})
    assert sdk_client.clusters.get(JOB_CLUSTER_ID).state == State.TERMINATED
    assert api(workspace, "POST", "/_local/evict", json={"context_id": ctx}).json() == {
        "evicted": [ctx]}
    logged = api(workspace, "GET", "/_local/requests").json()["requests"]
    assert [r["status"] for r in logged if r["path"] == "/api/2.1/clusters/get"] == [503, 200,
                                                                                     200]
    assert not any(r["path"].startswith("/_local") for r in logged)
    assert api(workspace, "GET", "/_local/requests", token="wrong").status_code == 403


def test_no_context_process_survives_stop():
    with LocalWorkspace() as ws:
        w = WorkspaceClient(config=Config(host=ws.host, token=ws.token, retry_timeout_seconds=5))
        contexts = [new_context(w) for _ in range(3)]
        submit(w, contexts[0], "import time; time.sleep(60)")
        submit(w, contexts[1], "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
        pids = list(ws.context_pids().values())
        assert len(pids) == 3 and all(pid_alive(p) for p in pids)
    assert not any(pid_alive(p) for p in ws.all_pids())


def test_the_serve_command_prints_exports_evicts_on_sigusr1_and_stops_cleanly_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, os.path.join(TESTS_DIR, "local_workspace"),
                             "serve", "--token", "cli-token"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or not lines[-1].startswith("export DATABRICKS_CLUSTER_ID="):
            line = proc.stdout.readline()
            assert line, "serve exited early: %s" % proc.stderr.read()
            lines.append(line.rstrip("\n"))
        exports = dict(l[len("export "):].split("=", 1) for l in lines if l.startswith("export "))
        assert exports["DATABRICKS_TOKEN"] == "cli-token"
        assert exports["DATABRICKS_CLUSTER_ID"] == RUNNING_CLUSTER_ID
        assert any(SHARED_CLUSTER_ID in l for l in lines)
        w = WorkspaceClient(config=Config(host=exports["DATABRICKS_HOST"], token="cli-token",
                                          retry_timeout_seconds=5))
        ctx = new_context(w)
        assert text(w, ctx, "6 * 7") == "Out[1]: 42"
        contexts = requests.get(exports["DATABRICKS_HOST"] + "/_local/contexts", timeout=10,
                                headers={"Authorization": "Bearer cli-token"}).json()
        pid = contexts["contexts"][0]["pid"]
        proc.send_signal(signal.SIGUSR1)           # the newcomer's eviction: every context goes
        assert proc.stdout.readline().startswith("# evicted every execution context")
        assert not pid_alive(pid)
        with pytest.raises(BadRequest, match="is disconnected"):
            w.command_execution.context_status(cluster_id=RUNNING_CLUSTER_ID, context_id=ctx)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert not pid_alive(pid)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
