"""Hook-tool call latency: from a tool process's start to its exit, against the hook-tool
server (Twisted AMP, an in-memory unit state) running in a process of its own, as the
unit agent would. The tools are run as the console scripts pip writes for them. For
comparison: a bare interpreter start, and the same relation-get made by a client built
on Twisted's AMP (the shape pyjuju's tools had). Prints one JSON object.

    .venv/bin/python bench/hook_tools.py [--calls 300]
    .venv/bin/python bench/hook_tools.py --in-unit [--calls 200] [--network CIDR]

--in-unit measures the same from inside real units of a local environment of its own
(bench/charms/tooltime: two peer units, the first of which times the tools in its hooks
against its real unit agent, ZooKeeper behind it), and reads the figures from its log.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from stats import percentile  # noqa: E402

from ensemble.unit.tools.names import TOOLS  # noqa: E402

CLIENT_ID = "bench"
CALLS = {  # what each measured tool is given
    "relation-get": ["password"],
    "relation-set": ["database=wordpress", "user=wp"],
    "relation-list": [],
    "config-get": ["title"],
    "juju-log": ["a", "message"],
}

TWISTED_CLIENT = """\
import json, sys
from twisted.internet import defer, endpoints, task
from twisted.protocols import amp
from ensemble.unit.tools.commands import RelationGet

async def main(reactor):
    endpoint = endpoints.UNIXClientEndpoint(reactor, sys.argv[1])
    client = await endpoints.connectProtocol(endpoint, amp.AMP())
    answer = await client.callRemote(RelationGet, client_id=sys.argv[2], unit_name="mysql/0", setting_name="password")
    print(json.loads(answer["data"]))
    client.transport.loseConnection()

task.react(lambda reactor: defer.ensureDeferred(main(reactor)))
"""


def serve(path):
    """The server side, in its own process: listen, say so, serve until killed."""
    from twisted.internet import reactor

    from ensemble.unit.tools.context import CachedHookContext
    from ensemble.unit.tools.memory import MemoryState
    from ensemble.unit.tools.server import HookToolFactory, listen

    state = MemoryState(
        "wordpress/0",
        relations={"db:0": "db"},
        settings={("db:0", "mysql/0"): {"private-address": "10.0.3.5", "password": "s3cret"},
                  ("db:0", "wordpress/0"): {"private-address": "10.0.3.6"}},
        members={"db:0": ["mysql/0"]},
        config={"title": "My blog"},
        addresses={"private-address": "10.0.3.6"},
    )
    factory = HookToolFactory()
    # Log calls would go to stderr; a real agent writes them to the unit's log file.
    factory.logger.propagate = False
    factory.add(CachedHookContext(state, "db-relation-changed", "db:0"), CLIENT_ID)
    listen(reactor, path, factory)
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def timed(argv, env, calls, warmup=5):
    """Wall-clock ms of each run of argv, from spawn to exit; every run must exit 0."""
    times = []
    for n in range(warmup + calls):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        took = (time.perf_counter() - start) * 1000
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.decode().strip()}")
        if n >= warmup:
            times.append(took)
    return times


def console_script(directory, name, function):
    """What pip writes for `name = ensemble.unit.tools.cli:function`."""
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nimport sys\nfrom ensemble.unit.tools.cli import {function}\n"
                f"if __name__ == '__main__':\n    sys.exit({function}())\n")
    os.chmod(path, 0o755)
    return path


def ensemble(env, *args):
    done = subprocess.run([sys.executable, "-m", "ensemble", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"ensemble {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def in_unit(calls, network, timeout=600):
    """{tool: [ms…]} timed by the tooltime charm's hooks in the first of two peer units."""
    with tempfile.TemporaryDirectory(prefix="hook-tools-unit-") as tmp:
        env = {**os.environ, "ENSEMBLE_HOME": os.path.join(tmp, "home")}
        ensemble(env, "bootstrap", "--network", network, "--name", "tooltime")
        try:
            ensemble(env, "deploy", os.path.join(HERE, "charms", "tooltime"), "-n", "2", "--to", "0",
                     "--config", f"calls={calls}")
            logs = [os.path.join(env["ENSEMBLE_HOME"], "logs", "units", u, f"{u}.log")
                    for u in ("tooltime-0", "tooltime-1")]
            deadline = time.monotonic() + timeout
            while True:
                found = {}
                for path in logs:
                    try:
                        with open(path) as f:
                            for line in f:
                                if line.startswith("TOOLTIME "):
                                    for tool, times in json.loads(line[len("TOOLTIME "):]).items():
                                        found.setdefault(tool, []).extend(times)
                    except FileNotFoundError:
                        pass
                if len(found) >= 9 and all(len(t) >= calls for t in found.values()):
                    return found
                if time.monotonic() > deadline:
                    raise SystemExit(f"no figures from the units after {timeout}s: {sorted(found)}")
                time.sleep(1)
        finally:
            ensemble(env, "destroy-environment", "-y")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per tool (per unit with --in-unit)")
    parser.add_argument("--in-unit", action="store_true", help="measure inside real units (see above)")
    parser.add_argument("--network", default="10.241.0.0/16", help="the --in-unit environment's network")
    parser.add_argument("--serve", metavar="SOCKET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.in_unit:
        result = {}
        for tool, times in sorted(in_unit(args.calls, args.network).items()):
            key = tool.replace("-", "_")
            result[f"{key}_p50_ms"] = round(statistics.median(times), 1)
            result[f"{key}_p99_ms"] = round(percentile(times, 99), 1)
        result["calls"] = args.calls
        print(json.dumps(result))
        return

    with tempfile.TemporaryDirectory(prefix="hook-tools-") as tmp:
        socket_path = os.path.join(tmp, "agent.sock")
        server = subprocess.Popen([sys.executable, __file__, "--serve", socket_path], stdout=subprocess.PIPE)
        try:
            if server.stdout.readline().strip() != b"ready":
                raise SystemExit("the hook-tool server did not start")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
                   "JUJU_AGENT_SOCKET": socket_path, "JUJU_CLIENT_ID": CLIENT_ID, "JUJU_REMOTE_UNIT": "mysql/0",
                   "JUJU_RELATION": "db", "JUJU_RELATION_ID": "db:0"}
            result = {}
            for tool, tool_args in CALLS.items():
                path = console_script(tmp, tool, TOOLS[tool])
                times = timed([path, *tool_args], env, args.calls)
                key = tool.replace("-", "_")
                result[f"{key}_p50_ms"] = round(statistics.median(times), 1)
                result[f"{key}_p99_ms"] = round(percentile(times, 99), 1)
            baselines = {
                "python_startup": [sys.executable, "-c", "pass"],
                "twisted_amp_client": [sys.executable, "-c", TWISTED_CLIENT, socket_path, CLIENT_ID],
            }
            for name, argv in baselines.items():
                times = timed(argv, env, max(20, args.calls // 5))
                result[f"{name}_p50_ms"] = round(statistics.median(times), 1)
                result[f"{name}_p99_ms"] = round(percentile(times, 99), 1)
            result["calls"] = args.calls
            print(json.dumps(result))
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
