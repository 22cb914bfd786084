# Shared pieces of the benchmark: throwaway clusters, the pgbench workload, the probes
# (checksums, convergence, lag, memory). Sourced by bench/run; every peer script uses them.
#
# Clusters live under $BENCH_ROOT/<name>, listen on 127.0.0.1 and a socket in their own folder,
# and run as the postgres OS user when we are root. PROV and SUB name the pair of the peer
# being measured; PPORT and SPORT are their ports.

BENCH_ROOT=${BENCH_ROOT:-/tmp/ferry-bench}
PGBIN=${PGBIN:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)}
SCALE=${SCALE:-10}
CLIENTS=${CLIENTS:-4}
SECS=${SECS:-30}
RATE=${RATE:-1000}

say() { printf '%s  %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
now() { date +%s.%N; }
# seconds since $1, three decimals
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.3f", b - a }'; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# pg_up NAME PORT: a fresh cluster, settings as in ../shared/bench (fsync and synchronous
# commit on, logical WAL so the native peer can run on the same settings as the others).
pg_up() {
  local name=$1 port=$2 dir=$BENCH_ROOT/$1
  mkdir -p "$BENCH_ROOT"; chmod 777 "$BENCH_ROOT"
  pg_down "$name"; rm -rf "$dir"; mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  as_pg "$PGBIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null || die "initdb $name"
  cat >> "$dir/data/postgresql.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '$dir'
fsync = on
synchronous_commit = on
shared_buffers = 512MB
max_wal_size = 4GB
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
max_worker_processes = 16
max_connections = 200
CONF
  as_pg "$PGBIN/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null || { cat "$dir/log" >&2; die "starting $name"; }
}
pg_down() {
  [ -d "$BENCH_ROOT/$1/data" ] && as_pg "$PGBIN/pg_ctl" -D "$BENCH_ROOT/$1/data" -m fast -w stop >/dev/null 2>&1
  return 0
}
# connection strings of the pair
pconn() { echo "dbname=bench host=$BENCH_ROOT/$PROV port=$PPORT user=postgres"; }
sconn() { echo "dbname=bench host=$BENCH_ROOT/$SUB port=$SPORT user=postgres"; }
# psql on one side: qp SQL / qs SQL (unaligned, tuples only, stop on error)
qp() { psql -X -q -At -h "$BENCH_ROOT/$PROV" -p "$PPORT" -U postgres -d bench -v ON_ERROR_STOP=1 -c "$1"; }
qs() { psql -X -q -At -h "$BENCH_ROOT/$SUB" -p "$SPORT" -U postgres -d bench -v ON_ERROR_STOP=1 -c "$1"; }

# setup_pair: both clusters, pgbench data on the provider (pgbench_history with a primary key,
# a heartbeat table for the lag probe: a row inserted every 23 ms while it runs), the same
# schema without data on the subscriber.
setup_pair() {
  pg_up "$PROV" "$PPORT"; pg_up "$SUB" "$SPORT"
  as_pg createdb -h "$BENCH_ROOT/$PROV" -p "$PPORT" bench
  as_pg createdb -h "$BENCH_ROOT/$SUB" -p "$SPORT" bench
  pgbench -q -i -s "$SCALE" -h "$BENCH_ROOT/$PROV" -p "$PPORT" -U postgres bench >/dev/null 2>&1 || die "pgbench -i"
  qp "alter table pgbench_history add column hid bigserial primary key"
  qp "create table hb (id bigserial primary key, ts timestamptz); insert into hb (ts) values (clock_timestamp())"
  qp "vacuum analyze"
  pg_dump -s -h "$BENCH_ROOT/$PROV" -p "$PPORT" -U postgres bench \
    | psql -X -q -h "$BENCH_ROOT/$SUB" -p "$SPORT" -U postgres bench >/dev/null || die "schema copy"
}

# pgbench on the provider for $SECS seconds; prints its tps
run_pgbench() {
  pgbench -n -c "$CLIENTS" -j 2 -T "$SECS" -h "$BENCH_ROOT/$PROV" -p "$PPORT" -U postgres bench 2>&1 \
    | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1
}

# One table's fingerprint: row count and md5 of its rows in key order.
fingerprint() { # side table key
  local sql="select count(*) || ':' || coalesce(md5(string_agg(x::text, ',' order by $3)), '') from $2 x"
  if [ "$1" = p ]; then qp "$sql"; else qs "$sql"; fi
}
# same_tables PHASE: dies loudly unless every pgbench table is identical on both sides
same_tables() {
  local t k a b bad=0
  for tk in "pgbench_accounts aid" "pgbench_branches bid" "pgbench_tellers tid" "pgbench_history hid"; do
    set -- $tk
    a=$(fingerprint p "$1" "$2"); b=$(fingerprint s "$1" "$2")
    if [ "$a" != "$b" ]; then say "MISMATCH after $PHASE: $1 provider=$a subscriber=$b"; bad=1; fi
  done
  [ $bad = 0 ] || die "$PEER: tables differ after $PHASE"
  say "$PEER: identical after $PHASE"
}

# converge [LIMIT]: waits until the subscriber's pgbench_history matches the provider's
# (count and sum); prints the seconds it took. One psql session polls every 10 ms, each poll
# its own short transaction (a snapshot held for the whole wait would stop the subscriber from
# pruning the rows it updates, and slow down the peer measured); the full count runs only
# once max(hid) has arrived (a new psql and a full count every 10 ms would take a good part
# of a core from the peer).
converge() {
  local t0 limit=${1:-900} want top
  t0=$(now)
  want=$(qp "select count(*) || ':' || coalesce(sum(delta), 0) from pgbench_history")
  top=$(qp "select coalesce(max(hid), 0) from pgbench_history")
  wait_sub_true "select case when coalesce(max(hid), 0) >= $top
                   then (select count(*) || ':' || coalesce(sum(delta), 0) from pgbench_history) = '$want'
                   else false end from pgbench_history" "$limit" 0.01
  since "$t0"
}

# wait_sub_true SQL [LIMIT [EVERY]]: polls SQL (one boolean; mind that bool_and skips nulls) on
# the subscriber every EVERY seconds (0.05) until it is true, from ONE psql session: a new psql
# per poll would take a good part of a core from the peer being timed (300 polls of a 15 s copy
# cost about 3 CPU seconds on the bench machine). Each poll is its own short transaction.
wait_sub_true() {
  local t0 limit=${2:-3600} every=${3:-0.05} got
  t0=$(now)
  coproc SUBPOLL { psql -X -q -At -h "$BENCH_ROOT/$SUB" -p "$SPORT" -U postgres -d bench 2>/dev/null; }
  while :; do
    echo "$1;" >&"${SUBPOLL[1]}"
    read -r -t 60 got <&"${SUBPOLL[0]}" || got=""
    [ "$got" = t ] && break
    if awk -v a="$t0" -v b="$(now)" -v l="$limit" 'BEGIN { exit !(b - a > l) }'; then
      kill "$SUBPOLL_PID" 2>/dev/null
      die "$PEER: still waiting after ${limit}s for: $1"
    fi
    sleep "$every"
  done
  exec {SUBPOLL[1]}>&-
  wait "$SUBPOLL_PID" 2>/dev/null
  return 0
}

# pgbench with a lag probe: the provider inserts a heartbeat row every 23 ms (psql's \watch
# keeps its period exactly: at 20 ms, the period of ferry's ticker, every heartbeat came at
# the same moment of the tick cycle for a whole run and the lag depended on where that
# moment fell; 23 ms moves 3 ms along the cycle with each beat). Each heartbeat's lag is
# recorded on the subscriber (see lag_probe_install); its age is also sampled at random
# moments, 50 to 140 ms apart (a fixed period of samples fell on one phase of the heartbeat
# in the same way). Prints "tps lag_p50 lag_p99 age_p50 age_p99" (ms; the first 50 heartbeats
# and the first 30 samples are left out).
run_pgbench_lag() {
  local f=$BENCH_ROOT/$PEER.lag hb smp tps lag age
  lag_probe_install
  (echo "insert into hb (ts) values (clock_timestamp()) \\watch 0.023" \
     | psql -X -q -h "$BENCH_ROOT/$PROV" -p "$PPORT" -U postgres bench >/dev/null 2>&1) 2>/dev/null & hb=$!
  sleep 1
  (
    coproc LAGPOLL { psql -X -q -At -h "$BENCH_ROOT/$SUB" -p "$SPORT" -U postgres bench 2>/dev/null; }
    while :; do
      echo "select extract(epoch from clock_timestamp() - ts) * 1000 from hb order by id desc limit 1;" >&"${LAGPOLL[1]}"
      read -r -t 10 age <&"${LAGPOLL[0]}" || break
      echo "$age"
      sleep "0.$(printf '%03d' $((50 + RANDOM % 91)))"
    done > "$f"
  ) 2>/dev/null & smp=$!
  tps=$(run_pgbench)
  pkill -P "$smp" 2>/dev/null; pkill -P "$hb" 2>/dev/null; kill "$smp" "$hb" 2>/dev/null; wait "$smp" "$hb" 2>/dev/null
  lag=$(qs "select lag_ms from hb_seen where id > 50 order by id" | percentiles)
  age=$(grep -E '^-?[0-9.]+$' "$f" | tail -n +31 | percentiles)
  echo "$tps $lag $age"
}

# lag_probe_install: on the subscriber, a deferred constraint trigger (ENABLE ALWAYS: it fires
# whoever applies the row, at the commit that makes it visible) records for every heartbeat
# row the time from its insert on the provider until that commit: the commit-to-visible lag
# of each heartbeat (plus the provider's own commit). The heartbeat age the sampler reads
# (now minus the newest visible heartbeat) adds the heartbeat's own period, up to 23 ms.
lag_probe_install() {
  qs "set client_min_messages = warning;
      create table if not exists hb_seen (id bigserial primary key, lag_ms float8);
      truncate hb_seen;
      create or replace function public.hb_seen() returns trigger language plpgsql as \$\$
      begin
        insert into public.hb_seen (lag_ms) values (extract(epoch from pg_catalog.clock_timestamp() - new.ts) * 1000);
        return null;
      end \$\$;
      drop trigger if exists hb_seen on hb;
      create constraint trigger hb_seen after insert on hb deferrable initially deferred
        for each row execute procedure hb_seen();
      alter table hb enable always trigger hb_seen;" >/dev/null
}

# percentiles: "p50 p99" of the numbers on stdin, one a line ("null null" when none)
percentiles() {
  sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print "null null"; else printf "%.1f %.1f\n", a[int(NR * 0.5) + 1], a[int(NR * 0.99) + 1] }'
}

# Memory sampler: every 0.2 s, the resident memory of the pid that `peer_replay_pid` prints,
# without shared memory (a PostgreSQL worker's shared buffers are not its own), kept as the
# peak in $BENCH_ROOT/$PEER.rss (kB).
rss_sampler_start() {
  echo 0 > "$BENCH_ROOT/$PEER.rss"
  (
    peak=0
    while :; do
      pid=$(peer_replay_pid 2>/dev/null)
      if [ -n "$pid" ] && [ -r "/proc/$pid/status" ]; then
        kb=$(awk '/^VmRSS:/ { r = $2 } /^RssShmem:/ { s = $2 } END { print r - s }' "/proc/$pid/status" 2>/dev/null)
        if [ -n "$kb" ] && [ "$kb" -gt "$peak" ]; then peak=$kb; echo "$peak" > "$BENCH_ROOT/$PEER.rss"; fi
      fi
      sleep 0.2
    done
  ) & RSS_SAMPLER=$!
}
rss_sampler_stop() { kill "$RSS_SAMPLER" 2>/dev/null; wait "$RSS_SAMPLER" 2>/dev/null; cat "$BENCH_ROOT/$PEER.rss"; }

# history_count: transactions so far (one pgbench_history row each)
history_count() { qp "select count(*) from pgbench_history"; }

# CPU seconds every process on the machine has used so far (user, nice, system, irq, softirq,
# steal from /proc/stat): the cost of a phase is the difference, whoever spent it (provider
# backends, ticker or walsender, replay or apply worker, subscriber backends, pgbench).
cpu_seconds() {
  awk -v hz="$(getconf CLK_TCK)" '/^cpu / { printf "%.3f\n", ($2 + $3 + $4 + $7 + $8 + $9) / hz }' /proc/stat
}
# the provider's WAL position, in bytes
wal_bytes() { qp "select pg_current_wal_lsn() - '0/0'::pg_lsn"; }

# run_fixed_rate [CONVERGE]: after a VACUUM ANALYZE and a CHECKPOINT on both sides (without
# them autovacuum's work on the earlier phases' dead rows fell into this one, at random),
# pgbench at RATE transactions/s for SECS seconds; with CONVERGE,
# until the subscriber has them all (the bench's own polling for it not counted). Prints "transactions cpu_seconds wal_bytes" of the phase
# and, with CONVERGE, the CPU seconds of the provider's replication backends, of the
# subscriber cluster and of the peer's daemons (see breakdown_pids).
run_fixed_rate() {
  local c0 w0 h0 h1 c1 w1 r0 s0 d0 split=""
  # every run starts the phase from the same state: the vacuum debt of the earlier phases
  # (a backlog of tens of thousands of transactions) paid, and a checkpoint just done
  qp "vacuum analyze" && qs "vacuum analyze" && qp "checkpoint" && qs "checkpoint" || die "vacuum before the fixed rate"
  [ -n "${1:-}" ] && breakdown_pids
  h0=$(history_count); w0=$(wal_bytes); c0=$(cpu_seconds)
  if [ -n "${1:-}" ]; then r0=$(pids_cpu $REPL_PIDS); s0=$(pids_cpu $SUB_PIDS); d0=$(pids_cpu $DAEMON_PIDS); fi
  pgbench -n -R "$RATE" -c "$CLIENTS" -j 2 -T "$SECS" -h "$BENCH_ROOT/$PROV" -p "$PPORT" -U postgres bench >/dev/null 2>&1
  local polled=0 secs
  if [ -n "${1:-}" ]; then
    # what replication still does once the load stops counts, the bench's own polling of the
    # subscriber (a psql every 10 ms, longer for a peer with more lag) does not
    read -r secs polled <<< "$(polled_converge)"
    split=$(awk -v r0="$r0" -v r1="$(pids_cpu $REPL_PIDS)" -v s0="$s0" -v s1="$(pids_cpu $SUB_PIDS)" \
                -v d0="$d0" -v d1="$(pids_cpu $DAEMON_PIDS)" \
                'BEGIN { printf " %.3f %.3f %.3f", r1 - r0, s1 - s0, d1 - d0 }')
  fi
  c1=$(cpu_seconds); w1=$(wal_bytes); h1=$(history_count)
  echo "$((h1 - h0)) $(awk -v a="$c0" -v b="$c1" -v p="$polled" 'BEGIN { printf "%.3f", b - a - p }') $((w1 - w0))$split"
}

# polled_converge [MAX_S]: converge, then the CPU seconds its polling took (the psql processes
# it ran: children of this subshell, waited for); prints "seconds polling_cpu_seconds".
polled_converge() {
  converge "$@"
  awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); printf " %.3f\n", ($14 + $15) / hz }' "/proc/$BASHPID/stat"
}

# converge_accounts: waits until the subscriber's pgbench_accounts has the provider's sum of
# abalance (polled every 50 ms); prints the seconds it took.
converge_accounts() {
  local t0 want got
  t0=$(now)
  want=$(qp "select sum(abalance) from pgbench_accounts")
  while :; do
    got=$(qs "select sum(abalance) from pgbench_accounts")
    [ "$got" = "$want" ] && break
    if awk -v a="$t0" -v b="$(now)" 'BEGIN { exit !(b - a > 900) }'; then die "$PEER: accounts did not converge"; fi
    sleep 0.05
  done
  since "$t0"
}

# run_bulk [WAIT]: one UPDATE of every pgbench_accounts row, then one INSERT ... SELECT of
# 1 000 000 pgbench_history rows; for each the statement's seconds (capture included), the
# WAL bytes it wrote and, with WAIT, the seconds from its commit until the subscriber has it.
# Prints "update_s update_wal update_visible_s insert_s insert_wal insert_visible_s".
run_bulk() {
  local w0 t0 us uw uv is iw iv
  w0=$(wal_bytes); t0=$(now)
  qp "update pgbench_accounts set abalance = abalance + 1" >/dev/null
  us=$(since "$t0"); uw=$(( $(wal_bytes) - w0 ))
  uv=null; [ -n "${1:-}" ] && uv=$(converge_accounts)
  w0=$(wal_bytes); t0=$(now)
  qp "insert into pgbench_history (tid, bid, aid, delta, mtime)
      select 1 + i % 10, 1, i, 1, now() from generate_series(1, 1000000) i" >/dev/null
  is=$(since "$t0"); iw=$(( $(wal_bytes) - w0 ))
  iv=null; [ -n "${1:-}" ] && iv=$(converge)
  echo "$us $uw $uv $is $iw $iv"
}

# CPU seconds used so far by the processes PID... (one gone counts as nothing).
pids_cpu() {
  local hz; hz=$(getconf CLK_TCK)
  for p in "$@"; do cat "/proc/$p/stat" 2>/dev/null; done \
    | awk -v hz="$hz" '{ sub(/.*\) /, ""); s += $12 + $13 } END { printf "%.3f", s / hz }'
}
# The processes of a phase's CPU breakdown, sampled before it starts (all of them live through
# it): the provider's client backends and walsenders (none are the writers yet: those are
# pgbench's, started after), every process of the subscriber cluster, and the peer's own
# daemons. Sets REPL_PIDS, SUB_PIDS, DAEMON_PIDS.
breakdown_pids() {
  REPL_PIDS=$(qp "select pid from pg_stat_activity where backend_type in ('client backend', 'walsender') and pid <> pg_backend_pid()" | tr '\n' ' ')
  SUB_PIDS=$(pgrep -P "$(head -1 "$BENCH_ROOT/$SUB/data/postmaster.pid")" | tr '\n' ' ')
  DAEMON_PIDS=$(peer_daemon_pids 2>/dev/null | tr '\n' ' ')
}
