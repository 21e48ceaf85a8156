"""The charm author's loop, timed: edit a hook, `ensemble upgrade-charm`, the new hook
has run in the unit; and `ensemble set`, config-changed has run. In a real local
environment (its own ENSEMBLE_HOME and network) with a real container; the template
must be cached. Each round is timed from the edit to the new hook's first line in the
unit's log on the host, the CLI's own run included. Prints one JSON object.

    .venv/bin/python bench/charm_loop.py [--rounds 10]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from stats import percentile  # noqa: E402

from ensemble.home import EnsembleHome  # noqa: E402
from ensemble.names import unit_key  # noqa: E402

UNIT = "loop/0"
HOOK = "#!/bin/sh\necho {marker}\n"


def ensemble(env, *args):
    result = subprocess.run([sys.executable, "-m", "ensemble", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ensemble {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def write_charm(directory):
    os.makedirs(os.path.join(directory, "hooks"))
    with open(os.path.join(directory, "metadata.yaml"), "w") as f:
        f.write("name: loop\nsummary: the charm author's loop\ndescription: no-op hooks\n")
    with open(os.path.join(directory, "config.yaml"), "w") as f:
        f.write("options:\n  round: {type: int, default: 0}\n")
    for hook in ("install", "start", "upgrade-charm"):
        edit_hook(directory, hook, f"{hook}-initial")
    edit_hook(directory, "config-changed", "config-changed-$(config-get round)")


def edit_hook(directory, hook, marker):
    path = os.path.join(directory, "hooks", hook)
    with open(path, "w") as f:
        f.write(HOOK.format(marker=marker))
    os.chmod(path, 0o755)


def wait_for(log_path, marker, timeout=60.0):
    """Seconds (monotonic) when `marker` shows in the unit's log."""
    deadline = time.monotonic() + timeout
    needle = marker.encode()
    while time.monotonic() < deadline:
        try:
            with open(log_path, "rb") as f:
                if needle in f.read():
                    return time.monotonic()
        except FileNotFoundError:
            pass
        time.sleep(0.005)
    raise SystemExit(f"{marker} did not show in {log_path} within {timeout:g}s")


def summary(values):
    return {"p50_ms": round(statistics.median(values), 1), "p90_ms": round(percentile(values, 90), 1),
            "max_ms": round(max(values), 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--network", default="10.241.0.0/16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENSEMBLE_")}
        env["ENSEMBLE_HOME"] = os.path.join(tmp, "home")
        charm = os.path.join(tmp, "loop")
        write_charm(charm)
        log_path = os.path.join(EnsembleHome(env["ENSEMBLE_HOME"]).logs_dir, "units", unit_key(UNIT),
                                f"{unit_key(UNIT)}.log")
        ensemble(env, "bootstrap", "--network", args.network)
        try:
            ensemble(env, "deploy", charm, "--to", "0", "--wait")
            wait_for(log_path, "start-initial")
            upgrade, upgrade_cli, configure, configure_cli = [], [], [], []
            for n in range(args.rounds):
                begin = time.monotonic()
                edit_hook(charm, "upgrade-charm", f"upgrade-round-{n}")
                ensemble(env, "upgrade-charm", "loop")
                upgrade_cli.append((time.monotonic() - begin) * 1000)
                upgrade.append((wait_for(log_path, f"upgrade-round-{n}") - begin) * 1000)
                wait_for(log_path, "config-changed-0" if n == 0 else f"config-changed-{n - 1}")
                begin = time.monotonic()
                ensemble(env, "set", "loop", f"round={n}")
                configure_cli.append((time.monotonic() - begin) * 1000)
                configure.append((wait_for(log_path, f"config-changed-{n}") - begin) * 1000)
            print(json.dumps({
                "rounds": args.rounds,
                "edit_upgrade_to_hook_ran": summary(upgrade),
                "of_which_upgrade_charm_command": summary(upgrade_cli),
                "set_to_config_changed_ran": summary(configure),
                "of_which_set_command": summary(configure_cli),
            }))
        finally:
            ensemble(env, "destroy-environment", "-y")
            shutil.rmtree(charm, ignore_errors=True)


if __name__ == "__main__":
    main()
