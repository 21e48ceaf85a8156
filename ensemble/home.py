"""ENSEMBLE_HOME (default ~/.ensemble): a local environment's config, ZooKeeper data,
agent pid files and logs. Container storage is elsewhere (STORAGE_ROOT). Two homes are
two environments."""

import hashlib
import os

import yaml

from ensemble.errors import MalformedState, NoEnvironment
from ensemble.searchable import make_searchable


# Container storage lives outside the home: a unit's root is an unprivileged host id,
# and LXC has it search the whole path to the container directory, which a home under
# /root (or any 0700 directory) does not allow. One directory per home, named by a
# hash of the home's path; its file `home` says which home it belongs to. (No link to it
# from the home: LXC names a container's command socket after the lxc path as given, so
# tools pointed through a link would not find running containers.)
STORAGE_ROOT = "/var/lib/ensemble/homes"


def default_home():
    return os.path.abspath(os.environ.get("ENSEMBLE_HOME") or os.path.expanduser("~/.ensemble"))


class EnsembleHome:
    def __init__(self, path=None):
        self.path = os.path.abspath(path or default_home())

    def __repr__(self):
        return f"EnsembleHome({self.path!r})"

    @property
    def config_path(self):
        return os.path.join(self.path, "environment.yaml")

    @property
    def zookeeper_dir(self):
        return os.path.join(self.path, "zookeeper")

    @property
    def logs_dir(self):
        return os.path.join(self.path, "logs")

    @property
    def run_dir(self):
        return os.path.join(self.path, "run")

    @property
    def storage_dir(self):
        return os.path.join(STORAGE_ROOT, hashlib.sha256(self.path.encode()).hexdigest()[:16])

    @property
    def lxc_dir(self):
        """The lxc path of each machine agent's containers (machine-N below it)."""
        return os.path.join(self.storage_dir, "lxc")

    def ensure_storage(self):
        """Make the storage directory, searchable by every id."""
        make_searchable(self.lxc_dir, "/var/lib")
        with open(os.path.join(self.storage_dir, "home"), "w") as f:
            f.write(self.path + "\n")
        return self.lxc_dir

    # What destroy-environment removes; anything else a user put here is left alone.
    @property
    def owned_paths(self):
        return [self.config_path, self.zookeeper_dir, self.logs_dir, self.run_dir, self.storage_dir]

    def agent_pid_path(self, name):
        return os.path.join(self.run_dir, f"{name}.pid")

    def agent_log_path(self, name):
        return os.path.join(self.logs_dir, f"{name}.log")

    def exists(self):
        return os.path.exists(self.config_path)

    def load(self):
        try:
            with open(self.config_path) as f:
                config = yaml.safe_load(f)
        except FileNotFoundError:
            raise NoEnvironment(self.path)
        except (OSError, yaml.YAMLError) as e:
            raise MalformedState(self.config_path, str(e).splitlines()[0])
        if not isinstance(config, dict) or "zookeeper" not in config:
            raise MalformedState(self.config_path, "expected a mapping with 'zookeeper'")
        return config

    def save(self, config):
        os.makedirs(self.path, exist_ok=True)
        tmp = self.config_path + ".tmp"
        # 0600: it holds the environment's admin credential.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            yaml.safe_dump(config, f, default_flow_style=False)
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.config_path)
