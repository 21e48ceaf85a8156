"""Run a command (lxc-start) in a mount namespace of its own that holds what one
container's start needs and nothing on the host sees:

- binds of paths its root could not reach (config.STAGE_DIR);
- for a unit with its own id range: its root filesystem, an overlay whose lower layer
  is the shared template seen through an idmapped mount (owners shifted into the
  unit's range by the kernel, nothing copied) and whose upper layer is the unit's.

Run as a script with `python3 -I -S`, the standard library only. Usage:

    stage.py PLAN.json -- COMMAND...     stage, then exec COMMAND
    stage.py --serve                     the same for each request on stdin

An interpreter's start is most of what a run costs (~25 ms), so a driver keeps one
server and each start costs a fork: requests are JSON lines {"id", "plan", "argv",
"timeout"}; each is forked off at once (starts run side by side), and its answer is a
JSON line {"id", "code", "output", "timed_out"} once the command has exited (killed,
with its process group, after `timeout` seconds).

The plan is {"binds": [[source, target], ...], "rootfs": {"lower", "upper", "work",
"target", "first", "count"} or null}. No Python module wraps open_tree, mount_setattr
and move_mount (util-linux 2.38's mount cannot idmap either), so they are called here.
"""

import ctypes
import json
import os
import selectors
import signal
import struct
import sys
import time

# x86_64 and aarch64 share the numbers of these (newer) system calls.
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 0x80000
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
AT_EMPTY_PATH, AT_FDCWD = 0x1000, -100
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)


class StageError(Exception):
    pass


def _check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise StageError(f"{what}: {os.strerror(err)}")
    return result


def _mount(source, target, fstype, flags, data=None):
    _check(libc.mount(os.fsencode(source) if source else None, os.fsencode(target),
                      fstype.encode() if fstype else None, flags, data.encode() if data else None),
           f"mount {source or fstype} on {target}")


def _placeholder(source, target):
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    elif not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()


def user_namespace(first, count):
    """A descriptor of a user namespace mapping ids 0..count-1 to first.. (uid and gid):
    a child is forked into one, given the map (as host root, no newuidmap needed), its
    namespace held by descriptor and the child let go."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(go_w)
            ok = libc.unshare(CLONE_NEWUSER) == 0
            os.write(ready_w, b"1" if ok else b"0")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(go_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise StageError("cannot create a user namespace for the unit's id map")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {first} {count}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


def idmapped_bind(source, target, first, count):
    """Mount `source` at `target` with its owners seen shifted into first.. ."""
    tree = _check(libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
                  f"open_tree {source}")
    try:
        userns = user_namespace(first, count)
        try:
            attr = struct.pack("QQQQ", MOUNT_ATTR_IDMAP, 0, 0, userns)  # struct mount_attr
            _check(libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH, attr, len(attr)),
                   f"idmapping {source}")
        finally:
            os.close(userns)
        _check(libc.syscall(SYS_MOVE_MOUNT, tree, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH),
               f"move_mount {source} to {target}")
    finally:
        os.close(tree)


def _escape(path):
    # overlayfs splits its options at commas and lowerdir at colons.
    return path.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def stage(plan):
    if isinstance(plan, list):  # written before plans had a root filesystem
        plan = {"binds": plan}
    _check(libc.unshare(CLONE_NEWNS), "unshare a mount namespace")
    # Slave: later host mounts still reach LXC, nothing of ours reaches the host.
    _mount(None, "/", None, MS_REC | MS_SLAVE)
    for source, target in plan.get("binds") or ():
        _placeholder(source, target)
        _mount(source, target, None, MS_BIND)
    rootfs = plan.get("rootfs")
    if rootfs:
        lower, target = rootfs["lower_target"], rootfs["target"]
        os.makedirs(lower, exist_ok=True)
        os.makedirs(target, exist_ok=True)
        idmapped_bind(rootfs["lower"], lower, int(rootfs["first"]), int(rootfs["count"]))
        options = f"lowerdir={_escape(lower)},upperdir={_escape(rootfs['upper'])},workdir={_escape(rootfs['work'])}"
        _mount("overlay", target, "overlay", 0, options)


def _child(plan_path, argv, output):
    """In a forked child: stage, then exec `argv` with its output on `output`."""
    try:
        os.setpgid(0, 0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        with open(plan_path) as f:
            stage(json.load(f))
        os.execvp(argv[0], argv)
    except (OSError, ValueError, KeyError, StageError) as e:
        os.write(2, f"ensemble-stage: {e}\n".encode())
    finally:
        os._exit(127)


def serve(requests=0, answers=1):
    """Fork a staged command per request line on `requests`; answer on `answers`. Ends
    once `requests` is closed (or `answers` is) and every command has exited."""
    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ, None)
    running = {}  # output fd -> [id, pid, chunks, deadline, timed_out]
    pending = b""
    reading = True
    while reading or running:
        deadlines = [r[3] for r in running.values() if r[3] is not None]
        wait = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        for key, _ in selector.select(wait):
            if key.fd == requests:
                if not reading:  # unregistered by a failed answer earlier in this batch
                    continue
                data = os.read(requests, 65536)
                if not data:
                    # No more requests: answer those under way, then end.
                    selector.unregister(requests)
                    reading = False
                    continue
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    request = json.loads(line)
                    read, write = os.pipe()
                    pid = os.fork()
                    if pid == 0:
                        os.close(read)
                        _child(request["plan"], request["argv"], write)
                    os.close(write)
                    timeout = request.get("timeout")
                    deadline = None if timeout is None else time.monotonic() + timeout
                    running[read] = [request["id"], pid, [], deadline, False]
                    selector.register(read, selectors.EVENT_READ, None)
                continue
            entry = running[key.fd]
            data = os.read(key.fd, 65536)
            if data:
                entry[2].append(data)
                continue
            selector.unregister(key.fd)
            os.close(key.fd)
            del running[key.fd]
            _, status = os.waitpid(entry[1], 0)
            code = os.waitstatus_to_exitcode(status)
            answer = {"id": entry[0], "code": code if code >= 0 else 128 - code,
                      "output": b"".join(entry[2]).decode("utf-8", "replace"), "timed_out": entry[4]}
            if answers is None:
                continue
            try:
                os.write(answers, json.dumps(answer).encode() + b"\n")
            except BrokenPipeError:
                # The driver is gone (its agent killed): the commands under way are
                # still waited for, or the host's init would be left to reap them.
                answers = None
                if reading:
                    selector.unregister(requests)
                    reading = False
        now = time.monotonic()
        for entry in running.values():
            if entry[3] is not None and now >= entry[3] and not entry[4]:
                entry[4] = True
                try:
                    os.killpg(entry[1], signal.SIGKILL)
                except ProcessLookupError:
                    pass


def main(argv):
    if argv[1:] == ["--serve"]:
        serve()
        return 0
    if len(argv) < 4 or argv[2] != "--":
        print("usage: stage.py PLAN.json -- COMMAND... | stage.py --serve", file=sys.stderr)
        return 2
    try:
        with open(argv[1]) as f:
            plan = json.load(f)
        stage(plan)
    except (OSError, ValueError, KeyError, StageError) as e:
        print(f"ensemble-stage: {e}", file=sys.stderr)
        return 1
    os.execvp(argv[3], argv[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
