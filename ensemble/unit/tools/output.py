"""The hook tools' output formats, as pyjuju printed them (CHARM-RUNTIME.md 1.2, 1.3).

- `smart` (the default): a string as it is, a number or boolean as Python prints it
  (`True`/`False`), a list one item per line, a dict as a Python literal (pyjuju printed
  `str(dict)`; here with sorted keys and Python 3's quoting, no `u` prefixes, so that
  `ast.literal_eval` and `eval` in either Python still read it), nothing for None.
- `json`: the result as JSON (keys sorted).
- `shell` (relation-get): `VAR_<KEY>=<shell-quoted value>` lines, to `eval`.
- `eval` (relation-list): `export JUJU_MEMBERS="a/0 b/1"`.

Each format returns (stdout text, stderr text).
"""

import json
import os
import re
import shlex

# Characters a shell variable name cannot hold (pyjuju's BAD_CHARS).
_NOT_IN_NAME = re.compile(r"[-./:()<>|?*\\]")


def smart(result, options=None):
    if result is None:
        return "", ""
    if isinstance(result, list):
        return "".join(f"{item}\n" for item in result), ""
    if isinstance(result, dict):
        items = ", ".join(f"{key!r}: {value!r}" for key, value in sorted(result.items()))
        return "{" + items + "}\n", ""
    return f"{result}\n", ""


def as_json(result, options=None):
    return json.dumps(result, sort_keys=True) + "\n", ""


def shell(result, options):
    """relation-get's result as variable assignments. Variables named VAR_* already in
    the environment are emptied first (and named on stderr), as pyjuju did: a stale one
    would otherwise pass for a setting."""
    if options.key:
        result = {options.key.upper(): result}
    if not result:
        return "", ""
    stale = [name for name in sorted(os.environ) if name.startswith("VAR_")]
    out = [f"{name.upper()}=\n" for name in stale]
    for key, value in sorted(result.items()):
        out.append(f"VAR_{_NOT_IN_NAME.sub('_', key.upper())}={shlex.quote(str(value))}\n")
    err = ""
    if stale:
        err = (
            "The following were omitted from the environment.  VAR_ prefixed variables indicate a usage error.\n"
            + "".join(stale) + "\n"
        )
    return "".join(out), err


def members_eval(result, options=None):
    return 'export JUJU_MEMBERS="%s"\n' % " ".join(result), ""
