"""A local environment on this host: ZooKeeper and machine 0's agent as background
processes whose config, data, pid files and logs live in ENSEMBLE_HOME."""

import hashlib
import logging
import os
import shutil
import subprocess
import sys

import netaddr
from twisted.internet import task, threads

from ensemble.errors import EnsembleError, EnvironmentExists, InvalidValue, NoEnvironment
from ensemble.names import validate_environment_name
from ensemble.connection import AUTH_VARIABLE
from ensemble.state import auth
from ensemble.state.client import ZKClient
from ensemble.state.environment import DEFAULT_NETWORK, DEFAULT_PACKAGE_CACHE, initialize
from ensemble.state.machine import MachineStateManager
from ensemble.state.repair import upgrade
from ensemble import process
from ensemble.network import bridge
from ensemble.network.ipam import SubnetPlan
from ensemble.zookeeper import ZooKeeperEnsemble, ZooKeeperServer

log = logging.getLogger("ensemble.local")

AGENT_START_TIMEOUT = 20.0


def default_environment_name(home):
    # Container and bridge names carry the environment's name, so two homes on one
    # host must not default to the same one.
    return "local-" + hashlib.sha1(home.path.encode()).hexdigest()[:4]


def validate_network(cidr, host_prefix=DEFAULT_NETWORK["host-prefix"]):
    try:
        network = netaddr.IPNetwork(cidr)
    except (netaddr.AddrFormatError, ValueError, TypeError):
        raise InvalidValue(f"invalid network {cidr!r}: use an IPv4 CIDR such as 10.77.0.0/16")
    if network.version != 4 or "/" not in str(cidr):
        raise InvalidValue(f"invalid network {cidr!r}: use an IPv4 CIDR such as 10.77.0.0/16")
    if network.network != network.ip:
        raise InvalidValue(f"invalid network {cidr!r}: host bits are set (did you mean {network.cidr}?)")
    if not 8 <= host_prefix <= 30:
        raise InvalidValue(f"invalid host prefix /{host_prefix}: use 8 to 30")
    if network.prefixlen > host_prefix:
        raise InvalidValue(
            f"network {cidr} is smaller than one host subnet (/{host_prefix}); use a /{host_prefix} or larger"
        )
    return str(network.cidr)


def check_network_free(cidr, netns=None):
    """Refuse a CIDR that overlaps what this host already has: its containers' routes
    would shadow (or be shadowed by) the host's own."""
    wanted = netaddr.IPNetwork(cidr)
    for existing in bridge.host_routes(netns):
        other = netaddr.IPNetwork(existing)
        if other.prefixlen == 0:
            continue
        if wanted.first <= other.last and other.first <= wanted.last:
            raise InvalidValue(
                f"network {cidr} overlaps {existing}, which this host already uses; choose another with --network"
            )


def _run_blocking(reactor, f, *args):
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def zookeeper_server(home, config=None):
    if config is None:
        return ZooKeeperServer(home.zookeeper_dir)
    host, _, port = config["zookeeper"].split(",")[0].rpartition(":")
    if config.get("zookeeper-ports"):
        return ZooKeeperEnsemble(
            home.zookeeper_dir, len(config["zookeeper-ports"]), host, config["zookeeper-ports"],
            tick_time=config.get("zookeeper-tick", 2000),
        )
    return ZooKeeperServer(home.zookeeper_dir, host=host, port=int(port))


# -- agent processes --------------------------------------------------------------


def agent_pid(home, name):
    """The pid of this home's agent `name` if it runs, else None."""
    try:
        with open(home.agent_pid_path(name)) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    if process.alive(pid) and f"ENSEMBLE_HOME={home.path}".encode() in process.environ(pid):
        return pid
    return None


def spawn_agent(home, name, arguments, credential=None):
    """Start `ensemble ARGUMENTS` detached, logging to logs/NAME.log; returns its pid."""
    os.makedirs(home.run_dir, exist_ok=True)
    os.makedirs(home.logs_dir, exist_ok=True)
    env = dict(os.environ, ENSEMBLE_HOME=home.path)
    env.pop("ENSEMBLE_ZOOKEEPER", None)
    env.pop(AUTH_VARIABLE, None)
    if credential is not None:
        env[AUTH_VARIABLE] = str(credential)
    with open(home.agent_log_path(name), "ab") as log_file, open(os.devnull, "rb") as null:
        agent = subprocess.Popen(
            [sys.executable, "-m", "ensemble", *arguments],
            stdin=null,
            stdout=log_file,
            stderr=log_file,
            env=env,
            start_new_session=True,
            close_fds=True,
        )
    with open(home.agent_pid_path(name), "w") as f:
        f.write(f"{agent.pid}\n")
    return agent.pid


def stop_agent(home, name, timeout=15.0):
    pid = agent_pid(home, name)
    if pid is not None:
        process.stop(pid, timeout)
    try:
        os.unlink(home.agent_pid_path(name))
    except FileNotFoundError:
        pass


def agent_names(home):
    try:
        return sorted(f[:-4] for f in os.listdir(home.run_dir) if f.endswith(".pid"))
    except FileNotFoundError:
        return []


def _log_tail(path, lines=5):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:] if line.strip())
    except OSError:
        return ""


async def _start_machine_agent(reactor, home, client, machine_id=0):
    name = f"machine-{machine_id}"
    if agent_pid(home, name) is None:
        # Its own credential, not the admin's: it may change only its machine and units.
        credential = client.credential and auth.machine_credential(client.credential, machine_id)
        pid = spawn_agent(home, name, ["machine-agent", "--machine-id", str(machine_id)], credential)
    else:
        pid = agent_pid(home, name)
    machine = await MachineStateManager(client).get_machine(machine_id)
    deadline = reactor.seconds() + AGENT_START_TIMEOUT
    # This agent, not a killed one whose session has not expired yet.
    while ((await machine.agent_owner()) or {}).get("pid") != pid:
        if not process.alive(pid):
            raise EnsembleError(
                f"the machine agent exited during start-up: {_log_tail(home.agent_log_path(name))}"
            )
        if reactor.seconds() > deadline:
            raise EnsembleError(
                f"the machine agent did not report within {AGENT_START_TIMEOUT:g}s; "
                f"see {home.agent_log_path(name)}"
            )
        await task.deferLater(reactor, 0.1, lambda: None)
    return pid


# -- bootstrap and destroy ----------------------------------------------------------


async def bootstrap(
    reactor, home, network=None, name=None, address="127.0.0.1", tick_time=2000, host_prefix=24, mode="host-gw",
    zookeeper_servers=1, package_cache=None,
):
    """Start a new local environment, or restart a stopped one. Returns (config, resumed)."""
    if home.exists():
        return await _resume(reactor, home, network, name, package_cache), True
    cidr = validate_network(network or DEFAULT_NETWORK["cidr"], host_prefix)
    if zookeeper_servers not in (1, 3, 5, 7):
        raise InvalidValue(f"--zookeeper-servers must be 1, 3, 5 or 7 (a quorum needs an odd number), not {zookeeper_servers}")
    name = validate_environment_name(name or default_environment_name(home))
    await _run_blocking(reactor, check_network_free, cidr)
    # Machine 0 will lease the first subnet. Its bridge comes first so that ZooKeeper
    # can listen on the bridge address: the one address units can reach it at, and
    # never a wildcard.
    subnet = next(SubnetPlan(cidr, host_prefix).subnets())
    bridge_address = str(netaddr.IPNetwork(subnet).network + 1)
    client = server = None
    try:
        await _run_blocking(reactor, bridge.ensure_bridge, bridge.bridge_name(name), subnet)
        if zookeeper_servers == 1:
            server = ZooKeeperServer(home.zookeeper_dir, host=bridge_address, tick_time=tick_time)
        else:
            server = ZooKeeperEnsemble(home.zookeeper_dir, zookeeper_servers, bridge_address, tick_time=tick_time)
        config = {
            "name": name, "zookeeper": server.address, "root": "/ensemble", "machine": 0,
            "network": cidr, "host-prefix": host_prefix, "subnet": subnet,
        }
        if zookeeper_servers > 1:
            config["zookeeper-ports"] = [list(p) for p in server.ports]
            config["zookeeper-tick"] = tick_time
        await _run_blocking(reactor, server.start)
        admin = auth.new_admin()
        config["admin-secret"] = admin.secret
        client = await _admin_client(server.address, config["root"], admin, create_root=True)
        await initialize(client, name, {"cidr": cidr, "host-prefix": host_prefix, "mode": mode},
                         package_cache=package_cache)
        await MachineStateManager(client).add_machine(address=address)
        home.save(config)
        await _start_machine_agent(reactor, home, client)
    except BaseException:
        if client is not None:
            await client.close()
        await _run_blocking(reactor, _destroy_files_and_processes, home, server, name)
        raise
    await client.close()
    return config, False


async def _admin_client(servers, root, admin, create_root=False):
    client = ZKClient(servers, root, credential=admin)
    if admin is not None:
        client.default_acl = auth.default_acl(admin, admin.id)
    await client.connect(create_root=create_root)
    try:
        # An environment bootstrapped by an older version gets its ACLs and quotas put
        # right (and its ZooKeeper closed) on the admin's first connection.
        await upgrade(client)
    except BaseException:
        await client.close()
        raise
    return client


async def admin_client(home):
    """A session as the admin of the local environment in `home`."""
    config = home.load()
    return await _admin_client(config["zookeeper"], config.get("root", "/ensemble"), auth.admin_of(config))


async def _resume(reactor, home, network=None, name=None, package_cache=None):
    """Bring back whatever part of an existing environment is down."""
    config = home.load()
    if name and name != config.get("name"):
        raise InvalidValue(f"the environment in {home.path} is named {config.get('name')!r}; --name is for new ones")
    if package_cache and package_cache != DEFAULT_PACKAGE_CACHE:
        raise InvalidValue(
            f"the environment in {home.path} exists; the package cache options are for new ones "
            "(docs/operations.md says how to change an environment's)"
        )
    if network and config.get("network") and validate_network(network) != config["network"]:
        raise InvalidValue(
            f"the environment in {home.path} uses {config['network']}; --network is for new environments"
        )
    server = zookeeper_server(home, config)
    machine_id = config.get("machine", 0)
    zookeeper_up = not server.down()
    agent_up = agent_pid(home, f"machine-{machine_id}") is not None
    if zookeeper_up and agent_up:
        raise EnvironmentExists(
            f"environment {config.get('name')!r} in {home.path} is already running "
            f"(ZooKeeper at {server.address}); 'ensemble destroy-environment' removes it"
        )
    if not zookeeper_up:
        if config.get("subnet"):
            # After a reboot the bridge is gone, and ZooKeeper listens on its address.
            await _run_blocking(reactor, bridge.ensure_bridge, bridge.bridge_name(config["name"]), config["subnet"])
        await _run_blocking(reactor, server.start)
    client = await _admin_client(server.address, config.get("root", "/ensemble"), auth.admin_of(config))
    try:
        await _start_machine_agent(reactor, home, client, machine_id)
    finally:
        await client.close()
    return config


def _destroy_files_and_processes(home, server, environment_name=None):
    for name in agent_names(home):
        stop_agent(home, name)
    if server is not None:
        server.stop()
    if environment_name:
        bridge.remove_bridge(bridge.bridge_name(environment_name))
        _remove_firewall(environment_name)
    for path in home.owned_paths:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.unlink(path)
    try:
        os.rmdir(home.path)
    except OSError:
        pass


def _remove_firewall(environment_name):
    from ensemble.network.firewall import Firewall, FirewallError

    try:
        Firewall(environment_name, bridge.bridge_name(environment_name), None).remove()
    except FirewallError as e:
        log.warning("could not remove the firewall tables: %s", e)


async def destroy_containers(reactor, home):
    """Every container of every machine agent of this home (agents already stopped)."""
    from ensemble.machine.container.driver import LXCDriver
    from ensemble.machine.container.template import Template

    try:
        paths = sorted(e.path for e in os.scandir(home.lxc_dir) if e.is_dir())
    except FileNotFoundError:
        return
    for path in paths:
        driver = LXCDriver(path, Template(), reactor=reactor)
        try:
            for name in await driver.list():
                await driver.destroy(name)
        finally:
            await driver.close()


async def destroy_environment(reactor, home):
    """Stop the agents and ZooKeeper and remove every file the environment made."""
    if not home.exists():
        raise NoEnvironment(home.path)
    config = home.load()
    server = zookeeper_server(home, config)
    for name in agent_names(home):
        await _run_blocking(reactor, stop_agent, home, name)
    await destroy_containers(reactor, home)
    await _run_blocking(reactor, _destroy_files_and_processes, home, server, config.get("name"))
    return config
