"""The agents' commands: each runs one agent in the foreground until told to stop."""

import logging
import os

from twisted.internet import defer

from ensemble import connection, log_layout
from ensemble.errors import EnsembleError, InvalidValue
from ensemble.home import EnsembleHome
from ensemble.limits import parse_memory, parse_pids
from ensemble.names import parse_machine_id, parse_unit_name
from ensemble.state import auth
from ensemble.state.environment import get_environment
from ensemble.state.machine import MachineStateManager


async def cmd_machine_agent(reactor, args):
    from ensemble.machine.agent import MachineAgent

    machine_id = parse_machine_id(args.machine_id)
    units_memory = parse_memory(args.units_memory) if args.units_memory is not None else None
    units_pids = parse_pids(args.units_pids) if args.units_pids is not None else None
    driver = template = None
    home = EnsembleHome()
    if not args.no_containers:
        from ensemble.machine.container.driver import LXCDriver
        from ensemble.machine.container.template import Template

        template = Template()
        driver = LXCDriver(os.path.join(home.lxc_dir, f"machine-{machine_id}"), template, reactor=reactor)
    credential = connection.session_credential(args.zookeeper)
    if credential is not None and credential.user == auth.ADMIN_USER:
        credential = auth.machine_credential(credential, machine_id)  # never more than it needs
    if credential is not None and credential.user != f"machine-{machine_id}":
        raise InvalidValue(f"${connection.AUTH_VARIABLE} is {credential.user}'s credential, not machine-{machine_id}'s")
    client = await connection.connect(args.zookeeper, credential=credential)
    if credential is None and (await _environment_settings(client)).get("admin-id"):
        await client.close()
        raise InvalidValue(
            f"this environment has credentials: run the agent with ${connection.AUTH_VARIABLE} set to "
            f"what 'ensemble machine-credential {machine_id}' prints"
        )
    if driver is not None:
        try:
            await MachineStateManager(client).get_machine(machine_id)  # before making storage for it
        except BaseException:
            await client.close()
            raise
        home.ensure_storage()
        logging.getLogger("ensemble.machine").info("machine-%s: containers in %s", machine_id, driver.lxc_path)
    args.agent = MachineAgent(
        client, machine_id, reactor, manage_bridge=not args.no_bridge, driver=driver, template=template,
        unit_log_dir=os.path.join(home.logs_dir, log_layout.UNITS), overlay=not (args.no_bridge or args.no_overlay),
        firewall=not (args.no_bridge or args.no_firewall), names=not args.no_bridge,
        package_cache_dir=None if args.no_bridge or driver is None else os.path.join(home.storage_dir, "packages", f"machine-{machine_id}"),
        units_memory=units_memory, units_pids=units_pids,
    )
    await _run_agent(reactor, args.agent)


async def _environment_settings(client):
    from ensemble.state.client import NoAuth

    try:
        return await get_environment(client)
    except NoAuth:
        return {"admin-id": True}  # closed to this session: an environment with credentials
    except EnsembleError:
        return {}  # no environment there: the agent says so itself


async def cmd_unit_agent(reactor, args):
    from ensemble.unit.agent import UnitAgent

    parse_unit_name(args.unit)
    client = await connection.connect(args.zookeeper)
    args.agent = UnitAgent(client, args.unit, reactor)
    await _run_agent(reactor, args.agent)


async def _run_agent(reactor, agent):
    """Run until SIGTERM/SIGINT; then leave cleanly (the reactor turns both into shutdown)."""
    stopped = defer.Deferred()

    async def stop():
        await agent.stop()
        agent.stopped_cleanly = True
        stopped.callback(None)

    # Registered first: start-up may wait (for a subnet, say) and must stay stoppable.
    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(stop()))
    try:
        await agent.start()
    except BaseException:
        if agent.stop_requested:
            # Asked to stop while starting: what failed was cut short on purpose.
            await stopped
            return
        await agent.stop()
        raise
    await stopped


def register(command):
    sub = command("machine-agent", cmd_machine_agent, "run a machine agent in the foreground", examples=[
        "ENSEMBLE_AUTH=<what machine-credential 1 printed> ensemble machine-agent --machine-id 1 "
        "--zookeeper 192.0.2.1:2181",
        "ensemble machine-agent --machine-id 0 --no-bridge --no-containers",
    ])
    sub.add_argument("--machine-id", required=True, metavar="N", help="the machine this agent runs (add-machine's id)")
    sub.add_argument(
        "--no-bridge", action="store_true", help="do not create the host bridge (the network is managed elsewhere)"
    )
    sub.add_argument(
        "--no-containers", action="store_true",
        help="give units addresses but no containers (for testing the control plane alone)",
    )
    sub.add_argument(
        "--no-overlay", action="store_true",
        help="do not program routes or VXLAN entries to other machines' subnets (implied by --no-bridge)",
    )
    sub.add_argument(
        "--no-firewall", action="store_true",
        help="let units reach every port of each other and of this host (implied by --no-bridge)",
    )
    sub.add_argument(
        "--units-memory", metavar="SIZE",
        help="memory (and swap) all units of this machine may use together (default: 80%% of the host's)",
    )
    sub.add_argument(
        "--units-pids", metavar="N",
        help="processes all units of this machine may run together (default: 80%% of the host's pid space)",
    )


    sub = command("unit-agent", cmd_unit_agent, "run a unit agent in the foreground (machine agents start one "
                  "in each unit's container)", examples=["ensemble unit-agent --unit db/0 --zookeeper 10.77.0.1:2181"])
    sub.add_argument("--unit", required=True, metavar="NAME", help="the unit this agent runs, as SERVICE/N")
