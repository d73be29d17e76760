"""The Databricks Runtime's Python: the environment every cluster process of the local workspace runs on.

A real cluster runs its notebooks on the runtime's own Python with the runtime's library versions,
never on the laptop's. The local workspace does the same: on first start it builds a venv pinned to
a Databricks Runtime LTS's library versions and caches it under the user's cache directory:

    ${XDG_CACHE_HOME:-~/.cache}/databricks-repl/runtime-<dbr>-py<major.minor>/

The LTS is chosen by the host Python's minor version (the runtime's own Python minor version):
15.4 LTS for 3.11, 16.4 LTS for 3.12. The pins come from the release notes' "Installed Python
libraries" tables (URLs below; see ``references/local-workspace.md``). A marker file in the venv
holds the pin list, so a changed list rebuilds it. Concurrent builders (parallel test processes)
serialise on a file lock; the venv is built in a temporary dir beside the final one and renamed
into place, so a half-built venv is never used. The user's own environment is never touched.

    python tests/local_workspace runtime      # build (or check) the runtime, print its facts
"""

import collections
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time

RuntimeSpec = collections.namedtuple(
    "RuntimeSpec", "version spark_version python notes_url pins build_requires")
RuntimeEnv = collections.namedtuple("RuntimeEnv", "python version spark_version site_packages")

# Library versions from each LTS's release notes ("System environment" and "Installed Python
# libraries"). pyspark stands for the runtime's Apache Spark version.
RUNTIMES = {
    (3, 11): RuntimeSpec(
        version="15.4", spark_version="3.5.0", python="3.11",
        notes_url="https://docs.databricks.com/aws/en/release-notes/runtime/15.4lts",
        pins=("pyspark==3.5.0", "pandas==1.5.3", "numpy==1.23.5", "pyarrow==14.0.1",
              "scipy==1.11.1", "scikit-learn==1.3.0", "matplotlib==3.7.2", "joblib==1.2.0",
              "databricks-sdk==0.20.0"),
        build_requires=()),
    (3, 12): RuntimeSpec(
        version="16.4", spark_version="3.5.2", python="3.12",
        notes_url="https://docs.databricks.com/aws/en/release-notes/runtime/16.4lts",
        pins=("pyspark==3.5.2", "pandas==1.5.3", "numpy==1.26.4", "pyarrow==15.0.2",
              "scipy==1.13.1", "scikit-learn==1.4.2", "matplotlib==3.8.4", "joblib==1.4.2",
              "databricks-sdk==0.30.0"),
        # pandas 1.5.3 has no wheel for 3.12 and its sdist only builds with these (then without
        # pip's build isolation, whose newest setuptools lacks pkg_resources): ~10 min of C.
        build_requires=("setuptools<70", "Cython<3", "wheel", "numpy==1.26.4")),
}
MARKER = "databricks-repl-runtime.json"


class RuntimeBuildError(Exception):
    """The runtime environment cannot be built (no matching LTS, pip failed); the message says why."""


def runtime_spec(python_version=None):
    """The LTS whose Python minor version matches ``python_version`` (default: this Python)."""
    key = tuple((python_version or sys.version_info)[:2])
    spec = RUNTIMES.get(key)
    if spec is None:
        raise RuntimeBuildError(
            "no Databricks Runtime LTS with Python %d.%d is known to the local workspace; run it "
            "with Python %s" % (key + (" or ".join(s.python for s in RUNTIMES.values()),)))
    return spec


def cache_root():
    """``$XDG_CACHE_HOME/databricks-repl`` (``~/.cache/databricks-repl`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "databricks-repl")


def runtime_dir(spec):
    return os.path.join(cache_root(), "runtime-%s-py%s" % (spec.version, spec.python))


def _marker(spec):
    return {"version": spec.version, "spark_version": spec.spark_version,
            "pins": list(spec.pins), "build_requires": list(spec.build_requires)}


def _is_current(path, spec):
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            return json.load(f) == _marker(spec)
    except (OSError, ValueError):
        return False


def _env_of(path, spec):
    python = os.path.join(path, "bin", "python")
    site = os.path.join(path, "lib", "python%s" % spec.python, "site-packages")
    return RuntimeEnv(python=python, version=spec.version, spark_version=spec.spark_version,
                      site_packages=site)


def _say(progress, message):
    if progress is not None:
        progress.write("[local workspace] %s\n" % message)
        progress.flush()


def ensure_runtime(progress=sys.stderr):
    """The runtime environment, built on first use: ``RuntimeEnv(python, version, spark_version,
    site_packages)`` (``python``: the venv's interpreter; ``version``: e.g. "15.4").

    Progress goes to ``progress`` (a line per step; pip's own progress bar only on a TTY).
    Raises ``RuntimeBuildError`` when no LTS matches this Python or pip fails (the message carries
    the tail of pip's log)."""
    spec = runtime_spec()
    final = runtime_dir(spec)
    if _is_current(final, spec):
        return _env_of(final, spec)
    os.makedirs(cache_root(), exist_ok=True)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if not _is_current(final, spec):
            _build(spec, final, progress)
    return _env_of(final, spec)


def _build(spec, final, progress):
    started = time.monotonic()
    building = "%s.building-%d" % (final, os.getpid())
    shutil.rmtree(building, ignore_errors=True)
    scratch = building + ".tmp"  # pip's TMPDIR: an sdist build must not land in the host's /tmp
    os.makedirs(scratch, exist_ok=True)
    log_path = final + ".log"
    tty = progress is not None and hasattr(progress, "isatty") and progress.isatty()
    _say(progress, "building the Databricks Runtime %s LTS Python environment in %s (once; "
                   "pyspark is a ~300 MB download, this can take minutes)" % (spec.version, final))
    try:
        _say(progress, "step 1/3: python -m venv")
        _run([sys.executable, "-m", "venv", building], log_path, tty=False, scratch=scratch)
        python = os.path.join(building, "bin", "python")
        pip = ([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
               + ([] if tty else ["--progress-bar", "off"]))
        isolation = []
        if spec.build_requires:
            _say(progress, "step 2/3: pip install %s (to build what has no wheel)"
                 % " ".join(spec.build_requires))
            _run(pip + list(spec.build_requires), log_path, tty=tty, scratch=scratch)
            isolation = ["--no-build-isolation"]
        _say(progress, "step 2/3: pip install %s" % " ".join(spec.pins))
        _run(pip + isolation + list(spec.pins), log_path, tty=tty, scratch=scratch)
        _say(progress, "step 3/3: checking the install")
        _run([python, "-c", "import pyspark, pandas, numpy, pyarrow, sklearn, scipy, "
                            "matplotlib, joblib; assert pyspark.__version__ == %r"
              % spec.spark_version], log_path, tty=False, scratch=scratch)
        with open(os.path.join(building, MARKER), "w", encoding="utf-8") as f:
            json.dump(_marker(spec), f)
        if os.path.exists(final):  # a stale pin list: replace it
            stale = "%s.stale-%d" % (final, os.getpid())
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(building, final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    _say(progress, "runtime %s ready in %.0f s" % (spec.version, time.monotonic() - started))


def _run(argv, log_path, tty, scratch):
    env = dict(os.environ, TMPDIR=scratch, PIP_NO_INPUT="1")
    env.pop("PYTHONPATH", None)
    env.pop("PIP_USER", None)
    with open(log_path, "ab") as log:
        log.write(("$ %s\n" % " ".join(argv)).encode())
        log.flush()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, env=env,
                              stdout=None if tty else log, stderr=None if tty else log)
    if proc.returncode != 0:
        try:
            with open(log_path, "rb") as f:
                tail = f.read()[-1500:].decode("utf-8", "replace")
        except OSError:
            tail = ""
        raise RuntimeBuildError("building the runtime environment failed (exit %d) at: %s\n%s\n"
                            "(full log: %s)" % (proc.returncode, " ".join(argv[:4]), tail,
                                                log_path))


def main(argv=None):
    try:
        env = ensure_runtime()
    except RuntimeBuildError as e:
        print(json.dumps({"status": "Error", "message": str(e)}))
        return 1
    print(json.dumps(env._asdict()))
    return 0
