# Peer: Londiste 3 with pgqd, from Debian's packages (python3-londiste, pgqd,
# postgresql-NN-pgq3, postgresql-NN-londiste-sql), set up as ../shared/bench does it:
# root and leaf nodes, pgqd ticking every second. Sourced by bench/run after lib.sh.

peer_setup() {
  W=$BENCH_ROOT/londiste3-work; rm -rf "$W"; mkdir -p "$W"; chmod 777 "$W"
  local ext="create extension pgq; create extension pgq_node; create extension londiste"
  qp "$ext" 2>&1 | grep -v NOTICE
  qs "$ext" 2>&1 | grep -v NOTICE
  cat > "$W/root.ini" <<INI
[londiste]
job_name = l3_root
db = $(pconn)
queue_name = replika
logfile = $W/root.log
pidfile = $W/root.pid
INI
  cat > "$W/leaf.ini" <<INI
[londiste]
job_name = l3_leaf
db = $(sconn)
queue_name = replika
logfile = $W/leaf.log
pidfile = $W/leaf.pid
INI
  cat > "$W/pgqd.ini" <<INI
[pgqd]
base_connstr = host=$BENCH_ROOT/$PROV port=$PPORT user=postgres
database_list = bench
logfile = $W/pgqd.log
pidfile = $W/pgqd.pid
ticker_period = 1
INI
  [ "$(id -u)" = 0 ] && chown -R postgres "$W"
  L() { as_pg londiste "$@" >/dev/null 2>&1 || die "londiste $*"; }
  L "$W/root.ini" create-root rootnode "$(pconn)"
  L "$W/leaf.ini" create-leaf leafnode "$(sconn)" --provider="$(pconn)"
  as_pg pgqd -d "$W/pgqd.ini" || die "pgqd"
  L -d "$W/root.ini" worker
  L -d "$W/leaf.ini" worker
}
peer_start_copy() {
  L "$W/root.ini" add-table --all
  L "$W/leaf.ini" add-table --all
}
peer_wait_copied() {
  wait_sub_true "select count(*) > 0 and count(*) filter (where merge_state = 'ok') = count(*) from londiste.table_info where queue_name = 'replika' and local"
}
peer_stop_replay() { L -s "$W/leaf.ini"; sleep 1; }
peer_start_replay() { L -d "$W/leaf.ini" worker; }
peer_replay_pid() { cat "$W/leaf.pid" 2>/dev/null; }
peer_teardown() {
  as_pg londiste -s "$W/leaf.ini" >/dev/null 2>&1
  as_pg londiste -s "$W/root.ini" >/dev/null 2>&1
  as_pg pgqd -s "$W/pgqd.ini" >/dev/null 2>&1
  return 0
}
# pgqd and the two londiste workers
peer_daemon_pids() { cat "$W/pgqd.pid" "$W/root.pid" "$W/leaf.pid" 2>/dev/null; }
