"""What every command shares: the session with the environment it talks to."""

import contextlib

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
