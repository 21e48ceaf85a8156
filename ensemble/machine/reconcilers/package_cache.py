"""This host's package cache for its units (ensemble/machine/package_cache.py): kept
running on the bridge address, restarted if it dies, and shown on the machine node
(`package-cache`), so `ensemble status` says where it is or why it is not."""

import logging

from ensemble.machine.package_cache import DEFAULT_PORT, PackageCache, PackageCacheError, unit_apt_config
from ensemble.machine.reconciler import Reconciler
from ensemble.state.environment import package_cache_settings

log = logging.getLogger("ensemble.machine")


class PackageCacheReconciler(Reconciler):
    name = "package-cache"

    def __init__(self, host, directory, port=DEFAULT_PORT):
        super().__init__(host)
        settings = package_cache_settings(host.environment)
        # Only what the operator set: the rest follows this host's own apt.
        upstream = {key: settings[key] for key in ("mirror", "proxy") if settings.get(key)}
        self.cache = PackageCache(directory, host.gateway, port, upstream or None, host.reactor, netns=host.netns)
        self.ports = [f"{port}/tcp"]
        self.apt_config = unit_apt_config(self.cache.url)

    async def converge(self):
        if not self.cache.running:
            try:
                await self.cache.start()
            except PackageCacheError as e:
                self.host.report_once(f"package cache: {e}")
                await self.host.publish("package-cache", {"state": "error", "error": str(e)})
                return
            self.cache.ended.addCallback(self._ended)
            log.info("%s: package cache at %s (cache in %s)", self.host.name, self.cache.url, self.cache.cache_dir)
        await self.host.publish("package-cache", {"address": f"{self.cache.address}:{self.cache.port}",
                                                  "state": "running"})

    def _ended(self, exit):
        if not exit.requested and not self.stopping:
            log.warning("%s: the package cache exited (status %s); starting it again", self.host.name, exit.status)
            self.sync().addErrback(lambda f: log.error("%s: package cache: %s", self.host.name, f.getErrorMessage()))

    async def stop(self):
        await super().stop()
        await self.cache.stop()
