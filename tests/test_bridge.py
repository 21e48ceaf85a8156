"""The host bridge, in a network namespace the test creates."""

import pytest
from pyroute2 import IPRoute

from ensemble.network.bridge import (
    BridgeError,
    attached_veths,
    bridge_mac,
    bridge_name,
    bridge_state,
    ensure_bridge,
    remove_bridge,
    remove_stale_veths,
)

from netns import temporary_netns


def test_bridge_names_fit_the_kernel_limit():
    assert bridge_name("local-ab12") == "ens-local-ab12"
    long = bridge_name("a-very-long-name")
    assert len(long) == 15 and long.startswith("ens-")
    assert long != bridge_name("a-very-long-nam2")


def test_ensure_bridge_is_idempotent_and_removable():
    with temporary_netns() as ns:
        assert bridge_state("ens-t", ns) is None
        assert ensure_bridge("ens-t", "10.50.3.0/24", ns) == "10.50.3.1"
        state = bridge_state("ens-t", ns)
        assert state["kind"] == "bridge" and state["up"]
        assert state["addresses"] == ["10.50.3.1/24"]
        ensure_bridge("ens-t", "10.50.3.0/24", ns)
        assert bridge_state("ens-t", ns)["addresses"] == ["10.50.3.1/24"]
        with IPRoute(netns=ns, flags=0) as ipr:
            assert len(ipr.link_lookup(ifname="ens-t")) == 1
        assert remove_bridge("ens-t", ns) is True
        assert bridge_state("ens-t", ns) is None
        assert remove_bridge("ens-t", ns) is False


def test_ensure_bridge_refuses_a_non_bridge_and_long_names():
    with temporary_netns() as ns:
        with IPRoute(netns=ns, flags=0) as ipr:
            ipr.link("add", ifname="ens-d", kind="veth", peer="ens-d-peer")
        with pytest.raises(BridgeError, match="not a bridge"):
            ensure_bridge("ens-d", "10.50.4.0/24", ns)
        with pytest.raises(BridgeError, match="longer than 15"):
            ensure_bridge("ens-0123456789ab", "10.50.4.0/24", ns)


def test_stale_veths_are_removed_and_others_kept():
    with temporary_netns() as ns:
        ensure_bridge("ens-t", "10.50.5.0/24", ns)
        with IPRoute(netns=ns, flags=0) as ipr:
            bridge = ipr.link_lookup(ifname="ens-t")[0]
            for host_end in ("ve-live", "ve-dead", "other0"):
                ipr.link("add", ifname=host_end, kind="veth", peer=f"p-{host_end}")
                ipr.link("set", index=ipr.link_lookup(ifname=host_end)[0], master=bridge)
        assert attached_veths("ens-t", ns) == ["other0", "ve-dead", "ve-live"]
        assert remove_stale_veths("ens-t", {"ve-live"}, ns) == ["ve-dead"]
        assert attached_veths("ens-t", ns) == ["other0", "ve-live"]
        assert remove_stale_veths("ens-t", {"ve-live"}, ns) == []


def test_the_bridge_mac_stays_put_as_ports_come_and_go():
    # A bridge left to itself takes its lowest port MAC; units' cached gateway MAC
    # would then go stale whenever that port's unit is removed.
    with temporary_netns() as ns:
        ensure_bridge("ens-t", "10.50.6.0/24", ns)
        fixed = bridge_mac("ens-t", "10.50.6.0/24")
        assert bridge_state("ens-t", ns)["mac"] == fixed
        assert int(fixed.split(":")[0], 16) & 0x02  # locally administered
        with IPRoute(netns=ns, flags=0) as ipr:
            bridge = ipr.link_lookup(ifname="ens-t")[0]
            for i, mac in enumerate(("00:00:00:00:00:01", "00:00:00:00:00:02")):
                ipr.link("add", ifname=f"ve-m{i}", kind="veth", peer=f"p-m{i}")
                index = ipr.link_lookup(ifname=f"ve-m{i}")[0]
                ipr.link("set", index=index, address=mac, master=bridge, state="up")
            assert bridge_state("ens-t", ns)["mac"] == fixed
            ipr.link("del", index=ipr.link_lookup(ifname="ve-m0")[0])
        assert bridge_state("ens-t", ns)["mac"] == fixed
        assert bridge_mac("ens-t", "10.50.7.0/24") != fixed  # another host's gateway
