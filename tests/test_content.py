"""What goes into a unit's container: the installation check, and the files a unit
starts with."""

import os

import pytest

from ensemble.machine.content import UnrunnableInstallation, check_installation, unit_files


def _rootfs(tmp_path):
    """A rootfs with usr-merged /bin and /usr/bin/python3 -> python3.11, as Debian's."""
    root = tmp_path / "rootfs"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "python3.11").write_text("")
    os.symlink("python3.11", root / "usr" / "bin" / "python3")
    os.symlink("usr/bin", root / "bin")
    return str(root)


def _venv(tmp_path, interpreter):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    os.symlink(interpreter, venv / "bin" / "python")
    return str(venv), [(str(venv), str(venv), True)]


def test_a_venv_on_the_distributions_python_runs_in_containers(tmp_path):
    rootfs = _rootfs(tmp_path)
    venv, mounts = _venv(tmp_path, "/usr/bin/python3")
    assert check_installation(rootfs, f"{venv}/bin/python", mounts) == "/usr/bin/python3.11"
    venv_bin, mounts_bin = _venv(tmp_path / "b", "/bin/python3")  # through the /bin link
    assert check_installation(rootfs, f"{venv_bin}/bin/python", mounts_bin) == "/usr/bin/python3.11"


def test_a_venv_on_a_python_containers_lack_is_refused_in_one_line(tmp_path):
    rootfs = _rootfs(tmp_path)
    elsewhere = tmp_path / "pyenv" / "bin"
    elsewhere.mkdir(parents=True)
    (elsewhere / "python3.11").write_text("")  # exists on the host, not in the rootfs
    venv, mounts = _venv(tmp_path, str(elsewhere / "python3.11"))
    with pytest.raises(UnrunnableInstallation) as raised:
        check_installation(rootfs, f"{venv}/bin/python", mounts)
    message = str(raised.value)
    assert "\n" not in message and str(elsewhere / "python3.11") in message and "scripts/install" in message


def test_a_dangling_or_looping_interpreter_is_refused(tmp_path):
    rootfs = _rootfs(tmp_path)
    os.symlink("loop-b", os.path.join(rootfs, "usr", "bin", "loop-a"))
    os.symlink("loop-a", os.path.join(rootfs, "usr", "bin", "loop-b"))
    for interpreter in ("/usr/bin/python2", "/usr/bin/loop-a"):
        venv, mounts = _venv(tmp_path / interpreter.rsplit("/", 1)[1], interpreter)
        with pytest.raises(UnrunnableInstallation):
            check_installation(rootfs, f"{venv}/bin/python", mounts)


def test_unit_files_name_the_unit_and_point_at_the_host():
    files = unit_files("db-0", "10.77.0.5", "10.77.0.1", "env.ensemble", "Acquire::http::Proxy \"x\";\n")
    hosts, mode = files["/etc/hosts"]
    assert "10.77.0.5\tdb-0.env.ensemble\tdb-0\n" in hosts and mode == 0o644
    resolv = files["/etc/resolv.conf"][0]
    assert resolv.splitlines()[:2] == ["nameserver 10.77.0.1", "search env.ensemble"]
    assert files["/etc/apt/apt.conf.d/01ensemble-proxy"][0] == "Acquire::http::Proxy \"x\";\n"
    bare = unit_files("db-0", "10.77.0.5")
    assert set(bare) == {"/etc/hosts"}  # no name server, no cache: the template's own


@pytest.mark.parametrize("path", ["etc/hosts", "/etc/../../host", "/etc/hosts\n", "/", "/etc//hosts", "/a b"])
def test_a_container_file_must_be_a_plain_absolute_path(path):
    from ensemble.errors import InvalidValue
    from ensemble.machine.container.driver import ContainerSpec

    with pytest.raises(InvalidValue, match="invalid path inside a container"):
        ContainerSpec(name="ens-t-db-0", hostname="db-0", address="10.77.0.5", prefixlen=24, gateway="10.77.0.1",
                      bridge="ens-t", files={path: ("x", 0o644)})
