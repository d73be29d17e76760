#!/usr/bin/env python3
"""Speed benchmark for dbx_repl.py against the local workspace (not a pytest module).

    python tests/benchmark.py              # full run, a few minutes
    python tests/benchmark.py --quick      # fewer repetitions, no 20 s command
    python tests/benchmark.py --repeat 30  # more samples for the short rows
    python tests/benchmark.py --only scale # exec in a new session and in one of 10,000 steps (time, RSS)
    python tests/benchmark.py --only status # status of a running step, read through the sidecar context
    python tests/benchmark.py --per-call-only  # exec print(1) at 0 and 50 ms latency: time, requests, connections

It starts a LocalWorkspace itself (the real service's 50,000-character output limit), runs the CLI
as SKILL.md tells an agent to (one process per call, `sys.executable <the skill's folder> ...`, with
Python's default bytecode cache, even where PYTHONDONTWRITEBYTECODE is set for this process) and
prints a Markdown table of median and p95 wall times. The per-call rows also time
`sys.executable dbx_repl.py`, which compiles the whole file on every call. Beside every row it prints a floor measured in the same run:

* `python -c pass`: starting the interpreter (sys.executable) and nothing else;
* stdlib: the same REST calls made with urllib from this process (execute, then status polls every
  10 ms; for transfers the same bootstrap `fetch` commands), i.e. the service's own cost.

So `floor = python -c pass + stdlib` is what a CLI with zero overhead of its own would take.
Times come from one machine clock: a command records `time.time()` at its end in its output, and
the lag is the time the CLI process exits minus that. Read docs/benchmark.md for the numbers.
"""

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zlib

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)
CLI = os.path.join(ROOT, "dbx_repl.py")
PROGRAM = [sys.executable, ROOT]           # the skill's folder: its __main__.py imports dbx_repl (cached)
SCRIPT = [sys.executable, CLI]             # the script: compiled on every call
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

from local_workspace import RUNNING_CLUSTER_ID, LocalWorkspace  # noqa: E402
from repl_harness import process_tree  # noqa: E402

REAL_OUTPUT_LIMIT = 50_000                 # characters, the service's default text result cap
TEXT_MB = 20
FLOOR_POLL = 0.01

# Realistic, varied text: log-like lines with counters, floats and words from a seeded RNG. It
# compresses ~3x with zlib (a repeated line would compress ~1000x and flatter the transfer).
TEXT_COMMAND = r'''
import random, time
_rng = random.Random(1234)
_words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
          "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
          "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "customer", "order", "invoice",
          "region", "latency", "error", "retry", "partition", "shuffle", "stage", "task", "driver"]
_words += ["w%04d" % i for i in range(2000)]
_lines, _size, _i = [], 0, 0
while _size < __BYTES__:
    _line = "%08d %s %.6f %s\n" % (_i, _rng.choice(("INFO", "WARN", "DEBUG")), _rng.random() * 1000,
                                    " ".join(_rng.choices(_words, k=_rng.randint(4, 14))))
    _lines.append(_line)
    _size += len(_line)
    _i += 1
__TARGET__
'''
TEXT_PRINT = "print(''.join(_lines), end='')\ndel _lines\nprint('END %r' % time.time())"
TEXT_TO_FILE = "with open(__PATH__, 'w') as _f:\n    _f.write(''.join(_lines))\ndel _lines"

TABLE_DISPLAY = r'''
import time
_rows = [(i, i * 0.5, "customer-%06d" % i, i % 7 == 0) for i in range(100000)]
try:
    import pandas as _pd
except ImportError:
    display(_rows, columns=["id", "value", "name", "flag"])
else:
    display(_pd.DataFrame(_rows, columns=["id", "value", "name", "flag"]))
'''
TABLE_TEXT = r'''
import time
print("id,value,name,flag")
print("\n".join("%d,%s,customer-%06d,%s" % (i, i * 0.5, i, i % 7 == 0) for i in range(100000)))
print('END %r' % time.time())
'''
# The concurrency floor: the same 64 calls from a bare thread pool in the same context, keep-alive
# connections, no retries or accounting. On 2 cores the local server's own CPU caps this.
BARE_BATCH_COMMAND = r'''
import http.client, json, threading, time, urllib.parse
from concurrent.futures import ThreadPoolExecutor
_bare = threading.local()
_ctx = dbutils.notebook.entry_point.getDbutils().notebook().getContext()
_auth = {"Authorization": "Bearer " + _ctx.apiToken().get(), "Content-Type": "application/json"}
def _bare_call(i):
    if getattr(_bare, "conn", None) is None:
        _bare.conn = http.client.HTTPConnection(urllib.parse.urlsplit("__HOST__").netloc)
    _bare.conn.request("POST", "/serving-endpoints/default-llm-endpoint/invocations",
                       body=json.dumps({"messages": [{"role": "user", "content": "upper: item %d" % i}]}),
                       headers=_auth)
    return _bare.conn.getresponse().read()
_t = time.time()
with ThreadPoolExecutor(__WORKERS__) as _pool:
    _n = len(list(_pool.map(_bare_call, range(64))))
print("BARE %r %d" % (time.time() - _t, _n))
'''
BATCH_COMMAND = r'''
import time
_prompts = ["upper: item number %d" % i for i in range(64)]
_t = time.time()
_answers = sub_llm_batch(_prompts, max_workers=__WORKERS__)
print("BATCH %r %d %d" % (time.time() - _t, len(_answers), len(_answers.errors)))
'''


# -- statistics and the table -----------------------------------------------------------------------

def p95(values):
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-95 * len(ordered) // 100) - 1))]


def fmt(seconds):
    if seconds is None:
        return "-"
    return "%.0f ms" % (seconds * 1000) if seconds < 1 else "%.2f s" % seconds


class Table:
    def __init__(self):
        self.rows = []

    def add(self, metric, samples, floor=None, goal=None, note=""):
        """A row: median and p95 of `samples`, the floor beside it, `goal` = (target text, met or not)."""
        target, met = goal or ("", None)
        med = statistics.median(samples) if samples else None
        row = [metric, fmt(med), fmt(p95(samples)) if samples else "-", str(len(samples)),
               floor if isinstance(floor, str) else fmt(floor), target,
               "" if met is None else ("yes" if met else "NO"), note]
        self.rows.append(row)
        print("  " + " | ".join(row), flush=True)
        return med

    def add_value(self, metric, value, note=""):
        """A row with one measured value that is not a time (e.g. memory)."""
        row = [metric, value, "-", "1", "-", "", "", note]
        self.rows.append(row)
        print("  " + " | ".join(row), flush=True)

    def render(self):
        head = ["metric", "median", "p95", "n", "floor (same run)", "target", "met", "notes"]
        widths = [max(len(r[i]) for r in self.rows + [head]) for i in range(len(head))]
        line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        return "\n".join(out)


# -- the stdlib floor: the same REST calls through urllib ---------------------------------------------

class Raw:
    def __init__(self, host, token, cluster_id):
        self.host, self.token, self.cluster_id = host, token, cluster_id

    def call(self, method, path, query=None, body=None):
        url = self.host + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Authorization": "Bearer " + self.token,
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as answer:
            return json.loads(answer.read())

    def run(self, context_id, command, poll=FLOOR_POLL):
        """Execute and poll; returns (status dict, time.time() when Finished was seen)."""
        command_id = self.call("POST", "/api/1.2/commands/execute",
                               body={"clusterId": self.cluster_id, "contextId": context_id,
                                     "language": "python", "command": command})["id"]
        while True:
            status = self.call("GET", "/api/1.2/commands/status",
                               query={"clusterId": self.cluster_id, "contextId": context_id,
                                      "commandId": command_id})
            if status["status"] in ("Finished", "Error", "Cancelled"):
                return status, time.time()
            time.sleep(poll)

    def create(self):
        context_id = self.call("POST", "/api/1.2/contexts/create",
                               body={"clusterId": self.cluster_id, "language": "python"})["id"]
        while self.call("GET", "/api/1.2/contexts/status",
                        query={"clusterId": self.cluster_id, "contextId": context_id})["status"] != "Running":
            time.sleep(FLOOR_POLL)
        return context_id

    def destroy(self, context_id):
        self.call("POST", "/api/1.2/contexts/destroy", body={"clusterId": self.cluster_id, "contextId": context_id})

    def fetch_file(self, context_id, path, sink):
        """The CLI's chunk protocol (bootstrap `fetch`, table rows), minus the CLI."""
        offset, rounds = 0, 0
        while True:
            status, _ = self.run(context_id, "_dbx_repl.fetch(%r, %d, 'table')" % (path, offset))
            rounds += 1
            results = status["results"]
            raw = base64.b64decode("".join(row[0] for row in results["data"]))
            header, _, payload = raw.partition(b"\n")
            header = json.loads(header)
            data = zlib.decompress(payload) if payload else b""
            sink.write(data)
            offset = header["next"]
            if offset >= header["size"] or not data:
                return rounds


# -- the local workspace itself: memory, context creation, first Spark use -------------------------

def _rss_bytes(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cluster_rss(workspace):
    """RSS of the cluster's whole process tree: drivers (with their JVMs) and context workers."""
    with workspace._lock:
        roots = [d.proc.pid for d in workspace._drivers.values()]
    roots += list(workspace.context_pids().values())
    return sum(_rss_bytes(pid) for pid in process_tree(roots))


def local_workspace_rows(table, repeat):
    """Rows for the local workspace itself, on a fresh one (so the first Spark use is cold)."""
    started = time.perf_counter()
    workspace = LocalWorkspace().start()
    start_wall = time.perf_counter() - started
    try:
        raw = Raw(workspace.host, workspace.token, RUNNING_CLUSTER_ID)
        table.add("local workspace start (runtime env cached)", [start_wall])
        started = time.perf_counter()
        first = raw.create()
        first_create = time.perf_counter() - started
        creates = []
        for _ in range(repeat):
            started = time.perf_counter()
            ctx = raw.create()
            creates.append(time.perf_counter() - started)
            raw.destroy(ctx)
        table.add("create a context (first one: + driver process)", creates,
                  floor="first %s" % fmt(first_create), note="to status Running, polled every 10 ms")
        rss_no_spark = cluster_rss(workspace)
        started = time.perf_counter()
        status, _ = raw.run(first, "spark.range(1000).count()")
        first_spark = time.perf_counter() - started
        assert status["results"]["data"] == "Out[1]: 1000", status
        table.add("first Spark use on the cluster (JVM + Hive metastore start)", [first_spark])
        rss_one = cluster_rss(workspace)
        attach = []
        for _ in range(7):
            ctx = raw.create()
            started = time.perf_counter()
            status, _ = raw.run(ctx, "spark.range(10).count()")
            attach.append(time.perf_counter() - started)
            assert status["results"]["data"] == "Out[1]: 10", status
        table.add("first Spark use in a further context (attach to the JVM)", attach)
        rss_eight = cluster_rss(workspace)
        mb = lambda b: "%.0f MB" % (b / 1e6)
        table.add_value("memory, 1 context, no Spark yet (cluster tree RSS)", mb(rss_no_spark),
                        note="driver process + 1 context")
        table.add_value("memory, 1 context using Spark (cluster tree RSS)", mb(rss_one),
                        note="driver + JVM + 1 context")
        table.add_value("memory, 8 contexts using Spark (cluster tree RSS)", mb(rss_eight),
                        note="+%s per further context" % mb((rss_eight - rss_one) / 7))
    finally:
        workspace.stop()


# -- the CLI ----------------------------------------------------------------------------------------

class Cli:
    def __init__(self, workspace, project, env, program=PROGRAM):
        self.workspace, self.project, self.env, self.program = workspace, project, env, program

    def run(self, *args, env=None):
        """(wall seconds from process start to exit, time.time() at exit, parsed JSON)."""
        started = time.perf_counter()
        proc = subprocess.run([*self.program, args[0], "--project-dir", self.project, *args[1:]],
                              capture_output=True, text=True, env={**self.env, **(env or {})})
        wall, ended = time.perf_counter() - started, time.time()
        lines = [l for l in proc.stdout.splitlines() if l.strip()]
        if len(lines) != 1:
            raise RuntimeError("CLI %s printed %r (stderr %r)" % (args[0], proc.stdout, proc.stderr[-2000:]))
        return wall, ended, json.loads(lines[0])

    def exec(self, code, tag, timeout=600, env=None):
        wall, ended, body = self.run("exec", "--command", code, "--tag", tag, "--timeout", str(timeout), env=env)
        if body.get("status") != "Finished":
            raise RuntimeError("exec %s: %s" % (tag, json.dumps(body)[:2000]))
        return wall, ended, body

    def session(self):
        with open(os.path.join(self.project, "session.json")) as f:
            return json.load(f)

    def read(self, relative):
        path = relative if os.path.isabs(relative) else os.path.join(self.project, relative)
        with open(path, "rb") as f:
            return f.read()


# Runs the CLI and reports its peak RSS (ru_maxrss, KiB on Linux) on stderr as it exits.
RSS_WRAPPER = ("import atexit, resource, runpy, sys\n"
               "atexit.register(lambda: sys.stderr.write('MAXRSS %d\\n' % "
               "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
               "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")


def exec_with_rss(cli, code, tag):
    """(wall seconds, peak RSS in MB) of one `exec` run as an agent runs it."""
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RSS_WRAPPER, CLI, "exec", "--project-dir", cli.project,
                           "--command", code, "--tag", tag], capture_output=True, text=True, env=cli.env)
    wall = time.perf_counter() - started
    body = json.loads(proc.stdout.strip().splitlines()[-1])
    if body.get("status") != "Finished":
        raise RuntimeError("exec %s: %s" % (tag, json.dumps(body)[:2000]))
    rss = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS ")]
    return wall, rss[-1] / 1024


def fake_steps(first, count, context_id):
    return [{"step": n, "tag": "t%d" % n, "status": "Finished", "command_file": "repl_outputs/%03d_t%d.cmd.py" % (n, n),
             "stdout_file": "repl_outputs/%03d_t%d.stdout" % (n, n), "stderr_file": "repl_outputs/%03d_t%d.stderr" % (n, n),
             "started_at": "2026-01-01T00:00:00.000+00:00", "finished_at": "2026-01-01T00:00:01.000+00:00",
             "elapsed_seconds": 1.0, "command_id": "%032x" % n, "context_id": context_id}
            for n in range(first, first + count)]


def scale_rows(cli, table, n):
    """exec print(1) in a small session and in one whose session.json holds 10,000 steps."""
    path = os.path.join(cli.project, "session.json")
    results = {}
    for label, extra in (("small (a few steps)", 0), ("10,000 steps", 10_000)):
        if extra:
            with open(path) as f:
                log = json.load(f)
            first = log["step_counter"] + 1
            log["steps"] += fake_steps(first, extra, log["context_id"])
            log["step_counter"] = first + extra - 1
            with open(path, "w") as f:
                json.dump(log, f)
        samples = [exec_with_rss(cli, "print(1)", "scale") for _ in range(n)]
        results[label] = (statistics.median(w for w, _ in samples), max(r for _, r in samples))
        note = "peak RSS %.0f MB; session.json %.1f MB" % (results[label][1], os.path.getsize(path) / 1e6)
        if extra:
            slower = results[label][0] - results["small (a few steps)"][0]
            more = results[label][1] - results["small (a few steps)"][1]
            note += "; +%s and +%.0f MB over the small session" % (fmt(slower), more)
            table.add("exec print(1), session of %s" % label, [w for w, _ in samples],
                      goal=("<= small +500 ms, +100 MB", slower <= 0.5 and more <= 100), note=note)
        else:
            table.add("exec print(1), session of %s" % label, [w for w, _ in samples], note=note)


def end_time(text):
    """The `END <time.time()>` line a benchmark command prints last."""
    for line in reversed(text.splitlines()):
        if line.startswith("END "):
            return float(line.split()[1])
    raise RuntimeError("no END line in the output tail: %r" % text[-300:])


def python_pass(n):
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        samples.append(time.perf_counter() - started)
    return samples


FLOOR_EXEC_SCRIPT = r'''
import json, sys, time, urllib.request, urllib.parse
host, token, cluster, context = sys.argv[1:5]
def call(method, path, query=None, body=None):
    url = host + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Authorization": "Bearer " + token,
                                 "Content-Type": "application/json"})
    with urllib.request.urlopen(req) as answer:
        return json.loads(answer.read())
cid = call("POST", "/api/1.2/commands/execute", body={"clusterId": cluster, "contextId": context,
           "language": "python", "command": "print(1)"})["id"]
while True:
    status = call("GET", "/api/1.2/commands/status", query={"clusterId": cluster, "contextId": context,
                  "commandId": cid})
    if status["status"] in ("Finished", "Error", "Cancelled"):
        break
    time.sleep(0.01)
print(json.dumps(status["results"]))
'''


# -- per call: process start to JSON, in-process, requests and connections -------------------------

def stdlib_exec(workspace, context_id, n):
    """The floor of an exec: a stdlib-only process (urllib) making execute + status polls."""
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", FLOOR_EXEC_SCRIPT, workspace.host, workspace.token,
                        RUNNING_CLUSTER_ID, context_id], check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return samples


def exec_in_process(cli, code, tag):
    """Wall seconds of one exec run by dbx_repl.main in this process (the interpreter started and
    the SDK imported already): the call's own work."""
    import contextlib
    import io
    import signal
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import dbx_repl
    saved_env, saved_term, saved_umask = dict(os.environ), signal.getsignal(signal.SIGTERM), os.umask(0o077)
    os.environ.clear()
    os.environ.update(cli.env)
    out = io.StringIO()
    try:
        started = time.perf_counter()
        with contextlib.redirect_stdout(out):
            dbx_repl.main(["exec", "--project-dir", cli.project, "--command", code, "--tag", tag])
        wall = time.perf_counter() - started
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        signal.signal(signal.SIGTERM, saved_term)
        os.umask(saved_umask)
    body = json.loads(out.getvalue())
    if body.get("status") != "Finished":
        raise RuntimeError("in-process exec %s: %s" % (tag, json.dumps(body)[:2000]))
    return wall


def per_call_rows(cli, table, n, py):
    """exec print(1) at 0 and 50 ms latency: process start to JSON; the same call in-process (its own
    work, without the interpreter's start and the SDK's import); the requests and connections each
    call makes, as the local workspace counts them; beside them the floors: `python -c pass` and a
    stdlib-only process making the same requests."""
    workspace = cli.workspace
    context_id = cli.session()["context_id"]
    script = Cli(workspace, cli.project, cli.env, program=SCRIPT)
    exec_in_process(cli, "print(1)", "p")                 # imports the SDK here once, untimed
    for latency in (0, 50):
        workspace.configure(latency_ms=latency)
        try:
            label = "%d ms latency" % latency
            walls, scripts, own, requests, connections = [], [], [], [], []
            for _ in range(n):                           # interleaved: the machine's load hits all alike
                before, opened = len(workspace.requests()), workspace.connections()
                wall, _, body = cli.exec("print(1)", "p")
                assert body["stdout_preview"] == "1\n", body
                walls.append(wall)
                requests.append(len(workspace.requests()) - before)
                connections.append(workspace.connections() - opened)
                scripts.append(script.exec("print(1)", "p")[0])
                own.append(exec_in_process(cli, "print(1)", "p"))
            floor = "%s (stdlib process), %s (python -c pass)" % (
                fmt(statistics.median(stdlib_exec(workspace, context_id, n))), fmt(py))
            allowed = py + 0.25 + 2 * latency / 1000
            table.add("exec print(1), process start to JSON, %s" % label, walls, floor=floor,
                      goal=("<= python + %s" % fmt(allowed - py), statistics.median(walls) <= allowed),
                      note="python3 <skill folder>, as SKILL.md runs it")
            table.add("exec print(1) via python3 dbx_repl.py, %s" % label, scripts, floor=floor,
                      note="the script is compiled on every call (no bytecode cache)")
            table.add("exec print(1), in-process (imports done), %s" % label, own, floor=floor,
                      note="the call's own work; process start to JSON minus this = start + imports")
            table.rows.append(["requests / connections per exec print(1), %s" % label,
                               "%d / %d" % (statistics.median(requests), statistics.median(connections)), "-",
                               str(n), "-", "<= 2 / 1", "yes" if max(requests) <= 2 and max(connections) <= 1
                               else "NO", "max %d / %d" % (max(requests), max(connections))])
            print("  " + " | ".join(table.rows[-1]), flush=True)
        finally:
            workspace.configure(latency_ms=0)


def status_rows(cli, table, n):
    """`status` while a step runs: its progress is read through the sidecar context (the first call
    creates it). The floor is `status` of the same session when idle (no progress read)."""
    idle = [cli.run("status")[0] for _ in range(n)]
    wall, _, body = cli.run("exec", "--command", "import time\nprint('waiting', flush=True)\ntime.sleep(600)",
                            "--tag", "sleeper", "--timeout", "1")
    assert body["status"] == "Running", body
    first = body["progress"].get("read_seconds")
    samples, reads = [], []
    for _ in range(n):
        wall, _, body = cli.run("status")
        assert body["status"] == "Busy" and "output_tail" in body["progress"], body
        samples.append(wall)
        reads.append(body["progress"]["read_seconds"])
    cli.run("cancel")
    table.add("status of a running step (progress via the sidecar)", samples,
              floor="%s (status, idle session)" % fmt(statistics.median(idle)),
              note="progress read %s of it; the first read (sidecar created, in the Running answer) %s"
                   % (fmt(statistics.median(reads)), fmt(first)))


# -- the benchmark ----------------------------------------------------------------------------------

def finish(cli, table, began):
    """Destroy the session and print the table."""
    cli.run("destroy")
    print()
    print(table.render())
    print("\nTotal benchmark time: %.0f s; load average at the end %.1f (other processes on the machine "
          "inflate every row, floors included)" % (time.monotonic() - began, os.getloadavg()[0]))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, skip the 20 s command")
    parser.add_argument("--repeat", type=int, default=None, help="samples for the short rows (default 15, quick 5)")
    parser.add_argument("--only", choices=("scale", "status"), default=None, help="run one section only")
    parser.add_argument("--local-workspace-only", action="store_true",
                        help="only the rows of the local workspace itself (memory, context, Spark)")
    parser.add_argument("--per-call-only", action="store_true", help="only the per-call rows (exec print(1) at "
                                                                      "0 and 50 ms latency, requests, connections)")
    args = parser.parse_args(argv)
    n = args.repeat or (5 if args.quick else 15)
    heavy = max(2, n // 5) if args.quick else max(3, n // 5)
    if args.local_workspace_only:
        table = Table()
        local_workspace_rows(table, n)
        print()
        print(table.render())
        return 0

    scratch = tempfile.mkdtemp(prefix="dbx-repl-bench-")
    workspace = LocalWorkspace(output_limit=REAL_OUTPUT_LIMIT)
    workspace.start()
    began = time.monotonic()
    try:
        project = os.path.join(scratch, "project")
        home = os.path.join(scratch, "home")
        os.makedirs(project)
        os.makedirs(home)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "DBX_REPL_"))
               and k != "PYTHONDONTWRITEBYTECODE"}
        env.update(HOME=home, DATABRICKS_HOST=workspace.host, DATABRICKS_TOKEN=workspace.token)
        cli = Cli(workspace, project, env)
        raw = Raw(workspace.host, workspace.token, RUNNING_CLUSTER_ID)
        table = Table()
        print("dbx_repl benchmark: %s, python %s, %d CPUs, load average %.1f, local workspace %s, output "
              "limit %d chars, n=%d" % (time.strftime("%Y-%m-%d %H:%M"), sys.version.split()[0], os.cpu_count(),
                                        os.getloadavg()[0], workspace.host, REAL_OUTPUT_LIMIT, n), flush=True)

        if args.only in ("scale", "status"):
            assert cli.run("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "bench")[2]["status"] \
                == "Created"
            (scale_rows if args.only == "scale" else status_rows)(cli, table, n)
            cli.run("destroy")
            print()
            print(table.render())
            return 0

        # 0. floors that do not depend on the session
        pass_samples = python_pass(n)
        py = statistics.median(pass_samples)
        table.add("python -c pass (sys.executable)", pass_samples, floor="-", note="interpreter start")

        # 3. create / destroy (a session is needed for everything else, so create comes first)
        create, destroy = [], []
        for i in range(heavy):
            wall, _, body = cli.run("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "bench")
            assert body["status"] == "Created", body
            create.append(wall)
            if i < heavy - 1:
                wall, _, body = cli.run("destroy")
                assert body["status"] == "Destroyed", body
                destroy.append(wall)
        floor_create, floor_destroy = [], []
        for _ in range(heavy):
            started = time.perf_counter()
            ctx = raw.create()
            floor_create.append(time.perf_counter() - started)
            started = time.perf_counter()
            raw.destroy(ctx)
            floor_destroy.append(time.perf_counter() - started)
        context_id = cli.session()["context_id"]

        # 1. exec print(1): process start to JSON, in-process, requests and connections, at 0 and 50 ms
        per_call_rows(cli, table, n, py)
        if args.per_call_only:
            return finish(cli, table, began)

        # 2. completion lag
        durations = [(0.1, n), (2.0, max(3, n // 3))]
        if not args.quick:
            durations.append((20.0, 3))
        for duration, count in durations:
            code = "import time\ntime.sleep(%r)\nprint('END %%r' %% time.time())" % duration
            lags, floor_lags = [], []
            for _ in range(count):
                _, ended, body = cli.exec(code, "lag")
                lags.append(ended - end_time(body["stdout_preview"]))
            for _ in range(max(2, count // 2)):
                status, seen = raw.run(context_id, code)
                floor_lags.append(seen - end_time(status["results"]["data"]))
            allowed = 0.15 if duration < 2 else max(0.15, 0.05 * duration)
            med = statistics.median(lags)
            table.add("lag, command end -> CLI exit, %gs command" % duration, lags,
                      floor=statistics.median(floor_lags), goal=("<= %s" % fmt(allowed), med <= allowed),
                      note="floor: urllib polling every 10 ms")

        # 3 (printed here, after the floors of the same run)
        table.add("create (new context + bootstrap)", create,
                  floor="%s (+%s python)" % (fmt(statistics.median(floor_create)), fmt(py)),
                  note="floor: contexts/create + status polls, no bootstrap")
        table.add("destroy", destroy or [float("nan")],
                  floor="%s (+%s python)" % (fmt(statistics.median(floor_destroy)), fmt(py)))

        # 4a. 20 MB of varied text at the 50,000-character limit, through the full-output fetch
        size = TEXT_MB * 1000 * 1000
        text_code = TEXT_COMMAND.replace("__BYTES__", str(size))
        walls, transfers, rates, landed, ratio = [], [], [], None, None
        for _ in range(heavy):
            wall, ended, body = cli.exec(text_code.replace("__TARGET__", TEXT_PRINT), "text20mb")
            data = cli.read(body["stdout_file"])
            assert not body.get("truncated"), body
            transfer = ended - end_time(data[-200:].decode())
            walls.append(wall)
            transfers.append(transfer)
            rates.append(len(data) / 1e6 / transfer)
            landed = len(data)
            if ratio is None:
                ratio = len(data) / len(zlib.compress(data, 6))
        driver_file = "/tmp/dbx-repl-bench-text.txt"          # a driver path: the cluster's own view
        raw.run(context_id, text_code.replace("__TARGET__", TEXT_TO_FILE.replace("__PATH__", repr(driver_file))))
        floor_rates, rounds = [], 0
        for _ in range(heavy):
            started = time.perf_counter()
            with open(os.path.join(scratch, "floor-copy.txt"), "wb") as sink:
                rounds = raw.fetch_file(context_id, driver_file, sink)
            floor_rates.append(os.path.getsize(sink.name) / 1e6 / (time.perf_counter() - started))
        raw.run(context_id, "import os\nos.unlink(%r)" % driver_file)
        med_rate = statistics.median(rates)
        note = "%.1f MB landed, zlib ratio %.1fx, %d fetch round trips" % (landed / 1e6, ratio, rounds)
        table.add("20 MB text: command end -> file on disk", transfers,
                  floor="%.1f MB/s (stdlib fetch)" % statistics.median(floor_rates),
                  goal=(">= 10 MB/s", med_rate >= 10),
                  note="%.1f MB/s median; %s" % (med_rate, note))
        table.add("20 MB text: exec end to end (incl. generating it)", walls, note="generation ~1-2 s on the driver")

        # 4b. a 100k-row table: display() (the service keeps 10K rows) and the same rows as CSV text
        display_walls, display_rows, floor_display = [], None, []
        for _ in range(heavy):
            wall, _, body = cli.exec(TABLE_DISPLAY, "table")
            display_walls.append(wall)
            display_rows = body["table"]["rows"]
        for _ in range(max(2, heavy // 2)):
            started = time.perf_counter()
            raw.run(context_id, TABLE_DISPLAY)
            floor_display.append(time.perf_counter() - started + py)
        table.add("display(100k-row DataFrame), end to end", display_walls,
                  floor=statistics.median(floor_display),
                  note="%d rows land (the service caps tables at 10K rows); floor = stdlib + python" % display_rows)
        csv_lags, csv_walls, csv_size = [], [], 0
        for _ in range(heavy):
            wall, ended, body = cli.exec(TABLE_TEXT, "rows_text")
            data = cli.read(body["stdout_file"])
            csv_size = len(data)
            assert data.count(b"\n") >= 100001, body
            csv_lags.append(ended - end_time(data[-200:].decode()))
            csv_walls.append(wall)
        table.add("100k rows as CSV text: command end -> file", csv_lags,
                  note="all 100,001 lines, %.1f MB, %.1f MB/s; end to end %s"
                       % (csv_size / 1e6, csv_size / 1e6 / statistics.median(csv_lags),
                          fmt(statistics.median(csv_walls))))

        # 5. sub_llm_batch: 64 prompts at 50 ms model latency
        workspace.configure(llm_latency=0.05)
        try:
            for workers in (1, 8, 32):
                samples = []
                for _ in range(heavy if workers > 1 else max(2, heavy - 1)):
                    _, _, body = cli.exec(BATCH_COMMAND.replace("__WORKERS__", str(workers)), "batch")
                    words = cli.read(body["stdout_file"]).decode().split()
                    seconds, answers, errors = float(words[1]), int(words[2]), int(words[3])
                    assert answers == 64 and errors == 0, body
                    samples.append(seconds)
                bare = []
                for _ in range(2):
                    command = (BARE_BATCH_COMMAND.replace("__WORKERS__", str(workers))
                               .replace("__HOST__", workspace.host))
                    _, _, body = cli.exec(command, "bare_batch")
                    bare.append(float(cli.read(body["stdout_file"]).decode().split()[1]))
                ideal = 64 * 0.05 / workers
                med = statistics.median(samples)
                table.add("sub_llm_batch 64 x 50 ms, max_workers=%d" % workers, samples,
                          floor="%s ideal, %s bare pool" % (fmt(ideal), fmt(statistics.median(bare))),
                          goal=("<= %s (+20%%)" % fmt(ideal * 1.2), med <= ideal * 1.2), note="%.0f%% of ideal throughput" % (100 * ideal / med))
        finally:
            workspace.configure(llm_latency=0.0)

        # 5b. status of a running step, with its progress
        status_rows(cli, table, n)

        # 6. scale: a long session.json
        scale_rows(cli, table, max(3, n // 3))
        # 7. the local workspace itself (a fresh one: a cold JVM)
        local_workspace_rows(table, n)
        return finish(cli, table, began)
    finally:
        workspace.stop()
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
