"""The program inside the code sandbox: isolate this process, then run the untrusted code.

Started by megatron_opd/rewards/sandbox.py as `python -I -S sandbox_child.py RESULT_FD CONFIG`
(standard library only: no site-packages, no PYTHON* variables, no user site). In order, before
any untrusted line runs:
1. read the run's config (then delete it: it holds the nonce that marks this program's reports);
2. kernel isolation, each step where the kernel permits it and reported either way: a user
   namespace when this process lacks CAP_SYS_ADMIN (so the rest needs no privilege), a network namespace (no interface
   is up, not even loopback), a mount namespace in which every mount is read-only except a bind
   mount of the scratch directory, a pid namespace (the code is pid 1 of its own namespace and
   sees no other process); then no capabilities (bounding, ambient, effective, permitted all
   dropped) and no_new_privs, so nothing can undo the above;
3. resource limits (CPU seconds, address space, file size, open files, processes; no core dump);
4. the Python guard, an audit hook (sys.addaudithook) that refuses sockets, process creation,
   signals, writes outside the scratch directory, ctypes and native-extension back doors, and
   the routes to this harness's frames and objects (gc, sys._getframe, tracebacks' frames,
   tracing);
5. the code: in "tests" mode the solution and then each test block in one module namespace,
   counting the blocks that finish; in "stdio" mode the solution as a script on stdin/stdout.

Reports go to RESULT_FD as lines that start with the nonce: one "isolation" line (JSON, written
before the code runs) and, in tests mode, one "result" line written after the last test; an
exit before the tests finish (sys.exit, os._exit, a crash) leaves no result line and fails.
"""

import os
import sys

# Python < 3.11 puts this file's directory (megatron_opd/rewards) first on sys.path even under
# -I; its modules (math.py, code.py, types.py) would shadow the standard library's.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

import json  # noqa: E402

# The untrusted code must not find these harness functions by `import __main__`: it gets its
# own module (see _run_code), and nothing secret lives in module globals.

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 38, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SIGKILL = 9

# statvfs flags a remount must keep: in a user namespace they are locked, and leaving one out
# makes the remount fail with EPERM.
_KEPT_MOUNT_FLAGS = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                     (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                     (os.ST_RELATIME, MS_RELATIME))


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def call(name, *args):
        if getattr(libc, name)(*args) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{name}: {os.strerror(errno)}")

    return ctypes, libc, call


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _mount_points():
    with open("/proc/self/mountinfo") as f:
        lines = f.read().splitlines()
    # Field 5 is the mount point, with space, tab, newline and backslash written as \ooo.
    return [bytes(line.split()[4], "ascii").decode("unicode_escape") for line in lines]


def _read_only_except(scratch, call):
    """Make every mount of this (new) mount namespace read-only except a bind of `scratch`."""
    call("mount", None, b"/", None, MS_REC | MS_PRIVATE, None)
    call("mount", scratch.encode(), scratch.encode(), None, MS_BIND | MS_REC, None)
    failed = []
    for point in _mount_points():
        if point == scratch or point.startswith(scratch + "/"):
            continue
        try:
            kept = os.statvfs(point).f_flag
            flags = MS_BIND | MS_REMOUNT | MS_RDONLY
            for statvfs_flag, mount_flag in _KEPT_MOUNT_FLAGS:
                if kept & statvfs_flag:
                    flags |= mount_flag
            call("mount", None, point.encode(), None, flags, None)
        except OSError as error:
            failed.append(f"{point} ({error.strerror})")
    return failed


def _has_cap_sys_admin():
    with open("/proc/self/status") as f:
        effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return bool(int(effective, 16) >> 21 & 1)  # CAP_SYS_ADMIN is capability 21


def enter_namespaces(scratch):
    """Steps 2a: namespaces. Returns what was achieved, per concern, in words."""
    _, _, call = _libc()
    report = {}
    uid, gid = os.getuid(), os.getgid()
    if not _has_cap_sys_admin():  # not root, or a root without it (many containers)
        try:
            call("unshare", CLONE_NEWUSER)
            # Map our own uid and gid to themselves, so files keep their owner.
            _write_file("/proc/self/setgroups", "deny")
            _write_file("/proc/self/uid_map", f"{uid} {uid} 1")
            _write_file("/proc/self/gid_map", f"{gid} {gid} 1")
            report["user"] = "own user namespace"
        except OSError as error:
            report["user"] = f"no user namespace ({error.strerror})"
    try:
        call("unshare", CLONE_NEWNET)
        report["network"] = "own network namespace (no interfaces up)"
    except OSError as error:
        report["network"] = f"not isolated by the kernel ({error.strerror})"
    try:
        call("unshare", CLONE_NEWNS)
        failed = _read_only_except(scratch, call)
        report["filesystem"] = "read-only except the scratch directory" + (
            f"; still writable: {', '.join(failed)}" if failed else "")
    except OSError as error:
        report["filesystem"] = f"not isolated by the kernel ({error.strerror})"
    try:
        call("unshare", CLONE_NEWPID)
        report["processes"] = "own pid namespace"
    except OSError as error:
        report["processes"] = f"process group only ({error.strerror})"
    return report


def drop_capabilities():
    """Step 2b: no capabilities now or after any exec, and no_new_privs."""
    ctypes, libc, call = _libc()
    try:
        call("prctl", PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        call("prctl", PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        for capability in range(64):
            if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
                break  # EINVAL: past the last capability this kernel knows

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        call("capset", ctypes.byref(Header(0x20080522, 0)), (Data * 2)())
    except OSError as error:
        return f"not dropped ({error.strerror})"
    with open("/proc/self/status") as f:
        effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
    return "none" if int(effective, 16) == 0 else f"effective set {effective}"


def die_with_parent():
    _, _, call = _libc()
    call("prctl", PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)


def forget_ctypes():
    # The guard refuses importing ctypes; what the harness imported must not stay reachable
    # through sys.modules.
    for name in [name for name in sys.modules if name == "ctypes" or name.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]


def set_limits(limits, processes):
    import resource

    def limit(kind, value):
        hard = resource.getrlimit(kind)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)  # without capabilities a limit can only go down
        resource.setrlimit(kind, (value, value))

    limit(resource.RLIMIT_CORE, 0)
    # soft == hard: at the limit the kernel sends SIGKILL (SIGXCPU, the soft signal, is
    # ignored by a pid-namespace init).
    limit(resource.RLIMIT_CPU, limits["cpu_seconds"])
    limit(resource.RLIMIT_AS, limits["memory_bytes"])
    limit(resource.RLIMIT_FSIZE, limits["file_size_bytes"])
    limit(resource.RLIMIT_NOFILE, limits["open_files"])
    if processes:
        limit(resource.RLIMIT_NPROC, limits["max_processes"])


_DENIED_EVENTS = frozenset({
    "socket.__new__", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
    "sys._current_frames", "sys.settrace", "sys.setprofile", "gc.get_objects", "gc.get_referrers",
    "gc.get_referents", "sys.remote_exec", "os.add_dll_directory",
})
_DENIED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters",
                             "_xxinterpchannels", "_interpreters", "_interpchannels", "_testcapi",
                             "_testinternalcapi", "_testmultiphase", "_lsprof"})
_FRAME_ATTRIBUTES = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
# Events that change the file system: the positions of their path arguments and of the
# directory descriptors those paths may be relative to.
_PATH_EVENTS = {"os.chmod": ((0,), (2,)), "os.chown": ((0,), (3,)), "os.link": ((0, 1), (2, 3)),
                "os.mkdir": ((0,), (2,)), "os.remove": ((0,), (1,)), "os.rename": ((0, 1), (2, 3)),
                "os.rmdir": ((0,), (1,)), "os.symlink": ((1,), (2,)), "os.truncate": ((0,), ()),
                "os.utime": ((0,), (3,)), "os.setxattr": ((0,), ()), "os.removexattr": ((0,), ()),
                "os.chflags": ((0,), ()), "os.lchflags": ((0,), ()), "os.lchmod": ((0,), ()),
                "shutil.chown": ((0,), ())}


def install_guard(scratch):
    """Step 4: the audit hook. It cannot be removed once added. Everything it calls is bound
    here, before untrusted code runs, so patching os, os.path or builtins does not change it."""
    import stat

    lstat, os_stat, readlink, getcwd = os.lstat, os.stat, os.readlink, os.getcwd
    is_link, is_dir = stat.S_ISLNK, stat.S_ISDIR
    is_instance, int_, str_, bytes_ = isinstance, int, str, bytes
    permission_error, value_error, os_error = PermissionError, ValueError, OSError
    denied_events, denied_modules, frame_attributes, path_events = (
        _DENIED_EVENTS, _DENIED_MODULES, _FRAME_ATTRIBUTES, dict(_PATH_EVENTS))
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def refuse(what):
        raise permission_error(f"sandbox: {what} is not allowed")

    def real(path, dir_fd=None):
        """The path with every symlink and `..` resolved (like os.path.realpath)."""
        if is_instance(path, bytes_):
            path = path.decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            base = readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else getcwd()
            path = base + "/" + path
        todo = [part for part in path.split("/") if part and part != "."][::-1]
        done, links = [], 0
        while todo:
            part = todo.pop()
            if part == "..":
                done = done[:-1]
                continue
            candidate = "/" + "/".join(done + [part])
            try:
                mode = lstat(candidate).st_mode
            except os_error:  # does not exist (yet): what is created there is `candidate`
                done = done + [part]
                continue
            if is_link(mode):
                links += 1
                if links > 40:
                    refuse(f"resolving {path} (too many symbolic links)")
                target = readlink(candidate)
                if target.startswith("/"):
                    done = []
                todo.extend([part for part in target.split("/") if part and part != "."][::-1])
            else:
                done = done + [part]
        return "/" + "/".join(done)

    root = real(scratch)

    def inside(resolved):
        return resolved == root or resolved.startswith(root + "/") or resolved == "/dev/null"

    def hook(event, args):
        if event in denied_events:
            refuse(event)
        elif event == "import":
            name = args[0]
            if name in denied_modules or (is_instance(name, str_) and name.startswith("ctypes.")):
                refuse(f"importing {name}")
        elif event == "open":
            path, mode, flags = args
            if not is_instance(path, (str_, bytes_)):
                return  # an already open descriptor
            resolved = real(path)
            if resolved.startswith("/proc/") and resolved.endswith("/mem"):
                refuse(f"opening {resolved}")
            if inside(resolved):
                return
            if (is_instance(flags, int_) and flags & write_flags) or (
                    is_instance(mode, str_) and ("w" in mode or "a" in mode or "x" in mode or "+" in mode)):
                refuse(f"writing {resolved} (outside the scratch directory)")
            # A descriptor of an outside directory would let os.open(name, dir_fd=...) write
            # there, and the open event does not carry dir_fd.
            try:
                directory = is_dir(os_stat(resolved).st_mode)
            except os_error:
                directory = False
            if directory:
                refuse(f"opening the directory {resolved} (outside the scratch directory)")
        elif event in path_events:
            paths, dir_fds = path_events[event]
            dir_fd = None
            for position in dir_fds:
                # None, -1 or AT_FDCWD (-100): relative to the working directory
                if is_instance(args[position], int_) and args[position] >= 0:
                    dir_fd = args[position]
            for position in paths:
                if is_instance(args[position], int_):
                    continue  # os.truncate(fd, ...), os.chmod(fd, ...): an open descriptor
                resolved = real(args[position], dir_fd)
                if not inside(resolved):
                    refuse(f"{event} on {resolved} (outside the scratch directory)")
        elif event.startswith("ctypes."):
            refuse(event)
        elif event == "sys._getframe" or (event == "object.__getattr__" and args[1] in frame_attributes):
            # ValueError, not PermissionError: the standard library already falls back when
            # frames are unavailable (namedtuple, typing, enum, warnings catch ValueError).
            raise value_error("sandbox: frames are not available")

    sys.addaudithook(hook)


def _describe(error):
    try:
        message = str(error)
    except BaseException:  # a str() that raises is the untrusted code's
        message = ""
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    # The first traceback entry is the harness's exec call; the second is the line of the
    # solution (or test block) that raised.
    traceback = error.__traceback__.tb_next if error.__traceback__ is not None else None
    return (text if traceback is None else f"{text} (line {traceback.tb_lineno})")[:2000]


def _run_code(config, report, nonce):
    """Step 5. `report` writes one line to the result descriptor; bound before untrusted code."""
    import types

    # Everything used after the untrusted code starts is bound now: it may patch builtins
    # (len, range, BaseException, ...) and modules, not these local names.
    exec_, compile_, flush_out, flush_err, exit_ = exec, compile, sys.stdout.flush, sys.stderr.flush, os._exit
    range_, base_exception = range, BaseException
    with open(config["program"], encoding="utf-8") as f:
        source = f.read()
    module = types.ModuleType("__main__")
    module.__file__ = config["program"]
    sys.modules["__main__"] = module
    namespace = module.__dict__
    tests = config["tests"]
    total = len(tests) if tests is not None else 0

    def finish(code):
        for flush in (flush_out, flush_err):
            try:
                flush()
            except BaseException:
                pass
        exit_(code)

    try:
        exec_(compile_(source, config["program"], "exec"), namespace)
    except SystemExit as stop:
        if tests is None:  # a script that exits: its code is the outcome
            code = stop.code
            if code is not None and not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
            finish(code or 0)
        report(f"{nonce} result 0 {total} {'the solution exited before the tests'.encode().hex()}")
        finish(0)
    except BaseException as error:
        if tests is None:
            print(_describe(error), file=sys.stderr)
            finish(1)
        report(f"{nonce} result 0 {total} {('the solution raised ' + _describe(error)).encode().hex()}")
        finish(0)
    if tests is None:
        finish(0)
    passed, first_failure = 0, ""
    for index in range_(total):
        try:
            exec_(compile_(tests[index], f"<test {index}>", "exec"), namespace)
            passed += 1
        except base_exception as error:
            if not first_failure:
                first_failure = f"test {index}: {_describe(error)}"
    # Only int formatting and str/bytes methods, which untrusted code cannot patch, build this line.
    report(f"{nonce} result {passed} {total} {first_failure.encode('utf-8', 'backslashreplace').hex()}")
    finish(0)


def main():
    result_fd, config_path = int(sys.argv[1]), sys.argv[2]
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    os.unlink(config_path)
    nonce, scratch = config.pop("nonce"), os.path.realpath(config["scratch"])
    write = os.write

    def report(line):
        try:
            write(result_fd, (line + "\n").encode())
        except OSError:
            pass

    if config["namespaces"]:
        isolation = enter_namespaces(scratch)
    else:
        isolation = {"network": "not isolated by the kernel (namespaces off)",
                     "filesystem": "not isolated by the kernel (namespaces off)",
                     "processes": "process group only (namespaces off)"}
    isolation["capabilities"] = drop_capabilities()
    os.chdir(scratch)  # again: after the bind mount, the writable scratch is the new mount
    set_limits(config["limits"], processes=False)
    if isolation["processes"] == "own pid namespace":
        child = os.fork()  # the child is pid 1 of the new namespace; this process only waits
        if child:
            _, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
        die_with_parent()
    forget_ctypes()
    set_limits(config["limits"], processes=True)
    isolation["python_guard"] = "on" if config["python_guard"] else "off"
    report(f"{nonce} isolation {json.dumps(isolation)}")
    if config["python_guard"]:
        install_guard(scratch)
    _run_code(config, report, nonce)


if __name__ == "__main__":
    main()
