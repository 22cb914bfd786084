# Peer: ferry, the release build, with its default settings (ticker and replay as daemons;
# TICKER_LOOP_DELAY sets the ticker's loop_delay instead, TICKER_MAX_LAG and TICKER_MAX_COUNT
# the queue's ticker_max_lag and ticker_max_count; CAPTURE=row captures the tables per row).
# $FERRY is the binary. Sourced by bench/run after lib.sh.

peer_setup() {
  W=$BENCH_ROOT/ferry-work; rm -rf "$W"; mkdir -p "$W"
  cat > "$W/ticker.ini" <<INI
[pgqadm]
job_name = bench-ticker
db = $(pconn)
logfile = $W/ticker.log
pidfile = $W/ticker.pid
${TICKER_LOOP_DELAY:+loop_delay = $TICKER_LOOP_DELAY}
INI
  cat > "$W/londiste.ini" <<INI
[londiste]
job_name = bench-replay
provider_db = $(pconn)
subscriber_db = $(sconn)
pgq_queue_name = bench
logfile = $W/replay.log
pidfile = $W/replay.pid
INI
  F() { "$FERRY" "$@" >/dev/null || die "ferry $*"; }
  F "$W/ticker.ini" install
  F "$W/ticker.ini" ticker -d
  F "$W/londiste.ini" provider install
  if [ -n "${TICKER_MAX_LAG:-}" ]; then F "$W/ticker.ini" config bench "ticker_max_lag=$TICKER_MAX_LAG"; fi
  if [ -n "${TICKER_MAX_COUNT:-}" ]; then F "$W/ticker.ini" config bench "ticker_max_count=$TICKER_MAX_COUNT"; fi
  F "$W/londiste.ini" subscriber install
}
peer_start_copy() {
  F "$W/londiste.ini" provider add --all ${CAPTURE:+--capture "$CAPTURE"}
  F "$W/londiste.ini" subscriber add --all
  F "$W/londiste.ini" replay -d
}
peer_wait_copied() {
  wait_sub_true "select count(*) > 0 and count(*) filter (where state = 'ok') = count(*) from ferry.subscriber_table where queue_name = 'bench'"
}
peer_stop_replay() { F "$W/londiste.ini" replay -s; }
peer_start_replay() { F "$W/londiste.ini" replay -d; }
peer_replay_pid() { cat "$W/replay.pid" 2>/dev/null; }
peer_teardown() {
  "$FERRY" "$W/londiste.ini" replay -s >/dev/null 2>&1
  "$FERRY" "$W/ticker.ini" ticker -s >/dev/null 2>&1
  return 0
}
# the ticker and replay daemons
peer_daemon_pids() { cat "$W/replay.pid" "$W/ticker.pid" 2>/dev/null; }
