//! The queue's guarantees, end to end on a real cluster with the real ticker binary:
//! exactly-once delivery under concurrency, rollbacks and long transactions; independent
//! consumers; rotation that waits for the slowest consumer; a ticker killed mid-load.

mod common;

use std::time::Duration;

use common::*;
use rand::Rng;

const QUEUE: &str = "q";

/// Runs `writers` concurrent writers, each committing (or, about one in ten, rolling back)
/// transactions of 1..=50 events until it has tried `per_writer` events. Returns the
/// payloads of committed transactions.
async fn run_writers(conninfo: String, writers: usize, per_writer: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = ferry_testkit::connect(&conninfo).await;
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            let mut n = 0;
            while n < per_writer {
                let (size, commit) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(1..=50).min(per_writer - n),
                        rng.random_ratio(9, 10),
                    )
                };
                let payloads: Vec<String> = (n..n + size).map(|i| format!("w{w}-{i}")).collect();
                insert_events(&mut client, QUEUE, &payloads, commit).await;
                if commit {
                    committed.extend(payloads);
                }
                n += size;
            }
            committed
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("writer"));
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_with_concurrent_writers_rollbacks_and_a_long_transaction() {
    let setup = Setup::new("exactly_once").await;
    setup.queue_with_consumers(QUEUE, &["c1"]);
    let _ticker = setup.spawn_ticker();

    // the long transaction: opened first, held across several ticks while the load runs
    let mut long_client = setup.connect().await;
    let observer = setup.connect().await;
    let long_tx = long_client.transaction().await.unwrap();
    let first_half: Vec<String> = (0..100).map(|i| format!("long-{i}")).collect();
    long_tx
        .query_one(
            r#"select count("ferry"."insert_event"($1, 'test', x)) from unnest($2::text[]) as x"#,
            &[&QUEUE, &first_half],
        )
        .await
        .unwrap();
    let tick_at_open = last_tick(&observer, QUEUE).await;

    // 8 writers, 12 500 attempted events each: 100 000 in all
    let writers = tokio::spawn(run_writers(setup.db.conninfo.clone(), 8, 12_500));

    // consume while the load runs
    let mut consumer = setup.connect().await;
    let mut received = Received::default();
    wait_for_tick(&observer, QUEUE, tick_at_open + 3, Duration::from_secs(30)).await;
    while received.batches < 3 {
        if !consume_one_batch(&mut consumer, QUEUE, "c1", None, &mut received).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        !received.count.keys().any(|p| p.starts_with("long-")),
        "events of an open transaction were delivered"
    );
    let second_half: Vec<String> = (100..200).map(|i| format!("long-{i}")).collect();
    long_tx
        .query_one(
            r#"select count("ferry"."insert_event"($1, 'test', x)) from unnest($2::text[]) as x"#,
            &[&QUEUE, &second_half],
        )
        .await
        .unwrap();
    long_tx.commit().await.unwrap();

    let mut expected = writers.await.unwrap();
    assert!(
        expected.len() >= 80_000,
        "too few committed events: {}",
        expected.len()
    );
    expected.extend(first_half.iter().cloned());
    expected.extend(second_half.iter().cloned());
    consume_until_complete(
        &mut consumer,
        QUEUE,
        "c1",
        &expected,
        &mut received,
        Duration::from_secs(240),
    )
    .await;

    let long_batches: std::collections::HashSet<i64> = first_half
        .iter()
        .chain(&second_half)
        .map(|p| received.batch_of[p])
        .collect();
    assert_eq!(
        long_batches.len(),
        1,
        "the long transaction was split over batches {long_batches:?}"
    );
    assert!(
        received.batches > 3,
        "expected many batches, got {}",
        received.batches
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_at_different_speeds_each_get_every_event_once() {
    let setup = Setup::new("two_consumers").await;
    setup.queue_with_consumers(QUEUE, &["fast", "slow"]);
    let _ticker = setup.spawn_ticker();

    let load = run_writers(setup.db.conninfo.clone(), 4, 5_000);
    let mut fast_client = setup.connect().await;
    let mut slow_client = setup.connect().await;
    let fast = tokio::spawn(async move {
        let mut received = Received::default();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // keep up while the load runs
        while std::time::Instant::now() < deadline && received.total() < 15_000 {
            if !consume_one_batch(&mut fast_client, QUEUE, "fast", None, &mut received).await {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        (fast_client, received)
    });
    let slow = tokio::spawn(async move {
        let mut received = Received::default();
        // one small batch now and then, far behind
        for _ in 0..20 {
            consume_one_batch(&mut slow_client, QUEUE, "slow", Some(200), &mut received).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (slow_client, received)
    });
    let expected = load.await;
    let (mut fast_client, mut fast_received) = fast.await.unwrap();
    let (mut slow_client, mut slow_received) = slow.await.unwrap();
    consume_until_complete(
        &mut fast_client,
        QUEUE,
        "fast",
        &expected,
        &mut fast_received,
        Duration::from_secs(120),
    )
    .await;
    consume_until_complete(
        &mut slow_client,
        QUEUE,
        "slow",
        &expected,
        &mut slow_received,
        Duration::from_secs(120),
    )
    .await;
}

/// Rows left in the queue's event tables, and whether event `ev_id` is still among them.
async fn event_rows(client: &tokio_postgres::Client, ev_id: i64) -> (i64, bool) {
    let row = client
        .query_one(
            r#"select count(*), coalesce(bool_or("ev_id" = $1), false) from "ferry"."event""#,
            &[&ev_id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn rotations_so_far(client: &tokio_postgres::Client) -> (i32, f64) {
    let q = ferry_queue::queue_info(client).await.unwrap().remove(0);
    (q.cur_table, q.since_rotation_secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_waits_for_a_stopped_consumer_and_truncates_after_it_catches_up() {
    let setup = Setup::new("rotation").await;
    setup.write_ticker_config("0.05", "0.2");
    let config = setup.config();
    let config = config.to_str().unwrap();
    ferry_ok(&[config, "create", QUEUE]);
    ferry_ok(&[config, "config", QUEUE, "rotation_period=1 second"]);
    ferry_ok(&[config, "register", QUEUE, "running"]);
    ferry_ok(&[config, "register", QUEUE, "stopped"]);
    let _ticker = setup.spawn_ticker();
    let observer = setup.connect().await;
    let mut writer = setup.connect().await;
    let mut running = setup.connect().await;
    let mut running_received = Received::default();

    // several rotation periods of load while "stopped" reads nothing
    let mut expected = Vec::new();
    let mut table_changes = 0;
    let mut last_table = rotations_so_far(&observer).await.0;
    for round in 0..40 {
        let payloads: Vec<String> = (0..100).map(|i| format!("r{round}-{i}")).collect();
        insert_events(&mut writer, QUEUE, &payloads, true).await;
        expected.extend(payloads);
        while consume_one_batch(&mut running, QUEUE, "running", None, &mut running_received).await {
        }
        let table = rotations_so_far(&observer).await.0;
        if table != last_table {
            table_changes += 1;
            last_table = table;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // 4 s of 1 s rotation periods: without the stopped consumer this rotates ~4 times
    assert!(
        table_changes <= 1,
        "rotated {table_changes} times past a stopped consumer"
    );
    let (_, first_event_kept) = event_rows(&observer, 1).await;
    assert!(
        first_event_kept,
        "an event the stopped consumer has not read was truncated"
    );

    // the stopped consumer catches up and got everything, exactly once
    let mut stopped = setup.connect().await;
    let mut stopped_received = Received::default();
    consume_until_complete(
        &mut stopped,
        QUEUE,
        "stopped",
        &expected,
        &mut stopped_received,
        Duration::from_secs(60),
    )
    .await;
    consume_until_complete(
        &mut running,
        QUEUE,
        "running",
        &expected,
        &mut running_received,
        Duration::from_secs(60),
    )
    .await;

    // now rotation goes on and the old tables are emptied
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        while consume_one_batch(&mut running, QUEUE, "running", None, &mut running_received).await {
        }
        while consume_one_batch(&mut stopped, QUEUE, "stopped", None, &mut stopped_received).await {
        }
        let (rows, first_event_kept) = event_rows(&observer, 1).await;
        if !first_event_kept && rows < expected.len() as i64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "old event tables never truncated ({rows} rows left)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ticker_killed_and_restarted_during_load_loses_nothing() {
    let setup = Setup::new("ticker_kill").await;
    setup.queue_with_consumers(QUEUE, &["c1"]);
    let mut ticker = setup.spawn_ticker();
    let load = tokio::spawn({
        let conninfo = setup.db.conninfo.clone();
        async move {
            let mut client = ferry_testkit::connect(&conninfo).await;
            let mut committed = Vec::new();
            for round in 0..200 {
                let payloads: Vec<String> = (0..50).map(|i| format!("k{round}-{i}")).collect();
                let commit = round % 7 != 3;
                insert_events(&mut client, QUEUE, &payloads, commit).await;
                if commit {
                    committed.extend(payloads);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            committed
        }
    });
    let mut consumer = setup.connect().await;
    let mut received = Received::default();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        while consume_one_batch(&mut consumer, QUEUE, "c1", None, &mut received).await {}
        // SIGKILL: the pid file stays behind, stale; the next ticker takes it over
        kill(&mut ticker);
        assert!(
            setup.pid_file().exists(),
            "a SIGKILLed ticker leaves its pid file"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        ticker = setup.spawn_ticker();
    }
    let expected = load.await.unwrap();
    consume_until_complete(
        &mut consumer,
        QUEUE,
        "c1",
        &expected,
        &mut received,
        Duration::from_secs(60),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ticker_wakes_listening_consumers_with_notify() {
    let setup = Setup::new("notify").await;
    setup.queue_with_consumers(QUEUE, &[]);
    let _ticker = setup.spawn_ticker();
    let conninfo = ferry_connect::ConnInfo::parse(&setup.db.conninfo).unwrap();
    let mut listener = ferry_connect::connect(&conninfo, "test listener")
        .await
        .unwrap();
    listener
        .client()
        .batch_execute(&format!("listen {}", ferry_queue::TICK_CHANNEL))
        .await
        .unwrap();
    listener.drain_notifications();
    let writer = setup.connect().await;
    ferry_queue::insert_event(&writer, QUEUE, "t", "wake up")
        .await
        .unwrap();
    let note = tokio::time::timeout(Duration::from_secs(5), listener.notification())
        .await
        .expect("no notification within 5 s of an event")
        .expect("connection open");
    assert_eq!(note.channel(), ferry_queue::TICK_CHANNEL);
    // the payload names the queue and the tick, which holds the event
    let notice = ferry_queue::TickNotice::parse(note.payload()).expect("payload TICK_ID:QUEUE");
    assert_eq!(notice.queue, QUEUE);
    let holds_the_event: bool = writer
        .query_one(
            r#"select t."tick_event_seq" >= 1 from "ferry"."tick" t
                 join "ferry"."queue" q on q."queue_id" = t."tick_queue"
                where q."queue_name" = $1 and t."tick_id" = $2"#,
            &[&QUEUE, &notice.tick_id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(holds_the_event, "tick {} of the wake-up", notice.tick_id);
}

/// `status` says when the ticker ticks each queue: at the first check with news by default,
/// and after `config` sets PgQ's thresholds, how long news waits and for how many events; the
/// json says it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_when_the_ticker_ticks() {
    let setup = Setup::new("status_ticking").await;
    setup.queue_with_consumers(QUEUE, &[]);
    let config = setup.config();
    let config = config.to_str().unwrap();
    let status = ferry_ok(&[config, "status"]);
    assert!(
        status.contains("ticks at the first check that finds news, and every 60 s without"),
        "{status}"
    );
    ferry_ok(&[config, "config", QUEUE, "ticker_max_lag=500 milliseconds"]);
    ferry_ok(&[config, "config", QUEUE, "ticker_max_count=100"]);
    ferry_ok(&[config, "config", QUEUE, "ticker_idle_period=2 minutes"]);
    let status = ferry_ok(&[config, "status"]);
    assert!(
        status.contains(
            "news waits for 100 events or until the last tick is 0.5 s old, and every 120 s without"
        ),
        "{status}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ferry_ok(&[config, "status", "--json"])).expect("json status");
    let queue = &json["queues"][0];
    assert_eq!(queue["ticker_max_lag_secs"], 0.5, "{json}");
    assert_eq!(queue["ticker_max_count"], 100, "{json}");
    assert_eq!(queue["ticker_idle_period_secs"], 120.0, "{json}");
}
