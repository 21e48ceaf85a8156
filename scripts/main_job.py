"""The main job's steps, after installation (see scripts/main-job)."""

import json
import subprocess
import sys
import time
import urllib.request

ENSEMBLE = [sys.executable, "-m", "ensemble"]
START_TIMEOUT = 600  # the first run builds the container template (about a minute)


def ensemble(*args, check=True):
    result = subprocess.run([*ENSEMBLE, *args], text=True, capture_output=True)
    if check and result.returncode != 0:
        sys.stderr.write(result.stderr)
        sys.exit(result.returncode)
    return result


def status():
    return json.loads(ensemble("status", "--format", "json").stdout)


def main():
    if ensemble("status", check=False).returncode != 0:
        print(ensemble("bootstrap").stdout, end="")
    services = status()["services"]
    if "db" not in services:
        print(ensemble("deploy", "examples/charms/db", "--to", "0").stdout, end="")
    if "web" not in services:
        print(ensemble("deploy", "examples/charms/web", "--to", "0", "--config", "db=db").stdout, end="")

    print("waiting for the units to start (the first run builds the container template)...", flush=True)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        units = {name: unit for service in status()["services"].values() for name, unit in service["units"].items()}
        states = {name: unit["agent-state"] for name, unit in units.items()}
        if states and all(state == "started" for state in states.values()):
            break
        failed = {name: unit.get("error") for name, unit in units.items() if unit["agent-state"] == "error"}
        if failed:
            sys.exit(f"error: units failed: {failed}")
        if time.monotonic() > deadline:
            sys.exit(f"error: units not started after {START_TIMEOUT}s: {states}")
        time.sleep(1)

    print(ensemble("status").stdout, end="")
    web = next(iter(status()["services"]["web"]["units"].values()))
    url = f"http://{web['private-address']}/"
    print(f"\n--- {url} (the web unit's page, built from the db unit's data)")
    with urllib.request.urlopen(url, timeout=10) as response:
        print(response.read().decode())


if __name__ == "__main__":
    main()
