"""Directories an unprivileged id must pass through: a unit's root (a high host id)
has LXC resolve its rootfs, mounts and lxc path, and may search only what is open to
it (mode o+x, or its own)."""

import os


def make_searchable(path, top):
    """mkdir -p `path`, then mode 0755 on it and each parent below `top`: those are
    ours (under /var/lib or /run), not the host's, so their mode is ours to set."""
    os.makedirs(path, exist_ok=True)
    while path != top and path != "/":
        os.chmod(path, 0o755)
        path = os.path.dirname(path)


def unsearchable(path, uid, gid=None):
    """The first directory on the way to `path` (itself included, if a directory) that
    host id `uid` (with group `gid` only), owning none of them but its own, may not
    search; None if none."""
    current = path if os.path.isdir(path) else os.path.dirname(path)
    while True:
        st = os.stat(current)
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return current
        if current == "/":
            return None
        current = os.path.dirname(current)
