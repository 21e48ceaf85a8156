"""A unit's own filesystem: its writable layer and its log directory live in an ext4
image of the unit's disk size, so a unit that writes without end fills its own
filesystem (ENOSPC inside), never the host's.

    <container>/disk.img          sparse; host space is taken only as the unit writes
                                  (mounted with discard: what it deletes is given back)
    <container>/overlay           the image, mounted (loop device, autoclear)
    <container>/overlay/delta     the overlay's upper layer (config.py)
    <container>/overlay/work      overlayfs's work directory
    <container>/overlay/binds/N   a host directory's content (the unit's log directory),
                                  bound over that directory on the host

Why an image and not a project quota: the host's root filesystem (ext4) is mounted
without prjquota, and turning the quota feature on needs it unmounted (tune2fs -O
project,quota); an image needs nothing of the host but loop devices.

Cost (docs/benchmarks.md): the image is a copy of a blank one, made once per size with
mkfs.ext4 and kept in <lxc path>/.disk/ (a sparse copy of ~2 MB), then a loop device
configured and a mount, all by system calls (no mount(8)): a few milliseconds.

Restarts: mounts are the host's and outlive the agent; a start finds the image's loop
device (still attached while anything has it mounted) and mounts it where it is not
mounted (after a reboot, a new loop device): one image is never attached twice.
Blocking: call through a thread.
"""

import ctypes
import errno
import fcntl
import os
import struct
import subprocess

DISK_DIR = ".disk"          # in the lxc path: the blank images
IMAGE = "disk.img"          # in the container's directory
MOUNTPOINT = "overlay"      # in the container's directory
BINDS = "binds"             # in the image

LOOP_CTL_GET_FREE = 0x4C82
LOOP_CONFIGURE = 0x4C0A
LOOP_GET_STATUS64 = 0x4C05
LO_FLAGS_AUTOCLEAR = 4
LOOP_INFO64 = "=QQQQQIIII64s64s32sQQ"   # struct loop_info64, 232 bytes
MS_BIND, MNT_DETACH = 0x1000, 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


class DiskError(Exception):
    pass


def _mount(source, target, fstype, flags, data=None):
    if _libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise DiskError(f"cannot mount {source} on {target}: {os.strerror(err)}")


def umount(target):
    """Detach the mount at `target` (lazily); False if nothing was mounted there."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOENT):
            return False
        raise DiskError(f"cannot unmount {target}: {os.strerror(err)}")
    return True


# -- images -----------------------------------------------------------------------------

def blank_image(lxc_path, size):
    """The path of a blank ext4 image of `size` bytes, made once per size (mkfs.ext4
    with lazy initialisation: ~20 ms) and copied for each unit."""
    directory = os.path.join(lxc_path, DISK_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"blank-{size}.img")
    if os.path.exists(path):
        return path
    with open(os.path.join(directory, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            return path
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
            # -m 0: nothing reserved for a root that is the unit's anyway.
            result = subprocess.run(
                ["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", tmp],
                capture_output=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
            if result.returncode != 0:
                raise DiskError(f"mkfs.ext4 failed: {result.stderr.decode(errors='replace').strip()}")
            os.rename(tmp, path)
        except FileNotFoundError as e:
            raise DiskError(f"cannot make a disk image: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


def _sparse_copy(source, target):
    """Copy only the data extents of `source` (SEEK_DATA/SEEK_HOLE): the holes stay holes."""
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(src).st_size
            os.ftruncate(dst, size)
            offset = 0
            while offset < size:
                try:
                    data = os.lseek(src, offset, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break  # only a hole is left
                    raise
                hole = os.lseek(src, data, os.SEEK_HOLE)
                position, left = data, hole - data
                while left > 0:
                    done = os.copy_file_range(src, dst, left, position, position)
                    if done == 0:
                        raise DiskError(f"short copy of {source}")
                    position += done
                    left -= done
                offset = hole
        finally:
            os.close(dst)
    finally:
        os.close(src)


def make_image(lxc_path, container, size):
    """The container's own image of `size` bytes (a copy of the blank one)."""
    image = os.path.join(container, IMAGE)
    _sparse_copy(blank_image(lxc_path, size), image)
    return image


# -- loop devices -----------------------------------------------------------------------

def _loop_status(device):
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = bytearray(struct.calcsize(LOOP_INFO64))
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
        return struct.unpack(LOOP_INFO64, buf)
    finally:
        os.close(fd)


def loop_device(image):
    """The loop device `image` is attached to, or None."""
    st = os.stat(image)
    try:
        names = os.listdir("/sys/block")
    except OSError:
        return None
    for name in names:
        if not name.startswith("loop") or not os.path.exists(f"/sys/block/{name}/loop/backing_file"):
            continue
        try:
            status = _loop_status(f"/dev/{name}")
        except OSError:
            continue
        lo_device, lo_inode = status[0], status[1]
        if lo_inode == st.st_ino and lo_device == st.st_dev:
            return f"/dev/{name}"
    return None


def attach(image):
    """(device, fd): a loop device for `image`, the one it has (fd None) or a new one
    that detaches itself once nothing has it open or mounted: keep `fd` (open on it)
    until it is mounted, then close it."""
    device = loop_device(image)
    if device is not None:
        return device, None
    for _ in range(16):  # another process may take the free device between the two calls
        control = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
        finally:
            os.close(control)
        device = f"/dev/loop{number}"
        image_fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            loop_fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            os.close(image_fd)
            raise
        try:
            info = struct.pack(LOOP_INFO64, 0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR,
                               os.fsencode(image)[-63:], b"", b"", 0, 0)
            config = struct.pack("=II", image_fd, 0) + info + bytes(64)
            try:
                fcntl.ioctl(loop_fd, LOOP_CONFIGURE, config)
            except OSError as e:
                os.close(loop_fd)
                if e.errno == errno.EBUSY:
                    continue
                raise DiskError(f"cannot attach {image} to {device}: {e.strerror}")
            return device, loop_fd
        finally:
            os.close(image_fd)
    raise DiskError(f"cannot attach {image}: no free loop device")


# -- mounts -----------------------------------------------------------------------------

def _unescape(path):
    return path.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mounted(target, mountinfo="/proc/self/mountinfo"):
    """The device ('major:minor') mounted on top at `target`, or None."""
    found = None
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target:
                found = fields[2]
    return found


def _device_id(device):
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def ensure_mounted(container, binds=(), mountinfo="/proc/self/mountinfo"):
    """The container's image mounted at <container>/overlay, and each host directory of
    `binds` showing its own directory in the image, in this mount namespace. Returns
    the loop device. Nothing to do for a container without an image (None)."""
    image = os.path.join(container, IMAGE)
    if not os.path.exists(image):
        return None
    target = os.path.join(container, MOUNTPOINT)
    os.makedirs(target, 0o755, exist_ok=True)
    device, fd = attach(image)
    try:
        if mounted(target, mountinfo) != _device_id(device):
            _mount(device, target, "ext4", 0, "discard")
            os.chmod(target, 0o755)
    finally:
        if fd is not None:
            os.close(fd)
    for i, host_dir in enumerate(binds):
        source = os.path.join(target, BINDS, str(i))
        if not os.path.isdir(source):
            os.makedirs(os.path.dirname(source), 0o755, exist_ok=True)
            st = os.stat(host_dir)
            os.mkdir(source, 0o700)
            # What an earlier container of the unit left (kept when it went) goes on
            # in this one's: the host directory is hidden under the bind while it runs.
            # Only the same unit's: a removed unit's directory was moved out of the way
            # at its teardown (deploy.retire_log_dir), so a new unit of the same name
            # starts from an empty one.
            keep(host_dir, source)
            os.chown(source, st.st_uid, st.st_gid)
            os.chmod(source, st.st_mode & 0o7777)
        if mounted(host_dir, mountinfo) != _device_id(device):
            _mount(source, host_dir, None, MS_BIND)
    return device


# What of a bound directory (a unit's log) is kept on the host when the unit goes: the
# last part of each regular file, bounded in all, as the content is the unit's to choose.
KEEP_PER_FILE = 1024**2
KEEP_TOTAL = 16 * 1024**2
KEEP_FILES = 256


def keep(source, target, per_file=KEEP_PER_FILE, total=KEEP_TOTAL, files=KEEP_FILES):
    """Copy the tail of each regular file below `source` (the unit's) into `target`
    (the host's, owned by root): no link followed, nothing but regular files, bounded."""
    left = total
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        relative = os.path.relpath(dirpath, source)
        if relative.count(os.sep) >= 2:
            dirnames[:] = []
        for name in sorted(filenames):
            if files <= 0 or left <= 0:
                return
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if not (st.st_mode & 0o170000 == 0o100000):
                    continue
                size = min(st.st_size, per_file, left)
                data = os.pread(fd, size, st.st_size - size)
            finally:
                os.close(fd)
            directory = os.path.normpath(os.path.join(target, relative))
            os.makedirs(directory, 0o755, exist_ok=True)
            out = os.open(os.path.join(directory, name),
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
            try:
                os.write(out, data)
            finally:
                os.close(out)
            files -= 1
            left -= len(data)


def release(container, binds=(), keep_binds=False):
    """Unmount the container's image and binds in this mount namespace (the loop device
    detaches itself once no namespace has it mounted). With `keep_binds`, what the
    binds held is kept (bounded) in the host directories they covered."""
    target = os.path.join(container, MOUNTPOINT)
    image = os.path.join(container, IMAGE)
    for i, host_dir in enumerate(binds):
        while mounted(host_dir) is not None and umount(host_dir):
            pass
        source = os.path.join(target, BINDS, str(i))
        if keep_binds and mounted(target) is not None and os.path.isdir(source) and os.path.isdir(host_dir):
            try:
                keep(source, host_dir)
            except OSError:
                pass  # the log is the unit's: losing its copy must not hold the removal
    if os.path.exists(image):
        while mounted(target) is not None and umount(target):
            pass


def mount_argv(device, target):
    """mount(8) for another mount namespace (the driver's network namespace helper)."""
    return ["mount", "-t", "ext4", "-o", "discard", device, target]


def usage(container):
    """(bytes used, bytes in all) of the container's mounted image, or None."""
    target = os.path.join(container, MOUNTPOINT)
    if mounted(target) is None:
        return None
    st = os.statvfs(target)
    return (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_blocks * st.f_frsize


BINDS_FILE = "disk.json"    # in the container's directory: the host directories bound


def write_binds(container, binds):
    import json
    path = os.path.join(container, BINDS_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump([os.path.normpath(b) for b in binds], f)
    os.rename(path + ".tmp", path)


def read_binds(container):
    import json
    try:
        with open(os.path.join(container, BINDS_FILE)) as f:
            binds = json.load(f)
    except FileNotFoundError:
        return []
    if not isinstance(binds, list) or not all(isinstance(b, str) and b.startswith("/") for b in binds):
        raise DiskError(f"{container}/{BINDS_FILE} is malformed")
    return binds


def helper_commands(container, action, mountinfo):
    """Shell commands that make another mount namespace (the one `mountinfo` shows)
    match this one for the container: 'ensure' mounts its image and binds where they
    are missing there, 'release' unmounts them. [] if nothing is to be done."""
    import shlex

    image = os.path.join(container, IMAGE)
    if not os.path.exists(image):
        return []
    target = os.path.join(container, MOUNTPOINT)
    binds = read_binds(container)
    commands = []
    if action == "ensure":
        device = loop_device(image)
        if device is None:
            raise DiskError(f"{image} is not attached to a loop device")
        if mounted(target, mountinfo) is None:
            commands.append(f"mount -t ext4 -o discard {shlex.quote(device)} {shlex.quote(target)}")
        for i, host_dir in enumerate(binds):
            if mounted(host_dir, mountinfo) is None:
                source = os.path.join(target, BINDS, str(i))
                commands.append(f"mount --bind {shlex.quote(source)} {shlex.quote(host_dir)}")
    else:
        for path in [*binds, target]:
            if mounted(path, mountinfo) is not None:
                commands.append(f"umount -l {shlex.quote(path)}")
    return commands
