"""Run each tool call `calls` times (after a warm-up), from spawn to exit, and print
their wall-clock times in ms as one TOOLTIME line."""
import json
import os
import subprocess
import sys
import time


def timed(argv, calls, warmup=5):
    times = []
    for n in range(warmup + calls):
        start = time.perf_counter()
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        took = (time.perf_counter() - start) * 1000
        if done.returncode != 0:
            sys.exit(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.decode().strip()}")
        if n >= warmup:
            times.append(round(took, 2))
    return times


def main(calls_by_name):
    if not os.environ["JUJU_UNIT_NAME"].endswith("/0"):
        return  # one unit times, so the two do not compete for the cores
    calls = int(subprocess.run(["config-get", "calls"], stdout=subprocess.PIPE, text=True, check=True).stdout)
    result = {name: timed(argv, calls) for name, argv in calls_by_name.items()}
    print("TOOLTIME " + json.dumps(result), flush=True)
