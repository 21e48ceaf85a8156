"""The logs of one host's ENSEMBLE_HOME read as one (`ensemble debug-log`): each unit's
hook output and its unit agent's log, and the machine agents' logs, merged by the time
on their lines, and followed.

    <logs>/machine-<N>.log                      a machine agent's log (host-written)
    <logs>/units/<key>/<key>.log                a live unit's hook output (unit-written)
    <logs>/units/<key>/agent.log                its unit agent's log (unit-written)
    <logs>/units/removed/<key>.<YYYYMMDD-HHMMSS>[.<n>]/...
                                                a removed unit's, as its teardown left it

Every line that starts a record starts with its time, `YYYY-MM-DD HH:MM:SS[,mmm]`
(logging's asctime, juju-log's, the hook output's), or `--- ` then the time (the hook
output's header and footer). A line without one (a traceback, a continuation) belongs to
the line before it. Times compare as text: they are all local time of one clock.

Unit-written files are read through ensemble.hostfs (no link followed, regular files
only), each within its last hostfs.TAIL_LIMIT bytes, in chunks: memory stays bounded
whatever the files hold.
"""

import heapq
import os
import re
import sys
import time
from collections import deque
from dataclasses import dataclass, field

from ensemble import hostfs
from ensemble.log_layout import AGENT_LOG, REMOVED, REMOVED_TIME, UNITS, hook_log
from ensemble.errors import UnsafeFile
from ensemble.names import parse_unit_name, unit_key, unit_name_from_key

CHUNK = 256 << 10
# How far before the last N lines a read looks for the timed line they continue.
LOOKBACK = 64 << 10
_MACHINE_LOG = re.compile(r"machine-(\d{1,10})\.log\Z")
_TIME = re.compile(rb"(?:--- )?(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)(,\d{3})?(?= |$)")


def line_time(line):
    """The sort key of a line's own time (bytes, comparable as they are), or None."""
    match = _TIME.match(line)
    if match is None:
        return None
    return match.group(1) + (match.group(2) or b",000")


@dataclass
class Source:
    """One log file: `label` prefixes its lines; `root` is the host's own directory it
    is below (opened as given), `relative` its path below that (no link followed)."""

    label: str
    root: str
    relative: str
    unit: str = None          # the unit it is of; None: a machine agent's
    removed: str = None       # when its unit was removed (YYYY-MM-DD HH:MM:SS)

    @property
    def path(self):
        return os.path.join(self.root, self.relative)


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except (FileNotFoundError, NotADirectoryError):
        return []


def live_units(logs_dir):
    """{unit name: key} of the unit log directories in `logs_dir`."""
    units = {}
    for key in _listdir(os.path.join(logs_dir, UNITS)):
        try:
            units[unit_name_from_key(key)] = key
        except Exception:
            continue  # not a unit's (`removed`, a stray file)
    return units


def removed_units(logs_dir):
    """[(unit name, directory name, removal time)] below <logs>/units/removed, oldest first."""
    found = []
    for entry in _listdir(os.path.join(logs_dir, UNITS, REMOVED)):
        key, _, rest = entry.partition(".")
        try:
            name = unit_name_from_key(key)
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.strptime(rest.partition(".")[0], REMOVED_TIME))
        except Exception:
            continue
        found.append((name, entry, when))
    return sorted(found, key=lambda f: (f[2], f[1]))


def machine_logs(logs_dir):
    """[(label, file name)] of the machine agents' logs of this home."""
    found = []
    for entry in _listdir(logs_dir):
        match = _MACHINE_LOG.match(entry)
        if match:
            found.append((int(match.group(1)), entry))
    return [(f"machine-{n}", entry) for n, entry in sorted(found)]


def unit_sources(logs_dir, name, directory, removed=None):
    """The files of one unit's log directory (<logs>/units/`directory`)."""
    key = unit_key(name)
    label = f"{name} (removed {removed})" if removed else name
    units = os.path.join(logs_dir, UNITS)
    return [Source(label, units, os.path.join(directory, f), unit=name, removed=removed)
            for f in (hook_log(key), AGENT_LOG)]


def sources(logs_dir, units=None, removed=False, machines=True):
    """The log files of this home: the live units' (those of `units` only, if given),
    with `removed` the removed units' too, and the machine agents'."""
    wanted = None if units is None else set(units)
    found = []
    for name, key in live_units(logs_dir).items():
        if wanted is None or name in wanted:
            found.extend(unit_sources(logs_dir, name, key))
    if removed:
        for name, entry, when in removed_units(logs_dir):
            if wanted is None or name in wanted:
                found.extend(unit_sources(logs_dir, name, os.path.join(REMOVED, entry), when))
    if machines:
        found.extend(Source(label, logs_dir, entry) for label, entry in machine_logs(logs_dir))
    return found


def removal_keys(logs_dir, units):
    """{unit: the time key of its last removal} of those of `units` removed before: a
    machine agent's lines about that earlier unit are before it, or at it."""
    keys = {}
    for name, entry, when in removed_units(logs_dir):
        if name in units:
            keys[name] = max(keys.get(name, b""), _removal_key(logs_dir, entry, when))
    return keys


def _removal_key(logs_dir, entry, when):
    # To the millisecond from the directory's mtime (set at the move), where it agrees
    # with the second in its name: a unit made again within that second shows its own
    # lines. Otherwise (a directory touched since) the whole second is the earlier one's.
    try:
        mtime = os.stat(os.path.join(logs_dir, UNITS, REMOVED, entry)).st_mtime
    except OSError:
        mtime = None
    if mtime is not None and time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(mtime)) == when:
        return f"{when},{int(mtime * 1000) % 1000:03d}".encode()
    return when.encode() + b",999"


def mentions(units, since=None):
    """A test of a machine agent's (timed) line: does it name one of `units` (as a whole
    name), later than `since` ({unit: time key}, for a name re-used) says? None: every
    line is wanted."""
    if units is None:
        return None
    for name in units:
        parse_unit_name(name)
    since = {n.encode(): k for n, k in (since or {}).items()}
    names = b"|".join(re.escape(n.encode()) for n in sorted(units))
    pattern = re.compile(rb"(?<![a-z0-9/-])(?:" + names + rb")(?![0-9])")

    def wanted(line):
        for match in pattern.finditer(line):
            if match.group(0) not in since or (line_time(line) or b"") > since[match.group(0)]:
                return True
        return False

    return wanted


# What the unit agent's log repeats of the hook output's: juju-log's lines (its logger
# writes to both), shown once, among the hook's output.
_JUJU_LOG_COPY = re.compile(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ensemble\.unit\.hook\.")


def _record_test(source, wanted):
    """Which records (a timed line, its continuations) of `source` are shown: a test of
    the timed line, or None for all."""
    if source.unit is None:
        return wanted
    if source.relative.endswith("/" + AGENT_LOG):
        return lambda line: _JUJU_LOG_COPY.match(line) is None
    return None


# -- reading --------------------------------------------------------------------------

class _File:
    """A source opened once: its identity, its size then, and the window read of it."""

    def __init__(self, source, limit):
        fd = hostfs.open_regular(source.root, source.relative)
        try:
            st = os.fstat(fd)
            self.ident = (st.st_dev, st.st_ino)
            self.size = st.st_size
            self.begin = max(0, self.size - limit)
            self.source = source
        finally:
            os.close(fd)

    def pread(self, length, offset):
        """Bytes of this very file (reopened through hostfs; b"" if it was replaced)."""
        try:
            fd = hostfs.open_regular(self.source.root, self.source.relative)
        except (OSError, UnsafeFile):
            return b""
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self.ident:
                return b""
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)


def _line_starts(file, end):
    """Offsets of the starts of the lines before `end`, last first, down to the window's
    beginning (a line cut there is not one)."""
    pos = end
    while pos > file.begin:
        low = max(file.begin, pos - CHUNK)
        data = file.pread(pos - low, low)
        if len(data) != pos - low:
            return
        i = len(data)
        while True:
            i = data.rfind(b"\n", 0, i)
            if i < 0:
                break
            yield low + i + 1
        pos = low
    if file.begin == 0:
        yield 0


def _start(file, end, lines):
    """Where to read `file` from for its last `lines` lines before `end` (0: all of its
    window), moved back to the timed line the first of them continues; and whether
    output that was asked for lies before the window."""
    if not lines:
        return file.begin, file.begin > 0
    if end > file.begin and file.pread(1, end - 1) == b"\n":
        end -= 1  # the last line's own end
    starts = _line_starts(file, end)
    start, count = None, 0
    for offset in starts:
        start, count = offset, count + 1
        if count == lines:
            break
    if start is None:
        return end, file.begin > 0
    if count < lines:
        return start, file.begin > 0
    while line_time(file.pread(40, start)) is None:
        offset = next(starts, None)
        if offset is None or start - offset > LOOKBACK:
            break
        start = offset
    return start, False


def _lines(file, start, end):
    """The lines of `file` from `start` to `end`, in chunks; the first dropped if it
    begins at a cut (the window's start, not a line's)."""
    skip = start == file.begin and start > 0
    partial, offset = b"", start
    while offset < end:
        data = file.pread(min(CHUNK, end - offset), offset)
        if not data:
            break
        offset += len(data)
        parts = (partial + data).split(b"\n")
        partial = parts.pop()
        if len(partial) > hostfs.TAIL_LIMIT:
            parts.append(partial)
            partial = b""
        for line in parts:
            if skip:
                skip = False
                continue
            yield line
    if partial and not skip:
        yield partial


class _Timer:
    """Each line's sort key: its own time, else the time of the line it continues;
    never earlier than the line before it (a file is in order, whatever its clock
    precision), so a merge keeps each file's order."""

    def __init__(self):
        self.last = b""

    def key(self, line):
        own = line_time(line)
        if own is not None and own > self.last:
            self.last = own
        return self.last, own is not None


def _keyed(index, source, lines, wanted):
    """(key, index, seq, label, line) of each line of a source a read keeps. Lines
    before its first time take that time. A machine agent's record (a timed line and its
    continuations) is kept only if `wanted` (if given) says so; a unit agent's, unless
    it is a copy of a juju-log line."""
    timer, held = _Timer(), []
    test = _record_test(source, wanted)
    keep = test is None  # a record begun before the read cannot be told
    for seq, line in enumerate(lines):
        key, timed = timer.key(line)
        if test is not None:
            if timed:
                keep = test(line)
            if not keep:
                continue
        if not key:
            held.append((seq, line))  # at most the window of one file
            continue
        for held_seq, held_line in held:
            yield key, index, held_seq, source.label, held_line
        held = []
        yield key, index, seq, source.label, line
    for held_seq, held_line in held:
        yield b"", index, held_seq, source.label, held_line


@dataclass
class Reading:
    """What `read` left for a follow: per path (identity, offset read to, last time
    key); the refusal of each unsafe source; the sources whose earlier output was
    left out (longer than the window)."""

    offsets: dict = field(default_factory=dict)
    refused: list = field(default_factory=list)
    cut: list = field(default_factory=list)


def _whole_end(file):
    """Where the last ended line of `file` ends (a line being written is left for a
    follow), within its window."""
    if file.size == file.begin:
        return file.size
    low = max(file.begin, file.size - CHUNK)
    newline = file.pread(file.size - low, low).rfind(b"\n")
    if newline >= 0:
        return low + newline + 1
    return file.begin if low == file.begin else file.size


def read(sources, emit, lines=100, wanted=None, whole_lines=False, limit=hostfs.TAIL_LIMIT):
    """emit(label, line) for the last `lines` lines (0: all) of `sources` merged in time
    order, each source within its last `limit` bytes. `wanted`: the test of machine
    agents' lines (`mentions`). With `whole_lines`, a last line not yet ended is left
    for a follow. Returns a Reading."""
    result = Reading()
    opened, generators = [], []
    for index, source in enumerate(sources):
        try:
            file = _File(source, limit)
        except FileNotFoundError:
            continue
        except UnsafeFile as e:
            result.refused.append(e)
            continue
        end = _whole_end(file) if whole_lines else file.size
        start, cut = _start(file, end, lines)
        if cut:
            result.cut.append(source)
        opened.append((index, file, end))
        generators.append(_keyed(index, source, _lines(file, min(start, end), end), wanted))
    kept = deque(maxlen=lines) if lines else None
    last_keys = {}
    for key, index, _, label, line in heapq.merge(*generators):
        last_keys[index] = key
        if kept is None:
            emit(label, line)  # all of it: written as it comes, never held
        else:
            kept.append((label, line))
    for label, line in kept or ():
        emit(label, line)
    for index, file, end in opened:
        result.offsets[file.source.path] = (file.ident, end, last_keys.get(index, b""))
    return result


def format_line(label, line):
    return f"{label} | {line.decode('utf-8', 'replace')}\n"


class Follower:
    """New lines of a set of sources, which `discover` gives again at each look (new
    units' files come in, from their start; files gone go), merged per look."""

    def __init__(self, discover, offsets, wanted=None, limit=hostfs.TAIL_LIMIT, err=None, refused=()):
        self.discover = discover
        self.wanted = wanted
        self.limit = limit
        self.err = err or sys.stderr
        # path -> [ident, offset, partial, timer, keep, refused]
        self.state = {}
        for path, (ident, offset, last) in offsets.items():
            timer = _Timer()
            timer.last = last
            self.state[path] = [ident, offset, b"", timer, False, False]
        for path in refused:  # said already
            self.state[path] = [None, 0, b"", _Timer(), False, True]

    def _read(self, source, entry):
        ident, offset = entry[0], entry[1]
        fd = hostfs.open_regular(source.root, source.relative)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != ident or st.st_size < offset:
                offset, entry[2] = 0, b""  # another file there now, or truncated: from its start
            begin = max(offset, st.st_size - self.limit)
            if begin > offset:
                print(f"({begin - offset} bytes of {source.path} left out)", file=self.err)
                entry[2] = b""
            data = os.pread(fd, min(st.st_size - begin, self.limit), begin) if st.st_size > begin else b""
            entry[0], entry[1] = (st.st_dev, st.st_ino), begin + len(data)
            return data
        finally:
            os.close(fd)

    def _skip(self, source, entry):
        try:
            fd = hostfs.open_regular(source.root, source.relative)
        except (OSError, UnsafeFile):
            return False
        try:
            st = os.fstat(fd)
            entry[0], entry[1] = (st.st_dev, st.st_ino), st.st_size
            return True
        finally:
            os.close(fd)

    def poll(self):
        """[(label, text)] of the lines written since the last look, in time order."""
        batch = []
        sources = self.discover()
        seen = set()
        for index, source in enumerate(sources):
            path = source.path
            seen.add(path)
            entry = self.state.get(path)
            if entry is None:
                entry = self.state[path] = [None, 0, b"", _Timer(), False, False]
                if source.removed:
                    # A unit removed meanwhile: its lines were shown as it wrote them.
                    if not self._skip(source, entry):
                        del self.state[path]
                    continue
            try:
                data = self._read(source, entry)
            except FileNotFoundError:
                del self.state[path]  # its unit went, or it is not there yet
                continue
            except UnsafeFile as e:
                if not entry[5]:
                    print(f"({e}; following the others)", file=self.err)
                    entry[5] = True
                continue
            entry[5] = False
            parts = (entry[2] + data).split(b"\n")
            entry[2] = parts.pop()
            if len(entry[2]) > self.limit:
                parts.append(entry[2])
                entry[2] = b""
            timer, test = entry[3], _record_test(source, self.wanted)
            for seq, line in enumerate(parts):
                key, timed = timer.key(line)
                if test is not None:
                    if timed:
                        entry[4] = test(line)
                    if not entry[4]:
                        continue
                batch.append((key, index, seq, source.label, line))
        for path in set(self.state) - seen:
            del self.state[path]
        batch.sort(key=lambda item: item[:3])
        return [(label, line) for _, _, _, label, line in batch]
