"""Driver paths that stay inside the workspace, and dbutils, through the real databricks-sdk."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest
from databricks.sdk import WorkspaceClient
from databricks.sdk.core import Config
from databricks.sdk.service.compute import CommandStatus, ResultType

from conftest import _pid_alive
from local_workspace import JOB_CLUSTER_ID, RUNNING_CLUSTER_ID, LocalWorkspace
from local_workspace.paths import cluster_dir, host_path
from test_local_workspace import ANSI, new_context, run, submit, text, wait_done

VOLUME = "/Volumes/main/default/landing"
SECRETS = {"prod": {"db-password": "hunter2-s3cret", "api-key": "k-123456"},
           "dev": {"token": "dev-token-xyz"}}


@pytest.fixture
def start_workspace():
    """Start LocalWorkspace(**options) (secrets, isolation); each is stopped and checked for
    leftover processes at teardown, as the `workspace` fixture does."""
    started = []

    def start(**options):
        ws = LocalWorkspace(**options).start()
        started.append(ws)
        return ws, WorkspaceClient(config=Config(host=ws.host, token=ws.token,
                                                 retry_timeout_seconds=20))

    yield start
    for ws in started:
        ws.stop()
        leaked = [pid for pid in ws.all_pids() if _pid_alive(pid)]
        assert not leaked, "context processes still alive after stop(): %s" % leaked


def error_text(results):
    assert results.result_type == ResultType.ERROR, results
    return ANSI.sub("", results.cause)


# ------------------------------------------------------------------ paths, in the cluster's view

def test_a_volume_file_written_from_python_lands_in_the_state_directory(sdk_client, workspace):
    assert not os.path.exists("/Volumes")
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "import os\nos.makedirs(%r, exist_ok=True)\n"
                         "open(%r, 'w').write('a,b\\n1,2\\n')" % (VOLUME, VOLUME + "/data.csv"))
    landed = host_path(workspace._tmpdir, RUNNING_CLUSTER_ID, VOLUME + "/data.csv")
    with open(landed) as f:
        assert f.read() == "a,b\n1,2\n"
    assert text(sdk_client, ctx, "print(open(%r).read(), end='')" % (VOLUME + "/data.csv")) \
        == "a,b\n1,2"
    assert not os.path.exists("/Volumes"), "the host's root gained /Volumes"


def test_sh_sees_the_same_volume_file_as_python(sdk_client, workspace):
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "import os\nos.makedirs(%r, exist_ok=True)\n"
                         "open(%r, 'w').write('from python\\n')" % (VOLUME, VOLUME + "/note.txt"))
    assert text(sdk_client, ctx, "!cat %s/note.txt" % VOLUME) == "from python"
    assert text(sdk_client, ctx, "%%%%sh\necho from sh > %s/sh.txt\npwd" % VOLUME) \
        == "/databricks/driver"
    assert text(sdk_client, ctx, "print(open(%r).read(), end='')" % (VOLUME + "/sh.txt")) \
        == "from sh"
    assert not os.path.exists("/Volumes")


def test_dbfs_workspace_and_local_disk0_follow_the_state_layout(sdk_client, workspace):
    ctx = new_context(sdk_client)
    driver_paths = ["/dbfs/FileStore/x.txt", "/Workspace/Users/me/x.txt", "/local_disk0/x.txt"]
    run(sdk_client, ctx, "import os\nfor p in %r:\n"
                         "    os.makedirs(os.path.dirname(p), exist_ok=True)\n"
                         "    open(p, 'w').write(p)" % driver_paths)
    for path in driver_paths:
        with open(host_path(workspace._tmpdir, RUNNING_CLUSTER_ID, path)) as f:
            assert f.read() == path
        assert not os.path.exists("/" + path.split("/")[1])
    assert text(sdk_client, ctx, "import os; print(os.getcwd())") == "/databricks/driver"


def test_tmp_in_a_context_is_the_clusters_own_and_the_hosts_tmp_gains_nothing(sdk_client,
                                                                              workspace):
    name = "scratch-%s.txt" % uuid.uuid4().hex
    first = new_context(sdk_client)
    run(sdk_client, first, "open('/tmp/%s', 'w').write('mine')" % name)
    assert not os.path.exists(os.path.join(tempfile.gettempdir(), name))
    cluster_tmp = os.path.join(cluster_dir(workspace._tmpdir, RUNNING_CLUSTER_ID), "tmp")
    # (the state dir itself is bound at its own path inside the view, so it shows up as a mount point)
    state_mount = os.path.basename(workspace._tmpdir)
    assert [n for n in os.listdir(cluster_tmp) if n != state_mount] == [name]
    second = new_context(sdk_client)  # the same cluster: the same /tmp, as on one driver
    assert text(sdk_client, second, "print(open('/tmp/%s').read())" % name) == "mine"
    other = new_context(sdk_client, JOB_CLUSTER_ID)  # another cluster: its own /tmp
    assert text(sdk_client, other, "import os; print(os.path.exists('/tmp/%s'))" % name,
                JOB_CLUSTER_ID) == "False"


@pytest.mark.slow
@pytest.mark.spark
def test_a_spark_round_trip_to_a_volume_lands_in_the_state_directory(sdk_client, workspace):
    ctx = new_context(sdk_client)
    out = run(sdk_client, ctx,
              "spark.range(3).write.parquet(%r)\n"
              "import os\n"
              "print(sorted(r.id for r in spark.read.parquet(%r).collect()))\n"
              "print(sorted(os.listdir('/tmp')))" % (VOLUME + "/nums", VOLUME + "/nums"),
              timeout=180)
    assert out.result_type == ResultType.TEXT, out
    lines = out.data.splitlines()
    assert "[0, 1, 2]" in lines
    landed = host_path(workspace._tmpdir, RUNNING_CLUSTER_ID, VOLUME + "/nums")
    assert "_SUCCESS" in os.listdir(landed)
    assert any(n.endswith(".parquet") for n in os.listdir(landed))
    assert not os.path.exists("/Volumes")
    # Spark's own scratch (spark-*, blockmgr-*) is in the cluster's /tmp, not the host's.
    spark_tmp = [n for n in eval(lines[-1]) if n.startswith(("spark-", "blockmgr-"))]
    assert spark_tmp
    assert not [n for n in spark_tmp if os.path.exists(os.path.join("/tmp", n))]


def test_removing_the_state_directory_never_follows_a_mount_into_the_host(sdk_client, workspace):
    sentinel_dir = tempfile.mkdtemp(prefix="host-sentinel-", dir="/var/tmp")
    sentinel = os.path.join(sentinel_dir, "keep.txt")
    with open(sentinel, "w") as f:
        f.write("host data")
    try:
        ctx = new_context(sdk_client)  # its view binds the host's /var (and /usr, /work...)
        assert text(sdk_client, ctx, "print(open(%r).read())" % sentinel) == "host data"
        root = os.path.join(cluster_dir(workspace._tmpdir, RUNNING_CLUSTER_ID), "root")
        assert os.listdir(os.path.join(root, "var")) == []  # from the host: an empty dir
        shutil.rmtree(workspace._tmpdir)  # while the context (and its mounts) is alive
        assert not os.path.exists(workspace._tmpdir)
        with open(sentinel) as f:
            assert f.read() == "host data"
        assert os.path.isfile(sys.executable) and os.listdir("/usr")
    finally:
        shutil.rmtree(sentinel_dir)


@pytest.mark.slow
@pytest.mark.spark
def test_without_isolation_driver_paths_fail_and_name_the_local_root(start_workspace):
    ws, w = start_workspace(isolation="none")
    ctx = new_context(w)
    local_root = host_path(ws._tmpdir, RUNNING_CLUSTER_ID, VOLUME + "/a.txt")
    for code in ("open(%r, 'w').write('x')" % (VOLUME + "/a.txt"),
                 "!cat %s/a.txt" % VOLUME):
        cause = error_text(run(w, ctx, code))
        assert "PermissionError" in cause
        assert "cannot map the driver paths" in cause and "isolation is switched off" in cause
        assert "Use the local root instead: %s" % local_root in cause
    # dbutils.fs maps the paths itself, so it still works, into the state directory.
    assert text(w, ctx, "dbutils.fs.put(%r, 'via dbutils')" % (VOLUME + "/a.txt")) \
        == "Wrote 11 bytes.\nOut[3]: True"
    with open(local_root) as f:
        assert f.read() == "via dbutils"
    # Spark's JVM runs on the host's view too: its paths are refused before they reach it.
    cause = error_text(run(w, ctx, "spark.range(3).write.parquet(%r)" % (VOLUME + "/nums"),
                           timeout=180))
    assert "PermissionError" in cause and "Use the local root instead" in cause
    assert not os.path.exists("/Volumes")


def test_when_the_clusters_view_cannot_be_built_driver_paths_fail_and_say_why(sdk_client,
                                                                              workspace):
    root = os.path.join(cluster_dir(workspace._tmpdir, RUNNING_CLUSTER_ID), "root")
    os.makedirs(os.path.dirname(root), exist_ok=True)
    open(root, "w").close()  # a file where the cluster's own / should be built
    ctx = new_context(sdk_client)
    cause = error_text(run(sdk_client, ctx, "open(%r, 'w')" % (VOLUME + "/x.txt")))
    assert "cannot map the driver paths" in cause and "Not a directory" in cause
    assert "Use the local root instead: %s" % host_path(workspace._tmpdir, None,
                                                         VOLUME + "/x.txt") in cause
    assert not os.path.exists("/Volumes")


def test_the_environment_switch_turns_isolation_off_for_serve(start_workspace, monkeypatch):
    monkeypatch.setenv("LOCAL_WORKSPACE_ISOLATION", "none")
    ws, w = start_workspace()
    ctx = new_context(w)
    cause = error_text(run(w, ctx, "import os; os.listdir('/dbfs')"))
    assert "PermissionError" in cause and "isolation is switched off" in cause
    assert "Use the local root instead: %s" % host_path(ws._tmpdir, None, "/dbfs") in cause
    assert text(w, ctx, "import os; print(os.environ.get('LOCAL_WORKSPACE_SANDBOX'))") \
        == "None"


# ------------------------------------------------------------------ dbutils.fs

def test_dbutils_fs_put_head_ls_cp_mv_rm_mkdirs_answer_like_a_cluster(sdk_client, workspace):
    ctx = new_context(sdk_client)
    assert text(sdk_client, ctx, "dbutils.fs.mkdirs('dbfs:/data/in')") == "Out[1]: True"
    assert text(sdk_client, ctx, "dbutils.fs.put('dbfs:/data/in/a.txt', 'hello world')") \
        == "Wrote 11 bytes.\nOut[2]: True"
    assert text(sdk_client, ctx, "dbutils.fs.head('/data/in/a.txt', 5)") \
        == "[Truncated to first 5 bytes]\nOut[3]: 'hello'"
    run(sdk_client, ctx, "dbutils.fs.mkdirs('/data/in/sub')")
    listed = text(sdk_client, ctx, "[(f.path, f.name, f.size, type(f.modificationTime).__name__)"
                                   " for f in dbutils.fs.ls('dbfs:/data/in')]")
    assert listed == ("Out[5]: [('dbfs:/data/in/a.txt', 'a.txt', 11, 'int'), "
                      "('dbfs:/data/in/sub/', 'sub/', 0, 'int')]")
    assert text(sdk_client, ctx, "type(dbutils.fs.ls('/data/in')[0]).__name__") \
        == "Out[6]: 'FileInfo'"
    assert text(sdk_client, ctx, "dbutils.fs.cp('/data/in/a.txt', 'dbfs:/data/out/b.txt')") \
        == "Out[7]: True"
    assert text(sdk_client, ctx, "dbutils.fs.mv('/data/out/b.txt', %r)" % (VOLUME + "/c.txt")) \
        == "Out[8]: True"
    assert text(sdk_client, ctx, "[f.path for f in dbutils.fs.ls(%r)]" % VOLUME) \
        == "Out[9]: ['dbfs:%s/c.txt']" % VOLUME
    assert text(sdk_client, ctx, "print(open('/dbfs/data/in/a.txt').read())") == "hello world"
    assert text(sdk_client, ctx, "dbutils.fs.cp('/data/in', '/data/copy', recurse=True)") \
        == "Out[11]: True"
    assert text(sdk_client, ctx, "dbutils.fs.rm('/data/copy', recurse=True)") == "Out[12]: True"
    assert text(sdk_client, ctx, "dbutils.fs.rm('/data/copy')") == "Out[13]: False"
    state = workspace._tmpdir
    assert open(host_path(state, None, "dbfs:/data/in/a.txt")).read() == "hello world"
    assert open(host_path(state, None, VOLUME + "/c.txt")).read() == "hello world"
    assert not os.path.exists(host_path(state, None, "dbfs:/data/out/b.txt"))
    assert not os.path.exists(host_path(state, None, "dbfs:/data/copy"))


def test_dbutils_fs_errors_carry_the_java_exception_text(sdk_client):
    ctx = new_context(sdk_client)
    missing = error_text(run(sdk_client, ctx, "dbutils.fs.ls('dbfs:/no/such')"))
    assert "ExecutionError" in missing
    assert "java.io.FileNotFoundException: File dbfs:/no/such does not exist." in missing
    run(sdk_client, ctx, "dbutils.fs.put('/x.txt', 'one')")
    again = error_text(run(sdk_client, ctx, "dbutils.fs.put('/x.txt', 'two')"))
    assert "FileAlreadyExistsException: File already exists: dbfs:/x.txt" in again
    assert text(sdk_client, ctx, "dbutils.fs.put('/x.txt', 'two', overwrite=True)\n"
                                 "dbutils.fs.head('/x.txt')") == "Wrote 3 bytes.\nOut[4]: 'two'"
    run(sdk_client, ctx, "dbutils.fs.put('/d/f.txt', 'x')")
    assert "non-empty directory" in error_text(run(sdk_client, ctx, "dbutils.fs.rm('/d')"))
    assert "recurse" in error_text(run(sdk_client, ctx, "dbutils.fs.cp('/d', '/e')"))
    assert "No FileSystem for scheme \"s3\"" in error_text(
        run(sdk_client, ctx, "dbutils.fs.ls('s3://bucket/key')"))


# ------------------------------------------------------------------ dbutils.secrets

def test_dbutils_secrets_get_list_and_redact_their_values(start_workspace):
    ws, w = start_workspace(secrets=SECRETS)
    ctx = new_context(w)
    assert text(w, ctx, "pw = dbutils.secrets.get('prod', 'db-password')\nprint(pw)\n"
                        "print('len', len(pw), pw == 'hunter2-s3cret')") \
        == "[REDACTED]\nlen 14 True"
    assert text(w, ctx, "dbutils.secrets.getBytes('dev', 'token')") == "Out[2]: b'[REDACTED]'"
    assert text(w, ctx, "dbutils.secrets.list('prod')") \
        == "Out[3]: [SecretMetadata(key='api-key'), SecretMetadata(key='db-password')]"
    assert text(w, ctx, "dbutils.secrets.listScopes()") \
        == "Out[4]: [SecretScope(name='dev'), SecretScope(name='prod')]"
    unknown = error_text(run(w, ctx, "dbutils.secrets.get('prod', 'nope')"))
    assert "Secret does not exist with scope: prod and key: nope" in unknown
    assert "Scope nowhere does not exist" in error_text(
        run(w, ctx, "dbutils.secrets.list('nowhere')"))
    leaked = run(w, ctx, "raise ValueError('bad password ' + pw)")
    assert "hunter2" not in leaked.cause and "[REDACTED]" in leaked.summary


def test_the_serve_command_takes_secrets_from_a_json_file(tmp_path):
    secrets_file = tmp_path / "secrets.json"
    secrets_file.write_text(json.dumps({"ops": {"token": "t0k3n-from-file"}}))
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__),
                                                          "local_workspace"),
                             "serve", "--secrets", str(secrets_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        exports = {}
        while "DATABRICKS_CLUSTER_ID" not in exports:
            line = proc.stdout.readline()
            assert line, "serve exited early: %s" % proc.stderr.read()
            if line.startswith("export "):
                key, _, value = line[len("export "):].strip().partition("=")
                exports[key] = value
        w = WorkspaceClient(config=Config(host=exports["DATABRICKS_HOST"],
                                          token=exports["DATABRICKS_TOKEN"]))
        ctx = new_context(w)
        assert text(w, ctx, "v = dbutils.secrets.get('ops', 'token')\n"
                            "print(v == 't0k3n-from-file', v)") == "True [REDACTED]"
    finally:
        proc.send_signal(subprocess.signal.SIGINT)
        assert proc.wait(timeout=20) == 0


# ------------------------------------------------------------------ widgets, jobs, library, help

def test_dbutils_widgets_define_get_and_remove(sdk_client):
    ctx = new_context(sdk_client)
    run(sdk_client, ctx, "dbutils.widgets.text('table', 'sales', 'Table')\n"
                         "dbutils.widgets.dropdown('env', 'dev', ['dev', 'prod'])\n"
                         "dbutils.widgets.combobox('region', 'eu', ['us', 'eu'])\n"
                         "dbutils.widgets.multiselect('days', 'mon,tue', ['mon', 'tue', 'wed'])")
    assert text(sdk_client, ctx, "dbutils.widgets.get('table')") == "Out[2]: 'sales'"
    assert text(sdk_client, ctx, "dbutils.widgets.getAll()") == (
        "Out[3]: {'table': 'sales', 'env': 'dev', 'region': 'eu', 'days': 'mon,tue'}")
    run(sdk_client, ctx, "dbutils.widgets.text('table', 'other')")  # a second definition: kept
    assert text(sdk_client, ctx, "dbutils.widgets.get('table')") == "Out[5]: 'sales'"
    run(sdk_client, ctx, "dbutils.widgets.remove('table')")
    missing = error_text(run(sdk_client, ctx, "dbutils.widgets.get('table')"))
    assert ("com.databricks.dbutils_v1.InputWidgetNotDefined: No input widget named table is "
            "defined") in missing
    assert "InputWidgetNotDefined" in error_text(
        run(sdk_client, ctx, "dbutils.widgets.remove('table')"))
    assert "is not one of the choices" in error_text(
        run(sdk_client, ctx, "dbutils.widgets.dropdown('bad', 'x', ['a', 'b'])"))
    run(sdk_client, ctx, "dbutils.widgets.removeAll()")
    assert text(sdk_client, ctx, "dbutils.widgets.getAll()") == "Out[11]: {}"


def test_task_values_outside_a_job_return_the_debug_value_or_raise(sdk_client):
    ctx = new_context(sdk_client)
    assert text(sdk_client, ctx, "dbutils.jobs.taskValues.set('rows', 42)\n"
                                 "dbutils.jobs.taskValues.get('ingest', 'rows', default=0, "
                                 "debugValue=7)") == "Out[1]: 7"
    needs_debug = error_text(run(sdk_client, ctx, "dbutils.jobs.taskValues.get('ingest', 'rows',"
                                                  " default=0)"))
    assert "TypeError" in needs_debug and "Must pass debugValue" in needs_debug
    assert "JSON" in error_text(run(sdk_client, ctx,
                                    "dbutils.jobs.taskValues.set('f', object())"))


def test_restart_python_ends_the_command(sdk_client):
    ctx = new_context(sdk_client)
    command = submit(sdk_client, ctx, "dbutils.library.restartPython()")
    done = wait_done(sdk_client, ctx, command)
    assert done.status == CommandStatus.FINISHED


def test_dbutils_help_lists_the_utilities(sdk_client):
    ctx = new_context(sdk_client)
    overview = text(sdk_client, ctx, "dbutils.help()")
    for name in ("fs:", "jobs:", "library:", "notebook:", "secrets:", "widgets:"):
        assert name in overview
    fs_help = text(sdk_client, ctx, "dbutils.fs.help()")
    for method in ("cp(", "head(", "ls(", "mkdirs(", "mv(", "put(", "rm("):
        assert method in fs_help
