"""What every command shares: the session with the environment it talks to, and
whether its output still has a reader."""

import contextlib
import select
import sys

from ensemble import connection
from ensemble.state.environment import get_environment


@contextlib.asynccontextmanager
async def environment(args):
    """A session with the environment the command talks to; an error if there is none."""
    client = await connection.connect(args.zookeeper)
    try:
        await get_environment(client)
        yield client
    finally:
        await client.close()


def pipe_closed(stream):
    """Whether `stream` is a pipe (or socket) nobody reads any more."""
    try:
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def output_closed():
    """Whether the reader of stdout or stderr has gone (`ensemble status | head -1`)."""
    return pipe_closed(sys.stdout) or pipe_closed(sys.stderr)
