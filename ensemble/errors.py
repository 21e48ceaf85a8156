"""Errors a user sees. Each message is one line that says what is wrong and, where it
helps, what to do; the CLI prints it as `error: <message>` and exits 1."""


class EnsembleError(Exception):
    """Base of every error meant for a user."""


class ZooKeeperUnreachable(EnsembleError):
    def __init__(self, servers, waited):
        super().__init__(f"cannot reach ZooKeeper at {servers} (waited {waited:g}s)")


class ZooKeeperStartFailed(EnsembleError):
    pass


class NoEnvironment(EnsembleError):
    def __init__(self, home):
        super().__init__(
            f"no environment in {home} (run 'ensemble bootstrap', or pass --zookeeper)"
        )


class EnvironmentExists(EnsembleError):
    pass


class EnvironmentNotInitialized(EnsembleError):
    def __init__(self, servers, root):
        super().__init__(f"no ensemble environment at {servers}{root} (run 'ensemble bootstrap')")


class InvalidName(EnsembleError):
    pass


class InvalidValue(EnsembleError):
    pass


class InvalidCharm(EnsembleError):
    pass


class MachineNotFound(EnsembleError):
    def __init__(self, machine_id):
        super().__init__(f"machine {machine_id} not found")


class MachineBusy(EnsembleError):
    pass


class ServiceNotFound(EnsembleError):
    def __init__(self, name):
        super().__init__(f"service {name!r} not found")


class ServiceExists(EnsembleError):
    def __init__(self, name):
        super().__init__(f"service {name!r} already exists")


class ServiceDying(EnsembleError):
    def __init__(self, name):
        super().__init__(f"service {name!r} is being destroyed")


class UnitNotFound(EnsembleError):
    def __init__(self, name):
        super().__init__(f"unit {name!r} not found")


class NoMachines(EnsembleError):
    def __init__(self):
        super().__init__("no machines to place units on (run 'ensemble add-machine')")


class MalformedState(EnsembleError):
    """A node in ZooKeeper holds data this code cannot read."""

    def __init__(self, path, reason):
        super().__init__(f"malformed data at {path}: {reason}")
        self.path = path


class InvalidRelation(EnsembleError):
    """add-relation/remove-relation refused: no such endpoint, no or several matches."""


class RelationExists(EnsembleError):
    pass


class RelationNotFound(EnsembleError):
    pass


class UnsafeFile(EnsembleError):
    """A path a unit can write that is not what the host expects there (a link, a FIFO,
    a device, a directory): host tools refuse it rather than follow it."""

    def __init__(self, path, kind="regular file the unit wrote", action="read"):
        super().__init__(f"{path} is not a {kind}: refusing to {action} it")
        self.path = path


class SettingsTooLarge(EnsembleError):
    """A hook's relation-set would take the unit's settings past what ZooKeeper lets a
    unit keep in one relation (its quota: ensemble/state/quota.py)."""

    def __init__(self, relation_id, limit):
        super().__init__(f"relation {relation_id}: this unit's settings would exceed {limit} bytes, "
                         f"the most a unit may keep in one relation")


class UsageError(EnsembleError):
    """The command line itself is wrong (an unknown option, a missing argument): the
    CLI exits 2, as argparse has users expect."""


class UnitsNotStarted(EnsembleError):
    """`--wait` ended with units in error, removed, or not started in time."""


class UnitUnreachable(EnsembleError):
    """`ensemble ssh` cannot enter the unit from this host: its container is on another
    machine's host, not made yet, or not running."""


class UpgradeRefused(EnsembleError):
    """upgrade-charm would leave the service without something it is using (a relation
    it is in, a set option of another type) or with another charm than its own."""


class NotInError(EnsembleError):
    """`ensemble resolved` for a unit (or a relation of it) whose hooks did not fail."""
