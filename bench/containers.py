"""Containers benchmark: a cold template build, then N clones through the driver
(create, start, stop, destroy), side by side with plain `lxc-copy -s` + `lxc-start` of
the same template. Prints one JSON object on stdout; progress goes to stderr.

    .venv/bin/python bench/containers.py [--clones 50] [--warm] [--unprivileged] [--disk 4G]

--unprivileged gives the driver's containers a user namespace and an id range of their
own, as units get: the shared template seen through an idmapped mount under each one's
writable layer (the plain LXC side stays privileged: plain lxc-copy cannot clone a
template for one).

The cold build uses a temporary cache directory (the shared cache stays warm);
--warm skips it and clones the shared template instead. Everything runs in a network
namespace made for the run, with a bridge in it; everything made is removed at the end.

Both sides run their lxc commands the same way (through `nsenter` into the driver's
namespaces, since the bridge lives in the benchmark's namespace). The plain side gets
the same network (a veth on the bridge with a static address and gateway) and the same
limits through `lxc-start -s`; what it lacks is what the driver adds: the rendered
config, the bind mounts of the host's ensemble and of the service directory, the
devices list, seccomp, and the supervised service directory.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from pyroute2 import netns as pyroute2_netns
from twisted.internet import defer, task

from ensemble.machine.container import config as lxc_config
from ensemble.machine.container.driver import OWN_RANGE, ContainerSpec, LXCDriver
from ensemble.machine.content import ensemble_mounts
from ensemble.machine.container.names import container_name, hostname
from ensemble.machine.container.template import Template
from ensemble.network.bridge import ensure_bridge
from stats import interpolated_percentile as percentile

BRIDGE = "ens-bench"
SUBNET_PREFIX = "10.233"  # /16: ours get 10.233.0.x, the plain ones 10.233.1.x
LIMITS = {"memory": 256 << 20, "cpu_weight": 100, "pids": 512}


def say(message):
    print(message, file=sys.stderr, flush=True)


def summary(prefix, samples):
    return {
        f"{prefix}_p50_ms": round(percentile(samples, 50), 2),
        f"{prefix}_p99_ms": round(percentile(samples, 99), 2),
    }


class Plain:
    """lxc-copy -s + lxc-start of the template, run with subprocess (no Twisted)."""

    def __init__(self, template, lxc_path, prefix, gateway):
        self.template = template
        self.lxc_path = lxc_path
        self.prefix = prefix
        self.gateway = gateway
        os.makedirs(lxc_path, exist_ok=True)

    def _run(self, argv):
        result = subprocess.run(self.prefix + argv, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:2])}: {result.stderr.strip()}")

    def create(self, name):
        self._run(["lxc-copy", "-P", self.template.lxc_path, "-n", self.template.name,
                   "-p", self.lxc_path, "-N", name, "-s", "-B", "overlayfs"])

    def start(self, name, address):
        settings = {
            "lxc.net.0.type": "veth", "lxc.net.0.link": BRIDGE, "lxc.net.0.flags": "up",
            "lxc.net.0.ipv4.address": f"{address}/16", "lxc.net.0.ipv4.gateway": self.gateway,
            "lxc.cgroup.memory.limit_in_bytes": str(LIMITS["memory"]),
            "lxc.cgroup.cpu.shares": str(lxc_config.cpu_shares(LIMITS["cpu_weight"])),
            "lxc.cgroup.pids.max": str(LIMITS["pids"]),
        }
        argv = ["lxc-start", "-d", "-n", name, "-P", self.lxc_path]
        for key, value in settings.items():
            argv += ["-s", f"{key}={value}"]
        self._run(argv)

    def stop(self, name):
        self._run(["lxc-stop", "-n", name, "-P", self.lxc_path, "-t", "10"])

    def destroy(self, name):
        self._run(["lxc-destroy", "-n", name, "-P", self.lxc_path])


def timed(function, *args):
    started = time.perf_counter()
    function(*args)
    return (time.perf_counter() - started) * 1000


async def atimed(coroutine):
    started = time.perf_counter()
    await coroutine
    return (time.perf_counter() - started) * 1000


def _pivot_dirs():
    return [os.path.join(h.base, "lxc.pivot") for h in lxc_config.host_cgroups().hierarchies]


def _remove_empty_pivots(existed_before):
    """Plain LXC leaves an empty lxc.pivot cgroup per hierarchy: remove those this
    run made."""
    for path in _pivot_dirs():
        if path in existed_before or not os.path.isdir(path):
            continue
        for _ in range(100):
            try:
                for child in [e.path for e in os.scandir(path) if e.is_dir()]:
                    os.rmdir(child)
                os.rmdir(path)
                break
            except OSError:
                time.sleep(0.02)


async def run(reactor, args):
    result = {"clones": args.clones, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "kernel": platform.release(), "cpus": os.cpu_count(), "lxc": _lxc_version()}
    work = tempfile.mkdtemp(prefix="ensemble-bench-", dir="/var/tmp")
    netns = f"ensb-{os.getpid()}"
    pivots_before = {p for p in _pivot_dirs() if os.path.isdir(p)}
    template = None
    driver = None
    ours, plain_names = [], []
    plain = None
    try:
        if args.warm:
            template = Template()
            await template.ensure(progress=lambda line: None)
            result["template_build_s"] = None
        else:
            template = Template(cache_dir=os.path.join(work, "cache"))
            say(f"cold template build in {template.cache_dir} ...")
            started = time.perf_counter()
            await template.ensure(progress=lambda line: say(f"  {line}") if not line.startswith(
                ("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking", "I: Configuring")) else None)
            result["template_build_s"] = round(time.perf_counter() - started, 1)
        result["template"] = template.name

        pyroute2_netns.create(netns)
        gateway = ensure_bridge(BRIDGE, f"{SUBNET_PREFIX}.0.0/16", netns)
        idmap = None
        if args.unprivileged:
            # As units run: user-namespaced, each with an id range of its own from the
            # host's pool, in storage their root can search.
            idmap = OWN_RANGE
            storage = os.path.join("/var/lib/ensemble", f"bench-{os.getpid()}")
            driver = LXCDriver(os.path.join(storage, "lxc"), template, netns=netns)
        else:
            driver = LXCDriver(os.path.join(work, "lxc"), template, netns=netns)
        result["unprivileged"] = bool(idmap)
        result["disk"] = args.disk
        prefix = await driver.command_prefix()
        plain = Plain(template, os.path.join(work, "plain"), prefix, gateway)
        mounts = ensemble_mounts()

        def spec(i):
            unit = f"bench/{i}"
            return ContainerSpec(container_name("bench", unit), hostname(unit), f"{SUBNET_PREFIX}.0.{10 + i}", 16,
                                 gateway, BRIDGE, mounts=mounts, idmap=idmap, disk=args.disk, **LIMITS)

        # Warm up both paths once (page cache, the driver's namespace helper).
        warm = spec(199)
        await driver.create(warm)
        await driver.start(warm.name)
        await driver.destroy(warm.name)
        plain.create("plain-warmup")
        plain.start("plain-warmup", f"{SUBNET_PREFIX}.1.250")
        plain.stop("plain-warmup")
        plain.destroy("plain-warmup")

        samples = {k: [] for k in ("create", "start", "stop", "destroy", "create_start",
                                   "plain_create", "plain_start", "plain_stop", "plain_destroy",
                                   "plain_create_start")}
        say(f"{args.clones} clones each way ...")
        for i in range(args.clones):
            s = spec(i)
            ours.append(s.name)
            create = await atimed(driver.create(s))
            start = await atimed(driver.start(s.name))
            samples["create"].append(create)
            samples["start"].append(start)
            samples["create_start"].append(create + start)
            name = f"plain-{i}"
            plain_names.append(name)
            create = timed(plain.create, name)
            start = timed(plain.start, name, f"{SUBNET_PREFIX}.1.{10 + i}")
            samples["plain_create"].append(create)
            samples["plain_start"].append(start)
            samples["plain_create_start"].append(create + start)
        running = await driver.state(ours[-1])
        assert running == "RUNNING", running
        for name, plain_name in zip(list(ours), list(plain_names)):
            samples["stop"].append(await atimed(driver.stop(name)))
            samples["plain_stop"].append(timed(plain.stop, plain_name))
        for name, plain_name in zip(list(ours), list(plain_names)):
            samples["destroy"].append(await atimed(driver.destroy(name)))
            ours.remove(name)
            samples["plain_destroy"].append(timed(plain.destroy, plain_name))
            plain_names.remove(plain_name)

        for op in ("create", "start", "stop", "destroy"):
            result.update(summary(op, samples[op]))
        result.update(summary("create_start", samples["create_start"]))
        for op in ("create", "start", "stop", "destroy"):
            result[f"lxc_floor_{op}_p50_ms"] = round(percentile(samples[f"plain_{op}"], 50), 2)
        result["lxc_floor_create_start_p50_ms"] = round(percentile(samples["plain_create_start"], 50), 2)
        result["lxc_floor_create_start_p99_ms"] = round(percentile(samples["plain_create_start"], 99), 2)
        result["overhead_ratio"] = round(
            percentile(samples["create_start"], 50) / percentile(samples["plain_create_start"], 50), 2
        )
    finally:
        say("cleaning up ...")
        if driver is not None:
            for name in ours:
                try:
                    await driver.destroy(name, timeout=2)
                except Exception as e:
                    say(f"  destroy {name}: {e}")
        if plain is not None:
            for name in plain_names:
                for op in (plain.stop, plain.destroy):
                    try:
                        op(name)
                    except Exception:
                        pass
        if driver is not None:
            await driver.close()
        if os.path.exists(f"/run/netns/{netns}"):
            pyroute2_netns.remove(netns)
        _remove_empty_pivots(pivots_before)
        if template is not None and not args.warm:
            await template.remove()
        shutil.rmtree(work, ignore_errors=True)
        if args.unprivileged:
            shutil.rmtree(os.path.join("/var/lib/ensemble", f"bench-{os.getpid()}"), ignore_errors=True)
    return result


def _lxc_version():
    try:
        return subprocess.run(["lxc-info", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main():
    parser = argparse.ArgumentParser(description="containers benchmark (JSON on stdout)")
    parser.add_argument("--clones", type=int, default=50)
    parser.add_argument("--warm", action="store_true", help="clone the shared template; no cold build")
    parser.add_argument("--unprivileged", action="store_true",
                        help="user-namespaced containers, as units get (plain LXC stays privileged)")
    parser.add_argument("--disk", metavar="SIZE", default=None,
                        help="give each of the driver's containers its own filesystem of SIZE (e.g. 4G), as units "
                             "get: the writable layer in an ext4 image on a loop device (disk.py)")
    args = parser.parse_args()

    async def go(reactor):
        print(json.dumps(await run(reactor, args), indent=2), flush=True)

    task.react(lambda reactor: defer.ensureDeferred(go(reactor)))


if __name__ == "__main__":
    main()
