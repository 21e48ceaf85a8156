"""Per-service resource limits as users write them (`--memory 512M`, `--cpu-weight 200`)."""

import re

from ensemble.errors import InvalidValue

_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)?\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
MIN_MEMORY = 8 * 1024**2
CPU_WEIGHT_RANGE = (1, 10000)
PIDS_RANGE = (16, 4194304)


def parse_memory(text):
    """'512M', '1.5G', '1073741824' -> bytes."""
    match = _SIZE_RE.match(str(text).strip())
    if not match:
        raise InvalidValue(f"invalid memory size {text!r}: use a number with K, M, G or T, e.g. 512M")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < MIN_MEMORY:
        raise InvalidValue(f"memory size {text!r} is below the minimum of {format_memory(MIN_MEMORY)}")
    return value


def format_memory(value):
    for suffix in ("T", "G", "M", "K"):
        unit = _UNITS[suffix]
        if value >= unit and value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


def _parse_int(name, text, low, high):
    try:
        value = int(str(text))
    except ValueError:
        raise InvalidValue(f"invalid {name} {text!r}: use a whole number from {low} to {high}")
    if not low <= value <= high:
        raise InvalidValue(f"invalid {name} {value}: use a whole number from {low} to {high}")
    return value


def parse_cpu_weight(text):
    return _parse_int("cpu weight", text, *CPU_WEIGHT_RANGE)


def parse_pids(text):
    return _parse_int("pids limit", text, *PIDS_RANGE)
