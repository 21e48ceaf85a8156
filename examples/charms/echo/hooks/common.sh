# Sourced by the hooks: where the server's pid file is, and finding the server by it.
# The pid file and the log are in the state-dir option's directory: an upgrade of the
# charm replaces $CHARM_DIR whole, so nothing is kept there.
STATE_DIR=$(config-get state-dir)
PID_FILE="$STATE_DIR/echo.pid"
LOG_FILE="$STATE_DIR/echo.log"
SERVER="$CHARM_DIR/server.py"

# The server's pid if it runs: the pid in the file must still be our server's, since
# pids get recycled.
running_pid() {
    [ -f "$PID_FILE" ] || return 1
    pid=$(cat "$PID_FILE")
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$SERVER" || return 1
    echo "$pid"
}

# One line from ADDRESS:PORT, or why there is none.
ask() {
    python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        print(s.makefile().readline().strip())
except OSError as e:
    print(f"no answer: {e}")
PY
}
