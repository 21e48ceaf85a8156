"""The container template, built before this host's first unit: a failure is retried
and shown on the machine node, and so is how far a build has got."""

import logging

from twisted.internet import defer, task

from ensemble.errors import EnsembleError

log = logging.getLogger("ensemble.machine")

# How often a template build's progress is written to the machine node, at most.
TEMPLATE_PROGRESS_INTERVAL = 2.0


async def ensure_template(host, template, retry_delay, stopping):
    """Built once per host (debootstrap from the host's mirror). A failure, such as no
    network on first use, shows on the machine and is retried, not fatal. While it
    builds, the machine node's `template` says how far it got (status shows it)."""
    shown = {"at": None, "writing": None}

    def progress(line):
        log.info("%s: template: %s", host.name, line)
        if line.startswith(("I: ", "W: ")):
            return  # the log's: status shows the stage and the count
        now = host.reactor.seconds()
        if shown["writing"] is None and (shown["at"] is None or now - shown["at"] >= TEMPLATE_PROGRESS_INTERVAL):
            shown["at"] = now
            shown["writing"] = d = defer.ensureDeferred(
                host.machine.update(template={"state": "building", "progress": line})
            )
            d.addErrback(lambda f: log.warning("%s: template progress: %s", host.name, f.getErrorMessage()))
            d.addBoth(lambda _: shown.update(writing=None))

    async def written():
        # A progress write landing after the last one would bring "building" back.
        if shown["writing"] is not None:
            await shown["writing"]

    while not stopping():
        try:
            await template.ensure(progress=progress)
        except EnsembleError as e:
            log.error("%s: container template: %s; retrying in %gs", host.name, e, retry_delay)
            await written()
            await host.machine.update(error=f"container template: {e}", template=None)
            await task.deferLater(host.reactor, retry_delay, lambda: None)
            continue
        await written()
        if host.machine.data.get("error", "").startswith("container template:") or "template" in host.machine.data:
            await host.machine.update(error=None, template=None)
        return
