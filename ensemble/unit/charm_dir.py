"""The unit's charm directory: the service's charm unpacked, replaced whole when the
service moves to another charm (upgrade-charm), so a hook never sees a mix of two."""

import os
import shutil

from twisted.internet import threads

from ensemble.charm import extract_bundle
from ensemble.state.client import NoNode
from ensemble.state.service import ServiceStateManager, charm_path

STAMP = ".ensemble-charm"  # in the charm directory: the id of the charm unpacked there


class CharmDirectory:
    def __init__(self, client, service_name, path):
        self.client = client
        self.service_name = service_name
        self.path = path

    @property
    def charm_id(self):
        """The id of the charm unpacked now, or None."""
        try:
            with open(os.path.join(self.path, STAMP)) as f:
                return f.read().strip() or None
        except OSError:
            return None

    async def ensure(self, charm_id=None):
        """Unpack the service's charm (`charm_id` if known, else read from the service)
        unless it is the one there; returns its id."""
        if charm_id is None:
            charm_id = (await ServiceStateManager(self.client).get_service(self.service_name)).charm_id
        if charm_id == self.charm_id:
            return charm_id
        try:
            bundle, _ = await self.client.get(charm_path(charm_id))
        except NoNode:
            # Gone: the service moved on to another charm meanwhile (and the old one,
            # used by no service, went). The newest is the one to unpack.
            service = await ServiceStateManager(self.client).get_service(self.service_name)
            charm_id = service.charm_id
            bundle = await service.charm_bundle()
        # Unpacking is disk work a big charm makes long: not on the reactor thread.
        await threads.deferToThread(self._replace, bundle, charm_id)
        return charm_id

    def _replace(self, bundle, charm_id):
        staging = self.path + ".new"
        shutil.rmtree(staging, ignore_errors=True)
        extract_bundle(bundle, staging)
        with open(os.path.join(staging, STAMP), "w") as f:
            f.write(charm_id + "\n")
        old = self.path + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(self.path):
            os.replace(self.path, old)
        os.replace(staging, self.path)
        shutil.rmtree(old, ignore_errors=True)
