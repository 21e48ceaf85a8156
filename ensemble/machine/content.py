"""What goes into a unit's container, besides the template: this host's ensemble code
(read-only mounts at the same paths, so the code inside is exactly the host's), the
unit agent's interpreter, and the files that make it a small real machine (its name
in /etc/hosts, its resolver, its apt proxy)."""

import os
import sys

import ensemble
from ensemble.errors import EnsembleError


class UnrunnableInstallation(EnsembleError):
    """This host's ensemble cannot run inside containers."""


def ensemble_mounts():
    """Read-only mounts that make this host's ensemble importable inside a container
    at the same paths: the venv (sys.prefix) and the `ensemble` package directory
    (an editable install's finder, or a .pth path entry, points at it)."""
    mounts = []
    prefix = sys.prefix
    if prefix != sys.base_prefix:
        mounts.append((os.path.realpath(prefix), prefix, True))
    package = os.path.dirname(os.path.abspath(ensemble.__file__))
    if not (package + "/").startswith(prefix.rstrip("/") + "/") or prefix == sys.base_prefix:
        mounts.append((os.path.realpath(package), package, True))
    return mounts


def compile_agent_code():
    """Write the bytecode of this host's `ensemble` package next to it, where the host
    may write: units mount the package read-only, so a module without it would be
    compiled again by every unit agent that starts (tens of ms each, on the way to
    `started`). Only what is missing or stale is written; a package the host cannot
    write to is left as it is. Blocking: run it in a thread."""
    import compileall

    package = os.path.dirname(os.path.abspath(ensemble.__file__))
    return compileall.compile_dir(package, quiet=2, workers=1)


def agent_python():
    """The venv's python: works inside a container given ensemble_mounts(). (Outside
    a venv, the rootfs's own python3, which does not have ensemble's dependencies.)"""
    if sys.prefix == sys.base_prefix:
        return "/usr/bin/python3"
    return os.path.join(sys.prefix, "bin", "python")


def _resolve_inside(path, rootfs, mounts, depth=0):
    """Where `path` leads inside a container whose root is `rootfs` with `mounts`
    ((host, inside, ro) binds at the same paths), following symbolic links as the
    container would; None if it leads nowhere."""
    if depth > 40:
        return None
    for host_path, inside, _ in mounts:
        if path == inside or path.startswith(inside.rstrip("/") + "/"):
            candidate = host_path + path[len(inside.rstrip("/")):]
            break
    else:
        candidate = os.path.join(rootfs, path.lstrip("/"))
    if os.path.islink(candidate):
        target = os.readlink(candidate)
        return _resolve_inside(os.path.normpath(os.path.join(os.path.dirname(path), target)), rootfs, mounts, depth + 1)
    # A directory on the way may be a link too (usr-merged /bin, say).
    parent = os.path.dirname(path)
    if parent != path and parent != "/":
        resolved_parent = _resolve_inside(parent, rootfs, mounts, depth + 1)
        if resolved_parent is None:
            return None
        if resolved_parent != parent:
            return _resolve_inside(os.path.join(resolved_parent, os.path.basename(path)), rootfs, mounts, depth + 1)
    return path if os.path.exists(candidate) else None


def check_installation(rootfs, python=None, mounts=None):
    """Refuse an installation whose unit agent cannot start in containers made from
    `rootfs`: its interpreter (a venv's python links to the python it was built on)
    must exist inside. Returns the interpreter as the container sees it."""
    python = python or agent_python()
    mounts = ensemble_mounts() if mounts is None else mounts
    inside = _resolve_inside(python, rootfs, mounts)
    if inside is None:
        real = os.path.realpath(python)
        raise UnrunnableInstallation(
            f"units cannot run this installation: its python {python} is {real} on this host, which "
            f"containers do not have; install with scripts/install (a venv on /usr/bin/python3)"
        )
    return inside


def unit_files(hostname, address, gateway=None, domain=None, apt_proxy=None):
    """{path inside: (text, mode)} a unit's container starts with: its own name
    resolving to its address; with `gateway`, the host's name server there (with
    `domain` searched); with `apt_proxy`, apt's configuration for the host's cache."""
    search = f"{hostname}.{domain}\t" if domain else ""
    files = {
        "/etc/hosts": (
            f"127.0.0.1\tlocalhost\n{address}\t{search}{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        ),
    }
    if gateway:
        # Short timeouts: the only server is on the host, one hop away; a resolver
        # that waits 5 s per try makes every tool in the unit slow when it is down.
        lines = [f"nameserver {gateway}"]
        if domain:
            lines.append(f"search {domain}")
        lines.append("options timeout:1 attempts:2")
        files["/etc/resolv.conf"] = ("\n".join(lines) + "\n", 0o644)
    if apt_proxy:
        files[APT_PROXY_FILE] = (apt_proxy, 0o644)
    return files


# Read by apt in the unit (see ensemble/machine/package_cache.py unit_apt_config).
APT_PROXY_FILE = "/etc/apt/apt.conf.d/01ensemble-proxy"
