"""The container template, built before this host's first unit: a failure is retried
and shown on the machine node, and so is how far a build has got."""

import logging

from twisted.internet import defer, task

from ensemble.errors import EnsembleError

log = logging.getLogger("ensemble.machine")

# How often a template build's progress is written to the machine node, at most.
TEMPLATE_PROGRESS_INTERVAL = 2.0


class _Progress:
    """The build's latest progress line on the machine node: at most one write every
    TEMPLATE_PROGRESS_INTERVAL, and the latest line always written in the end (a
    short last stage would otherwise never show)."""

    def __init__(self, host):
        self.host = host
        self.latest = self.written = None
        self.written_at = None
        self.writing = self.timer = None

    def line(self, line):
        log.info("%s: template: %s", self.host.name, line)
        if line.startswith(("I: ", "W: ")):
            return  # the log's: status shows the stage and the count
        self.latest = line
        self._write_soon()

    def _write_soon(self):
        if self.writing is not None or self.timer is not None or self.latest == self.written:
            return  # what runs or waits now writes the latest line when its turn comes
        now = self.host.reactor.seconds()
        wait = 0 if self.written_at is None else self.written_at + TEMPLATE_PROGRESS_INTERVAL - now
        if wait > 0:
            self.timer = self.host.reactor.callLater(wait, self._timer_fired)
        else:
            self._write()

    def _timer_fired(self):
        self.timer = None
        self._write_soon()

    def _write(self):
        self.written, self.written_at = self.latest, self.host.reactor.seconds()
        self.writing = defer.ensureDeferred(
            self.host.machine.update(template={"state": "building", "progress": self.latest})
        )
        self.writing.addErrback(lambda f: log.warning("%s: template progress: %s", self.host.name, f.getErrorMessage()))
        self.writing.addBoth(self._written)

    def _written(self, _):
        self.writing = None
        self._write_soon()

    async def finish(self):
        """No more writes; returns once the one in flight has landed (landing after
        the caller's own update, it would bring "building" back)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.written = self.latest  # nothing more is owed
        if self.writing is not None:
            await self.writing


async def ensure_template(host, template, retry_delay, stopping):
    """Built once per host (debootstrap from the host's mirror). A failure, such as no
    network on first use, shows on the machine and is retried, not fatal. While it
    builds, the machine node's `template` says how far it got (status shows it)."""
    while not stopping():
        progress = _Progress(host)
        try:
            await template.ensure(progress=progress.line)
        except EnsembleError as e:
            log.error("%s: container template: %s; retrying in %gs", host.name, e, retry_delay)
            await progress.finish()
            await host.machine.update(error=f"container template: {e}", template=None)
            await task.deferLater(host.reactor, retry_delay, lambda: None)
            continue
        await progress.finish()
        if host.machine.data.get("error", "").startswith("container template:") or "template" in host.machine.data:
            await host.machine.update(error=None, template=None)
        return
