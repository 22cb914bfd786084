//! Changing who is the provider: `switchover` with both servers up.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::replication::{
    assert_write_refused, run, wait_identical, wait_tables_ok, Pair, WriteLoad, SCHEMA, SEED_DATA,
    TABLES,
};
use common::{ferry, KillDaemonOnDrop};

/// Writes `[londiste]` for the reversed direction: `provider` to `subscriber`, the same
/// job_name and queue, its own log and pid files.
fn reversed_ini(pair: &Pair, name: &str, provider: &str, subscriber: &str) -> std::path::PathBuf {
    let path = pair.dir.path().join(format!("{name}.ini"));
    std::fs::write(
        &path,
        format!(
            "[londiste]\njob_name = test-londiste\nprovider_db = {provider}\nsubscriber_db = {subscriber}\n\
             pgq_queue_name = test-queue\nloop_delay = 0.2\n\
             logfile = {name}.log\npidfile = {name}.pid\n"
        ),
    )
    .unwrap();
    path
}

/// Under a write load that follows the provider: a switchover (the replay daemon stopped by
/// the command, writes on the old provider refused with the guard's error, the downtime
/// reported and under 2 s), the old provider replicating from the new one with no copy, both
/// identical; then back again, identical again. Refused with nothing changed: a switchover
/// while a table is copying, and one while another is in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_and_back_under_load() {
    let pair = Pair::new("switchover", SCHEMA, Some(SCHEMA)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let (p, s) = (
        pair.provider.conninfo.clone(),
        pair.subscriber.conninfo.clone(),
    );
    let reverse = reversed_ini(&pair, "reverse", &s, &p);
    let ticker_s = pair.dir.path().join("ticker_s.ini");
    std::fs::write(
        &ticker_s,
        format!(
            "[pgqadm]\njob_name = ticker-s\ndb = {s}\nloop_delay = 0.05\nmaint_delay = 600\n\
             logfile = %(job_name)s.log\npidfile = %(job_name)s.pid\n"
        ),
    )
    .unwrap();
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
        KillDaemonOnDrop(reverse.clone()),
        KillDaemonOnDrop(ticker_s.clone()),
    ];
    let provider = ferry_testkit::connect(&p).await;
    let subscriber = ferry_testkit::connect(&s).await;
    provider.batch_execute(SEED_DATA).await.unwrap();
    pair.install_and_start_ticker();
    pair.add_everything();
    let config = londiste.to_str().unwrap();

    // refused while tables copy (replay has not run yet): nothing changes
    let out = ferry(&[config, "switchover"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("switchover refused, nothing changed: table public.table1 is in-copy"),
        "{stderr}"
    );
    run(&londiste, &["replay", "-d"]);
    wait_tables_ok(&londiste, Duration::from_secs(120), || pair.replay_log());

    // refused while another switchover holds its lock
    let holder = ferry_testkit::connect(&s).await;
    holder
        .batch_execute("select pg_advisory_lock(439788663417)")
        .await
        .unwrap();
    let out = ferry(&[config, "switchover"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another switchover is in progress"),
        "{stderr}"
    );
    drop(holder);
    run(&londiste, &["replay", "-d"]);
    run(&londiste, &["wait-sync", "--timeout", "60"]);

    let target = Arc::new(Mutex::new(p.clone()));
    let load = WriteLoad::start_on(target.clone(), 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = load.committed();
    let report: serde_json::Value =
        serde_json::from_str(&run(&londiste, &["switchover", "--json"])).unwrap();
    *target.lock().unwrap() = s.clone();
    let downtime = report["downtime_ms"].as_f64().unwrap();
    eprintln!("switchover: writes refused for {downtime:.0} ms");
    assert!(downtime < 2000.0, "writes refused for {downtime} ms");
    assert!(before > 0);
    // the old provider is a replica now; the new one takes writes
    assert_write_refused(&provider, "update table4 set counter = 0").await;
    subscriber
        .batch_execute("update table4 set counter = counter + 1 where code = 'code1'")
        .await
        .unwrap();
    run(&ticker_s, &["ticker", "-d"]);
    run(&reverse, &["replay", "-d"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let moved = load.committed();
    assert!(
        moved > before,
        "no transaction committed on the new provider"
    );
    run(&reverse, &["wait-sync", "--timeout", "60"]);
    let tables = run(&reverse, &["subscriber", "tables"]);
    assert!(
        tables.lines().skip(1).all(|l| l.ends_with(" ok")),
        "copied again? {tables}"
    );

    // and back, under the same load
    let report: serde_json::Value =
        serde_json::from_str(&run(&reverse, &["switchover", "--json"])).unwrap();
    *target.lock().unwrap() = p.clone();
    assert!(report["downtime_ms"].as_f64().unwrap() < 2000.0, "{report}");
    assert_write_refused(&subscriber, "update table4 set counter = 0").await;
    run(&londiste, &["replay", "-d"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let committed = load.stop().await;
    assert!(committed > moved);
    run(&londiste, &["wait-sync", "--timeout", "60"]);
    wait_identical(&p, &s, TABLES, Duration::from_secs(60), || {
        pair.replay_log()
    })
    .await;
    common::replication::assert_sequences_caught_up(
        &p,
        &s,
        &["table1_id_seq", "table3_id_seq", "extra_seq"],
    )
    .await;
}
