"""The Databricks Runtimes: the Python environment each cluster's processes run on.

A real cluster runs its notebooks on its Databricks Runtime's own Python, with the runtime's
library versions, never on the laptop's. Here each cluster's runtime comes from its
``spark_version`` (``15.4.x-scala2.12`` -> 15.4 LTS): a venv on that runtime's Python minor
version with the release notes' installed Python libraries pinned exactly
(``runtimes/<version>.txt``), built once and cached under the user's cache directory:

    ${XDG_CACHE_HOME:-~/.cache}/databricks-repl/runtime-<dbr>-py<major.minor>/

Builds are lazy: the first start of a cluster that needs a runtime builds it (``Builds``, which
the clusters backend owns), never the server's start. The runtime's interpreter is found on the
host (``find_interpreter``): pyenv's versions first, then ``python3.X`` on ``PATH``; where there
is none, the cluster fails to start with a message naming it and how to install it.

A marker file in the venv holds the pin list, so a changed list rebuilds it. Concurrent builders
(parallel test processes) serialise on a file lock, and a waiting process says so on stderr; the
venv is built in a temporary dir beside the final one and renamed into place, so a half-built
venv is never used. The user's own environment is never touched.

    python tests/local_workspace runtime [--version 17.3 | --all]   # build (or check) runtimes
"""

import argparse
import collections
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

Runtime = collections.namedtuple(
    "Runtime", "version python spark scala notes_url build_first optional left_out")
RuntimeEnv = collections.namedtuple(
    "RuntimeEnv", "version python spark_version site_packages python_version")

_NOTES = "https://docs.databricks.com/aws/en/release-notes/runtime/%slts"
# What the release notes list that pip cannot install anywhere: Ubuntu's own packages.
_OS_PACKAGES = ("dbus-python and PyGObject: Ubuntu's bindings to its system libraries (D-Bus, "
                "GObject), built against the OS, not from PyPI",
                "unattended-upgrades: an Ubuntu package with no PyPI release")
# Installed after the rest, and left out (with a progress line) where they cannot be built here.
_NEEDS_LIBPQ = ("psycopg2",)

# The LTS runtimes: version, Python, Apache Spark (the pyspark pin), Scala, release notes.
# Their libraries: runtimes/<version>.txt. See tests/local_workspace/README.md, "Runtime and Spark".
RUNTIMES = collections.OrderedDict((r.version, r) for r in (
    Runtime("15.4", python="3.11", spark="3.5.0", scala="2.12", notes_url=_NOTES % "15.4",
            build_first=(), optional=_NEEDS_LIBPQ, left_out=_OS_PACKAGES),
    Runtime("16.4", python="3.12", spark="3.5.2", scala="2.12", notes_url=_NOTES % "16.4",
            # pandas 1.5.3 has no wheel for 3.12 and its sdist only builds with these (then
            # without pip's build isolation, whose newest setuptools lacks pkg_resources).
            build_first=(("pandas", ("setuptools<70", "Cython<3", "wheel", "numpy==1.26.4")),),
            optional=_NEEDS_LIBPQ, left_out=_OS_PACKAGES),
    Runtime("17.3", python="3.12", spark="4.0.0", scala="2.13", notes_url=_NOTES % "17.3",
            build_first=(), optional=_NEEDS_LIBPQ, left_out=_OS_PACKAGES),
))
MARKER = "databricks-repl-runtime.json"
PYTHONS_ENV = "LOCAL_WORKSPACE_PYTHONS"  # dirs searched for python3.X instead of pyenv and PATH
LOCK_REPORT_EVERY = 10.0  # seconds between "still waiting" lines
BUILD_TIMEOUT = 60 * 60.0  # a build (or a wait for another's) that takes longer is given up


class RuntimeBuildError(Exception):
    """The runtime environment cannot be had (pip failed, no interpreter...); the message says
    why and what to do. ``code``: the cluster's termination reason code when it fails to start
    over it (compute.TerminationReasonCode)."""

    code = "SPARK_ERROR"


class RuntimeNotAvailable(RuntimeBuildError):
    """No such runtime can be had on this machine (an unknown spark_version)."""

    code = "SPARK_IMAGE_NOT_FOUND"


class InterpreterMissing(RuntimeNotAvailable):
    """No Python of the runtime's minor version on this machine."""


# ------------------------------------------------------------------ the table

def runtime_version(spark_version):
    """The runtime of a cluster's ``spark_version`` ("17.3.x-scala2.13" -> "17.3"), or None
    when the local workspace has no such runtime."""
    match = re.match(r"(\d+\.\d+)\.x-", spark_version or "")
    version = match.group(1) if match else None
    return version if version in RUNTIMES else None


def spark_version_of(version):
    """The clusters API's ``spark_version`` of a runtime: "15.4" -> "15.4.x-scala2.12"."""
    return "%s.x-scala%s" % (version, RUNTIMES[version].scala)


def requirements_path(runtime):
    return os.path.join(HERE, "runtimes", "%s.txt" % runtime.version)


def requirements(runtime):
    """The runtime's pins, in file order (``name==version``, comments dropped)."""
    with open(requirements_path(runtime), encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def pin(runtime, name):
    """The pinned version of ``name`` in the runtime ("pandas" -> "1.5.3"), or None."""
    for line in requirements(runtime):
        if _name(line) == _name(name + "=="):
            return line.split("==", 1)[1]
    return None


def _name(line):
    return re.sub(r"[-_.]+", "-", line.split("==", 1)[0]).lower()


# ------------------------------------------------------------------ what a runtime sets

# The runtime whose Apache Spark serves Spark Connect for a standard access mode cluster of any
# runtime: pyspark 4.0.0's package ships a Connect server (jars/spark-connect_2.13-4.0.0.jar),
# pyspark 3.5's does not, and nothing offline provides one.
CONNECT_RUNTIME = "17.3"
# The time zone a cluster runs in: its session time zone and its processes' clock (TZ).
SESSION_TIME_ZONE = "Etc/UTC"


def at_least(version, minimum):
    """Is the runtime ``version`` ("15.4") ``minimum`` ("17.0") or newer?"""
    return tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


def spark_defaults(version):
    """The Spark configuration a Databricks Runtime sets that code depends on, beyond Apache
    Spark's own defaults (sources: tests/local_workspace/README.md, "Runtime defaults"):
    Arrow-based conversion between pandas and Spark, the UTC session time zone, and ANSI mode
    as the runtime has it (on from DBR 17.0 with Spark 4.0, off before)."""
    return {"spark.sql.execution.arrow.pyspark.enabled": "true",
            "spark.sql.session.timeZone": SESSION_TIME_ZONE,
            "spark.sql.ansi.enabled": "true" if at_least(version, "17.0") else "false"}


# ------------------------------------------------------------------ where things are

def cache_root():
    """``$XDG_CACHE_HOME/databricks-repl`` (``~/.cache/databricks-repl`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "databricks-repl")


def runtime_dir(runtime):
    return os.path.join(cache_root(), "runtime-%s-py%s" % (runtime.version, runtime.python))


def _pyenv_roots():
    roots = [os.environ.get("PYENV_ROOT")]
    if shutil.which("pyenv"):
        try:
            roots.append(subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                                        timeout=10).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    roots.append(os.path.join(os.path.expanduser("~"), ".pyenv"))
    return [r for r in dict.fromkeys(roots) if r]


def _candidates(python):
    """Where a ``python<minor>`` may live: the dirs of ``$LOCAL_WORKSPACE_PYTHONS`` when set,
    else pyenv's versions (newest patch first), then ``PATH``."""
    name = "python" + python
    configured = os.environ.get(PYTHONS_ENV)
    if configured is not None:
        return [os.path.join(d, name) for d in configured.split(os.pathsep) if d]
    found = []
    for root in _pyenv_roots():
        versions = glob.glob(os.path.join(root, "versions", python + ".*", "bin", name))
        found += sorted(versions, key=_patch_level, reverse=True)
    on_path = shutil.which(name)
    return found + ([on_path] if on_path else [])


def _patch_level(path):
    version = os.path.basename(os.path.dirname(os.path.dirname(path)))
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def _search_description(python):
    configured = os.environ.get(PYTHONS_ENV)
    if configured is not None:
        return "python%s in %s=%r" % (python, PYTHONS_ENV, configured)
    return ("pyenv's versions/%s.* under %s, then python%s on PATH"
            % (python, " and ".join(_pyenv_roots()), python))


def find_interpreter(python):
    """A working ``python<minor>`` (e.g. "3.12") on this machine: its path.

    Raises InterpreterMissing naming where it looked and how to install one."""
    for candidate in _candidates(python):
        if not os.access(candidate, os.X_OK):
            continue
        try:
            out = subprocess.run([candidate, "-c", "import sys, venv; print('%d.%d' % "
                                                   "sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0 and out.stdout.strip() == python:
            return candidate
    raise InterpreterMissing(
        "Python %s is not installed on this machine (looked for %s). Install it, e.g. "
        "`pyenv install %s` or your system's python%s package with its venv module, then start "
        "the cluster again." % (python, _search_description(python), python, python))


# ------------------------------------------------------------------ building

def _marker(runtime):
    with open(requirements_path(runtime), "rb") as f:
        pins = hashlib.sha256(f.read()).hexdigest()
    return {"version": runtime.version, "python": runtime.python, "spark": runtime.spark,
            "requirements_sha256": pins,
            "build_first": [[name, list(tools)] for name, tools in runtime.build_first]}


def _is_current(path, runtime):
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    # A venv whose base interpreter is gone (pyenv uninstall) is not usable either.
    return (all(marker.get(k) == v for k, v in _marker(runtime).items())
            and os.path.exists(os.path.join(path, "bin", "python")))


def _env_of(path, runtime):
    site = os.path.join(path, "lib", "python%s" % runtime.python, "site-packages")
    return RuntimeEnv(version=runtime.version, python=os.path.join(path, "bin", "python"),
                      spark_version=runtime.spark, site_packages=site,
                      python_version=runtime.python)


def ready_runtime(version):
    """The runtime's environment when it is built and current, else None (never builds)."""
    runtime = RUNTIMES[version]
    path = runtime_dir(runtime)
    return _env_of(path, runtime) if _is_current(path, runtime) else None


def _say(progress, message):
    if progress is not None:
        progress.write("[local workspace] %s\n" % message)
        progress.flush()


def ensure_runtime(version, progress=sys.stderr, cancel=None):
    """The runtime's environment, built on first use: ``RuntimeEnv(version, python,
    spark_version, site_packages, python_version)`` (``python``: the venv's interpreter).

    ``progress``: a line per step (pip's own progress bar only on a TTY). ``cancel``: a
    threading.Event that stops a build or a wait for another's (RuntimeBuildError).
    Raises InterpreterMissing when the runtime's Python is not on this machine, and
    RuntimeBuildError when pip fails (the message carries the tail of pip's log)."""
    runtime = RUNTIMES[version]
    final = runtime_dir(runtime)
    if _is_current(final, runtime):
        return _env_of(final, runtime)
    interpreter = find_interpreter(runtime.python)
    os.makedirs(cache_root(), exist_ok=True)
    with _locked(final + ".lock", runtime, progress, cancel):
        if not _is_current(final, runtime):
            _build(runtime, interpreter, final, (progress, cancel))
    return _env_of(final, runtime)


class _locked:
    """The build's file lock; while another process holds it, say so every LOCK_REPORT_EVERY s."""

    def __init__(self, path, runtime, progress, cancel):
        self.path, self.runtime, self.progress, self.cancel = path, runtime, progress, cancel
        self.file = None

    def __enter__(self):
        self.file = open(self.path, "w")
        started = time.monotonic()
        next_report = started
        while True:
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                pass
            waited = time.monotonic() - started
            if time.monotonic() >= next_report:
                _say(self.progress, "waiting for another build of the Databricks Runtime %s "
                                    "environment to finish (lock %s): %.0f s so far"
                     % (self.runtime.version, self.path, waited))
                next_report += LOCK_REPORT_EVERY
            if waited > BUILD_TIMEOUT or (self.cancel is not None and self.cancel.is_set()):
                self.file.close()
                raise RuntimeBuildError("gave up waiting for another build of the Databricks "
                                        "Runtime %s environment after %.0f s (lock %s)"
                                        % (self.runtime.version, waited, self.path))
            time.sleep(0.2)

    def __exit__(self, *exc):
        self.file.close()  # releases the lock


def _build(runtime, interpreter, final, watch):
    progress, cancel = watch
    started = time.monotonic()
    building = "%s.building-%d" % (final, os.getpid())
    shutil.rmtree(building, ignore_errors=True)
    scratch = building + ".tmp"  # pip's TMPDIR: an sdist build must not land in the host's /tmp
    os.makedirs(scratch, exist_ok=True)
    log_path = final + ".log"
    tty = progress is not None and hasattr(progress, "isatty") and progress.isatty()
    run = _Runner(log_path, scratch, cancel, started + BUILD_TIMEOUT)
    _say(progress, "building the Databricks Runtime %s LTS environment (Python %s, Spark %s) in "
                   "%s, once: about 200 pinned libraries, pyspark alone a ~300-400 MB download; "
                   "a few minutes" % (runtime.version, runtime.python, runtime.spark, final))
    try:
        _say(progress, "step 1/4: %s -m venv" % interpreter)
        run([interpreter, "-m", "venv", building], tty=False)
        python = os.path.join(building, "bin", "python")
        pip = ([python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                "--no-warn-script-location"] + ([] if tty else ["--progress-bar", "off"]))
        missing = _install_pins(runtime, lambda args: run(pip + args, tty=tty), scratch,
                                progress)
        _say(progress, "step 4/4: checking the install")
        run([python, "-c", "import pyspark, pandas, numpy, pyarrow, sklearn, scipy, matplotlib, "
                           "joblib, cloudpickle; assert pyspark.__version__ == %r, "
                           "pyspark.__version__" % runtime.spark], tty=False)
        with open(os.path.join(building, MARKER), "w", encoding="utf-8") as f:
            json.dump(dict(_marker(runtime), not_built=missing), f)
        if os.path.exists(final):  # a stale pin list: replace it
            stale = "%s.stale-%d" % (final, os.getpid())
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(building, final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    _say(progress, "runtime %s ready in %.0f s" % (runtime.version, time.monotonic() - started))


def _install_pins(runtime, pip, scratch, progress):
    """pip install the runtime's pins (``pip(args)``): first what must be built against older
    tools (``build_first``, without build isolation), then the whole list in one go (pip only
    checks that the exact pins fit), then the optional ones one by one. Returns the optional
    pins that did not build (left out)."""
    pins = requirements(runtime)
    for name, tools in runtime.build_first:
        line = next(p for p in pins if _name(p) == _name(name + "=="))
        _say(progress, "step 2/4: building %s first, with %s" % (line, " ".join(tools)))
        pip(list(tools))
        pip(["--no-build-isolation", "--no-deps", line])
    optional = [p for p in pins if _name(p) in {_name(o + "==") for o in runtime.optional}]
    required = os.path.join(scratch, "requirements.txt")
    with open(required, "w", encoding="utf-8") as f:
        f.write("\n".join(p for p in pins if p not in optional) + "\n")
    _say(progress, "step 2/4: pip install -r %s (%d pins)"
         % (requirements_path(runtime), len(pins) - len(optional)))
    pip(["-r", required])
    missing = []
    for line in optional:
        _say(progress, "step 3/4: pip install %s (needs the OS's development files)" % line)
        try:
            pip(["--no-deps", line])
        except RuntimeBuildError:
            missing.append(line)
            _say(progress, "left out %s: it does not build on this machine (see the build log)"
                 % line)
    return missing


class _Runner:
    """Runs one build step: its output to the build log, its own process group (killed when
    ``cancel`` is set or the build's deadline passes)."""

    def __init__(self, log_path, scratch, cancel, deadline):
        self.log_path, self.scratch, self.cancel, self.deadline = log_path, scratch, cancel, deadline

    def __call__(self, argv, tty):
        env = dict(os.environ, TMPDIR=self.scratch, PIP_NO_INPUT="1")
        for name in ("PYTHONPATH", "PYTHONHOME", "PIP_USER", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV"):
            env.pop(name, None)
        with open(self.log_path, "ab") as log:
            log.write(("$ %s\n" % " ".join(argv)).encode())
            log.flush()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env,
                                    stdout=None if tty else log, stderr=None if tty else log,
                                    start_new_session=True)
            stopped = None
            while proc.poll() is None:
                if self.cancel is not None and self.cancel.wait(0.25):
                    stopped = "stopped"
                elif self.cancel is None:
                    time.sleep(0.25)
                if time.monotonic() > self.deadline:
                    stopped = "timed out after %.0f s" % BUILD_TIMEOUT
                if stopped:
                    _kill_group(proc)
        if stopped:
            raise RuntimeBuildError("building the runtime environment %s at: %s"
                                    % (stopped, " ".join(argv[:4])))
        if proc.returncode != 0:
            raise RuntimeBuildError("building the runtime environment failed (exit %d) at: %s\n"
                                    "%s\n(full log: %s)" % (proc.returncode, " ".join(argv[:6]),
                                                            self._tail(), self.log_path))

    def _tail(self):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 1500))
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()


# ------------------------------------------------------------------ lazy builds

class Builds:
    """The runtime builds of one local workspace, each in its own thread (lazy: a cluster's
    start asks for them, never the server's start). One build per runtime at a time in this
    process (other processes: the file lock); ``stop()`` ends them (their pip is killed)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._threads = []
        self._serial = {}  # version -> threading.Lock
        self._stopping = threading.Event()

    @staticmethod
    def ready(versions):
        """Is every runtime of ``versions`` built and current? (never builds)"""
        return all(v is not None and ready_runtime(v) is not None for v in versions)

    def then(self, versions, then, failed):
        """Build ``versions`` in a thread, then call ``then()``; when one cannot be had
        (``None``: no such runtime here; no interpreter; pip failed), ``failed(error)`` with a
        RuntimeBuildError instead. Neither is called once ``stop()`` began."""
        thread = threading.Thread(target=self._build, args=(list(versions), then, failed),
                                  name="runtime-build", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _build(self, versions, then, failed):
        try:
            for version in versions:
                if version is None:
                    raise RuntimeNotAvailable("the local workspace has no such Databricks "
                                              "Runtime (it has %s)"
                                              % ", ".join(map(spark_version_of, RUNTIMES)))
                with self._lock:
                    serial = self._serial.setdefault(version, threading.Lock())
                with serial:  # one build per runtime here; the others then find it built
                    ensure_runtime(version, cancel=self._stopping)
        except Exception as e:  # the caller's cluster fails to start; the server goes on
            if not self._stopping.is_set():
                failed(e if isinstance(e, RuntimeBuildError)
                       else RuntimeBuildError("%s: %s" % (type(e).__name__, e)))
            return
        if not self._stopping.is_set():
            then()

    def stop(self, timeout=10.0):
        """Builds see the stop and kill their pip; wait for their threads."""
        self._stopping.set()
        with self._lock:
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


# ------------------------------------------------------------------ CLI

def main(argv=None, default_versions=()):
    parser = argparse.ArgumentParser(
        prog="python tests/local_workspace runtime",
        description="Build (or check) the Databricks Runtime environments; print their facts.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", action="append", choices=list(RUNTIMES),
                       help="a runtime to build (repeatable); default: the default clusters'")
    which.add_argument("--all", action="store_true", help="every runtime: %s" % ", ".join(RUNTIMES))
    args = parser.parse_args(argv)
    versions = list(RUNTIMES) if args.all else (args.version or list(default_versions))
    status = 0
    for version in versions:
        started = time.monotonic()
        try:
            env = ensure_runtime(version)
        except RuntimeBuildError as e:
            print(json.dumps({"status": "Error", "version": version, "message": str(e)}))
            status = 1
            continue
        print(json.dumps(dict(env._asdict(), seconds=round(time.monotonic() - started, 1))))
    return status
