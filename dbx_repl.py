#!/usr/bin/env python3
"""databricks-repl: a stateful Python REPL on a Databricks classic all-purpose cluster, for AI agents.

Every call prints exactly one small JSON object on stdout. Command output lands in files under
``<project-dir>/repl_outputs/``; ``<project-dir>/session.json`` is the append-only step log.
The REPL talks to the Command Execution API 1.2 through the official ``databricks-sdk``.

This one file is the whole CLI, including the code it sends to the driver, so copying it is enough
to run the skill. It reads from top to bottom; each section opens with a ``# == N.`` banner:

1. Contract: file names, limits, statuses, exit codes.
2. Responses: ReplError, ``response``, ``emit`` and the 2 KB fit; previews; tips (``cli_hint``).
3. Session store: the project dir, atomic writes, the lock, session.json, step records and files.
4. Workspace client: the SDK, imported lazily; ``error_kind`` (the one classifier of failures) and
   ``map_sdk_error``; ``Target`` (where a command runs); ``Workspace``, with its deadline scope
   (``deadline_within``), its poll (``wait_command``), helpers on the driver (``driver_call``) and
   the chunked transfer of driver files.
5. Step runs: the commands sent, how their results are read, clusters and execution contexts
   (started, adopted, lost), progress through the sidecar context, and ``StepRun``, which owns one
   step's run from its reservation to its answer.
6. Analysis: what each step defines and uses, the replay plan, the export script.
7. Subcommands: one ``cmd_*`` each.
8. The parser and the entry point.
9. The code that runs on the driver: the bootstrap (``_dbx_repl_install``) and the progress reader.
"""
from __future__ import annotations

import argparse
import ast
import base64
import collections
import contextlib
import csv
import datetime
import hashlib
import html
import io
import itertools
import json
import os
import posixpath
import re
import shlex
import signal
import sys
import tempfile
import time
import zlib


VERSION = "0.3.0"

PROCESS_STARTED = time.monotonic()     # await's --timeout counts from here, the SDK import included


# == 1. Contract: file names, limits, statuses, exit codes =========================================
# What an agent can rely on: the files of a project dir, the limits of an answer and of a transfer,
# the states of clusters and commands the CLI acts on, and its exit codes.

SESSION_FILE = "session.json"
OUTPUT_DIR = "repl_outputs"
ARCHIVE_DIR = "previous_sessions"          # under OUTPUT_DIR: destroyed sessions replaced by `create`
LOCK_FILE = ".dbx_repl.lock"
DRIVER_OUTPUT_DIR = "/tmp"                 # on the driver: dbx_repl_<session_id>/NNN_tag.out copies
SESSION_FORMAT = 1

RESPONSES_DIR = "responses"                # under OUTPUT_DIR: fields moved out of an oversized answer
REPLAY_PLAN_FILE = "replay_plan.json"      # under OUTPUT_DIR: the full plan behind a summary

DEFAULT_TIMEOUT = 600.0
TIP_TIMEOUT = 90.0                         # a tip's --timeout when the caller gave none: within a 2-minute tool limit
DEFAULT_MAX_OUTPUT_BYTES = 64 * 1024 * 1024
PREVIEW_CHARS = 1000                       # head + tail of a preview, marker included
TABLE_PREVIEW_ROWS = 20
SQL_MAX_ROWS = 100_000                     # exec --sql: rows written to the table file (total_rows counts all)
MAX_TAG_CHARS = 48
DEFAULT_LLM_ENDPOINT = "default-llm-endpoint"
ENV_LLM_ENDPOINT = "DBX_REPL_LLM_ENDPOINT"

MAX_RESPONSE_BYTES = 2048                  # every answer, whatever the session's length or output
DRIVER_COPIES_BYTES = 256 * 1024 * 1024    # per session: older steps' driver copies are pruned past it
DEFAULT_TRANSFER_CAP = 512 * 1024 * 1024   # get/put: the file's size cap (--max-bytes)
PUT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_SYNC_CAP = 50 * 1024 * 1024        # sync: the folder's files (--max-bytes)

# HTTP behaviour. The SDK's defaults (300 s retry budget, 60 s per request) make an unreachable host
# hang for minutes; an agent needs an answer in seconds. Every workspace call of the CLI gets one
# budget for all its attempts, retry sleeps and a request that never answers (see Workspace._do), so
# a refused or silent host is answered within ~RETRY_TIMEOUT plus start-up (~1 s).
ENV_RETRY_TIMEOUT = "DBX_REPL_RETRY_TIMEOUT"
ENV_HTTP_TIMEOUT = "DBX_REPL_HTTP_TIMEOUT"
DEFAULT_RETRY_TIMEOUT = 10
DEFAULT_HTTP_TIMEOUT = 10
HOST_PROBE_SECONDS = 2                     # the SDK's /.well-known/databricks-config probe (OAuth only)
WAIT_GRACE_SECONDS = 0.5                   # a status poll in flight at --timeout may take this much longer
SUBMIT_GRACE_SECONDS = 1.5                 # a submit may end this long after --timeout (then: uncertain)

# Poll schedule for commands: the next poll comes after 2.5% of the time already waited, at least
# 30 ms and at most 5 s. A command of up to 2 s is seen within 50 ms of finishing, a long one within
# 2.5% of its run time, and a 10-minute wait costs ~330 status calls (well under the service's rate
# limits). See docs/benchmark.md for the measured lag.
POLL_MIN_SECONDS = 0.03
FIRST_POLL_SECONDS = 0.01   # before a wait's first poll: a trivial command just submitted is done by then
POLL_FRACTION = 0.025
POLL_MAX_SECONDS = 5.0
CANCEL_WAIT_SECONDS = 10.0                 # cancel waits this long for the command to stop, else: Cancelling
CANCELLING_MESSAGE = (f"Cancel was requested; the command had not stopped when the CLI stopped waiting (after at "
                      f"most {CANCEL_WAIT_SECONDS:g}s).")
HELPER_SECONDS = 120.0                     # a helper command of the CLI (a fetch, a stat) may take this
CONTEXT_START_TIMEOUT = 300.0

RUNNABLE_CLUSTER_STATES = ("RUNNING", "RESIZING")
STARTABLE_CLUSTER_STATES = ("TERMINATED",)          # clusters/start accepts only this state
STARTING_CLUSTER_STATES = ("PENDING", "RESTARTING")  # on their way to RUNNING
CLUSTER_POLL_SECONDS = 5.0                         # create --start-cluster: clusters/get every 1-5 s
NOT_ALL_PURPOSE_SOURCES = ("JOB", "PIPELINE", "PIPELINE_MAINTENANCE", "SQL", "MODELS")  # no contexts
DONE_COMMAND_STATES = ("Finished", "Error", "Cancelled")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_RUNNING = 3
EXIT_INTERRUPTED = 130

# Chunked transfer of driver-side files (full output, get/put): each chunk travels as one table
# result, zlib-compressed and base64-encoded, kept under the service's 2 MB / 10K-row table limit.
CHUNK_COMPRESSED_BUDGET = 1_000_000
CHUNK_ROW_CHARS = 100_000
TEXT_CHUNK_BUDGET = 24_000                 # fallback transport, text results: < 40K base64 chars

ANSI_ESCAPE = re.compile(r"(\x9B|\x1B\[)[0-?]*[ -/]*[@-~]")
CANCELLED_MARKER = "CommandCancelledException"
FRAME, FRAME_END = "\x1edbx-repl ", "\x1edbx-repl-end"   # around a wrapped step's result (DriverRepl.frame)
REDACTED = "[REDACTED]"                     # what the service and the driver show for a secret value
MAGIC_LINE = re.compile(r"^\s*[%!]", re.MULTILINE)


# == 2. Responses: one JSON object per call, at most 2 KB, with a tip to run next ==================
# Every call ends in `emit`: one JSON line on stdout, fitted to MAX_RESPONSE_BYTES (fields that do not fit
# go to a file the answer names), with secrets scrubbed. A failure the agent can act on is a ReplError.

class ReplError(Exception):
    """A failure the agent can act on: it becomes the one JSON response of the call."""

    def __init__(self, status, message, hint=None, exit_code=EXIT_FAILED, **fields):
        super().__init__(message)
        self.status, self.message, self.hint = status, message, hint
        self.exit_code, self.fields = exit_code, fields

    def response(self):
        return response(self.status, self.message, hint=self.hint, exit_code=self.exit_code,
                        **self.fields)


def response(status, message, hint=None, exit_code=EXIT_OK, **fields):
    """Build a response: status and message first, the hint last, None-valued fields dropped."""
    body = {"status": status, "message": message}
    body.update((k, v) for k, v in fields.items() if v is not None)
    if hint:
        body["hint"] = hint
    body["_exit"] = exit_code
    return body


_secrets = set()


def scrub(text):
    """Remove every known secret from a text before it is printed or written."""
    for secret in _secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


KEPT_FIELDS = ("status", "message", "hint", "tip")   # never moved out of an answer; a tip is never cut


def emit(body):
    """Print a response as the call's single JSON line and return its exit code.

    Non-ASCII stays readable when stdout can encode it; on any other console (cp1252, ascii) the
    line is escaped to ASCII, so it is valid JSON whatever the encoding."""
    body = dict(body)
    exit_code = body.pop("_exit", EXIT_OK)
    sys.stdout.write(for_console(_one_line(fit_response(body))) + "\n")
    sys.stdout.flush()
    return exit_code


def for_console(line):
    """A JSON line as this process's stdout can print it: unchanged when its encoding can carry
    the text, else with every non-ASCII character escaped (the same JSON value)."""
    try:
        line.encode(getattr(sys.stdout, "encoding", None) or "utf-8")
        return line
    except (UnicodeEncodeError, LookupError):
        try:
            return json.dumps(json.loads(line), ensure_ascii=True)
        except ValueError:   # not JSON (never an answer): keep it printable
            return line.encode("ascii", "backslashreplace").decode("ascii")


def _one_line(body):
    text = scrub(json.dumps(body, ensure_ascii=False))
    for separator in ("\u2028", "\u2029", "\x85"):  # line breaks to splitlines(): keep one line
        text = text.replace(separator, json.dumps(separator)[1:-1])
    return text


def _size(value):
    return len(_one_line(value).encode("utf-8"))


def fit_response(body):
    """The response cut to MAX_RESPONSE_BYTES. Long texts (top-level, or one level down such as
    error.message) are cut to a head and tail first, longest first; then whole fields move, largest
    first. Every changed field is kept whole in a JSON file under repl_outputs/responses/, named in
    `details_file` and listed in `moved_fields`. status, hint and tip are never moved, and a tip's
    command lines are never cut."""
    if _size(body) <= MAX_RESPONSE_BYTES:
        return body
    moved, body = {}, dict(body)
    hint = body.pop("hint", None)
    reserve = 300 + min(_size(hint), 400) if hint else 300  # details_file, moved_fields, the hint
    for _ in range(64):
        if _size(body) + reserve <= MAX_RESPONSE_BYTES:
            break
        texts = [(len(v), k, None) for k, v in body.items() if k != "status" and isinstance(v, str)]
        texts += [(len(v), k, inner) for k, d in body.items() if isinstance(d, dict) and k not in KEPT_FIELDS
                  for inner, v in d.items() if isinstance(v, str)]
        length, key, inner = max(texts, default=(0, None, None))
        if length > 160:
            moved.setdefault(key, body[key])
            cut = preview(body[key] if inner is None else body[key][inner], limit=max(120, length // 2))
            body[key] = cut if inner is None else {**body[key], inner: cut}
            continue
        movable = [k for k in body if k not in KEPT_FIELDS and k not in moved]
        if not movable:
            break
        key = max(movable, key=lambda k: _size(body[k]))
        moved[key] = body.pop(key)
    if moved:
        body["details_file"] = _save_details(body.get("status", "response"), moved)
        body["moved_fields"] = sorted(moved)
    if hint:
        body["hint"] = hint if _size(body) + _size(hint) <= MAX_RESPONSE_BYTES else preview(hint, limit=300)
    return body


def _save_details(status, fields):
    """Write the fields cut from an answer; the project's repl_outputs/responses/ when a project is
    known, else the system temp dir. Returns the path as the caller can open it."""
    name = f"{re.sub(r'[^0-9]', '', now_iso())[:17]}_{re.sub(r'[^A-Za-z]', '', str(status))[:40]}.json"
    data = scrub(json.dumps(fields, indent=1, ensure_ascii=False, default=str))
    project = Project.current
    if project is not None:
        with contextlib.suppress(OSError):
            directory = os.path.join(project.outputs_dir, RESPONSES_DIR)
            os.makedirs(directory, mode=0o700, exist_ok=True)
            path = os.path.join(directory, name)
            write_atomic(path, data)
            return project.show(path)
    fd, path = tempfile.mkstemp(prefix="dbx_repl-", suffix="-" + name)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(data)
    return path


def now_iso():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


# -- previews: text an answer can show -------------------------------------------------------------

def strip_ansi(text):
    return ANSI_ESCAPE.sub("", text or "")


def html_to_text(text):
    return html.unescape(re.sub(r"<[^>]+>", "", text or "")).strip()


PREVIEW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def printable(text):
    """Text safe to show in a response, as a terminal would show it: ANSI sequences removed, CRLF
    made LF, carriage-return frames (progress bars) collapsed to the last one, and other control
    characters (which some JSON-lines readers take as line breaks) shown as U+FFFD."""
    text = strip_ansi(text).replace("\r\n", "\n")
    if "\r" in text:
        text = "\n".join(_last_frame(line) for line in text.split("\n"))
    return PREVIEW_CONTROL.sub("\ufffd", text)


def _last_frame(line):
    frames = line.split("\r")
    return next((frame for frame in reversed(frames) if frame), "")


def preview(text, limit=PREVIEW_CHARS, total_bytes=None):
    """Head and tail of a text with an explicit marker of what was left out, line breaks kept."""
    if len(text) <= limit:
        return printable(text)
    if total_bytes is None:
        total_bytes = len(text.encode("utf-8", "replace"))
    return _head_and_tail(text[: limit * 6 // 10], text[-(limit * 3 // 10):], total_bytes)


def _head_and_tail(head, tail, total_bytes):
    """Join a head and a tail of a text of total_bytes with the omitted marker; the cut moves to a
    line boundary when one is near, so a preview of many lines shows whole lines."""
    newline = head.rfind("\n")
    if newline >= len(head) * 2 // 3:
        head = head[:newline + 1]
    newline = tail.find("\n")
    if 0 <= newline < len(tail) // 3 and newline < len(tail) - 1:
        tail = tail[newline + 1:]
    omitted = (total_bytes - len(head.encode("utf-8", "replace"))
               - len(tail.encode("utf-8", "replace")))
    head = printable(head)
    separator = "" if head.endswith("\n") else "\n"
    return f"{head}{separator}[... {omitted} bytes omitted ...]\n{printable(tail)}"


def file_preview(path, limit=PREVIEW_CHARS):
    """A preview read from a file without loading all of it."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= limit * 4:
            return preview(f.read().decode("utf-8", "replace"), limit, total_bytes=size)
        head = f.read(limit).decode("utf-8", "ignore")
        f.seek(size - limit)
        tail = f.read().decode("utf-8", "ignore")
    return _head_and_tail(head[: limit * 6 // 10], tail[-(limit * 3 // 10):], size)


def valid_unicode(value):
    """The value with lone surrogates (undecodable bytes printed on the driver) replaced by '?', so
    files and the JSON response can always be written as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, list):
        return [valid_unicode(v) for v in value]
    if isinstance(value, dict):
        return {valid_unicode(k): valid_unicode(v) for k, v in value.items()}
    return value


# -- tips: the command line to run next, as the caller invoked this one ----------------------------

class Invocation:
    """How this call was started, so that every tip can be run as it is: the program as the caller
    invoked it, its --profile (when one was given) and its --timeout. Set by `main`."""
    program = "dbx_repl.py"
    profile = None
    timeout = None


WAITING_SUBCOMMANDS = ("exec", "await", "replay", "export")   # the ones that take --timeout


def _skill_folder(path):
    """Whether `path` is the skill's folder: a __main__.py beside dbx_repl.py."""
    return all(os.path.isfile(os.path.join(path, name)) for name in ("__main__.py", "dbx_repl.py"))


def invoked_program(argv0, executable=None):
    """The command line that started this CLI, as the caller can type it again: `python3 PATH` for
    the skill's folder or the script (PATH as given), `dbx-repl` for the console script. The
    folder's __main__.py and find_cluster.py point at the folder they sit in (else find_cluster.py
    at the dbx_repl.py beside it)."""
    import shlex
    import shutil
    executable = executable or sys.executable
    directory, name = os.path.split(argv0 or "")
    if name in ("__main__.py", "find_cluster.py") and _skill_folder(directory or "."):
        argv0 = directory or "."
    elif name == "find_cluster.py":
        argv0 = os.path.join(directory, "dbx_repl.py")
    elif name == "dbx-find-cluster":
        argv0 = os.path.join(directory, "dbx-repl")
    directory, name = os.path.split(argv0 or "")
    folder = bool(argv0) and _skill_folder(argv0)
    if not folder and (not name or name.startswith("-") or name in ("__main__.py", "pytest")):
        return "dbx_repl.py"
    if folder or name.endswith(".py"):
        interpreter = os.path.basename(executable)
        if shutil.which(interpreter) != executable:
            interpreter = executable
        return f"{shlex.quote(interpreter)} {shlex.quote(argv0)}"
    return name if shutil.which(name) == argv0 or not directory else shlex.quote(argv0)


def cli_hint(subcommand, project=None):
    """The command line an agent should run next: the program as invoked, the subcommand, the project
    dir it used, its --profile, and (for the subcommands that wait) its --timeout, or TIP_TIMEOUT when
    the caller gave none, so that the tip answers within an agent's tool limit."""
    import shlex
    parts = [Invocation.program, subcommand]
    if project is not None:
        parts += ["--project-dir", shlex.quote(project.display_root)]
    if Invocation.profile:
        parts += ["--profile", shlex.quote(Invocation.profile)]
    if subcommand in WAITING_SUBCOMMANDS:
        parts += ["--timeout", f"{Invocation.timeout or TIP_TIMEOUT:g}"]
    return " ".join(parts)


def create_tip(project=None, cluster_id=None):
    """The create command line for a new session: on the given cluster (a placeholder when unknown)
    and a session name the agent chooses."""
    import shlex
    cluster = shlex.quote(cluster_id) if cluster_id else "<cluster-id>"
    return f"{cli_hint('create', project)} --cluster-id {cluster} --session-name <session-name>"


EXEC_TIP = " --tag <tag> --command <code>"   # after cli_hint("exec", ...): the next step, written by the agent


# == 3. Session store: session.json, the lock, step records, the step's files ======================
# A project dir holds session.json (the append-only step log, written atomically under a lock) and
# repl_outputs/ (each step's NNN_tag.* files). Nothing here talks to the workspace.

def write_atomic(path, data):
    """Write bytes to path so that a reader sees the old file or the new one, never a half.
    Returns the new file's os.stat_result."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            written = os.fstat(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return written


class Project:
    """A project directory: session.json, repl_outputs/ and the lock that guards them."""
    current = None          # the project of this call, once checked (where oversized answers spill)

    def __init__(self, project_dir):
        self.root = os.path.abspath(project_dir or ".")
        self.display_root = project_dir or "."
        self.session_path = os.path.join(self.root, SESSION_FILE)
        self.outputs_dir = os.path.join(self.root, OUTPUT_DIR)
        self.lock_path = os.path.join(self.root, LOCK_FILE)
        self._known = None      # (file identity, session) of the last load or save by this process

    def check(self):
        if not os.path.isdir(self.root):
            what = "is not a directory" if os.path.exists(self.root) else "does not exist"
            raise ReplError("ProjectDirNotFound", f"Project directory {self.display_root} {what}.",
                            hint="Create it, or pass an existing --project-dir.")
        # Probe for real (root passes os.access on any directory) with a nameless temporary file, so
        # that a call refused later leaves no file behind; the lock file appears with the first write.
        try:
            tempfile.TemporaryFile(dir=self.root).close()
        except OSError as err:
            raise ReplError("ProjectDirNotWritable",
                            f"Project directory {self.display_root} is not writable ({err.strerror}).",
                            hint="Pass a --project-dir you can write to.") from None
        Project.current = self
        return self

    def output_path(self, name):
        return os.path.join(self.outputs_dir, name)

    def show(self, path):
        """A path as the caller can use it from its working directory."""
        if path is None:
            return None
        absolute = path if os.path.isabs(path) else os.path.join(self.root, path)
        relative = os.path.relpath(absolute)
        return absolute if relative.startswith("..") else relative

    def stored(self, path):
        """A path as stored in session.json: relative to the project dir."""
        return os.path.relpath(path, self.root)

    @contextlib.contextmanager
    def lock(self):
        """Serialise read-modify-write of session.json between concurrent CLI calls."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _lock_fd(fd)
            yield
        finally:
            os.close(fd)   # closing the descriptor releases the lock

    def load(self, required=True):
        """session.json as a dict (None if missing and not required); CorruptSession if unusable.

        A file this process loaded or saved and nobody replaced since (same inode, size and mtime) is
        not parsed again: an exec loads and saves session.json several times, and a 10,000-step log
        takes ~30 ms to parse. Steps are never changed in place (record_step replaces an entry)."""
        try:
            with open(self.session_path, "rb") as f:
                identity = _file_identity(os.fstat(f.fileno()))
                if self._known is not None and self._known[0] == identity:
                    return _session_copy(self._known[1])
                raw = f.read()
        except FileNotFoundError:
            if required:
                raise ReplError("NoSession", f"No {SESSION_FILE} in project dir {self.display_root!r}.",
                                hint="Start a session with tip.create.", tip={"create": create_tip(self)})
            return None
        except OSError as err:  # a directory, or unreadable
            raw, problem = None, f"cannot be read ({err.strerror})"
        try:
            text = raw.decode("utf-8") if raw is not None else None
            session = json.loads(text) if raw is not None else None
            problem = session_problem(session) if raw is not None else problem
        except (ValueError, RecursionError) as err:  # bad UTF-8, bad JSON, absurd nesting
            problem = f"not valid JSON ({str(err)[:200]})"
        if problem:
            raise ReplError(
                "CorruptSession", f"{self.show(self.session_path)} is unreadable: {problem}. "
                "It was left untouched.",
                hint=f"Repair the file by hand, or move it aside (mv {self.show(self.session_path)} "
                     f"{self.show(self.session_path)}.bad) and run create again; step numbers continue "
                     "from repl_outputs/ (see references/guarantees.md).",
                session_file=self.show(self.session_path))
        _remember_step_lines(text, session["steps"])
        self._known = (identity, session)
        return _session_copy(session)

    def save(self, session):
        written = write_atomic(self.session_path, session_text(session))
        self._known = (_file_identity(written), _session_copy(session))

    def ensure_outputs_dir(self):
        os.makedirs(self.outputs_dir, mode=0o700, exist_ok=True)

    def highest_step_on_disk(self):
        """The highest step number among repl_outputs/NNN_* files (survives a lost session.json)."""
        highest = 0
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.outputs_dir):
                match = re.match(r"(\d+)_", name)
                if match:
                    highest = max(highest, int(match.group(1)))
        return highest


def _file_identity(stat):
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns   # not ctime: the rename changes it


def _session_copy(session):
    """A copy a caller may change: the top-level fields deep, the steps list shallow (entries are
    never changed in place)."""
    import copy
    head = copy.deepcopy({k: v for k, v in session.items() if k != "steps"})
    head["steps"] = list(session.get("steps", []))
    return head


_step_lines = {}   # id(step entry) -> (entry, its JSON line): an entry is serialised once per process


def _step_line(entry):
    known = _step_lines.get(id(entry))
    if known is None or known[0] is not entry:
        known = _step_lines[id(entry)] = (entry, json.dumps(entry, ensure_ascii=False))
    return known[1]


STEPS_OPENING, STEPS_CLOSING, STEP_SEPARATOR = '\n  "steps": [\n    ', "\n  ]\n}\n", ",\n    "


def _remember_step_lines(text, steps):
    """After a load: when the file has session_text's layout (one entry per line, no other way to
    contain the separator, since JSON escapes newlines in strings), keep each entry's line."""
    start, end = text.find(STEPS_OPENING), len(text) - len(STEPS_CLOSING)
    if start < 0 or not text.endswith(STEPS_CLOSING):
        return
    lines = text[start + len(STEPS_OPENING):end].split(STEP_SEPARATOR)
    if len(lines) == len(steps) and all(line[:1] == "{" and line[-1:] == "}" for line in lines):
        for entry, line in zip(steps, lines):
            _step_lines[id(entry)] = (entry, line)


def session_text(session):
    """session.json as text: top-level fields indented, then one line per step (written by the C
    encoder, and each entry once per process: a fully indented dump of a 10,000-step log takes the
    pure-Python encoder, ~70 ms, on every save)."""
    head = {k: v for k, v in session.items() if k != "steps"}
    text = json.dumps(head, indent=2, ensure_ascii=False)
    steps = STEP_SEPARATOR.join(_step_line(s) for s in session.get("steps", []))
    steps = f'"steps": [\n    {steps}\n  ]' if steps else '"steps": []'
    return (text[:-2] + ",\n  " + steps + "\n}\n") if head else "{\n  " + steps + "\n}\n"


def _lock_fd(fd):
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX)
    except ImportError:  # Windows
        import msvcrt
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)


SESSION_KEYS = {"status": str, "cluster_id": str, "context_id": (str, type(None)), "step_counter": int,
                "steps": list}


def session_problem(session):
    """Why a parsed session.json cannot be used, or None."""
    if not isinstance(session, dict):
        return "the top level is not an object"
    for key, kind in SESSION_KEYS.items():
        if not isinstance(session.get(key), kind):
            return f"field {key!r} is missing or has the wrong type"
    if not all(_is_step_record(s) for s in session["steps"]):
        return "an entry of 'steps' is malformed"
    active = session.get("active_command")
    if active is not None and not (_is_step_record(active) and
                                   isinstance(active.get("command_id"), (str, type(None)))):
        return "field 'active_command' is malformed"
    return None


def _is_step_record(entry):
    return (isinstance(entry, dict) and type(entry.get("step")) is int and entry["step"] >= 0
            and isinstance(entry.get("tag"), str))


def require_active(project, session):
    if session.get("status") == "creating":
        raise ReplError("NoSession", f"No session in project dir {project.display_root!r}: a create was "
                        "interrupted before it finished.", hint="Start a session with tip.create.",
                        tip={"create": create_tip(project, session.get("cluster_id"))})
    if session.get("status") != "active":
        raise ReplError("SessionDestroyed", f"The session in project dir {project.display_root!r} was destroyed.",
                        hint="Start a new session with tip.create (its steps stay in session.json and "
                             "repl_outputs/).", tip={"create": create_tip(project, session.get("cluster_id"))})
    return session


# -- signals: held while session.json changes ------------------------------------------------------

class Terminated(BaseException):
    """SIGTERM arrived (an agent's tool timeout): leave the command running and say so.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` (a retried poll, an SDK
    error handler) swallows it."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def signals_deferred():
    """Hold Ctrl+C and SIGTERM while a command is submitted and its id saved, so an interrupt
    never leaves a running command the session does not know about; they fire on exit."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None:
        yield
        return
    mask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        mask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


# -- step records and the step's files -------------------------------------------------------------

def step_key(step, tag):
    return f"{step:03d}_{tag}"


def sanitize_tag(tag):
    """A tag as a safe file-name slug: letters, digits, '.', '_' and '-', at most 48 characters."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", tag or "").strip("._-")[:MAX_TAG_CHARS].strip("._-")
    if not slug:
        raise ReplError("InvalidTag", f"Tag {tag!r} has no usable characters.",
                        hint="Use a short label such as load_data or train.", exit_code=EXIT_USAGE)
    return slug


class StepFiles:
    """The files of one step, named NNN_tag.*, and the `outputs` list that describes them."""

    def __init__(self, project, step, tag):
        self.project, self.key = project, step_key(step, tag)
        self.stdout = project.output_path(self.key + ".stdout")
        self.stderr = project.output_path(self.key + ".stderr")
        self.command = project.output_path(self.key + ".cmd.py")
        self.extra = []            # (kind, path, details)

    def path(self, suffix):
        return self.project.output_path(self.key + suffix)

    def add(self, kind, path, **details):
        self.extra.append((kind, path, details))

    def outputs(self):
        listed = [("command", self.command, {}), ("stdout", self.stdout, {}), ("stderr", self.stderr, {})]
        found = []
        for kind, path, details in listed + self.extra:
            if os.path.exists(path):
                found.append({"kind": kind, "path": self.project.show(path),
                              "bytes": os.path.getsize(path), **details})
        return found


def step_entry(project, active, status, elapsed=None, **extra):
    """The session.json record of the step `active` (its active_command record) ending as `status`."""
    files = StepFiles(project, active["step"], active["tag"])
    entry = {
        "step": active["step"],
        "tag": active["tag"],
        "status": status,
        "command_file": project.stored(files.command),
        "stdout_file": project.stored(files.stdout),
        "stderr_file": project.stored(files.stderr),
        "started_at": active.get("started_at"),
        "finished_at": now_iso(),
        "elapsed_seconds": None if elapsed is None else round(elapsed, 3),
        "command_id": active.get("command_id"),
        "context_id": active.get("context_id"),
    }
    entry.update((k, v) for k, v in extra.items() if v is not None)
    return entry


def touch_step_files(project, entry):
    """A step that never ran, or was cut short, still gets its (empty) stdout and stderr files."""
    for key in ("stdout_file", "stderr_file"):
        path = os.path.join(project.root, entry[key]) if entry.get(key) else None
        if path and not os.path.exists(path):
            write_atomic(path, b"")


def record_step(project, entry, command_id=None):
    """Append a step to session.json (after its files exist) and clear the matching active command."""
    touch_step_files(project, entry)
    with project.lock():
        session = project.load()
        # A step is recorded once: when `cancel` and the waiting exec both finish it, merge.
        earlier = [s for s in session["steps"] if s.get("step") == entry["step"]
                   and s.get("command_id") == entry.get("command_id")]
        if earlier:
            index = session["steps"].index(earlier[-1])
            session["steps"][index] = dict(earlier[-1], **{k: v for k, v in entry.items() if v is not None})
        else:
            session["steps"].append(entry)
        active = session.get("active_command")
        if active and (active.get("step") == entry["step"] or
                       (command_id and active.get("command_id") == command_id)):
            session["active_command"] = None
        project.save(session)
    return session


def elapsed_since(active):
    try:
        started = datetime.datetime.fromisoformat(active["started_at"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    return (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()


def _read_text(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _append(path, text):
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


# -- contexts being created: the pending record ----------------------------------------------------

def mark_pending_create(project, cluster_id, context_id=None):
    """Record in session.json, before contexts/create is sent, that a create is under way, then the id
    it answered: if the CLI dies before the session holds the context, the next call knows. Returns
    earlier pending creates whose context id is known (the caller destroys them)."""
    with project.lock():
        session = project.load(required=False)
        if session is None:  # a first create: a placeholder that no other subcommand takes for a session
            session = {"format": SESSION_FORMAT, "status": "creating", "cluster_id": cluster_id,
                       "context_id": None, "step_counter": 0, "steps": [], "active_command": None}
        found = []
        if context_id is None:
            found = note_orphans(session)
            session["pending_create"] = {"cluster_id": cluster_id, "requested_at": now_iso()}
        elif session.get("pending_create"):
            session["pending_create"]["context_id"] = context_id
        project.save(session)
    return [o for o in found if o.get("context_id")]


def note_orphans(session):
    """Move a pending create left by an earlier call into possible_orphans: it may have made a context
    nobody tracks, and the API cannot list contexts to find it. Returns what was moved."""
    pending = session.pop("pending_create", None)
    if not pending:
        return []
    session.setdefault("possible_orphans", []).append(dict(pending, noted_at=now_iso()))
    return [pending]


def drop_pending_create(project):
    """The create left no context behind: forget it (and a placeholder session.json)."""
    with project.lock():
        session = project.load(required=False)
        if not session or "pending_create" not in session:
            return
        session.pop("pending_create")
        if session.get("status") == "creating" and not session.get("possible_orphans"):
            os.unlink(project.session_path)
        else:
            project.save(session)


# == 4. Workspace client: the SDK, imported lazily, and the calls made through it ==================
# `Workspace` makes every REST call of the CLI through the SDK's API client, each within a budget and the
# deadline of `deadline_within`; `error_kind` says what any failure was, and `map_sdk_error` turns it into
# an answer. A `Target` is where a command runs; `driver_call` runs one of the bootstrap's helpers there.

class _SDK:
    """The parts of databricks-sdk the CLI uses, imported on first use.

    `import databricks.sdk` loads every service module (~2 s). Config, the API client and the error
    classes are all the CLI needs, so the package __init__ is bypassed when the SDK's layout allows it;
    any surprise falls back to the normal import.
    """
    loaded = None
    # Modules credentials_provider imports at load time but only Google/Azure auth uses (~0.15 s,
    # mostly `cryptography` and the provisioning service): loaded on first attribute access instead.
    DEFERRED = ("google.auth.impersonated_credentials", "google.oauth2.service_account",
                "databricks.sdk.azure")
    # Character detection, which `import requests` loads (~40 ms) to guess the encoding of an answer
    # that names none: the workspace answers JSON in UTF-8, requests' own fallback without them.
    UNDETECTED = ("chardet", "charset_normalizer")

    @staticmethod
    def _defer(names):
        import importlib.util
        deferred = []
        for name in names:
            if name in sys.modules:
                continue
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                continue
            spec.loader = importlib.util.LazyLoader(spec.loader)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            # As a real import would: then `from parent import child` takes the attribute without
            # touching the module (any attribute access, even __spec__, loads it).
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)
            deferred.append(name)
        return deferred

    @classmethod
    def get(cls):
        if cls.loaded is None:
            import warnings  # e.g. google-auth's end-of-life notices: not the agent's concern
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"google\.")
            warnings.filterwarnings("ignore", message="Unable to find acceptable character detection")
            for name in cls.UNDETECTED:
                sys.modules.setdefault(name, None)   # None: `import name` raises ImportError
            # The import creates ~600 modules' worth of long-lived objects: with the cyclic GC off it
            # skips a dozen full collections, and freezing the survivors keeps them out of every later
            # collection, including the one at interpreter exit (~0.2 s saved per call in total).
            import gc
            enabled = gc.isenabled()
            gc.disable()
            try:
                cls.loaded = cls._import(fast=os.environ.get("DBX_REPL_SDK_IMPORT") != "full")
            finally:
                if enabled:
                    gc.enable()
            gc.freeze()
        return cls.loaded

    @staticmethod
    def _import(fast):
        import importlib
        import logging
        import types
        if fast and "databricks.sdk" not in sys.modules:
            try:
                import databricks
                package_dir = next(os.path.join(p, "sdk") for p in databricks.__path__
                                   if os.path.isfile(os.path.join(p, "sdk", "config.py")))
                stub = types.ModuleType("databricks.sdk")
                stub.__path__ = [package_dir]
                stub.__dbx_repl_stub__ = True   # lets tests see which import path was taken
                sys.modules["databricks.sdk"] = stub
                deferred = []
                try:
                    deferred = _SDK._defer(_SDK.DEFERRED)
                    config = importlib.import_module("databricks.sdk.config")
                    core = importlib.import_module("databricks.sdk.core")
                    errors = importlib.import_module("databricks.sdk.errors")
                    namespace = types.SimpleNamespace(Config=config.Config, ApiClient=core.ApiClient,
                                                      errors=errors, import_path="fast")
                except Exception:
                    for name in [n for n in sys.modules if n == "databricks.sdk" or
                                 n.startswith("databricks.sdk.")] + deferred:
                        sys.modules.pop(name, None)
                    raise
                logging.getLogger("databricks.sdk").addHandler(logging.NullHandler())
                return namespace
            except Exception:
                pass
        try:
            import databricks.sdk as sdk
            from databricks.sdk import errors
            from databricks.sdk.core import ApiClient
        except ImportError as err:
            raise ReplError("SdkMissing", f"databricks-sdk is not importable: {err}",
                            hint=f"{shlex.quote(sys.executable)} -m pip install 'databricks-sdk>=0.40'")
        logging.getLogger("databricks.sdk").addHandler(logging.NullHandler())
        return types.SimpleNamespace(Config=sdk.config.Config, ApiClient=ApiClient, errors=errors,
                                     import_path="full")


class ContextGone(Exception):
    """The execution context no longer exists (evicted, destroyed, or the driver restarted)."""


class SubmitUncertain(Exception):
    """The request may have reached the service but its answer was lost (a dropped connection, no
    answer within the budget, or a signal mid-request): the command may or may not be running."""


class CallTimedOut(BaseException):
    """A workspace call's budget ran out mid-request (raised by the SIGALRM handler of `_call_alarm`).

    A BaseException so that no `except Exception` in the SDK or requests retries or swallows it."""


def _env_number(name, default):
    try:
        return float(os.environ[name])
    except (KeyError, ValueError):
        return default


class _OneShotBody(io.BytesIO):
    """A request body the SDK will not resend: it retries only seekable bodies (see `submit`)."""

    def seekable(self):
        return False


class _BudgetClock:
    """The clock the SDK's retry loop reads: its sleeps end at the current call's deadline, and past
    the deadline time() jumps ahead so the loop gives up instead of starting another attempt."""

    def __init__(self):
        self.deadline = None

    def time(self):
        now = time.monotonic()
        return float("inf") if self.deadline is not None and now >= self.deadline else now

    def sleep(self, seconds):
        if self.deadline is not None:
            seconds = min(seconds, self.deadline - time.monotonic())
        if seconds > 0:
            time.sleep(seconds)


@contextlib.contextmanager
def _call_alarm(seconds):
    """Raise CallTimedOut in this (main) thread if the block runs longer than `seconds`.

    Bounds what no retry budget can: a request to a host that accepts the connection and never
    answers. Without SIGALRM (Windows) or off the main thread, the per-request timeout is the bound."""
    def fire(signum, frame):
        raise CallTimedOut()

    try:
        previous = signal.signal(signal.SIGALRM, fire)
    except (AttributeError, ValueError):
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- what went wrong: one classifier, one mapping to answers ---------------------------------------

# Answers that say the service did not take the request and asks to come back: the SDK's own list of
# transient messages (a cluster still starting, the RPC rate limiter) plus REQUEST_LIMIT_EXCEEDED,
# which the service also sends as a 400/500 without Retry-After (tests/local_workspace/README.md).
TRANSIENT_MESSAGES = ("ClusterNotReadyException", "RPC token bucket limit has been exceeded",
                      "Please try again later", "does not have any associated worker environments",
                      "Unknown worker environment")

# What went wrong, as `error_kind` tells it. The service answered:
AUTH = "auth"                  # the credentials are missing, wrong or not allowed (401, 403)
THROTTLED = "throttled"        # a rate limit (429, REQUEST_LIMIT_EXCEEDED): the service did not act
RETRY_LATER = "retry_later"    # another answer that asks to come back (Retry-After, TRANSIENT_MESSAGES)
SERVER = "server"              # the service failed (500, 503, a deadline exceeded on its side)
NOT_FOUND = "not_found"        # 404: no such cluster, context, path
REJECTED = "rejected"          # any other answer: the request was refused as it is
# No answer:
TIMEOUT = "timeout"            # the call's deadline or its retry budget ran out
UNREACHABLE = "unreachable"    # no connection was made: nothing reached the service
DROPPED = "dropped"            # the connection broke or fell silent: the request may have arrived
# Neither:
CONFIG = "config"              # the client is not configured (no host, an unknown profile)
OTHER = "other"                # anything else (a bug)

DECLINED = (THROTTLED, RETRY_LATER)                      # the service did not act: sending again is safe
ANSWERED = (AUTH, THROTTLED, RETRY_LATER, SERVER, NOT_FOUND, REJECTED)
PASSING = (THROTTLED, RETRY_LATER, SERVER, TIMEOUT, UNREACHABLE, DROPPED)   # worth waiting through


def error_kind(err):
    """The one classifier: what kind of failure an exception of a workspace call is (see AUTH...)."""
    errors = _SDK.get().errors
    if isinstance(err, errors.DatabricksError):
        if isinstance(err, (errors.Unauthenticated, errors.PermissionDenied)):
            return AUTH
        if isinstance(err, errors.TooManyRequests):
            return THROTTLED
        if getattr(err, "retry_after_secs", None) is not None or any(m in str(err) for m in TRANSIENT_MESSAGES):
            return RETRY_LATER
        if isinstance(err, (errors.InternalError, errors.TemporarilyUnavailable, errors.DeadlineExceeded)):
            return SERVER
        return NOT_FOUND if isinstance(err, errors.NotFound) else REJECTED
    if isinstance(err, TimeoutError):
        return TIMEOUT
    try:
        import requests
    except ImportError:
        requests = None
    if requests is not None and isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return UNREACHABLE if _never_connected(err) else DROPPED
    if isinstance(err, ValueError) and re.search(r"auth|profile|config", str(err), re.IGNORECASE):
        return CONFIG
    return OTHER


def _never_connected(err):
    """True when a requests error shows no connection was made, so no request reached the server."""
    import requests
    if isinstance(err, requests.exceptions.ConnectTimeout):
        return True
    try:
        from urllib3.exceptions import ConnectTimeoutError  # NewConnectionError (refused) subclasses it
    except ImportError:
        return False
    reason = getattr(err.args[0], "reason", None) if err.args else None
    return isinstance(reason, ConnectTimeoutError)


def map_sdk_error(err, action="call the workspace"):
    """The one place that turns an SDK or network exception into an agent-facing ReplError."""
    if isinstance(err, ReplError):
        return err
    kind = error_kind(err)
    text = scrub(str(err)).strip() or type(err).__name__
    if kind == CONFIG:
        return ReplError("AuthError", f"Databricks authentication is not configured: {text}",
                         hint="Check the --profile name in ~/.databrickscfg (or DATABRICKS_CONFIG_FILE), "
                              "or set DATABRICKS_HOST and DATABRICKS_TOKEN.")
    if kind == AUTH:
        return ReplError("AuthError", f"The workspace rejected the credentials: {text}",
                         hint="Refresh the token or fix the profile (databricks auth login), then retry.")
    if kind in (TIMEOUT, UNREACHABLE, DROPPED):
        cause = scrub(str(err.__cause__ or err))
        return ReplError("WorkspaceUnreachable", f"Could not {action}: {cause}",
                         hint="Check the host and the network; the call gave up after "
                              f"{_env_number(ENV_RETRY_TIMEOUT, DEFAULT_RETRY_TIMEOUT):g}s "
                              f"(set {ENV_RETRY_TIMEOUT} to wait longer).")
    if kind == THROTTLED:
        return ReplError("RateLimited", f"The workspace is throttling requests: {text}",
                         hint="Wait a minute and retry.")
    if kind in ANSWERED:
        return ReplError("ApiError", f"Could not {action}: {text}",
                         hint="Read the message; retry if it looks transient.",
                         error_code=getattr(err, "error_code", None))
    return ReplError("UnexpectedError", f"Could not {action}: {type(err).__name__}: {text}",
                     hint="Rerun with --debug for details.")


# -- the client: deadlines, polls, helpers on the driver, chunked driver files ---------------------

class Target(collections.namedtuple("Target", "cluster_id context_id session_id")):
    """Where a command runs: the cluster, the execution context, and the session whose files on the
    driver (output copies, plots, synced folders) it reads."""
    __slots__ = ()

    @classmethod
    def of(cls, session, context_id=None):
        """The session's context, or `context_id` of the same cluster (a step's, a sidecar's)."""
        return cls(session["cluster_id"], context_id or session["context_id"], session.get("session_id"))


class StatusUnavailable(Exception):
    """A wait ended while the command's status could not be read: its last polls failed, so whether
    it runs, ended or was cancelled is unknown. `error` is the last failure, `failing_for` seconds."""

    def __init__(self, error, failing_for):
        super().__init__(str(error))
        self.error, self.failing_for = error, failing_for


def poll_delay(waited):
    return min(POLL_MAX_SECONDS, max(POLL_MIN_SECONDS, waited * POLL_FRACTION))


class Workspace:
    """The workspace calls the CLI makes, through the SDK's authenticated API client.

    Every call has a budget (`retry_timeout`, DBX_REPL_RETRY_TIMEOUT, default 10 s), cut shorter by
    `deadline` (a time.monotonic() value, set through `deadline_within`): retries, their sleeps and a
    request in flight all end by then, and the call raises TimeoutError. Every call of one process
    goes through one HTTP connection (the SDK's requests.Session keeps it alive)."""

    def __init__(self, profile=None, debug=False):
        sdk = _SDK.get()
        if debug:
            _enable_debug_logging()
            sys.stderr.write(f"[dbx_repl debug] databricks-sdk import path: {sdk.import_path}\n")
        self.retry_timeout = max(_env_number(ENV_RETRY_TIMEOUT, DEFAULT_RETRY_TIMEOUT), 0.1)
        self.deadline = None
        self.clock = _BudgetClock()
        # What the last `submit` got to: None, "sending" (the request may be on the wire), "waiting"
        # (the service declined; nothing runs), "accepted" (`submitted` holds the answer).
        self.submit_state, self.submitted = None, None
        http_timeout = _env_number(ENV_HTTP_TIMEOUT, DEFAULT_HTTP_TIMEOUT)
        try:
            with _call_alarm(self.retry_timeout + HOST_PROBE_SECONDS):
                self.config = _bounded_config(sdk)(
                    profile=profile, product="databricks-repl", product_version=VERSION,
                    retry_timeout_seconds=max(int(self.retry_timeout + 1), 1), http_timeout_seconds=http_timeout,
                    clock=self.clock)
            _secrets.update(s for s in (self.config.token, self.config.client_secret,
                                        getattr(self.config, "password", None)) if s)
            self.api = sdk.ApiClient(self.config)
        except ReplError:
            raise
        except CallTimedOut:
            raise map_sdk_error(TimeoutError(f"no answer within {self.retry_timeout:g}s"),
                                action="configure the workspace client") from None
        except Exception as err:  # ValueError from config resolution, TimeoutError from the probe
            raise map_sdk_error(err, action="configure the workspace client") from None
        self.host = self.config.host

    # -- clusters -----------------------------------------------------------------------------------
    def cluster(self, cluster_id):
        return self._do("GET", "/api/2.1/clusters/get", query={"cluster_id": cluster_id})

    def start_cluster(self, cluster_id):
        """Start a TERMINATED cluster (POST /api/2.1/clusters/start). Any other state answers 400
        INVALID_STATE; the cluster goes PENDING, then RUNNING after minutes."""
        self._do("POST", "/api/2.1/clusters/start", body={"cluster_id": cluster_id})

    def clusters(self):
        """Every cluster, following next_page_token."""
        query, found = {"page_size": 100}, []
        while True:
            page = self._do("GET", "/api/2.1/clusters/list", query=query)
            found.extend(page.get("clusters") or [])
            token = page.get("next_page_token")
            if not token:
                return found
            query = {"page_size": 100, "page_token": token}

    # -- execution contexts -------------------------------------------------------------------------
    def create_context(self, cluster_id):
        """Create a context. Sent once: a lost answer raises SubmitUncertain (a context may exist that
        nothing tracks; the API cannot list contexts), never a second create."""
        return self.submit("/api/1.2/contexts/create", {"clusterId": cluster_id, "language": "python"})["id"]

    def context_status(self, target):
        return self._do("GET", "/api/1.2/contexts/status",
                        query={"clusterId": target.cluster_id, "contextId": target.context_id}).get("status")

    def destroy_context(self, target):
        self._do("POST", "/api/1.2/contexts/destroy",
                 body={"clusterId": target.cluster_id, "contextId": target.context_id})

    def context_alive(self, target):
        """Probe the context: True if it answers Running (or Pending)."""
        try:
            return self.context_status(target) in ("Running", "Pending")
        except Exception as err:
            if error_kind(err) in (NOT_FOUND, REJECTED):
                return False
            raise   # no answer about the context (a 5xx, throttling, no connection): unknown, not gone

    def gone_after(self, err, target):
        """After a call about a context failed with `err`: True when the service answered (not an
        authentication failure) and a probe shows the context is gone. A failed probe says False."""
        kind = error_kind(err)
        if kind == AUTH or kind not in ANSWERED:
            return False
        try:
            return not self.context_alive(target)
        except Exception:
            return False

    def wait_for_context(self, target):
        """Poll a new context until it leaves Pending: its status (Running, Error, or Pending on timeout)."""
        started = time.monotonic()
        while True:
            state = self.context_status(target)
            if state != "Pending" or time.monotonic() - started > CONTEXT_START_TIMEOUT:
                return state
            time.sleep(poll_delay(time.monotonic() - started))

    # -- commands -------------------------------------------------------------------------------------
    def execute(self, target, command):
        """Submit a command; its id. Sent once (see `submit`): a command never runs twice."""
        return self.submit("/api/1.2/commands/execute", {"clusterId": target.cluster_id, "command": command,
                                                         "contextId": target.context_id, "language": "python"})["id"]

    def command_status(self, target, command_id):
        return self._do("GET", "/api/1.2/commands/status", query={
            "clusterId": target.cluster_id, "contextId": target.context_id, "commandId": command_id})

    def cancel(self, target, command_id):
        self._do("POST", "/api/1.2/commands/cancel", body={
            "clusterId": target.cluster_id, "contextId": target.context_id, "commandId": command_id})

    def wait_command(self, target, command_id, timeout, watch=None):
        """Poll until the command is done (its status dict) or `timeout` seconds pass (None).
        `watch(waited)`, when given, is called between polls (it limits its own rate; see StepWatch).

        Polls fast at first (see FIRST_POLL_SECONDS and POLL_*). A failed poll is retried, not reported
        as a failed command, unless a contexts/status probe shows the context is gone (ContextGone).
        Every request ends by the timeout plus WAIT_GRACE_SECONDS, whatever the network does; if the last
        poll failed, the wait raises StatusUnavailable instead of returning None. A deadline set by the
        caller ends the wait too.
        """
        started = time.monotonic()
        failing_since, last_error = None, None
        with self.deadline_within(timeout + WAIT_GRACE_SECONDS) as limit:
            deadline = min(started + timeout, limit)
            time.sleep(max(min(FIRST_POLL_SECONDS, deadline - time.monotonic()), 0.0))
            while True:
                began = time.monotonic()
                try:
                    status = self.command_status(target, command_id)
                    failing_since = last_error = None
                    if status.get("status") in DONE_COMMAND_STATES:
                        return status
                except Exception as err:
                    kind = error_kind(err)
                    if kind == AUTH:
                        raise
                    try:
                        alive = self.context_alive(target)
                    except Exception as probe_err:  # the network is down too: keep polling until the timeout
                        if error_kind(probe_err) not in PASSING:
                            raise
                        alive = True
                    if not alive:
                        raise ContextGone(str(err)) from None
                    if kind in (NOT_FOUND, REJECTED):
                        raise
                    cut = kind == TIMEOUT   # our deadline ran out, not the service's answer
                    if cut and failing_since is None and time.monotonic() >= deadline and began > deadline - 1.0:
                        return None   # only a poll begun just before the deadline was cut: no news, no failure
                    failing_since, last_error = failing_since or began, err
                now = time.monotonic()
                if now >= deadline:
                    if last_error is not None:
                        raise StatusUnavailable(last_error, now - failing_since)
                    return None
                if watch is not None:
                    watch(now - started)
                    now = time.monotonic()
                    if now >= deadline:
                        continue
                time.sleep(max(min(poll_delay(now - started), deadline - now), 0.0))

    def cancel_and_wait(self, target, command_id, wait=CANCEL_WAIT_SECONDS):
        """Ask the service to cancel, then poll until the command settles. Returns its last status, or
        None if it is still stopping; StatusUnavailable if no status could be read."""
        self.cancel(target, command_id)
        return self.wait_command(target, command_id, wait)

    # -- the CLI's own commands on the driver -----------------------------------------------------------
    def run_command(self, target, command, timeout=HELPER_SECONDS):
        """Run a command of the CLI (the bootstrap, a helper) and return its results dict."""
        started = time.monotonic()
        command_id = self.execute(target, command)
        try:
            status = self.wait_command(target, command_id, timeout)
        except StatusUnavailable as err:
            raise map_sdk_error(err.error, action="read a helper command's status") from None
        if status is None:
            raise ReplError("InternalTimeout", f"A helper command did not finish within "
                            f"{time.monotonic() - started:.0f}s.", hint="The context may be busy; retry, or run status.")
        return status.get("results") or {}

    def driver_call(self, target, helper, *args, about=None, failed="RemoteFileError"):
        """Run a helper on the driver and return the JSON of the last line it printed.

        `helper` is the name of a method of the bootstrap's `_dbx_repl` (the command is
        `_dbx_repl.helper(args)`), or one of the functions of section 9, sent with its source. The
        arguments travel as Python literals (data, never code). An error result raises
        ReplError(`failed`), its message led by `about` (default: the helper's name)."""
        call = "(%s)" % ", ".join(repr(a) for a in args)
        if callable(helper):
            import inspect
            command = f"{inspect.getsource(helper)}\n{helper.__name__}{call}\n"
        else:
            command = f"_dbx_repl.{helper}{call}"
        results = self.run_command(target, command)
        if results.get("resultType") == "error":
            error_type, message = parse_error(results.get("summary"), results.get("cause"))
            raise ReplError(failed, f"{about or getattr(helper, '__name__', helper)}: {error_type}: {message}",
                            hint="Check the path on the driver (a file it can read, a folder it can write); retry "
                                 "if it repeats.")
        return json.loads((results.get("data") or "").strip().splitlines()[-1])

    # -- driver files, chunked: full output, plots, get and put ------------------------------------------
    def fetch_file(self, target, sink, max_bytes, helper, *args):
        """Copy a driver file into `sink` chunk by chunk, at most max_bytes; returns (bytes written, size
        on the driver (-1: no such file), the first chunk's header).

        The chunks come from `_dbx_repl.helper(*args, offset, mode)` (fetch, fetch_output, fetch_image),
        as table results; if the REPL does not produce tables, as text, which the service caps per
        command."""
        offset, written, mode, first = 0, 0, "table", None
        while True:
            call = ", ".join(repr(a) for a in (*args, offset, mode))
            results = self.run_command(target, f"_dbx_repl.{helper}({call})")
            try:
                header, payload = decode_chunk(results)
            except ReplError:
                raise
            except Exception:
                if mode != "table":
                    raise ReplError("TransferFailed", "The driver's data arrived damaged.",
                                    hint="Retry; if it repeats, report the cluster's runtime version.") from None
                mode = "text"  # this REPL's tables do not carry the chunks intact: use text results
                continue
            first = first or header
            size = header.get("size", -1)
            if size < 0:
                return written, size, first
            room = max_bytes - written
            sink.write(payload[:room])
            written += min(len(payload), room)
            offset = header.get("next", offset + len(payload))
            if offset >= size or written >= max_bytes or not payload:
                return written, size, first

    def put_file(self, target, remote, blocks, name=None):
        """Write `blocks` (an iterable of bytes) to the driver file `remote`, one zlib-compressed chunk
        per command; an empty iterable still creates the file. An existing driver folder receives the
        file as `name`, as cp does. Returns (sha256 object, chunks sent, the driver path written)."""
        digest, offset, chunks = hashlib.sha256(), 0, 0
        for block in itertools.chain(blocks, [b""]):
            if not block and offset:
                break
            digest.update(block)
            packed = base64.b64encode(zlib.compress(block, 6)).decode("ascii")
            written = self.driver_call(target, "put", remote, offset, packed, name, about=f"Writing {remote}")
            remote = written.get("path") or remote
            offset += len(block)
            chunks += 1
            if not block:
                break
        return digest, chunks, remote

    def read_dbfs(self, path):
        """A whole DBFS file (large plots come back as FileStore paths), or None if it cannot be read."""
        chunks, offset = [], 0
        try:
            while True:
                answer = self._do("GET", "/api/2.0/dbfs/read", query={"path": path, "offset": offset,
                                                                       "length": 1024 * 1024})
                data = base64.b64decode(answer.get("data") or "")
                if not data:
                    break
                chunks.append(data)
                offset += len(data)
                if answer.get("bytes_read", len(data)) < 1024 * 1024:
                    break
        except Exception:
            return None
        return b"".join(chunks) or None

    # -- the deadline --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def deadline_within(self, seconds):
        """Every call in the block ends within `seconds` from now, or by the deadline already set if
        that one is nearer; on exit the outer deadline is back. Yields the deadline in force."""
        outer = self.deadline
        self.deadline = time.monotonic() + seconds if outer is None else min(outer, time.monotonic() + seconds)
        try:
            yield self.deadline
        finally:
            self.deadline = outer

    def budget(self):
        """Seconds the next call may take: the retry budget, or less if the deadline is nearer."""
        left = self.retry_timeout
        if self.deadline is not None:
            left = min(left, self.deadline - time.monotonic())
        if left <= 0:
            raise TimeoutError("the call's deadline has passed")
        return left

    # -- the two ways to call ---------------------------------------------------------------------------
    def submit(self, path, payload):
        """POST a request that must not run twice (a command, a new context).

        The SDK retries every request, POSTs included, after a dropped connection. This sends a body
        the SDK treats as non-replayable, so it makes one attempt; it is sent again only when the
        service answered that it did not act (429/503, REQUEST_LIMIT_EXCEEDED, a cluster not ready:
        DECLINED) or no connection was made (UNREACHABLE). Raises SubmitUncertain when the request may have
        reached the service but the answer was lost.
        """
        body = json.dumps(payload).encode("utf-8")
        started = time.monotonic()
        deadline = started + self.budget()
        attempt = 0
        while True:
            attempt += 1
            try:
                with _call_alarm(deadline - time.monotonic()):
                    self.submit_state = "sending"
                    answer = self.api.do("POST", path, data=_OneShotBody(body),
                                         headers={"Content-Type": "application/json"})
                    self.submit_state, self.submitted = "accepted", answer
                return answer
            except CallTimedOut:
                raise SubmitUncertain(f"no answer within {time.monotonic() - started:.0f}s") from None
            except Exception as err:
                kind = error_kind(err)
                if kind == DROPPED:
                    raise SubmitUncertain(str(err)) from None
                if kind not in DECLINED + (UNREACHABLE,):
                    raise
                # refused or no connection: nothing was sent; else the service's own wait, if it gave one
                wait = min(attempt, 5) if kind == UNREACHABLE else \
                    getattr(err, "retry_after_secs", None) or min(2 ** (attempt - 1), 5)
                self.submit_state, declined = "waiting", err
            if time.monotonic() + wait >= deadline:
                raise declined   # the service's own answer (or the connection error) says why
            time.sleep(wait)

    def _do(self, method, path, query=None, body=None):
        """A request the SDK may retry (reads, cancel, destroy): within `budget()`, TimeoutError after."""
        budget = self.budget()
        self.clock.deadline = time.monotonic() + budget
        attempt = 0
        try:
            while True:
                attempt += 1
                try:
                    # The alarm comes a little after the retry clock's deadline, so that a refused
                    # connection ends in the SDK's own TimeoutError with its cause.
                    with _call_alarm(self.clock.deadline - time.monotonic() + 0.25):
                        return self.api.do(method, path, query=query, body=body)
                except Exception as err:
                    # The SDK retries Retry-After and its transient messages itself; a rate limit sent
                    # without Retry-After (REQUEST_LIMIT_EXCEEDED as 400/500) is retried here.
                    wait = min(2 ** (attempt - 1), 5)
                    if error_kind(err) not in DECLINED or time.monotonic() + wait >= self.clock.deadline:
                        raise
                    time.sleep(wait)
        except CallTimedOut:
            raise TimeoutError(f"no answer from {path} within {budget:.0f}s") from None
        finally:
            self.clock.deadline = None


def decode_chunk(results):
    """(header, payload bytes) from a fetch command's result (table rows or text lines)."""
    if results.get("resultType") == "table":
        packed = "".join(str(row[0]) for row in results.get("data") or [] if row)
    elif results.get("resultType") == "text":
        packed = "".join((results.get("data") or "").split())
    else:
        detail = parse_error(results.get("summary"), results.get("cause"))
        raise ReplError("TransferFailed", "The driver could not send the file: %s: %s" % detail,
                        hint="Check the path on the driver.")
    raw = base64.b64decode(packed)
    header, _, payload = raw.partition(b"\n")
    return json.loads(header.decode("utf-8")), zlib.decompress(payload) if payload else b""


def _bounded_config(sdk):
    """The SDK's Config, with its host-metadata probe kept within HOST_PROBE_SECONDS.

    Config() asks /.well-known/databricks-config for OAuth discovery data with the full retry budget,
    so an unreachable host cost two budgets. A token (PAT) needs none of that data: no probe then;
    otherwise one short attempt (the SDK falls back to its defaults when the probe fails)."""
    base = sdk.Config
    if not hasattr(base, "_resolve_host_metadata"):
        return base
    base.attributes()      # caches the attribute table on the base class, which the subclass shares

    class BoundedConfig(base):
        def _resolve_host_metadata(self):
            if self.token:
                return
            saved = self.retry_timeout_seconds, self.http_timeout_seconds
            self.retry_timeout_seconds, self.http_timeout_seconds = 1, HOST_PROBE_SECONDS
            try:
                super()._resolve_host_metadata()
            finally:
                self.retry_timeout_seconds, self.http_timeout_seconds = saved

    return BoundedConfig


def _enable_debug_logging():
    import logging

    class _Scrub(logging.Filter):
        def filter(self, record):
            record.msg, record.args = scrub(record.getMessage()), None
            return True

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Scrub())
    handler.setFormatter(logging.Formatter("[dbx_repl debug] %(name)s: %(message)s"))
    logger = logging.getLogger("databricks.sdk")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


# == 5. Step runs: the commands sent, their results, contexts, and one object per step's run =======
# What a step sends (its command wrapped by the bootstrap), how its results are read, the execution
# contexts it runs in (started, adopted, lost and replaced), its progress, and `StepRun`, the one object
# that owns a step's run from its reservation to its answer.

# -- the commands the CLI sends: the bootstrap, a step, a SQL step ---------------------------------

DRIVER_SECTION = "# == 9. The code that runs on the driver"   # where the section sent to the driver starts
DRIVER_SECTION_END = "\nif __name__ == \"__main__\":"          # ... and where it ends
DRIVER_NAME = "<dbx-repl driver>"


def driver_source():
    """Section 9 of this file (from its banner to the entry point's last lines), as the REPL runs it."""
    with open(os.path.abspath(__file__), encoding="utf-8") as f:
        text = f.read()
    start = text.rindex("\n" + DRIVER_SECTION) + 1
    return text[start:text.index(DRIVER_SECTION_END, start)] + "\n"


def bootstrap_command(config):
    """The command `create` runs: section 9 becomes the module dbx_repl_driver in the REPL's Python
    and installs the helpers. The source travels as a literal and the config as JSON (data, never
    code); nothing but the helpers stays in the user's namespace."""
    config = dict(config, row_chars=CHUNK_ROW_CHARS, text_budget=TEXT_CHUNK_BUDGET,
                  chunk_budget=CHUNK_COMPRESSED_BUDGET, copies_bytes=DRIVER_COPIES_BYTES)
    return ("def _dbx_repl_bootstrap(source, config):\n"
            "    import linecache, sys, types\n"
            "    module = types.ModuleType('dbx_repl_driver')\n"
            f"    module.__file__ = {DRIVER_NAME!r}\n"
            f"    linecache.cache[{DRIVER_NAME!r}] = (len(source), None, source.splitlines(True), {DRIVER_NAME!r})\n"
            f"    exec(compile(source, {DRIVER_NAME!r}, 'exec'), module.__dict__)\n"
            "    sys.modules['dbx_repl_driver'] = module\n"
            "    return module.driver_install(config, globals())\n"
            f"_dbx_repl_bootstrap({driver_source()!r}, __import__('json').loads({json.dumps(config)!r}))\n"
            "del _dbx_repl_bootstrap\n"
            "print('dbx-repl bootstrap ready', 'fresh' if _dbx_repl.fresh_interpreter else 'again')\n")


def wrap_command(source, key):
    """(command to send, wrapped) for a user step. Python runs through `_dbx_repl.run`, which tees
    its output to a driver copy, saves its plots and records how it ended (wrapped=True). A step
    with magics (%pip, !ls, %sh), which only the REPL understands, is sent as it is after one line
    that starts the tee (wrapped="magic"); a cell magic (%%sh) must be the cell's first line, so it
    is sent untouched (wrapped=False)."""
    if not MAGIC_LINE.search(source) or _is_python(source):
        encoded = base64.b64encode(source.encode("utf-8")).decode("ascii")
        return f"_dbx_repl.run({key!r}, {encoded!r})", True
    if source.lstrip().startswith("%%"):
        return source, False
    return f"_dbx_repl.begin_magic({key!r})\n{source}", "magic"


def sql_step_code(text):
    """The Python a SQL step runs (and its command file holds): spark.sql in the session's context,
    the whole result to a table file on the driver (see `_Repl.sql` in the bootstrap)."""
    return f"_dbx_repl.sql({text!r}, max_rows={SQL_MAX_ROWS})\n"


def sql_of(code):
    """The SQL text of a SQL step's code (what `sql_step_code` wrote), or None for a Python step."""
    if not code or not code.startswith("_dbx_repl.sql("):
        return None
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    call = tree.body[0].value if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr) else None
    if isinstance(call, ast.Call) and call.args and isinstance(call.args[0], ast.Constant) \
            and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def _is_python(source):
    """True when the source parses as Python, as it is or uniformly dedented (as the REPL runs it)."""
    import ast
    import textwrap
    for text in (source, textwrap.dedent(source)):
        try:
            ast.parse(text)
            return True
        except (SyntaxError, ValueError):
            continue
    return False


# -- reading results: errors, tables, images, the end marker ---------------------------------------

def parse_error(summary, cause):
    """(type, message) of a failed command, from the HTML summary or the traceback's last line."""
    clean_cause = strip_ansi(cause).strip()
    candidates = [html_to_text(strip_ansi(summary))]
    candidates += [line.strip() for line in reversed(clean_cause.splitlines()) if line.strip()]
    for line in candidates:
        match = re.match(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Warning))(?::\s*(.*))?$",
                         line.splitlines()[0] if line else "")
        if match:
            return match.group(1).rsplit(".", 1)[-1], (match.group(2) or "").strip()
    first = candidates[0] or (clean_cause.splitlines()[-1] if clean_cause else "")
    return "Error", first[:500]


def is_cancellation(status, results):
    """True when a command ended by a cancel: status Cancelled, or an error result with
    CommandCancelledException in it, or KeyboardInterrupt (pyspark's SIGINT handler raises it, and
    the service then answers Finished). A context shutdown looks the same: probe the context."""
    if status == "Cancelled":
        return True
    results = results or {}
    if results.get("resultType") != "error":
        return False
    if CANCELLED_MARKER in (results.get("cause") or "") + (results.get("summary") or ""):
        return True
    return parse_error(results.get("summary"), results.get("cause"))[0] == "KeyboardInterrupt"


def schema_columns(results):
    """[(name, type)] of a table result; types are JSON-encoded when isJsonSchema is set."""
    columns = []
    for i, field in enumerate(results.get("schema") or []):
        name = field.get("name", f"col{i}") if isinstance(field, dict) else str(field)
        kind = field.get("type", "") if isinstance(field, dict) else ""
        if results.get("isJsonSchema") and isinstance(kind, str):
            with contextlib.suppress(ValueError):
                kind = json.loads(kind)
        columns.append((name, kind if isinstance(kind, str) else json.dumps(kind)))
    return columns


def render_table(columns, rows, limit=TABLE_PREVIEW_ROWS):
    """A fixed-width text rendering of the first rows, so `head` shows the table's shape."""
    names = [c[0] for c in columns] or [f"col{i}" for i in range(len(rows[0]) if rows else 0)]
    shown = [["" if v is None else str(v) for v in row] for row in rows[:limit]]
    widths = [min(40, max([len(n)] + [len(r[i]) for r in shown if i < len(r)])) for i, n in enumerate(names)]
    fmt = lambda cells: " | ".join(c[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()
    lines = [fmt(names), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in shown]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows")
    return "\n".join(lines) + "\n"


def decode_data_url(url):
    """(extension, bytes) of a data: URL, or None when it is not one."""
    match = re.match(r"data:([\w/+.-]+)?(;base64)?,(.*)$", url or "", re.S)
    if not match:
        return None
    mime = match.group(1) or "application/octet-stream"
    payload = match.group(3)
    data = base64.b64decode(payload) if match.group(2) else payload.encode("utf-8")
    ext = {"image/png": "png", "image/jpeg": "jpg", "image/svg+xml": "svg", "image/gif": "gif"}.get(mime, "bin")
    return ext, data


def read_frame(text, key):
    """(outside, record, inline) of a wrapped step's result text: what the driver wrote is the frame
    `FRAME <record JSON>\\n<inline copy>FRAME_END` (see `DriverRepl.frame`). `outside` is any text the
    REPL showed beside it (written to a stream the capture does not hold, such as a handler bound
    before the session). `record` is None when no frame of this step is there; `inline` is the copy
    that travelled in the frame (None when it did not, or the service cut the frame): the caller
    checks it against the record's sha256."""
    at = text.find(FRAME)
    while at >= 0:
        line_end = text.find("\n", at)
        try:
            record = json.loads(text[at + len(FRAME):line_end]) if line_end > 0 else None
        except ValueError:
            record = None
        if isinstance(record, dict) and record.get("key") == key:
            end = text.rfind(FRAME_END)
            if end < line_end:
                return text[:at], record, None                   # the service cut the end off
            inline = text[line_end + 1:end] if record.get("inline") else None
            return text[:at] + text[end + len(FRAME_END):], record, inline
        at = text.find(FRAME, at + 1)
    return text, None, None


def sha256_text(text):
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class _Digesting:
    """A binary sink that keeps the sha256 of what it was given."""

    def __init__(self, sink):
        self.sink, self.digest = sink, hashlib.sha256()

    def write(self, data):
        self.sink.write(data)
        self.digest.update(data)


def _count_in_file(path, text):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().count(text)
    except OSError:
        return 0


def cut_marker(written, size):
    """The line that ends a stdout file cut by --max-output-bytes."""
    return f"\n[dbx-repl: output cut at {written} of {size} bytes (--max-output-bytes)]\n".encode()


def _cut_note(written, size):
    return (f"Output is {size} bytes; the stdout file holds the first {written} (--max-output-bytes) "
            "and ends with a cut marker.")


def driver_copy_path(session_id, key):
    """Where the bootstrap tees a step's output on the driver."""
    return f"{DRIVER_OUTPUT_DIR}/dbx_repl_{session_id}/{key}.out"


def save_table(files, results):
    columns = schema_columns(results)
    rows = results.get("data") or []
    names = [c[0] for c in columns]
    csv_path, json_path = files.path(".table.csv"), files.path(".table.json")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(names)
    writer.writerows(rows)
    write_atomic(csv_path, buffer.getvalue())
    write_atomic(json_path, json.dumps({"columns": [{"name": n, "type": t} for n, t in columns],
                                        "rows": rows, "truncated": bool(results.get("truncated"))},
                                       ensure_ascii=False, default=str))
    details = {"rows": len(rows), "columns": len(columns), "truncated": bool(results.get("truncated"))}
    files.add("table", csv_path, **details)
    files.add("table_json", json_path)
    shown, budget = [], 400                # keep the response small however wide the table is
    for name in names[:50]:
        name = printable(str(name))[:60]
        budget -= len(name) + 4
        if budget < 0:
            break
        shown.append(name)
    return render_table(columns, rows), {**details, "file": files.project.show(csv_path),
                                         "column_names": shown}


RESTART_WINDOW = "jupyter client is not available"   # the REPL's Python is restarting (or was shut down)
RESTART_WAIT_SECONDS = 120.0
SHUTDOWN_CAUSES = ("ExecContextState.shutdown", "abortRunningSequence")

HELPERS_MISSING = re.compile(r"name .?_dbx_repl.? is not defined")


def service_error_text(results):
    return html_to_text(strip_ansi((results or {}).get("summary"))) + "\n" + strip_ansi((results or {}).get("cause"))


def lost_reason(status):
    """Why a context died under a step, from the step's last status (the probe said it is gone)."""
    results = status.get("results") or {}
    text = service_error_text(results)
    if any(cause in text for cause in SHUTDOWN_CAUSES):
        return "The execution context was shut down while the step ran (the cluster restarted, or the service "\
               "closed the context)."
    if is_cancellation(status.get("status"), results):
        return ("The step was cancelled, but it kept running through the interrupts (e.g. it caught "
                "KeyboardInterrupt), so the service killed its Python process.")
    return ("The Python process died while the step ran (os._exit, a crash in native code, or the driver ran "
            "out of memory).")


def helpers_missing(active, status):
    """True when a wrapped step failed only because the REPL lost the bootstrap (a Python restart,
    e.g. dbutils.library.restartPython(), clears it): the step itself never started."""
    results = status.get("results") or {}
    if not active.get("wrapped") or active.get("helpers_reinstalled") or results.get("resultType") != "error":
        return False
    text = html_to_text(strip_ansi(results.get("summary"))) + strip_ansi(results.get("cause"))
    return bool(HELPERS_MISSING.search(text))


def restart_window_ending(active, status):
    """True when the step's command met the REPL while its Python was restarting (after %pip or
    restartPython): the service answers an error result with the RESTART_WINDOW text."""
    results = status.get("results") or {}
    return results.get("resultType") == "error" and not active.get("helpers_reinstalled") and \
        RESTART_WINDOW in service_error_text(results)


class HelpersGoneDuringStep(Exception):
    """The step's driver copy could not be fetched because the REPL no longer has the helpers: its
    Python restarted under the step (a crash the service recovered from), or the code removed them."""


class ContextLostDuringStep(Exception):
    """The step's context died under it (a crash, a shutdown, a kill after an ignored cancel): its
    Python state is gone. `reason` is one sentence for the response."""

    def __init__(self, reason, step_at_fault=True):
        super().__init__(reason)
        self.reason = reason
        self.step_at_fault = step_at_fault   # False: the service shut the context down (an eviction)


# -- a live line on a terminal ---------------------------------------------------------------------

class LiveLine:
    """A one-line status on stderr, rewritten in place, only when stderr is a terminal (never in a
    pipe or a file, where an agent reads it)."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown = False

    def show(self, text):
        if self.enabled:
            width = shutil_columns() - 1
            self.stream.write("\r\x1b[K" + printable(text)[:width])
            self.stream.flush()
            self.shown = True

    def close(self):
        if self.enabled and self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def shutil_columns():
    import shutil
    return shutil.get_terminal_size((100, 20)).columns


# -- clusters: all-purpose, running, started on request --------------------------------------------

def is_all_purpose(cluster):
    return cluster.get("cluster_source") not in NOT_ALL_PURPOSE_SOURCES


def cluster_not_running(cluster_id, cluster, start=None):
    """ClusterNotRunning. `start` (create): the create command line that starts a TERMINATED cluster."""
    state = cluster.get("state", "UNKNOWN")
    detail = f" ({cluster['state_message']})" if cluster.get("state_message") else ""
    if start and state in STARTABLE_CLUSTER_STATES:
        hint = ("Ask the user whether to start it (it costs money, 3-8 minutes); with their consent run "
                "tip.start.")
        tip = {"start": start}
    else:
        hint = ("Ask the user to start the cluster (Databricks UI, or `databricks clusters start ID`); it takes "
                "3-8 minutes. Retry once tip.find shows it RUNNING.")
        tip = {"find": f"{cli_hint('find-cluster')} --cluster-id {shlex.quote(cluster_id)}"}
    return ReplError("ClusterNotRunning", f"Cluster {cluster_id} is {state}{detail}, not RUNNING.",
                     hint=hint, tip=tip, cluster_id=cluster_id, cluster_state=state)


def create_again_hint(args):
    """The create command line of this call, flags included, to run again after ClusterStarting."""
    import shlex
    parts = [cli_hint("create", Project.current), "--cluster-id", shlex.quote(args.cluster_id.strip()),
             "--session-name", shlex.quote(args.session_name.strip())]
    for flag, value in (("--llm-endpoint", args.llm_endpoint), ("--llm-max-calls", args.llm_max_calls),
                        ("--llm-max-tokens", args.llm_max_tokens)):
        if value is not None:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts + ["--start-cluster", "--timeout", f"{args.timeout:g}"])


def start_and_wait(ws, cluster_id, cluster, timeout, again):
    """Start a TERMINATED cluster (only `create --start-cluster` calls this: the user consented) and
    wait until it is RUNNING, at most until `timeout` seconds after the process started. A cluster
    already starting (PENDING, RESTARTING) is only waited for. Returns the cluster's details.

    Raises ClusterNotRunning for a state that cannot become RUNNING by starting (TERMINATING, ERROR,
    ...), and ClusterStarting (exit 3) when the deadline passes first: `again` is the command to run.
    A one-line progress shows on stderr when stderr is a terminal."""
    state = cluster.get("state")
    if state not in STARTABLE_CLUSTER_STATES + STARTING_CLUSTER_STATES:
        raise cluster_not_running(cluster_id, cluster)
    if state in STARTABLE_CLUSTER_STATES:
        try:
            ws.start_cluster(cluster_id)
        except Exception as err:
            if "INVALID_STATE" not in str(getattr(err, "error_code", "")) + str(err):
                raise map_sdk_error(err, action="start the cluster") from None
            # started by someone else meanwhile: wait for it like any starting cluster
    deadline = PROCESS_STARTED + timeout
    progress = LiveLine()
    try:
        while True:
            waited = time.monotonic() - PROCESS_STARTED
            progress.show(f"cluster {cluster_id}: {cluster.get('state')} "
                          f"{(cluster.get('state_message') or '')[:60]} ({waited:.0f}s)")
            if time.monotonic() >= deadline:
                raise ReplError("ClusterStarting",
                                f"Cluster {cluster_id} is still starting ({cluster.get('state')}) after {timeout:g}s.",
                                exit_code=EXIT_RUNNING, cluster_id=cluster_id, cluster_state=cluster.get("state"),
                                hint="Starting takes 3-8 minutes; run tip.create to keep waiting (it does not "
                                     "start the cluster twice).", tip={"create": again})
            pause = max(1.0, min(CLUSTER_POLL_SECONDS, 0.1 * waited))
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            try:
                cluster = ws.cluster(cluster_id)
            except Exception as err:
                raise map_sdk_error(err, action="check the starting cluster") from None
            if cluster.get("state") in RUNNABLE_CLUSTER_STATES:
                return cluster
            if cluster.get("state") not in STARTING_CLUSTER_STATES:
                raise cluster_not_running(cluster_id, cluster)
    finally:
        progress.close()


# -- execution contexts: started, adopted, lost ----------------------------------------------------

CONTEXT_CREATE_ATTEMPTS = 3


def bootstrap_config(session, host):
    """The bootstrap's config for the session's contexts (see `_dbx_repl_install`)."""
    return {"session_id": session["session_id"], "host": host, "llm_endpoint": session.get("llm_endpoint"),
            "llm_max_calls": session.get("llm_max_calls"), "llm_max_tokens": session.get("llm_max_tokens"),
            "out_dir": DRIVER_OUTPUT_DIR}


def start_context(ws, project, session):
    """Create an execution context on the session's cluster, wait until it runs, install the bootstrap
    in it, and return its id.

    The create is recorded as pending in session.json before it is sent, and sent once: a lost answer
    is never resent (it could make a second context). A context that comes up in status Error is
    destroyed and the create tried again, up to CONTEXT_CREATE_ATTEMPTS times with backoff (the
    service answers Error for transient driver trouble; dbt-databricks retries it too). The caller
    saves the returned id and drops the pending record (`adopt_context`)."""
    cluster_id = session["cluster_id"]
    for attempt in range(1, CONTEXT_CREATE_ATTEMPTS + 1):
        for orphan in mark_pending_create(project, cluster_id):
            with contextlib.suppress(Exception):   # an earlier call died after the create answered
                ws.destroy_context(Target(orphan["cluster_id"], orphan["context_id"], None))
        ws.submit_state = None
        try:
            context = Target.of(session, ws.create_context(cluster_id))
        except (SubmitUncertain, KeyboardInterrupt, Terminated) as err:
            if not isinstance(err, SubmitUncertain) and ws.submit_state != "sending":
                drop_pending_create(project)   # interrupted before the request went out
                raise
            cause = scrub(str(err)) if isinstance(err, SubmitUncertain) else \
                ("Ctrl+C" if isinstance(err, KeyboardInterrupt) else "SIGTERM") + " arrived"
            raise ReplError("CreateUncertain", f"The answer to the context create was lost ({cause}): a context "
                            "may have been created that nothing tracks.",
                            exit_code=EXIT_INTERRUPTED if isinstance(err, KeyboardInterrupt) else EXIT_FAILED,
                            hint="Run create again; it notes this under possible_orphans in session.json. The API "
                                 "cannot list contexts, so such a context is freed only when the cluster "
                                 "restarts.") from None
        except Exception as err:
            drop_pending_create(project)   # the service said no, or no connection was made: nothing was made
            if error_kind(err) not in ANSWERED:
                raise
            text = str(err)
            if re.search(r"\b145\b|too many|limit", text, re.I) and "context" in text.lower():
                raise ReplError("ContextLimitReached", f"The cluster has no free execution context: {scrub(text)}",
                                hint="Destroy unused sessions (dbx_repl.py destroy in their project dirs), "
                                     "or use another cluster.") from None
            raise map_sdk_error(err, action="create an execution context") from None
        try:
            mark_pending_create(project, cluster_id, context_id=context.context_id)
            state = ws.wait_for_context(context)
            if state == "Running":
                results = ws.run_command(context, bootstrap_command(bootstrap_config(session, ws.host)),
                                         timeout=CONTEXT_START_TIMEOUT)
        except BaseException:
            abandon_context(ws, project, context)
            raise
        if state == "Running":
            break
        abandon_context(ws, project, context)
        if state != "Error" or attempt == CONTEXT_CREATE_ATTEMPTS:
            raise ReplError("ContextFailed", f"The execution context did not start (status {state}, "
                            f"{attempt} attempt(s)).",
                            hint="Check the cluster's driver logs; restart the cluster if this repeats.")
        time.sleep(min(2 ** attempt, 8))
    if results.get("resultType") == "error":
        abandon_context(ws, project, context)
        error_type, message = parse_error(results.get("summary"), results.get("cause"))
        raise ReplError("BootstrapFailed", f"Installing the REPL helpers failed: {error_type}: {message}",
                        hint="Report this with the cluster's runtime version.")
    return context.context_id


def abandon_context(ws, project, context):
    """Destroy a new context this call will not use (quickly: the call may be stopping), and forget it."""
    with ws.deadline_within(3.0):
        try:
            ws.destroy_context(context)
        except Exception:
            return   # not confirmed: the pending record with its id stays, so the next create destroys it
    drop_pending_create(project)


def adopt_context(ws, project, context_id, replaces=None):
    """Make a new context the session's, unless the session was destroyed while it was created: then
    destroy it (no context outlives its session). True if adopted."""
    with project.lock():
        session = project.load()
        session.pop("pending_create", None)
        if session.get("status") == "active":
            session["context_id"] = context_id
            session.setdefault("contexts", []).append({"context_id": context_id, "created_at": now_iso(),
                                                       "replaces": replaces})
            project.save(session)
            return True
    abandon_context(ws, project, Target.of(session, context_id))
    return False


def remove_driver_copies(ws, target, session_id=None):
    """Delete a session's output copies on the driver (this context's session, or session_id's).
    Best effort; returns the number of files removed, or None when the REPL could not be asked."""
    try:
        return int(ws.driver_call(target, "remove_copies", *([session_id] if session_id else []))["removed"])
    except Exception:
        return None


def recover_context(ws, project, failed=None, lost=None):
    """The context is gone: record the lost step (`failed`, a StepRun), start a fresh context, and list
    what to replay. `lost`: why the context died under the failed step (None: evicted); the answer is
    then ContextLost.

    If the session was destroyed meanwhile (a `destroy` from another call during the wait), or another
    call already recorded the step, nothing is recorded twice and no context is created."""
    mine = failed.active if failed else None
    with project.lock():
        session = project.load()
        old_context = session.get("context_id")
        active = session.get("active_command")
        still_ours = mine is None or (active is not None and active.get("step") == mine["step"])
        if session.get("status") != "active" or not still_ours:
            return settled_elsewhere(project, session, mine)
        failed_entry = None
        if mine:
            failed_entry = step_entry(project, mine, "ContextLost" if lost else "Evicted")
            touch_step_files(project, failed_entry)
            session["steps"].append(failed_entry)
        session["active_command"] = None
        project.save(session)
    plan, target = dependency_plan(project, session, target=failed_entry)
    summary = plan_summary(project, plan, target)
    try:
        cluster = ws.cluster(session["cluster_id"])
        if cluster.get("state") not in RUNNABLE_CLUSTER_STATES:
            raise cluster_not_running(session["cluster_id"], cluster)
        new_context = start_context(ws, project, session)
    except ReplError as err:
        err.fields.update(evicted_context_id=old_context, replay_plan=summary)
        err.message = f"The execution context was lost, and a new one could not be started: {err.message}"
        raise
    if not adopt_context(ws, project, new_context, replaces=old_context):
        return settled_elsewhere(project, project.load(), mine)
    session = project.load()
    salvaged = failed.salvage_output(Target.of(session)) if failed else None
    earlier = previous_steps(project, session, old_context)
    return response(
        "ContextLost" if lost else "ContextEvicted",
        " ".join(filter(None, [lost or "The execution context was evicted.",
                               "A new context is ready, but variables and imports are gone.", salvaged])),
        old_context_id=old_context, new_context_id=new_context,
        failed_step=step_key(mine["step"], mine["tag"]) if mine else None,
        replay_plan=summary,
        tip=recovery_tips(project, plan or session.get("syncs"), None if lost else failed),
        synced_folders=sorted(session.get("syncs") or {}) or None, **earlier,
        hint="replay runs the plan (the steps whose definitions the failed step needs; see "
             "references/eviction-replay.md"
             + ("; it first syncs the synced_folders again" if session.get("syncs") else "") + "), then "
             + ("change the failed step before running it again: it took its context down." if lost
                else "exec the failed step again."),
        exit_code=EXIT_FAILED)


def recovery_tips(project, replay, failed=None):
    """After a context is gone: the replay (when there is something to replay) and its plan, then the
    failed step (a StepRun) run again from its command file, in that order."""
    tips = {"replay": cli_hint("replay", project), "plan": f"{cli_hint('replay', project)} --plan"} if replay else {}
    if failed is not None:
        tips["retry"] = failed.retry_tip()
    return tips or None


PREVIOUS_STEPS_SHOWN = 6                   # ContextEvicted: the evicted context's last steps in the answer
PREVIOUS_STEPS_FILE = "previous_steps.json"   # under OUTPUT_DIR: all of them


def previous_steps(project, session, context_id):
    """The evicted context's steps, in order, as the original skill's ContextEvicted listed them
    ({"step", "tag", "command_file"}): the last PREVIOUS_STEPS_SHOWN in the answer, all in
    repl_outputs/previous_steps.json. Returns the answer's fields."""
    rows = [{"step": s["step"], "tag": s["tag"],
             "command_file": project.show(os.path.join(project.root, s.get("command_file") or ""))}
            for s in session["steps"] if s.get("context_id") == context_id and s.get("command_file")]
    if not rows:
        return {}
    path = project.output_path(PREVIOUS_STEPS_FILE)
    write_atomic(path, json.dumps({"context_id": context_id, "previous_steps": rows}, indent=1, ensure_ascii=False))
    return {"previous_steps": rows[-PREVIOUS_STEPS_SHOWN:], "previous_steps_count": len(rows),
            "previous_steps_file": project.show(path)}


def settled_elsewhere(project, session, failed):
    """The answer for a wait whose step (`failed`, a step record) another call settled: destroy (or
    cancel) got there first."""
    recorded = [s for s in session["steps"] if failed and s.get("step") == failed["step"]]
    status = recorded[-1].get("status") if recorded else None
    if session.get("status") != "active":
        return response("Destroyed", f"The session was destroyed while step "
                        f"{step_key(failed['step'], failed['tag']) if failed else ''} was running; it is recorded "
                        f"as {status or 'not run'}.", exit_code=EXIT_FAILED,
                        cmd_id=step_key(failed["step"], failed["tag"]) if failed else None, step_status=status,
                        hint="Start a new session with tip.create.",
                        tip={"create": create_tip(project, session.get("cluster_id"))})
    return response(status or "Cancelled", f"Step {step_key(failed['step'], failed['tag'])} was settled by another "
                    f"call ({status}).", exit_code=EXIT_FAILED, cmd_id=step_key(failed["step"], failed["tag"]),
                    hint="Continue with exec.")


# -- progress of a running step: read through the sidecar context ----------------------------------

PROGRESS_TAIL_LINES = 10
PROGRESS_TAIL_BYTES = 1024
PROGRESS_READ_SECONDS = 10.0               # one progress read (status); past it the answer says why it has none
RUNNING_PROGRESS_SECONDS = 5.0             # the read a Running answer adds after --timeout
WATCH_INTERVAL_SECONDS = 2.0               # await --follow and the terminal line: a read at most this often
SPARK_NAMES = re.compile(r"\b(spark|sc|sqlContext|sql|table)\b|^\s*%sql|_dbx_repl\.sql\(", re.MULTILINE)


def progress_line(key, waited, progress):
    """One line for a terminal or `await --follow`: elapsed, Spark tasks, the last output line."""
    parts = [f"{key} {waited:.0f}s"]
    for job in (progress.get("spark_jobs") or [])[-2:]:
        parts.append(f"job {job['job']} tasks {job['tasks']}")
    tail = (progress.get("output_tail") or "").strip().splitlines()
    if tail:
        parts.append(tail[-1][:80])
    if progress.get("error"):
        parts.append(f"(no progress: {progress['error'][:60]})")
    return " | ".join(parts)


class StepWatch:
    """The `watch` of a wait: every WATCH_INTERVAL_SECONDS, the step's progress as a line on stderr
    (`follow`: one line per change, for await --follow) or as the live line of a terminal. None
    (see `for_wait`) when neither applies, so a pipe never sees progress."""

    def __init__(self, run, follow):
        self.run, self.follow = run, follow
        self.live = None if follow else LiveLine()
        self.next_read, self.last_line = 0.0, None

    @classmethod
    def for_wait(cls, run, follow=False):
        if not follow and not sys.stderr.isatty():
            return None
        return cls(run, follow)

    def __call__(self, waited):
        if time.monotonic() < self.next_read or not self.run.active.get("command_id"):
            return
        progress = self.run.progress()
        self.next_read = time.monotonic() + WATCH_INTERVAL_SECONDS
        line = progress_line(self.run.files.key, elapsed_since(self.run.active), progress)
        if self.follow:
            body = line.split(" | ", 1)[1] if " | " in line else ""
            if body != self.last_line:
                sys.stderr.write(printable(line) + "\n")
                sys.stderr.flush()
                self.last_line = body
        else:
            self.live.show(line)

    def close(self):
        if self.live is not None:
            self.live.close()


# -- one step's run --------------------------------------------------------------------------------

class StepRun:
    """One step's run, from its reservation to its answer.

    It holds what every part of the run needs: the workspace, the project, the session, the active
    step record (session.json's `active_command`, kept in step with it), the step's files, the target
    it runs on, the caller's --timeout and its deadline, and the output cap. `reserve` (exec, replay)
    makes one for a new step; `await`, `cancel` and `status` make one for the step already active.

    Reading order: submitting (`run`, `submit`, `interrupted_submit`); waiting (`wait`, `interrupt`,
    `cancel`); finishing (`finish`, which renders the results into the step's files and the answer);
    the context lost under the step (`recover`, `python_restarted`); and its progress, read through
    the sidecar context (`progress`)."""

    def __init__(self, ws, project, session, active):
        self.ws, self.project, self.session, self.active = ws, project, session, active
        self.files = StepFiles(project, active["step"], active["tag"])
        self.target = Target.of(session, active.get("context_id"))
        self.timeout = DEFAULT_TIMEOUT      # the caller's --timeout: how long this call waits
        self.deadline = None                # time.monotonic() by which a wait ends
        self.max_bytes = DEFAULT_MAX_OUTPUT_BYTES
        self.command = None                 # what `submit` sends (set by `reserve`)

    @classmethod
    def reserve(cls, ws, project, code, tag, replay_of=None):
        """Take the next step number, write its command file, and mark it active in session.json."""
        with signals_deferred(), project.lock():
            session = require_active(project, project.load())
            busy = session.get("active_command")
            if busy:
                raise ReplError("CommandRunning",
                                f"Step {step_key(busy['step'], busy['tag'])} is still running in this session.",
                                hint="Wait for it with await, or stop it with cancel; the context runs one "
                                     "command at a time.",
                                exit_code=EXIT_FAILED, command_id=busy.get("command_id"),
                                tip={"await": cli_hint("await", project), "cancel": cli_hint("cancel", project)})
            project.ensure_outputs_dir()
            step = max(session["step_counter"], project.highest_step_on_disk()) + 1
            files = StepFiles(project, step, tag)
            write_atomic(files.command, code)
            command, wrapped = wrap_command(code, files.key)
            active = {"step": step, "tag": tag, "command_id": None, "context_id": session["context_id"],
                      "started_at": now_iso(), "wrapped": wrapped, "state": "submitting"}
            if replay_of is not None:
                active["replay_of"] = replay_of
            last = session["steps"][-1] if session["steps"] else None
            if last and last.get("status") == "SubmitUncertain" and last.get("context_id") == session["context_id"]:
                active["after_uncertain"] = step_key(last["step"], last["tag"])
            session["step_counter"] = step
            session["active_command"] = active
            project.save(session)
        run = cls(ws, project, session, active)
        run.command = command
        return run

    def bound(self, timeout, max_bytes, since=None):
        """The caller's --timeout, counted from `since` (a time.monotonic() value; default now), and
        --max-output-bytes. Returns the run."""
        self.timeout, self.max_bytes = timeout, max_bytes
        self.deadline = (time.monotonic() if since is None else since) + timeout
        return self

    # -- submitting -------------------------------------------------------------------------------------
    def run(self):
        """Submit the reserved step and wait for it: the heart of `exec` and `replay`.

        The deadline bounds the submit and the wait. Signals are held while session.json is written;
        one that lands during the submit request is answered by what the service may have seen (see
        `interrupted_submit`)."""
        try:
            with self.ws.deadline_within(self.deadline - time.monotonic() + SUBMIT_GRACE_SECONDS):
                self.ws.submit_state = self.ws.submitted = None
                early = self.submit()
        except (KeyboardInterrupt, Terminated) as interruption:
            return self.interrupted_submit(interruption)
        if early is not None:
            return early
        try:
            return self.wait()
        except KeyboardInterrupt:
            return self.interrupt()
        except Terminated:
            return self.running()

    def submit(self):
        """Send the reserved step's command and save its id. Returns an answer only when it did not start."""
        try:
            command_id = self.execute(self.command)
        except SubmitUncertain as err:
            raise self.uncertain(f"The connection dropped ({scrub(str(err))})") from None
        except Exception as err:
            if self.ws.gone_after(err, self.target):
                return self.recover()
            self.release()   # the service answered no, or no connection was made: nothing ran
            raise map_sdk_error(err, action="submit the command") from None
        self.save_command_id(command_id)
        return None

    def execute(self, command):
        """Submit a command in the step's context; a REPL in a restart window refused it (nothing ran),
        so wait the window out, reinstall the helpers and submit once more."""
        try:
            return self.ws.execute(self.target, command)
        except SubmitUncertain:
            raise
        except Exception as err:
            if RESTART_WINDOW not in str(err):
                raise
        self.reinstall_helpers()
        return self.ws.execute(self.target, command)

    def save_command_id(self, command_id):
        with signals_deferred():
            self.active["command_id"], self.active["state"] = command_id, "running"
            with self.project.lock():
                current = self.project.load()
                if (current.get("active_command") or {}).get("step") == self.active["step"]:
                    current["active_command"] = self.active
                    self.project.save(current)

    def release(self):
        """Undo a reservation whose command the service never took: no step, no files (a refused call
        writes nothing)."""
        with signals_deferred(), self.project.lock():
            session = self.project.load()
            current = session.get("active_command")
            if not current or current.get("step") != self.active["step"] or current.get("command_id"):
                return
            session["active_command"] = None
            if session["step_counter"] == self.active["step"]:
                session["step_counter"] = self.active["step"] - 1
            with contextlib.suppress(OSError):
                os.unlink(self.files.command)
            self.project.save(session)

    def uncertain(self, cause):
        """Record a step whose submit may or may not have reached the service; the error that says
        what happens next."""
        self.record("SubmitUncertain")
        return ReplError("SubmitUncertain",
                         f"{cause} while submitting step {self.files.key}: the service may have received it. It "
                         "was not resent, so it ran once or not at all, and it may still be running: the context "
                         "runs one command at a time, so the next exec waits behind it (within its --timeout).",
                         hint="Check the step's effect with a small exec (e.g. print a variable); exec the step "
                              "again only if the effect is missing.", cmd_id=self.files.key)

    def interrupted_submit(self, interruption):
        """Ctrl+C or SIGTERM while the command was being submitted: answer with what the service saw."""
        ctrl_c = isinstance(interruption, KeyboardInterrupt)
        signal_name = "Ctrl+C" if ctrl_c else "SIGTERM"
        exit_code = EXIT_INTERRUPTED if ctrl_c else EXIT_FAILED
        state = self.ws.submit_state
        if state == "accepted" and not self.active.get("command_id"):
            self.save_command_id(self.ws.submitted["id"])
        if self.active.get("command_id"):   # the service took it: cancel it (Ctrl+C) or leave it running
            return self.interrupt() if ctrl_c else self.running()
        if state == "sending":
            err = self.uncertain(f"{signal_name} arrived")
            err.exit_code = exit_code
            return err.response()
        self.release()
        return response("Interrupted" if ctrl_c else "Terminated",
                        f"{signal_name} arrived before step {self.files.key} was sent: it did not run and is not "
                        "recorded.", exit_code=exit_code, hint="exec it again when ready.")

    # -- waiting ------------------------------------------------------------------------------------------
    def wait(self, follow=False):
        """Wait for the command until the deadline and answer for it: the step, Running (with
        `progress`), StatusUnknown, Cancelled, Destroyed or ContextEvicted. `follow`: progress lines
        on stderr meanwhile (else a live line on a terminal only)."""
        watch = StepWatch.for_wait(self, follow)
        try:
            try:
                status = self.poll(watch)
            finally:
                if watch is not None:
                    watch.close()
            if status is not None and helpers_missing(self.active, status):
                self.rerun_with_helpers()
                status = self.poll()
            if status is not None and restart_window_ending(self.active, status):
                if self.active.get("wrapped") is True:  # the step never reached Python: run it once more
                    self.rerun_with_helpers()
                    status = self.poll()
                else:  # a magic (%pip) ran and Python restarted after it: never re-run its side effects
                    self.reinstall_helpers()
                    self.active["restarted_after_magic"] = True
        except KeyboardInterrupt:
            return self.interrupt()
        except Terminated:
            return self.running()
        except StatusUnavailable as unavailable:
            return self.status_unknown(unavailable)
        except ContextGone:
            return self.recover()
        except Exception as err:
            if error_kind(err) != AUTH:
                raise
            return self.status_unknown(StatusUnavailable(err, 0.0))   # a refused credential: the step lives on
        if status is None:
            body = self.running()
            body["progress"] = self.progress(RUNNING_PROGRESS_SECONDS)
            return body
        return self.finish(status)

    def poll(self, watch=None):
        """The command's status once it has ended, or None at the deadline (see Workspace.wait_command)."""
        left = max(self.deadline - time.monotonic(), 0.0) if self.deadline is not None else self.timeout
        return self.ws.wait_command(self.target, self.active["command_id"], left, watch=watch)

    def reinstall_helpers(self):
        """Install the helpers in the context again, waiting out a Python restart window. Returns True
        when the REPL's Python had restarted (its variables are gone), False when only the helpers were."""
        deadline = time.monotonic() + RESTART_WAIT_SECONDS
        while True:
            try:
                results = self.ws.run_command(self.target, bootstrap_command(bootstrap_config(self.session,
                                                                                              self.ws.host)),
                                              timeout=CONTEXT_START_TIMEOUT)
                problem = service_error_text(results) if results.get("resultType") == "error" else None
            except ReplError:
                raise
            except Exception as err:
                if RESTART_WINDOW not in str(err):
                    raise
                problem = str(err)
            if problem is None:
                return (results.get("data") or "").rstrip().endswith("fresh")
            if RESTART_WINDOW not in problem:
                raise ReplError("BootstrapFailed", "Installing the REPL helpers again failed: "
                                f"{scrub(problem.strip())[:300]}", hint="Run status; if the context is lost, "
                                                                        "replay restores it.")
            if time.monotonic() > deadline:
                raise ReplError("KernelRestarting", f"The REPL's Python was still restarting after "
                                f"{RESTART_WAIT_SECONDS:g}s.", hint="Wait a minute, then run await (or status).")
            time.sleep(2)

    def rerun_with_helpers(self):
        """Install the helpers again and submit the step once more, saving its new command id."""
        self.active["python_restarted_before"] = self.reinstall_helpers()
        with open(self.files.command, encoding="utf-8") as f:
            command, _ = wrap_command(f.read(), self.files.key)
        try:
            command_id = self.ws.execute(self.target, command)
        except SubmitUncertain as err:
            raise self.uncertain(f"The connection dropped ({scrub(str(err))})") from None
        self.active["helpers_reinstalled"] = True
        self.save_command_id(command_id)

    def interrupt(self):
        """Ctrl+C while waiting: cancel the remote command and record the step as Cancelled.

        A SIGTERM during the cancel (an agent's tool timeout after its Ctrl+C) cuts the confirmation
        short: one last status read decides between Cancelled and Cancelling (await settles that)."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous_term = signal.getsignal(signal.SIGTERM)
        try:
            try:
                status = self.ws.cancel_and_wait(self.target, self.active["command_id"])
            except Terminated:
                status = self.last_status()
                if status is None:
                    return self.cancelling("Stopped by SIGTERM while the cancel was confirmed.")
            except ContextGone:
                return self.recover()
            except Exception:
                status = None
            # The outcome is known: a SIGTERM now would only lose the answer, so finish first.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if status is not None:
                body = self.finish(status)
                if body["status"] == "Cancelled":
                    body["message"] = "Command interrupted by user. " + body["message"]
                    body["_exit"] = EXIT_INTERRUPTED
                    self.note_left_running(body)
                return body
            elapsed = elapsed_since(self.active)
            self.record("Cancelled", elapsed=elapsed)
            return self.respond("Cancelled", elapsed, {"message": "Command interrupted by user. The cancel could "
                                                                  "not be confirmed; check with status."},
                                exit_code=EXIT_INTERRUPTED)
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)

    def cancel(self):
        """`cancel` of this step: stop its command and answer Cancelled, the step's own ending when it
        had ended first, or Cancelling while it stops (the step stays active so await can settle it)."""
        command_id = self.active["command_id"]
        try:
            status = self.ws.cancel_and_wait(self.target, command_id)
        except ContextGone:
            return self.recover()
        except StatusUnavailable as unavailable:
            # The service took the cancel but cannot say whether the command stopped. Free the session
            # anyway (the way out when status calls keep failing), and say what that means.
            error = map_sdk_error(unavailable.error, action="read the command's status").message
            self.record("Cancelled", elapsed=elapsed_since(self.active), cancel_confirmed=False)
            return response("Cancelled", "The cancel was sent, but the service could not confirm it: " + error +
                            " The step is recorded as Cancelled and the session is free; if the command still "
                            "runs, the next exec waits behind it.", cancel_confirmed=False, status_error=error[:500],
                            hint="Continue with exec; destroy the session if the next exec answers Running.",
                            command_id=command_id, cmd_id=self.files.key)
        except Exception as err:
            raise map_sdk_error(err, action="cancel the command") from None
        if status is None:
            return self.cancelling()
        body = self.finish(status)
        if body["status"] in ("Finished", "Error"):
            body["message"] = "The command had already finished before the cancel; its output was saved."
        elif body["status"] == "Cancelled":
            body["command_id"], body["_exit"] = command_id, EXIT_OK  # the cancel succeeded
            self.note_left_running(body)
        return body

    def note_left_running(self, body):
        """After a cancel: streaming queries the step started keep running on the cluster (a cancel
        stops the command, not them). Name them in the answer, with the command that stops them."""
        try:
            with self.ws.deadline_within(PROGRESS_READ_SECONDS):
                left = self.ws.driver_call(self.target, "streams_left", self.files.key)
        except Exception:   # the answer stands without it; the cancel itself succeeded
            return
        started = left.get("started_by_step") or []
        if not started:
            return
        stop = ", ".join(repr(q["id"]) for q in started[:5])
        body["still_running"] = {"streaming_queries": started[:5], "count": len(started)}
        body["message"] += (f" {len(started)} streaming quer{'y' if len(started) == 1 else 'ies'} the step started "
                            "still run on the cluster: a cancel stops the command, not its streams.")
        body["tip"] = {"stop_streams": cli_hint("exec", self.project) + " --tag stop_streams --command "
                       + shlex.quote(f"[q.stop() for q in spark.streams.active if q.id in ({stop},)]")}

    def last_status(self, budget=2.0):
        """One quick status read of the command (its status dict if it has ended, else None)."""
        with self.ws.deadline_within(budget):
            try:
                status = self.ws.command_status(self.target, self.active["command_id"])
                return status if status.get("status") in DONE_COMMAND_STATES else None
            except Exception:
                return None

    # -- the answers while it runs ----------------------------------------------------------------------
    def running(self):
        queued = (f" It may be waiting behind step {self.active['after_uncertain']}, whose submit was uncertain."
                  if self.active.get("after_uncertain") else "")
        return response(
            "Running", f"Command still running after {self.timeout:g}s client-side timeout.{queued}",
            exit_code=EXIT_RUNNING, cmd_id=self.files.key, command_id=self.active.get("command_id"),
            elapsed_seconds=round(elapsed_since(self.active), 3),
            tip={"await": cli_hint("await", self.project),
                 "cancel": cli_hint("cancel", self.project)},
            hint="The command keeps running on the cluster. Use await to keep waiting or cancel to stop it; "
                 "do not exec again until it is done.")

    def status_unknown(self, unavailable):
        """The wait ended and the command's status could not be read: say so, with the error. When the
        workspace refused the credentials, say that: the step may still be running, and await finds
        it once they are fixed."""
        error = map_sdk_error(unavailable.error, action="read the command's status").message
        if error_kind(unavailable.error) == AUTH:
            message = (f"Step {self.files.key} may still be running: the workspace refused the credentials while "
                       f"the CLI waited for it. {error}")
            hint = ("Fix the credentials (a new token, databricks auth login, or the --profile), then run tip.await "
                    "to collect the step; tip.cancel stops it. Nothing is lost: the step stays in session.json.")
        else:
            message = (f"The state of step {self.files.key} is unknown: its status calls have failed for "
                       f"{unavailable.failing_for:.0f}s. {error}")
            hint = ("The command may still be running. await tries again; cancel asks the service to stop it and "
                    "frees the session even if the service cannot confirm; destroy ends the session.")
        return response(
            "StatusUnknown", message, exit_code=EXIT_RUNNING, cmd_id=self.files.key,
            command_id=self.active.get("command_id"), context_id=self.target.context_id,
            elapsed_seconds=round(elapsed_since(self.active), 3), status_error=error[:500],
            credentials_refused=True if error_kind(unavailable.error) == AUTH else None,
            tip={"await": cli_hint("await", self.project),
                 "cancel": cli_hint("cancel", self.project), "destroy": cli_hint("destroy", self.project)},
            hint=hint)

    @classmethod
    def settle_earlier(cls, ws, project, session):
        """Before a new step runs: the step still marked active is checked, never assumed to run.
        Returns None when there is none; the earlier step's answer when it had ended (its output is
        collected and it is recorded); raises CommandRunning when the service says it still runs, and
        answers StatusUnknown (raised as a ReplError) when the service cannot say."""
        busy = session.get("active_command")
        if not busy:
            return None
        key = step_key(busy["step"], busy["tag"])
        if not busy.get("command_id"):    # another call is submitting it right now: nothing to ask yet
            raise cls.still_running(project, busy, f"Step {key} is being submitted by another call.")
        run = cls(ws, project, session, busy).bound(0.0, DEFAULT_MAX_OUTPUT_BYTES)
        try:
            status = run.poll()
        except ContextGone:
            return run.recover()
        except (KeyboardInterrupt, Terminated):
            raise
        except Exception as err:
            body = run.status_unknown(err if isinstance(err, StatusUnavailable) else StatusUnavailable(err, 0.0))
            exit_code = body.pop("_exit")
            raise ReplError(body.pop("status"), body.pop("message"), hint=body.pop("hint", None),
                            exit_code=exit_code, **body) from None
        if status is None:
            raise cls.still_running(project, busy, f"Step {key} is still running in this session (the service says "
                                                   "so).")
        return run.finish(status)

    @staticmethod
    def still_running(project, busy, message):
        return ReplError("CommandRunning", message, exit_code=EXIT_FAILED, cmd_id=step_key(busy["step"], busy["tag"]),
                         command_id=busy.get("command_id"),
                         hint="The context runs one command at a time: wait for it (tip.await) or stop it "
                              "(tip.cancel), then exec again.",
                         tip={"await": cli_hint("await", project), "cancel": cli_hint("cancel", project)})

    def cancelling(self, message=None):
        return response("Cancelling", " ".join(filter(None, [message, CANCELLING_MESSAGE])),
                        exit_code=EXIT_FAILED, cmd_id=self.files.key, command_id=self.active.get("command_id"),
                        tip={"await": cli_hint("await", self.project), "status": cli_hint("status", self.project)},
                        hint="It may still stop (or end on its own): tip.await collects its ending.")

    # -- finishing: the results into the step's files and the answer -------------------------------------
    def finish(self, status):
        """Render an ended command's results, record its step, and build the answer."""
        try:
            step_status, fields = self.render(status)
        except ContextLostDuringStep as lost:
            # A shutdown by the service is an eviction (the step may run again as it is); the rest was the step.
            return self.recover(lost=lost.reason if lost.step_at_fault else None)
        except HelpersGoneDuringStep:
            if self.reinstall_helpers():
                return self.python_restarted()
            return self.finish(status)  # the helpers are back
        except Exception as err:
            # Never leave the session blocked on a command that has ended: keep the raw result instead.
            raw = self.files.path(".result.json")
            write_atomic(raw, json.dumps(status, ensure_ascii=False, default=str))
            self.files.add("raw_result", raw)
            touch_step_files(self.project, step_entry(self.project, self.active, "RenderFailed"))
            reason = err.message if isinstance(err, ReplError) else f"{type(err).__name__}: {scrub(str(err))}"
            step_status, fields = "RenderFailed", {"message": f"The command ended ({status.get('status')}) but "
                                                              f"its output could not be saved: {reason}"}
        if self.active.get("after_uncertain"):
            fields["note"] = (f"Step {self.active['after_uncertain']} was submitted uncertainly: if the service ran "
                              "it, this step waited behind it.")
        if self.active.get("helpers_reinstalled"):
            fields["note"] = ("Python had restarted since the last step, so variables and imports are gone; the "
                              "helpers were installed again and this step ran after that."
                              if self.active.get("python_restarted_before") else
                              "The REPL had lost its helpers; they were installed again and this step ran after "
                              "that.")
        elapsed = elapsed_since(self.active)
        outputs = [o for o in self.files.outputs() if o["kind"] not in ("command", "stdout", "stderr")]
        self.record(step_status, elapsed=elapsed, outputs=[{k: o[k] for k in ("kind", "path")} for o in outputs]
                    or None, replay_of=self.active.get("replay_of"))
        return self.respond(step_status, elapsed, fields)

    def render(self, status):
        """Turn an ended command's status into step files and the answer's fields.

        Returns (step_status, fields); fields may carry "hint" and "note". Files are written before the
        caller records the step. Raises ContextLostDuringStep when a probe shows the context died."""
        results = valid_unicode(status.get("results") or {})
        kind, state = results.get("resultType"), status.get("status")
        wrapped = self.active.get("wrapped", True)
        failed = kind == "error" or state in ("Error", "Cancelled")
        # A cancel, a shutdown and a crash can all end as an error result: only a probe tells whether
        # the context (and its variables) survived.
        if failed and not self.ws.context_alive(self.target):
            shutdown = any(cause in service_error_text(results) for cause in SHUTDOWN_CAUSES)
            raise ContextLostDuringStep(lost_reason(status), step_at_fault=not shutdown)
        write_atomic(self.files.stderr, b"")
        output = self.write_stdout(results)
        fields, notes, record = dict(output["fields"], truncated=output["truncated"]), output["notes"], output["record"]
        total = output["total"]
        if kind == "table":
            rendering, fields["table"] = save_table(self.files, results)
            _append(self.files.stdout, ("\n" if os.path.getsize(self.files.stdout) else "") + rendering)
        if wrapped is True and not failed and sql_of(_read_text(self.files.command)) is not None:
            fields["table"], rendering = self.sql_table()
            if rendering is None:
                notes.append("The SQL result table could not be fetched from the driver; exec the step again.")
            elif rendering:
                _append(self.files.stdout, ("\n" if os.path.getsize(self.files.stdout) else "") + rendering)
        image_names = record.get("images") or []
        if wrapped and image_names:
            fields["images"], unfetched = self.images_from_driver(image_names)
            if unfetched:
                notes.append(f"{len(unfetched)} plot(s) could not be fetched from the driver ({', '.join(unfetched)}).")
        elif kind in ("images", "image"):
            fields["images"], unresolved = self.save_images(results)
            if unresolved:
                fields["unfetched_images"] = unresolved
                notes.append(f"{len(unresolved)} image(s) could not be fetched; their FileStore paths are "
                             "in unfetched_images.")
        if fields.get("truncated") and total is not None:
            fields["stdout_total_bytes"] = total
        step_status = "Finished"
        if failed and self.active.get("restarted_after_magic"):
            notes.append("Python restarted after this step ran (as %pip can do): the helpers were installed again, "
                         "and variables and imports are gone; replay the steps you need.")
            fields["hint"] = "Replay the steps you need with tip.replay (--steps names them, e.g. 1,2,5)."
            fields["tip"] = {"replay": f"{cli_hint('replay', self.project)} --steps <steps>"}
        elif failed:
            step_status = self.failed_ending(status, {"end": record, "traceback": output["traceback"]}, fields, notes)
        fields["message"] = " ".join(n for n in notes if n) or None
        return step_status, fields

    def write_stdout(self, results):
        """Write the step's stdout file from its one source of truth, and say whether it is whole.

        A wrapped step's file is its driver copy: the copy that travelled inline in the result when
        its sha256 matches the step's record, else the copy fetched from the driver, checked against
        the record. Text the REPL showed beside the frame goes to NNN_tag.outside.txt; what was printed
        after the previous step ended, to that step's NNN_tag.late.stdout. A cell magic (%%sh) cannot
        be captured: the service's text is all there is. Returns {"truncated", "notes", "record",
        "traceback", "total", "fields"}."""
        files, max_bytes = self.files, self.max_bytes
        data = results.get("data")
        text = (data if isinstance(data, str) else "" if data is None else json.dumps(data)) \
            if results.get("resultType") in ("text", None) else None
        out = {"truncated": False, "notes": [], "record": {}, "traceback": None, "total": None, "fields": {}}
        if not self.active.get("wrapped", True):
            write_atomic(files.stdout, (text or "").encode("utf-8", "replace")[:max_bytes])
            if text is None:
                out.update(truncated=True, notes=["What this cell magic printed is lost: the service returns no text "
                                                  "for a failed or cancelled command, and a cell magic cannot be "
                                                  "captured."])
            elif results.get("truncated") or len(text.encode("utf-8", "replace")) > max_bytes:
                out.update(truncated=True, notes=["The service cut this output, and a cell magic's output cannot be "
                                                  "fetched from the driver."])
            return out
        outside, record, inline = read_frame(text, files.key) if text is not None else ("", None, None)
        record, verified = valid_unicode(record or {}), False
        if inline is not None and sha256_text(inline) == record.get("sha256") \
                and len(inline.encode("utf-8")) <= max_bytes:
            write_atomic(files.stdout, inline.encode("utf-8"))
            verified, out["total"] = True, len(inline.encode("utf-8"))
        else:
            try:
                written, size, header, digest = self.fetch_copy(max_bytes)
            except Exception as err:  # a failed fetch must not lose the step: say where the copy stays
                write_atomic(files.stdout, (inline or "").encode("utf-8", "replace")[:max_bytes])
                detail = err.message if isinstance(err, ReplError) else f"{type(err).__name__}: {err}"
                if HELPERS_MISSING.search(detail):
                    raise HelpersGoneDuringStep() from None
                local_copy = self.project.show(files.path(".full.stdout"))
                out.update(truncated=True, notes=[
                    f"Could not fetch the full output: {scrub(detail)}. It stays on the driver (older steps' copies "
                    f"are pruned past {DRIVER_COPIES_BYTES >> 20} MiB per session): {cli_hint('get', self.project)} "
                    f"{driver_copy_path(self.target.session_id, files.key)} {local_copy}"])
                return out
            header = valid_unicode(header)
            record = header.get("end") if isinstance(header.get("end"), dict) else record
            out["traceback"], out["total"] = header.get("traceback"), (size if size >= 0 else None)
            if size < 0:
                out["notes"].append("The driver copy of the output is gone (a restarted driver, or removed); the "
                                    "stdout file is empty.")
            elif written < size:
                out["notes"].append(_cut_note(written, size))
            elif record.get("sha256") == digest and record.get("bytes") == size:
                verified = True
            elif record.get("sha256"):
                out["notes"].append("The output fetched from the driver does not match the step's record (the copy "
                                    "changed on the driver): the stdout file may be incomplete.")
            else:
                out["notes"].append("The step left no record of its output (Python stopped before the step ended, "
                                    "or the driver was still writing it): the stdout file holds what the driver copy "
                                    "had.")
            if inline is not None and inline.count(REDACTED) > _count_in_file(files.stdout, REDACTED):
                # The service redacted a value the driver did not know as a secret (read some other
                # way): its text wins, so nothing the service hid reaches a file.
                write_atomic(files.stdout, inline.encode("utf-8"))
                out["notes"].append("The service redacted a value the driver copy still held; the stdout file holds "
                                    "the service's (redacted) text.")
        out["truncated"], out["record"] = not verified, record
        ending = record.get("ending") if isinstance(record.get("ending"), dict) else {}
        if ending.get("kind") == "exit":
            out["fields"]["exit_value"] = printable(str(ending.get("value")))   # the service's text is this value
        elif outside.strip():
            path = files.path(".outside.txt")
            write_atomic(path, outside.encode("utf-8", "replace"))
            files.add("outside", path)
            out["notes"].append(f"The REPL also showed {len(outside.encode('utf-8', 'replace'))} bytes outside the "
                                f"step's capture (a stream held from before the session): {self.project.show(path)}.")
        late = record.get("late") if isinstance(record.get("late"), dict) else None
        if late and late.get("after"):
            out["fields"]["late_output"], note = self.fetch_late(late)
            out["notes"].append(note)
        return out

    def fetch_copy(self, max_bytes, target=None):
        """Copy the step's driver copy into its stdout file, through `target` (default the step's;
        after a loss, the new context's: the driver's disk outlives it), at most max_bytes of it (then
        with the cut marker line). Returns (written, size, header, sha256 of what arrived): size -1
        when the driver has no copy; the first chunk's header carries "traceback" and "end" (the
        step's record). Raises whatever the transfer raised; the stdout file then holds what arrived."""
        with open(self.files.stdout, "wb") as f:
            sink = _Digesting(f)
            written, size, header = self.ws.fetch_file(target or self.target, sink, max_bytes, "fetch_output",
                                                       self.files.key)
            if 0 <= size and written < size:
                f.write(cut_marker(written, size))
        return written, size, header or {}, sink.digest.hexdigest()

    def fetch_late(self, late):
        """What was printed between the previous step's end and this step's start (threads, logging
        handlers, background processes), into <previous step>.late.stdout: (the answer's field, a note)."""
        after = str(late["after"])
        path = self.project.output_path(f"{sanitize_tag(after)}.late.stdout")
        try:
            with open(path, "wb") as f:
                sink = _Digesting(f)
                written, size, _ = self.ws.fetch_file(self.target, sink, DEFAULT_TRANSFER_CAP, "fetch_late", after)
        except Exception as err:
            detail = err.message if isinstance(err, ReplError) else type(err).__name__
            return ({"after_step": after, "bytes": late.get("bytes"), "fetched": False},
                    f"{late.get('bytes')} bytes were printed after step {after} ended; they could not be fetched "
                    f"({scrub(detail)}) and stay on the driver.")
        whole = size == written and sink.digest.hexdigest() == late.get("sha256")
        self.files.add("late_output", path)
        field = {"after_step": after, "file": self.project.show(path), "bytes": written}
        if not whole:
            field["truncated"] = True
        return field, (f"{written} bytes were printed after step {after} ended (threads, logging handlers or "
                       f"background processes): {self.project.show(path)}{'' if whole else ' (incomplete)'}.")

    def driver_file(self, name, path):
        """Copy one file the bootstrap saved for the step (a plot, a SQL table) to `path`: True when
        it arrived whole, None when the driver has no such file, else False; nothing is left at `path`
        unless True."""
        size = -1
        try:
            with open(path, "wb") as sink:
                written, size, _ = self.ws.fetch_file(self.target, sink, DEFAULT_TRANSFER_CAP, "fetch_image",
                                                      self.files.key, name)
            if size < 0 or written != size:
                raise ReplError("TransferFailed", "incomplete")
        except Exception:
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None if size < 0 else False
        return True

    def images_from_driver(self, names):
        """Fetch the plots the bootstrap saved for the step; returns (saved paths, names not fetched)."""
        saved, missing = [], []
        for index, name in enumerate(names, start=1):
            extension = name.rsplit(".", 1)[-1] if "." in name else "png"
            path = self.files.path(f".{index}.{extension}")
            if not self.driver_file(name, path):
                missing.append(name)
                continue
            self.files.add("image", path)
            saved.append(self.project.show(path))
        return saved, missing

    def sql_table(self):
        """Fetch a SQL step's table (NNN_tag.sql.csv, every row up to the cap) and its schema
        (NNN_tag.sql.json); returns (the `table` field, a preview rendering), or (None, None) when the
        files could not be fetched, or (None, "") for a statement without a result (CREATE VIEW, SET)."""
        files, show = self.files, self.project.show
        csv_path, schema_path = files.path(".sql.csv"), files.path(".sql.json")
        schema_fetched = self.driver_file(files.key + ".sql.json", schema_path)
        if schema_fetched is None:
            return None, ""
        if not (schema_fetched and self.driver_file(files.key + ".sql.csv", csv_path)):
            return None, None
        with open(schema_path, encoding="utf-8") as f:
            schema = json.load(f)
        with open(csv_path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            head = [row for _, row in zip(range(TABLE_PREVIEW_ROWS), reader)]
        files.add("table", csv_path, rows=schema["rows"])
        files.add("table_schema", schema_path)
        columns = [(c["name"], c["type"]) for c in schema["columns"]]
        rendering = render_table(columns, head)
        if schema["total_rows"] > len(head):
            rendering += f"... {schema['total_rows'] - len(head)} more rows in {show(csv_path)}\n"
        shown = columns[:20]
        return {"rows": schema["rows"], "total_rows": schema["total_rows"], "columns": len(columns),
                "truncated": schema["truncated"], "file": show(csv_path), "schema_file": show(schema_path),
                "column_names": [printable(n)[:60] for n, _ in shown],
                "column_types": [printable(t)[:30] for _, t in shown]}, rendering

    def save_images(self, results):
        """Images the service returned itself (data URLs, or FileStore paths read through DBFS)."""
        names = list(results.get("fileNames") or [])
        if results.get("fileName"):
            names.append(results["fileName"])
        saved, unresolved = [], []
        for index, name in enumerate(names, start=1):
            try:
                decoded = decode_data_url(name)
            except ValueError:                 # a data URL whose base64 does not decode
                decoded = ("png", None)
            if decoded is None:
                path = name if name.startswith("dbfs:") else "dbfs:/FileStore/" + name.lstrip("/")
                decoded = ("png", self.ws.read_dbfs(path))
            if decoded[1] is None:
                unresolved.append(name if len(name) <= 200 else name[:60] + "...")
                continue
            path = self.files.path(f".{index}.{decoded[0]}")
            write_atomic(path, decoded[1])
            self.files.add("image", path)
            saved.append(self.project.show(path))
        return saved, unresolved

    def failed_ending(self, status, header, fields, notes):
        """The status of a step whose command failed while its context lived: Cancelled, Error, or
        Finished for sys.exit(0). Fills fields (error, hint), notes and the stderr file."""
        results, state = valid_unicode(status.get("results") or {}), status.get("status")
        record = header.get("end") if isinstance(header.get("end"), dict) else {}
        ending = record.get("ending") if isinstance(record.get("ending"), dict) else {}
        if ending.get("kind") == "raised":
            error_type, message = str(ending.get("type") or "Exception"), str(ending.get("message") or "")
        elif RESTART_WINDOW in service_error_text(results):
            fields["error"] = {"type": "KernelRestarting",
                               "message": printable(html_to_text(results.get("summary")))[:500]}
            fields["hint"] = "The REPL's Python was restarting and the step did not run; exec it again in a minute."
            return "Error"
        else:
            error_type, message = parse_error(results.get("summary"), results.get("cause"))
        if is_cancellation(state, results) or error_type == "KeyboardInterrupt":
            # pyspark's SIGINT handler turns a cancel into KeyboardInterrupt: the service then answers
            # Finished with that error, as it does for a cancel from any client.
            fields["hint"] = ("The session and its variables are intact; what the step printed before the cancel "
                              "is in stdout_file. Continue with exec.")
            return "Cancelled"
        cause = strip_ansi(valid_unicode(header.get("traceback"))) or strip_ansi(results.get("cause")) or \
            html_to_text(results.get("summary"))
        write_atomic(self.files.stderr, cause.rstrip("\n") + "\n")
        if error_type == "SystemExit":
            code = ending.get("exit_code", message) if ending else message
            if code in (0, None, "0", "", "None"):
                notes.append("The step ended by calling sys.exit(0), a normal exit; the session and its "
                             "variables are intact.")
                return "Finished"
            fields["error"] = {"type": "SystemExit", "message": printable(str(code))[:500]}
            fields["hint"] = (f"The code called sys.exit({code}); the session and its variables are intact. "
                              f"Read {self.project.show(self.files.stderr)} and exec the next step.")
            return "Error"
        shown = printable(message)
        fields["error"] = {"type": printable(error_type)[:200],
                           "message": shown if len(shown) <= 500 else shown[:497] + "..."}
        self.name_left_out(missing_name(error_type, message), fields, notes)
        return "Error"

    def retry_tip(self):
        """The exec command line that runs this step again, as it was, from its command file."""
        return (f"{cli_hint('exec', self.project)} --tag {shlex.quote(self.active['tag'])} --command "
                + shlex.quote("@" + self.project.show(self.files.command)))

    def name_left_out(self, name, fields, notes):
        """The eviction's aftermath: the step failed on a name (or a table or view) that a step of an
        evicted context defined and no replay restored. Say so, with the replay and the retry."""
        definer = left_out_definer(self.project, self.session, name, self.active["step"]) if name else None
        if definer is None:
            return
        shown = name[len("sql:"):] if name.startswith("sql:") else name
        notes.append(f"{shown!r} was defined by step {definer['origin']} ({definer['tag']}), which ran in an "
                     "earlier execution context and was not replayed into this one (the context was evicted).")
        fields["left_out_step"] = definer["origin"]
        fields["hint"] = "Replay the step that defines it with tip.replay, then run this step again with tip.retry."
        fields["tip"] = {"replay": f"{cli_hint('replay', self.project)} --steps {definer['origin']}",
                         "retry": self.retry_tip()}

    def record(self, status, **extra):
        """Record the step in session.json with `status` (after its files exist); the session saved."""
        return record_step(self.project, step_entry(self.project, self.active, status, **extra),
                           command_id=self.active.get("command_id"))

    def respond(self, step_status, elapsed, fields, exit_code=None):
        """The exec/await answer of an ended step (the spec's schema, plus outputs)."""
        files, show = self.files, self.project.show
        stdout_bytes = os.path.getsize(files.stdout) if os.path.exists(files.stdout) else 0
        stderr_bytes = os.path.getsize(files.stderr) if os.path.exists(files.stderr) else 0
        body = {"cmd_id": files.key, "stdout_file": show(files.stdout), "stderr_file": show(files.stderr),
                "stdout_bytes": stdout_bytes, "stderr_bytes": stderr_bytes}
        if stdout_bytes:
            body["stdout_preview"] = file_preview(files.stdout)
        if stderr_bytes:
            body["stderr_preview"] = file_preview(files.stderr)
        body["elapsed_seconds"] = round(elapsed, 3)
        message, note, hint = fields.pop("message", None), fields.pop("note", None), fields.pop("hint", None)
        error = fields.get("error")
        default_messages = {
            "Finished": "The command finished.",
            "Error": f"The command raised {error['type']}: {error['message']}" if error else "The command failed.",
            "Cancelled": "The command was cancelled.",
        }
        hints = {
            "Error": f"Read {body['stderr_file']}, fix the code, and exec again.",
            "Cancelled": "The session and its variables are intact; continue with exec.",
            "RenderFailed": "The raw service result is in the .result.json output; the session is usable.",
        }
        body.update(fields)
        body["outputs"] = files.outputs()
        if exit_code is None:
            exit_code = EXIT_OK if step_status == "Finished" else EXIT_FAILED
        if step_status == "Error" and error and message:   # the error first, then what the notes add
            message = f"{default_messages['Error']} {message}"
        message = " ".join(filter(None, [message or default_messages.get(step_status, step_status), note]))
        return response(step_status, message, hint=hint or hints.get(step_status), exit_code=exit_code, **body)

    # -- the context lost under the step ----------------------------------------------------------------
    def recover(self, lost=None):
        """The context is gone: record the step lost with it, start a fresh context and list what to
        replay (see `recover_context`). `lost`: why the context died under the step (None: evicted)."""
        return recover_context(self.ws, self.project, failed=self, lost=lost)

    def python_restarted(self):
        """The REPL's Python restarted while the step ran (the context lives on with a fresh interpreter,
        and the helpers were installed again): record the step ContextLost and say what to replay."""
        salvaged = self.salvage_output()
        entry = step_entry(self.project, self.active, "ContextLost", elapsed=elapsed_since(self.active))
        session = record_step(self.project, entry, command_id=self.active.get("command_id"))
        plan, target = dependency_plan(self.project, session, target=entry)
        return response(
            "ContextLost", " ".join(filter(None, [
                "The REPL's Python restarted while the step ran (a crash, os._exit, or the driver ran out of "
                "memory), so variables and imports are gone; the helpers were installed again in the same "
                "context.", salvaged])),
            context_id=entry["context_id"], failed_step=self.files.key,
            replay_plan=plan_summary(self.project, plan, target),
            tip={"replay": cli_hint("replay", self.project), "plan": f"{cli_hint('replay', self.project)} --plan"}
            if plan else None,
            hint="replay runs the plan (see references/eviction-replay.md), then change the failed step before "
                 "running it again: it took its Python down.", exit_code=EXIT_FAILED)

    def salvage_output(self, target=None):
        """After a context loss: copy what the lost step printed from its driver copy (the driver's disk
        outlives a context) into its stdout file, through `target`. Returns one sentence for the answer."""
        if not self.active.get("wrapped"):
            return "What the step printed is lost (a cell magic is not teed)."
        try:
            written, size, _, _ = self.fetch_copy(DEFAULT_MAX_OUTPUT_BYTES, target)
        except Exception:
            size = -1
        if size < 0:
            write_atomic(self.files.stdout, b"")
            return "What the step printed before the loss is lost too (its driver copy is gone)."
        if size == 0:
            return "The step printed nothing before the loss."
        return f"What the step printed before the loss ({size} bytes) is in {self.project.show(self.files.stdout)}."

    # -- progress: read through the sidecar context ------------------------------------------------------
    def progress(self, budget=PROGRESS_READ_SECONDS):
        """What the running step has done so far, for `progress`: {"output_bytes", "output_tail",
        "spark_jobs", "read_seconds"}, or {"error": why} when it could not be read. Never raises an
        ordinary exception: a watch must not end the wait it watches."""
        started = time.monotonic()
        copy = driver_copy_path(self.session.get("session_id"), self.files.key)
        spark = bool(SPARK_NAMES.search(_read_text(self.files.command) or ""))
        error = None
        with self.ws.deadline_within(budget + WAIT_GRACE_SECONDS):
            for attempt in range(2):       # a sidecar evicted since its last use is replaced once
                sidecar = None
                try:
                    sidecar = self.sidecar()
                    if time.monotonic() >= started + budget:
                        raise ReplError("ProgressTimeout", f"the sidecar context was not ready within {budget:g}s")
                    found = self.ws.driver_call(sidecar, _dbx_repl_progress, copy, self.active.get("command_id"),
                                                PROGRESS_TAIL_LINES, PROGRESS_TAIL_BYTES, spark,
                                                about="reading the progress", failed="ProgressFailed")
                    if found.get("output_tail") is not None:
                        found["output_tail"] = preview(found["output_tail"], PROGRESS_TAIL_BYTES)
                    found["read_seconds"] = round(time.monotonic() - started, 3)
                    return {k: v for k, v in found.items() if v is not None}
                except ContextGone as err:
                    if sidecar:
                        self.forget_sidecar(sidecar.context_id)
                    error = f"the sidecar context is gone ({err})"
                except ReplError as err:
                    return {"error": f"{err.status}: {err.message}"[:300]}
                except (KeyboardInterrupt, Terminated):
                    raise
                except Exception as err:
                    error = map_sdk_error(err, action="read the step's progress").message
                    if sidecar and self.ws.gone_after(err, sidecar):
                        self.forget_sidecar(sidecar.context_id)     # evicted since its last read: replace it
                        continue
                    return {"error": error[:300]}
        return {"error": error[:300]}

    def sidecar(self):
        """The session's sidecar context (its Target), created (and recorded at once, so that a read
        cut short never leaves it untracked) on first use. Two calls racing may both create one: the
        later to record it destroys its own, so the session keeps one."""
        known = self.session.get("sidecar_context_id")
        if known:
            return Target.of(self.session, known)
        context_id = self.ws.create_context(self.session["cluster_id"])
        with signals_deferred(), self.project.lock():
            current = self.project.load()
            kept = current.get("sidecar_context_id") if current.get("status") == "active" else None
            if kept is None and current.get("status") == "active":
                current["sidecar_context_id"] = context_id
                self.project.save(current)
        if kept is not None or current.get("status") != "active":
            with contextlib.suppress(Exception):
                self.ws.destroy_context(Target.of(self.session, context_id))
            if kept is None:
                raise ReplError("SessionDestroyed", "The session ended while its progress was read.")
            context_id = kept
        self.session["sidecar_context_id"] = context_id
        sidecar = Target.of(self.session, context_id)
        state = self.ws.wait_for_context(sidecar)   # within the caller's deadline
        if state not in ("Running", "Pending"):
            raise ContextGone(f"the sidecar context did not start ({state})")
        return sidecar

    def forget_sidecar(self, context_id):
        with signals_deferred(), self.project.lock():
            current = self.project.load()
            if current.get("sidecar_context_id") == context_id:
                current.pop("sidecar_context_id")
                self.project.save(current)
        self.session.pop("sidecar_context_id", None)


# == 6. Analysis: what each step defines and uses, the replay plan, the export script ==============
# Pure functions of the step log and the steps' code: no workspace, no writes but the plan file.

RUNTIME_NAMES = frozenset({"spark", "sc", "sqlContext", "dbutils", "display", "displayHTML", "getArgument",
                           "sub_llm", "sub_llm_batch", "sub_llm_usage", "sub_llm_budget", "_dbx_repl"})
READ_ONLY_METHODS = frozenset({"show", "head", "tail", "describe", "count", "collect", "toPandas", "explain",
                               "printSchema", "info", "display", "summary", "take", "first", "keys", "items",
                               "values", "get", "copy", "format", "join", "split", "strip", "read"})
WRITE_CALLS = frozenset({"saveAsTable", "insertInto", "to_csv", "to_parquet", "to_json", "to_excel", "dump"})
SLOW_STEP_SECONDS = 60.0
BIG_OUTPUT_BYTES = 100_000


def _builtin_names():
    import builtins
    return frozenset(dir(builtins))


class _Names:
    """Names bound and read by one top-level statement, scope-aware for functions, lambdas, classes
    and comprehensions (their own locals are neither defined nor used at module level)."""

    def __init__(self):
        self.stored, self.loaded, self.calls = set(), set(), []

    def statement(self, node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.stored.add(node.name)
            for child in node.decorator_list + getattr(node, "bases", []) + getattr(node, "keywords", []):
                self.visit(child)
            if isinstance(node, ast.ClassDef):
                self.scope(node.body, ())
            else:
                self.visit(node.args)            # defaults and annotations read module names
                self.scope(node.body, _argument_names(node.args))
            return
        self.visit(node)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            func = node.value.func                # obj.method(...) as a statement: it changes obj,
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and \
                    func.attr not in READ_ONLY_METHODS and func.value.id not in RUNTIME_NAMES:
                self.stored.add(func.value.id)    # but spark.sql(...) leaves `spark` the runtime's

    def visit(self, node):
        if isinstance(node, ast.Name):
            (self.loaded if isinstance(node.ctx, ast.Load) else self.stored).add(node.id)
            return
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            self.loaded.add(node.target.id)       # x += 1 reads x first
        if isinstance(node, (ast.Attribute, ast.Subscript)) and not isinstance(node.ctx, ast.Load):
            base = node.value                     # d[k] = v, obj.attr = v: the object changes
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name):
                self.stored.add(base.id)
                self.loaded.add(base.id)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name != "*":
                    self.stored.add(alias.asname or alias.name.split(".")[0])
            return
        if isinstance(node, ast.Call):
            self.calls.append(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self.statement(node)                  # nested in a block (if/for/with) at module level
            return
        if isinstance(node, ast.Lambda):
            self.visit(node.args)
            self.scope([node.body], _argument_names(node.args))
            return
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = _Names()
            for child in ast.iter_child_nodes(node):
                inner.visit(child)
            self.loaded |= inner.loaded - inner.stored
            self.calls += inner.calls
            return
        for child in ast.iter_child_nodes(node):
            self.visit(child)

    def scope(self, body, arguments):
        """A function or class body: its free names are module-level uses; `global` names it binds
        count as defined."""
        inner = _Names()
        declared = set()
        for statement in body:
            for node in ast.walk(statement):
                if isinstance(node, ast.Global):
                    declared.update(node.names)
            inner.statement(statement)
        local = (inner.stored | set(arguments)) - declared
        self.loaded |= inner.loaded - local
        self.stored |= inner.stored & declared
        self.calls += inner.calls


def _argument_names(arguments):
    every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
    every += [a for a in (arguments.vararg, arguments.kwarg) if a]
    return [a.arg for a in every]


def _call_name(call):
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _string_argument(call):
    """The call's first argument when it is a string literal, else None."""
    first = call.args[0] if call.args else None
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _call_flags(call):
    """Cost and side-effect flags of one call."""
    name = _call_name(call)
    last = name.rsplit(".", 1)[-1]
    flags = set()
    if last == "sleep":
        flags.add("sleep")
    if last in ("sub_llm", "sub_llm_batch"):
        flags.add("sub_llm")
    if last in WRITE_CALLS or name.startswith("dbutils.fs."):   # `.write` itself: see analyse_code
        flags.add("writes")
    literal = _string_argument(call)
    if last == "sql" and literal is not None:
        flags |= analyse_sql(literal)["flags"]      # spark.sql("INSERT ...") writes
    if name == "open":
        mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"),
                                                            None)
        if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and \
                set(mode.value) & set("wax+"):
            flags.add("writes")
    return flags


SQL_CREATES = re.compile(r"\bCREATE\s+(?:OR\s+REPLACE\s+)?(?:GLOBAL\s+)?(?:TEMP(?:ORARY)?\s+)?"
                         r"(?:VIEW|TABLE)\s+(?:IF\s+NOT\s+EXISTS\s+)?([\w.`]+)", re.IGNORECASE)
SQL_READS = re.compile(r"\b(?:FROM|JOIN|TABLE)\s+(?:IF\s+(?:NOT\s+)?EXISTS\s+)?([\w.`]+)", re.IGNORECASE)
SQL_WRITES = re.compile(r"^\s*(?:INSERT|MERGE|UPDATE|DELETE|DROP|ALTER|TRUNCATE|CREATE\s+(?:OR\s+REPLACE\s+)?TABLE)\b",
                        re.IGNORECASE | re.MULTILINE)
TEMP_VIEW_CALLS = frozenset({"createOrReplaceTempView", "createTempView", "createOrReplaceGlobalTempView",
                             "createGlobalTempView", "saveAsTable"})


def sql_name(name):
    """The planner's name for a table or view: `sql:` and the lower-cased name without backquotes
    (SQL names and Python names never collide)."""
    return "sql:" + name.replace("`", "").lower()


def analyse_sql(text):
    """What a SQL statement does, for the planner (the shape of `analyse_code`): CREATE VIEW/TABLE x
    defines sql:x; FROM/JOIN x uses sql:x; DML and DDL on tables are flagged `writes`. Regular
    expressions, not a parser: names in string literals or comments may count too (a needed step
    is never left out for it; an extra one may be replayed)."""
    defines = {sql_name(n) for n in SQL_CREATES.findall(text)}
    uses = {sql_name(n) for n in SQL_READS.findall(text)} - defines
    flags = {"writes"} if SQL_WRITES.search(text) else set()
    return {"parsed": True, "defines": defines, "uses": uses, "flags": flags,
            "statements": [(1, max(len(text.splitlines()), 1), defines)]}


def _sql_names_of_call(call):
    """(defines, uses) of SQL names in one Python call: df.createOrReplaceTempView("v") defines
    sql:v, spark.table("v") uses it, and spark.sql("...") with a literal is read as SQL."""
    name = _call_name(call).rsplit(".", 1)[-1]
    literal = _string_argument(call)
    if literal is None:
        return set(), set()
    if name in TEMP_VIEW_CALLS:
        return {sql_name(literal)}, set()
    if name == "table":
        return set(), {sql_name(literal)}
    if name == "sql":
        found = analyse_sql(literal)
        return found["defines"], found["uses"]
    return set(), set()


def analyse_code(code):
    """What one step's code does, from its syntax tree (magic lines are set aside first). A SQL step
    (exec --sql) is read as SQL (`analyse_sql`).

    Returns {"parsed": bool, "defines": set, "uses": set, "flags": set, "statements":
    [(first_line, last_line, defined_names)]} for the top-level statements. `uses` holds the names
    read before the step binds them, builtins and runtime names excluded. Unparsable code has
    parsed False and no names."""
    sql = sql_of(code)
    if sql is not None:
        return analyse_sql(sql)
    flags = set()
    lines = code.splitlines()
    for index, line in enumerate(lines):
        if MAGIC_LINE.match(line):
            flags.add("pip" if re.match(r"\s*[%!]\s*pip\b", line) else "magic")
            lines[index] = ""                     # keep the line numbers of the Python around it
    found = {"parsed": False, "defines": set(), "uses": set(), "flags": flags, "statements": []}
    try:
        tree = ast.parse("\n".join(lines))
    except (SyntaxError, ValueError):
        return found
    ignored = _builtin_names() | RUNTIME_NAMES
    for node in tree.body:
        names = _Names()
        names.statement(node)
        found["uses"] |= (names.loaded - found["defines"]) - ignored
        found["defines"] |= names.stored
        for call in names.calls:
            flags |= _call_flags(call)
            sql_defines, sql_uses = _sql_names_of_call(call)
            found["uses"] |= sql_uses - found["defines"]
            found["defines"] |= sql_defines
            names.stored |= sql_defines
        if any(isinstance(n, ast.Attribute) and n.attr == "write" for n in ast.walk(node)):
            flags.add("writes")
        found["statements"].append((node.lineno, node.end_lineno, names.stored))
    found["parsed"] = True
    return found


def failing_line(project, entry):
    """The line of the step's own code where it failed (its <module> frame in the traceback), or None."""
    path = os.path.join(project.root, entry.get("stderr_file") or "")
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    key = re.escape(step_key(entry["step"], entry["tag"]))
    lines = re.findall(rf'File "<command-{key}>", line (\d+), in <module>', text)
    return int(lines[-1]) if lines else None


STATUS_RANK = {"Finished": 2, "Error": 1}


def step_timeline(project, session):
    """The session as it stands: one entry per original step (the best run of it: Finished over
    Error over the rest, the latest within a rank; a replay stands in for its original), in the
    original order, each with its code analysed and its cost flags.

    Each entry is the step record plus: origin, code, defines, uses, flags (sorted list), parsed,
    and for a failed step `partial_lines` (the statements before the failing line) when they define
    names."""
    by_origin = {}
    for entry in session["steps"]:
        origin = entry.get("replay_of") or entry["step"]
        best = by_origin.get(origin)
        if best is None or STATUS_RANK.get(entry.get("status"), 0) >= STATUS_RANK.get(best.get("status"), 0):
            by_origin[origin] = dict(entry, origin=origin)
    timeline = []
    for origin in sorted(by_origin):
        entry = by_origin[origin]
        try:
            with open(os.path.join(project.root, entry.get("command_file") or ""), encoding="utf-8") as f:
                entry["code"] = f.read()
        except OSError:
            entry["code"] = None
        found = analyse_code(entry["code"] or "")
        entry.update(parsed=found["parsed"] and entry["code"] is not None, uses=found["uses"], defines=set())
        flags = set(found["flags"])
        if (entry.get("elapsed_seconds") or 0) > SLOW_STEP_SECONDS:
            flags.add("slow")
        with contextlib.suppress(OSError, TypeError):
            if os.path.getsize(os.path.join(project.root, entry.get("stdout_file"))) > BIG_OUTPUT_BYTES:
                flags.add("big_output")
        entry["flags"] = sorted(flags)
        if entry.get("status") == "Finished":
            entry["defines"] = found["defines"]
        elif entry.get("status") == "Error" and found["parsed"]:
            line = failing_line(project, entry)
            done = [s for s in found["statements"] if line is not None and s[1] < line]
            defined = set().union(*(s[2] for s in done)) if done else set()
            if defined:
                entry["defines"], entry["partial_lines"] = defined, done[-1][1]
                entry["uses"] = analyse_code(replay_code(entry))["uses"]
        timeline.append(entry)
    return timeline


def needed_steps(timeline, uses, before):
    """The smallest set of timeline entries (by origin) whose definitions `uses` needs, looking only
    at steps before position `before`: for each name its nearest definer, then that step's own needs."""
    chosen, pending = {}, [(name, before) for name in uses]
    while pending:
        name, limit = pending.pop()
        definer = next((e for e in reversed(timeline) if e["origin"] < limit and name in e["defines"]), None)
        if definer is None or definer["origin"] in chosen:
            continue
        chosen[definer["origin"]] = definer
        pending += [(n, definer["origin"]) for n in definer["uses"]]
    return [chosen[o] for o in sorted(chosen)]


def dependency_plan(project, session, target=None):
    """The replay plan: the steps to re-run, in order, so that the next step can run.

    The next step is `target` (a step record, e.g. the one an eviction interrupted) or else the last
    recorded step when the eviction interrupted it. Without one, the plan restores every name the
    session defined. Steps that finished and cannot be parsed (their needs are unknown) or ran %pip
    (packages are not names) are always kept."""
    timeline = step_timeline(project, session)
    if target is None and session["steps"] and session["steps"][-1].get("status") in ("Evicted", "ContextLost"):
        target = session["steps"][-1]
    if target is not None:
        origin = target.get("replay_of") or target["step"]
        found = next((e for e in timeline if e["origin"] == origin), None)
        uses = found["uses"] if found else set()
    else:
        origin, uses = float("inf"), set().union(*(e["defines"] for e in timeline)) if timeline else set()
    steps = needed_steps(timeline, uses, origin)
    kept = [e for e in timeline if e["origin"] < origin and e.get("status") == "Finished"
            and (not e["parsed"] or "pip" in e["flags"])]
    chosen = {e["origin"]: e for e in steps + kept}
    return [chosen[o] for o in sorted(chosen)], target


MISSING_NAME = re.compile(r"name '([A-Za-z_][A-Za-z0-9_]*)' is not defined")
MISSING_RELATION = re.compile(r"(?:table or view|view|table) [`'\"]?([A-Za-z0-9_.`]+?)[`'\"]? (?:cannot be found|not found)"
                              r"|table or view not found: [`'\"]?([A-Za-z0-9_.`]+)", re.IGNORECASE)


def missing_name(error_type, message):
    """The planner's name of what a failed step could not find: a Python name (NameError) or a table
    or view (sql:name, from an AnalysisException such as TABLE_OR_VIEW_NOT_FOUND), else None."""
    found = MISSING_NAME.search(message or "") if error_type in ("NameError", "UnboundLocalError") else None
    if found:
        return found.group(1)
    found = MISSING_RELATION.search(message or "")
    return sql_name((found.group(1) or found.group(2)).rsplit(".", 1)[-1]) if found else None


def left_out_definer(project, session, name, before):
    """The step (a timeline entry) that defined `name` before step `before`, when it never ran in the
    session's current execution context: a step an eviction lost and no replay restored. None when
    the name is not the session's, or its definer ran in this context."""
    timeline = step_timeline(project, session)
    definer = next((e for e in reversed(timeline) if e["origin"] < before and name in e["defines"]), None)
    if definer is None:
        return None
    ran_here = any((s.get("replay_of") or s["step"]) == definer["origin"] and s.get("status") == "Finished"
                   and s.get("context_id") == session.get("context_id") for s in session["steps"])
    return None if ran_here else definer


def plan_rows(project, plan):
    """The full plan as JSON-ready rows (what the plan file holds)."""
    return [{"step": e["origin"], "tag": e["tag"], "status": e.get("status"),
             "runs_lines": f"1-{e['partial_lines']}" if "partial_lines" in e else None,
             "defines": sorted(e["defines"])[:50], "flags": e["flags"],
             "command_file": project.show(os.path.join(project.root, e.get("command_file") or ""))}
            for e in plan]


def plan_summary(project, plan, target=None):
    """A few hundred bytes about a replay plan; the full plan goes to repl_outputs/replay_plan.json."""
    project.ensure_outputs_dir()
    path = project.output_path(REPLAY_PLAN_FILE)
    rows = plan_rows(project, plan)
    write_atomic(path, json.dumps({"for_step": step_key(target["step"], target["tag"]) if target else None,
                                   "steps": [{k: v for k, v in r.items() if v is not None} for r in rows]},
                                  indent=1, ensure_ascii=False))
    flagged = {str(r["step"]): r["flags"] for r in rows if r["flags"]}
    summary = {"steps": _step_ranges([r["step"] for r in rows]), "count": len(rows),
               "partial": [r["step"] for r in rows if r["runs_lines"]] or None,
               "flagged": dict(list(flagged.items())[:8]) or None, "file": project.show(path)}
    return {k: v for k, v in summary.items() if v is not None}


def _step_ranges(numbers):
    """[1,2,3,5,6] → '1-3,5,6' (runs of three or more as ranges)."""
    runs = []
    for number in sorted(numbers):
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 2 else ",".join(map(str, r)) for r in runs)


def replay_code(entry):
    """The code a replay runs for a planned step: all of it, or the statements before its failure."""
    if "partial_lines" not in entry:
        return entry["code"]
    kept = entry["code"].splitlines()[:entry["partial_lines"]]
    return "\n".join(kept) + "\n"


def parse_step_list(text):
    """'1,2,5' or '3-7' (or a mix) → sorted step numbers."""
    steps = set()
    for part in (text or "").split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ReplError("InvalidSteps", f"--steps takes numbers like 1,2,5 or 3-7, not {part!r}.",
                            exit_code=EXIT_USAGE, hint="For example --steps 1,2,5")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        steps.update(range(low, high + 1))
    return sorted(steps)


EXPLORATION_FLAGS = ("sleep", "big_output")
SIDE_EFFECT_FLAGS = ("writes", "sub_llm")   # a step that changes the world outside its context, or costs


def export_selection(project, session, steps=None, exclude_tags=()):
    """(entries in script order, left_out) for `export`.

    By default: the last successful run of each tag (a replay stands in for its original), plus the
    earlier steps their names need (a failed step contributes the statements before its failure),
    minus exploration: a step that sleeps or printed a large output and defines nothing a kept step
    uses. `steps` chooses the steps instead; `exclude_tags` leaves tags out. Each left-out step comes
    with the reason."""
    timeline = step_timeline(project, session)
    by_origin = {e["origin"]: e for e in timeline}
    left_out = []
    if steps:
        missing = [n for n in steps if n not in by_origin]
        if missing:
            raise ReplError("UnknownStep", f"No recorded step {missing[0]} in this session.", exit_code=EXIT_USAGE,
                            hint="See the steps with tip.plan.", tip={"plan": f"{cli_hint('replay', project)} --plan --all"})
        chosen = {n: by_origin[n] for n in steps}
    else:
        last_per_tag = {}
        for entry in timeline:
            if entry.get("status") == "Finished":
                last_per_tag[entry["tag"]] = entry
        chosen = {e["origin"]: e for e in last_per_tag.values()}
        used_later = lambda e: any(e["defines"] & other["uses"] for other in chosen.values()
                                   if other["origin"] > e["origin"])
        for origin, entry in sorted(chosen.items()):
            flags = [f for f in entry["flags"] if f in EXPLORATION_FLAGS]
            if flags and not used_later(entry):
                left_out.append({"step": origin, "tag": entry["tag"], "why": "exploration: " + ", ".join(flags)})
        for row in left_out:
            chosen.pop(row["step"])
        for entry in list(chosen.values()):
            for needed in needed_steps(timeline, entry["uses"], entry["origin"]):
                chosen.setdefault(needed["origin"], needed)
        named = {row["step"] for row in left_out}
        left_out += [{"step": e["origin"], "tag": e["tag"], "why": f"status {e.get('status')}"} for e in timeline
                     if e["origin"] not in chosen and e["origin"] not in named and e.get("status") != "Finished"
                     and e["tag"] not in last_per_tag]   # a step that never ran to the end, and no later run did
    for origin, entry in sorted(chosen.items()):
        if entry["tag"] in exclude_tags:
            left_out.append({"step": origin, "tag": entry["tag"], "why": "--exclude-tags"})
            chosen.pop(origin)
        elif entry.get("status") != "Finished" and "partial_lines" not in entry:
            left_out.append({"step": origin, "tag": entry["tag"], "why": f"status {entry.get('status')}"})
            chosen.pop(origin)
    return dependency_order(list(chosen.values())), sorted(left_out, key=lambda r: r["step"])


def dependency_order(entries):
    """The entries in session order, except that each step comes after the step that defines each name
    it uses: the nearest earlier one, or, when no earlier chosen step defines it, the first later one
    (a stable topological sort; a cycle keeps the session's order)."""
    entries = sorted(entries, key=lambda e: e["origin"])
    after = {e["origin"]: set() for e in entries}
    for entry in entries:
        for name in entry["uses"]:
            definers = [d for d in entries if d is not entry and name in d["defines"]]
            earlier = [d for d in definers if d["origin"] < entry["origin"]]
            if earlier or definers:
                after[entry["origin"]].add((earlier[-1] if earlier else definers[0])["origin"])
    ordered, placed = [], set()
    while len(ordered) < len(entries):
        ready = [e for e in entries if e["origin"] not in placed and after[e["origin"]] <= placed]
        if not ready:                                   # a cycle: keep the session's order
            ready = [e for e in entries if e["origin"] not in placed]
        ordered.append(ready[0])
        placed.add(ready[0]["origin"])
    return ordered


def export_script(session, chosen):
    """One clean .py from the chosen timeline entries, in their order: %pip lines become a
    '# Requires:' header, other magics comments, and top-level imports gather at the top.

    Returns (script, requirements)."""
    requires, imports, bodies = [], [], []
    for entry in chosen:
        kept = []
        sql = sql_of(entry["code"] or "")
        code = replay_code(entry) if sql is None else f"display(spark.sql({sql!r}))\n"
        for line in code.splitlines():
            pip = re.match(r"\s*[%!]\s*pip\s+install\s+(.*)$", line)
            if pip:
                requires += [p for p in pip.group(1).split() if not p.startswith("-") and p not in requires]
            elif MAGIC_LINE.match(line):
                kept.append("# (magic, not run as Python) " + line.strip())
            else:
                kept.append(line)
        code = "\n".join(kept)
        try:
            tree = ast.parse(code)
        except SyntaxError:
            tree = None
        if tree is not None:
            lines = code.splitlines()
            import_lines = set()
            for node in tree.body:
                if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset == 0 and \
                        node.end_lineno == node.lineno and not (isinstance(node, ast.ImportFrom)
                                                                and node.module == "__future__"):
                    text = lines[node.lineno - 1].strip()
                    if ";" not in text:
                        import_lines.add(node.lineno - 1)
                        if text not in imports:
                            imports.append(text)
            code = "\n".join(l for i, l in enumerate(lines) if i not in import_lines)
        title = f"# --- Step {entry['origin']}: {entry['tag']} ---"
        if "partial_lines" in entry and entry.get("status") != "Finished":
            title += f"\n# (lines 1-{entry['partial_lines']}: the statements that ran before it failed)"
        bodies.append(f"{title}\n{code.strip()}\n")
    header = [f'"""Exported from databricks-repl session {session.get("session_name")!r} '
              f'(cluster {session.get("cluster_id")}).',
              "",
              f"Steps: {', '.join(str(e['origin']) for e in chosen) or 'none'} - the last successful run "
              "of each tag, ordered so that every name is defined before it is used.",
              '"""']
    body_text = "\n".join(bodies)
    runtime = [name for name in ("spark", "dbutils", "display") if re.search(rf"\b{name}\b", body_text)]
    helpers = sorted(set(re.findall(r"\bsub_llm(?:_batch|_usage|_budget)?\b", body_text)))
    if helpers:
        header.insert(-1, f"Uses the databricks-repl helpers {', '.join(helpers)}: run it in a session "
                          "(dbx_repl.py exec --command @this_file.py) or define them first.")
    if runtime:
        header.insert(-1, f"Needs the Databricks runtime for {', '.join(runtime)} (a notebook, job or session).")
    if requires:
        header.insert(0, "# Requires: " + " ".join(requires))
    parts = ["\n".join(header), "\n".join(imports)] if imports else ["\n".join(header)]
    return "\n\n".join(parts + bodies).rstrip("\n") + "\n", requires


# == 7. Subcommands ================================================================================
# One `cmd_*` per subcommand: it checks its input, loads the session, and hands over to the parts above.

def read_command(spec, option="--command"):
    """The code to run, from inline text, @file, or - (stdin)."""
    if spec == "-":
        data = sys.stdin.buffer.read()
        origin = "standard input"
    elif spec.startswith("@"):
        path = spec[1:]
        origin = path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except IsADirectoryError:
            raise ReplError("InvalidCommand", f"{path} is a directory, not a code file.",
                            exit_code=EXIT_USAGE, hint="Pass --command @path/to/file.py") from None
        except OSError as err:
            raise ReplError("InvalidCommand", f"Cannot read {path}: {err.strerror}.", exit_code=EXIT_USAGE,
                            hint="Check the path after @ (relative to the current directory).") from None
    else:
        return _require_code(spec, option)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ReplError("InvalidCommand", f"{origin} is not UTF-8 text ({err.reason} at byte {err.start}).",
                        exit_code=EXIT_USAGE, hint="Save the file as UTF-8.") from None
    return _require_code(text, origin)


def _require_code(text, origin):
    if "\x00" in text:
        raise ReplError("InvalidCommand", f"The command from {origin} contains a NUL byte.", exit_code=EXIT_USAGE,
                        hint="Pass Python source text.")
    if not text.strip():
        raise ReplError("InvalidCommand", f"The command from {origin} is empty.", exit_code=EXIT_USAGE,
                        hint="Pass Python code with --command, --command @file.py or --command -.")
    return text


def positive_timeout(value):
    if value is None or not (value > 0) or value != value or value == float("inf"):
        raise ReplError("InvalidTimeout", f"--timeout must be a positive number of seconds, not {value}.",
                        exit_code=EXIT_USAGE, hint="For example --timeout 600.")
    return value


# -- create ----------------------------------------------------------------------------------------

def cmd_create(args):
    project = Project(args.project_dir).check()
    cluster_id = (args.cluster_id or "").strip()
    if not cluster_id:
        raise ReplError("InvalidClusterId", "--cluster-id is empty (and DATABRICKS_CLUSTER_ID is not set).",
                        exit_code=EXIT_USAGE, hint="Resolve it with find_cluster.py --name NAME.")
    name = (args.session_name or "").strip()
    if not name:
        raise ReplError("InvalidSessionName", "--session-name is empty.", exit_code=EXIT_USAGE,
                        hint="Name the task, e.g. --session-name churn-analysis.")
    existing = project.load(required=False)
    if existing and existing.get("status") == "active":
        raise ReplError("SessionExists",
                        f"Session {existing.get('session_name')!r} is already active in {project.display_root}.",
                        hint="Reuse it with tip.exec, or destroy it first (tip.destroy) to start a new one.",
                        tip={"exec": cli_hint("exec", project) + EXEC_TIP, "destroy": cli_hint("destroy", project)},
                        session_name=existing.get("session_name"), context_id=existing.get("context_id"),
                        cluster_id=existing.get("cluster_id"))
    ws = Workspace(args.profile, args.debug)
    try:
        cluster = ws.cluster(cluster_id)
    except Exception as err:
        if error_kind(err) == NOT_FOUND:
            raise ReplError("ClusterNotFound", f"No cluster with id {cluster_id}.",
                            hint="Resolve the id with find_cluster.py --name NAME.", cluster_id=cluster_id) from None
        raise map_sdk_error(err, action="look up the cluster") from None
    if not is_all_purpose(cluster):
        raise ReplError("ClusterNotSupported",
                        f"Cluster {cluster_id} is a {cluster['cluster_source']} cluster; execution contexts "
                        "need a classic all-purpose cluster.",
                        hint="Pick an all-purpose cluster (find_cluster.py shows all_purpose: true).",
                        cluster_id=cluster_id)
    if cluster.get("state") not in RUNNABLE_CLUSTER_STATES:
        if not args.start_cluster:
            raise cluster_not_running(cluster_id, cluster, start=create_again_hint(args))
        cluster = start_and_wait(ws, cluster_id, cluster, positive_timeout(args.timeout), create_again_hint(args))
    session = {
        "format": SESSION_FORMAT, "status": "active", "session_name": name,
        "session_id": hashlib.sha256(os.urandom(16)).hexdigest()[:16],
        "cluster_id": cluster_id, "cluster_name": cluster.get("cluster_name"), "context_id": None,
        "profile": args.profile, "host": ws.host,
        "llm_endpoint": args.llm_endpoint or os.environ.get(ENV_LLM_ENDPOINT) or DEFAULT_LLM_ENDPOINT,
        "llm_max_calls": args.llm_max_calls, "llm_max_tokens": args.llm_max_tokens,
        "created_at": now_iso(), "step_counter": 0, "steps": [], "active_command": None,
    }
    try:
        session["context_id"] = start_context(ws, project, session)
        if existing and re.fullmatch(r"[0-9a-f]+", str(existing.get("session_id") or "")):
            with ws.deadline_within(30.0):
                remove_driver_copies(ws, Target.of(session), existing["session_id"])  # the replaced session's
    except ContextGone as err:
        raise ReplError("ContextFailed", f"The new execution context disappeared: {err}",
                        hint="Retry create.") from None
    except Exception as err:
        raise map_sdk_error(err, action="start an execution context") from None
    with project.lock():
        previous = project.load(required=False)
        if previous and previous.get("status") == "active":  # a concurrent create won the race
            with contextlib.suppress(Exception):
                ws.destroy_context(Target.of(session))
            raise ReplError("SessionExists", f"Another session became active in {project.display_root}.",
                            hint="Reuse it with exec.")
        project.ensure_outputs_dir()
        if previous and previous.get("possible_orphans"):
            session["possible_orphans"] = previous["possible_orphans"]
        if previous and previous.get("status") != "creating":
            archive = os.path.join(project.outputs_dir, ARCHIVE_DIR)
            os.makedirs(archive, mode=0o700, exist_ok=True)
            stamp = re.sub(r"[^0-9]", "", previous.get("created_at") or now_iso())[:14]
            write_atomic(os.path.join(archive, f"session-{stamp}-{previous.get('session_id', 'old')}.json"),
                         json.dumps(previous, indent=2, ensure_ascii=False))
            session["step_counter"] = previous.get("step_counter", 0)
        session["step_counter"] = max(session["step_counter"], project.highest_step_on_disk())
        session["contexts"] = [{"context_id": session["context_id"], "created_at": session["created_at"]}]
        project.save(session)
    orphans = session.get("possible_orphans")
    return response("Created", f"Session {name!r} is ready on cluster {cluster.get('cluster_name') or cluster_id}."
                    + (f" Note: {len(orphans)} earlier create(s) in this project dir were interrupted and may have "
                       "left a context running (see possible_orphans in session.json; the API cannot list "
                       "contexts, so such a context is freed when the cluster restarts)." if orphans else ""),
                    session_name=name, possible_orphans=len(orphans) if orphans else None, cluster_id=cluster_id, cluster_name=cluster.get("cluster_name"),
                    context_id=session["context_id"], session_file=project.show(project.session_path),
                    llm_endpoint=session["llm_endpoint"],
                    tip={"exec": cli_hint("exec", project) + EXEC_TIP},
                    hint="Run code with tip.exec: a short --tag names the step's files.")


# -- exec, await, cancel ---------------------------------------------------------------------------

def cmd_exec(args):
    tag = sanitize_tag(args.tag)
    timeout = positive_timeout(args.timeout)
    code = read_command(args.command) if args.sql is None else sql_step_code(read_command(args.sql, "--sql"))
    project = Project(args.project_dir).check()
    session = require_active(project, project.load())
    ws = Workspace(args.profile or session.get("profile"), args.debug)
    earlier = StepRun.settle_earlier(ws, project, session)
    if earlier is not None and earlier["status"] not in ("Finished", "Error", "Cancelled"):
        return earlier      # the context was lost under it (or another ending to act on first): say that alone
    body = StepRun.reserve(ws, project, code, tag).bound(timeout, args.max_output_bytes).run()
    if earlier is not None:
        body["earlier_step"] = {k: earlier.get(k) for k in ("cmd_id", "status", "stdout_file", "error") if earlier.get(k)}
        body["message"] = (f"Step {earlier['cmd_id']} had ended ({earlier['status']}) and was collected first. "
                           + body["message"])
    return body


def cmd_await(args):
    timeout = positive_timeout(args.timeout)
    project = Project(args.project_dir).check()
    session = require_active(project, project.load())
    active = session.get("active_command")
    if not active:
        raise ReplError("NothingToAwait", "No command is running in this session.",
                        hint="The last command already finished or was cancelled; see its files in repl_outputs/.")
    if not active.get("command_id"):
        settle_unsubmitted(project, active)
    ws = Workspace(args.profile or session.get("profile"), args.debug)
    run = StepRun(ws, project, session, active).bound(timeout, args.max_output_bytes, since=PROCESS_STARTED)
    try:
        return run.wait(follow=args.follow)
    except StatusUnavailable as unavailable:   # the helpers' re-install could not be confirmed
        return run.status_unknown(unavailable)


def settle_unsubmitted(project, active):
    """A step whose CLI died while submitting has no command id: record it and free the session."""
    record_step(project, step_entry(project, active, "SubmitUncertain"))
    raise ReplError("SubmitUncertain", "The CLI stopped while submitting this step, so its command id is "
                    "unknown; the step is recorded as SubmitUncertain. If the service received it, it may still "
                    "be running: the context runs one command at a time, so the next exec waits behind it.",
                    hint="Check the step's effect with a small exec; exec the step again if its effect is missing.",
                    cmd_id=step_key(active["step"], active["tag"]))


def cmd_cancel(args):
    project = Project(args.project_dir).check()
    session = require_active(project, project.load())
    active = session.get("active_command")
    if active and not active.get("command_id") and not args.run_id:
        settle_unsubmitted(project, active)
    command_id = args.run_id or (active or {}).get("command_id")
    if not command_id:
        raise ReplError("NothingToCancel", "No command is running in this session.",
                        hint="Nothing to do: the last command already finished or was cancelled.")
    ws = Workspace(args.profile or session.get("profile"), args.debug)
    if active and active.get("command_id") == command_id:
        return StepRun(ws, project, session, active).cancel()
    return cancel_untracked(ws, project, session, command_id)


def cancel_untracked(ws, project, session, command_id):
    """cancel --run-id of a command that is not the session's active step."""
    try:
        status = ws.cancel_and_wait(Target.of(session), command_id)
    except ContextGone:
        return recover_context(ws, project)
    except StatusUnavailable as unavailable:
        raise map_sdk_error(unavailable.error, action="confirm the cancel") from None
    except Exception as err:
        raise map_sdk_error(err, action="cancel the command") from None
    if status is None:  # still stopping
        return response("Cancelling", CANCELLING_MESSAGE,
                        tip={"await": cli_hint("await", project), "status": cli_hint("status", project)},
                        hint="It may still stop (or end on its own): tip.await collects its ending.",
                        exit_code=EXIT_FAILED, command_id=command_id)
    if not is_cancellation(status.get("status"), status.get("results")):
        return response("NothingToCancel", f"Command {command_id} had already finished.",
                        command_id=command_id, hint="Nothing to do.")
    return response("Cancelled", "The command was cancelled; the session is still usable.",
                    hint="Continue with exec.", command_id=command_id)


# -- destroy ---------------------------------------------------------------------------------------

def cmd_destroy(args):
    """End the session: mark it destroyed (settling a running step as Cancelled), then destroy its context.

    The session is marked first, so that an exec waiting on the context sees a destroyed session and
    never starts a new context for it. If the context cannot be destroyed (no network, a rejected
    token), the session still ends and the answer says the context may live on, with its id."""
    project = Project(args.project_dir).check()
    session = project.load()
    if session.get("status") == "destroyed":
        return response("Destroyed", "The session was already destroyed.", session_name=session.get("session_name"))
    require_active(project, session)
    ws = Workspace(args.profile or session.get("profile"), args.debug)
    if not session.get("active_command"):  # a busy context would queue the removal behind the step
        with ws.deadline_within(3.0):   # best effort: an unreachable host must not eat destroy's budget
            remove_driver_copies(ws, Target.of(session))
    with signals_deferred(), project.lock():
        session = project.load()
        active = session.get("active_command")
        if active:
            entry = step_entry(project, active, "Cancelled", elapsed=elapsed_since(active))
            touch_step_files(project, entry)
            session["steps"].append(entry)
            session["active_command"] = None
        session["status"] = "destroyed"
        session["destroyed_at"] = now_iso()
        project.save(session)
    context_destroyed = True
    if session.get("sidecar_context_id"):   # best effort: it holds no state, the cluster reclaims it
        with ws.deadline_within(3.0), contextlib.suppress(Exception):
            ws.destroy_context(Target.of(session, session["sidecar_context_id"]))
    try:
        ws.destroy_context(Target.of(session))
        note = "The execution context was destroyed."
    except Exception as err:
        if ws.gone_after(err, Target.of(session)):
            note = "The execution context was already gone."
        else:
            context_destroyed = False
            note = (f"The execution context {session['context_id']} could not be destroyed "
                    f"({map_sdk_error(err, action='destroy it').message}); it stays alive until the cluster "
                    "restarts or reclaims idle contexts.")
    return response("Destroyed", f"Session {session.get('session_name')!r} destroyed. {note}",
                    session_name=session.get("session_name"), context_id=session.get("context_id"),
                    context_destroyed=context_destroyed, steps=len(session["steps"]),
                    tip={"create": create_tip(project, session.get("cluster_id"))},
                    hint="Its steps stay in session.json and repl_outputs/; tip.create starts a new session.")


# -- status ----------------------------------------------------------------------------------------

def cmd_status(args):
    """The session at a glance, with a live probe of the cluster, the context and the active command."""
    project = Project(args.project_dir).check()
    session = project.load()
    if session.get("status") == "creating":
        require_active(project, session)   # a placeholder of an interrupted create: NoSession
    steps = session["steps"]
    last = steps[-1] if steps else None
    active = session.get("active_command")
    summary = {
        "session_name": session.get("session_name"),
        "session_status": session.get("status"),
        "cluster_id": session.get("cluster_id"),
        "cluster_name": session.get("cluster_name"),
        "context_id": session.get("context_id"),
        "created_at": session.get("created_at"),
        "steps": len(steps),
        "steps_by_status": _count_by(s.get("status") for s in steps),
        "last_step": {"cmd_id": step_key(last["step"], last["tag"]), "status": last.get("status"),
                      "finished_at": last.get("finished_at")} if last else None,
        "active_command": {"cmd_id": step_key(active["step"], active["tag"]),
                           "command_id": active.get("command_id"),
                           "elapsed_seconds": round(elapsed_since(active), 1)} if active else None,
    }
    if session.get("status") != "active":
        return response("Destroyed", f"Session {session.get('session_name')!r} was destroyed; no live probe.",
                        tip={"create": create_tip(project, session.get("cluster_id"))},
                        hint="Start a new session with tip.create.", **summary)
    ws = Workspace(args.profile or session.get("profile"), args.debug)
    try:
        cluster = ws.cluster(session["cluster_id"])
        summary["cluster_state"] = cluster.get("state")
        alive = summary["cluster_state"] in RUNNABLE_CLUSTER_STATES and ws.context_alive(Target.of(session))
        summary["context_alive"] = alive
        if active and active.get("command_id") and alive:
            try:
                remote = ws.command_status(Target.of(session), active["command_id"])
                summary["active_command"]["remote_status"] = remote.get("status")
            except Exception as err:   # report it: a failing status call must not hide the session
                summary["active_command"]["remote_error"] = map_sdk_error(err, "read the command's status").message
    except Exception as err:
        raise map_sdk_error(err, action="probe the session") from None
    if summary["cluster_state"] not in RUNNABLE_CLUSTER_STATES:
        return response("ClusterNotRunning", f"Cluster {session['cluster_id']} is {summary['cluster_state']}; "
                        "the session's context is gone with it.", exit_code=EXIT_FAILED,
                        tip={"status": cli_hint("status", project)},
                        hint="Ask the user to start the cluster (Databricks UI, or `databricks clusters start "
                             "ID`); once tip.status shows it RUNNING, exec creates a fresh context and lists "
                             "the steps to replay.", **summary)
    if not summary["context_alive"]:
        plan, target = dependency_plan(project, session)
        return response("ContextLost", "The execution context is gone (evicted or restarted); variables "
                        "are lost.", exit_code=EXIT_FAILED, replay_plan=plan_summary(project, plan, target),
                        tip={"replay": cli_hint("replay", project), "plan": f"{cli_hint('replay', project)} --plan"},
                        hint="replay starts a fresh context and re-runs the plan (the steps that define what "
                             "the session needs; see references/eviction-replay.md).", **summary)
    if active:
        remote = summary["active_command"].get("remote_status")
        if remote in DONE_COMMAND_STATES:
            return response("Busy", f"Step {summary['active_command']['cmd_id']} has ended ({remote}) but its "
                            "output is not collected yet.", hint="Collect it with tip.await.",
                            tip={"await": cli_hint("await", project)},
                            **summary)
        progress = StepRun(ws, project, session, active).progress() if active.get("command_id") else None
        return response("Busy", f"Step {summary['active_command']['cmd_id']} is running.",
                        tip={"await": cli_hint("await", project), "cancel": cli_hint("cancel", project)},
                        hint="Use await to wait for it (--follow streams its progress) or cancel to stop it.",
                        progress=progress, **summary)
    return response("Active", f"Session {session.get('session_name')!r} is alive with {len(steps)} step(s).",
                    tip={"exec": cli_hint("exec", project) + EXEC_TIP}, hint="Run the next step with tip.exec.",
                    **summary)


def _count_by(values):
    counts = {}
    for value in values:
        counts[value] = counts.get(value, 0) + 1
    return counts


# -- put / get: files between this machine and the driver ------------------------------------------

def idle_session(project, args):
    session = require_active(project, project.load())
    if session.get("active_command"):
        busy = session["active_command"]
        raise ReplError("CommandRunning", f"Step {step_key(busy['step'], busy['tag'])} is still running.",
                        hint="Transfers run in the same context: await or cancel the command first.")
    return session, Workspace(args.profile or session.get("profile"), args.debug)


def record_transfer(project, entry):
    with project.lock():
        session = project.load()
        session.setdefault("transfers", []).append(entry)
        project.save(session)


def cmd_put(args):
    project = Project(args.project_dir).check()
    remote_path = driver_path(args.remote)
    try:
        size = os.path.getsize(args.local)
        if os.path.isdir(args.local):
            raise IsADirectoryError()
    except OSError as err:
        raise ReplError("InvalidPath", f"Cannot read {args.local}: {err.strerror or 'is a directory'}.",
                        exit_code=EXIT_USAGE, hint="Name a readable local file.") from None
    if size > args.max_bytes:
        raise ReplError("TooLarge", f"{args.local} is {size} bytes, over the {args.max_bytes}-byte cap.",
                        hint="Raise --max-bytes, or move large data through a Volume.")
    session, ws = idle_session(project, args)
    target, started = Target.of(session), time.monotonic()
    try:
        with open(args.local, "rb") as f:
            digest, chunks, remote_path = ws.put_file(target, remote_path, iter(lambda: f.read(PUT_CHUNK_BYTES), b""),
                                                      os.path.basename(args.local))
        remote = ws.driver_call(target, "stat", remote_path, about=f"{remote_path} on the driver")
    except ReplError:
        raise
    except Exception as err:
        raise map_sdk_error(err, action="upload the file") from None
    if remote["sha256"] != digest.hexdigest() or remote["size"] != size:
        raise ReplError("ChecksumMismatch", f"{remote_path} on the driver does not match {args.local}.",
                        hint="Retry the put.", local_sha256=digest.hexdigest(), remote_sha256=remote["sha256"])
    record_transfer(project, {"direction": "put", "local": args.local, "remote": remote["source"], "bytes": size,
                              "sha256": remote["sha256"], "at": now_iso()})
    return response("Uploaded", f"Copied {size} bytes to {remote['source']} on the driver.", local=args.local,
                    remote=remote["source"], bytes=size, sha256=remote["sha256"], chunks=chunks,
                    elapsed_seconds=round(time.monotonic() - started, 3),
                    hint="Open it from your code on the cluster by that path.")


def cmd_get(args):
    project = Project(args.project_dir).check()
    remote_path = driver_path(args.remote)
    local = explicit_path(args.local, posixpath.basename(remote_path) or "download")
    session, ws = idle_session(project, args)
    target, started = Target.of(session), time.monotonic()
    try:
        remote = ws.driver_call(target, "stat", remote_path, True, about=f"{remote_path} on the driver")
        if remote["size"] > args.max_bytes:
            raise ReplError("TooLarge", f"{remote_path} is {remote['size']} bytes, over the {args.max_bytes}-byte "
                            "cap.", hint="Raise --max-bytes, or write a smaller extract on the cluster.")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".get-", dir=os.path.dirname(local))
        try:
            with os.fdopen(fd, "wb") as f:
                sink = _Digesting(f)
                # `source` is the file itself, or a copy with the secret values it holds redacted
                written, size, _ = ws.fetch_file(target, sink, args.max_bytes, "fetch", remote["source"])
            if size != remote["size"] or written != size or sink.digest.hexdigest() != remote["sha256"]:
                raise ReplError("ChecksumMismatch", f"The copy of {remote_path} does not match the driver's file "
                                "(it may have changed during the transfer).", hint="Retry the get.")
            os.replace(tmp, local)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    except ReplError:
        raise
    except Exception as err:
        raise map_sdk_error(err, action="download the file") from None
    record_transfer(project, {"direction": "get", "local": project.stored(local), "remote": remote_path,
                              "bytes": remote["size"], "sha256": remote["sha256"], "at": now_iso()})
    redacted = remote.get("redacted") or 0
    return response("Downloaded", f"Copied {remote['size']} bytes from {remote_path} on the driver."
                    + (f" {redacted} secret value(s) read in this session were redacted in the copy." if redacted
                       else ""),
                    local=project.show(local), remote=remote_path, bytes=remote["size"],
                    sha256=remote["sha256"], redacted=redacted or None,
                    elapsed_seconds=round(time.monotonic() - started, 3), hint="Read the local file selectively.")


# -- sync: a local folder mirrored on the driver and importable in the context ---------------------

# `sync DIR` mirrors a local package (or a folder of modules) to <driver dir>/sync/<name>, sending only
# files whose sha256 differs from the manifest of the last sync (kept in session.json under "syncs"),
# as one tar.gz; the driver removes files no longer present, checks every file's hash, puts the
# package's parent (a folder's own path) first on sys.path, and reloads the changed modules. `replay`
# syncs every recorded folder again before it re-runs steps, so a new context can import them.
SYNC_ALWAYS_SKIPPED = (".git/", "__pycache__/", "*.pyc", ".DS_Store")


def gitignore_rules(root):
    """The rules of ROOT/.gitignore as (negated, directory_only, anchored, pattern), in order, after
    the rules every sync applies (SYNC_ALWAYS_SKIPPED). A documented subset of git's syntax: blank
    lines and # comments are skipped; `!` re-includes; a trailing `/` matches directories only; a
    pattern with another `/` is matched (fnmatch) against the path from ROOT, any other against each
    name at any depth. Nested .gitignore files are not read."""
    lines = list(SYNC_ALWAYS_SKIPPED)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(os.path.join(root, ".gitignore"), encoding="utf-8") as f:
            lines += f.read().splitlines()
    rules = []
    for line in lines:
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line[1:] if negated else line
        directory_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        if line:
            rules.append((negated, directory_only, anchored, line.lstrip("/")))
    return rules


def ignored(rules, relative, is_dir):
    """Whether the path (from the synced folder, with `/`) is ignored: the last matching rule decides."""
    import fnmatch
    verdict = False
    for negated, directory_only, anchored, pattern in rules:
        if directory_only and not is_dir:
            continue
        subject = relative if anchored else relative.rsplit("/", 1)[-1]
        if fnmatch.fnmatchcase(subject, pattern):
            verdict = not negated
    return verdict


def local_tree(root, max_bytes):
    """{relative path: (sha256, size)} of the files to sync under ROOT (an ignored directory hides
    everything in it). Raises TooLarge past max_bytes in total, before anything is sent."""
    rules, found, total = gitignore_rules(root), {}, 0
    for folder, dirs, names in os.walk(root):
        base = os.path.relpath(folder, root).replace(os.sep, "/")
        base = "" if base == "." else base + "/"
        dirs[:] = sorted(d for d in dirs if not ignored(rules, base + d, True)
                         and not os.path.islink(os.path.join(folder, d)))
        for name in sorted(names):
            relative = base + name
            path = os.path.join(folder, name)
            if ignored(rules, relative, False) or not os.path.isfile(path):
                continue
            with open(path, "rb") as f:
                data = f.read()
            total += len(data)
            if total > max_bytes:
                raise ReplError("TooLarge", f"{root} holds more than {max_bytes} bytes to sync.",
                                hint="Ignore data and build folders in its .gitignore, or raise --max-bytes.")
            found[relative] = (hashlib.sha256(data).hexdigest(), len(data))
    return found


def sync_folder(ws, session, mirror, max_bytes):
    """Mirror a local folder to the driver: `mirror` is {"name", "local", "remote"} (remote: the driver
    folder, None for the session's own). Sends what changed since the session's record of the name's
    last sync (if any). Returns the new record for session.json and what changed: (record, sent,
    reloaded, removed). Raises ReplError (InvalidPath, TooLarge, RemoteFileError, TransferFailed)."""
    import tarfile
    name, local = mirror["name"], mirror["local"]
    previous = (session.get("syncs") or {}).get(name)
    if not os.path.isdir(local):
        raise ReplError("InvalidPath", f"{local} is not a folder.", exit_code=EXIT_USAGE,
                        hint="Name a local package or folder of modules.")
    tree = local_tree(local, max_bytes)
    target = Target.of(session)
    remote = mirror.get("remote") or f"{DRIVER_OUTPUT_DIR}/dbx_repl_{session['session_id']}/sync/{name}"
    if previous and previous.get("remote") != remote:
        previous = None                 # another place on the driver: everything is sent
    path_entry = remote.rsplit("/", 1)[0] if "__init__.py" in tree else remote
    manifest = {relative: digest for relative, (digest, _) in tree.items()}
    known = (previous or {}).get("files") or {}
    changed = sorted(r for r in manifest if known.get(r) != manifest[r])
    sent = []
    for attempt in range(2):    # the second pass resends what the driver lost (a restarted cluster)
        archive = None
        if changed:
            packed = io.BytesIO()
            with tarfile.open(fileobj=packed, mode="w:gz", compresslevel=6) as tar:
                for relative in changed:
                    tar.add(os.path.join(local, relative), arcname=relative, recursive=False)
            archive = f"{remote}.upload.tar.gz"
            data = packed.getvalue()
            ws.put_file(target, archive, (data[i:i + PUT_CHUNK_BYTES] for i in range(0, len(data), PUT_CHUNK_BYTES)))
            sent += [c for c in changed if c not in sent]
        applied = ws.driver_call(target, "sync_apply", remote, archive, manifest, changed, path_entry,
                                 about="Applying the sync on the driver")
        if not applied["missing"]:
            break
        changed = sorted(applied["missing"])
    else:
        raise ReplError("TransferFailed", f"{len(applied['missing'])} file(s) did not arrive whole on the driver.",
                        hint="Retry the sync.", missing=applied["missing"][:10])
    record = {"local": local, "remote": remote, "root": applied.get("root", remote),
              "path": applied.get("path", path_entry), "files": manifest, "max_bytes": max_bytes,
              "bytes": sum(size for _, size in tree.values()), "synced_at": now_iso()}
    return record, sent, applied["reloaded"] + applied["dropped"], applied["removed"]


def sync_name(local):
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(os.path.normpath(local)))
    if not name.strip("._"):
        raise ReplError("InvalidPath", f"{local} has no usable folder name.", exit_code=EXIT_USAGE,
                        hint="Name the package's folder, e.g. sync src/mypkg.")
    return name


def record_sync(project, name, record):
    with signals_deferred(), project.lock():
        session = project.load()
        session.setdefault("syncs", {})[name] = record
        project.save(session)


def cmd_sync(args):
    project = Project(args.project_dir).check()
    local = os.path.abspath(args.dir)
    name = sync_name(local)
    if args.max_bytes <= 0:
        raise ReplError("UsageError", "--max-bytes must be positive.", exit_code=EXIT_USAGE,
                        hint=f"Leave it out for the default ({DEFAULT_SYNC_CAP} bytes).")
    if not os.path.isdir(local):
        raise ReplError("InvalidPath", f"{args.dir} is not a folder.", exit_code=EXIT_USAGE,
                        hint="Name a local package or folder of modules.")
    remote = driver_path(args.to) if args.to else None
    local_tree(local, args.max_bytes)       # too large: refused before the session is touched
    session, ws = idle_session(project, args)
    started = time.monotonic()
    try:
        record, sent, reloaded, removed = sync_folder(ws, session, {"name": name, "local": local, "remote": remote},
                                                      args.max_bytes)
    except ReplError:
        raise
    except Exception as err:
        raise map_sdk_error(err, action="sync the folder") from None
    record_sync(project, name, record)
    importable = name if record["path"] != record["root"] else "its modules"
    return response("Synced", f"{local} is on the driver at {record['root']}: {len(sent)} of "
                    f"{len(record['files'])} file(s) sent, {removed} removed.",
                    name=name, remote=record["root"], sys_path=record["path"], files=len(record["files"]),
                    bytes=record["bytes"], sent=sent[:20], sent_count=len(sent), removed=removed,
                    reloaded=reloaded[:20], elapsed_seconds=round(time.monotonic() - started, 3),
                    hint=f"Import {importable} in your steps; sync again after editing (only changes are sent, "
                         "changed modules are reloaded).")


def restore_syncs(ws, project, session):
    """After a new context: sync every recorded folder again (changed files are sent, the path is
    set). Returns ([names restored], [{name, error}] for those that could not be)."""
    restored, failed = [], []
    for name, previous in sorted((session.get("syncs") or {}).items()):
        try:
            record, _, _, _ = sync_folder(ws, session, dict(previous, name=name),
                                          previous.get("max_bytes") or DEFAULT_SYNC_CAP)
        except ReplError as err:
            failed.append({"name": name, "error": f"{err.status}: {err.message}"[:200]})
            continue
        record_sync(project, name, record)
        restored.append(name)
    return restored, failed


# -- replay ----------------------------------------------------------------------------------------

def chosen_replay(project, session, args):
    """(entries, target) to replay: the chosen steps (--steps, --from/--to, --all run each chosen
    step's whole code), or by default the dependency plan (see dependency_plan)."""
    timeline = step_timeline(project, session)
    by_origin = {e["origin"]: e for e in timeline}
    explicit = args.steps or args.from_step is not None or args.to_step is not None or args.all
    if not explicit:
        return dependency_plan(project, session)
    for entry in timeline:
        entry.pop("partial_lines", None)      # a step named by the caller runs whole
    if args.steps:
        numbers = parse_step_list(args.steps)
        missing = [n for n in numbers if n not in by_origin]
        if missing:
            raise ReplError("UnknownStep", f"No recorded step {missing[0]} in this session.",
                            exit_code=EXIT_USAGE, hint="See the step numbers with tip.plan.",
                            tip={"plan": f"{cli_hint('replay', project)} --plan --all"})
        return [by_origin[n] for n in numbers], None
    chosen = [e for e in timeline if (args.from_step is None or e["origin"] >= args.from_step)
              and (args.to_step is None or e["origin"] <= args.to_step)]
    if args.all or args.skip_failed:
        chosen = [e for e in chosen if e.get("status") == "Finished"]
    return chosen, None


def cmd_replay(args):
    timeout = positive_timeout(args.timeout)
    project = Project(args.project_dir).check()
    session = require_active(project, project.load())
    plan, target = chosen_replay(project, session, args)
    if args.plan:
        return response("ReplayPlan", f"The plan re-runs {len(plan)} step(s); nothing was run.",
                        for_step=step_key(target["step"], target["tag"]) if target else None,
                        replay_plan=plan_summary(project, plan, target),
                        tip={"replay": cli_hint("replay", project)},
                        hint="Run the tip to replay this plan, or choose steps with --steps. Flagged steps "
                             "are costly or have side effects (see references/eviction-replay.md).")
    if not plan and not session.get("syncs"):
        return response("NothingToReplay", "No recorded step matches.",
                        hint="Nothing defines what the next step needs; exec it again, or pick steps with --steps.")
    ws = Workspace(args.profile or session.get("profile"), args.debug)
    if not ws.context_alive(Target.of(session)):
        evicted = recover_context(ws, project)
        if evicted["status"] != "ContextEvicted":
            return evicted
    synced, sync_failed = restore_syncs(ws, project, project.load())
    syncs = {"synced": synced or None, "sync_failed": sync_failed or None}
    restored = []
    for index, entry in enumerate(plan):
        if entry["code"] is None:
            failure = {"step": entry["origin"], "status": "MissingCommandFile",
                       "message": f"{entry.get('command_file')} is unreadable."}
            return _replay_report(project, restored, failure, plan[index + 1:], syncs)
        run = StepRun.reserve(ws, project, replay_code(entry), sanitize_tag(entry["tag"]), replay_of=entry["origin"])
        body = run.bound(timeout, args.max_output_bytes).run()
        if body["status"] != "Finished":
            failure = {"step": entry["origin"], "cmd_id": body.get("cmd_id"), "status": body["status"],
                       "message": body.get("message"), "error": body.get("error")}
            return _replay_report(project, restored, failure, plan[index + 1:], syncs)
        done = {"step": entry["origin"], "tag": entry["tag"], "cmd_id": body["cmd_id"]}
        if "partial_lines" in entry:
            done["lines"] = f"1-{entry['partial_lines']}"
        restored.append(done)
    return _replay_report(project, restored, None, [], syncs)


def _replay_report(project, restored, failure, not_run, syncs):
    """Replayed / ReplayFailed; `syncs` = {"synced": names, "sync_failed": [{name, error}]} (or Nones)."""
    fields = {"restored": restored, "failed": failure, "not_run": [e["origin"] for e in not_run], **syncs}
    if failure is None:
        return response("Replayed", f"Re-ran {len(restored)} step(s) in the current context.",
                        tip={"exec": cli_hint("exec", project) + EXEC_TIP},
                        hint="State is restored; continue with tip.exec.", **fields)
    return response("ReplayFailed", f"Replay stopped at step {failure['step']} ({failure['status']}).",
                    exit_code=EXIT_RUNNING if failure["status"] == "Running" else EXIT_FAILED,
                    tip={"replay": f"{cli_hint('replay', project)} --steps <steps>"},
                    hint="Read the failed step's files, fix the cause, then replay the remaining steps "
                         "(not_run) with tip.replay.", **fields)


# -- export ----------------------------------------------------------------------------------------

DRIVER_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def driver_path(text):
    """The driver path a remote path means, as users type it: `dbfs:/x` is `/dbfs/x`; `/Volumes/...`,
    `/Workspace/...`, `/dbfs/...` and other absolute paths are themselves; a relative path is relative
    to the driver's working directory. Refused with InvalidPath: another scheme (s3://, abfss://,
    file:), a backslash, and a `..` that climbs out of where the path starts (its first folder, or the
    working directory). Returns the path normalised (no `.`, `..` or doubled `/`)."""
    def refuse(why):
        return ReplError("InvalidPath", f"{text!r} is not a driver path: {why}.", exit_code=EXIT_USAGE,
                         hint="Use /Volumes/<catalog>/<schema>/<volume>/..., /Workspace/..., dbfs:/... (/dbfs/...), "
                              "or a path relative to the driver's working directory.")
    if not text or not text.strip() or "\x00" in text:
        raise refuse("it is empty")
    if "\\" in text:
        raise refuse("driver paths use /, not backslashes")
    scheme = DRIVER_SCHEME.match(text)
    path = text
    if scheme:
        if scheme.group(1).lower() != "dbfs":
            raise refuse(f"{scheme.group(1)}: is not a scheme of driver files (read such storage with Spark, or "
                         "through a Volume)")
        rest = text[scheme.end():]
        if not rest.startswith("/"):
            raise refuse("write a DBFS path as dbfs:/<path>")
        path = "/dbfs/" + rest.lstrip("/")
    normal = posixpath.normpath(path)
    if path.startswith("/"):
        first = "/" + path.lstrip("/").split("/")[0]
        if normal != first and not normal.startswith(first.rstrip("/") + "/"):
            raise refuse(f"its .. climbs out of {first}")
        return "/" + normal.lstrip("/")
    if normal == ".." or normal.startswith("../"):
        raise refuse("its .. climbs out of the driver's working directory")
    return normal


def explicit_path(path, default_name):
    """A path the caller named, honoured as `cp` would: relative to the working directory, anywhere;
    an existing directory receives `default_name`."""
    absolute = os.path.abspath(path)
    if os.path.isdir(absolute):
        absolute = os.path.join(absolute, default_name)
        if os.path.isdir(absolute):
            raise ReplError("InvalidPath", f"{absolute} is a directory.", exit_code=EXIT_USAGE, hint="Name a file.")
    return absolute


def export_name(session):
    """The session's name as the export's file names use it."""
    return sanitize_tag(session.get("session_name") or "session")


def verify_script(ws, project, session, exported, timeout):
    """Run the exported script (`exported`: export_script's (script, requirements)) in a fresh
    execution context (created, used once, destroyed), within `timeout` seconds of running; its output
    goes to <name>_export.verify.txt. Returns {"status": Passed|Failed|TimedOut, ...} for the answer."""
    script, requires = exported
    output_path = project.output_path(f"{export_name(session)}_export.verify.txt")
    started = time.monotonic()
    target = Target.of(session, start_context(ws, project, session))
    try:
        commands = ([f"%pip install {' '.join(requires)}"] if requires else []) + [script]
        for command in commands:
            remaining = timeout - (time.monotonic() - started)
            command_id = ws.execute(target, command)
            status = ws.wait_command(target, command_id, max(remaining, 0.01))
            if status is None:
                with contextlib.suppress(Exception):
                    ws.cancel(target, command_id)
                return {"status": "TimedOut", "message": f"The script did not finish within {timeout:g}s.",
                        "elapsed_seconds": round(time.monotonic() - started, 3)}
            results = valid_unicode(status.get("results") or {})
            text = results.get("data") if isinstance(results.get("data"), str) else json.dumps(results.get("data"))
            if results.get("resultType") == "error" or status.get("status") == "Error":
                error_type, message = parse_error(results.get("summary"), results.get("cause"))
                write_atomic(output_path, strip_ansi(results.get("cause") or results.get("summary") or ""))
                return {"status": "Failed", "error": {"type": printable(error_type)[:200],
                                                      "message": printable(message)[:300]},
                        "output_file": project.show(output_path),
                        "elapsed_seconds": round(time.monotonic() - started, 3)}
        write_atomic(output_path, strip_ansi(text or ""))
        return {"status": "Passed", "output_file": project.show(output_path),
                "stdout_preview": preview(strip_ansi(text or ""), limit=200),
                "elapsed_seconds": round(time.monotonic() - started, 3)}
    finally:
        abandon_context(ws, project, target)   # and drops its pending record


def cmd_export(args):
    project = Project(args.project_dir).check()
    session = project.load()
    timeout = positive_timeout(args.timeout) if args.verify else None
    if args.verify:
        require_active(project, session)         # before writing anything: --verify needs the cluster
    default_name = f"{export_name(session)}_export.py"
    target = explicit_path(args.output, default_name) if args.output else os.path.join(project.root, default_name)
    exclude = {t.strip() for t in (args.exclude_tags or "").split(",") if t.strip()}
    chosen, left_out = export_selection(project, session, parse_step_list(args.steps) if args.steps else None,
                                        exclude)
    missing = [e["origin"] for e in chosen if e["code"] is None]
    if missing:
        raise ReplError("MissingCommandFile", f"The command file of step {missing[0]} is unreadable.",
                        hint="Restore repl_outputs/ or leave the step out with --steps.")
    script, requires = export_script(session, chosen)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    write_atomic(target, script)
    effects = [{"step": e["origin"], "tag": e["tag"], "flags": [f for f in e["flags"] if f in SIDE_EFFECT_FLAGS]}
               for e in chosen if set(e["flags"]) & set(SIDE_EFFECT_FLAGS)]
    fields = {"output_file": project.show(target), "steps": [e["origin"] for e in chosen],
              "left_out": left_out or None, "bytes": len(script.encode("utf-8")), "side_effects": effects or None}
    if not args.verify:
        return response("Exported", f"Wrote {len(chosen)} step(s) to {project.show(target)}.", **fields,
                        tip=export_tips(project, args, effects),
                        hint="Review the script, or check that it runs in a fresh context with tip.verify"
                             + (" (it runs the side_effects steps again: writes and sub_llm calls; "
                                "tip.verify_without_side_effects leaves them out)." if effects else "."))
    skipped = [row["step"] for row in effects] if args.skip_side_effects else []
    if skipped:
        script, requires = export_script(session, [e for e in chosen if e["origin"] not in skipped])
    ws = Workspace(args.profile or session.get("profile"), args.debug)
    try:
        fields["verify"] = verify_script(ws, project, session, (script, requires), timeout)
    except ReplError:
        raise
    except Exception as err:
        raise map_sdk_error(err, action="verify the script in a fresh context") from None
    if skipped:
        fields["verify"]["skipped_steps"] = skipped
    ran = [row["step"] for row in effects if row["step"] not in skipped]
    effects_note = (f" The verify ran step(s) {', '.join(map(str, ran))} again, which write files or tables or "
                    "call sub_llm (side_effects)." if ran else
                    f" It ran without step(s) {', '.join(map(str, skipped))} (side_effects)." if skipped else "")
    if fields["verify"]["status"] == "Passed":
        return response("Exported", f"Wrote {len(chosen)} step(s) to {project.show(target)}; it ran top to "
                        "bottom in a fresh context." + effects_note, **fields, hint="The script is ready to commit.")
    return response("VerifyFailed", f"Wrote {project.show(target)}, but it did not run in a fresh context "
                    f"({fields['verify']['status']})." + effects_note, exit_code=EXIT_FAILED, **fields,
                    hint="Read verify.output_file; fix the session (exec the missing step) and export again, "
                         "or choose steps with --steps" + (" (a skipped step may define what a later one needs)."
                                                           if skipped else "."))


def export_tips(project, args, effects):
    """The export command lines that verify the script: as this call chose its steps, with --verify,
    and, when steps have side effects, with --skip-side-effects too."""
    line = cli_hint("export", project)
    for flag, value in (("--output", args.output), ("--steps", args.steps), ("--exclude-tags", args.exclude_tags)):
        if value:
            line += f" {flag} {shlex.quote(value)}"
    tips = {"verify": f"{line} --verify"}
    if effects:
        tips["verify_without_side_effects"] = f"{line} --verify --skip-side-effects"
    return tips


# -- find-cluster ----------------------------------------------------------------------------------

def cluster_summary(cluster):
    source = cluster.get("cluster_source")
    return {
        "cluster_id": cluster.get("cluster_id"),
        "cluster_name": cluster.get("cluster_name"),
        "state": cluster.get("state"),
        "state_message": cluster.get("state_message") or None,
        "startable": cluster.get("state") in STARTABLE_CLUSTER_STATES and is_all_purpose(cluster),
        "all_purpose": is_all_purpose(cluster),
        "cluster_source": source,
        "access_mode": cluster.get("data_security_mode"),
        "single_user_name": cluster.get("single_user_name"),
        "spark_version": cluster.get("spark_version"),
    }


def find_clusters(clusters, name):
    """Clusters whose name contains `name` (case-insensitive): exact matches first, then by name."""
    needle = name.casefold()
    matches = [c for c in clusters if needle in (c.get("cluster_name") or "").casefold()]
    return sorted(matches, key=lambda c: ((c.get("cluster_name") or "").casefold() != needle,
                                          c.get("state") != "RUNNING", c.get("cluster_name") or ""))


def cmd_find_cluster(args):
    name = (args.name or "").strip()
    if args.cluster_id is not None and args.name is None:
        return find_cluster_by_id(args, args.cluster_id.strip())
    if not name and args.name is None and env_cluster_id():
        return find_cluster_by_id(args, env_cluster_id())
    if not name:
        raise ReplError("InvalidName", "--name is empty.", exit_code=EXIT_USAGE,
                        hint="Pass part of the cluster's name, e.g. --name analytics (or set "
                             "DATABRICKS_CLUSTER_ID to a cluster id).")
    ws = Workspace(args.profile, args.debug)
    try:
        clusters = ws.clusters()
    except Exception as err:
        raise map_sdk_error(err, action="list clusters") from None
    matches = [cluster_summary(c) for c in find_clusters(clusters, name)]
    if not matches:
        raise ReplError("ClusterNotFound", f"No cluster name contains {name!r}.",
                        hint="Try a shorter part of the name.",
                        available=sorted(c.get("cluster_name") or "" for c in clusters)[:50])
    if len(matches) == 1:
        return response("Found", f"Cluster {matches[0]['cluster_name']!r} is {matches[0]['state']}.",
                        **matches[0], **cluster_next(matches[0]))
    return response("Ambiguous", f"{len(matches)} clusters match {name!r}; ask the user which one.",
                    matches=matches, hint="Pick one cluster_id (an all_purpose, RUNNING one can host a session).")


def find_cluster_by_id(args, cluster_id):
    """find-cluster without --name: the cluster DATABRICKS_CLUSTER_ID names, by id."""
    ws = Workspace(args.profile, args.debug)
    try:
        found = cluster_summary(ws.cluster(cluster_id))
    except Exception as err:
        if error_kind(err) == NOT_FOUND:
            raise ReplError("ClusterNotFound", f"No cluster with id {cluster_id}"
                            f"{'' if args.cluster_id else ' (from DATABRICKS_CLUSTER_ID)'}.",
                            hint="Fix DATABRICKS_CLUSTER_ID, or search by name with --name.",
                            cluster_id=cluster_id) from None
        raise map_sdk_error(err, action="look up the cluster") from None
    source = "" if args.cluster_id else " (DATABRICKS_CLUSTER_ID)"
    return response("Found", f"Cluster {found['cluster_name']!r}{source} is {found['state']}.",
                    **found, **cluster_next(found))


def cluster_next(cluster):
    """What to do with a cluster find-cluster found: the answer's hint and tip fields."""
    cluster_id = cluster["cluster_id"]
    if not cluster["all_purpose"]:
        return {"hint": "This is not an all-purpose cluster; execution contexts need one."}
    if cluster["startable"]:
        return {"hint": "The cluster is not running. Ask the user whether to start it (it costs money, 3-8 "
                        "minutes); with their consent run tip.start.",
                "tip": {"start": f"{create_tip(cluster_id=cluster_id)} --start-cluster --timeout 600"}}
    if cluster["state"] not in RUNNABLE_CLUSTER_STATES:
        return {"hint": "The cluster is not running: ask the user to start it; tip.find shows its state.",
                "tip": {"find": f"{cli_hint('find-cluster')} --cluster-id {shlex.quote(cluster_id)}"}}
    return {"hint": "Create a session with tip.create.", "tip": {"create": create_tip(cluster_id=cluster_id)}}


# -- smoke -----------------------------------------------------------------------------------------

SMOKE_COMMAND = "print(sum(range(10)) * 6 // 5 - 12)"      # prints 42
SMOKE_LLM_COMMAND = "print(sub_llm('Reply with the word ok.', max_tokens=16))"


def cmd_smoke(args):
    """Create a session in a temporary dir, run a known command (and a sub_llm call), destroy it."""
    phases, started = [], time.monotonic()

    def phase(name, action):
        began = time.monotonic()
        try:
            detail = action()
            phases.append({"phase": name, "status": "Passed", "seconds": round(time.monotonic() - began, 3),
                           **({"detail": detail} if detail else {})})
            return True
        except ReplError as err:
            phases.append({"phase": name, "status": "Failed", "seconds": round(time.monotonic() - began, 3),
                           "error": err.status, "message": err.message})
        except Exception as err:
            mapped = map_sdk_error(err) if _SDK.loaded else ReplError("UnexpectedError", str(err))
            phases.append({"phase": name, "status": "Failed", "seconds": round(time.monotonic() - began, 3),
                           "error": mapped.status, "message": mapped.message})
        return False

    state = {}

    def connect():
        state["ws"] = Workspace(args.profile, args.debug)
        return state["ws"].host

    def resolve():
        ws = state["ws"]
        # DATABRICKS_CLUSTER_ID (or cluster_id in the profile) is an id, as the SDK reads it.
        cluster_id = args.cluster_id or (None if args.cluster_name else ws.config.cluster_id)
        if cluster_id:
            try:
                cluster = ws.cluster(cluster_id)
            except Exception as err:
                if error_kind(err) == NOT_FOUND:
                    raise ReplError("ClusterNotFound", f"No cluster with id {cluster_id}.") from None
                raise
        else:
            name = args.cluster_name
            if not name:
                raise ReplError("UsageError", "Pass --cluster-id or --cluster-name (or set DATABRICKS_CLUSTER_ID, "
                                              "or cluster_id in the profile).")
            found = [c for c in find_clusters(ws.clusters(), name) if is_all_purpose(c)]
            if not found:
                raise ReplError("ClusterNotFound", f"No all-purpose cluster name contains {name!r}.")
            cluster = found[0]
        if cluster.get("state") not in RUNNABLE_CLUSTER_STATES:
            raise cluster_not_running(cluster["cluster_id"], cluster)
        state["cluster_id"] = cluster["cluster_id"]
        return f"{cluster.get('cluster_name')} ({cluster['cluster_id']}) {cluster.get('state')}"

    def run_subcommand(subcommand, *options):
        """A subcommand on the smoke's project dir, parsed and run as its command line would be."""
        common = ["--project-dir", state["dir"], *(["--profile", args.profile] if args.profile else []),
                  *(["--debug"] if args.debug else [])]
        parsed = parse_command_line([subcommand, *common, *options])
        return parsed.handler(parsed)

    def create():
        endpoint = ["--llm-endpoint", args.llm_endpoint] if args.llm_endpoint else []
        body = run_subcommand("create", "--cluster-id", state["cluster_id"], "--session-name", "dbx-repl-smoke",
                              "--llm-max-calls", "5", *endpoint)
        state["created"] = True
        return body["context_id"]

    def run_check(command, tag, check):
        def action():
            body = run_subcommand("exec", "--command", command, "--tag", tag, "--timeout", repr(args.timeout))
            if body["status"] != "Finished":
                raise ReplError(body["status"], body.get("message", ""))
            text = body.get("stdout_preview", "").strip()
            if not check(text):
                raise ReplError("UnexpectedOutput", f"Got {text[:200]!r}.")
            return text[:200]
        return action

    def destroy():
        return run_subcommand("destroy")["status"]

    with tempfile.TemporaryDirectory(prefix="dbx-repl-smoke-") as directory:
        state["dir"] = directory
        ok = phase("auth", connect) and phase("cluster", resolve) and phase("create", create)
        ok = ok and phase("exec", run_check(SMOKE_COMMAND, "smoke", lambda t: t == "42"))
        if ok and args.llm_endpoint:
            ok = phase("sub_llm", run_check(SMOKE_LLM_COMMAND, "smoke_llm",
                                            lambda t: bool(t) and not t.startswith("[ERROR]")))
        if state.get("created"):
            ok = phase("destroy", destroy) and ok
    failed = next((p for p in phases if p["status"] == "Failed"), None)
    fields = {"phases": phases, "elapsed_seconds": round(time.monotonic() - started, 3)}
    if failed is None:
        return response("Passed", f"Smoke test passed: {', '.join(p['phase'] for p in phases)}.",
                        hint="The workspace, cluster and REPL work end to end.", **fields)
    return response("Failed", f"Smoke test failed in phase {failed['phase']}: {failed['message']}",
                    failed_phase=failed["phase"], exit_code=EXIT_FAILED,
                    hint="Fix what the failed phase names, then rerun smoke.", **fields)


# == 8. The parser and the entry point =============================================================
# `main` parses the command line (`parse_command_line`: usage errors are answers too), runs the
# subcommand, and emits its answer. `smoke` runs its steps through the same parser and dispatch.

class JsonArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as the one JSON response instead of text on stderr."""

    def error(self, message):
        raise ReplError("UsageError", f"{self.prog}: {message}", exit_code=EXIT_USAGE,
                        hint="See the options with tip.help.",
                        tip={"help": f"{self.prog} --help"})   # prog: the program as invoked, the subcommand

    def exit(self, status=0, message=None):
        if status:
            raise ReplError("UsageError", (message or "").strip() or "invalid arguments", exit_code=EXIT_USAGE)
        sys.exit(status)


def profile_name(text):
    """--profile: an empty value means no profile, as in the SDK (`--profile ""` from a template)."""
    return text.strip() or None


def env_cluster_id():
    """DATABRICKS_CLUSTER_ID, the SDK's variable for a cluster id (Config.cluster_id), or None."""
    return (os.environ.get("DATABRICKS_CLUSTER_ID") or "").strip() or None


def add_profile(parser):
    parser.add_argument("--profile", type=profile_name, default=None,
                        help="Profile in ~/.databrickscfg; empty or absent: the SDK's default auth")
    parser.add_argument("--debug", action="store_true", help="Print SDK debug information to stderr")


def add_common(parser):
    parser.add_argument("--project-dir", default=".", help="Directory holding session.json and repl_outputs/")
    add_profile(parser)


def add_wait_options(parser):
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"Seconds to wait before answering Running (the command keeps running; default "
                             f"{DEFAULT_TIMEOUT:g})")
    parser.add_argument("--max-output-bytes", type=int, default=DEFAULT_MAX_OUTPUT_BYTES,
                        help="Cap on the output fetched into the stdout file")


def build_parser():
    parser = JsonArgumentParser(prog=Invocation.program, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=VERSION)
    sub = parser.add_subparsers(dest="subcommand", parser_class=JsonArgumentParser)

    p = sub.add_parser("create", help="Create a session: an execution context with the helpers installed")
    add_common(p)
    p.add_argument("--cluster-id", default=env_cluster_id(), help="Default: $DATABRICKS_CLUSTER_ID")
    p.add_argument("--session-name", required=True)
    p.add_argument("--llm-endpoint", default=None, help=f"Default sub_llm endpoint (env {ENV_LLM_ENDPOINT})")
    p.add_argument("--llm-max-calls", type=int, default=None, help="Budget: sub_llm calls in this session")
    p.add_argument("--llm-max-tokens", type=int, default=None, help="Budget: sub_llm tokens in this session")
    p.add_argument("--start-cluster", action="store_true",
                   help="Start the cluster if it is TERMINATED (only with the user's consent) and wait for it")
    p.add_argument("--timeout", type=float, default=None,
                   help="With --start-cluster: seconds to wait for RUNNING before answering ClusterStarting")
    p.set_defaults(handler=cmd_create)

    p = sub.add_parser("exec", help="Run code as the next step and wait for it")
    add_common(p)
    code = p.add_mutually_exclusive_group(required=True)
    code.add_argument("--command", default=None, help="Python code, @file.py, or - for stdin")
    code.add_argument("--sql", default=None, help="Instead of --command: SQL, @file.sql, or - for stdin; runs as "
                                               "spark.sql in the same context, the result goes to a table file")
    p.add_argument("--tag", required=True, help="Label of the step (used in file names)")
    add_wait_options(p)
    p.set_defaults(handler=cmd_exec)

    p = sub.add_parser("await", help="Keep waiting for the running command")
    add_common(p)
    add_wait_options(p)
    p.add_argument("--follow", action="store_true", help="Stream the step's progress (output tail, Spark tasks) "
                                                         "to stderr while waiting")
    p.set_defaults(handler=cmd_await)

    p = sub.add_parser("cancel", help="Cancel the running command")
    add_common(p)
    p.add_argument("--run-id", default=None, help="Command id to cancel (default: the active command)")
    p.set_defaults(handler=cmd_cancel)

    p = sub.add_parser("destroy", help="Destroy the execution context; keep the step log")
    add_common(p)
    p.set_defaults(handler=cmd_destroy)

    p = sub.add_parser("status", help="Summarise the session and probe its cluster, context and command")
    add_common(p)
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("replay", help="Re-run recorded steps in the current context (after an eviction)")
    add_common(p)
    p.add_argument("--steps", default=None, help="Step numbers, e.g. 1,2,5 or 3-7")
    p.add_argument("--from", dest="from_step", type=int, default=None, help="First step of a range")
    p.add_argument("--to", dest="to_step", type=int, default=None, help="Last step of a range")
    p.add_argument("--skip-failed", action="store_true", help="Leave out steps that did not finish")
    p.add_argument("--all", action="store_true", help="Every step that finished, instead of the dependency plan")
    p.add_argument("--plan", action="store_true", help="Show the plan (written to repl_outputs/replay_plan.json) "
                                                       "without running it")
    add_wait_options(p)
    p.set_defaults(handler=cmd_replay)

    p = sub.add_parser("export", help="Write the session as one clean Python script")
    add_common(p)
    p.add_argument("--output", default=None, help="Script path (relative to the working directory; default "
                                                   "<session>_export.py in the project dir)")
    p.add_argument("--steps", default=None, help="Export these steps (e.g. 1,2,5 or 3-7) instead of the default")
    p.add_argument("--exclude-tags", default=None, help="Leave out steps with these tags (comma-separated)")
    p.add_argument("--verify", action="store_true", help="Run the script in a fresh execution context and "
                                                         "report the result")
    p.add_argument("--timeout", type=float, default=None, help="With --verify: seconds the run may take")
    p.add_argument("--skip-side-effects", action="store_true",
                   help="With --verify: run the script without the steps that write files or tables or call "
                        "sub_llm (the written script keeps them)")
    p.set_defaults(handler=cmd_export)

    for name, handler, positionals, purpose in (
            ("put", cmd_put, ("local", "remote"), "Copy a local file to the driver"),
            ("get", cmd_get, ("remote", "local"), "Copy a driver file to a local path (as cp would)")):
        p = sub.add_parser(name, help=purpose)
        add_common(p)
        for positional in positionals:
            p.add_argument(positional)
        p.add_argument("--max-bytes", type=int, default=DEFAULT_TRANSFER_CAP, help="Size cap of the file")
        p.set_defaults(handler=handler)

    p = sub.add_parser("sync", help="Mirror a local package or folder to the driver and make it importable")
    add_common(p)
    p.add_argument("dir", help="The local folder (a package with __init__.py, or a folder of modules)")
    p.add_argument("--to", default=None, help="The driver folder to mirror it to (/Volumes/..., /Workspace/..., "
                                              "dbfs:/..., or relative); default: the session's own folder")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_SYNC_CAP, help="Size cap of the folder's files")
    p.set_defaults(handler=cmd_sync)

    p = sub.add_parser("smoke", help="End-to-end check: create, exec, (sub_llm), destroy in a temp dir")
    add_profile(p)
    p.add_argument("--cluster-id", default=None, help="Default: $DATABRICKS_CLUSTER_ID")
    p.add_argument("--cluster-name", default=None)
    p.add_argument("--llm-endpoint", default=None)
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(handler=cmd_smoke)

    p = sub.add_parser("find-cluster", help="Find clusters whose name contains a string")
    add_profile(p)
    p.add_argument("--name", default=None, help="Part of the cluster's name (default: the cluster "
                                                "$DATABRICKS_CLUSTER_ID names)")
    p.add_argument("--cluster-id", default=None, help="A cluster's id: its state and whether it can host a session")
    p.set_defaults(handler=cmd_find_cluster)
    return parser


def parse_command_line(argv):
    """The arguments of a command line (without the program), checked: a subcommand with its handler
    (`args.handler(args)` runs it) and a positive --max-output-bytes. A usage error is a ReplError."""
    args = build_parser().parse_args(argv)
    if not getattr(args, "handler", None):
        raise ReplError("UsageError", "No subcommand given.", exit_code=EXIT_USAGE,
                        hint="See the subcommands with tip.help.", tip={"help": f"{Invocation.program} --help"})
    if getattr(args, "max_output_bytes", 1) <= 0:
        raise ReplError("UsageError", "--max-output-bytes must be positive.", exit_code=EXIT_USAGE,
                        hint=f"Leave it out for the default ({DEFAULT_MAX_OUTPUT_BYTES} bytes).")
    if getattr(args, "timeout", 0) is None:   # not given: the default, and tips use TIP_TIMEOUT
        args.timeout = DEFAULT_TIMEOUT
    elif args.subcommand in WAITING_SUBCOMMANDS:
        Invocation.timeout = args.timeout
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    os.umask(os.umask(0o077) | 0o077)  # session and output files: owner only, or stricter
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        Project.current = None
        Invocation.program, Invocation.timeout = invoked_program(sys.argv[0]), None
        args = parse_command_line(argv)
        Invocation.profile = getattr(args, "profile", None)
        body = args.handler(args)
    except ReplError as err:
        body = err.response()
    except KeyboardInterrupt:
        body = response("Interrupted", "Interrupted before any command was submitted or cancelled.",
                        exit_code=EXIT_INTERRUPTED)
    except Terminated:
        body = response("Terminated", "Stopped by SIGTERM before any command was submitted or cancelled.",
                        exit_code=EXIT_FAILED)
    except Exception as err:  # the agent never gets a traceback unless it asks for one
        if debug:
            import traceback
            traceback.print_exc(file=sys.stderr)
        body = map_sdk_error(err).response() if _SDK.loaded else response(
            "UnexpectedError", f"{type(err).__name__}: {scrub(str(err))}",
            hint="Rerun with --debug for the traceback.", exit_code=EXIT_FAILED)
    return emit(body)


def _console_main():
    sys.exit(main())


# == 9. The code that runs on the driver ===========================================================
# Everything from this banner to the entry point's last lines runs in the execution context, not here:
# `driver_source()` sends this text, and `create` installs it with `driver_install(config, globals())`.
# It imports only the standard library (above the classes, so the section stands alone), defines
# nothing in the user's namespace but `_dbx_repl` and the public helpers sub_llm, sub_llm_batch,
# sub_llm_usage and sub_llm_budget, and wraps `display` (plots become PNGs on the driver) and
# `dbutils` (secret values are remembered, to be redacted; notebook.exit values are recorded).
#
# What a step prints has ONE source of truth: the step's driver copy, NNN_tag.out. File descriptors 1
# and 2 of the REPL's Python become one pipe, and sys.stdout and sys.stderr one stream object; both
# reach the current file through one lock, redacted, the pipe drained before every write so that
# print(), logging, threads, subprocesses and forked children land in the order they wrote. A step's
# start and end switch the file under the same lock, so each file holds exactly what was written
# between them. Between steps, output goes to the previous step's NNN_tag.late file, which the next
# step's record names. A finished step's record carries the copy's size and sha256, and a small copy
# travels inline in the command's own result, so the CLI either shows that its file is the driver
# copy, byte for byte, or says it could not.

import base64  # noqa: E402, F811 - the section stands alone when sent: it imports what it uses
import codecs  # noqa: E402, F811
import hashlib  # noqa: E402, F811
import json  # noqa: E402, F811
import os  # noqa: E402, F811
import random  # noqa: E402, F811
import sys  # noqa: E402, F811
import threading  # noqa: E402, F811
import time  # noqa: E402, F811
import zlib  # noqa: E402, F811

DRIVER_REDACTED = "[REDACTED]"
DRIVER_FRAME, DRIVER_FRAME_END = "\x1edbx-repl ", "\x1edbx-repl-end"       # around a step's result text
DRIVER_INLINE_BYTES = 32_000         # a copy up to this size travels in the result (the service keeps 50,000 chars)
DRIVER_FIRST_GAP = "000_bootstrap"   # the gap before the first step: its late output's name


class DriverRedactor:
    """The secret values this context read through dbutils.secrets, replaced by [REDACTED] in text,
    as the service redacts them. A value is known in the forms printing gives it: as is, escaped inside
    a repr or a JSON string, and bytes as text. A value the code transforms (base64, reversed, a slice)
    is not recognised, exactly as on Databricks."""

    def __init__(self):
        self.forms = []              # longest first, so a value containing another goes whole

    def add(self, value):
        forms = set()
        if isinstance(value, (bytes, bytearray)):
            value = bytes(value)
            forms.add(repr(value)[2:-1])
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = None
        if isinstance(value, str) and value.strip():
            forms.update((value, repr(value)[1:-1], json.dumps(value)[1:-1],
                          json.dumps(value, ensure_ascii=False)[1:-1]))
        forms.discard("")
        forms.discard(DRIVER_REDACTED)
        self.forms = sorted(set(self.forms) | forms, key=len, reverse=True)

    def redact(self, text):
        for form in self.forms:
            if form in text:
                text = text.replace(form, DRIVER_REDACTED)
        return text

    def stream(self, held, text):
        """(ready, held) for a stream: `held + text` redacted, less the end that could still be the
        start of a secret, which waits for the next write."""
        text = self.redact(held + text)
        keep = self.open_end(text) if self.forms else 0
        return text[:len(text) - keep], text[len(text) - keep:]

    def open_end(self, text):
        """How many characters at the end of `text` could be the start of a secret: a stream keeps
        them back until the next write shows whether the secret follows."""
        longest = 0
        for form in self.forms:
            start = max(len(text) - len(form) + 1, 0)
            at = text.find(form[0], start)
            while at >= 0:
                if len(text) - at > longest and form.startswith(text[at:]):
                    longest = len(text) - at
                    break
                at = text.find(form[0], at + 1)
        return longest


class DriverFile(object):
    """One file the output thread writes: its size and sha256 are known when it closes."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        self.size, self.digest = 0, hashlib.sha256()

    def write(self, data):
        view = memoryview(data)
        while view:
            done = os.write(self.fd, view)
            view = view[done:]
        self.size += len(data)
        self.digest.update(data)

    def close(self):
        os.close(self.fd)
        return {"bytes": self.size, "sha256": self.digest.hexdigest()}


class DriverOutput(object):
    """The context's output: one pipe in place of fds 1 and 2 (`fds`) and one current file.

    Everything reaches the file through `lock`, redacted: text written to sys.stdout/sys.stderr
    directly (so a line printed before a crash is on disk), and what subprocesses and forked children
    write to fds 1 and 2, drained from the pipe before every write of ours and by a thread when
    nothing else writes. Draining first keeps the order in which things were written: a
    subprocess's output waits in the pipe until the next write from Python, which drains it before
    its own text. `switch` drains, closes the current file (its size and sha256) and opens the next,
    so each file holds exactly what was written between two switches."""

    def __init__(self, redactor, fds=(1, 2)):
        self.redactor = redactor
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        self.saved = {}
        for fd in fds:
            try:
                self.saved[fd] = os.dup(fd)
                os.dup2(self.write_fd, fd)
            except OSError:     # not open in this process: nothing to capture there
                self.saved.pop(fd, None)
        self.lock = threading.Lock()
        self.file, self.held = None, {"text": "", "fds": ""}   # per source: an end that may begin a secret
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.child, self.closed = False, False
        self.thread = threading.Thread(target=self.watch, name="dbx-repl-output", daemon=True)
        self.thread.start()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self.after_fork)

    def after_fork(self):
        """A forked child writes into the pipe, which the parent drains in order with its own output."""
        self.lock, self.child = threading.Lock(), True

    def close(self):
        """Give fds 1 and 2 back, write what the pipe still holds, and stop the thread."""
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self.saved = {}
        with self.lock:
            self.drain()
            self.closed = True
        os.close(self.write_fd)
        self.thread.join(5.0)

    # -- writing -------------------------------------------------------------------------------------
    def write_text(self, text):
        """sys.stdout/sys.stderr: the pipe's waiting bytes first, then the text, into the current file."""
        if self.child:
            self.write_pipe(text.encode("utf-8", "replace"))
            return
        with self.lock:
            self.drain()
            self.append("text", text)

    def write_pipe(self, data):
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.write_fd, view):]
            except InterruptedError:
                continue

    def drain(self):
        """Move what the pipe holds into the current file (the caller holds `lock`)."""
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            self.append("fds", self.decoder.decode(data))

    def append(self, source, text):
        if not text:
            return
        ready, self.held[source] = self.redactor.stream(self.held[source], text)
        self.put(ready)

    def put(self, text):
        if text and self.file is not None:
            try:
                self.file.write(text.encode("utf-8", "replace"))
            except OSError:
                self.file = None        # a full or removed /tmp: the step goes on, its copy is short

    def watch(self):
        """Drain the pipe whenever it has bytes and nothing else does (a subprocess writing while
        Python computes, output between steps), so a writer never blocks on a full pipe."""
        import select
        while not self.closed:
            try:
                ready, _, _ = select.select([self.read_fd], [], [], 1.0)
            except (OSError, ValueError):
                return
            except InterruptedError:
                continue
            if ready:
                with self.lock:
                    if not self.closed:
                        self.drain()

    def switch(self, path):
        """Close the current file with what is written up to now (its {"path", "bytes", "sha256"}, or
        None) and make `path` the current one (None: no file)."""
        with self.lock:
            self.drain()
            for source in self.held:
                held, self.held[source] = self.held[source], ""
                self.put(held)
            current, self.file = self.file, None
            if path is not None:
                try:
                    self.file = DriverFile(path)
                except OSError:
                    self.file = None
        if current is None:
            return None
        try:
            return dict(current.close(), path=current.path)
        except OSError:
            return None


def with_suppressed(function, *args):
    try:
        return function(*args)
    except Exception:
        return None


class DriverStream(object):
    """sys.stdout or sys.stderr while the helpers are installed: text into the output pipe (never into
    the REPL's own stream, which carries only the command's result). One per stream for the life of
    the context, so a handler bound to it in an earlier step still writes into the current one."""

    encoding, errors = "utf-8", "replace"

    def __init__(self, output, fd, stream):
        self._output, self._fd, self._stream = output, fd, stream

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        self._output.write_text(text)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        pass                    # every write is in the file already

    def isatty(self):
        return False

    def writable(self):
        return True

    def fileno(self):
        return self._fd

    def __getattr__(self, name):
        return getattr(self._stream, name)


class DriverSecrets(object):
    """dbutils.secrets as the user sees it: every value read is remembered for redaction."""

    def __init__(self, secrets, redactor):
        self._secrets, self._redactor = secrets, redactor

    def get(self, *args, **kwargs):
        value = self._secrets.get(*args, **kwargs)
        self._redactor.add(value)
        return value

    def getBytes(self, *args, **kwargs):  # noqa: N802 - dbutils' own name
        value = self._secrets.getBytes(*args, **kwargs)
        self._redactor.add(value)
        return value

    def __getattr__(self, name):
        return getattr(self._secrets, name)

    def __dir__(self):
        return dir(self._secrets)


class DriverNotebook(object):
    """dbutils.notebook: exit(value) records its value as the step's exit_value, then exits."""

    def __init__(self, notebook, repl):
        self._notebook, self._repl = notebook, repl

    def exit(self, value):
        self._repl.exit_value = self._repl.redactor.redact(driver_str(value))[:65536]
        return self._notebook.exit(value)

    def __getattr__(self, name):
        return getattr(self._notebook, name)

    def __dir__(self):
        return dir(self._notebook)


class DriverDbutils(object):
    """The REPL's dbutils, with secrets and notebook seen through the classes above."""

    def __init__(self, dbutils, repl):
        self._dbutils = dbutils
        self.secrets = DriverSecrets(dbutils.secrets, repl.redactor)
        self.notebook = DriverNotebook(dbutils.notebook, repl)

    def __getattr__(self, name):
        return getattr(self._dbutils, name)

    def __dir__(self):
        return dir(self._dbutils)


def driver_answer(value):
    """A helper's answer to the CLI, as the command's result text: written to the REPL's own stream
    (beneath ours, if ours is installed), never into the step's capture. JSON unless a str."""
    stream = sys.stdout
    if isinstance(stream, DriverStream):
        stream = stream._stream
    stream.write((value if isinstance(value, str) else json.dumps(value)) + "\n")


def driver_str(value):
    try:
        return str(value)
    except Exception as error:  # a broken __str__
        return "<unprintable %s: %s>" % (type(value).__name__, type(error).__name__)


def driver_qualified_name(kind):
    """An exception class's name as Python's traceback prints it: mymod.MyError, or MyError for
    classes of __main__ and builtins."""
    module = getattr(kind, "__module__", None)
    name = getattr(kind, "__qualname__", None) or getattr(kind, "__name__", "Exception")
    return name if module in (None, "__main__", "builtins") else "%s.%s" % (module, name)


def driver_write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
        f.write(text)


class DriverPyplotHook(object):
    """Patches matplotlib.pyplot.show as soon as pyplot is imported (see DriverRepl.patch_pyplot)."""

    def __init__(self, repl):
        self.repl, self.busy = repl, False

    def find_spec(self, name, path=None, target=None):
        if name != "matplotlib.pyplot" or self.busy:
            return None  # busy: another hook asking the finders, this one included
        self.busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self.busy = False
        loader, hook = spec.loader, self

        class Loader(object):
            def create_module(self, spec):
                create = getattr(loader, "create_module", None)
                return create(spec) if create else None

            def exec_module(self, module):
                loader.exec_module(module)
                hook.repl.patch_pyplot(module)

        if hasattr(loader, "exec_module"):
            spec.loader = Loader()
        return spec


class DriverRepl(object):
    """`_dbx_repl` in the REPL: runs steps with their output captured to a driver copy, saves their
    plots, records how they ended, and serves driver files to the CLI in chunks."""

    def __init__(self, config, namespace, previous=None):
        self.config, self.namespace = config, namespace
        self.out_dir = os.path.join(config.get("out_dir") or "/tmp", "dbx_repl_" + config["session_id"])
        self.copies_bytes = int(config.get("copies_bytes") or 256 * 1024 * 1024)
        self.key, self.ending, self.images, self.exit_value, self.late = None, None, [], None, None
        self.streams_before = {}
        self.connect_progress_of = None    # the Spark Connect session whose progress is watched
        self.make_dir()
        # One output per Python process: a reinstall (the helpers lost, the interpreter alive) keeps
        # the pipe, its thread, the streams that handlers hold and the secrets already read.
        existing = getattr(sys, "_dbx_repl_output", None)
        self.redactor = existing.redactor if existing is not None else DriverRedactor()
        if existing is None:
            existing = DriverOutput(self.redactor, tuple(config.get("capture_fds", (1, 2))))
            existing.switch(self.out_path(DRIVER_FIRST_GAP, ".late"))
            sys._dbx_repl_output = existing
        self.output = existing
        streams = getattr(previous, "streams", None)
        self.streams = streams or {"stdout": DriverStream(existing, 1, sys.stdout),
                                   "stderr": DriverStream(existing, 2, sys.stderr)}
        self.repl_stream = sys.stdout
        service_display = namespace.get("display")
        self.service_display = getattr(service_display, "service_display", service_display)
        service_html = namespace.get("displayHTML")
        self.service_html = getattr(service_html, "service_display", service_html)
        dbutils = namespace.get("dbutils")
        if dbutils is not None and not isinstance(dbutils, DriverDbutils):
            namespace["dbutils"] = DriverDbutils(getattr(dbutils, "_dbutils", dbutils), self)
        elif isinstance(dbutils, DriverDbutils):
            dbutils.notebook._repl = self
        hooks = [f for f in sys.meta_path if type(f).__name__ == "DriverPyplotHook"]
        for hook in hooks:
            hook.repl = self
        if not hooks:
            sys.meta_path.insert(0, DriverPyplotHook(self))

    def make_dir(self):
        os.makedirs(self.out_dir, mode=0o700, exist_ok=True)
        os.chmod(self.out_dir, 0o700)

    def out_path(self, key, suffix=".out"):
        return os.path.join(self.out_dir, key + suffix)

    # -- a step's life: begin, run, end ---------------------------------------------------------------
    def begin(self, key):
        """Start a step: its copy takes everything printed from here on, through our streams."""
        self.key, self.ending, self.images, self.exit_value = key, None, [], None
        with_suppressed(self.make_dir)
        with_suppressed(self.prune)
        for name, stream in self.streams.items():
            current = getattr(sys, name)
            if current is not stream:
                stream._stream = current
                setattr(sys, name, stream)
        self.repl_stream = self.streams["stdout"]._stream
        self.late = self.gap_ended(self.output.switch(self.out_path(key)))
        self.note_streams(key)
        with_suppressed(self.watch_connect_progress)
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is not None:
            self.patch_pyplot(plt)

    def begin_magic(self, key):
        """The first line of a step with magics (%pip, !ls): capture what the REPL runs after it. Its
        end comes with the first fetch of its output (a magic may restart Python)."""
        self.begin(key)

    def end(self):
        """Finish the step: its plots, then the switch to its late file once everything printed
        has been written; returns its record (also kept as NNN_tag.end)."""
        try:
            self.save_open_figures()
        except Exception as error:
            sys.stderr.write("[dbx-repl: open figures could not be saved: %s]\n" % driver_str(error))
        key = self.key
        written = self.output.switch(self.out_path(key, ".late"))
        ending = self.ending or {"kind": "finished"}
        if self.exit_value is not None:
            ending = {"kind": "exit", "value": self.exit_value}
        record = {"key": key, "ending": ending, "images": [os.path.basename(p) for p in self.images],
                  "late": self.late}
        if written is not None and written["path"] == self.out_path(key):
            record.update(bytes=written["bytes"], sha256=written["sha256"])
        with_suppressed(driver_write_private, self.out_path(key, ".end"), json.dumps(record))
        for name, stream in self.streams.items():   # the REPL's own streams again, e.g. for a cell magic
            if getattr(sys, name) is stream:
                setattr(sys, name, stream._stream)
        self.key = None
        return record

    @staticmethod
    def gap_ended(closed):
        """The record of what was printed between two steps (the late file a step's start closed), or
        None when nothing was (its empty file is removed)."""
        if closed is None or not closed["path"].endswith(".late"):
            return None
        if not closed["bytes"]:
            with_suppressed(os.unlink, closed["path"])
            return None
        name = os.path.basename(closed["path"])
        return {"after": name[:-len(".late")], "file": name, "bytes": closed["bytes"], "sha256": closed["sha256"]}

    def parse(self, source, filename):
        """The step's syntax tree. A uniformly indented cell runs, as the service's IPython dedents
        it; the dedented text is what tracebacks show."""
        import ast
        import textwrap
        try:
            return ast.parse(source, filename=filename), source
        except IndentationError:
            dedented = textwrap.dedent(source)
            if dedented == source:
                raise
            return ast.parse(dedented, filename=filename), dedented

    def run(self, key, source_b64):
        """Run a step. It ends with one result text: the frame with the step's record and, when small,
        its copy inline; an exception propagates (the service answers it as an error result)."""
        import ast
        import linecache
        source = base64.b64decode(source_b64).decode("utf-8")
        self.begin(key)
        filename = "<command-%s>" % key
        try:
            try:
                tree, source = self.parse(source, filename)
            except SyntaxError as error:
                self.record_error(error, None)
                raise
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, filename, "exec"), self.namespace)
            if last is not None:
                value = eval(compile(last, filename, "eval"), self.namespace)
                if value is not None:
                    self.show_value(value)
        except SyntaxError:
            raise
        except BaseException as error:
            tb = error.__traceback__
            user_frames = tb.tb_next if tb is not None else None
            if self.exit_value is None:
                self.record_error(error, user_frames)
            raise error.with_traceback(user_frames)
        finally:
            record = self.end()
        self.repl_stream.write(self.frame(record))

    def frame(self, record):
        """The step's result text: the record as one JSON line, then the copy when it is small and
        whole, then the end mark. The CLI checks the inline copy against the record's sha256."""
        content = ""
        if record.get("bytes") is not None and record["bytes"] <= DRIVER_INLINE_BYTES:
            try:
                with open(self.out_path(record["key"]), "rb") as f:
                    data = f.read(DRIVER_INLINE_BYTES + 1)
                if hashlib.sha256(data).hexdigest() == record["sha256"]:
                    content = data.decode("utf-8")
                    record = dict(record, inline=True)
            except (OSError, UnicodeDecodeError):
                pass
        return DRIVER_FRAME + json.dumps(record) + "\n" + content + DRIVER_FRAME_END

    def record_error(self, error, frames):
        """Keep how the step ended (the exception as Python prints it) and its traceback without the
        wrapper's frames, redacted, for the CLI's response and stderr file."""
        import traceback
        self.ending = {"kind": "raised", "type": driver_qualified_name(type(error)),
                       "message": self.redactor.redact(driver_str(error))}
        if isinstance(error, SystemExit):
            code = error.code
            self.ending["exit_code"] = code if code is None or isinstance(code, int) else driver_str(code)
        try:
            text = "".join(traceback.format_exception(type(error), error, frames))
        except Exception:
            text = "%s: %s\n" % (self.ending["type"], self.ending["message"])
        with_suppressed(driver_write_private, self.out_path(self.key, ".err"), self.redactor.redact(text))

    # -- Spark Connect progress (standard access mode): no status tracker, the server reports it -----
    def watch_connect_progress(self):
        """On a Spark Connect session that reports progress (Spark 4), keep the running step's latest
        report in <key>.progress for the sidecar's progress read (`_dbx_repl_progress`)."""
        spark = self.namespace.get("spark")
        if spark is None or "sc" in self.namespace or self.connect_progress_of is spark:
            return   # a classic session (a SparkContext beside it) has its status tracker instead
        self.connect_progress_of = spark
        register = getattr(spark, "registerProgressHandler", None)   # Spark 4's Connect client has it
        if register is not None:
            register(self.on_connect_progress)

    def on_connect_progress(self, stages=None, inflight_tasks=0, operation_id=None, done=False):
        key = self.key
        if key is None:
            return
        report = {"operation_id": operation_id, "done": bool(done), "inflight_tasks": int(inflight_tasks or 0),
                  "stages": [[s.stage_id, s.num_tasks, s.num_completed_tasks, bool(s.done)] for s in stages or []]}
        path = self.out_path(key, ".progress")
        with_suppressed(driver_write_private, path + ".tmp", json.dumps(report))
        with_suppressed(os.replace, path + ".tmp", path)

    # -- streaming queries a step leaves running ---------------------------------------------------------
    def active_streams(self):
        spark = self.namespace.get("spark")
        if spark is None or not any(n.startswith("pyspark.sql") and "streaming" in n for n in sys.modules):
            return []
        return [{"id": str(q.id), "name": q.name} for q in spark.streams.active]

    def note_streams(self, key):
        try:
            self.streams_before[key] = set(s["id"] for s in self.active_streams())
        except Exception:
            self.streams_before[key] = None

    def streams_left(self, key):
        """Prints JSON {"started_by_step": [{"id", "name"}], "other_active": N}: streaming queries
        still active, those the step started first."""
        before = self.streams_before.get(key) or set()
        active = self.active_streams()
        mine = [s for s in active if s["id"] not in before]
        driver_answer({"started_by_step": mine, "other_active": len(active) - len(mine)})

    # -- SQL steps: the whole result to a table file ---------------------------------------------------
    def sql(self, text, max_rows=100000):
        """A SQL step (exec --sql): spark.sql(text) on this context's session, so temp views and
        settings are shared with Python steps. A result with columns goes to <key>.sql.csv (a header
        row, then up to max_rows rows, secret values redacted) and <key>.sql.json (columns with their
        Spark types, rows written, total_rows, truncated); the CLI fetches both."""
        import csv
        spark = self.namespace.get("spark")
        if spark is None:
            raise NameError("name 'spark' is not defined")
        frame = spark.sql(text)
        columns = [{"name": f.name, "type": f.dataType.simpleString(), "nullable": f.nullable}
                   for f in frame.schema.fields]
        if not columns:  # a statement (CREATE VIEW, SET, INSERT ...): nothing to show
            print("OK")
            return None
        rows = frame.limit(max_rows + 1).collect()
        total = len(rows) if len(rows) <= max_rows else frame.count()  # a capped result runs again
        rows = rows[:max_rows]
        redact = self.redactor.redact
        fd = os.open(self.out_path(self.key, ".sql.csv"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow([c["name"] for c in columns])
            for row in rows:
                writer.writerow(["" if v is None else redact(v) if isinstance(v, str) else v for v in row])
        schema = {"columns": columns, "rows": len(rows), "total_rows": total,
                  "truncated": total > len(rows), "max_rows": max_rows}
        driver_write_private(self.out_path(self.key, ".sql.json"), json.dumps(schema))  # last: the csv is whole
        print("%d row(s)%s" % (total, " (%d written)" % len(rows) if total > len(rows) else ""))
        return None

    # -- plots: saved here, never left to the service's image results ---------------------------------
    def show_value(self, value):
        """The trailing expression's value: its repr, and its image when it has one."""
        if not isinstance(value, type):
            with_suppressed(self.save_image_of, value)  # a failing _repr_png_ must not fail the step
        print(repr(value))

    def save_image_of(self, value):
        """Save a matplotlib figure, PNG bytes, or an object with _repr_png_; True if saved."""
        if self.is_figure(value):
            return self.save_figure(value)
        if isinstance(value, (bytes, bytearray)) and bytes(value[:8]) == b"\x89PNG\r\n\x1a\n":
            self.save_png(bytes(value))
            return True
        render = getattr(value, "_repr_png_", None)
        if callable(render):
            data = render()
            if isinstance(data, (bytes, bytearray)) and data:
                self.save_png(bytes(data))
                return True
        return False

    @staticmethod
    def is_figure(value):
        return any(k.__name__ == "Figure" and (k.__module__ or "").startswith("matplotlib")
                   for k in type(value).__mro__)

    def save_figure(self, figure):
        if getattr(figure, "_dbx_repl_saved_in", None) == self.key:
            return True  # each figure once per step
        import io
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        figure._dbx_repl_saved_in = self.key
        self.save_png(buffer.getvalue())
        return True

    def save_png(self, data):
        path = self.out_path(self.key or "unkeyed", ".%d.png" % (len(self.images) + 1))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self.images.append(path)

    def save_open_figures(self):
        """plt.show() and the end of a step: save every open figure, then close them all (what the
        inline backend does)."""
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return
        for number in plt.get_fignums():
            self.save_figure(plt.figure(number))
        plt.close("all")

    def patch_pyplot(self, plt):
        original = getattr(plt, "show", None)
        if getattr(original, "_dbx_repl_owner", None) is self:
            return
        original = getattr(original, "_dbx_repl_original", original)
        repl = self

        def show(*args, **kwargs):
            try:
                repl.save_open_figures()
            except Exception as error:  # e.g. an unwritable /tmp: the step goes on
                sys.stderr.write("[dbx-repl: figures could not be saved: %s]\n" % driver_str(error))

        show._dbx_repl_owner, show._dbx_repl_original = self, original
        plt.show = show

    def display(self, value=None, *args, **kwargs):
        """display(): plots are saved as PNGs on the driver; anything else goes to the REPL's."""
        if self.key is not None:
            try:
                if self.save_image_of(value):
                    return None
            except Exception:  # no room on the driver, a failing _repr_png_: let the REPL show it
                pass
        show = self.service_display
        if not callable(show):
            raise NameError("name 'display' is not defined")
        return show(value, *args, **kwargs)

    def display_html(self, html):
        """displayHTML(): during a step, the HTML is printed into the step's output (the service would
        return it as the command's whole text, in place of what the step printed)."""
        if self.key is not None:
            print(html)
            return None
        show = self.service_html
        if not callable(show):
            raise NameError("name 'displayHTML' is not defined")
        return show(html)

    # -- driver copies: bounded, private, removed with the session -----------------------------------
    def prune(self):
        """Remove the oldest steps' copies until the session's copies fit in copies_bytes (the
        file being written is never one of them)."""
        entries = []
        current = getattr(self.output.file, "path", None)
        for name in os.listdir(self.out_dir):
            path = os.path.join(self.out_dir, name)
            info = with_suppressed(os.stat, path)
            if info is not None and path != current:
                entries.append((info.st_mtime, info.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.copies_bytes:
                break
            if with_suppressed(os.unlink, path) is None and not os.path.exists(path):
                total -= size

    def remove_copies(self, session_id=None):
        """Delete a session's driver copies (this one's by default); prints how many files went."""
        import shutil
        if session_id is None:
            self.output.switch(None)
            target = self.out_dir
        else:
            if not session_id or not all(c in "0123456789abcdef" for c in str(session_id)):
                raise ValueError("not a session id: %r" % (session_id,))
            target = os.path.join(os.path.dirname(self.out_dir), "dbx_repl_" + session_id)
        count = sum(len(files) for _, _, files in os.walk(target))
        shutil.rmtree(target, ignore_errors=True)
        driver_answer({"removed": count})

    # -- transfer ---------------------------------------------------------------------------------
    def send(self, payload, mode):
        """Return bytes to the CLI: as a one-column table (fast), or as text lines (fallback)."""
        packed = base64.b64encode(payload).decode("ascii")
        if mode == "table":
            row_chars = int(self.config.get("row_chars") or 100_000)
            rows = [packed[i:i + row_chars] for i in range(0, len(packed), row_chars)] or [""]
            try:
                import pandas
                table = pandas.DataFrame({"chunk": rows})
            except ImportError:
                table = [{"chunk": r} for r in rows]
            show = self.namespace.get("display")
            show = getattr(show, "service_display", show)
            if callable(show):
                show(table)
                return
        driver_answer(packed)  # text: cut by the service if too long, and the CLI then asks for less

    def fetch(self, path, offset, mode, extra=None):
        """Send bytes of a driver file from offset, zlib-compressed, with a JSON header row."""
        budget = int(self.config.get("chunk_budget") or 1_000_000)
        if mode != "table":  # text results are cut at 50,000 characters: send less per call
            budget = min(budget, int(self.config.get("text_budget") or 24_000))
        size = with_suppressed(os.path.getsize, path)
        header = dict(extra or {}, size=-1 if size is None else size, offset=offset)
        payload = b""
        if size is not None:
            # Level 1: ~30 MB/s on varied text against ~4 MB/s at level 6, for 15% more bytes;
            # compression, not the round trips, was what limited the transfer rate.
            packer = zlib.compressobj(1)
            parts, packed_size, position = [], 0, offset
            with open(path, "rb") as f:
                f.seek(offset)
                while packed_size < budget:
                    piece = f.read(min(131072, budget // 4))
                    if not piece:
                        break
                    position += len(piece)
                    part = packer.compress(piece) + packer.flush(zlib.Z_SYNC_FLUSH)
                    parts.append(part)
                    packed_size += len(part)
            parts.append(packer.flush())
            payload = b"".join(parts)
            header["next"] = position
        self.send(json.dumps(header).encode("utf-8") + b"\n" + payload, mode)

    def fetch_output(self, key, offset, mode):
        """Send a step's driver copy. The first chunk's header carries its traceback ("traceback") and
        its record ("end": ending, images, late, bytes, sha256). A step that has no record yet (magics,
        a cancelled step) is ended first, so its copy is whole. The copies stay on the driver (bounded,
        see prune): a failed transfer can be retried."""
        extra = {}
        if offset == 0:
            if self.key == key:
                self.end()
            for suffix, field in ((".err", "traceback"), (".end", "end")):
                try:
                    with open(self.out_path(key, suffix), encoding="utf-8", errors="replace") as f:
                        extra[field] = f.read()
                except OSError:
                    pass
            if "end" in extra:
                extra["end"] = with_suppressed(json.loads, extra["end"])
        self.fetch(self.out_path(key), offset, mode, extra=extra)

    def fetch_late(self, key, offset, mode):
        """Send what was printed after step `key` ended and before the next began (its .late file)."""
        self.fetch(self.out_path(key, ".late"), offset, mode)

    def fetch_image(self, key, name, offset, mode):
        """Send one of a step's saved files (a plot or a SQL table: a name from its ending record)."""
        if os.path.basename(name) != name or not name.startswith(key + "."):
            raise ValueError("not a file of step %s: %r" % (key, name))
        self.fetch(os.path.join(self.out_dir, name), offset, mode)

    def stat(self, path, redact=False):
        """Size and sha256 of a driver file, as JSON, with "source": the file's absolute path. With
        `redact` (get), a file that holds a secret value this context read is answered by a redacted
        copy ("source" names it, "redacted" says how many values were replaced)."""
        digest, size, found = hashlib.sha256(), 0, 0
        forms = [f.encode("utf-8") for f in self.redactor.forms] if redact else []
        tail, overlap = b"", max([len(f) for f in forms] or [1]) - 1
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
                if forms:
                    window = tail + block
                    found += sum(window.count(form) for form in forms)
                    tail = window[-overlap:] if overlap else b""
        answer = {"size": size, "sha256": digest.hexdigest(), "source": os.path.abspath(path), "redacted": 0}
        if found:
            answer.update(self.redacted_copy(path, forms))
        driver_answer(answer)

    def redacted_copy(self, path, forms):
        with open(path, "rb") as f:
            data = f.read()
        count = 0
        for form in forms:
            count += data.count(form)
            data = data.replace(form, DRIVER_REDACTED.encode())
        copy = self.out_path("get-" + hashlib.sha256(path.encode()).hexdigest()[:12], ".redacted")
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "source": copy, "redacted": count}

    def put(self, path, offset, data_b64, name=None):
        """Write one compressed chunk of an upload at offset (offset 0 truncates the file). An
        existing folder receives the file as `name`, as cp does. Prints the path written."""
        data = zlib.decompress(base64.b64decode(data_b64))
        if offset == 0 and name and os.path.isdir(path):
            path = os.path.join(path, name)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        with open(path, "r+b" if offset else "wb") as f:
            f.seek(offset)
            f.write(data)
        driver_answer({"written": len(data), "end": offset + len(data), "path": os.path.abspath(path)})

    # -- sync: a local folder mirrored under the session's driver dir --------------------------------
    def sync_apply(self, root, archive, manifest, changed, path_entry):
        """Bring the mirror at `root` to `manifest` ({relative path: sha256}): unpack `archive` (a
        tar.gz of the changed files, or None), remove files the manifest no longer lists, put
        `path_entry` first on sys.path, and reload the imported modules whose files changed (dropping
        those whose reload fails, so the next import loads them afresh). Prints JSON {"missing":
        files whose content does not match, "reloaded", "dropped", "removed"}."""
        import importlib
        import tarfile
        root, path_entry = os.path.realpath(root), os.path.realpath(path_entry)
        os.makedirs(root, mode=0o700, exist_ok=True)
        if archive:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    target = os.path.realpath(os.path.join(root, member.name))
                    if not member.isfile() or not target.startswith(root + os.sep):
                        raise ValueError("unsafe entry in the sync archive: %r" % member.name)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    with tar.extractfile(member) as source, open(target, "wb") as sink:
                        sink.write(source.read())
            os.unlink(archive)
        removed, missing = [], []
        for folder, _, names in os.walk(root):
            for name in names:
                full = os.path.join(folder, name)
                relative = os.path.relpath(full, root).replace(os.sep, "/")
                if relative not in manifest:
                    os.unlink(full)
                    removed.append(relative)
        for relative, digest in manifest.items():
            try:
                with open(os.path.join(root, relative), "rb") as f:
                    ok = hashlib.sha256(f.read()).hexdigest() == digest
            except OSError:
                ok = False
            if not ok:
                missing.append(relative)
        if path_entry in sys.path:
            sys.path.remove(path_entry)
        sys.path.insert(0, path_entry)
        importlib.invalidate_caches()
        changed_files = set(os.path.join(root, c.replace("/", os.sep)) for c in changed)
        stale = [name for name, module in list(sys.modules.items())
                 if os.path.realpath(getattr(module, "__file__", None) or "/nonexistent") in changed_files]
        reloaded, dropped = [], []
        for name in sorted(stale, key=lambda n: -n.count(".")):  # submodules before their packages
            try:
                importlib.reload(sys.modules[name])
                reloaded.append(name)
            except Exception:
                sys.modules.pop(name, None)
                dropped.append(name)
        driver_answer({"missing": missing, "reloaded": reloaded, "dropped": dropped, "removed": len(removed),
                       "root": root, "path": path_entry})


class DriverSubLLMError(RuntimeError):
    """A sub_llm call failed (after its retries, when the failure was retryable)."""


class DriverSubLLMBudgetError(DriverSubLLMError):
    """The session's sub_llm budget (calls or tokens) is spent."""


DriverSubLLMError.__qualname__, DriverSubLLMBudgetError.__qualname__ = "SubLLMError", "SubLLMBudgetError"
DriverSubLLMError.__name__, DriverSubLLMBudgetError.__name__ = "SubLLMError", "SubLLMBudgetError"
DriverSubLLMError.__module__ = DriverSubLLMBudgetError.__module__ = "__main__"   # printed as SubLLMError


def driver_short_reason(error):
    text = str(error)
    if "whitelisted" in text:
        return "blocked (shared access mode: getContext() is not whitelisted)"
    first = text.strip().splitlines()[0][:120] if text.strip() else ""
    return "%s%s" % (type(error).__name__, (": " + first) if first else "")


class DriverBatchResults(list):
    """sub_llm_batch results in input order; `.errors` maps failed indexes to their error text."""
    def __init__(self, size):
        list.__init__(self, [None] * size)
        self.errors = {}


class DriverLLM(object):
    """State behind sub_llm: settings, usage, budget. It never holds the workspace token."""
    def __init__(self, config, namespace):
        self.config, self.namespace = config, namespace
        self.endpoint = self.config.get("llm_endpoint") or "default-llm-endpoint"
        self.timeout = 120.0          # seconds per HTTP attempt
        self.retry_budget = 300.0  # seconds of retrying per call
        self.max_retries = 6        # retries after the first attempt
        self.backoff = 0.5            # first backoff; doubles each retry
        self.max_backoff = 30.0
        self.lock = threading.Lock()
        self.local = threading.local()   # one keep-alive connection per thread and host
        self.usage = self.zero_usage()
        self.spent = {"calls": 0, "tokens": 0}  # what the budget counts; never reset
        self.budget = {"max_calls": self.config.get("llm_max_calls"), "max_tokens": self.config.get("llm_max_tokens")}
        self.auth_source = None
        self._in_flight, self._busy_since = 0, 0.0

    @staticmethod
    def zero_usage():
        return {"calls": 0, "succeeded": 0, "failed": 0, "refused": 0, "retries": 0,
                "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "wall_seconds": 0.0, "call_seconds": 0.0}

    # -- auth: read fresh for every attempt, so a rotated token is picked up; never stored ------
    def auth(self):
        tried, host, token, sources = [], None, None, []
        try:
            from dbruntime.databricks_repl_context import get_context
            ctx = get_context()
            token = getattr(ctx, "apiToken", None) or None
            host = getattr(ctx, "apiUrl", None) or None
            if not host and getattr(ctx, "workspaceUrl", None):
                host = ctx.workspaceUrl
            tried.append("dbruntime get_context(): " + ("ok" if host and token else
                         "no " + " or ".join(n for n, v in (("host", host), ("token", token)) if not v)))
            if host or token:
                sources.append("dbruntime")
        except Exception as error:
            tried.append("dbruntime get_context(): " + driver_short_reason(error))
        if not (host and token):
            try:
                ctx = self.namespace["dbutils"].notebook.entry_point.getDbutils().notebook().getContext()
                if not token:
                    token = ctx.apiToken().get() or None
                if not host:
                    host = ctx.apiUrl().get() or None
                tried.append("dbutils getContext(): ok")
                sources.append("dbutils")
            except Exception as error:
                tried.append("dbutils getContext(): " + driver_short_reason(error))
        if not host and self.config.get("host"):
            host = self.config["host"]
            tried.append("host given at create: ok")
            sources.append("create")
        if not host:
            try:
                host = self.namespace["spark"].conf.get("spark.databricks.workspaceUrl") or None
                tried.append("spark.conf spark.databricks.workspaceUrl: " + ("ok" if host else "empty"))
                sources.append("spark.conf")
            except Exception as error:
                tried.append("spark.conf spark.databricks.workspaceUrl: " + driver_short_reason(error))
        if not token:
            token = os.environ.get("DATABRICKS_TOKEN") or None
            tried.append("env DATABRICKS_TOKEN: " + ("ok" if token else "not set"))
            if token:
                sources.append("env")
        if not host:
            host = os.environ.get("DATABRICKS_HOST") or None
            tried.append("env DATABRICKS_HOST: " + ("ok" if host else "not set"))
        if not host or not token:
            missing = " and ".join(n for n, v in (("host", host), ("token", token)) if not v)
            found = "sub_llm found no workspace %s on the cluster. Tried, in order: %s. " % (
                missing, "; ".join(tried))
            raise DriverSubLLMError(found + "Fix: set os.environ['DATABRICKS_HOST'] and "
                              "os.environ['DATABRICKS_TOKEN'] on the driver (the token from a secret, "
                              "e.g. dbutils.secrets.get(...)) and call again.")
        if "://" not in host:
            host = "https://" + host
        self.auth_source = "+".join(sources)
        return host.rstrip("/"), token

    # -- budget and accounting --------------------------------------------------------------------
    def reserve(self):
        with self.lock:
            calls, tokens = self.budget["max_calls"], self.budget["max_tokens"]
            if calls is not None and self.spent["calls"] >= calls:
                self.usage["refused"] += 1
                raise DriverSubLLMBudgetError(
                    "sub_llm budget spent: %d of max_calls=%d calls used. Raise or lift it with "
                    "sub_llm_budget(max_calls=N or None)." % (self.spent["calls"], calls))
            if tokens is not None and self.spent["tokens"] >= tokens:
                self.usage["refused"] += 1
                raise DriverSubLLMBudgetError(
                    "sub_llm budget spent: %d of max_tokens=%d tokens used. Raise or lift it with "
                    "sub_llm_budget(max_tokens=N or None)." % (self.spent["tokens"], tokens))
            self.spent["calls"] += 1
            self.usage["calls"] += 1
            if self._in_flight == 0:
                self._busy_since = time.time()
            self._in_flight += 1
        return time.time()

    def release(self, started, usage):
        now = time.time()
        with self.lock:
            if usage is None:
                self.usage["failed"] += 1
            else:
                self.usage["succeeded"] += 1
                counts = {}
                for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
                    try:
                        counts[field] = int(usage.get(field) or 0)
                    except (TypeError, ValueError):
                        counts[field] = 0
                if not counts["total_tokens"]:
                    counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
                for field, value in counts.items():
                    self.usage[field] += value
                self.spent["tokens"] += counts["total_tokens"]
            self.usage["call_seconds"] += now - started
            self._in_flight -= 1
            if self._in_flight == 0:
                self.usage["wall_seconds"] += now - self._busy_since

    # -- one call: timeout per attempt, retries with backoff and jitter on 429/5xx/network -------
    def delay(self, attempt, retry_after):
        if retry_after is not None:
            return retry_after + random.uniform(0, min(1.0, 0.1 * retry_after + 0.05))
        ceiling = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    @staticmethod
    def retry_after(headers):
        value = headers.get("Retry-After") if headers is not None else None
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
        try:
            import email.utils
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
        except Exception:
            return None

    def call(self, prompt, endpoint=None, max_tokens=1024, system="", temperature=0.0):
        endpoint = endpoint or self.endpoint
        started = self.reserve()
        usage = None
        try:
            text, usage = self.request(prompt, endpoint, max_tokens, system, temperature)
            return text
        finally:
            self.release(started, usage)

    def request(self, prompt, endpoint, max_tokens, system, temperature):
        import http.client, urllib.parse
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": str(prompt)})
        payload = json.dumps({"messages": messages, "max_tokens": max_tokens,
                              "temperature": temperature}).encode("utf-8")
        path = "/serving-endpoints/%s/invocations" % urllib.parse.quote(str(endpoint), safe="")
        deadline = time.time() + self.retry_budget
        attempt, refreshed = 0, False
        while True:
            attempt += 1
            host, token = self.auth()
            timeout = self.timeout if attempt == 1 else max(0.1, min(self.timeout, deadline - time.time()))
            headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
            del token
            fatal, wait = None, None
            try:
                code, reply_headers, body = self.send(host, path, payload, headers, timeout)
                headers = None
                if code == 200:
                    answer = json.loads(body.decode("utf-8"))
                    return self.text_of(answer), (answer.get("usage") or {})
                detail = body.decode("utf-8", "replace").strip()[:300]
                failure = "HTTP %d from serving endpoint %r: %s" % (code, endpoint, detail or code)
                wait = self.retry_after(reply_headers)
                if code == 404:
                    fatal = ("Serving endpoint %r was not found in this workspace (HTTP 404: %s). List the "
                             "workspace's serving endpoints (`databricks serving-endpoints list`, or GET "
                             "/api/2.0/serving-endpoints) and pass endpoint=NAME, or create the session "
                             "with --llm-endpoint NAME." % (endpoint, detail))
                elif code in (401, 403) and not refreshed:
                    refreshed = True
                    continue
                elif not (code == 429 or code >= 500):
                    fatal = failure
            except (OSError, http.client.HTTPException, ValueError) as error:
                reason = getattr(error, "reason", None) or error
                failure = "%s calling serving endpoint %r: %s" % (type(error).__name__, endpoint, reason)
                if isinstance(error, ValueError) and not isinstance(error, json.JSONDecodeError):
                    fatal = failure  # e.g. a malformed host URL: retrying cannot help
            finally:
                headers = None
            if fatal:
                raise DriverSubLLMError(fatal)
            if attempt > self.max_retries:
                raise DriverSubLLMError("%s (gave up after %d attempts)" % (failure, attempt))
            pause = self.delay(attempt, wait)
            if time.time() + pause > deadline:
                raise DriverSubLLMError("%s (gave up after %d attempts: waiting %.1fs more would pass the "
                                  "%.0fs retry budget)" % (failure, attempt, pause, self.retry_budget))
            with self.lock:
                self.usage["retries"] += 1
            time.sleep(pause)

    def send(self, host, path, payload, headers, timeout):
        """POST over this thread's keep-alive connection to the host: (status, headers, body).
        A reused connection the server has closed meanwhile is replaced once."""
        import http.client, urllib.parse
        parts = urllib.parse.urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("workspace host %r is not an http(s) URL" % host)
        pool = self.local.__dict__.setdefault("connections", {})
        key = (parts.scheme, parts.netloc)
        while True:
            connection = pool.pop(key, None)
            reused = connection is not None
            if connection is None:
                kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
                connection = kind(parts.netloc, timeout=timeout)
            connection.timeout = timeout
            if connection.sock is not None:
                connection.sock.settimeout(timeout)
            try:
                connection.request("POST", parts.path.rstrip("/") + path, body=payload, headers=headers)
                response = connection.getresponse()
                body = response.read()
            except (http.client.RemoteDisconnected, http.client.CannotSendRequest, BrokenPipeError,
                    ConnectionResetError):
                connection.close()
                if reused:
                    continue
                raise
            except BaseException:
                connection.close()
                raise
            if not response.will_close:
                pool[key] = connection
            else:
                connection.close()
            return response.status, response.headers, body

    @staticmethod
    def text_of(answer):
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices:
            raise DriverSubLLMError("the endpoint answered without choices: %s" % str(answer)[:200])
        choice = choices[0] or {}
        content = (choice.get("message") or {}).get("content")
        if content is None and isinstance(choice.get("text"), str):
            content = choice["text"]
        if isinstance(content, list):
            texts = []
            for item in content:
                if isinstance(item, str):
                    texts.append(item)
                elif isinstance(item, dict) and item.get("type", "text") in ("text", "output_text"):
                    texts.append(str(item.get("text") or ""))
            return "".join(texts)
        return content if isinstance(content, str) else ""




DRIVER_KEEP = object()   # sub_llm_budget: "leave this limit as it is"


def driver_install(config, namespace):
    """Install the helpers into `namespace` (the REPL's globals) and return `_dbx_repl`.

    config: {"session_id", "out_dir", "row_chars", "text_budget", "chunk_budget", "copies_bytes",
    "host", "llm_endpoint", "llm_max_calls", "llm_max_tokens"}; missing keys take defaults."""
    previous = namespace.get("_dbx_repl")
    repl = DriverRepl(config, namespace, previous if isinstance(previous, DriverRepl) else None)
    # Lives as long as this Python process: a reinstall tells a restarted interpreter (variables gone)
    # from a namespace that merely lost `_dbx_repl`.
    repl.fresh_interpreter = not getattr(sys, "_dbx_repl_installed", False)
    sys._dbx_repl_installed = True
    _llm = repl.llm = DriverLLM(config, namespace)
    repl.SubLLMError, repl.SubLLMBudgetError = DriverSubLLMError, DriverSubLLMBudgetError

    def display(*args, **kwargs):
        return repl.display(*args, **kwargs)

    display.service_display = repl.service_display
    display.__doc__ = repl.display.__doc__

    def displayHTML(html):  # noqa: N802 - the REPL's name
        return repl.display_html(html)

    displayHTML.service_display = repl.service_html
    displayHTML.__doc__ = repl.display_html.__doc__

    def sub_llm(prompt, endpoint=None, max_tokens=1024, system="", temperature=0.0):
        """Ask a model-serving endpoint one prompt and return the answer text.
        Raises sub_llm.Error (SubLLMError) when it fails after retries, sub_llm.BudgetError when
        the session's budget is spent."""
        return _llm.call(prompt, endpoint=endpoint, max_tokens=max_tokens, system=system,
                         temperature=temperature)

    sub_llm.Error, sub_llm.BudgetError = DriverSubLLMError, DriverSubLLMBudgetError

    def sub_llm_batch(prompts, endpoint=None, max_tokens=1024, system="", temperature=0.0, max_workers=8):  # noqa: PLR0913 - the skill's public API
        """Ask many prompts with at most max_workers in flight. Results keep input order; a failed
        item becomes "[ERROR] <type>: <message>" and is also in the result's .errors {index: text}."""
        from concurrent.futures import ThreadPoolExecutor
        prompts = list(prompts)
        workers = int(max_workers)
        if workers < 1:
            raise ValueError("max_workers must be at least 1, got %r" % (max_workers,))
        results = DriverBatchResults(len(prompts))

        def one(index):
            try:
                results[index] = _llm.call(prompts[index], endpoint=endpoint, max_tokens=max_tokens,
                                           system=system, temperature=temperature)
            except Exception as error:
                text = "%s: %s" % (type(error).__name__, error)
                results.errors[index] = text
                results[index] = "[ERROR] " + text

        if not prompts:
            return results
        pool = ThreadPoolExecutor(max_workers=min(workers, len(prompts)))
        futures = []
        try:
            futures = [pool.submit(one, index) for index in range(len(prompts))]
            for future in futures:
                future.result()
        except BaseException:  # e.g. cancel (KeyboardInterrupt): drop what has not started
            for future in futures:
                future.cancel()
            pool.shutdown(wait=False)
            raise
        pool.shutdown(wait=True)
        return results

    def sub_llm_usage(reset=False):
        """Calls, succeeded, failed, refused, retries, tokens, wall_seconds (time with a call in
        flight) and call_seconds (summed call durations) of sub_llm in this session."""
        with _llm.lock:
            snapshot = dict(_llm.usage)
            snapshot["wall_seconds"] = round(snapshot["wall_seconds"], 3)
            snapshot["call_seconds"] = round(snapshot["call_seconds"], 3)
            snapshot["budget"] = dict(_llm.budget, calls_used=_llm.spent["calls"], tokens_used=_llm.spent["tokens"])
            snapshot["endpoint"] = _llm.endpoint
            snapshot["auth"] = _llm.auth_source
            if reset:
                _llm.usage = _llm.zero_usage()
        return snapshot

    def sub_llm_budget(max_calls=DRIVER_KEEP, max_tokens=DRIVER_KEEP):
        """Cap sub_llm for the rest of the session. A limit not passed stays as it is; None lifts it.
        Counts include calls already made. Returns the budget with what has been used."""
        for name, value in (("max_calls", max_calls), ("max_tokens", max_tokens)):
            if value is DRIVER_KEEP or value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("%s must be a non-negative int or None, got %r" % (name, value))
        with _llm.lock:
            if max_calls is not DRIVER_KEEP:
                _llm.budget["max_calls"] = max_calls
            if max_tokens is not DRIVER_KEEP:
                _llm.budget["max_tokens"] = max_tokens
            return dict(_llm.budget, calls_used=_llm.spent["calls"], tokens_used=_llm.spent["tokens"])

    namespace.update(_dbx_repl=repl, sub_llm=sub_llm, sub_llm_batch=sub_llm_batch, sub_llm_usage=sub_llm_usage,
                     sub_llm_budget=sub_llm_budget)
    if "display" in namespace:
        namespace["display"] = display
    if "displayHTML" in namespace:
        namespace["displayHTML"] = displayHTML
    return repl


# `_dbx_repl_progress` runs in the sidecar context (StepRun.progress): it reads the tail of the
# step's driver copy and the Spark status tracker, and prints one JSON line.
def _dbx_repl_progress(path, group, tail_lines, tail_bytes, with_spark):
    """Runs in the sidecar context: prints one JSON line {"output_bytes", "output_tail",
    "spark_jobs": [{"job", "status", "description", "stages", "tasks", "active_tasks"}]}."""
    import json
    import os
    found = {"output_bytes": None, "output_tail": None}
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - tail_bytes))
            lines = f.read().decode("utf-8", "replace").splitlines()
        found.update(output_bytes=size, output_tail="\n".join(lines[-tail_lines:]))
    except OSError:
        pass
    context = globals().get("sc") if with_spark else None
    if with_spark and context is None:
        # Spark Connect (standard access mode): no SparkContext, no status tracker; the latest report
        # the server sent the step's session (DriverRepl.on_connect_progress), when it sends them.
        try:
            with open(os.path.splitext(path)[0] + ".progress", encoding="utf-8") as f:
                report = json.load(f)
            stages = report.get("stages") or []
            found["spark_jobs"] = [{
                "job": (report.get("operation_id") or "")[:8],
                "status": "SUCCEEDED" if report.get("done") else "RUNNING",
                "description": "Spark Connect operation %s" % report.get("operation_id"),
                "stages": [s[0] for s in stages],
                "tasks": "%d/%d" % (sum(s[2] for s in stages), sum(s[1] for s in stages)),
                "active_tasks": report.get("inflight_tasks", 0)}]
        except (OSError, ValueError):
            found["spark_error"] = (
                "Spark progress is unavailable: this context has no SparkContext (standard access mode runs "
                "Spark Connect) and its Spark Connect session has reported no progress for this step (Spark 4 "
                "reports it); the output tail still shows")
    if context is not None:
        try:
            tracker = context.statusTracker()
            active = set(tracker.getActiveJobsIds())
            grouped = set(tracker.getJobIdsForGroup(group)) if group else set()
            jobs = []
            for job_id in sorted((grouped & active) if grouped else active)[-5:]:
                info = tracker.getJobInfo(job_id)
                if info is None:
                    continue
                stages = [tracker.getStageInfo(i) for i in info.stageIds]
                stages = [st for st in stages if st is not None]
                last = max(stages, key=lambda st: st.stageId) if stages else None
                jobs.append({"job": job_id, "status": str(info.status),
                             "description": last.name[:120] if last is not None else None,
                             "stages": sorted(int(i) for i in info.stageIds),
                             "tasks": "%d/%d" % (sum(st.numCompletedTasks for st in stages),
                                                 sum(st.numTasks for st in stages)),
                             "active_tasks": sum(st.numActiveTasks for st in stages)})
            found["spark_jobs"] = jobs
        except Exception as error:
            found["spark_error"] = ("%s: %s" % (type(error).__name__, error))[:200]
    print(json.dumps(found))


if __name__ == "__main__":
    sys.exit(main())
