"""Bad input: every case answers with one clear JSON error and leaves no trace, and secrets never
leak. The table runs against one live session; the property tests drive the parsers in-process."""

import contextlib
import io
import json
import os
import secrets
import signal
import stat
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import dbx_repl
from local_workspace import LocalWorkspace, RUNNING_CLUSTER_ID
from repl_harness import CLI, Repl, files_under

pytestmark = pytest.mark.xdist_group("bad_input")   # one worker runs the module: its module-scoped workspace starts once

TOKEN = "dapi-bad-input-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One workspace (with a distinctive token) and one live session for the whole table."""
    workspace = LocalWorkspace(token=TOKEN)
    workspace.start()
    root = tmp_path_factory.mktemp("bad_input")
    project, home, scratch = root / "project", root / "home", root / "scratch"
    for d in (project, home, scratch):
        d.mkdir()
    (scratch / "code.py").write_text("print('ok')\n")
    (scratch / "latin1.py").write_bytes("print('café')\n".encode("latin-1"))
    (scratch / "nul.py").write_bytes(b"print(1)\x00\n")
    (scratch / "blank.py").write_text("  \n\t\n")
    (scratch / "adir").mkdir()
    repl = Repl(workspace, project, home, cwd=scratch)
    try:
        assert repl.create().status == "Created"
        yield repl
        repl.run("destroy")
    finally:
        workspace.stop()
        leaked = [pid for pid in workspace.all_pids() if os.path.exists(f"/proc/{pid}")]
        assert not leaked, leaked


def snapshot(repl):
    """Every file under the project dir and the caller's directory, with its content."""
    return files_under(repl.project_dir, repl.cwd)


EXEC = ("exec", "--tag", "t", "--command")
CASES = [
    # (story id, argv after the subcommand, stdin, expected status)
    ("tag_of_only_slashes", ("exec", "--tag", "///", "--command", "1"), None, "InvalidTag"),
    ("tag_of_only_dots", ("exec", "--tag", "..", "--command", "1"), None, "InvalidTag"),
    ("empty_tag", ("exec", "--tag", "", "--command", "1"), None, "InvalidTag"),
    ("tag_of_spaces", ("exec", "--tag", "   ", "--command", "1"), None, "InvalidTag"),
    ("missing_code_file", EXEC + ("@nope.py",), None, "InvalidCommand"),
    ("code_file_is_a_directory", EXEC + ("@adir",), None, "InvalidCommand"),
    ("code_file_under_a_regular_file", EXEC + ("@code.py/x.py",), None, "InvalidCommand"),
    ("bare_at_sign", EXEC + ("@",), None, "InvalidCommand"),
    ("non_utf8_code_file", EXEC + ("@latin1.py",), None, "InvalidCommand"),
    ("nul_byte_in_code_file", EXEC + ("@nul.py",), None, "InvalidCommand"),
    ("whitespace_only_code_file", EXEC + ("@blank.py",), None, "InvalidCommand"),
    ("empty_command", EXEC + ("",), None, "InvalidCommand"),
    ("whitespace_command", EXEC + (" \n\t ",), None, "InvalidCommand"),
    ("empty_stdin", EXEC + ("-",), "", "InvalidCommand"),
    ("non_utf8_stdin", EXEC + ("-",), b"print('\xe9')", "InvalidCommand"),
    ("zero_timeout", EXEC + ("1", "--timeout", "0"), None, "InvalidTimeout"),
    ("negative_timeout", EXEC + ("1", "--timeout", "-5"), None, "InvalidTimeout"),
    ("nan_timeout", EXEC + ("1", "--timeout", "nan"), None, "InvalidTimeout"),
    ("infinite_timeout", EXEC + ("1", "--timeout", "inf"), None, "InvalidTimeout"),
    ("word_timeout", EXEC + ("1", "--timeout", "soon"), None, "UsageError"),
    ("negative_await_timeout", ("await", "--timeout", "-1"), None, "InvalidTimeout"),
    ("zero_max_output_bytes", EXEC + ("1", "--max-output-bytes", "0"), None, "UsageError"),
    ("unknown_option", EXEC + ("1", "--frobnicate"), None, "UsageError"),
    ("missing_tag", ("exec", "--command", "1"), None, "UsageError"),
    ("second_create_on_a_live_session", ("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x"),
     None, "SessionExists"),
    ("cancel_unknown_run_id", ("cancel", "--run-id", "../../etc"), None, "ApiError"),
]


@pytest.mark.parametrize("story, args, stdin, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_json_error_and_changes_nothing(live, story, args, stdin, expected):
    before = snapshot(live)
    if isinstance(stdin, bytes):
        proc = subprocess.run(live.argv(*args), input=stdin, capture_output=True, cwd=live.cwd, env=live.env,
                              timeout=60)
        from repl_harness import Call
        call = Call(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())
    else:
        call = live.run(*args, stdin=stdin)
    assert call.status == expected, call
    assert call.code != 0 and call.get("hint"), call
    assert snapshot(live) == before
    assert live.session()["active_command"] is None


def test_a_very_long_or_hostile_tag_becomes_a_short_safe_file_name(live):
    call = live.exec("print('long')", "x" * 300 + "/../\x01 spaces")
    assert call.status == "Finished", call
    key = call["cmd_id"]
    assert len(key) <= 4 + dbx_repl.MAX_TAG_CHARS and "/" not in key and " " not in key
    for output in call["outputs"]:
        real = os.path.realpath(live.path(output["path"]))
        assert os.path.dirname(real) == os.path.realpath(os.path.join(live.project_dir, "repl_outputs"))


def test_the_token_never_lands_in_files_responses_or_debug_logs(live):
    call = live.run("exec", "--command", "print('hello'); 1/0", "--tag", "debugged", "--debug")
    assert call.status == "Error"
    steps = live.session()["steps"]
    failed = live.run("exec", "--command", "1", "--tag", "t", "--debug",
                      env={"DATABRICKS_HOST": "http://127.0.0.1:9", "DBX_REPL_RETRY_TIMEOUT": "1"})
    assert failed.status == "WorkspaceUnreachable", failed   # refused: surely not submitted
    assert live.session()["steps"] == steps                 # so no step is recorded
    assert "[dbx_repl debug]" in call.stderr          # debug logging really ran
    for text in (call.stdout, call.stderr, failed.stdout, failed.stderr):
        assert TOKEN not in text
    for path, content in snapshot(live).items():
        assert TOKEN.encode() not in content, path


def test_session_and_output_files_are_owner_only(live):
    live.exec("print('private')", "private", env={})
    outputs = os.path.join(live.project_dir, "repl_outputs")
    assert stat.S_IMODE(os.stat(outputs).st_mode) == 0o700
    for path in [os.path.join(live.project_dir, "session.json")] + [
            os.path.join(outputs, n) for n in os.listdir(outputs) if not os.path.isdir(os.path.join(outputs, n))]:
        assert stat.S_IMODE(os.stat(path).st_mode) & 0o077 == 0, path


# -- no session, no workspace needed -------------------------------------------------------------------

@pytest.mark.slow
def test_project_dirs_that_do_not_exist_or_cannot_be_written(live, tmp_path):
    regular = tmp_path / "file.txt"
    regular.write_text("not a dir")
    cases = [(str(tmp_path / "missing"), "ProjectDirNotFound"), (str(regular), "ProjectDirNotFound"),
             (str(regular / "sub"), "ProjectDirNotFound"), ("/proc", "ProjectDirNotWritable"),
             ("/sys", "ProjectDirNotWritable")]
    contexts = set(live.workspace.context_pids())
    for project, expected in cases:
        for args in (("exec", "--command", "1", "--tag", "t"),
                     ("create", "--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x")):
            argv = [sys.executable, CLI, args[0], "--project-dir", project, *args[1:]]
            proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(tmp_path), env=live.env, timeout=60)
            body = json.loads(proc.stdout)
            assert body["status"] == expected and proc.returncode != 0, (project, body)
            assert "Traceback" not in proc.stderr
    assert set(live.workspace.context_pids()) == contexts   # create refused before making a context
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


@pytest.mark.parametrize("story, env, profile", [
    ("unknown_profile", {"DATABRICKS_HOST": "", "DATABRICKS_TOKEN": ""}, "nosuchprofile"),
    ("no_databrickscfg_and_no_env", {"DATABRICKS_HOST": "", "DATABRICKS_TOKEN": ""}, None),
])
def test_missing_credentials_answer_auth_error(tmp_path, live, story, env, profile):
    project = tmp_path / "p"
    project.mkdir()
    repl = Repl(live.workspace, project, tmp_path)      # HOME without ~/.databrickscfg
    args = ["--cluster-id", RUNNING_CLUSTER_ID, "--session-name", "x"] + (["--profile", profile] if profile else [])
    call = repl.run("create", *args, env=env)
    assert call.status == "AuthError" and call.code != 0, call
    if profile:
        assert profile in call["message"]
    assert os.listdir(project) == []


def test_an_unknown_cluster_id_answers_cluster_not_found(live, tmp_path):
    project = tmp_path / "p"
    project.mkdir()
    repl = Repl(live.workspace, project, tmp_path)
    for cluster_id in ("0000-000000-nosuch00", "../../x", "a b"):
        call = repl.create(cluster_id)
        assert call.status == "ClusterNotFound", call
    assert os.listdir(project) == []                   # refused: not even the lock file


# -- property-based: the parsers never crash ------------------------------------------------------------

SLUG = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


@given(st.text(max_size=300))
def test_sanitize_tag_yields_a_safe_slug_or_raises_invalid_tag(tag):
    try:
        slug = dbx_repl.sanitize_tag(tag)
    except dbx_repl.ReplError as err:
        assert err.status == "InvalidTag"
        return
    assert 1 <= len(slug) <= dbx_repl.MAX_TAG_CHARS and set(slug) <= SLUG
    assert slug[0].isalnum() and slug[-1].isalnum()
    assert os.path.basename(slug) == slug and slug not in (".", "..")


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                  max_size=4),
                    max_leaves=20)
SESSIONISH = st.fixed_dictionaries({}, optional={
    "status": JSON | st.sampled_from(["active", "destroyed"]), "cluster_id": JSON | st.just("c"),
    "context_id": JSON | st.just("ctx"), "step_counter": JSON | st.integers(0, 9),
    "steps": st.lists(st.fixed_dictionaries({}, optional={"step": JSON | st.integers(0, 9), "tag": JSON}) | JSON,
                      max_size=3),
    "active_command": st.none() | JSON | st.fixed_dictionaries({"step": st.integers(0, 9), "tag": st.text()},
                                                               optional={"command_id": JSON})})


@given(JSON | SESSIONISH)
def test_session_problem_never_raises_and_a_passing_session_is_usable(value):
    problem = dbx_repl.session_problem(value)
    assert problem is None or isinstance(problem, str)
    if problem is None:  # what the CLI reads from a session it accepted must be there
        assert isinstance(value["steps"], list) and isinstance(value["step_counter"], int)
        for entry in value["steps"] + ([value["active_command"]] if value.get("active_command") else []):
            dbx_repl.step_key(entry["step"], entry["tag"])


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_loading_any_session_file_gives_a_session_or_corrupt_session(tmp_path, raw):
    path = tmp_path / "session.json"
    path.write_bytes(raw)
    try:
        session = dbx_repl.Project(str(tmp_path)).load()
        assert dbx_repl.session_problem(session) is None
    except dbx_repl.ReplError as err:
        assert err.status == "CorruptSession" and "session.json" in err.message
    assert path.read_bytes() == raw


WORDS = ["create", "exec", "await", "cancel", "destroy", "find-cluster", "--project-dir", "--tag", "--command",
         "--timeout", "--max-output-bytes", "--cluster-id", "--session-name", "--run-id", "--profile", "--name",
         "--debug", "-", "@", "@x.py", "0", "-1", "nan", "1e309", "..", "/", "", " ", "\u00e9", "\U0001f600"]


@contextlib.contextmanager
def in_process_cli(directory):
    """Run main() in this process: in a scratch cwd, with no workspace reachable, restoring what
    main changes (umask, SIGTERM handler)."""
    saved_cwd, saved_umask = os.getcwd(), os.umask(0o022)
    os.umask(saved_umask)
    saved_term = signal.getsignal(signal.SIGTERM)
    saved_workspace = dbx_repl.Workspace

    def no_workspace(*args, **kwargs):
        raise dbx_repl.ReplError("NoWorkspace", "no workspace in this test")

    dbx_repl.Workspace = no_workspace
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.umask(saved_umask)
        signal.signal(signal.SIGTERM, saved_term)
        dbx_repl.Workspace = saved_workspace


def _asks_for_help(arg):
    return arg == "-h" or (len(arg) >= 3 and ("--help".startswith(arg.split("=")[0]) or
                                             "--version".startswith(arg.split("=")[0])))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=12), max_size=8))
def test_main_prints_exactly_one_json_object_for_any_argv(tmp_path, argv):
    assume(not any(_asks_for_help(a) for a in argv))   # --help/--version print text for humans
    argv = [a.replace("\x00", "") for a in argv]
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    out, err = io.StringIO(), io.StringIO()
    with in_process_cli(scratch), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = dbx_repl.main(argv)
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1, (argv, out.getvalue())
    body = json.loads(lines[0])
    assert isinstance(body["status"], str) and isinstance(body["message"], str)
    assert (code == 0) == (body["status"] in ("Created", "Finished", "Found", "Destroyed", "Cancelled",
                                              "Ambiguous")) or code != 0
    assert "Traceback" not in err.getvalue()
    for base, _, names in os.walk(scratch):   # nothing but the lock file may appear, and only here
        assert set(names) <= {".dbx_repl.lock"}, names
