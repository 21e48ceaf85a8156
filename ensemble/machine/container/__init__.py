"""LXC containers for units: the cached template, per-unit snapshot clones, their
config, and the driver the machine agent uses (see docs/containers.md)."""

from ensemble.machine.container.driver import (  # noqa: F401
    ContainerError,
    ContainerExists,
    ContainerNotFound,
    ContainerSpec,
    LXCDriver,
)
from ensemble.machine.container.names import container_name, hostname, veth_name  # noqa: F401
from ensemble.machine.container.template import Template, TemplateError  # noqa: F401
