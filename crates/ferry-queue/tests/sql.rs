//! The queue's SQL on a real cluster: install and upgrade, privileges, batches, retries, and
//! rotation's safety against writers that see an old current table.

use ferry_queue::{BatchCursor, Event};
use ferry_testkit::{error_chain, Cluster};
use tokio_postgres::Client;

async fn installed_db(name: &str) -> (Client, String) {
    let db = Cluster::shared().database(name).await;
    let mut client = ferry_testkit::connect(&db.conninfo).await;
    ferry_queue::install(&mut client).await.expect("install");
    (client, db.conninfo)
}

/// Sequential scans this session has started on ferry's tables whose names are `like` the
/// pattern, counted before they are flushed to the statistics views.
async fn sequential_scans(client: &Client, like: &str) -> i64 {
    client
        .query_one(
            r#"select coalesce(sum(seq_scan), 0)::bigint from pg_catalog.pg_stat_xact_user_tables
                where schemaname = 'ferry' and relname like $1"#,
            &[&like],
        )
        .await
        .unwrap()
        .get(0)
}

fn payloads(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| e.data.clone().unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn install_twice_is_harmless_and_records_the_version() {
    let db = Cluster::shared().database("install_twice").await;
    let mut client = ferry_testkit::connect(&db.conninfo).await;
    assert_eq!(ferry_queue::installed_version(&client).await.unwrap(), None);
    let first = ferry_queue::install(&mut client).await.unwrap();
    assert_eq!(first.previous_version, None);
    assert!(first.upgraded());
    ferry_queue::create_queue(&client, "q").await.unwrap();
    let second = ferry_queue::install(&mut client).await.unwrap();
    assert_eq!(second.previous_version, Some(ferry_queue::latest_version()));
    assert!(!second.upgraded());
    assert_eq!(
        ferry_queue::installed_version(&client).await.unwrap(),
        Some(ferry_queue::latest_version())
    );
    // the queue survived the reinstall
    assert_eq!(ferry_queue::queue_info(&client).await.unwrap().len(), 1);
}

#[tokio::test]
async fn a_database_owner_without_superuser_can_install_and_plain_writers_can_insert() {
    let cluster = Cluster::shared();
    let admin = cluster.connect("postgres").await;
    admin
        .batch_execute("create role queue_owner login nosuperuser nocreatedb nocreaterole; create role app_writer login")
        .await
        .unwrap();
    admin
        .batch_execute("create database owned_by_queue_owner owner queue_owner")
        .await
        .unwrap();
    let owner_conninfo = cluster
        .conninfo("owned_by_queue_owner")
        .replace("user=postgres", "user=queue_owner");
    let mut owner = ferry_testkit::connect(&owner_conninfo).await;
    ferry_queue::install(&mut owner)
        .await
        .expect("a database owner can install");
    ferry_queue::create_queue(&owner, "q").await.unwrap();
    ferry_queue::register_consumer(&owner, "q", "c")
        .await
        .unwrap();
    owner
        .batch_execute(r#"grant usage on schema "ferry" to app_writer"#)
        .await
        .unwrap();

    // a writer with no rights on the queue tables inserts through the security definer function
    let writer_conninfo = cluster
        .conninfo("owned_by_queue_owner")
        .replace("user=postgres", "user=app_writer");
    let writer = ferry_testkit::connect(&writer_conninfo).await;
    ferry_queue::insert_event(&writer, "q", "t", "from a plain role")
        .await
        .unwrap();
    let denied = writer
        .batch_execute(r#"insert into "ferry"."event" values (1, 0, 1, now(), 1)"#)
        .await;
    assert!(
        denied.is_err(),
        "plain roles must not write event tables directly"
    );

    ferry_queue::tick(&owner, "q").await.unwrap();
    let batch = ferry_queue::next_batch(&owner, "q", "c", None)
        .await
        .unwrap()
        .unwrap();
    let events = ferry_queue::get_batch_events(&owner, batch.id)
        .await
        .unwrap();
    assert_eq!(payloads(&events), vec!["from a plain role"]);
}

#[tokio::test]
async fn batches_are_bounded_by_ticks_and_repeat_until_finished() {
    let (mut client, _) = installed_db("batch_bounds").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    ferry_queue::register_consumer(&client, "q", "c")
        .await
        .unwrap();
    assert!(ferry_queue::next_batch(&client, "q", "c", None)
        .await
        .unwrap()
        .is_none());
    for i in 0..2500 {
        ferry_queue::insert_event(&client, "q", "t", &format!("e{i}"))
            .await
            .unwrap();
    }
    ferry_queue::tick(&client, "q").await.unwrap();
    ferry_queue::insert_event(&client, "q", "t", "after the tick")
        .await
        .unwrap();

    let batch = ferry_queue::next_batch(&client, "q", "c", None)
        .await
        .unwrap()
        .unwrap();
    // not finished: the same batch again
    let again = ferry_queue::next_batch(&client, "q", "c", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch, again);
    let all = ferry_queue::get_batch_events(&client, batch.id)
        .await
        .unwrap();
    assert_eq!(all.len(), 2500);
    assert!(
        all.windows(2).all(|w| w[0].id < w[1].id),
        "events in id order"
    );

    // the cursor pages through the same events
    let tx = client.transaction().await.unwrap();
    let mut paged = Vec::new();
    let mut cursor = BatchCursor::open(&tx, batch.id).await.unwrap();
    let mut pages = 0;
    loop {
        let page = cursor.next_page(1000).await.unwrap();
        if page.is_empty() {
            break;
        }
        pages += 1;
        paged.extend(page);
    }
    assert_eq!(pages, 3);
    assert_eq!(paged, all);
    assert!(ferry_queue::finish_batch(&tx, batch.id).await.unwrap());
    tx.commit().await.unwrap();
    assert!(!ferry_queue::finish_batch(&client, batch.id).await.unwrap());

    ferry_queue::tick(&client, "q").await.unwrap();
    let next = ferry_queue::next_batch(&client, "q", "c", None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.prev_tick.id, batch.cur_tick.id);
    let events = ferry_queue::get_batch_events(&client, next.id)
        .await
        .unwrap();
    assert_eq!(payloads(&events), vec!["after the tick"]);
}

#[tokio::test]
async fn max_events_lets_a_batch_span_several_ticks() {
    let (client, _) = installed_db("max_events").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    ferry_queue::register_consumer(&client, "q", "c")
        .await
        .unwrap();
    for t in 0..5 {
        for i in 0..10 {
            ferry_queue::insert_event(&client, "q", "t", &format!("t{t}-{i}"))
                .await
                .unwrap();
        }
        ferry_queue::tick(&client, "q").await.unwrap();
    }
    let batch = ferry_queue::next_batch(&client, "q", "c", Some(30))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.cur_tick.id - batch.prev_tick.id, 3);
    assert_eq!(
        ferry_queue::get_batch_events(&client, batch.id)
            .await
            .unwrap()
            .len(),
        30
    );
    ferry_queue::finish_batch(&client, batch.id).await.unwrap();
    let rest = ferry_queue::next_batch(&client, "q", "c", Some(1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rest.cur_tick.id - rest.prev_tick.id,
        1,
        "at least one tick per batch"
    );
}

/// A batch of many ticks read in parts: every event once, each part in id order, and a
/// transaction that stayed open across ticks in the part where it became visible (after the
/// events of transactions that committed before it, although its ids are older).
#[tokio::test]
async fn a_batch_read_in_parts_holds_every_event_in_commit_faithful_order() {
    let (mut client, conninfo) = installed_db("batch_parts").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    ferry_queue::register_consumer(&client, "q", "c")
        .await
        .unwrap();
    let mut long = ferry_testkit::connect(&conninfo).await;
    let long_tx = long.transaction().await.unwrap();
    ferry_queue::insert_event(&long_tx, "q", "t", "long-0")
        .await
        .unwrap();
    for t in 0..6 {
        for i in 0..4 {
            ferry_queue::insert_event(&client, "q", "t", &format!("t{t}-{i}"))
                .await
                .unwrap();
        }
        if t == 3 {
            long_tx.commit().await.unwrap();
            break;
        }
        ferry_queue::tick(&client, "q").await.unwrap();
    }
    ferry_queue::tick(&client, "q").await.unwrap();
    let batch = ferry_queue::next_batch(&client, "q", "c", Some(1000))
        .await
        .unwrap()
        .unwrap();
    let all = payloads(
        &ferry_queue::get_batch_events(&client, batch.id)
            .await
            .unwrap(),
    );
    assert_eq!(all.len(), 17);
    assert_eq!(all[0], "long-0", "one query for the whole batch: id order");

    let tx = client.transaction().await.unwrap();
    let mut cursor = BatchCursor::open_in_parts(&tx, batch.id, 4).await.unwrap();
    let mut parts = Vec::new();
    loop {
        let page = cursor.next_page(3).await.unwrap();
        if page.is_empty() {
            break;
        }
        parts.extend(page);
    }
    drop(cursor);
    let in_parts = payloads(&parts);
    let mut sorted_all = all.clone();
    sorted_all.sort();
    let mut sorted_parts = in_parts.clone();
    sorted_parts.sort();
    assert_eq!(sorted_parts, sorted_all, "the same events, each once");
    // ticks cut after t0, t1, t2; the long transaction committed with t3
    let expected: Vec<String> = (0..4)
        .flat_map(|t| (0..4).map(move |i| format!("t{t}-{i}")))
        .take(12)
        .chain(["long-0".to_string()])
        .chain((0..4).map(|i| format!("t3-{i}")))
        .collect();
    assert_eq!(in_parts, expected);
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn a_retried_event_comes_back_to_its_consumer_only() {
    let (client, _) = installed_db("retry").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    ferry_queue::register_consumer(&client, "q", "a")
        .await
        .unwrap();
    ferry_queue::register_consumer(&client, "q", "b")
        .await
        .unwrap();
    let id = ferry_queue::insert_event(&client, "q", "t", "once more")
        .await
        .unwrap();
    ferry_queue::tick(&client, "q").await.unwrap();
    let a = ferry_queue::next_batch(&client, "q", "a", None)
        .await
        .unwrap()
        .unwrap();
    assert!(ferry_queue::event_retry(&client, a.id, id, 0)
        .await
        .unwrap());
    assert!(!ferry_queue::event_retry(&client, a.id, id + 1000, 0)
        .await
        .unwrap());
    ferry_queue::finish_batch(&client, a.id).await.unwrap();
    let b = ferry_queue::next_batch(&client, "q", "b", None)
        .await
        .unwrap()
        .unwrap();
    ferry_queue::finish_batch(&client, b.id).await.unwrap();

    assert_eq!(ferry_queue::maint_retry_events(&client).await.unwrap(), 1);
    assert_eq!(
        ferry_queue::tick_queues(&client).await.unwrap(),
        1,
        "a requeued event is news"
    );
    let a2 = ferry_queue::next_batch(&client, "q", "a", None)
        .await
        .unwrap()
        .unwrap();
    let again = ferry_queue::get_batch_events(&client, a2.id).await.unwrap();
    assert_eq!(payloads(&again), vec!["once more"]);
    assert_eq!(again[0].id, id);
    assert_eq!(again[0].retry, Some(1));
    let b2 = ferry_queue::next_batch(&client, "q", "b", None)
        .await
        .unwrap()
        .unwrap();
    assert!(ferry_queue::get_batch_events(&client, b2.id)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn rotation_never_truncates_an_event_written_by_a_writer_with_an_old_snapshot() {
    let (client, conninfo) = installed_db("stale_writer").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    ferry_queue::register_consumer(&client, "q", "c")
        .await
        .unwrap();
    ferry_queue::set_queue_config(&client, "q", "rotation_period", "0")
        .await
        .unwrap();
    let consume_all = || async {
        let mut got = Vec::new();
        ferry_queue::tick(&client, "q").await.unwrap();
        while let Some(b) = ferry_queue::next_batch(&client, "q", "c", None)
            .await
            .unwrap()
        {
            got.extend(payloads(
                &ferry_queue::get_batch_events(&client, b.id).await.unwrap(),
            ));
            ferry_queue::finish_batch(&client, b.id).await.unwrap();
        }
        got
    };

    // a REPEATABLE READ writer takes its snapshot while table 0 is current
    let mut stale = ferry_testkit::connect(&conninfo).await;
    let stale_tx = stale
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    stale_tx.query_one("select 1", &[]).await.unwrap();

    // a rotation waits, rightly, while any transaction of the cluster (another test's) is
    // older than the last switch: consume and try again until it happens
    let rotate_when_safe = || async {
        for _ in 0..600 {
            if ferry_queue::maint_rotate_tables(&client, "q")
                .await
                .unwrap()
            {
                return;
            }
            consume_all().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("no rotation within 30 s");
    };

    // two rotations: table 1, then table 2 current; table 0 is next to be truncated
    rotate_when_safe().await;
    consume_all().await;
    rotate_when_safe().await;
    consume_all().await;

    // the writer still sees table 0 as current, and writes there
    stale_tx
        .query_one(
            r#"select "ferry"."insert_event"('q', 't', 'stale writer')"#,
            &[],
        )
        .await
        .unwrap();
    stale_tx.commit().await.unwrap();
    let in_table_0: i64 = client
        .query_one(
            r#"select count(*) from "ferry"."event" where "ev_part" = 0"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_table_0, 1, "the writer used the table of its snapshot");

    // the consumer has passed the last switch, but this event is unread: rotating onto
    // table 0 must wait
    assert!(
        !ferry_queue::maint_rotate_tables(&client, "q")
            .await
            .unwrap(),
        "rotation truncated a table holding an unread event"
    );
    assert_eq!(consume_all().await, vec!["stale writer"]);
    consume_all().await;
    rotate_when_safe().await;
}

#[tokio::test]
async fn drop_queue_refuses_while_consumers_are_registered() {
    let (client, _) = installed_db("drop_queue").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    assert!(!ferry_queue::create_queue(&client, "q").await.unwrap());
    ferry_queue::register_consumer(&client, "q", "c")
        .await
        .unwrap();
    let err = ferry_queue::drop_queue(&client, "q", false)
        .await
        .unwrap_err();
    let text = error_chain(&err);
    assert!(text.contains("still has 1 consumer"), "{text}");
    assert!(ferry_queue::drop_queue(&client, "q", true).await.unwrap());
    assert!(!ferry_queue::drop_queue(&client, "q", false).await.unwrap());
    let left: i64 = client
        .query_one(
            r#"select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
                where n.nspname = 'ferry' and c.relname like 'event\_1%'"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "event tables and sequence dropped");
}

#[tokio::test]
async fn missing_schema_is_reported_as_not_installed() {
    let db = Cluster::shared().database("not_installed").await;
    let client = ferry_testkit::connect(&db.conninfo).await;
    let err = ferry_queue::tick_queues(&client).await.unwrap_err();
    assert!(err.is_not_installed());
    assert!(!err.is_connection_lost());
    assert!(err.to_string().contains("ferry CONFIG install"), "{err}");
}

/// A tick reads the event sequence and takes its snapshot. A writer that starts between the
/// two has its event counted but not seen: the next ticker pass must still tick for it, or
/// its events wait a whole idle period. Writers and ticks race here for many short rounds;
/// after each round, two ticker passes must cover every committed event.
#[tokio::test]
async fn the_ticker_never_leaves_a_committed_event_behind_its_last_tick() {
    let (client, conninfo) = installed_db("tick_race").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    let mut writers = Vec::new();
    for _ in 0..4 {
        writers.push(std::sync::Arc::new(ferry_testkit::connect(&conninfo).await));
    }
    for round in 0..60 {
        let writing: Vec<_> = writers
            .iter()
            .map(|w| {
                let w = w.clone();
                tokio::spawn(async move {
                    for i in 0..10 {
                        ferry_queue::insert_event(&*w, "q", "t", &format!("{i}"))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        while !writing.iter().all(|w| w.is_finished()) {
            ferry_queue::tick_queues(&client).await.unwrap();
        }
        for w in writing {
            w.await.unwrap();
        }
        // what the ticker daemon does next, with nobody writing
        ferry_queue::tick_queues(&client).await.unwrap();
        ferry_queue::tick_queues(&client).await.unwrap();
        let behind: i64 = client
            .query_one(
                r#"select count(*) from "ferry"."event" e
                    where not pg_catalog.txid_visible_in_snapshot(e."ev_txid",
                        (select t."tick_snapshot" from "ferry"."tick" t
                          where t."tick_queue" = e."ev_queue" order by t."tick_id" desc limit 1))"#,
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            behind, 0,
            "round {round}: committed events after the last tick"
        );
    }
}

/// A tick commits durably even in a session (or server) with synchronous_commit off: a crash
/// must not lose a tick a consumer may have applied, or give its id to another tick. Other
/// settings are left alone.
#[tokio::test]
async fn a_tick_commits_durably_even_with_synchronous_commit_off() {
    let (client, _) = installed_db("durable_tick").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    let in_tick_transaction = |setting: &'static str| {
        let client = &client;
        async move {
            client
                .batch_execute(&format!("begin; set local synchronous_commit = {setting}"))
                .await
                .unwrap();
            ferry_queue::tick(client, "q").await.unwrap();
            let during: String = client
                .query_one("show synchronous_commit", &[])
                .await
                .unwrap()
                .get(0);
            client.batch_execute("commit").await.unwrap();
            during
        }
    };
    assert_eq!(in_tick_transaction("off").await, "local");
    assert_eq!(in_tick_transaction("remote_apply").await, "remote_apply");
    ferry_queue::insert_event(&client, "q", "t", "x")
        .await
        .unwrap();
    client
        .batch_execute("set synchronous_commit = off; begin")
        .await
        .unwrap();
    assert_eq!(ferry_queue::tick_queues(&client).await.unwrap(), 1);
    let during: String = client
        .query_one("show synchronous_commit", &[])
        .await
        .unwrap()
        .get(0);
    client.batch_execute("commit").await.unwrap();
    assert_eq!(during, "local");
}

/// A small batch is read whole in one statement; one holding more than the limit is not read
/// that way (None), even when its ticks' event sequence says it is small: a transaction open
/// across the earlier tick took its event ids before it.
#[tokio::test]
async fn small_batch_events_reads_whole_batches_within_the_limit_only() {
    let (client, conninfo) = installed_db("small_batch").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    ferry_queue::register_consumer(&client, "q", "c")
        .await
        .unwrap();
    for i in 0..5 {
        ferry_queue::insert_event(&client, "q", "t", &format!("a{i}"))
            .await
            .unwrap();
    }
    ferry_queue::tick(&client, "q").await.unwrap();
    let batch = ferry_queue::next_batch(&client, "q", "c", None)
        .await
        .unwrap()
        .unwrap();
    let events = ferry_queue::small_batch_events(&client, batch.id, 5)
        .await
        .unwrap()
        .expect("5 events fit a limit of 5");
    assert_eq!(payloads(&events), ["a0", "a1", "a2", "a3", "a4"]);
    assert!(events.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        ferry_queue::small_batch_events(&client, batch.id, 4)
            .await
            .unwrap(),
        None,
        "5 events do not fit a limit of 4"
    );
    ferry_queue::finish_batch(&client, batch.id).await.unwrap();

    // 50 events of a transaction open across a tick, then one more: the batch's ticks are one
    // event apart, the batch holds 51
    let mut writer = ferry_testkit::connect(&conninfo).await;
    let tx = writer.transaction().await.unwrap();
    for i in 0..50 {
        ferry_queue::insert_event(&tx, "q", "t", &format!("long{i}"))
            .await
            .unwrap();
    }
    ferry_queue::tick(&client, "q").await.unwrap();
    tx.commit().await.unwrap();
    ferry_queue::insert_event(&client, "q", "t", "after")
        .await
        .unwrap();
    ferry_queue::tick(&client, "q").await.unwrap();
    let mut seen = Vec::new();
    while let Some(batch) = ferry_queue::next_batch(&client, "q", "c", None)
        .await
        .unwrap()
    {
        let whole = ferry_queue::get_batch_events(&client, batch.id)
            .await
            .unwrap();
        assert_eq!(
            ferry_queue::small_batch_events(&client, batch.id, 1000)
                .await
                .unwrap()
                .as_ref(),
            Some(&whole),
            "batch {} read whole within a limit",
            batch.id
        );
        match ferry_queue::small_batch_events(&client, batch.id, 10)
            .await
            .unwrap()
        {
            Some(events) => seen.push((
                batch.cur_tick.event_seq - batch.prev_tick.event_seq,
                events.len(),
            )),
            None => seen.push((
                batch.cur_tick.event_seq - batch.prev_tick.event_seq,
                usize::MAX,
            )),
        }
        ferry_queue::finish_batch(&client, batch.id).await.unwrap();
    }
    assert!(
        seen.contains(&(1, usize::MAX)),
        "the batch of the long transaction looked small by its ticks and was too big: {seen:?}"
    );
}

/// The ticker's idle check for late writers (transactions at or past the last tick's xmax)
/// finds their events through the ev_txid index, whatever the planner believes of the event
/// tables: a session that checked an empty queue, then saw a table fill before autovacuum
/// analysed it, read the whole table at every check (fifty times a second while idle, a core
/// kept busy after a load stopped).
#[tokio::test]
async fn the_tickers_idle_check_reads_events_by_index_whatever_the_statistics() {
    let (client, conninfo) = installed_db("tick_idle_plan").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    let other = ferry_testkit::connect(&conninfo).await;
    // no autovacuum here: the planner knows nothing of what the tables hold
    other
        .batch_execute(
            r#"do $$ declare t record; begin
                 for t in select c.oid::regclass as r from pg_class c
                           join pg_namespace n on n.oid = c.relnamespace
                          where n.nspname = 'ferry' and c.relname like 'event\_%' and c.relkind = 'r'
                 loop execute format('alter table %s set (autovacuum_enabled = off)', t.r); end loop;
               end $$"#,
        )
        .await
        .unwrap();
    // sequential scans of event tables this session started, counted before they are flushed
    let seq_scans = || sequential_scans(&client, "event\\_%");
    // (a transaction of another test's database running at a tick and committed since is
    // news too: a check may tick, which does not matter here)
    let idle_check = || async {
        // another transaction completes: the last tick's xmax is behind, nothing else is new
        other.batch_execute("select txid_current()").await.unwrap();
        let before = seq_scans().await;
        ferry_queue::tick_queues(&client).await.unwrap();
        seq_scans().await - before
    };
    for _ in 0..10 {
        assert_eq!(idle_check().await, 0, "an empty queue");
    }
    other
        .batch_execute(
            r#"select "ferry"."insert_event"('q', 't', i::text) from generate_series(1, 20000) i"#,
        )
        .await
        .unwrap();
    assert_eq!(ferry_queue::tick_queues(&client).await.unwrap(), 1);
    for _ in 0..3 {
        assert_eq!(idle_check().await, 0, "a queue of 20 000 events");
    }
}

/// A consumer that keeps up asks for its next batch fifty times a second and usually finds
/// nothing: that answer looks at the tick table through its key, never reading it from the
/// start through the ticks the consumer has passed (thousands between maintenance runs).
#[tokio::test]
async fn nothing_new_is_answered_without_reading_the_passed_ticks() {
    let (client, _) = installed_db("nothing_new_plan").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    ferry_queue::register_consumer(&client, "q", "c")
        .await
        .unwrap();
    client
        .batch_execute(
            r#"select "ferry"."ticker"('q') from generate_series(1, 3000);
               analyze "ferry"."tick""#,
        )
        .await
        .unwrap();
    let batch = ferry_queue::next_batch(&client, "q", "c", Some(1_000_000))
        .await
        .unwrap()
        .expect("one batch over every tick");
    ferry_queue::finish_batch(&client, batch.id).await.unwrap();
    let seq_scans = || sequential_scans(&client, "tick");
    for call in 0..10 {
        let before = seq_scans().await;
        assert!(ferry_queue::next_batch(&client, "q", "c", Some(1_000_000))
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            seq_scans().await - before,
            0,
            "call {call} read the tick table whole"
        );
    }
}

/// With ticker_max_lag set, news waits until ticker_max_count events have come since the last
/// tick or that tick is ticker_max_lag old (PgQ's thresholds); by default the first check that
/// finds news ticks; a max_count of 0 is no count threshold.
#[tokio::test]
async fn ticker_thresholds_let_news_wait_for_a_count_or_an_age() {
    let (client, _) = installed_db("tick_thresholds").await;
    ferry_queue::create_queue(&client, "q").await.unwrap();
    let events = |n: usize| {
        let client = &client;
        async move {
            for i in 0..n {
                ferry_queue::insert_event(client, "q", "t", &i.to_string())
                    .await
                    .unwrap();
            }
        }
    };
    let ticks = || ferry_queue::tick_queues(&client);
    events(1).await;
    assert_eq!(ticks().await.unwrap(), 1, "by default one event ticks");

    ferry_queue::set_queue_config(&client, "q", "ticker_max_lag", "1 hour")
        .await
        .unwrap();
    ferry_queue::set_queue_config(&client, "q", "ticker_max_count", "3")
        .await
        .unwrap();
    events(2).await;
    assert_eq!(ticks().await.unwrap(), 0, "two events wait for a third");
    events(1).await;
    assert_eq!(ticks().await.unwrap(), 1, "three events tick");
    assert_eq!(ticks().await.unwrap(), 0, "nothing new");

    ferry_queue::set_queue_config(&client, "q", "ticker_max_count", "0")
        .await
        .unwrap();
    events(10).await;
    assert_eq!(
        ticks().await.unwrap(),
        0,
        "without a count threshold, the age decides"
    );
    ferry_queue::set_queue_config(&client, "q", "ticker_max_lag", "100 milliseconds")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    assert_eq!(ticks().await.unwrap(), 1, "news older than max_lag ticks");

    let refused = ferry_queue::set_queue_config(&client, "q", "ticker_max_count", "-1").await;
    assert!(refused.is_err(), "a negative count is refused");
}
