"""The floor's agent: the least a unit agent could do. Connects to ZooKeeper with the
same client library (kazoo) and creates one ephemeral node, then waits to be stopped.
Run inside a plain LXC clone by bench/deploy_floor.py.

    python floor_agent.py HOST:PORT PATH
"""

import signal
import sys

from kazoo.client import KazooClient

client = KazooClient(hosts=sys.argv[1])
client.start()
client.create(sys.argv[2], ephemeral=True)
signal.sigwait([signal.SIGTERM, signal.SIGINT, signal.SIGPWR])
