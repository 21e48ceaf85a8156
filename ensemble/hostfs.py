"""The host's access to files a unit can change (its log directory, mounted at
/var/log/ensemble inside): never through a link, only regular files, a bounded amount.

Root in a unit owns what is in that directory and can put anything there in place of a
file the host reads: a symbolic link to a host file (which the host would print, or
store in the unit's own status), a FIFO (an open that never returns), a device node
(/dev/zero: a read that never ends; some devices act on open). So a path below a
directory the host trusts is opened one component at a time from that directory's
descriptor, each with O_NOFOLLOW, as O_PATH (nothing is opened for real, no device
driver runs, no FIFO blocks); fstat on that descriptor must show a regular file, and
only then is that same descriptor reopened for reading. What is checked is what is read,
whatever the unit renames in between. Reads take a bounded tail.
"""

import errno
import os
import stat

from ensemble.errors import UnsafeFile

TAIL_LIMIT = 4 << 20  # bytes: the most a tail reads (debug-log's, per read)
_CHUNK = 1 << 20
_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _components(relative):
    parts = str(relative).split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a plain relative path: {relative!r}")
    return parts


def _open_path(root, relative):
    """An O_PATH descriptor of `relative` below `root` (the host's own directory, so
    opened as given); no link followed below it, the last component included."""
    parts = _components(relative)
    path = os.path.join(root, relative)
    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            try:
                below = os.open(part, _NOFOLLOW | os.O_DIRECTORY, dir_fd=fd)
            except OSError as e:
                # ENOTDIR: a link (O_NOFOLLOW opens it as itself) or a file in the way.
                if e.errno in (errno.ENOTDIR, errno.ELOOP):
                    raise UnsafeFile(path) from None
                raise
            os.close(fd)
            fd = below
        return os.open(parts[-1], _NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)


def open_regular(root, relative):
    """A descriptor open for reading on regular file `relative` below `root`.
    UnsafeFile if anything on the way is a link or the file is not a regular file;
    FileNotFoundError if it is not there."""
    path = os.path.join(root, relative)
    handle = _open_path(root, relative)
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise UnsafeFile(path)
        # Through /proc/self/fd: the very file just checked, not whatever the path names now.
        return os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(handle)


def read_tail(root, relative, limit=TAIL_LIMIT, start=0):
    """(data, offset): the bytes of regular file `relative` below `root` from `start`
    to its end, at most the last `limit` of them, and the offset `data` begins at. A
    file now shorter than `start` was truncated and is read from its beginning."""
    fd = open_regular(root, relative)
    try:
        size = os.fstat(fd).st_size
        begin = max(start if start <= size else 0, size - limit)
        data, offset = [], begin
        # Bounded even if it grows meanwhile: never past the size seen above.
        while offset < size:
            chunk = os.pread(fd, min(_CHUNK, size - offset), offset)
            if not chunk:
                break
            data.append(chunk)
            offset += len(chunk)
        return b"".join(data), begin
    finally:
        os.close(fd)


def tail_lines(root, relative, lines, limit=TAIL_LIMIT):
    """(text, end, cut): the last `lines` lines (0: all) of regular file `relative`
    below `root`, from at most its last `limit` bytes; the offset they end at; whether
    earlier output that was asked for was left out (the file is longer than `limit`)."""
    data, begin = read_tail(root, relative, limit)
    end = begin + len(data)
    if begin > 0:
        data = data.partition(b"\n")[2]  # the first line may be cut: drop it
    kept = data.splitlines(keepends=True)
    if lines:
        cut = begin > 0 and len(kept) < lines
        kept = kept[-lines:]
    else:
        cut = begin > 0
    return b"".join(kept).decode("utf-8", "replace"), end, cut


def own_directory(root, name, uid, gid, mode=0o755):
    """Make directory `name` in `root` (the host's own directory) if it is missing, and
    give it to uid:gid with `mode`, through its descriptor: never through a link put
    in its place."""
    parent = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            os.mkdir(name, mode, dir_fd=parent)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except OSError as e:
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                raise UnsafeFile(os.path.join(root, name), "directory", "use") from None
            raise
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    finally:
        os.close(parent)


def own_tree(root, name, uid, gid, mode=0o700):
    """Directory `name` in `root` (made if missing, given `mode`) and everything in it
    given to uid:gid, following no link. For a unit's log directory when its container
    is made (what an earlier container of the unit left there is this one's, whatever
    ids that one had) and once it is gone (host root's): no process of the unit runs
    then to race the walk."""
    own_directory(root, name, uid, gid, mode)
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
        for entry in dirnames + filenames:
            path = os.path.join(dirpath, entry)
            st = os.lstat(path)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.lchown(path, uid, gid)
