# Peer: PostgreSQL's native logical replication (a publication for all tables, a subscription
# with its defaults). Sourced by bench/run after lib.sh.

peer_setup() { qp "create publication bench_pub for all tables"; }
peer_start_copy() {
  qs "create subscription bench_sub connection '$(pconn)' publication bench_pub" 2>&1 | grep -v NOTICE
}
peer_wait_copied() {
  wait_sub_true "select count(*) > 0 and count(*) filter (where srsubstate = 'r') = count(*) from pg_subscription_rel"
}
peer_stop_replay() { qs "alter subscription bench_sub disable"; sleep 1; }
peer_start_replay() { qs "alter subscription bench_sub enable"; }
# the subscription's apply worker
peer_replay_pid() { qs "select pid from pg_stat_subscription where subname = 'bench_sub' and relid is null and pid is not null limit 1"; }
peer_teardown() { qs "drop subscription if exists bench_sub" >/dev/null 2>&1; return 0; }
# none: the walsender is a provider backend, the apply worker a subscriber process
peer_daemon_pids() { :; }
