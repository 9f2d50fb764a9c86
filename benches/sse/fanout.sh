#!/usr/bin/env bash
# /events fan-out: 10 SSE clients (raw sockets, clients.py) follow one presenced while DEV
# simulated devices (default 20,000) send one heartbeat each within IV (default 1s) and go
# silent: their offline events arrive in a burst at a 5 s TTL. Prints, per client, the
# offline events received and their rate. Needs redis-server, mosquitto and a release build
# (cargo build --release). Ports 6401, 1901, 9481 must be free. Not part of CI.
set -euo pipefail
BIN=${BIN:-$(cd "$(dirname "$0")/../.." && pwd)/target/release/presenced}
work=$(mktemp -d)
cp "$(dirname "$0")/clients.py" "$work/"
cd "$work"
redis-server --port 6401 --save '' --appendonly no --daemonize yes --logfile "$work/redis.log"
printf 'listener 1901 127.0.0.1\nallow_anonymous true\nmax_queued_messages 1000000\n' > m.conf
mosquitto -c m.conf -d
sleep 0.5
PRESENCED_REDIS_URL=redis://127.0.0.1:6401/0 PRESENCED_MQTT_URL=mqtt://127.0.0.1:1901 PRESENCED_HTTP_LISTEN=127.0.0.1:9481 PRESENCED_PRESENCE_TTL=5s RUST_LOG=warn "$BIN" run 2> p.log &
P=$!
sleep 2
python3 clients.py 10 9481 ${DEV:-20000} > clients.log &
C=$!
sleep 1
"$BIN" simulate --mqtt-url mqtt://127.0.0.1:1901 --devices ${DEV:-20000} --interval ${IV:-1s} --offline-fraction 1 --duration 2s > sim.log 2>&1
wait $C
cat clients.log
kill $P
redis-cli -p 6401 shutdown nosave >/dev/null; pkill -f "mosquitto -c m.conf"
