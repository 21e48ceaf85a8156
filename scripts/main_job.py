"""The main job's steps, after installation (see scripts/main-job)."""

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

ENSEMBLE = [sys.executable, "-m", "ensemble"]
# Straight to the unit: an http_proxy of the operator's could not reach it.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
START_TIMEOUT = 600  # the first run builds the container template (about a minute)
PROGRESS_EVERY = 5  # seconds: a line at least this often while waiting, even if nothing changed


def ensemble(*args, check=True):
    result = subprocess.run([*ENSEMBLE, *args], text=True, capture_output=True)
    if check and result.returncode != 0:
        sys.stderr.write(result.stderr)
        sys.exit(result.returncode)
    return result


def status():
    return json.loads(ensemble("status", "--format", "json").stdout)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="scripts/main-job",
        description="Run a local environment on this host (ENSEMBLE_HOME, default ~/.ensemble) with the example "
                    "db and web services deployed onto machine 0, wait until both units are started, then print "
                    "the status and the web unit's page.",
        epilog="--network and --name are passed to 'ensemble bootstrap', which itself reads no environment "
               "variables for them: this job takes them from ENSEMBLE_NETWORK and ENSEMBLE_NAME when the options "
               "are not given. They apply when the job bootstraps (or restarts) the environment in ENSEMBLE_HOME; "
               "a running one is used as it is. A second environment on this host needs its own ENSEMBLE_HOME "
               "and its own --network.",
    )
    parser.add_argument(
        "--network", metavar="CIDR", default=os.environ.get("ENSEMBLE_NETWORK") or None,
        help="address range for the containers (default: $ENSEMBLE_NETWORK, else bootstrap's 10.77.0.0/16)",
    )
    parser.add_argument(
        "--name", metavar="NAME", default=os.environ.get("ENSEMBLE_NAME") or None,
        help="environment name (default: $ENSEMBLE_NAME, else bootstrap's, derived from ENSEMBLE_HOME)",
    )
    return parser.parse_args(argv)


def bootstrap_args(args):
    options = []
    if args.network:
        options += ["--network", args.network]
    if args.name:
        options += ["--name", args.name]
    return options


def progress_line(current, states):
    """What the wait is on: the template build's stage while it runs, else the units'."""
    machine = current["machines"].get(0) or current["machines"].get("0") or {}
    template = machine.get("template") or {}
    if template.get("progress"):
        return f"machine 0 building the container template: {template['progress']}"
    if machine.get("error"):
        return f"machine 0: {machine['error']}"
    return "units: " + ", ".join(f"{name} {state}" for name, state in sorted(states.items()))


def web_page(current):
    """(url, page) of the web unit, or None while it does not serve the db's data yet
    (its relation hooks run after it has started)."""
    web = next(iter(current["services"]["web"]["units"].values()), {})
    if not web.get("private-address"):
        return None
    url = f"http://{web['private-address']}/"
    try:
        with HTTP.open(url, timeout=10) as response:
            return url, response.read().decode()
    except OSError:
        return None


def web_serves(current):
    return web_page(current) is not None


def main():
    args = parse_args()
    if ensemble("status", check=False).returncode != 0:
        print(ensemble("bootstrap", *bootstrap_args(args)).stdout, end="")
    services = status()["services"]
    if "db" not in services:
        print(ensemble("deploy", "examples/charms/db", "--to", "0").stdout, end="")
    if "web" not in services:
        print(ensemble("deploy", "examples/charms/web", "--to", "0").stdout, end="")
    services = status()["services"]
    # web finds db through the relation (and may reach it on any port); exposing web
    # opens the port its charm opened to everything else, this host included.
    if "db" not in (services["web"].get("relations") or {}).get("db", []):
        print(ensemble("add-relation", "web", "db").stdout, end="")
    if not services["web"].get("exposed"):
        print(ensemble("expose", "web").stdout, end="")

    print("waiting for the units to start (the first run builds the container template)...", flush=True)
    started = time.monotonic()
    deadline = started + START_TIMEOUT
    shown, shown_at = None, 0.0
    while True:
        current = status()
        units = {name: unit for service in current["services"].values() for name, unit in service["units"].items()}
        states = {name: unit["agent-state"] for name, unit in units.items()}
        line = progress_line(current, states)
        if line != shown or time.monotonic() - shown_at >= PROGRESS_EVERY:
            print(f"  [{time.monotonic() - started:4.0f}s] {line}", flush=True)
            shown, shown_at = line, time.monotonic()
        if states and all(state == "started" for state in states.values()) and web_serves(current):
            break
        failed = {name: unit.get("error") for name, unit in units.items() if unit["agent-state"] == "error"}
        if failed:
            sys.exit(f"error: units failed: {failed}")
        if time.monotonic() > deadline:
            sys.exit(f"error: units not started after {START_TIMEOUT}s: {states}")
        time.sleep(1)

    print(ensemble("status").stdout, end="")
    url, page = web_page(status())
    print(f"\n--- {url} (the web unit's page, built from the db unit's data)")
    print(page)


if __name__ == "__main__":
    main()
