"""The ZooKeeper server runner: start, answer, stop by pid, never kill a stranger."""

import os
import subprocess
import time

import pytest

from ensemble.errors import ZooKeeperStartFailed
from ensemble.process import alive as process_alive, stop as stop_process
from ensemble.zookeeper import ZooKeeperServer, four_letter


def test_start_serves_and_stop_leaves_no_process(tmp_path):
    server = ZooKeeperServer(str(tmp_path / "zk"), tick_time=500)
    pid = server.start()
    try:
        assert server.pid() == pid
        assert "Mode: standalone" in four_letter(server.host, server.port, "srvr")
        config = open(server.config_path).read()
        assert "admin.enableServer=false" in config
        assert f"clientPortAddress={server.host}" in config
    finally:
        server.stop()
    assert not process_alive(pid)
    assert server.pid() is None
    assert four_letter(server.host, server.port, "ruok") is None


def test_second_start_from_same_directory_is_refused(tmp_path):
    server = ZooKeeperServer(str(tmp_path / "zk"), tick_time=500)
    server.start()
    try:
        with pytest.raises(ZooKeeperStartFailed, match="already runs"):
            ZooKeeperServer(str(tmp_path / "zk"), port=server.port).start()
    finally:
        server.stop()


def test_port_taken_fails_with_a_clear_error(tmp_path, zk_server):
    server = ZooKeeperServer(str(tmp_path / "zk"), port=zk_server.port)
    with pytest.raises(ZooKeeperStartFailed, match=str(zk_server.port)):
        server.start(timeout=15)
    assert server.pid() is None
    # The session server must still be fine.
    assert "Mode:" in four_letter(zk_server.host, zk_server.port, "srvr")


def test_stop_process_spares_a_recycled_pid():
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        stop_process(stranger.pid, timeout=1, marker="zoo.cfg")
        time.sleep(0.1)
        assert stranger.poll() is None, "a process without the marker was killed"
    finally:
        stranger.kill()
        stranger.wait()


def test_stale_pid_file_is_not_a_running_server(tmp_path):
    server = ZooKeeperServer(str(tmp_path / "zk"))
    os.makedirs(server.directory)
    with open(server.pid_path, "w") as f:
        f.write(f"{os.getpid()}\n")  # alive, but not a ZooKeeper of this directory
    assert server.pid() is None
