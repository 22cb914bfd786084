//! Replication end to end, on real clusters: the seed's Londiste walk-through command for
//! command, replay killed at random moments, a second subscriber, and the refusals.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::replication::{
    assert_sequences_caught_up, run, wait_all_ok, wait_identical, Pair, WriteLoad, SCHEMA,
    SEED_DATA, TABLES,
};
use common::{ferry, ferry_bin, ChildProcess, KillDaemonOnDrop};
use ferry_testkit::Cluster;
use rand::Rng;

/// `pg_dump -s PROVIDER | psql SUBSCRIBER`, as the seed restores the schema on the slave.
fn restore_schema(pair: &Pair) {
    let bindir = Cluster::shared().bindir();
    let dump = Command::new(bindir.join("pg_dump"))
        .args(["-s", "-d", &pair.provider.conninfo])
        .output()
        .expect("pg_dump runs");
    assert!(
        dump.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let mut psql = Command::new(bindir.join("psql"))
        .args([
            "-q",
            "-v",
            "ON_ERROR_STOP=0",
            "-d",
            &pair.subscriber.conninfo,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql runs");
    use std::io::Write;
    psql.stdin
        .take()
        .unwrap()
        .write_all(&dump.stdout)
        .expect("feed psql");
    assert!(psql.wait().unwrap().success());
}

/// The walk-through of seeds/004, with `ferry` for pgqadm.py and londiste.py, while an
/// application writes from before `add` until after every table is ok.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_walk_through_under_load() {
    let pair = Pair::new("walk", &format!("{SCHEMA}{SEED_DATA}"), None).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop_ticker = KillDaemonOnDrop(ticker.clone());
    let _stop_replay = KillDaemonOnDrop(londiste.clone());

    // 1.3 install the queue and start the ticker
    run(&ticker, &["install"]);
    run(&ticker, &["ticker", "-d"]);
    // 2.1 make sure replay is not running
    common::ferry_ok(&["-s", londiste.to_str().unwrap()]);
    // 2.2 the subscriber's schema from the provider's
    restore_schema(&pair);
    // 2.4 install on both sides
    run(&londiste, &["provider", "install"]);
    run(&londiste, &["subscriber", "install"]);
    // 2.5 replay, idle for now
    run(&londiste, &["replay", "-d"]);

    let load = WriteLoad::start(&pair.provider.conninfo, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // 2.6 and 2.7
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["provider", "add-seq", "--all"]);
    run(&londiste, &["subscriber", "add-seq", "--all"]);
    // 2.8 the shell loop of the seed, polled faster
    let shown = run(&londiste, &["subscriber", "tables"]);
    assert!(shown.starts_with("Table State\n"), "{shown}");
    for table in TABLES {
        assert!(shown.contains(&format!("public.{table} ")), "{shown}");
    }
    wait_all_ok(&londiste, Duration::from_secs(120), || pair.replay_log());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let committed = load.stop().await;
    assert!(
        committed > 100,
        "the load committed only {committed} transactions"
    );

    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        TABLES,
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    assert_sequences_caught_up(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["table1_id_seq", "table3_id_seq", "extra_seq"],
    )
    .await;
    let stopped = common::ferry_ok(&["-s", londiste.to_str().unwrap()]);
    assert!(stopped.contains("stopped"), "{stopped}");
    common::ferry_ok(&["-s", ticker.to_str().unwrap()]);
    assert!(
        !pair.replay_log().contains("ERROR"),
        "replay logged errors:\n{}",
        pair.replay_log()
    );
}

/// Replay SIGKILLed at random moments, 20 times, during copies and during batches, while the
/// application writes; tables are sent back to copy in between. Both sides end identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_killed_at_random_moments() {
    let pair = Pair::new("kill", &format!("{SCHEMA}{SEED_DATA}"), Some(SCHEMA)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop_ticker = KillDaemonOnDrop(ticker.clone());
    run(&ticker, &["install"]);
    run(&ticker, &["ticker", "-d"]);
    run(&londiste, &["provider", "install"]);
    run(&londiste, &["subscriber", "install"]);
    let load = WriteLoad::start(&pair.provider.conninfo, 2).await;
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["provider", "add-seq", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["subscriber", "add-seq", "--all"]);

    let spawn = || {
        ChildProcess::from(
            Command::new(ferry_bin())
                .args([londiste.to_str().unwrap(), "replay", "-q"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("replay starts"),
        )
    };
    for round in 0..20 {
        let mut replay = spawn();
        let wait = rand::rng().random_range(100..1200);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        common::kill(&mut replay);
        if round % 5 == 2 {
            // a copy again, to be killed in turn
            run(&londiste, &["subscriber", "resync", "table1", "table3"]);
        }
    }
    let _replay = spawn();
    wait_all_ok(&londiste, Duration::from_secs(120), || pair.replay_log());
    let committed = load.stop().await;
    assert!(
        committed > 100,
        "the load committed only {committed} transactions"
    );
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        TABLES,
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    assert_sequences_caught_up(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["table1_id_seq", "table3_id_seq", "extra_seq"],
    )
    .await;
}

/// A second subscriber with its own job_name joins the queue under load, while the first
/// keeps replicating: both end identical to the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_subscriber_added_under_load() {
    let pair = Pair::new("second", &format!("{SCHEMA}{SEED_DATA}"), Some(SCHEMA)).await;
    let second = Cluster::shared().database("second_s2").await;
    ferry_testkit::connect(&second.conninfo)
        .await
        .batch_execute(SCHEMA)
        .await
        .unwrap();
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let londiste2 = pair.dir.path().join("londiste2.ini");
    pair.write_londiste_ini(&londiste2, "test-londiste-2", &second);
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
        KillDaemonOnDrop(londiste2.clone()),
    ];
    run(&ticker, &["install"]);
    run(&ticker, &["ticker", "-d"]);
    run(&londiste, &["provider", "install"]);
    run(&londiste, &["subscriber", "install"]);
    run(&londiste, &["replay", "-d"]);
    let load = WriteLoad::start(&pair.provider.conninfo, 2).await;
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    wait_all_ok(&londiste, Duration::from_secs(120), || pair.replay_log());

    // the second one arrives later, with everything running
    run(&londiste2, &["subscriber", "install"]);
    run(&londiste2, &["replay", "-d"]);
    run(&londiste2, &["subscriber", "add", "--all"]);
    let log2 =
        || std::fs::read_to_string(pair.dir.path().join("test-londiste-2.log")).unwrap_or_default();
    wait_all_ok(&londiste2, Duration::from_secs(120), log2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop().await;
    for (subscriber, log) in [(&pair.subscriber, pair.replay_log()), (&second, log2())] {
        wait_identical(
            &pair.provider.conninfo,
            &subscriber.conninfo,
            TABLES,
            Duration::from_secs(60),
            || log.clone(),
        )
        .await;
    }
    let status = run(&ticker, &["status"]);
    assert!(status.contains("test-londiste-2"), "{status}");
}

/// What must be refused, with a message saying what to do: a table without primary key on
/// the provider, a write on a replicated subscriber table, a table missing on the subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_say_what_to_do() {
    let schema = "create table keyed (id int primary key, v text); create table loose (v text);";
    let pair = Pair::new(
        "refuse",
        schema,
        Some("create table keyed (id int primary key, v text);"),
    )
    .await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    run(&ticker, &["install"]);
    run(&londiste, &["provider", "install"]);
    run(&londiste, &["subscriber", "install"]);

    let out = ferry(&[londiste.to_str().unwrap(), "provider", "add", "loose"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("public.loose has no primary key"), "{err}");
    assert!(err.contains("ADD PRIMARY KEY"), "{err}");
    assert!(!run(&londiste, &["provider", "tables"]).contains("loose"));

    // not on the provider yet
    let out = ferry(&[londiste.to_str().unwrap(), "subscriber", "add", "keyed"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("provider add"));

    run(&londiste, &["provider", "add", "keyed"]);
    run(&londiste, &["subscriber", "add", "keyed"]);
    let sub = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    for write in [
        "insert into keyed values (1, 'x')",
        "update keyed set v = 'y'",
        "delete from keyed",
        "truncate keyed",
    ] {
        let err = sub.batch_execute(write).await.expect_err(write);
        let db = err.as_db_error().expect("a database error");
        assert!(
            db.message().contains("only ferry replay may change it"),
            "{write}: {db:?}"
        );
    }

    // a table the subscriber lacks: an error naming it, unless --create
    ferry_testkit::connect(&pair.provider.conninfo)
        .await
        .batch_execute("create type mood as enum ('sad', 'ok'); create table made (id bigserial primary key, n numeric(10,2) not null default 1.5, m text[], g int generated always as (id * 2) stored)")
        .await
        .unwrap();
    run(&londiste, &["provider", "add", "made"]);
    let out = ferry(&[londiste.to_str().unwrap(), "subscriber", "add", "made"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist on the subscriber"));
    run(&londiste, &["subscriber", "add", "made", "--create"]);
    assert_eq!(
        run(&londiste, &["subscriber", "check"]).trim(),
        "ok: every replicated table matches the provider"
    );

    // a column the subscriber lacks: named
    ferry_testkit::connect(&pair.provider.conninfo)
        .await
        .batch_execute("alter table keyed add column extra int")
        .await
        .unwrap();
    let out = ferry(&[londiste.to_str().unwrap(), "subscriber", "check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("column \"extra\" of table public.keyed is missing"));
}
