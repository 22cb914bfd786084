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

/// Writes a `[pgqadm]` config ticking `db` as `job_name`.
fn ticker_ini(pair: &Pair, job_name: &str, db: &str) -> std::path::PathBuf {
    let path = pair.dir.path().join(format!("{job_name}.ini"));
    std::fs::write(
        &path,
        format!(
            "[pgqadm]\njob_name = {job_name}\ndb = {db}\nloop_delay = 0.05\nmaint_delay = 600\n\
             logfile = %(job_name)s.log\npidfile = %(job_name)s.pid\n"
        ),
    )
    .unwrap();
    path
}

/// A second subscriber database on the shared cluster with `schema`, and its `[londiste]`
/// config (job `test-londiste2`).
async fn second_subscriber(
    pair: &Pair,
    name: &str,
    schema: &str,
) -> (ferry_testkit::TestDb, std::path::PathBuf) {
    let second = ferry_testkit::Cluster::shared().database(name).await;
    ferry_testkit::connect(&second.conninfo)
        .await
        .batch_execute(schema)
        .await
        .unwrap();
    let config = pair.dir.path().join("londiste2.ini");
    pair.write_londiste_ini(&config, "test-londiste2", &second);
    (second, config)
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
    let ticker_s = ticker_ini(&pair, "ticker-s", &s);
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
    // a table captured per row stays so on the node that captures next
    run(
        &londiste,
        &["provider", "add", "--capture", "row", "table1"],
    );
    let config = londiste.to_str().unwrap();
    // a second subscriber, which moves along with every switchover
    let (second, londiste2) = second_subscriber(&pair, "switchover_s2", SCHEMA).await;
    let s2 = second.conninfo.clone();
    let _stop2 = KillDaemonOnDrop(londiste2.clone());
    run(&londiste2, &["subscriber", "install"]);
    run(&londiste2, &["subscriber", "add", "--all"]);
    run(&londiste2, &["subscriber", "add-seq", "--all"]);
    run(&londiste2, &["replay", "-d"]);

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
    wait_tables_ok(&londiste2, Duration::from_secs(120), || pair.replay_log());

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
    // refused switchovers changed nothing: replay still runs
    run(&londiste, &["wait-sync", "--timeout", "60"]);

    let states_before: String = ferry_testkit::connect(&s2)
        .await
        .query_one(
            "select max(state_changed)::text from ferry.subscriber_table",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let target = Arc::new(Mutex::new(p.clone()));
    let load = WriteLoad::start_on(target.clone(), 6).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (started, at_start) = (std::time::Instant::now(), load.committed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = load.committed();
    let rate = (before - at_start) as f64 / started.elapsed().as_secs_f64();
    let report: serde_json::Value =
        serde_json::from_str(&run(&londiste, &["switchover", "--json"])).unwrap();
    *target.lock().unwrap() = s.clone();
    assert_eq!(
        report["moved"],
        serde_json::json!(["test-londiste2"]),
        "{report}"
    );
    let downtime = report["downtime_ms"].as_f64().unwrap();
    eprintln!("switchover: writes refused for {downtime:.0} ms, load {rate:.0} transactions/s");
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
    // the second subscriber follows the provider by itself, with its config unchanged
    run(&londiste2, &["wait-sync", "--timeout", "60"]);
    // identical in the new direction (meanwhile the load writes to the old provider, which
    // refuses every write: nothing commits anywhere)
    let paused = target.lock().unwrap().clone();
    *target.lock().unwrap() = p.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    run(&reverse, &["wait-sync", "--timeout", "60"]);
    run(&londiste2, &["wait-sync", "--timeout", "60"]);
    for other in [&p, &s2] {
        wait_identical(&s, other, TABLES, Duration::from_secs(60), || {
            pair.replay_log()
        })
        .await;
    }
    *target.lock().unwrap() = paused;
    for config in [&reverse, &londiste2] {
        let tables = run(config, &["subscriber", "tables"]);
        assert!(
            tables.lines().skip(1).all(|l| l.ends_with(" ok")),
            "copied again? {tables}"
        );
    }
    let status = run(&londiste2, &["status"]);
    assert!(status.contains("provider moved to"), "{status}");
    for (table, mode) in [("table1", "row"), ("table2", "statement")] {
        let installed: String = subscriber
            .query_one(
                "select ferry.installed_capture_mode('test-queue', $1::text::regclass)",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(installed, mode, "{table} on the new provider");
    }

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
    run(&londiste2, &["wait-sync", "--timeout", "60"]);
    for other in [&s, &s2] {
        wait_identical(&p, other, TABLES, Duration::from_secs(60), || {
            pair.replay_log()
        })
        .await;
    }
    // no table was copied again anywhere: the second subscriber's states never changed, and
    // the old provider took its tables on without a copy
    let changed: String = ferry_testkit::connect(&s2)
        .await
        .query_one(
            "select max(state_changed)::text from ferry.subscriber_table",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(changed, states_before);
    let copied: i64 = subscriber
        .query_one(
            "select count(*) from ferry.subscriber_table where copied_rows is not null",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        copied, 0,
        "the old subscriber's tables were copied when it became one again"
    );
    common::replication::assert_sequences_caught_up(
        &p,
        &s,
        &["table1_id_seq", "table3_id_seq", "extra_seq"],
    )
    .await;
}

/// The provider killed (immediate stop) under load, with one subscriber paused behind the
/// other: failover refused while the provider answers and while the other subscriber is
/// ahead, then forced (the one ahead repaired to the new provider's rows, no copy); the load
/// goes on on the new provider and the other subscriber follows by itself; the old provider
/// started again and rejoined: exactly the transactions it committed that the new provider
/// never got are in the lost-transactions file, and every node ends identical. A rejoin of a
/// node that was never the provider is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_and_rejoin_under_load() {
    let provider_cluster = ferry_testkit::Cluster::start().expect("provider cluster");
    let marks = "create table marks (n int primary key);";
    let schema = format!("{SCHEMA}{marks}");
    let pair = Pair::on_clusters(
        "failover",
        &schema,
        Some(&schema),
        &provider_cluster,
        ferry_testkit::Cluster::shared(),
    )
    .await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let (p, s) = (
        pair.provider.conninfo.clone(),
        pair.subscriber.conninfo.clone(),
    );
    let (second, londiste2) = second_subscriber(&pair, "failover_s2", &schema).await;
    let s2 = second.conninfo.clone();
    let rejoin = reversed_ini(&pair, "rejoin", &s, &p);
    let never = reversed_ini(&pair, "never", &s, &s2);
    let ticker_s = ticker_ini(&pair, "ticker-s", &s);
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
        KillDaemonOnDrop(londiste2.clone()),
        KillDaemonOnDrop(rejoin.clone()),
        KillDaemonOnDrop(ticker_s.clone()),
    ];
    ferry_testkit::connect(&p)
        .await
        .batch_execute(SEED_DATA)
        .await
        .unwrap();
    pair.install_and_start_ticker();
    pair.add_everything();
    run(&londiste2, &["subscriber", "install"]);
    run(&londiste2, &["subscriber", "add", "--all"]);
    run(&londiste2, &["subscriber", "add-seq", "--all"]);
    run(&londiste, &["replay", "-d"]);
    run(&londiste2, &["replay", "-d"]);
    wait_tables_ok(&londiste, Duration::from_secs(120), || pair.replay_log());
    wait_tables_ok(&londiste2, Duration::from_secs(120), || pair.replay_log());
    let config = londiste.to_str().unwrap();

    let target = Arc::new(Mutex::new(p.clone()));
    let load = WriteLoad::start_on(target.clone(), 2).await;
    // marks committed durably, one per transaction: the test knows exactly which exist
    let marker = ferry_testkit::connect(&p).await;
    marker
        .batch_execute("set synchronous_commit = on")
        .await
        .unwrap();
    let mark = |from: i32, to: i32| {
        let marker = &marker;
        async move {
            for n in from..=to {
                marker
                    .execute("insert into marks values ($1)", &[&n])
                    .await
                    .unwrap();
            }
        }
    };
    mark(1, 100).await;
    run(&londiste, &["wait-sync", "--timeout", "60"]);
    run(&londiste2, &["wait-sync", "--timeout", "60"]);

    // refused while the provider answers
    let out = ferry(&[config, "failover"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("failover refused, nothing changed: the provider answers"),
        "{stderr}"
    );

    // the first subscriber falls behind the second, then the provider dies
    run(&londiste, &["pause"]);
    pair.wait_for_replay_line(&["replay paused"], Duration::from_secs(10))
        .await;
    mark(101, 200).await;
    run(&londiste2, &["wait-sync", "--timeout", "60"]);
    provider_cluster
        .stop(ferry_testkit::StopMode::Immediate)
        .unwrap();

    // status, with the provider gone, says how much each subscriber has applied
    let status: serde_json::Value =
        serde_json::from_str(&run(&londiste, &["status", "--json"])).unwrap();
    assert_eq!(status["provider_reachable"], false, "{status}");
    let peer = &status["peers"][0];
    assert_eq!(peer["consumer"], "test-londiste2", "{status}");
    assert!(
        peer["applied_tick"].as_i64().unwrap() > status["applied_tick"].as_i64().unwrap(),
        "{status}"
    );
    let out = ferry(&[config, "failover"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("subscriber \"test-londiste2\" has applied more"),
        "{stderr}"
    );
    let failed_over = run(&londiste, &["failover", "--force"]);
    assert!(
        failed_over.contains("failed over: this node captures"),
        "{failed_over}"
    );
    for n in [101, 150, 200] {
        assert!(
            failed_over.contains(&format!(
                "test-londiste2: public.marks n={n} extra (repaired)"
            )),
            "{failed_over}"
        );
    }
    *target.lock().unwrap() = s.clone();
    run(&ticker_s, &["ticker", "-d"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let on_new = load.committed();

    // the old provider comes back; a node that never was one cannot rejoin
    provider_cluster.restart().unwrap();
    let out = ferry(&[
        never.to_str().unwrap(),
        "rejoin",
        "--lost-file",
        "/dev/null",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("was never the provider"), "{stderr}");
    let lost_file = pair.dir.path().join("lost.jsonl");
    let rejoined = run(
        &rejoin,
        &["rejoin", "--lost-file", lost_file.to_str().unwrap()],
    );
    assert!(rejoined.contains("rejoined as a subscriber"), "{rejoined}");
    let lost: Vec<serde_json::Value> = std::fs::read_to_string(&lost_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut lost_marks: Vec<i64> = lost
        .iter()
        .filter(|l| l["table"] == r#""public"."marks""# && l["change"] == "insert")
        .map(|l| l["row"]["n"].as_i64().unwrap())
        .collect();
    lost_marks.sort();
    assert_eq!(lost_marks, (101..=200).collect::<Vec<i64>>());
    run(&rejoin, &["replay", "-d"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let committed = load.stop().await;
    assert!(
        committed > on_new,
        "the load did not go on on the new provider"
    );
    run(&rejoin, &["wait-sync", "--timeout", "60"]);
    run(&londiste2, &["wait-sync", "--timeout", "60"]);
    let mut all: Vec<&str> = TABLES.to_vec();
    all.push("marks");
    for other in [&p, &s2] {
        wait_identical(&s, other, &all, Duration::from_secs(60), || {
            pair.replay_log()
        })
        .await;
    }
    let marks_now: i64 = ferry_testkit::connect(&p)
        .await
        .query_one("select count(*) from marks", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(marks_now, 100, "the lost marks were applied after all");
}
