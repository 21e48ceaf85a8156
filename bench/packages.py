"""What a host gives its units, timed: installing a package through the host's package
cache (cold and warm) against the same install with the .debs already on hand, and name
lookups from inside a unit. A real local environment of its own (own ENSEMBLE_HOME,
network 10.230.0.0/16, name `benchpkg`), always destroyed at the end. Prints one JSON
object on stdout; progress goes to stderr.

    .venv/bin/python bench/packages.py [--packages hello curl] [--warm 10] [--lookups 2000] [--uncached 30]

Every install is the same command, timed inside the unit (or chroot) by the shell that
runs it (`date +%s%N` around it), one package after the other in the order given:

    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends PKG

- cold:  the first unit of the new environment: its host's cache is empty, so
         apt-cacher-ng fetches every .deb from the host's Debian mirror while apt waits.
- warm:  `--warm` fresh units, one at a time (each added, started, timed, removed):
         every .deb is in the host's cache, apt gets it over the bridge.
- unit_local: as many fresh units again, whose /var/cache/apt/archives already holds
         the .debs (apt's own cache: nothing is fetched; `--no-download` is added so
         that nothing could be). Same container, no cache: what the cache costs.
- host:  the goal's baseline, "the same apt-get install run on the host from its own
         apt cache", without touching the host's own packages: a throwaway overlay of
         the container template's rootfs (the host's Debian release, unshifted, root as
         root), in a private mount namespace, chroot, /var/cache/apt/archives holding
         the .debs, `--no-download` added, and apt's binary caches (pkgcache.bin) built
         beforehand, untimed, as on a host whose apt has run before. Same rootfs and
         package lists as a unit; no container, no package cache.
- host_fresh: the same without building apt's binary caches first: the template has
         none, so like a fresh unit its first apt run builds them from the 50 MB
         package list. Between unit_local and host_fresh lies only the container.

The .debs of the baselines are the very files the cold unit's apt downloaded (taken
from its /var/cache/apt/archives, named as apt names them). The four cases after cold
run interleaved (warm unit, local unit, both host chroots, then again) so that drift of
the machine spreads over all of them.

Name lookups, from a started unit to the name server on its gateway (the host's bridge
address), `--lookups` each after 20 not counted, with the rootfs's own python3:

- udp: one hand-built DNS query (A, recursion desired) per round trip on a connected
  UDP socket, straight to gateway:53: the server's latency as a client sees it;
- getaddrinfo: socket.getaddrinfo(NAME, None) through glibc's stub resolver, as a
  program in the unit does it: resolv.conf's search list applies and A and AAAA are
  both asked (NAME has no dot, so the first try is NAME.<env>.ensemble.internal);
- each for an existing unit's name (db-0) and a name that does not exist (nosuch-0:
  NXDOMAIN; through getaddrinfo that is two tries, the search domain then the bare
  name, each A + AAAA).

Asked over and over, a name is answered from the server's own cache of ZooKeeper's
answer (1 s). Two more UDP series take the path past it: `--lookups` labels the server
has never seen (nosuch<random>-<i>: unit-shaped, so each costs a ZooKeeper read, then
NXDOMAIN), and `--uncached` queries for db-0 each 1.1 s after the last, past the cache
(one ZooKeeper read of the unit node each), interleaved with as many queries for a name
the server answers without ZooKeeper (not.a.unit.<domain>), each after the same idle
time (0.55 s): what waking an idle machine costs, apart from ZooKeeper.

p99 of a sample is interpolated between closest ranks (as bench/containers.py).
"""

import argparse
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from twisted.internet import defer, task, threads

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from stats import interpolated_percentile as percentile  # noqa: E402

from ensemble import local  # noqa: E402
from ensemble.errors import UnitNotFound  # noqa: E402
from ensemble.home import EnsembleHome  # noqa: E402
from ensemble.machine.container.driver import LXCDriver  # noqa: E402
from ensemble.machine.container.template import Template  # noqa: E402
from ensemble.state.service import ServiceStateManager  # noqa: E402
from ensemble.state.unit import UnitStateManager  # noqa: E402

CHARM = os.path.join(HERE, "charms", "idle")
ARCHIVES = "/var/cache/apt/archives"
INSTALL = "apt-get install -y --no-install-recommends"
WARMUP_LOOKUPS = 20
# A little over the name server's cache of a source's answer (CACHE_TTL, 1 s).
UNCACHED_PAUSE = 1.1


def say(message):
    print(message, file=sys.stderr, flush=True)


def ensemble(env, *args):
    result = subprocess.run([sys.executable, "-m", "ensemble", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ensemble {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def timed_install(package, extra=""):
    """A shell script: the install, timed by the shell that runs it. Prints
    `STATUS MICROSECONDS GETS` (GETS: how many files apt fetched), then, if it failed,
    apt's last lines."""
    log = f"/tmp/bench-apt-{package}.log"
    return (
        f"s=$(date +%s%N); DEBIAN_FRONTEND=noninteractive {INSTALL}{extra} {package} >{log} 2>&1; rc=$?; "
        f"e=$(date +%s%N); echo \"$rc $(( (e - s) / 1000 )) $(grep -c '^Get:' {log})\"; "
        f"[ $rc = 0 ] || tail -n 5 {log}"
    )


def parse_timed(package, where, out):
    first = out.strip().partition("\n")[0]
    fields = first.split()
    if len(fields) != 3 or fields[0] != "0":
        raise SystemExit(f"{where}: apt-get install {package} failed: {out.strip()[-500:]}")
    return int(fields[1]) / 1000, int(fields[2])


# -- inside units ------------------------------------------------------------------

class Units:
    def __init__(self, reactor, client, home):
        self.reactor = reactor
        self.client = client
        self.units = UnitStateManager(client)
        self.services = ServiceStateManager(client)
        self.driver = LXCDriver(os.path.join(EnsembleHome(home).lxc_dir, "machine-0"), Template())

    async def started(self, name, timeout=120):
        deadline = self.reactor.seconds() + timeout
        while self.reactor.seconds() < deadline:
            unit = await self.units.get_unit(name)
            if unit.state == "started":
                return unit.data["container"]
            if unit.state == "error":
                raise SystemExit(f"{name}: error: {unit.data.get('error')}")
            await task.deferLater(self.reactor, 0.05, lambda: None)
        raise SystemExit(f"{name} did not start within {timeout}s")

    async def add(self, service):
        (name,) = await self.services.add_units(service, n=1, to=0)
        return name, await self.started(name)

    async def remove(self, name, timeout=60):
        """Remove the unit and wait until its container is gone (so that tearing it
        down does not overlap the next measurement)."""
        await self.units.remove_unit(name)
        deadline = self.reactor.seconds() + timeout
        while self.reactor.seconds() < deadline:
            try:
                await self.units.get_unit(name)
            except UnitNotFound:
                return
            await task.deferLater(self.reactor, 0.05, lambda: None)
        raise SystemExit(f"{name} was not removed within {timeout}s")

    async def sh(self, container, script, input=None, timeout=600):
        code, out, err = await self.driver.exec(container, ["/bin/sh", "-c", script], input=input, timeout=timeout)
        if code != 0:
            raise SystemExit(f"in {container}: {script[:80]}...: exit {code}: {err.decode(errors='replace')[-400:]}")
        return out.decode(errors="replace")

    async def install(self, container, package, extra=""):
        return parse_timed(package, container, await self.sh(container, timed_install(package, extra)))


# Runs inside a unit with the rootfs's own /usr/bin/python3; prints JSON.
LOOKUP_SCRIPT = r"""
import json, random, socket, struct, sys, time
name, missing, n, warmup, uncached = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
pause = float(sys.argv[6])
conf = open("/etc/resolv.conf").read().split("\n")
gateway = next(l.split()[1] for l in conf if l.startswith("nameserver"))
domain = next(l.split()[1] for l in conf if l.startswith("search"))

def packet(qname, qid):
    question = b"".join(bytes([len(p)]) + p.encode() for p in qname.split(".")) + b"\0"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)

def udp(qnames, warmup=0, pause=0.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((gateway, 53))
    s.settimeout(1.0)
    samples, rcodes, answers, timeouts = [], {}, set(), 0
    for i, qname in enumerate(qnames):
        if pause:
            time.sleep(pause)
        qid = random.getrandbits(16)
        query = packet(qname, qid)
        begin = time.perf_counter()
        s.send(query)
        try:
            while True:
                reply = s.recv(4096)
                if reply[:2] == query[:2]:
                    break
        except socket.timeout:
            timeouts += 1
            continue
        took = time.perf_counter() - begin
        if i < warmup:
            continue
        samples.append(took * 1000)
        rcode = reply[3] & 0x0F
        rcodes[rcode] = rcodes.get(rcode, 0) + 1
        if struct.unpack("!H", reply[6:8])[0]:
            answers.add(socket.inet_ntoa(reply[-4:]))  # one A record: its data ends the reply
    s.close()
    return {"ms": samples, "rcodes": rcodes, "timeouts": timeouts, "answers": sorted(answers)}

def paced(qnames, pause):
    # One query per name, each after `pause` seconds idle; even and odd ones apart.
    series = [udp([qname], pause=pause) for qname in qnames]

    def merge(parts):
        rcodes = {}
        for part in parts:
            for rcode, count in part["rcodes"].items():
                rcodes[rcode] = rcodes.get(rcode, 0) + count
        return {"ms": [ms for part in parts for ms in part["ms"]], "rcodes": rcodes,
                "timeouts": sum(part["timeouts"] for part in parts),
                "answers": sorted({a for part in parts for a in part["answers"]})}

    return {"udp_uncached_hit": merge(series[0::2]), "udp_idle_no_source": merge(series[1::2])}

def gai(host):
    samples, failures, answers = [], 0, set()
    for i in range(warmup + n):
        begin = time.perf_counter()
        try:
            found = {a[4][0] for a in socket.getaddrinfo(host, None)}
        except socket.gaierror:
            found = None
        took = time.perf_counter() - begin
        if i < warmup:
            continue
        samples.append(took * 1000)
        if found is None:
            failures += 1
        else:
            answers |= found
    return {"ms": samples, "failures": failures, "answers": sorted(answers)}

hit, nxdomain = f"{name}.{domain}", f"{missing}.{domain}"
tag = random.getrandbits(24)
print(json.dumps({
    "gateway": gateway, "domain": domain,
    "udp_hit": udp([hit] * (warmup + n), warmup), "udp_nxdomain": udp([nxdomain] * (warmup + n), warmup),
    "getaddrinfo_hit": gai(name), "getaddrinfo_nxdomain": gai(missing),
    # Labels the server has never seen, all unit-shaped: each one costs it a ZooKeeper read.
    "udp_uncached_nxdomain": udp([f"nosuch{tag}-{i}.{domain}" for i in range(n)]),
    # The same existing name, each query after the server's cache of it expired; and
    # between those, after the same idle time, a name the server answers without
    # asking ZooKeeper (not unit-shaped): what idleness alone costs.
    **paced([hit, f"not.a.unit.{domain}"] * uncached, pause / 2),
}))
"""


def lookup_summary(prefix, data):
    ms = data["ms"]
    return {
        f"{prefix}_p50_ms": round(percentile(ms, 50), 3),
        f"{prefix}_p99_ms": round(percentile(ms, 99), 3),
        f"{prefix}_max_ms": round(max(ms), 3),
        f"{prefix}_n": len(ms),
    }


# -- the host baseline: a throwaway chroot ----------------------------------------

def host_install(template_rootfs, debs, packages, work, built_caches):
    """Time each install in a fresh overlay of the template's rootfs, chrooted, in a
    private mount namespace (its mounts vanish with it); with `built_caches`, apt's
    binary caches are built first (untimed). Returns [(ms, gets)]."""
    scratch = tempfile.mkdtemp(prefix="chroot-", dir=work)
    try:
        upper, workdir, root = (os.path.join(scratch, d) for d in ("upper", "work", "root"))
        for d in (upper, workdir, root):
            os.mkdir(d)
        archives = upper + ARCHIVES
        os.makedirs(archives)
        with tarfile.open(fileobj=io.BytesIO(debs)) as tar:
            tar.extractall(archives)
        script = "; ".join(timed_install(p, " --no-download") for p in packages)
        if built_caches:
            script = "apt-cache gencaches >/dev/null || exit 1; " + script
        inner = (
            f"mount -t overlay overlay -o lowerdir={template_rootfs},upperdir={upper},workdir={workdir} {root} && "
            f"mount -t proc proc {root}/proc && "
            f"exec chroot {root} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root "
            f"/bin/sh -c {shlex.quote(script)}"
        )
        result = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", inner],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise SystemExit(f"host chroot: {result.stderr.strip()[-400:]}")
        lines = result.stdout.strip().split("\n")
        return [parse_timed(p, "host chroot", line) for p, line in zip(packages, lines)]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# -- the benchmark -----------------------------------------------------------------

def cached_debs(home):
    cache = os.path.join(EnsembleHome(home).storage_dir, "packages", "machine-0", "cache")
    return sorted(f for _, _, files in os.walk(cache) for f in files if f.endswith(".deb"))


def cache_log_lines(home):
    path = os.path.join(EnsembleHome(home).storage_dir, "packages", "machine-0", "log", "apt-cacher.log")
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def acng_counts(lines):
    """Files apt-cacher-ng fetched from upstream (I: data in) and sent to clients (O: data out)."""
    kinds = [line.split("|")[1] for line in lines if line.count("|") >= 3]
    return {"fetched": kinds.count("I"), "sent": kinds.count("O")}


async def benchmark(reactor, args, home, result):
    client = await local.admin_client(EnsembleHome(home))
    units = Units(reactor, client, home)
    packages = args.packages
    try:
        await units.started("db/0")
        first, container = "pkg/0", await units.started("pkg/0")
        assert cached_debs(home) == [], "a new environment's cache is empty"

        say("cold installs (empty cache) ...")
        cold = {}
        for p in packages:
            cold[p] = await units.install(container, p)
        result["cold_fetched_from_mirror"] = acng_counts(cache_log_lines(home))
        # The .debs apt downloaded, as apt names them: the baselines' own apt cache.
        code, debs, err = await units.driver.exec(container, ["tar", "-C", ARCHIVES, "-c", "--exclude=partial",
                                                              "--exclude=lock", "."], timeout=60)
        assert code == 0, err
        with tarfile.open(fileobj=io.BytesIO(debs)) as tar:
            members = [m for m in tar.getmembers() if m.name.endswith(".deb")]
        result["debs"] = len(members)
        result["debs_kb"] = round(sum(m.size for m in members) / 1024, 1)
        result["deb_files"] = sorted(os.path.basename(m.name) for m in members)
        result["cold_ms"] = {p: round(cold[p][0], 1) for p in packages}
        result["cold_files_fetched"] = {p: cold[p][1] for p in packages}

        say(f"name lookups from {first} ({args.lookups} each) ...")
        out = await units.sh(container, f"/usr/bin/python3 -c {shlex.quote(LOOKUP_SCRIPT)} db-0 nosuch-0 "
                                         f"{args.lookups} {WARMUP_LOOKUPS} {args.uncached} {UNCACHED_PAUSE}",
                             timeout=300 + args.uncached * 2)
        lookups = json.loads(out)
        db_address = (await units.units.get_unit("db/0")).data.get("private-address")
        assert lookups["udp_hit"]["answers"] == [db_address], (lookups["udp_hit"]["answers"], db_address)
        assert lookups["getaddrinfo_hit"]["answers"] == [db_address], lookups["getaddrinfo_hit"]["answers"]
        assert lookups["getaddrinfo_nxdomain"]["failures"] == args.lookups
        assert lookups["udp_uncached_hit"]["answers"] == [db_address], lookups["udp_uncached_hit"]["answers"]
        assert lookups["udp_uncached_nxdomain"]["rcodes"] == {"3": args.lookups}, lookups["udp_uncached_nxdomain"]
        names = {"server": f"{lookups['gateway']}:53", "domain": lookups["domain"]}
        udp_kinds = ("udp_hit", "udp_nxdomain", "udp_uncached_hit", "udp_uncached_nxdomain", "udp_idle_no_source")
        for key in udp_kinds + ("getaddrinfo_hit", "getaddrinfo_nxdomain"):
            names.update(lookup_summary(key, lookups[key]))
        names["udp_rcodes"] = {k: lookups[k]["rcodes"] for k in udp_kinds}
        names["udp_timeouts"] = sum(lookups[k]["timeouts"] for k in udp_kinds)
        result["names"] = names
        await units.remove(first)

        say(f"{args.warm} rounds of: warm unit, unit with the .debs on hand, host chroots ...")
        cases = ("warm", "unit_local", "host_fresh", "host")
        samples = {case: {p: [] for p in packages} for case in cases}
        fetched = dict.fromkeys(cases, 0)
        log_before = len(cache_log_lines(home))
        template_rootfs = Template().rootfs
        for i in range(args.warm):
            name, container = await units.add("pkg")
            for p in packages:
                ms, gets = await units.install(container, p)
                samples["warm"][p].append(ms)
                fetched["warm"] += gets
            await units.remove(name)

            name, container = await units.add("pkg")
            await units.sh(container, f"tar -C {ARCHIVES} -x", input=debs)
            for p in packages:
                ms, gets = await units.install(container, p, " --no-download")
                samples["unit_local"][p].append(ms)
                fetched["unit_local"] += gets
            await units.remove(name)

            for case, built in (("host_fresh", False), ("host", True)):
                for p, (ms, gets) in zip(packages, await threads.deferToThread(
                        host_install, template_rootfs, debs, packages, args.work, built)):
                    samples[case][p].append(ms)
                    fetched[case] += gets
            say(f"  round {i + 1} ({'/'.join(cases)}): " + ", ".join(
                f"{p} " + "/".join(f"{samples[c][p][-1]:.0f}" for c in cases) + " ms" for p in packages))
        warm_log = acng_counts(cache_log_lines(home)[log_before:])
        for case in samples:
            result[f"{case}_p50_ms"] = {p: round(statistics.median(v), 1) for p, v in samples[case].items()}
        for case in samples:
            result[f"{case}_max_ms"] = {p: round(max(v), 1) for p, v in samples[case].items()}
        result["files_apt_fetched"] = fetched
        result["warm_cache"] = warm_log
        result["warm_over_host"] = {p: round(result["warm_p50_ms"][p] / result["host_p50_ms"][p], 2)
                                    for p in packages}
        result["warm_over_unit_local"] = {p: round(result["warm_p50_ms"][p] / result["unit_local_p50_ms"][p], 2)
                                          for p in packages}
        result["warm_over_host_fresh"] = {p: round(result["warm_p50_ms"][p] / result["host_fresh_p50_ms"][p], 2)
                                          for p in packages}
        result["cold_over_warm"] = {p: round(result["cold_ms"][p] / result["warm_p50_ms"][p], 2) for p in packages}
        result["goal_warm_within_2x_host"] = all(r <= 2 for r in result["warm_over_host"].values())
        result["lookup_series_p99_5ms_or_more"] = [
            k for k in udp_kinds + ("getaddrinfo_hit", "getaddrinfo_nxdomain") if names[f"{k}_p99_ms"] >= 5]
        result["goal_lookup_p99_under_5ms"] = not result["lookup_series_p99_5ms_or_more"] and not names["udp_timeouts"]
    finally:
        await units.driver.close()
        await client.close()


def facts(args):
    def out(*argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        except OSError:
            return None

    template = Template()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "lxc": out("lxc-info", "--version"),
        "apt_cacher_ng": out("dpkg-query", "-W", "-f", "${Version}", "apt-cacher-ng"),
        "apt": out("dpkg-query", "-W", "-f", "${Version}", "apt"),
        "template": template.name,
        "mirror": template.mirror,
        "packages": args.packages,
        "warm_rounds": args.warm,
        "lookups": args.lookups,
        "uncached_lookups": args.uncached,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packages", nargs="+", default=["hello", "curl"],
                        help="installed in this order (not in the template)")
    parser.add_argument("--warm", type=int, default=10, help="warm rounds (fresh units each)")
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--uncached", type=int, default=30,
                        help=f"lookups of db-0 {UNCACHED_PAUSE}s apart, each past the server's cache")
    parser.add_argument("--network", default="10.230.0.0/16")
    parser.add_argument("--name", default="benchpkg")
    args = parser.parse_args()
    if not 1 <= args.lookups <= 100000 or not 1 <= args.warm <= 100 or not 1 <= args.uncached <= 600:
        parser.error("--lookups 1-100000, --warm 1-100, --uncached 1-600")
    for package in args.packages:  # they end up in shell commands
        if not re.fullmatch(r"[a-z0-9][a-z0-9+.-]+", package):
            parser.error(f"not a Debian package name: {package!r}")
    result = facts(args)
    # Outside the reactor, SIGTERM and SIGHUP end the run as Ctrl-C does: through the
    # cleanup below (while it runs, the reactor turns them into a stop, which does too).
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    with tempfile.TemporaryDirectory(prefix="ensemble-bench-packages-", dir="/var/tmp") as tmp:
        args.work = tmp
        home = os.path.join(tmp, "home")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENSEMBLE_")}
        env["ENSEMBLE_HOME"] = home
        failed, done = [], []
        try:
            say(f"bootstrap {args.name} on {args.network} ...")
            ensemble(env, "bootstrap", "--network", args.network, "--name", args.name)
            ensemble(env, "deploy", CHARM, "db", "--to", "0")
            ensemble(env, "deploy", CHARM, "pkg", "--to", "0")

            async def run(reactor):
                try:
                    await benchmark(reactor, args, home, result)
                    done.append(True)
                except BaseException as e:
                    failed.append(e)
                    raise

            task.react(lambda reactor: defer.ensureDeferred(run(reactor)))
        except SystemExit as e:
            if failed:
                raise failed[0]
            if e.code not in (0, None):
                raise
        finally:
            say("destroy-environment ...")
            subprocess.run([sys.executable, "-m", "ensemble", "destroy-environment", "-y"], env=env,
                           capture_output=True, text=True)
    if not done:
        raise SystemExit("interrupted: no figures")
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2), flush=True)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    main()
