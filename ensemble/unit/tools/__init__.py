"""Hook tools: the commands a charm's hooks run (`relation-get` … `juju-log`) and the
server in the unit agent that answers them over a unix socket, with AMP.

- `wire`: AMP boxes and one call over a socket, standard library only (the tools'
  side: a tool must start fast, and importing Twisted alone takes ~110 ms).
- `cli`: the tools themselves (argument parsing, output formats); entry points.
- `output`: the output formats (`smart`, `json`, `shell`, `eval`).
- `commands`: the AMP commands, for Twisted (the server's side).
- `context`: what a hook may read and write: the interface the server calls, and the
  hook context that caches reads and buffers relation writes for one hook.
- `server`: the AMP server and its unix socket.
- `memory`: an in-memory unit state for tests and benchmarks.

Only `cli`, `output` and `wire` run in the tool processes; they import no Twisted.
"""
