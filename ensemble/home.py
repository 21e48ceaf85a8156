"""ENSEMBLE_HOME (default ~/.ensemble): a local environment's config, ZooKeeper data,
agent pid files and logs, and container storage. Two homes are two environments."""

import os

import yaml

from ensemble.errors import MalformedState, NoEnvironment


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
    def lxc_dir(self):
        return os.path.join(self.path, "lxc")

    # What destroy-environment removes; anything else a user put here is left alone.
    @property
    def owned_paths(self):
        return [self.config_path, self.zookeeper_dir, self.logs_dir, self.run_dir, self.lxc_dir]

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
        with open(tmp, "w") as f:
            yaml.safe_dump(config, f, default_flow_style=False)
        os.replace(tmp, self.config_path)
