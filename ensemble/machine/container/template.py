"""The container template: a Debian rootfs built once per host with debootstrap, from
the host's own apt mirror and release, kept as an LXC container that units are
snapshot-cloned from.

    <cache_dir>/template.lock                 flock: one build at a time on this host
    <cache_dir>/build/<name>.<pid>            a build in progress (never cloned from)
    <cache_dir>/lxc/<name>/config             the template's own LXC config
    <cache_dir>/lxc/<name>/rootfs/            what every clone sees below its overlay
    <cache_dir>/lxc/<name>/ensemble-template.json   written last: the completion marker

`name` is `ensemble-template-<version>`, and `version` a hash of what goes in (recipe,
release, mirror, packages): change any of them and a new template is built next to the
old one. A build happens in build/ and is renamed into lxc/ only once complete, so an
interrupted or failed build leaves nothing a clone would use. Python libraries are not
installed: the host's venv and source tree are bind-mounted into every container
(ensemble/machine/content.py), so the code inside is exactly the host's.
"""

import ctypes
import errno
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

from twisted.internet import defer, protocol, task, threads

from ensemble.errors import EnsembleError
from ensemble.machine.container.config import runtime_lines

log = logging.getLogger("ensemble.container")

# Bump when what the build does changes (it renames the template).
RECIPE_VERSION = 2
PACKAGES = ("python3", "tini", "runit", "ca-certificates", "iproute2", "procps")
DEFAULT_CACHE = "/var/cache/ensemble"
MARKER = "ensemble-template.json"
LOCK_POLL = 0.1
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# A service that is down, for the template's own config (plain `lxc-copy` clones boot
# with it); in a unit's clone, the bind mount of its own service directory hides it.
IDLE_SERVICE = "etc/ensemble/service/agent"


class TemplateError(EnsembleError):
    pass


# -- what the host uses ---------------------------------------------------------------

def _os_release(path="/etc/os-release"):
    values = {}
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    values[key] = value.strip().strip('"').strip("'")
    except OSError:
        pass
    return values


def host_release(os_release="/etc/os-release"):
    """The host's distribution codename (e.g. 'bookworm')."""
    values = _os_release(os_release)
    codename = values.get("VERSION_CODENAME") or values.get("UBUNTU_CODENAME")
    if not codename:
        match = re.search(r"\(([a-z]+)\)", values.get("VERSION", ""))
        codename = match.group(1) if match else None
    if not codename:
        raise TemplateError(f"cannot tell this host's release from {os_release}; pass release=")
    return codename


class AptSource:
    def __init__(self, uri, suites, components, options, origin_file):
        self.uri = uri.rstrip("/")
        self.suites = suites
        self.components = components
        self.options = options
        self.origin_file = origin_file

    @property
    def keyring(self):
        value = self.options.get("signed-by")
        return value if value and value.startswith("/") and os.path.exists(value) else None

    def __repr__(self):
        return f"AptSource({self.uri!r}, {self.suites}, {self.components})"


def _parse_one_line(text, origin):
    sources = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        options = {}
        match = re.match(r"(deb|deb-src)\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)", line)
        if not match:
            continue
        kind, opts, uri, suite, components = match.groups()
        if kind != "deb":
            continue
        for opt in (opts or "").strip("[] \t").split():
            key, _, value = opt.partition("=")
            options[key.lower()] = value
        sources.append(AptSource(uri, [suite], components.split(), options, origin))
    return sources


def _parse_deb822(text, origin):
    sources = []
    for stanza in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in stanza.splitlines():
            if line.startswith("#"):
                continue
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
                continue
            key, sep, value = line.partition(":")
            if not sep:
                key = None
                continue
            key = key.strip().lower()
            fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        options = {k: v for k, v in fields.items() if k not in ("types", "uris", "suites", "components")}
        for uri in fields.get("uris", "").split():
            sources.append(AptSource(uri, fields.get("suites", "").split(), fields.get("components", "").split(), options, origin))
    return sources


def apt_sources(root="/etc/apt"):
    sources = []
    paths = [os.path.join(root, "sources.list")]
    paths += sorted(glob.glob(os.path.join(root, "sources.list.d", "*.list")))
    paths += sorted(glob.glob(os.path.join(root, "sources.list.d", "*.sources")))
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        parse = _parse_deb822 if path.endswith(".sources") else _parse_one_line
        sources += parse(text, path)
    return sources


def _release_origin(uri, suite, lists="/var/lib/apt/lists"):
    """The Origin of apt's downloaded Release file for uri/suite, if apt has one."""
    stem = re.sub(r"^[a-z0-9+.-]+://", "", uri).rstrip("/").replace("/", "_")
    for name in ("InRelease", "Release"):
        try:
            with open(os.path.join(lists, f"{stem}_dists_{suite}_{name}"), errors="replace") as f:
                for line in f:
                    if line.startswith("Origin:"):
                        return line.split(":", 1)[1].strip()
                    if not line.strip():
                        break
        except OSError:
            continue
    return None


def host_mirror(release=None, root="/etc/apt", lists="/var/lib/apt/lists"):
    """(uri, keyring or None): the host's entry for its release of the main archive
    (suite exactly `release`, component main), not a third-party repository. Among
    several, one whose Release file apt reports as from Debian or Ubuntu wins."""
    release = release or host_release()
    candidates = [
        s for s in apt_sources(root)
        if release in s.suites and "main" in s.components and re.match(r"(https?|ftp|file)://", s.uri)
    ]
    if not candidates:
        raise TemplateError(
            f"no apt source for '{release} main' in {root}/sources.list or sources.list.d; pass mirror="
        )
    official = [s for s in candidates if _release_origin(s.uri, release, lists) in ("Debian", "Ubuntu")]
    chosen = (official or candidates)[0]
    return chosen.uri, chosen.keyring


# -- filesystem helpers ---------------------------------------------------------------

_libc = None


def _umount_lazy(path):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.umount2(os.fsencode(path), 2) != 0:  # MNT_DETACH
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, os.strerror(err), path)


def mounts_under(path):
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mountpoint = line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            if mountpoint == path or mountpoint.startswith(path + "/"):
                found.append(mountpoint)
    return found


def shift_owners(path, first_id, count=65536):
    """Move the owners of everything under `path` that are below `count` up by
    `first_id` (and keep setuid/setgid bits, which chown clears)."""
    for dirpath, dirnames, filenames in os.walk(path):
        for name in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
            st = os.lstat(name)
            if st.st_uid < count and st.st_gid < count:
                os.lchown(name, st.st_uid + first_id, st.st_gid + first_id)
                if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o6000:
                    os.chmod(name, stat.S_IMODE(st.st_mode))


def remove_tree(path):
    """rm -rf that never descends into something mounted below `path`: those are
    unmounted (lazily) first. Blocking: call it through a thread."""
    for mountpoint in sorted(mounts_under(path), key=len, reverse=True):
        _umount_lazy(mountpoint)
    shutil.rmtree(path, ignore_errors=False, onerror=_rmtree_error)


def _rmtree_error(function, path, excinfo):
    if isinstance(excinfo[1], FileNotFoundError):
        return
    raise excinfo[1]


# -- the build process ----------------------------------------------------------------

# debootstrap --debian-installer reports on fd 3 in a coded form: "X: name", then
# "XA: argument" lines, then "XF: printf format", for X in I(nfo), W(arning), E(rror)
# and P(rogress: "P: now end stage"). Its full log goes to stdout and stderr.
PROGRESS_FD = 3
LOCK_FD = 9  # debootstrap keeps 3-8 for itself
# debootstrap's progress stages, in the order they come, and what each is for people.
STAGES = [
    (("DOWNREL", "DOWNRELSIG"), "checking the release"),
    (("DOWNPKGS", "DOWNMAINPKGS"), "downloading package lists"),
    (("SIZEDEBS",), "resolving packages"),
    (("DOWNDEBS",), "downloading packages"),
    (("EXTRACTPKGS",), "extracting packages"),
    (("INSTCORE",), "installing core packages"),
    (("UNPACKREQ",), "unpacking required packages"),
    (("CONFREQ",), "configuring required packages"),
    (("UNPACKBASE",), "unpacking the base system"),
    (("CONFBASE",), "configuring the base system"),
]


def _printf(fmt, args):
    """The shell's printf for the %s-only formats debootstrap uses."""
    args = iter(args)
    return re.sub(r"%%|%s", lambda m: "%" if m.group() == "%%" else next(args, ""), fmt)


class BuildProgress:
    """debootstrap's progress events and messages as one line a person can follow:
    the stage out of all, and packages (or megabytes) done out of total."""

    def __init__(self):
        self.stage = None
        self.packages = None   # how many debootstrap fetches, once it has said
        self.retrieved = 0
        self.bytes = (0, 0)

    def event(self, stage, now, end):
        self.stage = stage
        now = min(now, end)  # debootstrap's own counts can run one past their end
        if stage == "SIZEDEBS" and end > 0:
            self.packages = end
        if stage in ("DOWNPKGS", "DOWNDEBS"):
            self.bytes = (now, end)
        if stage in ("DOWNREL", "DOWNRELSIG", "DOWNMAINPKGS"):
            return self._line(None)
        if stage in ("DOWNPKGS",):
            return self._line(f"{now / 1e6:.1f} of {end / 1e6:.1f} MB")
        if stage == "DOWNDEBS":
            return self._downloading()
        return self._line(f"{now} of {end} packages")

    def retrieving(self):
        """debootstrap says it fetches one more package."""
        if self.stage != "DOWNDEBS":
            return None
        self.retrieved += 1
        return self._downloading()

    def _downloading(self):
        total = f" of {self.packages}" if self.packages else ""
        done, size = self.bytes
        megabytes = f" ({size / 1e6:.1f} MB)" if size else ""
        return self._line(f"{self.retrieved}{total} packages{megabytes}")

    def _line(self, detail):
        for number, (names, label) in enumerate(STAGES, 1):
            if self.stage in names:
                break
        else:
            number, label = None, self.stage.lower()
        where = f"stage {number} of {len(STAGES)}: " if number else ""
        return f"{where}{label}" + (f": {detail}" if detail else "")


class _Build(protocol.ProcessProtocol):
    """debootstrap: its messages and a progress line to `progress`, the tail of its
    log kept for errors; `wait()` fires with the exit code (or -signal)."""

    def __init__(self, progress):
        self.progress = progress
        self.code = None
        self.done = False
        self._waiters = []
        self.tail = []
        self.errors = []
        self.stages = BuildProgress()
        self._partial = {1: b"", 2: b"", PROGRESS_FD: b""}
        self._message = None  # (kind, head, args) being read from PROGRESS_FD

    def connectionMade(self):
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        buffer = self._partial.get(fd, b"") + data
        *lines, self._partial[fd] = buffer.split(b"\n")
        for line in lines:
            self._line(fd, line)

    def _line(self, fd, raw):
        line = raw.decode("utf-8", "replace").rstrip()
        if not line:
            return
        if fd != PROGRESS_FD:
            self.tail = (self.tail + [line])[-20:]
            return
        kind, _, rest = line.partition(": ")
        if kind in ("I", "W", "E", "P"):
            self._message = (kind, rest, [])
        elif self._message is not None and kind == self._message[0] + "A":
            self._message[2].append(rest)
        elif self._message is not None and kind == self._message[0] + "F":
            kind, head, args = self._message
            self._message = None
            text = _printf(rest, args)
            if kind == "P":
                now, end, stage = (head.split() + ["", "", ""])[:3]
                if now.isdigit() and end.isdigit():
                    self._report(self.stages.event(stage, int(now), int(end)))
                return
            if kind == "E":
                self.errors.append(text)
            self._report(f"{kind}: {text}")
            if kind == "I" and head == "RETRIEVING":
                line = self.stages.retrieving()
                if line:
                    self._report(line)

    def _report(self, line):
        try:
            self.progress(line)
        except Exception:
            log.exception("template progress callback failed")

    def processEnded(self, reason):
        for fd in (1, 2, PROGRESS_FD):
            if self._partial.get(fd):
                self._line(fd, self._partial[fd])
                self._partial[fd] = b""
        code = reason.value.exitCode
        self.code = code if code is not None else -(reason.value.signal or 1)
        self.done = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(self.code)

    def wait(self):
        """A Deferred firing with the exit code; cancelling it leaves the process be."""
        waiter = defer.Deferred()
        if self.done:
            waiter.callback(self.code)
        else:
            self._waiters.append(waiter)
        return waiter

    def kill(self, sig):
        pid = self.transport.pid if self.transport else None
        if pid:
            try:
                os.killpg(pid, sig)  # debootstrap and everything it started (setsid)
            except ProcessLookupError:
                pass


def _progress_to_log(line):
    log.info("template: %s", line)


class Template:
    def __init__(self, cache_dir=None, release=None, mirror=None, reactor=None):
        self.cache_dir = os.path.abspath(cache_dir or os.environ.get("ENSEMBLE_TEMPLATE_CACHE") or DEFAULT_CACHE)
        self.release = release or host_release()
        keyring = None
        if mirror is None:
            mirror, keyring = host_mirror(self.release)
        self.mirror = mirror.rstrip("/")
        self.keyring = keyring
        self.packages = tuple(sorted(PACKAGES))
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        recipe = json.dumps(
            {"recipe": RECIPE_VERSION, "release": self.release, "mirror": self.mirror, "packages": self.packages},
            sort_keys=True,
        )
        self.version = hashlib.sha256(recipe.encode()).hexdigest()[:12]
        self.name = f"ensemble-template-{self.version}"
        self.builds = 0  # builds this object ran (tests: concurrent ensure() builds once)

    def __repr__(self):
        return f"Template({self.name}, release={self.release}, mirror={self.mirror}, cache={self.cache_dir})"

    # -- where ------------------------------------------------------------------------

    @property
    def lxc_path(self):
        return os.path.join(self.cache_dir, "lxc")

    @property
    def path(self):
        return os.path.join(self.lxc_path, self.name)

    @property
    def rootfs(self):
        return os.path.join(self.path, "rootfs")

    @property
    def config_path(self):
        return os.path.join(self.path, "config")

    @property
    def lock_path(self):
        return os.path.join(self.cache_dir, "template.lock")

    @property
    def build_root(self):
        return os.path.join(self.cache_dir, "build")

    def exists(self):
        return os.path.isfile(os.path.join(self.path, MARKER)) and os.path.isdir(self.rootfs)

    def info(self):
        """What the completion marker records (version, release, mirror, packages,
        build time), or None."""
        try:
            with open(os.path.join(self.path, MARKER)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # -- build ------------------------------------------------------------------------

    async def ensure(self, progress=None):
        """Build the template unless it exists. Serialised across processes with an
        flock; a caller that waited finds it built. Returns self."""
        if self.exists():
            return self
        progress = progress or _progress_to_log
        os.makedirs(self.cache_dir, exist_ok=True)
        lock = await self._lock(progress)
        try:
            if self.exists():
                return self
            await self._build(progress, lock)
        finally:
            os.close(lock)
        return self

    async def remove(self):
        """Delete this template (tests and benchmarks: the next ensure() is a cold
        build). Clones of it stop working: destroy them first."""
        if not os.path.isdir(self.cache_dir):
            return
        lock = await self._lock(_progress_to_log)
        try:
            if os.path.exists(self.path):
                doomed = os.path.join(self.build_root, f"{self.name}.removing.{os.getpid()}")
                os.makedirs(self.build_root, exist_ok=True)
                os.rename(self.path, doomed)  # gone from lxc/ at once, then deleted
                await threads.deferToThread(remove_tree, doomed)
        finally:
            os.close(lock)

    async def _lock(self, progress):
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if not told:
                        progress(f"waiting for another template build on this host ({self.lock_path})")
                        told = True
                    await task.deferLater(self.reactor, LOCK_POLL, lambda: None)
        except BaseException:
            os.close(fd)
            raise

    def _debootstrap_argv(self, rootfs):
        argv = [
            "setpriv", "--pdeathsig", "KILL", "--",
            # Its own session (killed as a group) and mount namespace (the /proc and
            # /sys it mounts in the target vanish with it, even if it is killed).
            "setsid", "unshare", "--mount", "--propagation", "private", "--",
            "debootstrap", "--debian-installer", "--variant=minbase", f"--include={','.join(self.packages)}",
        ]
        if self.keyring:
            argv.append(f"--keyring={self.keyring}")
        return argv + [self.release, rootfs, self.mirror]

    async def _build(self, progress, lock):
        started = time.monotonic()
        self.builds += 1
        os.makedirs(self.build_root, exist_ok=True)
        os.makedirs(self.lxc_path, exist_ok=True)
        # We hold the lock: whatever is in build/ is left over from an interrupted build.
        for leftover in os.listdir(self.build_root):
            progress(f"removing an interrupted build: {leftover}")
            await threads.deferToThread(remove_tree, os.path.join(self.build_root, leftover))
        build = os.path.join(self.build_root, f"{self.name}.{os.getpid()}")
        rootfs = os.path.join(build, "rootfs")
        os.makedirs(rootfs)
        progress(f"building template {self.name}: debootstrap {self.release} from {self.mirror} "
                 f"with {', '.join(self.packages)}")
        env = dict(os.environ)
        env.update(LC_ALL="C", DEBIAN_FRONTEND="noninteractive",
                   PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        argv = self._debootstrap_argv(rootfs)
        build_process = _Build(progress)
        try:
            try:
                # LOCK_FD is the lock: debootstrap and its children hold it until
                # the last of them exits, even if this process dies first.
                self.reactor.spawnProcess(build_process, argv[0], argv, env=env,
                                          childFDs={0: "w", 1: "r", 2: "r", PROGRESS_FD: "r", LOCK_FD: lock})
            except OSError as e:
                raise TemplateError(f"cannot run debootstrap: {e}")
            try:
                code = await build_process.wait()
            finally:
                if not build_process.done:  # cancelled
                    await self._stop(build_process)
            if code != 0:
                reason = (build_process.errors or build_process.tail[-1:] or [""])[-1]
                raise TemplateError(
                    f"building template {self.name} failed: debootstrap exited with {code}"
                    + (f": {reason}" if reason else "")
                )
            progress("finishing the template")
            await threads.deferToThread(self._finish, build, rootfs, time.monotonic() - started)
            os.rename(build, self.path)
        except BaseException:
            if os.path.exists(build):
                progress(f"removing the incomplete build {build}")
                await threads.deferToThread(remove_tree, build)
            raise
        elapsed = time.monotonic() - started
        progress(f"template {self.name} built in {elapsed:.1f}s")
        log.info("template %s built in %.1fs at %s", self.name, elapsed, self.path)

    async def _stop(self, build_process):
        """Cancelled: stop debootstrap's whole session and wait until it has gone."""
        build_process.kill(signal.SIGTERM)
        killer = self.reactor.callLater(5, build_process.kill, signal.SIGKILL)
        try:
            await build_process.wait()
        finally:
            if killer.active():
                killer.cancel()

    def _finish(self, build, rootfs, build_seconds):
        """Everything after debootstrap (in a thread): host CA bundle, hostname,
        no leftover .debs, the LXC config, fsync, the marker."""
        if os.path.exists(HOST_CA_BUNDLE):
            target = os.path.join(rootfs, HOST_CA_BUNDLE.lstrip("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(HOST_CA_BUNDLE, target)
        with open(os.path.join(rootfs, "etc", "hostname"), "w") as f:
            f.write("localhost\n")
        with open(os.path.join(rootfs, "etc", "hosts"), "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        for deb in glob.glob(os.path.join(rootfs, "var", "cache", "apt", "archives", "*.deb")):
            os.unlink(deb)
        idle = os.path.join(rootfs, IDLE_SERVICE)
        os.makedirs(idle, exist_ok=True)
        with open(os.path.join(idle, "run"), "w") as f:
            f.write("#!/bin/sh\nexec sleep infinity\n")
        os.chmod(os.path.join(idle, "run"), 0o755)
        open(os.path.join(idle, "down"), "w").close()
        python = f"python{sys.version_info.major}.{sys.version_info.minor}"
        if not os.path.exists(os.path.join(rootfs, "usr", "bin", python)):
            raise TemplateError(f"the template has no {python}, the host's venv cannot run in it")
        with open(os.path.join(build, "config"), "w") as f:
            f.write(self._config())
        os.sync()  # the rename below must not outlive the data it points at
        marker = {
            "name": self.name,
            "version": self.version,
            "recipe": RECIPE_VERSION,
            "release": self.release,
            "mirror": self.mirror,
            "packages": list(self.packages),
            "python": python,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(build_seconds, 1),
        }
        with open(os.path.join(build, MARKER), "w") as f:
            json.dump(marker, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    def _config(self):
        """The template's own config: lxc-copy copies it into plain clones, which boot
        with no network and nothing supervised. Units get a config of their own."""
        return "\n".join([
            f"# ensemble template {self.version} ({self.release}, {self.mirror}): clone it, do not start it",
            f"lxc.rootfs.path = dir:{self.rootfs}",
            f"lxc.uts.name = {self.name}",
            "lxc.net.0.type = empty",
            "lxc.cgroup.relative = 1",
            *runtime_lines(f"/usr/bin/tini -- /usr/bin/runsv /{IDLE_SERVICE}"),
            "",
        ])
