"""A charm: a directory with `metadata.yaml`, an optional `config.yaml`, and `hooks/`.

Deploying copies the charm into ZooKeeper as a zip bundle, so every machine gets the
same bytes and later edits to the directory do not change a deployed service.
"""

import hashlib
import io
import os
import stat
import zipfile

import yaml

from ensemble.errors import InvalidCharm, InvalidValue
from ensemble.names import validate_service_name
from ensemble.errors import InvalidName
from ensemble.relations import parse_endpoints

# ZooKeeper's default jute.maxbuffer is 1 MiB for a whole request. Deploy writes the
# bundle with up to 1000 units (~250 bytes each) in one transaction.
MAX_BUNDLE_BYTES = 512 * 1024
OPTION_TYPES = ("string", "int", "float", "boolean")
# pyjuju's obsolete spelling of "string", still found in 2011 charms.
TYPE_ALIASES = {"str": "string"}
_FIXED_TIME = (2000, 1, 1, 0, 0, 0)


class Charm:
    def __init__(self, directory, metadata, options, endpoints=None):
        self.directory = directory
        self.metadata = metadata
        self.options = options
        # {relation name: {interface, role, scope, limit, optional}}, juju-info included.
        self.endpoints = endpoints if endpoints is not None else parse_endpoints(metadata.get("name"), {})

    @property
    def name(self):
        return self.metadata["name"]

    @classmethod
    def load(cls, directory):
        directory = os.path.abspath(directory)
        if not os.path.isdir(directory):
            raise InvalidCharm(f"charm directory {directory} does not exist")
        metadata = _read_yaml(os.path.join(directory, "metadata.yaml"), required=True)
        name = metadata.get("name")
        try:
            validate_service_name(name)
        except InvalidName:
            raise InvalidCharm(
                f"{directory}/metadata.yaml: 'name' must be [a-z][a-z0-9-]*, at most 40 characters"
            )
        endpoints = parse_endpoints(name, metadata)
        hooks = os.path.join(directory, "hooks")
        if os.path.exists(hooks) and not os.path.isdir(hooks):
            raise InvalidCharm(f"charm {name}: hooks must be a directory")
        options = read_options(directory, name)
        return cls(directory, metadata, options, endpoints)

    def config(self, overrides):
        """Defaults from config.yaml with `overrides` ({key: string}) applied and typed."""
        values = {k: o["default"] for k, o in self.options.items() if "default" in o}
        values.update(typed_values(self.name, self.options, overrides))
        return values

    def bundle(self):
        """The charm as zip bytes; identical directories give identical bytes."""
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for root, dirs, files in os.walk(self.directory):
                dirs[:] = sorted(d for d in dirs if d not in ("__pycache__", ".git"))
                for filename in sorted(files):
                    path = os.path.join(root, filename)
                    if os.path.islink(path) or not os.path.isfile(path):
                        continue
                    info = zipfile.ZipInfo(os.path.relpath(path, self.directory), _FIXED_TIME)
                    info.external_attr = (stat.S_IFREG | (os.stat(path).st_mode & 0o777)) << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with open(path, "rb") as f:
                        archive.writestr(info, f.read())
        data = out.getvalue()
        if len(data) > MAX_BUNDLE_BYTES:
            raise InvalidCharm(
                f"charm {self.name} is {len(data) // 1024} KiB packed; the limit is "
                f"{MAX_BUNDLE_BYTES // 1024} KiB (ship large payloads another way)"
            )
        return data


def bundle_id(name, data):
    return f"{name}-{hashlib.sha256(data).hexdigest()[:16]}"


def extract_bundle(data, destination):
    """Unpack a bundle, keeping modes; refuses entries that would escape `destination`."""
    destination = os.path.abspath(destination)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            target = os.path.abspath(os.path.join(destination, info.filename))
            if not target.startswith(destination + os.sep):
                raise InvalidCharm(f"charm bundle entry {info.filename!r} escapes its directory")
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(archive.read(info))
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(target, mode or 0o644)


def _read_yaml(path, required):
    name = os.path.basename(path)
    if not os.path.exists(path):
        if required:
            raise InvalidCharm(f"{os.path.dirname(path)} has no {name}")
        return {}
    try:
        with open(path) as f:
            value = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InvalidCharm(f"{path} is not valid YAML: {str(e).splitlines()[0]}")
    except OSError as e:
        raise InvalidCharm(f"cannot read {path}: {e.strerror}")
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise InvalidCharm(f"{path} must be a YAML mapping")
    return value


def read_options(directory, name):
    """The options of a charm's config.yaml ({} without one), each with its `type`
    (string when not given), checked; InvalidCharm naming the option otherwise."""
    return _checked_options(_read_yaml(os.path.join(directory, "config.yaml"), required=False), name)


def bundle_options(bundle, name):
    """The options of the config.yaml in a charm bundle, as read_options gives them."""
    try:
        with zipfile.ZipFile(io.BytesIO(bundle)) as archive:
            text = archive.read("config.yaml")
    except KeyError:
        return {}
    except zipfile.BadZipFile:
        raise InvalidCharm(f"charm {name}: its stored bundle is not a zip file")
    try:
        config = yaml.safe_load(text)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InvalidCharm(f"charm {name}: config.yaml is not valid YAML: {str(e).splitlines()[0]}")
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise InvalidCharm(f"charm {name}: config.yaml must be a YAML mapping")
    return _checked_options(config, name)


def _checked_options(config, name):
    options = config.get("options") or {}
    if not isinstance(options, dict):
        raise InvalidCharm(f"charm {name}: config.yaml 'options' must be a mapping")
    checked = {}
    for key, option in options.items():
        if not isinstance(key, str) or not isinstance(option, dict):
            raise InvalidCharm(f"charm {name}: option {key!r} must be a mapping with 'type'")
        kind = TYPE_ALIASES.get(option.get("type", "string"), option.get("type", "string"))
        if kind not in OPTION_TYPES:
            raise InvalidCharm(f"charm {name}: option {key!r} has type {kind!r}; use one of {', '.join(OPTION_TYPES)}")
        if "default" in option and not _matches(option["default"], kind):
            raise InvalidCharm(f"charm {name}: the default of option {key!r} is not a {kind}")
        checked[key] = {**option, "type": kind}
    return checked


def typed_values(charm_name, options, texts):
    """{key: text} given by a user, each checked against the charm's options and typed;
    InvalidValue naming the option and the type it wants otherwise."""
    require_options(charm_name, options, texts)
    return {key: _coerce(key, text, options[key].get("type", "string")) for key, text in texts.items()}


def require_options(charm_name, options, keys):
    """InvalidValue naming the first of `keys` the charm has no option for, if any."""
    for key in keys:
        if key not in options:
            known = ", ".join(sorted(options)) or "none"
            raise InvalidValue(f"charm {charm_name} has no option {key!r} (options: {known})")


def mismatched_values(options, values):
    """The keys of `values` the options know but whose value is not of the option's type."""
    return sorted(k for k, v in values.items() if k in options and not _matches(v, options[k]["type"]))


def config_values(options, values):
    """Every option's value as hooks see it (config-get): the service's, else the
    option's default, else None."""
    result = {key: option.get("default") for key, option in options.items()}
    result.update({key: value for key, value in values.items() if key in options})
    return result


def _matches(value, kind):
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    return isinstance(value, str)


def _coerce(key, text, kind):
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise InvalidValue(f"option {key!r} must be an integer, not {text!r}")
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise InvalidValue(f"option {key!r} must be a number, not {text!r}")
    if kind == "boolean":
        lowered = text.lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0"):
            return False
        raise InvalidValue(f"option {key!r} must be true or false, not {text!r}")
    return text
