//! Faults and bad input, on real clusters: rows the subscriber refuses, tables that differ
//! between the sides, awkward names. Every case ends with identical tables and replay going
//! on by itself once the cause is fixed; nothing is skipped.

mod common;

use std::time::Duration;

use common::replication::{run, wait_all_ok, wait_identical, wait_tables_ok, Pair};
use common::KillDaemonOnDrop;

/// Asserts that `table` on the subscriber has no row with `id`: the batch holding it has not
/// been applied.
async fn assert_not_applied(subscriber: &tokio_postgres::Client, table: &str, id: i32) {
    let rows = subscriber
        .query(&format!("select 1 from {table} where id = $1"), &[&id])
        .await
        .unwrap();
    assert!(
        rows.is_empty(),
        "{table} row {id} was applied past a held batch"
    );
}

/// A row the subscriber refuses (a check constraint, a trigger, a column of another type, a
/// column it lacks) holds its batch: nothing after it is applied, the log names the table, the
/// row's key and the error (and the differing column), and replay goes on by itself once the
/// cause is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_row_holds_its_batch_until_the_cause_is_fixed() {
    let provider_schema = "create table guarded (id int primary key, v int);
                           create table typed (id int primary key, v text);
                           create table later (id int primary key, v text);";
    let subscriber_schema =
        "create table guarded (id int primary key, v int constraint small check (v < 100));
                             create table typed (id int primary key, v text);
                             create table later (id int primary key, v text);";
    let pair = Pair::new("refusedrow", provider_schema, Some(subscriber_schema)).await;
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
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let all = ["guarded", "typed", "later"];
    let identical = || {
        wait_identical(
            &pair.provider.conninfo,
            &pair.subscriber.conninfo,
            &all,
            Duration::from_secs(60),
            || pair.replay_log(),
        )
    };
    let limit = Duration::from_secs(30);

    // 1. a check constraint refuses an insert
    provider
        .batch_execute("insert into guarded values (1, 5), (7, 500)")
        .await
        .unwrap();
    provider
        .batch_execute("insert into later values (1, 'after the refused row')")
        .await
        .unwrap();
    let line = pair
        .wait_for_replay_line(
            &[
                "the subscriber refused an insert of public.guarded with key {\"id\":7}",
                "violates check constraint \"small\"",
            ],
            limit,
        )
        .await;
    assert!(line.contains("WARN"), "{line}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_not_applied(&subscriber, "later", 1).await;
    assert_not_applied(&subscriber, "guarded", 1).await;
    subscriber
        .batch_execute("alter table guarded drop constraint small")
        .await
        .unwrap();
    identical().await;
    pair.wait_for_replay_line(&["working again"], limit).await;

    // 2. a trigger on the subscriber refuses an update
    subscriber
        .batch_execute(
            "create function no_thirteen() returns trigger language plpgsql as $$
             begin
                 if new.v = 13 then raise exception 'thirteen is unlucky'; end if;
                 return new;
             end $$;
             create trigger no_thirteen before insert or update on guarded
                 for each row execute function no_thirteen();",
        )
        .await
        .unwrap();
    provider
        .batch_execute("update guarded set v = 13 where id = 1; insert into later values (2, 'x')")
        .await
        .unwrap();
    pair.wait_for_replay_line(
        &[
            "the subscriber refused an update of public.guarded with key {\"id\":1}",
            "thirteen is unlucky",
        ],
        limit,
    )
    .await;
    assert_not_applied(&subscriber, "later", 2).await;
    subscriber
        .batch_execute("drop trigger no_thirteen on guarded")
        .await
        .unwrap();
    identical().await;

    // 3. a column of another type (changed after `subscriber add` refused nothing): the value
    // does not fit, the column is named
    subscriber
        .batch_execute("alter table typed alter column v type int using v::int")
        .await
        .unwrap();
    provider
        .batch_execute(
            "insert into typed values (3, 'not a number'); insert into later values (3, 'x')",
        )
        .await
        .unwrap();
    pair.wait_for_replay_line(
        &[
            "the subscriber refused an insert of public.typed with key {\"id\":3}",
            "invalid input syntax for type integer",
        ],
        limit,
    )
    .await;
    pair.wait_for_replay_line(
        &["column \"v\" of table public.typed is integer on the subscriber but text on the provider"],
        limit,
    )
    .await;
    assert_not_applied(&subscriber, "later", 3).await;
    subscriber
        .batch_execute("alter table typed alter column v type text")
        .await
        .unwrap();
    identical().await;

    // 4. a column added on the provider only
    provider
        .batch_execute(
            "alter table later add column extra int; insert into later values (4, 'x', 44)",
        )
        .await
        .unwrap();
    pair.wait_for_replay_line(
        &["column \"extra\" of table public.later is missing on the subscriber"],
        limit,
    )
    .await;
    assert_not_applied(&subscriber, "later", 4).await;
    subscriber
        .batch_execute("alter table later add column extra int")
        .await
        .unwrap();
    identical().await;

    // nothing was skipped on the way
    let log = pair.replay_log();
    assert!(!log.contains("skipp"), "{log}");
}

/// Tables, columns and schemas with quotes, spaces, dots, unicode, mixed case and SQL
/// keywords replicate (copy, set-wise and event-order apply, sequences), and a table named
/// `x"; drop table y; --` replicates and drops nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_names_replicate_and_inject_nothing() {
    let schema = r#"
        create table y (id int primary key);
        insert into y values (1);
        create schema "My Schema";
        create table "My Schema"."Mixed Case.Table ü" (
            "Id" serial primary key,
            "select" text,
            "col ""quoted""" int,
            "Ünï cödé" text,
            "with.dot" numeric
        );
        create table "x""; drop table y; --" (
            "x""; drop table y; --" int primary key,
            "from" text
        );
        create table "order" (
            "group" int primary key,
            "where" text unique
        );
        insert into "My Schema"."Mixed Case.Table ü" ("select", "col ""quoted""", "Ünï cödé", "with.dot")
            select 'sel ' || i, i, 'ü' || i, i / 3.0 from generate_series(1, 100) i;
        insert into "x""; drop table y; --" select i, 'from ' || i from generate_series(1, 100) i;
        insert into "order" select i, 'where ' || i from generate_series(1, 100) i;
    "#;
    let pair = Pair::new("awkward", schema, Some(schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    let tables = [
        r#""My Schema"."Mixed Case.Table ü""#,
        r#""x""; drop table y; --""#,
        r#""order""#,
    ];
    // by name, as an operator quotes them in a shell
    for table in tables {
        run(&londiste, &["provider", "add", table]);
        run(&londiste, &["subscriber", "add", table]);
    }
    run(&londiste, &["provider", "add-seq", "--all"]);
    run(&londiste, &["subscriber", "add-seq", "--all"]);
    let listed = run(&londiste, &["subscriber", "tables"]);
    assert!(
        listed.contains(r#""My Schema"."Mixed Case.Table ü""#),
        "{listed}"
    );
    run(&londiste, &["replay", "-d"]);
    wait_tables_ok(&londiste, Duration::from_secs(60), || pair.replay_log());

    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute(
            r#"
            insert into "My Schema"."Mixed Case.Table ü" ("select", "col ""quoted""", "Ünï cödé")
                values ('new', 1, 'ñ');
            update "My Schema"."Mixed Case.Table ü" set "select" = 'upd', "with.dot" = 2.5
                where "Id" <= 10;
            update "My Schema"."Mixed Case.Table ü" set "Id" = "Id" + 1000 where "Id" between 11 and 20;
            delete from "My Schema"."Mixed Case.Table ü" where "Id" between 21 and 30;
            insert into "x""; drop table y; --" values (1000, 'new');
            update "x""; drop table y; --" set "from" = 'upd' where "x""; drop table y; --" <= 10;
            update "x""; drop table y; --" set "x""; drop table y; --" = - "x""; drop table y; --"
                where "x""; drop table y; --" between 11 and 20;
            delete from "x""; drop table y; --" where "x""; drop table y; --" between 21 and 30;
            update "order" set "where" = 'swap' where "group" = 1;
            update "order" set "where" = 'where 1' where "group" = 2;
            update "order" set "where" = 'where 2' where "group" = 1;
            delete from "order" where "group" > 90;
            "#,
        )
        .await
        .unwrap();
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &tables,
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    for client in [&provider, &subscriber] {
        let y: i64 = client
            .query_one("select count(*) from y", &[])
            .await
            .expect("table y is still there")
            .get(0);
        assert_eq!(y, 1);
    }
    common::replication::assert_sequences_caught_up(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &[r#""My Schema"."Mixed Case.Table ü_Id_seq""#],
    )
    .await;
    let log = pair.replay_log();
    assert!(!log.contains("WARN"), "{log}");
}
