"""Try the skill with no Databricks workspace: start the local workspace and run a real session.

    python tests/demo.py [--keep]

The first run builds the dev cluster's Databricks Runtime environment (15.4 LTS: pyspark,
pandas, scikit-learn...; minutes, progress on stderr) under ~/.cache/databricks-repl; later runs
reuse it.

Every step runs the CLI as a subprocess, exactly as an agent would, and prints the command and its
JSON response. The exit code is 0 only when every step ends with the status it should (the
deliberate `1 / 0` ends in Error; any other Error fails the demo). The session lives in a
temporary project dir (kept with --keep so you can look at session.json and repl_outputs/).
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from local_workspace import LocalWorkspace  # noqa: E402
from local_workspace.runtime import ensure_runtime  # noqa: E402

# (script, args, the status its JSON answer must have)
STEPS = [
    ("find_cluster.py", ["--name", "dev"], "Found"),
    ("dbx_repl.py", ["create", "--cluster-id", "{cluster}", "--session-name", "demo"], "Created"),
    ("dbx_repl.py", ["exec", "--tag", "fib", "--command",
                     "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\nprint(fib(10))"],
     "Finished"),
    ("dbx_repl.py", ["exec", "--tag", "table", "--command",
                     "display([{'n': n, 'square': n * n} for n in range(1000)])"], "Finished"),
    ("dbx_repl.py", ["exec", "--tag", "spark", "--command",
                     "df = spark.range(1, 1001).selectExpr('id % 3 AS bucket', 'id')\n"
                     "display(df.groupBy('bucket').count().orderBy('bucket'))"], "Finished"),
    ("dbx_repl.py", ["exec", "--tag", "oops", "--command", "1 / 0"], "Error"),
    ("dbx_repl.py", ["exec", "--tag", "llm", "--command",
                     "print(sub_llm_batch(['upper: hello', 'sentiment: what a great day', 'sum: 1 2 3']))\n"
                     "print(sub_llm_usage()['calls'], 'calls')"], "Finished"),
    ("dbx_repl.py", ["exec", "--tag", "slow", "--timeout", "1", "--command", "import time\ntime.sleep(30)"],
     "Running"),
    ("dbx_repl.py", ["cancel"], "Cancelled"),
    ("dbx_repl.py", ["status"], "Active"),
    ("dbx_repl.py", ["export"], "Exported"),
    ("dbx_repl.py", ["destroy"], "Destroyed"),
]


def main():
    keep = "--keep" in sys.argv
    project = tempfile.mkdtemp(prefix="dbx-repl-demo-")
    with LocalWorkspace() as workspace:
        from local_workspace import RUNNING_CLUSTER_ID
        # The cluster builds its runtime on first use; build it first, so no step waits on it.
        ensure_runtime(workspace.clusters.runtime_of(RUNNING_CLUSTER_ID))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DATABRICKS_")}
        env.update(DATABRICKS_HOST=workspace.host, DATABRICKS_TOKEN=workspace.token)
        print(f"# local workspace at {workspace.host}; project dir {project}\n")
        failures = []
        for script, args, expected in STEPS:
            args = [a.replace("{cluster}", RUNNING_CLUSTER_ID) for a in args]
            argv = [sys.executable, os.path.join(ROOT, script), *args]
            print("$ python " + " ".join(shlex.quote(a) for a in [script, *args]))
            proc = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=120)
            try:
                body = json.loads(proc.stdout)
                print(json.dumps(body, indent=2)[:1500])
            except json.JSONDecodeError:
                body = {}
                print(proc.stdout, proc.stderr)
            print(f"(exit {proc.returncode})\n")
            if body.get("status") != expected:
                failures.append(f"{script} {args[0]}: {body.get('status')!r}, expected {expected!r}")
    if keep:
        print(f"# kept {project}: see session.json and repl_outputs/")
    else:
        import shutil
        shutil.rmtree(project, ignore_errors=True)
    for failure in failures:
        print("# FAILED " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
