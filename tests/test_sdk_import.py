"""The CLI's databricks-sdk import: the fast path (package __init__ bypassed), the normal import
(DBX_REPL_SDK_IMPORT=full), and the fallback when the SDK's layout does not allow the fast path.

Behaviour only: which path was taken and that the CLI still works. No timing assertions."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from local_workspace import RUNNING_CLUSTER_ID
from repl_harness import ROOT, cli_env


def debug_import_path(stderr):
    lines = [l for l in stderr.splitlines() if "databricks-sdk import path:" in l]
    assert lines, stderr
    return lines[-1].rsplit(":", 1)[1].strip()


@pytest.mark.slow
def test_fast_path_is_the_default_and_full_import_is_forced_by_env(session):
    fast = session.run("exec", "--command", "print(6 * 7)", "--tag", "fast", "--debug")
    assert fast.status == "Finished" and fast["stdout_preview"] == "42\n", fast
    assert debug_import_path(fast.stderr) == "fast"

    full = session.run("exec", "--command", "print(6 * 7)", "--tag", "full", "--debug",
                       env={"DBX_REPL_SDK_IMPORT": "full"})
    assert full.status == "Finished" and full["stdout_preview"] == "42\n", full
    assert debug_import_path(full.stderr) == "full"


@pytest.mark.slow
def test_both_paths_map_the_same_errors(repl):
    """An unknown cluster: the error classes come from either import and map to the same answer."""
    bodies = []
    for mode in ("fast", "full"):
        call = repl.run("create", "--cluster-id", "0000-000000-nothere0", "--session-name", "x",
                        env={"DBX_REPL_SDK_IMPORT": mode})
        assert call.code != 0
        bodies.append((call.status, call.get("cluster_id")))
    assert bodies[0] == bodies[1] and bodies[0][0] == "ClusterNotFound", bodies


# A driver that simulates a changed SDK layout before running the CLI in-process: a `databricks`
# namespace portion whose sdk/config.py raises, placed first on databricks.__path__. The fast path
# picks it (it has sdk/config.py) and fails; the normal import still finds the real package (a
# regular package with __init__.py wins over a bare directory).
LAYOUT_CHANGE = textwrap.dedent(r'''
    import atexit, json, os, shutil, sys, tempfile
    fake = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, fake, True)   # nothing left in the host's /tmp
    os.makedirs(os.path.join(fake, "sdk"))
    with open(os.path.join(fake, "sdk", "config.py"), "w") as f:
        f.write("raise ImportError('simulated layout change: Config moved')\n")
    import databricks
    databricks.__path__.insert(0, fake)
    sys.path.insert(0, sys.argv[1])
    import dbx_repl
    code = dbx_repl.main(sys.argv[2:])
    sys.stdout.flush()
    loaded = dbx_repl._SDK.loaded
    print(json.dumps({"import_path": loaded.import_path if loaded else None,
                      "stub_left": getattr(sys.modules.get("databricks.sdk"), "__dbx_repl_stub__", False),
                      "real_config": "databricks.sdk.config" in sys.modules and
                                     not sys.modules["databricks.sdk.config"].__file__.startswith(fake)}),
          file=sys.stderr)
    sys.exit(code)
''')

MISSING_CONFIG = textwrap.dedent(r'''
    import json, os, sys
    real_isfile = os.path.isfile
    os.path.isfile = lambda p: False if p.endswith(os.path.join("sdk", "config.py")) else real_isfile(p)
    sys.path.insert(0, sys.argv[1])
    import dbx_repl
    code = dbx_repl.main(sys.argv[2:])
    os.path.isfile = real_isfile
    sys.stdout.flush()
    print(json.dumps({"import_path": dbx_repl._SDK.loaded.import_path}), file=sys.stderr)
    sys.exit(code)
''')


def run_driver(script, repl, *argv):
    proc = subprocess.run([sys.executable, "-c", script, ROOT, *argv], capture_output=True, text=True,
                          timeout=120, cwd=repl.cwd, env=cli_env(repl.workspace, repl.home))
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, (proc.stdout, proc.stderr)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return proc.returncode, json.loads(lines[0]), report


@pytest.mark.slow
def test_a_changed_sdk_layout_falls_back_to_the_normal_import(session):
    code, body, report = run_driver(LAYOUT_CHANGE, session, "exec", "--project-dir", session.project_dir,
                                    "--command", "print('fallback works')", "--tag", "layout")
    assert code == 0 and body["status"] == "Finished", body
    assert body["stdout_preview"] == "fallback works\n"
    assert report == {"import_path": "full", "stub_left": False, "real_config": True}, report


@pytest.mark.slow
def test_a_missing_config_module_falls_back_too(repl):
    code, body, report = run_driver(MISSING_CONFIG, repl, "find-cluster", "--name", "dev")
    assert code == 0, body
    assert RUNNING_CLUSTER_ID in json.dumps(body)
    assert report == {"import_path": "full"}


def test_fast_import_skips_the_service_and_cloud_auth_modules():
    """The point of the fast path: no databricks.sdk.service.* API modules, and the Google/Azure auth
    modules (cryptography, provisioning) load only when used."""
    script = textwrap.dedent('''
        import json, sys
        sys.path.insert(0, sys.argv[1])
        import dbx_repl
        sdk = dbx_repl._SDK.get()
        print(json.dumps({"import_path": sdk.import_path,
                          "has_config": hasattr(sdk.Config, "host"),
                          "has_errors": hasattr(sdk.errors, "NotFound"),
                          "compute_loaded": "databricks.sdk.service.compute" in sys.modules,
                          "cryptography_loaded": "cryptography" in sys.modules,
                          "package_init_bypassed": getattr(sys.modules["databricks.sdk"], "__dbx_repl_stub__",
                                                           False)}))
        # The deferred auth modules still work when an auth method needs them.
        import databricks.sdk.credentials_provider as cp
        import databricks.sdk.azure as azure
        assert cp.service_account.Credentials and cp.impersonated_credentials.Credentials
        assert azure.Workspace.__module__ == "databricks.sdk.service.provisioning"
        print(json.dumps({"deferred_usable": True}))
    ''')
    env = {k: v for k, v in os.environ.items() if k != "DBX_REPL_SDK_IMPORT"}
    proc = subprocess.run([sys.executable, "-c", script, ROOT], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    report, usable = [json.loads(line) for line in proc.stdout.splitlines()]
    assert report == {"import_path": "fast", "has_config": True, "has_errors": True, "compute_loaded": False,
                      "cryptography_loaded": False, "package_init_bypassed": True}, report
    assert usable == {"deferred_usable": True}
