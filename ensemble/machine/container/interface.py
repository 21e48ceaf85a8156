"""The container driver a machine agent's reconcilers use: what they need of LXC,
and all a fake must do in fast tests of convergence (tests/fakes.py)."""

from typing import Optional, Protocol


class ContainerDriver(Protocol):
    """Containers of one lxc path. Every operation is idempotent where its name says
    so; failures are ContainerError (ensemble/machine/container/driver.py)."""

    async def create(self, spec) -> str:
        """Make a stopped container from a ContainerSpec; ContainerExists if it exists."""

    async def start(self, name: str, agent: bool = True) -> None:
        """Start it and return once it runs (a running one stays as it is). With
        `agent` False, an agent to be forked in (ContainerSpec.agent_forked) waits for
        start_agent()."""

    async def start_agent(self, name: str) -> None:
        """Let the agent a start(agent=False) kept waiting run; nothing if none waits."""

    async def prepare_agents(self) -> None:
        """Make ready ahead of the first start what forks agents in."""

    async def stop(self, name: str) -> None:
        """Stop it (a stopped one stays as it is)."""

    async def destroy(self, name: str) -> None:
        """Stop and remove it with everything it left on the host. Idempotent."""

    async def list(self) -> list:
        """Names of the containers this driver made."""

    async def running(self) -> set:
        """Names of those running now, in one look."""

    async def state(self, name: str) -> Optional[str]:
        """'RUNNING', 'STOPPED', … or None if there is no such container."""
