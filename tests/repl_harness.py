"""Drive the CLI the way an agent does: as a subprocess, one JSON object per call, started as SKILL.md
says (`python3 <the skill's folder> ...`, which imports dbx_repl.py with Python's bytecode cache).

`Repl.run(...)` checks the contract on every call (exactly one JSON object on stdout, a `status`
and a `message`, no traceback on stderr) and returns a `Call` with the parsed body and exit code.
"""

import contextlib
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "dbx_repl.py")
PROGRAM = [sys.executable, ROOT]       # the skill's folder: its __main__.py runs dbx_repl.py
FIND_CLUSTER = os.path.join(ROOT, "find_cluster.py")


class Call:
    def __init__(self, args, code, stdout, stderr):
        self.args, self.code, self.stdout, self.stderr = args, code, stdout, stderr
        lines = [line for line in stdout.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one JSON line from {args}, got {stdout!r} (stderr {stderr!r})"
        self.body = json.loads(lines[0])
        assert isinstance(self.body, dict), self.body
        assert isinstance(self.body.get("status"), str) and self.body["status"], self.body
        assert isinstance(self.body.get("message"), str) and self.body["message"], self.body
        if "--debug" not in args:
            assert "Traceback" not in stderr, stderr
        for name, line in tips_of(self.body).items():
            check_tip(line, f"tip.{name} of {self.body['status']}")

    @property
    def status(self):
        return self.body["status"]

    def __getitem__(self, key):
        return self.body[key]

    def get(self, key, default=None):
        return self.body.get(key, default)

    def __repr__(self):
        return f"Call({self.args!r}, code={self.code}, body={self.body!r})"


# -- tips: every next command an answer offers runs as written --------------------------------------

PLACEHOLDER = re.compile(r"<[a-z][a-z-]*>")
PLACEHOLDER_VALUES = {"<session-name>": "next-session", "<cluster-id>": "0000-000000-placeholder",
                      "<tag>": "next", "<code>": "print(1)", "<steps>": "1"}
TIPS_SEEN = []      # (status, name, line): every tip the suite's CLI calls offered


def tips_of(body):
    tip = body.get("tip")
    if tip is None:
        return {}
    assert isinstance(tip, dict) and tip, f"tip must be a non-empty object of command lines: {body!r}"
    return tip


def tip_argv(line):
    """A tip's command line as the shell splits it, placeholders filled, without the program: the
    arguments after dbx_repl.py, the skill's folder or the dbx-repl console script."""
    import dbx_repl
    filled = PLACEHOLDER.sub(lambda m: PLACEHOLDER_VALUES[m.group(0)], line)
    words = shlex.split(filled)
    for index, word in enumerate(words):
        if os.path.basename(word) in ("dbx_repl.py", "dbx-repl") or dbx_repl._skill_folder(word):
            return words[:index + 1], words[index + 1:]
    raise AssertionError(f"a tip must start with the program: {line!r}")


def check_tip(line, where):
    """A tip runs as written: its program is this CLI, its placeholders are only <...> the agent
    fills, and the CLI's own parser accepts it (no usage error)."""
    import dbx_repl
    unknown = set(PLACEHOLDER.findall(line)) - set(PLACEHOLDER_VALUES)
    assert not unknown, f"{where}: unknown placeholder(s) {unknown} in {line!r}"
    assert not re.search(r"\b(ID|NAME|N,\.\.\.|N,M)\b", line), f"{where}: a bare placeholder in {line!r}"
    program, argv = tip_argv(line)
    assert program[-1] == "dbx-repl" or os.path.exists(program[-1]), f"{where}: no program at {program}"
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # a --help tip prints the help: not ours to show
            args = dbx_repl.parse_command_line(argv)
    except dbx_repl.ReplError as err:
        raise AssertionError(f"{where}: {line!r} is a usage error: {err.message}") from None
    except SystemExit as exit_:     # --help: argparse prints the help and exits 0
        assert exit_.code == 0 and "--help" in argv, f"{where}: {line!r} exits {exit_.code}"
        args = None
    if args is not None and args.subcommand in dbx_repl.WAITING_SUBCOMMANDS:
        assert "--timeout" in argv, f"{where}: {line!r} waits with no --timeout"
    TIPS_SEEN.append((where, line))


def cli_env(workspace, home, extra=None):
    """A clean environment: the local workspace's host and token, an empty HOME, no stray profile, and
    Python's default bytecode cache (an agent's Python writes it; this machine may say otherwise)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABRICKS_", "DBX_REPL_"))
           and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(HOME=str(home), DATABRICKS_HOST=workspace.host, DATABRICKS_TOKEN=workspace.token,
               DBX_REPL_RETRY_TIMEOUT="10")
    env.update(extra or {})
    return env


class Repl:
    """The CLI bound to one project dir and one local workspace."""

    def __init__(self, workspace, project_dir, home, cwd=None):
        self.workspace, self.project_dir, self.home = workspace, str(project_dir), home
        self.cwd = str(cwd or project_dir)
        self.env = cli_env(workspace, home)

    def argv(self, subcommand, *args, project=True):
        extra = ["--project-dir", self.project_dir] if project and subcommand != "find-cluster" else []
        return [*PROGRAM, subcommand, *extra, *args]

    def run(self, subcommand, *args, stdin=None, timeout=120, env=None, project=True):
        argv = self.argv(subcommand, *args, project=project)
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout,
                              cwd=self.cwd, env={**self.env, **(env or {})})
        return Call(argv, proc.returncode, proc.stdout, proc.stderr)

    def popen(self, subcommand, *args, env=None):
        argv = self.argv(subcommand, *args)
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=self.cwd, env={**self.env, **(env or {})})

    def finish(self, proc, timeout=60):
        stdout, stderr = proc.communicate(timeout=timeout)
        return Call(proc.args, proc.returncode, stdout, stderr)

    def create(self, cluster_id=None, name="test-session", *extra):
        from local_workspace import RUNNING_CLUSTER_ID
        return self.run("create", "--cluster-id", cluster_id or RUNNING_CLUSTER_ID, "--session-name", name,
                        *extra)

    def exec(self, command, tag="step", *extra, **kwargs):
        return self.run("exec", "--command", command, "--tag", tag, *extra, **kwargs)

    def session(self):
        with open(os.path.join(self.project_dir, "session.json"), encoding="utf-8") as f:
            return json.load(f)

    def path(self, relative):
        """A path from a response, resolved against the CLI's working directory."""
        return relative if os.path.isabs(relative) else os.path.join(self.cwd, relative)

    def read(self, relative, mode="r"):
        with open(self.path(relative), mode) as f:
            return f.read()


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def printed_so_far(repl, key):
    """What the running step `key` (NNN_tag) has printed so far: its output copy on the driver, in the
    cluster's /tmp (kept under the local workspace's state dir; the host's /tmp where the cluster's
    processes are not isolated). "" until the copy exists."""
    from local_workspace.paths import host_path
    log = repl.session()
    driver = "/tmp/dbx_repl_%s/%s.out" % (log["session_id"], key)
    for path in (host_path(repl.workspace._tmpdir, log["cluster_id"], driver), driver):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            continue
    return ""


def gated_step(name, then):
    """Code for a step that waits (at most a minute) until the test opens its gate, `open_gate(repl,
    name)`, then runs `then`: a step that is surely still running while the test acts."""
    return ("import os, time\nfor _ in range(1200):\n    if os.path.exists('/tmp/gate-%s'):\n        break\n"
            "    time.sleep(0.05)\n%s" % (name, then))


def open_gate(repl, name):
    """Let the gated step `name` of the session's cluster go on (its /tmp, as the local workspace keeps it)."""
    from local_workspace.paths import host_path
    path = host_path(repl.workspace._tmpdir, repl.session()["cluster_id"], "/tmp/gate-" + name)
    with open(path, "w"):
        pass


def command_status(repl, record=None):
    """The service's status of one of the session's commands (its active command by default), read
    through the REST API: "Running", "Finished", "Cancelled", ... or None while there is none."""
    import urllib.parse
    import urllib.request
    log = repl.session()
    record = record or log.get("active_command") or {}
    if not record.get("command_id"):
        return None
    query = urllib.parse.urlencode({"clusterId": log["cluster_id"], "contextId": record["context_id"],
                                    "commandId": record["command_id"]})
    request = urllib.request.Request(repl.workspace.host + "/api/1.2/commands/status?" + query,
                                     headers={"Authorization": "Bearer " + repl.workspace.token})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)["status"]


def in_timed_sleep(pid):
    """True while the process's main thread sleeps in time.sleep (Linux: its kernel wait channel)."""
    try:
        with open("/proc/%d/wchan" % pid) as f:
            return f.read().strip() in ("hrtimer_nanosleep", "do_nanosleep")
    except OSError:
        return False


def interrupt(proc, sig=signal.SIGINT):
    proc.send_signal(sig)


def files_under(*directories):
    """Every file under the directories, with its content: {path: bytes}."""
    found = {}
    for top in directories:
        for base, _, names in os.walk(top):
            for name in names:
                path = os.path.join(base, name)
                with open(path, "rb") as f:
                    found[path] = f.read()
    return found


def process_tree(pids):
    """The pids and all their descendants, as a set (Linux /proc)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(pids), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


STATUS_WORD = re.compile(r"[A-Z][a-z]+(?:[A-Z][a-z]*)*")


def statuses_in_the_cli():
    """Every status word dbx_repl.py can answer or record, read from its source: the first argument of
    each `response(...)` and `ReplError(...)` (every branch of a conditional), a driver call's `failed=`
    status, the "status" of a dict literal (verify, smoke phases, a replay's failed step), the status of
    a step record (`step_entry`, `record`), and a step's ending as `failed_ending` returns it."""
    import ast
    with open(CLI, encoding="utf-8") as f:
        tree = ast.parse(f.read())

    def words(node):
        return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and STATUS_WORD.fullmatch(n.value)}

    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            position = {"response": 0, "ReplError": 0, "record": 0, "step_entry": 2}.get(name)
            if position is not None and len(node.args) > position:
                found |= words(node.args[position])
            found |= set().union(*(words(k.value) for k in node.keywords if k.arg == "failed"))
        elif isinstance(node, ast.FunctionDef):
            named = node.args.args[len(node.args.args) - len(node.args.defaults):] + node.args.kwonlyargs
            defaults = node.args.defaults + node.args.kw_defaults
            found |= set().union(*(words(d) for a, d in zip(named, defaults) if a.arg == "failed" and d))
            if node.name == "failed_ending":
                found |= set().union(*(words(r.value) for r in ast.walk(node) if isinstance(r, ast.Return)
                                       and r.value is not None))
        elif isinstance(node, ast.Dict):
            found |= set().union(*(words(v) for k, v in zip(node.keys, node.values)
                                   if isinstance(k, ast.Constant) and k.value == "status"))
    return found
