"""Which ZooKeeper a command talks to, and opening the session.

Order: --zookeeper, then $ENSEMBLE_ZOOKEEPER (set for agents inside containers), then
the environment in ENSEMBLE_HOME. The form is HOST:PORT[,HOST:PORT...][/ROOT].

Who the session is: $ENSEMBLE_AUTH (USER:SECRET; agents get theirs this way), else
the admin of the environment in ENSEMBLE_HOME when that is the one talked to, else
nobody (an anonymous session may only read what everyone may). $ENSEMBLE_READER
(USER:SECRET): a shared reader the session is too (unit agents get the units' reader).
"""

import os

import netaddr

from ensemble.errors import InvalidValue
from ensemble.home import EnsembleHome
from ensemble.state import auth
from ensemble.state.client import DEFAULT_ROOT, ZKClient

AUTH_VARIABLE = "ENSEMBLE_AUTH"
READER_VARIABLE = "ENSEMBLE_READER"
_UNSET = object()



def _seconds(variable, default):
    text = os.environ.get(variable, default)
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise InvalidValue(f"{variable} must be a number of seconds, not {text!r}")
    return value


def parse_zookeeper(spec):
    """'h:p,h2:p2/root' -> ('h:p,h2:p2', '/root')."""
    spec = spec.strip()
    servers, slash, root = spec.partition("/")
    root = "/" + root.strip("/") if slash else DEFAULT_ROOT
    if root == "/":
        root = ""
    hosts = [s.strip() for s in servers.split(",")]
    for host in hosts:
        name, colon, port = host.rpartition(":")
        if not colon or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidValue(f"invalid ZooKeeper address {host!r}: use HOST:PORT[,HOST:PORT...]")
        if not (netaddr.valid_ipv4(name) or _valid_hostname(name)):
            raise InvalidValue(f"invalid ZooKeeper host {name!r}")
    for part in root.split("/")[1:]:
        if not part or part in (".", "..") or not part.replace("-", "").replace("_", "").isalnum():
            raise InvalidValue(f"invalid ZooKeeper root {root!r}")
    return ",".join(hosts), root


def _valid_hostname(name):
    labels = name.split(".")
    return all(label and len(label) <= 63 and label.replace("-", "").isalnum() for label in labels)


def resolve(zookeeper=None, home=None):
    """(servers, root) for this command."""
    spec = zookeeper or os.environ.get("ENSEMBLE_ZOOKEEPER")
    if spec:
        return parse_zookeeper(spec)
    config = (home or EnsembleHome()).load()
    return config["zookeeper"], config.get("root", DEFAULT_ROOT)


def session_credential(zookeeper=None, home=None):
    """This process's ZooKeeper credential, or None (see the module's doc)."""
    text = os.environ.get(AUTH_VARIABLE)
    if text:
        return auth.Credential.parse(text)
    if zookeeper or os.environ.get("ENSEMBLE_ZOOKEEPER"):
        return None
    return auth.admin_of((home or EnsembleHome()).load())


async def connect(zookeeper=None, home=None, timeout=None, session_timeout=None, create_root=False,
                  credential=_UNSET):
    servers, root = resolve(zookeeper, home)
    if credential is _UNSET:
        credential = session_credential(zookeeper, home)
    reader = os.environ.get(READER_VARIABLE)
    client = ZKClient(servers, root, session_timeout=session_timeout or _seconds("ENSEMBLE_SESSION_TIMEOUT", "10"),
                      credential=credential, readers=[auth.Credential.parse(reader)] if reader else [])
    if credential is not None and credential.user == auth.ADMIN_USER:
        client.default_acl = auth.default_acl(credential, credential.id)
    await client.connect(
        timeout if timeout is not None else _seconds("ENSEMBLE_CONNECT_TIMEOUT", "5"), create_root=create_root
    )
    try:
        await use_environment_acl(client)
    except BaseException:
        await client.close()
        raise
    return client


async def use_environment_acl(client):
    """Make the session what its credential is (auth.join: the nodes it creates name the
    environment's admin and machines, a machine reads as the machines' reader); the
    admin's first connection to an environment of an older version puts its ACLs right."""
    from ensemble.state.repair import upgrade

    if client.credential is None:
        return
    if client.credential.user == auth.ADMIN_USER:
        await upgrade(client)
    else:
        await auth.join(client)
