#!/usr/bin/env bash
# docs/flower.md's secure topology on one machine, from the files `deltamask flower secure-files DIR` made:
#
#   scripts/secure-federation.sh start DIR NODES [FIRST_NODE_PORT]   # FIRST_NODE_PORT default 9094
#   scripts/secure-federation.sh stop DIR
#
# start:
#   1. the SuperLink with TLS, SuperNode authentication and the SuperExec secret, on the loopback address
#      that DIR/nginx.conf forwards to (the admin side: flwr run, flwr ls, flwr log);
#   2. nginx with DIR/nginx.conf on the nodes' address (TLS, the Fleet API only);
#   3. registers DIR/nodes/node-I.pub (I < NODES) through the flwr connection "secure" (the section
#      [superlink.secure] of $FLWR_HOME/config.toml, default ~/.flwr, is written for DIR; the rest is kept);
#   4. NODES SuperNodes through nginx, SuperNode I with partition-id=I num-partitions=NODES plus
#      $NODE_CONFIG_EXTRA (e.g. "cache-dir='/srv/cache'"), each on its own Runtime API port FIRST_NODE_PORT+I.
# Each process runs in a session of its own: DIR/<name>.pgid holds its process group (stop kills the groups,
# with what they spawned, and this user's ServerApps of this SuperLink), DIR/<name>.log its output. The ServerApp writes only below $DELTAMASK_OUT_ROOT
# (default ~/deltamask-runs): export it before start. tests/engines/flower/test_flower_secure.py runs this.
set -euo pipefail
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

usage() { sed -n 2,6p "$0" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1
DIR=$(cd "$2" && pwd)

spawn() {  # NAME COMMAND...: in a session of its own, process group id in DIR/NAME.pgid
  local name=$1; shift
  setsid sh -c 'echo $$ > "$0"; exec "$@"' "$DIR/$name.pgid" "$@" > "$DIR/$name.log" 2>&1 &
}

wait_port() {  # HOST PORT NAME
  for _ in $(seq 1 120); do
    if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
    sleep 0.5
  done
  echo "secure-federation.sh: $3 did not listen on $1:$2; see $DIR/$3.log" >&2
  exit 1
}

# the addresses, as DIR/nginx.conf has them: the SuperLink it forwards to, and where it listens for the nodes
ADMIN=$(sed -n 's|^ *proxy_pass https://\(.*\);|\1|p' "$DIR/nginx.conf")
LISTEN=$(sed -n 's|^ *listen \(.*\) ssl;|\1|p' "$DIR/nginx.conf")

case "$cmd" in
stop)
  for f in "$DIR"/supernode-*.pgid "$DIR"/proxy.pgid "$DIR"/superlink.pgid; do
    [ -f "$f" ] || continue
    kill -- "-$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  # a ServerApp runs in a session of its own and can outlive its SuperLink: this user's, of this SuperLink only
  pkill -u "$(id -u)" -f "flwr-serverapp --runtime-api-address $ADMIN( |\$)" 2>/dev/null || true
  exit 0
  ;;
start) ;;
*) usage ;;
esac

N=${3:?NODES}
NODE0=${4:-9094}
FLEET_PORT=${LISTEN##*:}
FLEET_HOST=${LISTEN%:*}
[ "$FLEET_HOST" = "0.0.0.0" ] && FLEET_HOST=127.0.0.1

# 1. the SuperLink, on loopback only
spawn superlink flower-superlink \
  --ssl-ca-certfile "$DIR/ca.crt" --ssl-certfile "$DIR/server.crt" --ssl-keyfile "$DIR/server.key" \
  --enable-supernode-auth --superexec-auth-secret-file "$DIR/superexec.secret" \
  --host "${ADMIN%:*}" --port "${ADMIN##*:}" --database "$DIR/superlink.db" --disable-runtime-dependency-installation
wait_port "${ADMIN%:*}" "${ADMIN##*:}" superlink

# 2. the Fleet-only proxy on the nodes' address
spawn proxy nginx -c "$DIR/nginx.conf" -p "$DIR"
wait_port "$FLEET_HOST" "$FLEET_PORT" proxy

# 3. the operator's connection (admin side), and the nodes' keys registered through it
FLWR_HOME=${FLWR_HOME:-$HOME/.flwr}
export FLWR_HOME
mkdir -p "$FLWR_HOME"
touch "$FLWR_HOME/config.toml"
# (re)write the [superlink.secure] section for this folder; the rest of the file is kept
awk 'BEGIN{skip=0} /^\[/{skip=($0=="[superlink.secure]")} !skip' "$FLWR_HOME/config.toml" > "$FLWR_HOME/config.toml.new"
printf '\n[superlink.secure]\naddress = "%s"\nroot-certificates = "%s"\n' "$ADMIN" "$DIR/ca.crt" >> "$FLWR_HOME/config.toml.new"
mv "$FLWR_HOME/config.toml.new" "$FLWR_HOME/config.toml"
for i in $(seq 0 $((N - 1))); do
  flwr supernode register "$DIR/nodes/node-$i.pub" secure --format json > "$DIR/register-$i.json"
  grep -q '"success": *true' "$DIR/register-$i.json" || { cat "$DIR/register-$i.json" >&2; exit 1; }
done

# 4. the SuperNodes, through the proxy, each with its registered key and its own SuperExec secret
for i in $(seq 0 $((N - 1))); do
  spawn "supernode-$i" flower-supernode --root-certificates "$DIR/ca.crt" --superlink "$FLEET_HOST:$FLEET_PORT" \
    --auth-supernode-private-key "$DIR/nodes/node-$i.key" --superexec-auth-secret-file "$DIR/nodes/node-$i.secret" \
    --host 127.0.0.1 --port $((NODE0 + i)) --node-config "partition-id=$i num-partitions=$N ${NODE_CONFIG_EXTRA:-}"
done
echo "secure federation started in $DIR: SuperLink (admin) $ADMIN, nodes' proxy $LISTEN, $N SuperNodes"
echo "submit: flwr run examples/flower secure --run-config FILE    stop: $0 stop $DIR"
