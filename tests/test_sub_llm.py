"""sub_llm and friends, as an agent uses them: code sent with `exec` calls the local workspace's
deterministic serving endpoint from inside the REPL. Each story runs one REPL program that prints
its observations as one JSON line, and the test checks them (and the workspace's request log)."""

import json
import os
import secrets
import time

import pytest

from local_workspace import RUNNING_CLUSTER_ID, SHARED_CLUSTER_ID
from local_workspace.paths import host_path
from conftest import _running_workspace
from repl_harness import Repl, wait_for

HELPERS = {"sub_llm", "sub_llm_batch", "sub_llm_usage", "sub_llm_budget", "_dbx_repl"}
FAST_RETRIES = "_dbx_repl.llm.backoff = 0.01\n_dbx_repl.llm.max_retries = 1\n"


def observe(repl, code, tag):
    """Run code whose last printed line is JSON; return that JSON."""
    call = repl.exec(code, tag)
    assert call.status == "Finished", call
    return json.loads(repl.read(call["stdout_file"]).strip().splitlines()[-1])


def invocations(workspace, endpoint="default-llm-endpoint"):
    path = "/serving-endpoints/%s/invocations" % endpoint
    return [r for r in workspace.requests() if r["path"] == path and r["method"] == "POST"]


def raw_context_globals(workspace):
    """Global names of a fresh context that never ran the bootstrap (plain Command Execution 1.2 calls)."""
    import ast
    import urllib.request

    def call(path, body=None):
        request = urllib.request.Request(workspace.host + path, data=body and json.dumps(body).encode(),
                                         headers={"Authorization": "Bearer " + workspace.token,
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    where = {"clusterId": RUNNING_CLUSTER_ID, "language": "python"}
    context = call("/api/1.2/contexts/create", where)["id"]
    query = "clusterId=%s&contextId=%s" % (RUNNING_CLUSTER_ID, context)
    assert wait_for(lambda: call("/api/1.2/contexts/status?" + query)["status"] == "Running", 15)
    command = call("/api/1.2/commands/execute", dict(where, contextId=context,
                                                    command="print(sorted(globals()))"))["id"]
    done = wait_for(lambda: (lambda r: r if r["status"] == "Finished" else None)(
        call("/api/1.2/commands/status?%s&commandId=%s" % (query, command))), 15)
    return set(ast.literal_eval(done["results"]["data"]))


def assert_token_nowhere(repl, *calls):
    """The workspace token is in no file under the project dir (session.json included) nor in any
    CLI answer."""
    token = repl.workspace.token
    checked = 0
    for root, _dirs, files in os.walk(repl.project_dir):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert token.encode() not in f.read(), os.path.join(root, name)
            checked += 1
    assert "session.json" in os.listdir(repl.project_dir) and checked > 1
    for call in calls:
        assert token not in call.stdout + call.stderr


@pytest.fixture
def workspace():
    """The local workspace with a random, secret-looking token, so the leak checks are meaningful;
    teardown checks that no context process survives."""
    yield from _running_workspace(token="dapi" + secrets.token_hex(16))


@pytest.fixture
def llm(repl):
    """A live session on the running cluster; the workspace teardown ends its context."""
    created = repl.create()
    assert created.status == "Created", created
    return repl


# -- answers and accounting -------------------------------------------------------------------------

def test_usage_adds_up_over_single_calls_batches_and_failures(workspace, llm):
    prompts = ["upper: a b c", "count: one two three four", "sum: 1 2 3.5", "[list-content] reverse: abc"]
    code = FAST_RETRIES + """import json, time
started = time.time()
answers = [sub_llm(p) for p in %r]
as_json = sub_llm("upper: hi", system="Reply in JSON")
batch = sub_llm_batch(["sentiment: what a good day", "[fail] sentiment: bad"])
try:
    sub_llm("[fail] upper: x")
    failure = None
except sub_llm.Error as error:
    failure = str(error)
elapsed = time.time() - started
usage = sub_llm_usage()
after_reset = sub_llm_usage(reset=True) and sub_llm_usage()
print(json.dumps({"answers": answers, "as_json": as_json, "batch": batch, "errors": batch.errors,
                  "failure": failure, "elapsed": elapsed, "usage": usage, "after_reset": after_reset}))
""" % (prompts,)
    seen = observe(llm, code, "usage")
    assert seen["answers"] == ["A B C", "4", "6.5", "cba"]  # a list content (reasoning model) is joined
    assert json.loads(seen["as_json"]) == {"answer": "HI"}
    assert seen["batch"][0] == "positive"
    assert seen["batch"][1].startswith("[ERROR] SubLLMError: HTTP 500")
    assert seen["errors"] == {"1": seen["batch"][1][len("[ERROR] "):]}
    assert "INTERNAL_ERROR" in seen["failure"] and "after 2 attempts" in seen["failure"]

    succeeded = list(zip(prompts, seen["answers"])) + [("sentiment: what a good day", "positive")]
    prompt_tokens = sum(len(p.split()) for p, _ in succeeded) + len("Reply in JSON upper: hi".split())
    completion_tokens = sum(len(a.split()) for _, a in succeeded) + len(seen["as_json"].split())
    usage = seen["usage"]
    assert usage["calls"] == 8 and usage["succeeded"] == 6 and usage["failed"] == 2
    assert usage["retries"] == 2 and usage["refused"] == 0  # each [fail] was retried once, then given up
    assert usage["prompt_tokens"] == prompt_tokens and usage["completion_tokens"] == completion_tokens
    assert usage["total_tokens"] == prompt_tokens + completion_tokens
    assert 0 < usage["wall_seconds"] <= seen["elapsed"] + 0.01
    assert usage["call_seconds"] >= usage["wall_seconds"] - 0.01
    assert usage["endpoint"] == "default-llm-endpoint" and usage["auth"] == "dbruntime"
    assert usage["budget"] == {"max_calls": None, "max_tokens": None, "calls_used": 8,
                               "tokens_used": prompt_tokens + completion_tokens}
    assert len(invocations(workspace)) == usage["calls"] + usage["retries"]
    assert seen["after_reset"]["calls"] == 0 and seen["after_reset"]["total_tokens"] == 0
    assert seen["after_reset"]["budget"]["calls_used"] == 8  # the budget still counts them


def test_hundred_prompt_batch_with_ten_failures_keeps_order_and_marks_exactly_those(workspace, llm):
    failing = set(range(7, 100, 10))
    prompts = ["reverse: item-%03d%s" % (i, " [fail]" if i in failing else "") for i in range(100)]
    code = FAST_RETRIES + """import json
out = sub_llm_batch(%r, max_workers=16)
print(json.dumps({"type": type(out).__name__, "is_list": isinstance(out, list), "results": out,
                  "errors": out.errors, "usage": sub_llm_usage()}))
""" % (prompts,)
    seen = observe(llm, code, "batch100")
    results = seen["results"]
    assert seen["is_list"] and len(results) == 100
    for i, result in enumerate(results):
        if i in failing:
            assert result.startswith("[ERROR] SubLLMError: HTTP 500 from serving endpoint"), (i, result)
        else:
            assert result == ("item-%03d" % i)[::-1], (i, result)
    assert {int(k) for k in seen["errors"]} == failing
    assert all(results[int(k)] == "[ERROR] " + v for k, v in seen["errors"].items())
    usage = seen["usage"]
    assert (usage["calls"], usage["succeeded"], usage["failed"]) == (100, 90, 10)
    served = [r["status"] for r in invocations(workspace)]
    assert served.count(200) == 90 and served.count(500) == 20 and len(served) == 110  # each [fail] tried twice
    # at least one retry per failing prompt; more only if the local server's small listen backlog reset a
    # connection under 16 parallel connects (retried too, never reaching the handler)
    assert usage["retries"] >= 10


# -- retries, timeouts, concurrency -------------------------------------------------------------------

@pytest.mark.slow
def test_rate_limited_calls_wait_for_retry_after_and_succeed_and_retrying_is_bounded(workspace, llm):
    code = """import json, time
started = time.time()
single = sub_llm("[rate-limit:1] upper: slow down")
single_seconds = time.time() - started
started = time.time()
batch = sub_llm_batch(["[rate-limit:1] upper: r%d" % i for i in range(4)], max_workers=4)
batch_seconds = time.time() - started
usage = sub_llm_usage()

def failure(prompt):
    started = time.time()
    try:
        sub_llm(prompt)
    except sub_llm.Error as error:
        return {"message": str(error), "seconds": time.time() - started}

_dbx_repl.llm.retry_budget = 0.5     # a Retry-After of 1 s no longer fits
over_budget = failure("[rate-limit:3] upper: never")
_dbx_repl.llm.retry_budget, _dbx_repl.llm.max_retries, _dbx_repl.llm.backoff = 300, 2, 0.01
persistent = failure("[fail] upper: broken")
_dbx_repl.llm.timeout, _dbx_repl.llm.max_retries = 0.3, 0
timed_out = failure("[slow:3] upper: late")
print(json.dumps({"single": single, "single_seconds": single_seconds, "batch": batch, "errors": batch.errors,
                  "batch_seconds": batch_seconds, "usage": usage, "over_budget": over_budget,
                  "persistent": persistent, "timed_out": timed_out}))
"""
    seen = observe(llm, code, "retries")
    assert seen["single"] == "SLOW DOWN"
    assert 1.0 <= seen["single_seconds"] < 3  # Retry-After: 1 was honoured, then the retry succeeded
    assert seen["batch"] == ["R0", "R1", "R2", "R3"] and seen["errors"] == {}
    assert 1.0 <= seen["batch_seconds"] < 3  # the four waited in parallel
    assert seen["usage"]["retries"] == 5 and seen["usage"]["failed"] == 0
    assert sum(1 for r in invocations(workspace) if r["status"] == 429) == 5 + 1

    assert seen["over_budget"]["seconds"] < 0.5
    assert "HTTP 429" in seen["over_budget"]["message"] and "retry budget" in seen["over_budget"]["message"]
    assert "gave up after 3 attempts" in seen["persistent"]["message"]
    assert seen["persistent"]["seconds"] < 2
    assert "timed out" in seen["timed_out"]["message"] and seen["timed_out"]["seconds"] < 2
    fails = [r for r in invocations(workspace) if r["status"] == 500]
    assert len(fails) == 3


@pytest.mark.slow
def test_max_workers_bounds_how_many_calls_are_in_flight(workspace, llm):
    workspace.configure(llm_latency=0.2)
    code = """import json, threading, time
lock, state = threading.Lock(), {"now": 0, "peak": 0}
real = _dbx_repl.llm.request
def counting(*args, **kwargs):
    with lock:
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
    try:
        return real(*args, **kwargs)
    finally:
        with lock:
            state["now"] -= 1
_dbx_repl.llm.request = counting
seen = {}
for workers in (3, 12):
    state["peak"] = 0
    started = time.time()
    out = sub_llm_batch(["upper: w%d" % i for i in range(12)], max_workers=workers)
    seen[workers] = {"peak": state["peak"], "seconds": time.time() - started, "ok": out == ["W%d" % i for i in range(12)]}
del _dbx_repl.llm.request
seen["usage"] = sub_llm_usage()
print(json.dumps(seen))
"""
    seen = observe(llm, code, "workers")
    assert seen["3"]["ok"] and seen["12"]["ok"]
    assert seen["3"]["peak"] == 3 and seen["3"]["seconds"] >= 0.8  # 12 calls, 3 at a time, 0.2 s each
    assert seen["12"]["peak"] == 12 and seen["12"]["seconds"] < seen["3"]["seconds"]
    usage = seen["usage"]
    assert usage["calls"] == 24 and usage["call_seconds"] > usage["wall_seconds"] * 1.5


@pytest.mark.slow
def test_cancelling_a_batch_stops_it_promptly_and_the_helpers_keep_working(workspace, llm):
    running = llm.popen("exec", "--command",
                            "out = sub_llm_batch(['[slow:1] upper: s%d' % i for i in range(40)], max_workers=2)",
                            "--tag", "long-batch")
    assert wait_for(lambda: invocations(workspace), 15)   # the batch is under way
    started = time.monotonic()
    cancel = llm.run("cancel")
    assert cancel.status == "Cancelled", cancel
    served_at_cancel = len(invocations(workspace))
    assert llm.finish(running).status == "Cancelled"
    after = llm.exec("print(sub_llm('upper: still here'))", "after")
    assert after.status == "Finished" and after["stdout_preview"] == "STILL HERE\n"
    assert time.monotonic() - started < 10  # not the 20 s the whole batch would take
    time.sleep(1.1)  # the two calls in flight at the cancel may still finish; nothing else starts
    assert len(invocations(workspace)) <= served_at_cancel + 2 + 1 < 40


# -- budget ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_budget_from_create_and_from_code_stops_further_calls(workspace, repl):
    created = repl.create(None, "budget", "--llm-max-calls", "3", "--llm-max-tokens", "1000")
    assert created.status == "Created", created
    code = """import json
seen = {"budget": sub_llm_usage()["budget"], "first": [sub_llm("upper: x%d" % i) for i in range(3)]}
try:
    sub_llm("upper: four")
except sub_llm.BudgetError as error:
    seen["refused"] = "%s: %s" % (type(error).__name__, error)
seen["raised"] = sub_llm_budget(max_calls=5)
batch = sub_llm_batch(["upper: b%d" % i for i in range(4)], max_workers=1)
seen["batch"], seen["batch_errors"] = batch, batch.errors
spent = sub_llm_usage()["budget"]["tokens_used"]
sub_llm_budget(max_calls=None, max_tokens=spent + 5)   # room for two 3-token calls
seen["by_tokens"] = []
try:
    while len(seen["by_tokens"]) < 10:
        seen["by_tokens"].append(sub_llm("upper: t"))
except sub_llm.BudgetError as error:
    seen["tokens_refused"] = str(error)
seen["usage"] = sub_llm_usage()
print(json.dumps(seen))
"""
    seen = observe(repl, code, "budget")
    assert seen["budget"] == {"max_calls": 3, "max_tokens": 1000, "calls_used": 0, "tokens_used": 0}
    assert seen["first"] == ["X0", "X1", "X2"]
    assert seen["refused"].startswith("SubLLMBudgetError: sub_llm budget spent: 3 of max_calls=3")
    assert seen["raised"]["max_calls"] == 5 and seen["raised"]["max_tokens"] == 1000  # unnamed limits stay
    assert seen["batch"][:2] == ["B0", "B1"]
    assert seen["batch"][2:] == ["[ERROR] " + seen["batch_errors"][k] for k in ("2", "3")]
    assert all(v.startswith("SubLLMBudgetError:") for v in seen["batch_errors"].values())
    assert seen["by_tokens"] == ["T", "T"] and "max_tokens=" in seen["tokens_refused"]
    usage = seen["usage"]
    assert usage["calls"] == 7 and usage["refused"] == 4 and usage["failed"] == 0
    assert len(invocations(workspace)) == 7  # refused calls never reach the endpoint
    # the CLI names the budget error like any other exception
    late = repl.exec("sub_llm('upper: one more')", "late")
    assert late.status == "Error" and late["error"]["type"] == "SubLLMBudgetError"
    assert "sub_llm_budget(" in late["error"]["message"]


# -- endpoints ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_endpoint_comes_from_the_create_flag_or_the_env_var_and_unknown_ones_are_named(
        workspace, repl, tmp_path):
    llama = "databricks-meta-llama-3-3-70b-instruct"
    created = repl.create(None, "flag", "--llm-endpoint", llama)
    assert created.status == "Created" and created["llm_endpoint"] == llama
    seen = observe(repl, "print(__import__('json').dumps([sub_llm('upper: via flag'), "
                         "sub_llm_usage()['endpoint']]))", "flag")
    assert seen == ["VIA FLAG", llama]
    assert len(invocations(workspace, llama)) == 1 and not invocations(workspace)

    other = tmp_path / "other"
    other.mkdir()
    by_env = Repl(workspace, other, repl.home)
    by_env.env["DBX_REPL_LLM_ENDPOINT"] = "no-such-endpoint"
    assert by_env.create().status == "Created"
    seen = observe(by_env, """import json
try:
    sub_llm("upper: hello")
except sub_llm.Error as error:
    missing = "%s: %s" % (type(error).__name__, error)
print(json.dumps([missing, sub_llm("upper: explicit", endpoint="default-llm-endpoint")]))
""", "missing")
    assert seen[0].startswith("SubLLMError: Serving endpoint 'no-such-endpoint' was not found")
    assert "serving-endpoints list" in seen[0] and "--llm-endpoint" in seen[0]
    assert len(invocations(workspace, "no-such-endpoint")) == 1  # a 404 is not retried
    assert seen[1] == "EXPLICIT"


# -- namespace ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_namespace_gains_only_the_helpers_and_user_names_survive(workspace, llm):
    baseline = raw_context_globals(workspace)
    names = set(eval(llm.exec("print(sorted(globals()))", "names")["stdout_preview"]))
    assert names - baseline == HELPERS and baseline <= names
    for stray in ("os", "json", "time", "sys", "threading", "random", "_LLM", "SubLLMError",
                  "_dbx_repl_install", "keep", "setting"):
        assert stray not in names

    seen = observe(llm, """json, time, os, random, threading = 'my json', 'my time', 42, [7], None
SubLLMError = 'mine'
sub_llm_budget(max_calls=100)
answers = [sub_llm("upper: one"), list(sub_llm_batch(["upper: two", "reverse: three"]))]
usage = sub_llm_usage()
print(__import__('json').dumps({"answers": answers, "calls": usage["calls"],
      "user": [json, time, os, random, threading, SubLLMError]}))
""", "use")
    assert seen["answers"] == ["ONE", ["TWO", "eerht"]] and seen["calls"] == 3
    assert seen["user"] == ["my json", "my time", 42, [7], None, "mine"]


# -- auth on the cluster ---------------------------------------------------------------------------------

def test_shared_cluster_uses_the_runtime_context_and_says_what_it_tried_when_nothing_works(
        workspace, repl):
    # On the cluster's DBFS, outside the project: the token must not reach its files.
    secret = host_path(workspace._tmpdir, None, "dbfs:/token-file")
    os.makedirs(os.path.dirname(secret), exist_ok=True)
    with open(secret, "w") as f:
        f.write(workspace.token)
    created = repl.create(SHARED_CLUSTER_ID, "shared")
    assert created.status == "Created", created
    code = """import json, os, sys
seen = {"answer": sub_llm("upper: shared ok"), "auth": sub_llm_usage()["auth"]}
try:
    dbutils.notebook.entry_point.getDbutils().notebook().getContext().apiToken()
except Exception as error:
    seen["getContext"] = type(error).__name__
sys.modules["dbruntime.databricks_repl_context"] = None   # as if the runtime had no REPL context
try:
    sub_llm("upper: nothing")
except sub_llm.Error as error:
    seen["no_credentials"] = str(error)
os.environ["DATABRICKS_TOKEN"] = dbutils.fs.head("dbfs:/token-file").strip()
seen["env_answer"], seen["env_auth"] = sub_llm("upper: from env"), sub_llm_usage()["auth"]
del os.environ["DATABRICKS_TOKEN"]
print(json.dumps(seen))
"""
    call = repl.exec(code, "auth")
    assert call.status == "Finished", call
    seen = json.loads(repl.read(call["stdout_file"]).strip().splitlines()[-1])
    assert seen["answer"] == "SHARED OK" and seen["auth"] == "dbruntime"
    assert seen["getContext"] == "Py4JError"
    message = seen["no_credentials"]
    assert message.startswith("sub_llm found no workspace token on the cluster. Tried, in order:")
    tried = ["dbruntime get_context(): ModuleNotFoundError",
             "dbutils getContext(): blocked (shared access mode: getContext() is not whitelisted)",
             "host given at create: ok", "env DATABRICKS_TOKEN: not set"]
    positions = [message.index(step) for step in tried]
    assert positions == sorted(positions)
    assert "os.environ['DATABRICKS_TOKEN']" in message
    assert seen["env_answer"] == "FROM ENV" and seen["env_auth"] == "create+env"
    assert_token_nowhere(repl, created, call)


@pytest.mark.slow
def test_no_token_appears_in_any_output_file_or_session_json(workspace, llm):
    calls = [llm.exec(FAST_RETRIES + "print(sub_llm('upper: hi'))\n"
                          "print(sub_llm_batch(['[fail] x', 'count: a b', '[rate-limit:1] sum: 1 2']))", "mix")]
    calls.append(llm.exec("print(vars(_dbx_repl.llm))\nprint(vars(_dbx_repl))\nprint(sub_llm_usage())\n"
                              "print(sub_llm.__closure__, sub_llm_budget())", "internals"))
    calls.append(llm.exec("sub_llm('x', endpoint='nope')", "missing"))
    assert [c.status for c in calls] == ["Finished", "Finished", "Error"]
    assert calls[2]["error"]["type"] == "SubLLMError" and "'nope'" in calls[2]["error"]["message"]
    stderr = llm.read(calls[2]["stderr_file"])  # one clean exception: no chained HTTPError, no <locals>
    assert "During handling" not in stderr and "<locals>" not in stderr
    assert calls[0]["stdout_preview"].startswith("HI\n['[ERROR] SubLLMError: HTTP 500")
    assert calls[0]["stdout_preview"].endswith("', '2', '3']\n")
    assert "'total_tokens'" in llm.read(calls[1]["stdout_file"])
    assert workspace.token not in json.dumps(llm.session())
    assert_token_nowhere(llm, *calls)


# -- the reference's examples ------------------------------------------------------------------------

@pytest.mark.slow
def test_the_examples_in_bootstrap_helpers_md_run_and_print_what_they_say(workspace, llm):
    """Every ```python block under "## Examples" runs as one command; each `print(...)  # X` line
    promises the output line X (a trailing "   (remark)" is not part of it)."""
    import re
    doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "references", "bootstrap-helpers.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.*?)```", doc.split("\n## Examples\n", 1)[1], re.S)
    assert len(blocks) >= 5
    code = "\n".join(blocks)
    promised = [m.group(1).split("   (")[0].strip()
                for m in re.finditer(r"^print\(.*\)\s+# (.+)$", code, re.M)]
    assert len(promised) >= 5
    call = llm.exec(code, "doc-examples")
    assert call.status == "Finished", call
    lines = [line.strip() for line in llm.read(call["stdout_file"]).splitlines()]
    assert [line for line in lines if line in promised] == promised, lines
    assert any(line.startswith("stopped after 2 calls: sub_llm budget spent:") for line in lines)
