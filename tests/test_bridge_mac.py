"""Removing a unit must not cut the others off their gateway.

A Linux bridge with no address of its own takes the lowest MAC of its ports: removing
the unit whose veth held it used to change the gateway's MAC under every other unit,
whose ZooKeeper connections then dropped until their sessions expired. Here, on a real
local environment (the machine agent as a process on this host, real containers on the
environment's own bridge, ZooKeeper on the bridge address), three units are removed in
every order while the others' sessions must stay the same ones.

The units that matter are told apart by what the bug depended on, the rank of their
veth's MAC among the bridge's ports: for each of the 3! orders of ranks a fresh batch of
three units is deployed and removed lowest-first, highest-first and so on. That makes
the orders that used to break (the lowest port removed while others remain) part of
every run, not a matter of the random MACs LXC gives veths.
"""

import itertools

import pytest_twisted
from pyroute2 import IPRoute
from twisted.internet import reactor, task, threads

from ensemble.machine.container.names import container_name, veth_name
from ensemble.machine.deploy import UNIT_SESSION_TIMEOUT
from ensemble.network.bridge import bridge_name, bridge_state
from ensemble.state.service import ServiceStateManager
from ensemble.state.unit import STARTED, UnitStateManager, unit_path

from conftest import deploy_charm
from test_deploy import environment, until  # noqa: F401 (fixture)
from test_faults import charm  # noqa: F401 (fixture)

UNITS = 3
# After a unit's container is gone, how long the others must keep their sessions. A unit
# whose gateway MAC went stale misses its pings at once; ZooKeeper (tick 2 s in a local
# environment) expires its session within timeout + one tick of the last ping it heard,
# which was before the veth went: two unit session timeouts cover that.
WATCH = 2 * float(UNIT_SESSION_TIMEOUT)
POLL = 0.5


def port_macs(bridge):
    """{port name: MAC} of the bridge's ports, in this host's namespace (where the
    local environment's machine agent runs and its bridge is)."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=bridge)[0]
        return {
            link.get_attr("IFLA_IFNAME"): link.get_attr("IFLA_ADDRESS")
            for link in ipr.get_links()
            if link.get("master") == index
        }


def mac_value(mac):
    return int(mac.replace(":", ""), 16)


async def units_started(client, names):
    units = UnitStateManager(client)
    for name in names:
        unit = await units.get_unit(name)
        if unit.state != STARTED or not await unit.agent_alive():
            return False
    return True


async def session_ids(client, names):
    """{unit: the session owning its presence node (its agent's session), None if none}."""
    ids = {}
    for name in names:
        stat = await client.exists(f"{unit_path(name)}/agent")
        ids[name] = stat.ephemeral_owner if stat is not None else None
    return ids


async def removed(client, driver, bridge, name, container, veth):
    """The unit's node, container and bridge port are all gone."""
    if await client.exists(unit_path(name)) is not None or await driver.state(container) is not None:
        return False
    return veth not in await threads.deferToThread(port_macs, bridge)


@pytest_twisted.ensureDeferred
async def test_removing_units_in_every_order_keeps_the_others_sessions(environment, charm):  # noqa: F811
    env = environment
    name = env.config["name"]
    bridge = bridge_name(name)
    client = await env.client()
    driver = env.driver()
    try:
        gateway_mac = (await threads.deferToThread(bridge_state, bridge))["mac"]
        lowest_taken = []  # (order, unit) where the removed veth was the lowest port, others left
        for batch, order in enumerate(itertools.permutations(range(UNITS))):
            if batch == 0:
                _, names = await deploy_charm(client, charm, n=UNITS, to=0)
            else:
                names = await ServiceStateManager(client).add_units("probe", n=UNITS, to=0)
            await until(lambda: units_started(client, names), 120, f"{names} started")
            containers = {n: container_name(name, n) for n in names}
            veths = {n: veth_name(containers[n]) for n in names}
            ports = await threads.deferToThread(port_macs, bridge)
            assert set(ports) == set(veths.values()), (ports, veths)  # this batch's veths only
            by_mac = sorted(names, key=lambda n: mac_value(ports[veths[n]]))
            removal = [by_mac[rank] for rank in order]
            sessions = await session_ids(client, names)
            assert None not in sessions.values(), sessions
            remaining = list(names)
            for victim in removal:
                ports = await threads.deferToThread(port_macs, bridge)
                lowest = min(ports, key=lambda p: mac_value(ports[p])) == veths[victim]
                remaining.remove(victim)
                if lowest and remaining:
                    lowest_taken.append((order, victim))
                await UnitStateManager(client).remove_unit(victim)
                await until(lambda: removed(client, driver, bridge, victim, containers[victim], veths[victim]),
                            60, f"{victim} removed")
                if not remaining:
                    continue
                what = (f"removal order {removal} (MAC ranks {order}): after removing {victim}, whose veth "
                        f"{ports[veths[victim]]} was {'the' if lowest else 'not the'} lowest of the bridge's "
                        f"ports {sorted(ports.values())}")
                expected = {n: sessions[n] for n in remaining}
                deadline = reactor.seconds() + WATCH
                while True:
                    now = await session_ids(client, remaining)
                    assert now == expected, f"{what}, the others' sessions changed: {expected} -> {now}"
                    if reactor.seconds() >= deadline:
                        break
                    await task.deferLater(reactor, POLL, lambda: None)
                mac = (await threads.deferToThread(bridge_state, bridge))["mac"]
                assert mac == gateway_mac, f"{what}, the bridge's MAC changed: {gateway_mac} -> {mac}"
            assert await threads.deferToThread(port_macs, bridge) == {}
        # The case that used to break was exercised: in the orders where the lowest rank
        # goes first, and where it goes second after a higher one.
        assert {order for order, _ in lowest_taken} == {(0, 1, 2), (0, 2, 1), (1, 0, 2), (2, 0, 1)}, lowest_taken
    finally:
        await driver.close()
        await client.close()
