"""How a cluster's processes see the driver's paths (``paths.py``) at their real names.

On Linux every cluster process starts in its own mount namespace, chrooted into
``<state>/clusters/<id>/root``: a directory holding one mount point per top-level entry of the
host's ``/``, each a recursive bind mount of the host's entry (symlinks such as ``/lib -> usr/lib``
are recreated as symlinks), except the driver paths, which are bind mounts of the state
directory (``paths.mounts``): ``/Volumes``, ``/dbfs``, ``/Workspace``, ``/local_disk0``, ``/tmp``
and ``/databricks/driver`` (the working directory, as on a driver). So Python file APIs, ``%sh``
and Spark's JVM all land in the state directory, and nothing reaches the host's own ``/Volumes``
or ``/tmp``.

What a cluster process needs where a driver path hides it (a checkout or a runtime cache under
the host's ``/tmp``) is bound under ``HOST_ALIASES`` and named there in its argv and environment,
so the cluster's ``/tmp`` shows nothing of the host's (``_hidden_needs``).

The mounts live only in the namespace (``/`` is made private first, so nothing propagates back):
they go away when its last process exits, and from the host the mount points are empty
directories, so ``shutil.rmtree(state_dir)`` never follows one into the host's files.

As root the namespace needs nothing else; as another user it is a user namespace mapping the user
to root (``unshare(CLONE_NEWUSER)``; some systems forbid it). Where the OS cannot isolate (not
Linux, no permission, or ``isolation="none"``, or ``LOCAL_WORKSPACE_ISOLATION=none`` in the
server's environment) the process runs on the host's view, with ``SANDBOX_ENV`` saying why, and
the context worker refuses the mapped paths with an error naming the local root
(``install_guard``).

The setup stage is this file run as a script by a second interpreter (``python -S -I``, no
site, stdlib only) which then ``exec``s the real argv: about 12 ms more per process start
(tests/local_workspace/README.md, "Paths").
"""

import os
import sys

# Set by the setup stage in the process it starts: "isolated", or "none: <why>".
SANDBOX_ENV = "LOCAL_WORKSPACE_SANDBOX"
# Where host paths that a driver path hides are seen inside the view (see _hidden_needs).
HOST_ALIASES = "/databricks/.host"
ISOLATION_ENV = "LOCAL_WORKSPACE_ISOLATION"
ISOLATION_MODES = ("auto", "none")

_SCRIPT = os.path.abspath(__file__)

# <linux/sched.h>, <sys/mount.h>
CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18


def wrap_command(argv, state_dir, cluster_id, isolation="auto"):
    """The argv that starts ``argv`` inside cluster ``cluster_id``'s file system view.

    ``isolation``: "auto" (a mount namespace where the OS allows one, else the host's view) or
    "none" (always the host's view; also forced by ``LOCAL_WORKSPACE_ISOLATION=none``). The
    state directories are created here, so the caller can use them at once."""
    from .paths import DRIVER_DIR, cluster_dir, make_dirs, mounts

    if isolation not in ISOLATION_MODES:
        raise ValueError("isolation must be one of %s" % (ISOLATION_MODES,))
    make_dirs(state_dir, cluster_id)
    if isolation == "none" or os.environ.get(ISOLATION_ENV) == "none":
        return list(argv)
    pairs = []
    for target, source in mounts(state_dir, cluster_id):
        pairs += [target, source]
    aliases = []
    for path, aliased in _hidden_needs(argv, state_dir, {t.strip("/").split("/")[0]
                                                          for t in pairs[0::2]}):
        target = HOST_ALIASES + path if aliased else path
        pairs += [target, os.path.realpath(path)]
        if aliased:
            aliases += [path, target]
    root = os.path.join(cluster_dir(state_dir, cluster_id), "root")
    return ([sys.executable, "-S", "-I", _SCRIPT, root, DRIVER_DIR, str(len(pairs) // 2)]
            + pairs + [str(len(aliases) // 2)] + aliases + ["--"] + list(argv))


def _hidden_needs(argv, state_dir, hidden_tops):
    """``[(host path, aliased)]``: what a cluster process needs that a driver path hides (a
    checkout, a cache or the state dir under the host's /tmp).

    This package and the runtime's venv are bound under HOST_ALIASES (``aliased``), and the
    process's argv and environment name them there, so the cluster's ``/tmp`` shows nothing of
    the host's. The workspace's own state dir (sockets, context venvs, Spark's dirs) and the
    runtime's base interpreter (which the venv names by absolute path) keep their own paths."""
    python = argv[0] if os.path.isabs(argv[0]) else None
    needs = [(state_dir, False), (os.path.dirname(os.path.dirname(_SCRIPT)), True)]
    if python:
        base = os.path.dirname(os.path.dirname(os.path.realpath(python)))
        needs += [(os.path.dirname(os.path.dirname(python)), True), (base, False)]
    found = []
    for path, aliased in needs:
        path = os.path.abspath(path)
        if path.strip("/").split("/")[0] in hidden_tops and path not in {p for p, _ in found}:
            found.append((path, aliased))
    return found


def isolated():
    """True in a process the setup stage started inside the cluster's own view."""
    return os.environ.get(SANDBOX_ENV) == "isolated"


def local_path(state_dir, cluster_id, host):
    """The path this process uses for ``host`` (a path under the state directory): its driver
    path inside the cluster's view, ``host`` itself on the host's view."""
    from .paths import driver_path

    if not (state_dir and isolated()):
        return host
    return driver_path(state_dir, cluster_id, host) or host


# Audit events whose arguments are paths (the first two at most), and those that run commands.
_PATH_EVENTS = {
    "open": 1, "os.listdir": 1, "os.scandir": 1, "os.mkdir": 1, "os.remove": 1, "os.rmdir": 1,
    "os.rename": 2, "os.chdir": 1, "os.chmod": 1, "os.chown": 1, "os.link": 2,
    "os.symlink": 2, "os.truncate": 1, "os.utime": 1, "os.fwalk": 1, "glob.glob": 1,
    "glob.glob/2": 1, "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.rmtree": 1,
    "shutil.move": 2, "shutil.make_archive": 1, "shutil.unpack_archive": 2,
}
_COMMAND_EVENTS = {"os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn"}


def _unisolated_error(driver, state_dir, cluster_id, why):
    from .paths import host_path

    root = host_path(state_dir, cluster_id, driver) if state_dir else None
    return PermissionError(
        "%s: this local workspace cannot map the driver paths (/Volumes, /dbfs, /Workspace, "
        "/local_disk0) here (%s), and will not touch the host's own root. Use the local root "
        "instead: %s (or dbutils.fs, which maps these paths)."
        % (driver, why, root or "<the workspace's state directory>"))


def install_guard(state_dir, cluster_id, why):
    """Refuse the mapped driver paths in this process: file APIs on them, commands naming them
    (``%sh``, subprocess) and Spark calls naming them raise PermissionError naming the local
    root to use. For the host's view only (``isolated()`` is False); ``why`` says why there is
    no isolation. An audit hook (``sys.addaudithook``): it cannot be removed, and it sees what
    Python does (``os.stat`` has no audit event, so ``os.path.exists`` just answers False)."""
    import posixpath
    import re

    from .paths import MAPPED_PREFIXES, is_mapped

    named = re.compile(r"(?:^|[\s'\"`=:(])(%s)(?=[/\s'\"`);|&<>]|$)([^\s'\"`();|&<>]*)"
                       % "|".join(re.escape(p) for p in MAPPED_PREFIXES))

    def as_path(arg):
        if isinstance(arg, int) or arg is None:
            return None
        try:
            arg = os.fsdecode(arg)
        except TypeError:
            return None
        if arg.startswith("file:"):
            arg = arg[len("file:"):]
        return posixpath.normpath(arg) if arg.startswith("/") else None

    def command_text(args):
        parts = []
        for arg in args:
            if isinstance(arg, (list, tuple)):
                parts.extend(os.fsdecode(a) for a in arg if isinstance(a, (str, bytes)))
            elif isinstance(arg, (str, bytes)):
                parts.append(os.fsdecode(arg))
        return " ".join(parts)

    def refuse_mapped(values):
        for value in values:
            if isinstance(value, (list, tuple)):
                refuse_mapped(value)
            elif isinstance(value, str):
                path = as_path(value)
                found = named.search(value) if path is None else None
                if path and is_mapped(path) or found:
                    raise _unisolated_error(path if path else found.group(1) + found.group(2),
                                            state_dir, cluster_id, why)

    def guard_py4j():
        """Spark's JVM runs on the host's view too: refuse mapped paths at py4j, where every
        path pyspark hands the JVM passes (``JavaMember.__call__``)."""
        member = getattr(sys.modules.get("py4j.java_gateway"), "JavaMember", None)
        if member is None or getattr(member, "_local_workspace_guarded", False):
            return
        call = member.__call__

        def guarded_call(self, *args):
            refuse_mapped(args)
            return call(self, *args)

        member.__call__ = guarded_call
        member._local_workspace_guarded = True

    def hook(event, args):
        if "py4j.java_gateway" in sys.modules:  # patched at the first event after its import
            guard_py4j()
        count = _PATH_EVENTS.get(event)
        if count:
            for arg in args[:count]:
                path = as_path(arg)
                if path and is_mapped(path):
                    raise _unisolated_error(path, state_dir, cluster_id, why)
        elif event in _COMMAND_EVENTS:
            found = named.search(command_text(args))
            if found:
                raise _unisolated_error(found.group(1) + found.group(2), state_dir, cluster_id,
                                        why)

    sys.addaudithook(hook)


# ---------------------------------------------------------------- the setup stage (a script)

def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare.argtypes = [ctypes.c_int]
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_void_p]
    return ctypes, libc


def _check(ctypes, rc, what):
    if rc != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, "%s: %s" % (what, os.strerror(errno)))


def _enter_namespace(ctypes, libc):
    """A private mount namespace (in a user namespace when not root)."""
    uid, gid = os.getuid(), os.getgid()
    if uid == 0:
        _check(ctypes, libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    else:
        _check(ctypes, libc.unshare(CLONE_NEWUSER | CLONE_NEWNS), "unshare(CLONE_NEWUSER)")
        for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid),
                           ("gid_map", "0 %d 1" % gid)):
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
    _check(ctypes, libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None),
           "make / private")


def _mount_point(path, is_dir):
    """Create ``path`` as an empty dir (or file) to mount on; racing creators are fine."""
    if is_dir:
        os.makedirs(path, exist_ok=True)
    elif not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a"):
            pass


def _bind(ctypes, libc, source, target):
    _check(ctypes, libc.mount(os.fsencode(source), os.fsencode(target), None,
                              MS_BIND | MS_REC, None), "bind %s on %s" % (source, target))


def _build_root(ctypes, libc, root, mapped):
    """Mount the host's ``/`` entry by entry under ``root``, then the mapped driver paths."""
    tops = {target.strip("/").split("/")[0] for target in mapped}
    for entry in os.listdir("/"):
        if entry in tops:
            continue
        source = "/" + entry
        target = os.path.join(root, entry)
        if os.path.islink(source):
            if not os.path.islink(target):
                try:
                    os.symlink(os.readlink(source), target)
                except FileExistsError:
                    pass
            continue
        is_dir = os.path.isdir(source)
        _mount_point(target, is_dir)
        _bind(ctypes, libc, source, target)
    for driver, host in mapped.items():
        target = root + driver
        _mount_point(target, True)
        _bind(ctypes, libc, host, target)


def _run_unisolated(argv, why):
    os.environ[SANDBOX_ENV] = "none: %s" % why
    os.execvp(argv[0], argv)


def _main(args):
    """``args``: ROOT CWD N TARGET1 SOURCE1 ... TARGETN SOURCEN M HOST1 ALIAS1 ... HOSTM ALIASM
    -- ARGV..."""
    root, cwd, count = args[0], args[1], int(args[2])
    pairs = args[3:3 + 2 * count]
    rest = args[3 + 2 * count:]
    aliases = rest[1:1 + 2 * int(rest[0])]
    argv = rest[1 + 2 * int(rest[0]) + 1:]
    mapped = dict(zip(pairs[0::2], pairs[1::2]))
    try:
        if not sys.platform.startswith("linux"):
            raise OSError("mount namespaces need Linux (this is %s)" % sys.platform)
        ctypes, libc = _libc()
        _enter_namespace(ctypes, libc)
    except OSError as e:  # no isolation here: run on the host's view, and say why
        _run_unisolated(argv, e)
    try:
        _build_root(ctypes, libc, root, mapped)
        os.chroot(root)
    except OSError as e:  # still the host's view: the namespace is private and not entered
        _run_unisolated(argv, e)
    os.chdir(cwd)
    argv = _use_aliases(argv, dict(zip(aliases[0::2], aliases[1::2])))
    os.environ[SANDBOX_ENV] = "isolated"
    os.environ["PWD"] = os.getcwd()
    os.execvp(argv[0], argv)


def _use_aliases(argv, aliases):
    """Name each aliased host path by its alias, in ``argv`` (the returned copy) and in this
    process's environment (which the exec'd process inherits)."""
    import re

    if not aliases:
        return argv
    hosts = sorted(aliases, key=len, reverse=True)
    pattern = re.compile("(%s)(?=/|$|[^\\w.-])" % "|".join(re.escape(h) for h in hosts))

    def swap(text):
        return pattern.sub(lambda m: aliases[m.group(1)], text)

    for key, value in list(os.environ.items()):
        os.environ[key] = swap(value)
    return [swap(a) for a in argv]


if __name__ == "__main__":
    _main(sys.argv[1:])
