//! Replication end to end, on real clusters: the seed's Londiste walk-through command for
//! command, replay killed at random moments, a second subscriber, and the refusals.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::fidelity;
use common::replication::{
    assert_sequences_caught_up, assert_write_refused, dump_schema_into, run, wait_all_ok,
    wait_identical, wait_table_state, Pair, WriteLoad, SCHEMA, SEED_DATA, TABLES,
};
use common::{ferry, ferry_bin, ChildProcess, KillDaemonOnDrop};
use ferry_testkit::Cluster;
use rand::Rng;

/// `pg_dump -s PROVIDER | psql SUBSCRIBER`, as the seed restores the schema on the slave.
fn restore_schema(pair: &Pair) {
    dump_schema_into(&pair.provider.conninfo, &pair.subscriber.conninfo);
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
    pair.install_and_start_ticker();
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
/// keeps replicating, its schema dumped from the provider after setup (`pg_dump -s` brings
/// schema `ferry` and the capture triggers along): both end identical to the provider, and a
/// table no longer replicated on the second is writable there, no copied trigger in the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_subscriber_added_under_load() {
    let pair = Pair::new("second", &format!("{SCHEMA}{SEED_DATA}"), Some(SCHEMA)).await;
    let second = Cluster::shared().database("second_s2").await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let londiste2 = pair.dir.path().join("londiste2.ini");
    pair.write_londiste_ini(&londiste2, "test-londiste-2", &second);
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
        KillDaemonOnDrop(londiste2.clone()),
    ];
    pair.install_and_start_ticker();
    run(&londiste, &["replay", "-d"]);
    let load = WriteLoad::start(&pair.provider.conninfo, 2).await;
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    wait_all_ok(&londiste, Duration::from_secs(120), || pair.replay_log());

    // the second one arrives later, with everything running, its schema dumped from the
    // provider as it is now (schema `ferry` and the capture triggers included, as the seed
    // adds the next slave)
    dump_schema_into(&pair.provider.conninfo, &second.conninfo);
    let installed = run(&londiste2, &["subscriber", "install"]);
    for table in TABLES {
        assert!(
            installed.contains(&format!(
                "dropped capture trigger \"ferry_insert_test-queue\" on public.{table},"
            )),
            "{installed}"
        );
    }
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
    run(&londiste2, &["subscriber", "remove", "table4"]);
    ferry_testkit::connect(&second.conninfo)
        .await
        .batch_execute("truncate table4; insert into table4 values ('local', 1)")
        .await
        .unwrap();
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

/// Every built-in type family round-trips exactly, through the copy and through events
/// (insert, update of every column, primary-key update, delete), whatever the writer's session
/// settings, with the subscriber's columns in another order (see `common/fidelity.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_exactly() {
    let version = fidelity::server_major(&Cluster::shared().conninfo("postgres")).await;
    let pair = Pair::new(
        "fidelity",
        &fidelity::fidelity_schema(false, version),
        Some(&fidelity::fidelity_schema(true, version)),
    )
    .await;
    fidelity::round_trip(&pair, version).await;
}

/// TRUNCATE on the provider replicates (with the rows written after it in the same
/// transaction); `resync` copies a table again and repairs a replica changed behind replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_replicates_and_resync_repairs() {
    let schema = "create table items (id int primary key, v text);
                  insert into items select i, 'v' || i from generate_series(1, 1000) i;";
    let pair = Pair::new(
        "truncate",
        schema,
        Some("create table items (id int primary key, v text);"),
    )
    .await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    run(&londiste, &["replay", "-d"]);
    run(&londiste, &["provider", "add", "items"]);
    run(&londiste, &["subscriber", "add", "items"]);
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    let identical = || {
        wait_identical(
            &pair.provider.conninfo,
            &pair.subscriber.conninfo,
            &["items"],
            Duration::from_secs(30),
            || pair.replay_log(),
        )
    };
    identical().await;

    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute(
            "begin; truncate items; insert into items values (1, 'after truncate'); commit;",
        )
        .await
        .unwrap();
    identical().await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let count: i64 = subscriber
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);

    // the replica changed behind replay's back (the guard bypassed on purpose) ...
    subscriber
        .batch_execute("begin; set local ferry.replay = 'on'; insert into items values (2, 'stray'); update items set v = 'wrong'; commit;")
        .await
        .unwrap();
    provider
        .batch_execute("insert into items values (3, 'three')")
        .await
        .unwrap();
    // ... is copied again by resync
    let out = run(&londiste, &["subscriber", "resync", "items"]);
    assert!(out.contains("will be copied again"), "{out}");
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    identical().await;
}

/// A table whose copy cannot work (a column dropped on the subscriber after `add`) stays
/// in-copy, is named in the log, and does not hold up the other tables; once fixed it copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_copy_does_not_stop_the_others() {
    let schema = "create table good (id int primary key, v text);
                  create table bad (id int primary key, v text);
                  insert into good select i, 'g' from generate_series(1, 100) i;
                  insert into bad select i, 'b' from generate_series(1, 100) i;";
    let pair = Pair::new("failcopy", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    subscriber
        .batch_execute("alter table bad drop column v")
        .await
        .unwrap();
    run(&londiste, &["replay", "-d"]);
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute("insert into good values (1000, 'later')")
        .await
        .unwrap();
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["good"],
        Duration::from_secs(30),
        || pair.replay_log(),
    )
    .await;
    let tables = run(&londiste, &["subscriber", "tables"]);
    assert!(tables.contains("public.bad in-copy"), "{tables}");
    assert!(tables.contains("public.good ok"), "{tables}");
    assert!(
        pair.replay_log()
            .contains("column \"v\" of table public.bad is missing on the subscriber"),
        "{}",
        pair.replay_log()
    );

    subscriber
        .batch_execute("alter table bad add column v text")
        .await
        .unwrap();
    wait_all_ok(&londiste, Duration::from_secs(90), || pair.replay_log());
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["good", "bad"],
        Duration::from_secs(30),
        || pair.replay_log(),
    )
    .await;
}

/// Every index of a subscriber table, by name: its oid, its definition (and its constraint's),
/// its comment and whether it is the table's CLUSTER index.
async fn index_inventory(
    client: &tokio_postgres::Client,
    table: &str,
) -> std::collections::BTreeMap<String, (u32, String)> {
    client
        .query(
            "select ic.relname::text, ic.oid,
                    concat_ws(' | ', pg_get_indexdef(i.indexrelid), pg_get_constraintdef(c.oid),
                              obj_description(i.indexrelid, 'pg_class'),
                              case when i.indisclustered then 'clustered' end,
                              case when i.indisvalid then 'valid' end)
               from pg_index i join pg_class ic on ic.oid = i.indexrelid
               left join pg_constraint c on c.conindid = i.indexrelid and c.conrelid = i.indrelid
              where i.indrelid = $1::text::regclass",
            &[&table],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

/// A big table's copy builds its indexes once its rows are in (dropped after the TRUNCATE and
/// created again from their definitions before the copy commits) and brings every one back as
/// it was; indexes a drop and a create would not bring back exactly (clustered, commented,
/// depended on) are kept and maintained during the copy; a subscriber-only unique index the
/// provider's rows break still refuses the copy, and is still there after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_builds_indexes_after_its_rows_and_restores_them_exactly() {
    let schema = "create table wide (id int, a int, b text, c int, r int4range,
                      constraint wide_pkey primary key (id) with (fillfactor = 80),
                      constraint wide_a_b unique (a) include (b) deferrable initially deferred,
                      constraint wide_r_excl exclude using gist (r with &&));
                  create table tree (id int primary key, parent int references tree);
                  create table grouped (id int primary key, u int, constraint grouped_u unique (u));
                  create table dupes (id int primary key, d int);
                  create table small (id int primary key, s text);
                  insert into wide select i, i, 'b' || i, i % 7, int4range(i * 10, i * 10 + 5)
                    from generate_series(1, 20000) i;
                  insert into tree select i, nullif(i - 1, 0) from generate_series(1, 20000) i;
                  insert into grouped select i, -i from generate_series(1, 20000) i;
                  insert into dupes select i, i % 3 from generate_series(1, 20000) i;
                  insert into small select i, 's' from generate_series(1, 100) i;
                  analyze;";
    let subscriber_schema = format!(
        "{}
         create index wide_lower on wide (lower(b)) where c > 0;
         create index wide_c on wide (c) with (fillfactor = 70);
         create index wide_cl on wide (a, c);
         alter table wide cluster on wide_cl;
         create index wide_cm on wide (b);
         comment on index wide_cm is 'kept as it is';
         create index tree_parent on tree (parent);
         create view grouped_by_id as select id, u from grouped group by id;
         create unique index dupes_d on dupes (d);
         create index small_s on small (s);",
        schema.split("insert into").next().unwrap()
    );
    let pair = Pair::new("copyindexes", schema, Some(&subscriber_schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let tables = ["wide", "tree", "grouped", "dupes", "small"];
    let mut before = std::collections::BTreeMap::new();
    for table in tables {
        before.extend(index_inventory(&subscriber, table).await);
    }
    run(&londiste, &["replay", "-d"]);
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["wide", "tree", "grouped", "small"],
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    wait_table_state(
        &londiste,
        "public.small",
        "ok",
        Duration::from_secs(30),
        || pair.replay_log(),
    );
    let refused = "the subscriber refused the copy of public.dupes";
    let start = std::time::Instant::now();
    while !pair.replay_log().contains(refused) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{}",
            pair.replay_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut after = std::collections::BTreeMap::new();
    for table in tables {
        after.extend(index_inventory(&subscriber, table).await);
    }
    let rebuilt: Vec<&str> = [
        "wide_pkey",
        "wide_a_b",
        "wide_r_excl",
        "wide_lower",
        "wide_c",
        "tree_parent",
        "grouped_u",
    ]
    .into();
    let kept = [
        // clustered, commented
        "wide_cl",
        "wide_cm",
        // a foreign key (its own table's) and a view depend on them
        "tree_pkey",
        "grouped_pkey",
        // too small a table to pay
        "small_pkey",
        "small_s",
        // the copy that would have built it again was refused and rolled back
        "dupes_pkey",
        "dupes_d",
    ];
    assert_eq!(before.len(), rebuilt.len() + kept.len(), "{before:#?}");
    for (name, (oid, definition)) in &before {
        let (new_oid, new_definition) = after
            .get(name)
            .unwrap_or_else(|| panic!("index {name} is gone after the copy: {after:#?}"));
        assert_eq!(
            definition, new_definition,
            "index {name} came back otherwise"
        );
        if rebuilt.contains(&name.as_str()) {
            assert_ne!(
                oid,
                new_oid,
                "index {name} was maintained row by row: {}",
                pair.replay_log()
            );
        } else {
            assert!(kept.contains(&name.as_str()), "{name}");
            assert_eq!(oid, new_oid, "index {name} was dropped and created again");
        }
    }
    assert_eq!(before.len(), after.len(), "{after:#?}");

    let states = run(&londiste, &["subscriber", "tables"]);
    assert!(states.contains("public.dupes in-copy"), "{states}");
    // the rebuilt unique and exclusion constraints work
    let err = subscriber
        .batch_execute(
            "set ferry.replay = 'on';
             insert into wide values (20001, 5, 'x', 1, int4range(1000000, 1000001))",
        )
        .await
        .expect_err("a duplicate of a rebuilt unique constraint");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{err:?}"
    );
}

/// A copy whose index drops fail (here an event trigger on the subscriber, enabled always so
/// that it fires in replay's replica mode, refuses DROP INDEX) undoes the drops it made and
/// copies with every index kept, saying so, instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_keeps_its_indexes_when_it_cannot_drop_them() {
    let schema = "create table big (id int primary key, v int);
                  insert into big select i, i % 100 from generate_series(1, 20000) i;
                  analyze big;";
    let subscriber_schema = "create table big (id int primary key, v int);
         create index big_v on big (v);
         create function refuse_drops() returns event_trigger language plpgsql as
           $$ begin raise exception 'no index drops here'; end $$;
         create event trigger no_index_drops on ddl_command_start
           when tag in ('DROP INDEX') execute function refuse_drops();
         alter event trigger no_index_drops enable always;";
    let pair = Pair::new("copykeeps", schema, Some(subscriber_schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "big"]);
    run(&londiste, &["subscriber", "add", "big"]);
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let before = index_inventory(&subscriber, "big").await;
    run(&londiste, &["replay", "-d"]);
    wait_table_state(
        &londiste,
        "public.big",
        "ok",
        Duration::from_secs(60),
        || pair.replay_log(),
    );
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["big"],
        Duration::from_secs(30),
        || pair.replay_log(),
    )
    .await;
    // the primary key, dropped before big_v refused, came back with the savepoint: same oid
    assert_eq!(index_inventory(&subscriber, "big").await, before);
    assert!(
        pair.replay_log()
            .contains("indexes kept during the copy: one could not be dropped"),
        "{}",
        pair.replay_log()
    );
}

/// A change to a replicated table whose queue is gone fails the write, saying why, instead of
/// going uncaptured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_queue_is_gone_fails() {
    let schema = "create table items (id int primary key, v text);";
    let pair = Pair::new("queue_gone", schema, None).await;
    run(&pair.ticker_ini(), &["install"]);
    run(&pair.londiste_ini(), &["provider", "install"]);
    run(&pair.londiste_ini(), &["provider", "add", "items"]);
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute("insert into items values (1, 'captured')")
        .await
        .unwrap();
    provider
        .batch_execute(r#"select "ferry"."drop_queue"('test-queue', true)"#)
        .await
        .unwrap();
    let error = provider
        .batch_execute("insert into items values (2, 'lost?')")
        .await
        .expect_err("a write with nowhere to capture it must fail");
    let message = error
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_default();
    assert!(message.contains("is gone"), "{error:?}");
    let count: i64 = provider
        .query_one("select count(*) from items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

/// Tables others depend on (a foreign key, a unique constraint besides the primary key) are
/// applied in event order, where set-wise apply could break a constraint that held on the
/// provider at every step. And when a constraint appears on the subscriber while replay runs
/// (its cached view still says set-wise is safe), the failing batch is applied again in event
/// order and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependent_tables_apply_in_event_order() {
    let schema = "create table parent (id int primary key, name text);
                  create table child (id int primary key, parent_id int not null references parent);
                  create table codes (id int primary key, code text not null unique);
                  create table swap (id int primary key, code text not null);
                  insert into codes select i, 'c' || i from generate_series(1, 20) i;
                  insert into swap values (1, 'a'), (2, 'b');";
    // the subscriber gets its foreign key once the copies are done (a copy cannot fill
    // tables that reference each other one at a time)
    let subscriber_schema = schema
        .split("insert")
        .next()
        .unwrap()
        .replace(" references parent", "");
    let pair = Pair::new("dependent", schema, Some(&subscriber_schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["replay", "-d"]);
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    subscriber
        .batch_execute("alter table child add foreign key (parent_id) references parent")
        .await
        .unwrap();
    let tables = ["parent", "child", "codes", "swap"];
    let identical = || {
        wait_identical(
            &pair.provider.conninfo,
            &pair.subscriber.conninfo,
            &tables,
            Duration::from_secs(30),
            || pair.replay_log(),
        )
    };

    // every transaction is one batch-worth of changes that set-wise apply would reorder:
    // a child after its parent and deleted before it, two unique codes swapped through a
    // third value
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    for i in 1..=30 {
        let (a, b) = (i % 20 + 1, (i + 7) % 20 + 1);
        provider
            .batch_execute(&format!(
                "begin;
                 insert into parent values ({i}, 'p{i}');
                 insert into child values ({i}, {i});
                 delete from child where id = {old};
                 delete from parent where id = {old};
                 do $$ declare ca text; cb text; begin
                     select code into ca from codes where id = {a};
                     select code into cb from codes where id = {b};
                     update codes set code = 'tmp' where id = {a};
                     update codes set code = ca where id = {b};
                     update codes set code = cb where id = {a};
                 end $$;
                 commit;",
                old = i - 1
            ))
            .await
            .unwrap();
    }
    identical().await;
    assert!(
        !pair.replay_log().contains("again in event order"),
        "dependent tables were applied set-wise:\n{}",
        pair.replay_log()
    );

    // a unique index appears on the subscriber only; replay still thinks `swap` is
    // independent, so the swap below fails set-wise and must be applied again in order
    provider
        .batch_execute("update swap set code = 'c' where id = 1")
        .await
        .unwrap();
    identical().await;
    subscriber
        .batch_execute("create unique index on swap (code)")
        .await
        .unwrap();
    provider
        .batch_execute(
            "begin;
             update swap set code = 't' where id = 1;
             update swap set code = 'c' where id = 2;
             update swap set code = 'b' where id = 1;
             commit;",
        )
        .await
        .unwrap();
    identical().await;
    assert!(
        pair.replay_log().contains("again in event order"),
        "the swap did not go through the event-order retry:\n{}",
        pair.replay_log()
    );
}

/// Replicated changes are applied as native logical replication applies them
/// (`session_replication_role = replica`): the subscriber's ordinary triggers (a BEFORE UPDATE
/// trigger setting `last_update`, as `pg_dump -s` brings it) and its foreign-key actions (ON
/// UPDATE / ON DELETE CASCADE) leave replicated rows alone, so the provider's own cascaded
/// events find their rows; triggers marked ENABLE ALWAYS or ENABLE REPLICA fire; the write
/// guard still refuses everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_triggers_and_cascades_leave_replicated_rows_alone() {
    let schema = "create table item (id int primary key, v text,
                      last_update timestamptz not null default now());
         create function touch() returns trigger language plpgsql as $$
             begin new.last_update := clock_timestamp(); return new; end $$;
         create trigger touch before update on item for each row execute function touch();
         create table parent (id int primary key, name text);
         create table child (id int primary key,
             parent_id int not null references parent on update cascade on delete cascade);";
    let subscriber_extra = "create table audit (item_id int references item, op text, via text);
         create function audit_always() returns trigger language plpgsql as $$
             begin insert into audit values (new.id, tg_op, 'always'); return new; end $$;
         create trigger audit_always after insert or update on item
             for each row execute function audit_always();
         alter table item enable always trigger audit_always;
         create function audit_replica() returns trigger language plpgsql as $$
             begin insert into audit values (new.id, tg_op, 'replica'); return new; end $$;
         create trigger audit_replica after insert on item
             for each row execute function audit_replica();
         alter table item enable replica trigger audit_replica;";
    let pair = Pair::new(
        "replica_role",
        &format!(
            "{schema}
             insert into item (id, v) select i, 'v' || i from generate_series(1, 20) i;
             insert into parent select i, 'p' || i from generate_series(1, 10) i;
             insert into child select i, i % 10 + 1 from generate_series(1, 30) i;"
        ),
        Some(&format!("{schema} {subscriber_extra}")),
    )
    .await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    pair.add_everything();
    run(&londiste, &["replay", "-d"]);
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    let tables = ["item", "parent", "child"];
    let identical = || {
        wait_identical(
            &pair.provider.conninfo,
            &pair.subscriber.conninfo,
            &tables,
            Duration::from_secs(30),
            || pair.replay_log(),
        )
    };
    identical().await;

    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute(
            "update item set v = v || '!' where id <= 10;
             insert into item (id, v) values (21, 'new');
             update parent set id = id + 100 where id <= 5;
             delete from parent where id = 9;
             update child set parent_id = 105 where id = 1;",
        )
        .await
        .unwrap();
    // the provider's last_update values (set by its trigger) and its cascaded child rows
    // arrive as they are: identical, nothing refused
    identical().await;
    assert!(!pair.replay_log().contains("WARN"), "{}", pair.replay_log());

    // ENABLE ALWAYS fired for the copied rows, the replicated insert and the updates, ENABLE
    // REPLICA for the copied rows and the insert; the ordinary `touch` fired for none
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let audit: Vec<(String, String, i64)> = subscriber
        .query(
            "select via, op, count(*) from audit group by 1, 2 order by 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        audit,
        [
            ("always".to_string(), "INSERT".to_string(), 21),
            ("always".to_string(), "UPDATE".to_string(), 10),
            ("replica".to_string(), "INSERT".to_string(), 21),
        ],
        "copied rows go through COPY (20 each), the new row and the updates through events"
    );

    // `subscriber check` says which triggers act on replicated rows and which keys reach
    // tables not replicated here, and finds no problem in them
    let report: serde_json::Value =
        serde_json::from_str(&run(&londiste, &["subscriber", "check", "--json"])).unwrap();
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");
    let notes = report["notes"].to_string();
    for note in [
        r#"trigger \"audit_always\" on public.item fires for replicated changes (ENABLE ALWAYS)"#,
        r#"trigger \"audit_replica\" on public.item fires for replicated changes (ENABLE REPLICA)"#,
        r#"trigger \"touch\" on public.item does not fire for replicated changes"#,
        r#"foreign key \"audit_item_id_fkey\" of public.audit (not replicated here) refers to public.item"#,
    ] {
        assert!(notes.contains(note), "{note} missing from {notes}");
    }

    // everyone else still may not write here
    assert_write_refused(&subscriber, "update item set v = 'x' where id = 1").await;
}

/// A partitioned table replicates as one unit, its root: `provider add --all` adds the root
/// and says it leaves the partitions out and why; the subscriber partitions it differently
/// (by hash); rows moving between partitions, a partition created after `add`, a TRUNCATE of
/// one partition alone and of the root all replicate; without the event trigger `subscriber
/// check` says what is not captured, with it a table attached (columns in another order), a
/// partition detached and one created replicate too; the write guard covers the subscriber's
/// partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_replicate_as_one_unit() {
    let provider_schema = "create table payments (id int, paid date not null, amount numeric,
                               meta jsonb, primary key (id, paid)) partition by range (paid);
         create table payments_2024 partition of payments
             for values from ('2024-01-01') to ('2025-01-01');
         create table payments_2025 partition of payments
             for values from ('2025-01-01') to ('2026-01-01');
         insert into payments select i, date '2024-01-01' + (i % 700), i / 3.0
           from generate_series(1, 2000) i;";
    let subscriber_schema = "create table payments (id int, paid date not null, amount numeric,
                                 meta jsonb, primary key (id, paid)) partition by hash (id);
         create table payments_h0 partition of payments for values with (modulus 2, remainder 0);
         create table payments_h1 partition of payments for values with (modulus 2, remainder 1);";
    let pair = Pair::new("partitions", provider_schema, Some(subscriber_schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    // provider install made the event trigger capturing ATTACH and DETACH (the test role is a
    // superuser); first without it, as on a server where no superuser made it
    let provider_admin = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider_admin
        .batch_execute("drop event trigger ferry_partition_ddl")
        .await
        .unwrap();
    let added = run(&londiste, &["provider", "add", "--all"]);
    assert!(added.contains("public.payments: added"), "{added}");
    for part in ["payments_2024", "payments_2025"] {
        assert!(
            added.contains(&format!(
                "public.{part}: skipped (a partition of public.payments, which carries its rows)"
            )),
            "{added}"
        );
    }
    run(&londiste, &["subscriber", "add", "--all"]);
    // -v: the debug log says which inserts went in by COPY
    run(&londiste, &["replay", "-d", "-v"]);
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    let identical = || {
        wait_identical(
            &pair.provider.conninfo,
            &pair.subscriber.conninfo,
            &["payments"],
            Duration::from_secs(30),
            || pair.replay_log(),
        )
    };
    identical().await;

    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    // rows move between partitions (a delete and an insert of the root), rows change in place
    provider
        .batch_execute(
            "update payments set paid = paid + 365 where id % 5 = 0 and paid < '2024-12-01';
             update payments set amount = amount + 1 where id % 7 = 0;
             delete from payments where id % 11 = 0;
             insert into payments select i, date '2025-06-01', 1 from generate_series(3001, 3300) i;",
        )
        .await
        .unwrap();
    identical().await;
    // the rows inserted into the root (and those moving partitions) went in by COPY, routed
    assert!(
        pair.replay_log()
            .lines()
            .any(|l| l.contains("inserts copied in") && l.contains("table=public.payments")),
        "{}",
        pair.replay_log()
    );

    // a partition created after `add`: its rows replicate without a command
    provider
        .batch_execute(
            "create table payments_2026 partition of payments
                 for values from ('2026-01-01') to ('2027-01-01');
             insert into payments select i, date '2026-03-01', 2 from generate_series(4001, 4050) i;",
        )
        .await
        .unwrap();
    identical().await;
    let report: serde_json::Value =
        serde_json::from_str(&run(&londiste, &["subscriber", "check", "--json"])).unwrap();
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("partition public.payments_2026 of public.payments was created after"),
        "{report}"
    );
    assert!(
        notes.contains("ATTACH and DETACH PARTITION on public.payments are not captured"),
        "{report}"
    );

    // one partition truncated alone: exactly its rows go, wherever they are here
    provider
        .batch_execute("truncate payments_2024")
        .await
        .unwrap();
    identical().await;
    // with the event trigger (which covers the partitions created meanwhile), a partition's
    // TRUNCATE is captured, and so are partitions attached, detached and created
    provider_admin
        .batch_execute("select ferry.provider_enable_partition_ddl_capture()")
        .await
        .unwrap();
    let report: serde_json::Value =
        serde_json::from_str(&run(&londiste, &["subscriber", "check", "--json"])).unwrap();
    assert_eq!(report["notes"], serde_json::json!([]), "{report}");
    provider
        .batch_execute("begin; insert into payments values (5000, '2026-05-05', 5); truncate payments_2026; commit;")
        .await
        .unwrap();
    identical().await;
    // a table attached brings its rows (its columns in another order), one detached takes
    // its rows away, one created is covered at once
    provider
        .batch_execute(
            "create table payments_2023 (meta jsonb, amount numeric, paid date not null, id int,
                                         primary key (id, paid));
             insert into payments_2023
             select case i % 3 when 0 then 'null'::jsonb when 1 then '{\"a\": 1}' end,
                    i / 2.0, date '2023-03-01' + i % 300, i
               from generate_series(1, 300) i;
             alter table payments attach partition payments_2023
                 for values from ('2023-01-01') to ('2024-01-01');",
        )
        .await
        .unwrap();
    identical().await;
    provider
        .batch_execute(
            "update payments set amount = 0 where paid < '2024-01-01' and id % 3 = 0;
             alter table payments detach partition payments_2025;
             insert into payments_2025 values (9999, '2025-09-09', 9);
             create table payments_2027 partition of payments
                 for values from ('2027-01-01') to ('2028-01-01');
             insert into payments values (7001, '2027-01-01', 1), (7002, '2027-02-02', 2);",
        )
        .await
        .unwrap();
    identical().await;
    provider
        .batch_execute("truncate payments_2027")
        .await
        .unwrap();
    identical().await;
    // the root truncated: one event, everything goes; a partition truncated later in the
    // same transaction speaks for itself again
    provider.batch_execute("truncate payments").await.unwrap();
    identical().await;
    provider
        .batch_execute(
            "begin; truncate payments;
             insert into payments values (7, '2023-03-03', 1), (8, '2024-03-03', 1);
             truncate payments_2023; commit;",
        )
        .await
        .unwrap();
    identical().await;
    provider
        .batch_execute("insert into payments values (1, '2026-02-02', 1)")
        .await
        .unwrap();
    identical().await;
    assert!(!pair.replay_log().contains("WARN"), "{}", pair.replay_log());

    // the subscriber's partitions are guarded too
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    assert_write_refused(
        &subscriber,
        "insert into payments_h0 values (2, '2025-01-01', 1)",
    )
    .await;
}

/// `wait-sync` (and `call ferry.wait_applied(...)` on the provider) return only once the
/// subscriber has every transaction committed before: a row written before is there the moment
/// they return, every time; with replay paused, not running, or tables not ok yet they time out
/// saying how far behind the subscriber is; `pause` holds replay where it is, `resume` lets it
/// go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_sync_returns_once_the_subscriber_has_everything() {
    let schema = "create table t (id int primary key, v text)";
    let pair = Pair::new("waitsync", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    pair.add_everything();
    let config = londiste.to_str().unwrap();
    // replay not started: the table waits for its copy
    let out = ferry(&[config, "wait-sync", "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not in sync after 1 s") && stderr.contains("not ok: public.t in-copy"),
        "{stderr}"
    );
    run(&londiste, &["replay", "-d"]);
    let synced = run(&londiste, &["wait-sync", "--timeout", "60"]);
    assert!(synced.starts_with("in sync: every table ok"), "{synced}");

    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let there = |id: i32| {
        let subscriber = &subscriber;
        async move {
            subscriber
                .query_opt("select 1 from t where id = $1", &[&id])
                .await
                .unwrap()
                .is_some()
        }
    };
    for id in 1..=5 {
        provider
            .execute("insert into t values ($1, 'cli')", &[&id])
            .await
            .unwrap();
        run(&londiste, &["wait-sync", "--timeout", "30"]);
        assert!(there(id).await, "row {id} missing right after wait-sync");
    }
    for id in 6..=10 {
        provider
            .execute("insert into t values ($1, 'sql')", &[&id])
            .await
            .unwrap();
        provider
            .batch_execute("call ferry.wait_applied('test-queue', 1, '30 s')")
            .await
            .unwrap();
        assert!(there(id).await, "row {id} missing right after wait_applied");
    }

    // a table added with --wait-sync is copied, ok and up to date when the command returns
    provider
        .batch_execute(
            "create table t2 (id int primary key); insert into t2 select generate_series(1, 100)",
        )
        .await
        .unwrap();
    subscriber
        .batch_execute("create table t2 (id int primary key)")
        .await
        .unwrap();
    run(&londiste, &["provider", "add", "t2"]);
    let added = run(
        &londiste,
        &["subscriber", "add", "t2", "--wait-sync", "--timeout", "60"],
    );
    assert!(
        added.contains("in sync: the tables added are ok"),
        "{added}"
    );
    let copied: i64 = subscriber
        .query_one("select count(*) from t2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        copied, 100,
        "t2 not there when subscriber add --wait-sync returned"
    );

    // paused: replay applies nothing (and says so once), wait-sync times out; resumed, the
    // row comes
    let paused = run(&londiste, &["pause"]);
    assert!(paused.starts_with("replay paused"), "{paused}");
    provider
        .execute("insert into t values (11, 'paused')", &[])
        .await
        .unwrap();
    pair.wait_for_replay_line(&["replay paused"], Duration::from_secs(10))
        .await;
    let out = ferry(&[config, "wait-sync", "--timeout", "1"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!there(11).await, "applied while paused");
    run(&londiste, &["resume"]);
    run(&londiste, &["wait-sync", "--timeout", "30"]);
    assert!(there(11).await, "row 11 missing after resume");
    pair.wait_for_replay_line(&["replay resumed"], Duration::from_secs(10))
        .await;

    // replay stopped: both wait, then say so
    run(&londiste, &["-s"]);
    provider
        .execute("insert into t values (12, 'late')", &[])
        .await
        .unwrap();
    let out = ferry(&[config, "wait-sync", "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("not in sync after 1 s: it has applied tick"),
        "{stderr}"
    );
    let error = provider
        .batch_execute("call ferry.wait_applied('test-queue', 1, '1 s')")
        .await
        .unwrap_err();
    let db = error.as_db_error().expect("a database error");
    assert!(
        db.message()
            .contains("0 of 1 consumer(s) of queue \"test-queue\""),
        "{db:?}"
    );
    assert!(!there(12).await);
}

/// `status` with a `[londiste]` config, the views `ferry.stat_replication` (provider) and
/// `ferry.stat_subscription` (subscriber), and replay's `/metrics` say what replay is doing: copying before it runs,
/// streaming with its lag and last batch, paused, stopped on an error (the refused row named,
/// as replay recorded it) and streaming again, the error cleared, once the cause is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_what_replay_is_doing() {
    let pair = Pair::new(
        "status",
        "create table guarded (id int primary key, v int)",
        Some("create table guarded (id int primary key, v int constraint small check (v < 100))"),
    )
    .await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    pair.add_everything();
    // replay serves its metrics
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    pair.add_to_londiste_ini(&format!("metrics_address = 127.0.0.1:{port}\n"));
    let metric = |name: &str| -> f64 {
        let body = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .expect("GET /metrics")
            .into_body()
            .read_to_string()
            .unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {body}"))
            .parse()
            .unwrap()
    };
    let status = || -> serde_json::Value {
        serde_json::from_str(&run(&londiste, &["status", "--json"])).expect("json status")
    };
    let before = status();
    assert_eq!(before["state"], "copying", "{before}");
    assert_eq!(before["tables"][0]["state"], "in-copy", "{before}");

    run(&londiste, &["replay", "-d"]);
    run(&londiste, &["wait-sync", "--timeout", "60"]);
    let streaming = status();
    assert_eq!(streaming["state"], "streaming", "{streaming}");
    assert!(streaming["lag_secs"].is_number(), "{streaming}");
    assert!(streaming["applied_tick"].is_number(), "{streaming}");
    assert_eq!(
        streaming["last_error"],
        serde_json::Value::Null,
        "{streaming}"
    );
    assert_eq!(streaming["tables"][0]["state"], "ok", "{streaming}");
    let text = run(&londiste, &["status"]);
    assert!(
        text.starts_with("queue test-queue, consumer test-londiste: streaming"),
        "{text}"
    );
    assert!(metric("ferry_replay_batches_total") >= 1.0);
    assert_eq!(metric("ferry_replay_tables_copied_total"), 1.0);
    // (read at each round's start: the round after the table became ok says so)
    let start = std::time::Instant::now();
    while metric("ferry_replay_tables_not_ok") != 0.0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "tables_not_ok stays up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        ureq::get(&format!("http://127.0.0.1:{port}/elsewhere"))
            .call()
            .is_err(),
        "only /metrics answers"
    );

    run(&londiste, &["pause"]);
    assert_eq!(status()["state"], "paused");
    run(&londiste, &["resume"]);

    // a row the subscriber refuses: replay records why it waits
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute("insert into guarded values (1, 500)")
        .await
        .unwrap();
    let start = std::time::Instant::now();
    let stopped = loop {
        let now = status();
        if now["state"] == "stopped-on-error" {
            break now;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not stopped on the error: {now}\n{}",
            pair.replay_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(metric("ferry_replay_errors_total") >= 1.0);
    let error = stopped["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("public.guarded") && error.contains("\"small\""),
        "{stopped}"
    );
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let row = subscriber
        .query_one(
            "select paused, last_error is not null, tables, tables_ok from ferry.stat_subscription
              where queue_name = 'test-queue'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, bool>(1),
            row.get::<_, i64>(2),
            row.get::<_, i64>(3)
        ),
        (false, true, 1, 1)
    );
    let pending: i64 = provider
        .query_one(
            "select pending_events from ferry.stat_replication where consumer_name = 'test-londiste'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        pending >= 1,
        "the refused row's event is pending: {pending}"
    );

    // fixed: streaming again, the error cleared
    subscriber
        .batch_execute("alter table guarded drop constraint small")
        .await
        .unwrap();
    run(&londiste, &["wait-sync", "--timeout", "60"]);
    assert!(metric("ferry_replay_events_applied_total") >= 1.0);
    let start = std::time::Instant::now();
    loop {
        let now = status();
        if now["state"] == "streaming" && now["last_error"].is_null() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{now}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A backlog of many chunks on one independent table, applied set-wise: rows inserted in one
/// chunk are updated, moved to another key (event order, mid-chunk) and deleted in later
/// ones. Replay reduces a chunk while the statements of the chunk before still run, so any
/// slip in their order shows as a set-wise failure and the event-order retry in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_many_chunks_applies_set_wise_in_order() {
    let schema = "create table churn (id int primary key, v int not null, note text)";
    let pair = Pair::new("chunks", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["replay", "-d"]);
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    run(&londiste, &["replay", "-s"]);

    // about 40 000 events (a chunk is at most 5 000), each step spread over the whole table
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute(
            "insert into churn select i, 0, 'n' || i from generate_series(1, 8000) i;
             update churn set v = v + 1;
             update churn set id = id + 100000 where id % 3 = 0;
             update churn set v = v + 1, note = null where id % 2 = 0;
             delete from churn where id % 5 = 0;
             insert into churn select i, 7, 'again' from generate_series(5, 8000, 5) i where i % 3 <> 0;
             update churn set id = id - 100000 where id > 100000 and id % 7 = 0;
             update churn set v = v * 2;",
        )
        .await
        .unwrap();
    run(&londiste, &["replay", "-d"]);
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["churn"],
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    assert!(
        !pair.replay_log().contains("again in event order"),
        "a set-wise chunk failed:\n{}",
        pair.replay_log()
    );
}

/// Replication with both connections over TLS (`verify-full` against a throwaway CA) and
/// SCRAM passwords, on a cluster that refuses anything else over TCP; the password shows in
/// no log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_over_tls_and_scram() {
    const PASSWORD: &str = "tls-and-scram-secret-7";
    let cluster = Cluster::start().expect("cluster");
    let ca = cluster
        .enable_tls_and_scram(PASSWORD)
        .await
        .expect("tls and scram");
    let admin = cluster.connect("postgres").await;
    for db in ["tls_p", "tls_s"] {
        admin
            .batch_execute(&format!("create database {db}"))
            .await
            .unwrap();
        cluster
            .connect(db)
            .await
            .batch_execute("create table t (id int primary key, v text)")
            .await
            .unwrap();
    }
    let provider = cluster.connect("tls_p").await;
    provider
        .batch_execute("insert into t select i, 'v' || i from generate_series(1, 500) i")
        .await
        .unwrap();
    let tls = |db: &str| {
        cluster.tcp_conninfo(
            db,
            "postgres",
            &format!(
                "sslmode=verify-full sslrootcert={} password={PASSWORD}",
                ca.display()
            ),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let ticker = dir.path().join("ticker.ini");
    let londiste = dir.path().join("londiste.ini");
    std::fs::write(
        &ticker,
        format!(
            "[pgqadm]\njob_name = tls-ticker\ndb = {}\nloop_delay = 0.05\n\
             logfile = %(job_name)s.log\npidfile = %(job_name)s.pid\n",
            tls("tls_p")
        ),
    )
    .unwrap();
    std::fs::write(
        &londiste,
        format!(
            "[londiste]\njob_name = tls-replay\nprovider_db = {}\nsubscriber_db = {}\n\
             pgq_queue_name = tls-queue\nloop_delay = 0.2\n\
             logfile = %(job_name)s.log\npidfile = %(job_name)s.pid\n",
            tls("tls_p"),
            tls("tls_s")
        ),
    )
    .unwrap();
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    let logs = || {
        ["tls-ticker.log", "tls-replay.log"]
            .iter()
            .map(|f| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    };
    run(&ticker, &["install"]);
    run(&ticker, &["ticker", "-d"]);
    run(&londiste, &["provider", "install"]);
    run(&londiste, &["subscriber", "install"]);
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["replay", "-d"]);
    wait_all_ok(&londiste, Duration::from_secs(60), logs);
    provider
        .batch_execute("update t set v = v || '!' where id % 3 = 0; delete from t where id % 7 = 0")
        .await
        .unwrap();
    wait_identical(
        &cluster.conninfo("tls_p"),
        &cluster.conninfo("tls_s"),
        &["t"],
        Duration::from_secs(60),
        logs,
    )
    .await;
    // every ferry connection is encrypted (the server takes no other over TCP, but check)
    let plain: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity a join pg_stat_ssl s using (pid)
              where a.application_name like 'ferry%' and not s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let encrypted: i64 = admin
        .query_one(
            "select count(*) from pg_stat_activity a join pg_stat_ssl s using (pid)
              where a.application_name like 'ferry%' and s.ssl",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(plain, 0);
    assert!(
        encrypted >= 3,
        "ticker, provider and subscriber sessions: {encrypted}"
    );
    let all_logs = logs();
    assert!(!all_logs.is_empty());
    assert!(
        !all_logs.contains(PASSWORD),
        "a password in the logs:\n{all_logs}"
    );
}

/// Replay running without a ticker says so in its log, once, and says again when ticks come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_says_when_the_ticker_is_not_running() {
    let schema = "create table t (id int primary key)";
    let pair = Pair::new("no_ticker", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    run(&ticker, &["install"]);
    run(&londiste, &["provider", "install"]);
    run(&londiste, &["subscriber", "install"]);
    run(
        &ticker,
        &["config", "test-queue", "ticker_idle_period=1 second"],
    );
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["replay", "-d"]);
    let wait_for = |text: &str| {
        let start = std::time::Instant::now();
        while !pair.replay_log().contains(text) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "no {text:?} in the replay log:\n{}",
                pair.replay_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_for("is the ticker running?");
    run(&ticker, &["ticker", "-d"]);
    wait_for("ticks arrive again");
    assert_eq!(
        pair.replay_log().matches("is the ticker running?").count(),
        1,
        "said once per silence:\n{}",
        pair.replay_log()
    );
}

/// `ferry demo`, the README's first command, runs to its end: a copy showing its progress,
/// replication under load, both sides identical (and `compare` says so), everything stopped. (It starts two clusters of its own and runs a
/// full-speed load; it took 12 s alone in a debug build.) The demo is in the binary only with
/// the `demo` feature, which the test command turns on (`--all-features`).
#[cfg(feature = "demo")]
#[test]
fn demo_runs_to_identical() {
    let out = ferry(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ferry demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("every table is ok"), "{stdout}");
    // the copy of a million accounts shows its progress
    assert!(
        stdout.contains("public.accounts=in-copy (copied "),
        "{stdout}"
    );
    assert!(stdout.contains("both sides identical"), "{stdout}");
    assert!(
        stdout.contains("public.accounts: provider 1000000 rows, subscriber 1000000 rows checksum"),
        "{stdout}"
    );
    assert!(stdout.contains("demo-replay: stopped"), "{stdout}");
}

/// `provider add --capture row|statement` chooses how a plain table is captured, switching an
/// added table's triggers over; a later `provider add` without it keeps the mode; a
/// partitioned table stays captured per row whatever is asked; every change replicates
/// exactly under either mode, key changes and multi-row statements included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capture_mode_is_chosen_per_table_and_kept() {
    let schema = "create table plain (id int primary key, v text);
                  create table parted (id int primary key, v text) partition by range (id);
                  create table parted_low partition of parted for values from (0) to (1000);";
    let pair = Pair::new("capturemode", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let mode = |table: &'static str| {
        let provider = &provider;
        async move {
            provider
                .query_one(
                    "select ferry.installed_capture_mode('test-queue', $1::text::regclass)",
                    &[&table],
                )
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    let out = run(
        &londiste,
        &["provider", "add", "--capture", "row", "plain", "parted"],
    );
    assert!(
        out.contains("public.plain: added, captured per row"),
        "{out}"
    );
    assert!(
        out.contains("public.parted: added, captured per row"),
        "{out}"
    );
    run(&londiste, &["provider", "add", "plain"]);
    assert_eq!(mode("plain").await, "row", "a plain add keeps the mode");
    let out = run(
        &londiste,
        &["provider", "add", "--capture", "statement", "parted"],
    );
    assert!(
        out.contains("public.parted: registered already, captured per row"),
        "{out}"
    );
    let out = ferry(&[
        londiste.to_str().unwrap(),
        "provider",
        "add",
        "--capture",
        "column",
        "plain",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["replay", "-d"]);
    let writes = [
        "insert into plain select i, 'a' || i from generate_series(1, 300) i",
        "update plain set v = v || '!' where id % 3 = 0",
        "update plain set id = id + 1000 where id = 7",
        "delete from plain where id between 20 and 40",
        "insert into parted select i, 'p' from generate_series(1, 50) i",
    ];
    for write in writes {
        provider.batch_execute(write).await.unwrap();
    }
    let out = run(
        &londiste,
        &["provider", "add", "--capture", "statement", "plain"],
    );
    assert!(
        out.contains("public.plain: registered already, captured per statement"),
        "{out}"
    );
    assert_eq!(mode("plain").await, "statement");
    for write in writes {
        provider
            .batch_execute(&write.replace("generate_series(1,", "generate_series(2001,"))
            .await
            .unwrap();
    }
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["plain", "parted"],
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
}

/// The capture each table gets: a plain table is captured per statement from its transition
/// tables, a table in an inheritance tree row by row. Multi-row statements of every kind
/// arrive exactly: inserts with JSON and SQL nulls, updates of every row, primary keys moved by
/// one statement (old and new rows paired by position), also after a primary-key change by
/// hand and `provider install`, an update under writer
/// settings that take the pinned rendering, INSERT ... ON CONFLICT DO UPDATE (both triggers),
/// a writable CTE writing the table twice, deletes. A table that gains an inheritance child
/// after `provider add` refuses writes instead of capturing its child's rows as its own, until
/// `provider add` again switches it to row capture.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_capture_keeps_multi_row_statements_exact() {
    let schema = "create table acct (id int primary key, n int not null, doc jsonb, t timestamptz, note text);
         create table shape (id int primary key, v text, doc jsonb);
         create table shape_child (extra int) inherits (shape);
         alter table shape_child add primary key (id);
         create table later (id int primary key, v text);";
    let pair = Pair::new("statement_capture", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    pair.add_everything();
    run(&londiste, &["replay", "-d"]);
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());

    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let triggers = |table: &'static str| {
        let provider = &provider;
        async move {
            let rows = provider
                .query(
                    "select tgname::text from pg_trigger where tgrelid = $1::text::regclass
                      and not tgisinternal order by 1",
                    &[&table],
                )
                .await
                .unwrap();
            rows.iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        triggers("acct").await,
        [
            "ferry_delete_test-queue",
            "ferry_insert_test-queue",
            "ferry_rekey_test-queue",
            "ferry_truncate_test-queue",
            "ferry_update_test-queue"
        ]
    );
    assert_eq!(
        triggers("shape").await,
        ["ferry_capture_test-queue", "ferry_truncate_test-queue"]
    );

    provider
        .batch_execute(
            "insert into acct
                  select i, i, case i % 3 when 0 then 'null'::jsonb when 1 then null
                                else jsonb_build_object('i', i) end,
                         timestamptz '2026-01-01 00:00+00' + i * interval '1 minute', 'n' || i
                    from generate_series(1, 5000) i;
             update acct set n = n + 1;
             -- keys moved by one statement, old and new rows paired by position
             update acct set id = id + 10000, note = 'moved' where id between 100 and 199;
             begin;
             update acct set note = 'before the key change' where id <= 10;
             update acct set id = -id where id in (1, 2);
             update acct set note = 'after it' where id <= 10 or id < 0;
             commit;
             set datestyle = 'German'; set extra_float_digits = 0;
             update acct set t = t + interval '1 second', doc = 'null'::jsonb where id % 7 = 0;
             reset datestyle; reset extra_float_digits;
             insert into acct (id, n, note) select i, -i, 'upserted' from generate_series(4990, 5010) i
                 on conflict (id) do update set n = excluded.n, note = excluded.note;
             with moved as (update acct set n = 0 where id <= 20 returning id)
                 insert into acct (id, n, note) select id + 100000, 1, 'from cte' from moved;
             delete from acct where id % 5 = 0;
             insert into shape values (1, 'parent row', 'null');
             insert into shape_child values (2, 'child row', 'null', 7);
             update shape set v = v || '!';",
        )
        .await
        .unwrap();
    let tables = ["acct", "shape", "shape_child", "later"];
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &tables,
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let json_nulls: i64 = subscriber
        .query_one("select count(*) from acct where doc = 'null'::jsonb", &[])
        .await
        .unwrap()
        .get(0);
    assert!(json_nulls > 1000, "JSON nulls lost: {json_nulls}");
    let row_captured_json_nulls: i64 = subscriber
        .query_one("select count(*) from shape where doc = 'null'::jsonb", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        row_captured_json_nulls, 2,
        "JSON nulls lost by the row capture"
    );

    // the primary key changes by hand; `provider install` makes the key-change trigger compare
    // the new key's columns, so updates of them arrive with their old keys
    provider
        .batch_execute("alter table acct drop constraint acct_pkey, add primary key (id, n)")
        .await
        .unwrap();
    run(&londiste, &["provider", "install"]);
    provider
        .batch_execute("update acct set n = n + 1000000 where id between 300 and 399")
        .await
        .unwrap();
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["acct"],
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;

    // a child appears under a table captured per statement: its writes are refused
    provider
        .batch_execute(
            "insert into later values (1, 'one');
             create table later_child () inherits (later);",
        )
        .await
        .unwrap();
    let error = provider
        .batch_execute("update later set v = 'through the parent'")
        .await
        .expect_err("a statement capture that cannot tell the rows apart must refuse");
    let message = error
        .as_db_error()
        .map(|e| format!("{} {}", e.message(), e.hint().unwrap_or_default()))
        .unwrap_or_default();
    assert!(
        message.contains("inheritance children") && message.contains("provider add"),
        "{message}"
    );
    run(&londiste, &["provider", "add", "later"]);
    assert_eq!(
        triggers("later").await,
        ["ferry_capture_test-queue", "ferry_truncate_test-queue"]
    );
    provider
        .batch_execute("update later set v = 'row capture now'; insert into later_child values (9, 'not later''s')")
        .await
        .unwrap();
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["only later"],
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
}

/// Copies run beside the batch stream: while two tables' copies are held up (a subscriber
/// session holds a lock their TRUNCATE needs; `parallel_copies = 2`), a table already `ok`
/// keeps replicating, and every change to the tables being copied (inserts, updates, a moved
/// key, deletes, a transaction open when the copy's snapshot was taken) arrives exactly once
/// after the copy; then again across a kill of replay while events are kept. The big table
/// (18 MB) is copied in two slices (`copy_slices = 2`) that must read under the copy's
/// snapshot, or the changes made while it waited would arrive twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_run_beside_the_batch_stream() {
    let schema = "create table small (id int primary key, v text);
                  create table big (id int primary key, v text, n int);
                  create table other (id int primary key, v text);
                  insert into small values (1, 'a');
                  insert into big select i, md5(i::text), i from generate_series(1, 250000) i;
                  insert into other select i, 'o' from generate_series(1, 1000) i;";
    let pair = Pair::new(
        "beside",
        schema,
        Some(schema.split("insert").next().unwrap()),
    )
    .await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.add_to_londiste_ini("parallel_copies = 2\ncopy_slices = 2\n");
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "small"]);
    run(&londiste, &["replay", "-d"]);
    wait_table_state(
        &londiste,
        "public.small",
        "ok",
        Duration::from_secs(60),
        || pair.replay_log(),
    );

    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    // holds up the copies of big and other: their TRUNCATE waits for these locks
    let mut holder = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("lock table big, other in access share mode")
        .await
        .unwrap();
    // a transaction running when the copy's snapshot is taken: the copy cannot contain it
    let mut early = ferry_testkit::connect(&pair.provider.conninfo).await;
    let early_tx = early.transaction().await.unwrap();
    early_tx
        .batch_execute(
            "update big set v = 'early' where id = 7; insert into big values (-1, 'early', 0)",
        )
        .await
        .unwrap();
    run(&londiste, &["subscriber", "add", "big", "other"]);
    let stashed = "select count(*) from ferry.subscriber_stash";
    let copying = "select count(*) from ferry.subscriber_table
                    where state = 'in-copy' and copy_snapshot is not null";
    let wait_for = |sql: &'static str, want: i64| {
        let subscriber = &subscriber;
        let log = pair.replay_log();
        async move {
            for _ in 0..300 {
                let n: i64 = subscriber.query_one(sql, &[]).await.unwrap().get(0);
                if n >= want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("{sql}: fewer than {want}\nreplay log:\n{log}");
        }
    };
    // a table already ok keeps replicating while copies wait
    let identical = |tables: &'static [&'static str]| {
        wait_identical(
            &pair.provider.conninfo,
            &pair.subscriber.conninfo,
            tables,
            Duration::from_secs(30),
            || pair.replay_log(),
        )
    };
    let small_replicates = || identical(&["small"]);
    wait_for(copying, 2).await;
    early_tx.commit().await.unwrap();
    provider
        .batch_execute(
            "insert into big select i, 'new', i from generate_series(300001, 300100) i;
             update big set n = n + 1 where id between 100 and 199;
             update big set id = 330000 where id = 5;
             delete from big where id between 300 and 349;
             update other set v = 'changed' where id <= 10;
             update small set v = 'while big copies' where id = 1;
             insert into small values (2, 'b');",
        )
        .await
        .unwrap();
    small_replicates().await;
    wait_for(stashed, 1).await;

    // the copies go on under the snapshots they took before those changes: the changes come
    // from the kept events
    hold.rollback().await.unwrap();
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    identical(&["small", "big", "other"]).await;
    common::replication::assert_copied_in_slices(&pair.replay_log(), "public.big", 2);
    // each copy worked the first time (a slice reading outside the snapshot breaks it)
    assert!(
        !pair.replay_log().contains("copy failed"),
        "{}",
        pair.replay_log()
    );
    assert!(
        pair.replay_log()
            .contains("events kept during copies applied"),
        "{}",
        pair.replay_log()
    );

    // copied again, held up again, and replay killed while events are kept; the copy after
    // the restart takes a later snapshot, which holds what was kept before: applied once
    let hold = holder.transaction().await.unwrap();
    hold.batch_execute("lock table big in access share mode")
        .await
        .unwrap();
    run(&londiste, &["subscriber", "resync", "big"]);
    wait_for(copying, 1).await;
    provider
        .batch_execute(
            "insert into big select i, 'second', i from generate_series(400001, 400100) i;
             update big set v = 'second' where id between 3000 and 3009;",
        )
        .await
        .unwrap();
    wait_for(stashed, 1).await;
    let pid: i32 = std::fs::read_to_string(pair.dir.path().join("test-londiste.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) with a valid signal number
    unsafe { libc::kill(pid, libc::SIGKILL) };
    provider
        .batch_execute(
            "update big set v = 'while replay is down' where id between 1000 and 1009;
             delete from big where id = 330000;
             insert into small values (3, 'c');",
        )
        .await
        .unwrap();
    let _ = std::fs::remove_file(pair.dir.path().join("test-londiste.pid"));
    run(&londiste, &["replay", "-d"]);
    small_replicates().await;
    provider
        .batch_execute("update big set v = 'after the restart' where id between 2000 and 2009")
        .await
        .unwrap();
    pair.wait_replay_rounds_after_writes().await;
    let tables = run(&londiste, &["subscriber", "tables"]);
    assert!(tables.contains("public.big in-copy"), "{tables}");
    hold.rollback().await.unwrap();
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    identical(&["small", "big", "other"]).await;
    let left: i64 = subscriber.query_one(stashed, &[]).await.unwrap().get(0);
    assert_eq!(left, 0, "the kept events are deleted once applied");
}

/// Sequences move up to the provider's value and never back: an ascending one follows, a
/// descending one follows downwards, one the subscriber has ahead stays ahead, and one never
/// used on either side stays unused (its first `nextval` still returns its start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_move_forward_never_back() {
    let schema = "create table t (id int primary key);
                  create sequence up_seq;
                  create sequence down_seq increment -1 start 100 minvalue 1 maxvalue 100;
                  create sequence ahead_seq;
                  create sequence fresh_seq;";
    let pair = Pair::new("seqs", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    provider
        .batch_execute(
            "select nextval('up_seq') from generate_series(1, 3);
             select nextval('down_seq') from generate_series(1, 2);
             select nextval('ahead_seq');",
        )
        .await
        .unwrap();
    subscriber
        .batch_execute("select setval('ahead_seq', 500)")
        .await
        .unwrap();
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["provider", "add-seq", "--all"]);
    run(&londiste, &["subscriber", "add-seq", "--all"]);
    run(&londiste, &["replay", "-d"]);
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    provider
        .batch_execute("insert into t values (1)")
        .await
        .unwrap();
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["t"],
        Duration::from_secs(30),
        || pair.replay_log(),
    )
    .await;
    let state = |seq: &'static str| {
        let subscriber = &subscriber;
        async move {
            let row = subscriber
                .query_one(&format!("select last_value, is_called from {seq}"), &[])
                .await
                .unwrap();
            (row.get::<_, i64>(0), row.get::<_, bool>(1))
        }
    };
    assert_eq!(state("up_seq").await, (3, true), "followed upwards");
    assert_eq!(state("down_seq").await, (99, true), "followed downwards");
    assert_eq!(state("ahead_seq").await, (500, true), "never moved back");
    assert_eq!(state("fresh_seq").await, (1, false), "left unused");
}

/// A replay that keeps up asks the provider for each batch once: after a batch ending at the
/// newest tick announced it only finishes it, and the next tick's wake-up brings the next
/// (asking on the way, as it does when behind, would cost the provider a call per batch that
/// finds nothing). Counted with the provider's function statistics: next_batch_info calls
/// against finish_batch calls (one per batch), read together.
#[tokio::test]
async fn a_caught_up_replay_asks_for_each_batch_once() {
    let schema = "create table t (id int primary key);";
    let pair = Pair::new("ask_once", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    provider
        .batch_execute(
            "do $$ begin execute format('alter database %I set track_functions = ''pl''', current_database()); end $$",
        )
        .await
        .unwrap();
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["replay", "-d"]);
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
    let calls = || async {
        let row = provider
            .query_one(
                "select coalesce(sum(calls) filter (where funcname = 'next_batch_info'), 0)::bigint,
                        coalesce(sum(calls) filter (where funcname = 'finish_batch'), 0)::bigint
                   from pg_catalog.pg_stat_user_functions where schemaname = 'ferry'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0), row.get::<_, i64>(1))
    };
    let (asked_before, finished_before) = calls().await;
    let started = std::time::Instant::now();
    for id in 1..=40 {
        provider
            .execute("insert into t values ($1)", &[&id])
            .await
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while subscriber
            .query_opt("select 1 from t where id = $1", &[&id])
            .await
            .unwrap()
            .is_none()
        {
            assert!(
                std::time::Instant::now() < deadline,
                "row {id} not replicated:\n{}",
                pair.replay_log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    // statistics reach the view within a second of the calls; wait for this many batches
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (asked, finished) = loop {
        let (asked, finished) = calls().await;
        if finished - finished_before >= 40 || std::time::Instant::now() > deadline {
            break (asked - asked_before, finished - finished_before);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        finished >= 40,
        "{finished} batches finished for 40 single-row transactions"
    );
    // one call per batch, and one per second when no wake-up comes (replay's loop_delay),
    // with a few to spare: asking on the way of every finish would be about two per batch
    let idle_wakes = started.elapsed().as_secs() as i64 + 5;
    assert!(
        asked <= finished + idle_wakes,
        "{asked} calls of next_batch_info for {finished} batches in {:?}",
        started.elapsed()
    );
}
