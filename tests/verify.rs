//! Verifying replication: `compare` proves both sides identical at one point while the
//! application writes, `repair` lists and fixes rows changed behind replay's back.

mod common;

use std::time::{Duration, Instant};

use common::replication::{
    run, wait_identical, wait_tables_ok, Pair, WriteLoad, SCHEMA, SEED_DATA, TABLES,
};
use common::{ferry, KillDaemonOnDrop};

/// The big table compare and repair must handle with bounded memory and a brief lock.
const BIG: &str = "create table big (id bigint primary key, v text not null, n int);";
const BIG_ROWS: i64 = 1_000_000;

/// On a million-row table beside the walk-through's tables under a write load: compare finds
/// both sides identical while the provider's tables stay locked under a second; a row
/// changed, one deleted and one added on the subscriber behind replay's back are found (the
/// key ranges named), listed by repair, fixed by `repair --apply`, and compare agrees again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_repair_a_million_rows_under_load() {
    let schema = format!("{SCHEMA}{BIG}");
    let pair = Pair::new("compare", &schema, Some(&schema)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute(&format!(
            "{SEED_DATA} insert into big select i, md5(i::text), i % 1000 from generate_series(1, {BIG_ROWS}) i"
        ))
        .await
        .unwrap();
    // exact statistics: the copy's expected rows come from them
    provider.batch_execute("vacuum big").await.unwrap();
    pair.install_and_start_ticker();
    pair.add_everything();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    pair.add_to_londiste_ini(&format!("metrics_port = {port}\n"));
    run(&londiste, &["replay", "-d"]);

    // while big copies, status, `subscriber tables` and the metrics say how far it has got
    let started = Instant::now();
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let (mut in_status, mut in_tables, mut in_metrics, mut in_view) = (None, None, None, None);
    while in_status.is_none() || in_tables.is_none() || in_metrics.is_none() || in_view.is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no copy progress seen: status {in_status:?}, tables {in_tables:?}, metrics {in_metrics:?}, view {in_view:?}"
        );
        let status: serde_json::Value =
            serde_json::from_str(&run(&londiste, &["status", "--json"])).unwrap();
        let big = status["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["table"] == "public.big")
            .unwrap()
            .clone();
        if big["state"] == "ok" || big["state"] == "catching-up" {
            break;
        }
        if big["copy"]["rows_done"].as_i64().unwrap_or(0) > 0 {
            in_status.get_or_insert(big["copy"].clone());
            // the same for any monitoring tool
            let row = subscriber
                .query_opt(
                    "select rows_done, rows_expected from ferry.stat_copy where table_name = 'big'",
                    &[],
                )
                .await
                .unwrap();
            if let Some(row) = row {
                in_view.get_or_insert((row.get::<_, i64>(0), row.get::<_, Option<i64>>(1)));
            }
        }
        let tables = run(&londiste, &["subscriber", "tables"]);
        if let Some(line) = tables
            .lines()
            .find(|l| l.starts_with("public.big in-copy (copied "))
        {
            in_tables.get_or_insert(line.to_string());
        }
        if let Ok(response) = ureq::get(&format!("http://127.0.0.1:{port}/metrics")).call() {
            let body = response.into_body().read_to_string().unwrap();
            let value = |name: &str| {
                body.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name} ")))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            };
            if value("ferry_replay_copy_rows") > 0.0 {
                in_metrics.get_or_insert((
                    value("ferry_replay_copy_rows"),
                    value("ferry_replay_copy_rows_expected"),
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let copy = in_status.expect("copy progress in status");
    assert_eq!(copy["rows_expected"], BIG_ROWS, "{copy}");
    assert!(copy["bytes_done"].as_i64().unwrap() > 0, "{copy}");
    let line = in_tables.expect("copy progress in subscriber tables");
    assert!(line.contains(&format!(" of ~{BIG_ROWS} rows (")), "{line}");
    let (rows, expected) = in_metrics.expect("copy progress in the metrics");
    assert!(rows <= BIG_ROWS as f64 && expected == BIG_ROWS as f64);
    let (rows, expected) = in_view.expect("copy progress in ferry.stat_copy");
    assert!(rows > 0 && expected == Some(BIG_ROWS));
    wait_tables_ok(&londiste, Duration::from_secs(300), || pair.replay_log());
    let config = londiste.to_str().unwrap();

    // bad input first: a table not replicated, and one that does not exist
    provider
        .batch_execute("create table lonely (id int primary key)")
        .await
        .unwrap();
    for (table, says) in [
        ("lonely", "table public.lonely is not replicated by queue"),
        ("nowhere.t", "table nowhere.t is not replicated by queue"),
    ] {
        let out = ferry(&[config, "compare", table]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
    }

    let load = WriteLoad::start(&pair.provider.conninfo, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let compared = run(&londiste, &["compare", "--all", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&compared).expect("json");
    let lock_ms = report["lock_held_ms"].as_f64().unwrap();
    assert!(lock_ms < 1000.0, "provider locked {lock_ms} ms");
    let tables = report["tables"].as_array().unwrap();
    assert_eq!(tables.len(), TABLES.len() + 1, "{compared}");
    for t in tables {
        assert_eq!(t["rows_differ"], 0, "{compared}");
        assert_eq!(
            t["provider_checksum"], t["subscriber_checksum"],
            "{compared}"
        );
    }
    let big = tables.iter().find(|t| t["table"] == "public.big").unwrap();
    assert_eq!(big["provider_rows"], BIG_ROWS, "{compared}");

    // behind replay's back, as only a superuser can
    subscriber
        .batch_execute(
            "begin; set local ferry.replay = 'on'; set local session_replication_role = replica;
             update big set v = 'tampered' where id = 500000;
             delete from big where id = 10;
             insert into big values (2000000, 'extra', 0);
             commit",
        )
        .await
        .unwrap();
    let out = ferry(&[config, "compare", "big", "table4"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("public.big: provider 1000000 rows, subscriber 1000000 rows"),
        "{stdout}"
    );
    assert!(stdout.contains(": 3 rows differ"), "{stdout}");
    assert!(
        stdout.contains("public.table4: provider 50 rows"),
        "{stdout}"
    );
    assert!(stdout.contains("identical"), "table4 is: {stdout}");
    // the key ranges holding them, in key order
    for range in [
        "  keys id=1 .. id=10000: 1 rows differ",
        "  keys id=490001 .. id=500000: 1 rows differ",
        "  keys id=2000000 .. id=2000000: 1 rows differ",
    ] {
        assert!(stdout.contains(range), "{range}: {stdout}");
    }

    let out = ferry(&[config, "repair", "big"]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let listed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("public.big "))
        .collect();
    assert_eq!(
        listed,
        [
            "public.big id=10 missing",
            "public.big id=500000 different",
            "public.big id=2000000 extra"
        ],
        "{stdout}"
    );
    let repaired = run(&londiste, &["repair", "big", "--apply"]);
    assert!(
        repaired.contains("repaired 3 rows on the subscriber"),
        "{repaired}"
    );
    let fixed: bool = subscriber
        .query_one("select v = md5('500000') from big where id = 500000", &[])
        .await
        .unwrap()
        .get(0);
    assert!(fixed, "row 500000 not repaired");

    load.stop().await;
    let mut all: Vec<&str> = TABLES.to_vec();
    all.push("big");
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &all,
        Duration::from_secs(120),
        || pair.replay_log(),
    )
    .await;
    let again = run(&londiste, &["compare", "--all"]);
    assert!(!again.contains("differ"), "{again}");
    let counted = run(&londiste, &["compare", "--count-only", "big"]);
    assert!(
        counted.contains("public.big: provider 1000000 rows, subscriber 1000000 rows: identical"),
        "{counted}"
    );
    let nothing = run(&londiste, &["repair", "--all", "--apply"]);
    assert!(nothing.contains("no rows differ"), "{nothing}");

    // the postgres_exporter queries README points to work on each side
    let exporter = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../etc/postgres_exporter.yaml"),
    )
    .unwrap();
    let mut side = "";
    let mut ran = 0;
    for line in exporter.lines() {
        if let Some(name) = line.strip_suffix(':').filter(|l| l.starts_with("ferry_")) {
            side = name;
        }
        if let Some(query) = line.trim().strip_prefix("query: ") {
            let query = query.trim_matches('"');
            let client = if side.starts_with("ferry_provider_") {
                &provider
            } else {
                &subscriber
            };
            let rows = client
                .query(query, &[])
                .await
                .unwrap_or_else(|e| panic!("{side}: {e:?}"));
            if side != "ferry_subscriber_copy" {
                assert!(!rows.is_empty(), "{side} returned no row");
            }
            ran += 1;
        }
    }
    assert_eq!(ran, 3);

    // replay stopped: compare cannot reach its point, says so, and releases its hold
    run(&londiste, &["-s"]);
    let out = ferry(&[config, "compare", "table4", "--timeout", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("replay did not reach tick"), "{stderr}");
    let held: Option<i64> = provider
        .query_one(
            r#"select max("sub_hold_tick") from "ferry"."subscription""#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(held, None, "the hold outlived the command");
}

/// `execute` under a write load: a column added (and back-filled in the same file), an index
/// and a new table reach the subscriber at exactly their place in the stream, both sides
/// identical after; running the file again is harmless; a file with a syntax error, one
/// controlling transactions and one dropping a replicated table change nothing anywhere; a
/// file the subscriber cannot run stops replay there, named in `status`, until fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_changes_the_schema_under_load() {
    let pair = Pair::new("execute", SCHEMA, Some(SCHEMA)).await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    provider.batch_execute(SEED_DATA).await.unwrap();
    pair.install_and_start_ticker();
    pair.add_everything();
    run(&londiste, &["replay", "-d"]);
    wait_tables_ok(&londiste, Duration::from_secs(120), || pair.replay_log());
    let config = londiste.to_str().unwrap();
    let file = |name: &str, sql: &str| {
        let path = pair.dir.path().join(name);
        std::fs::write(&path, sql).unwrap();
        path.to_str().unwrap().to_string()
    };
    let load = WriteLoad::start(&pair.provider.conninfo, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let add = file(
        "add_note.sql",
        "alter table table1 add column note text not null default 'none';
         -- back-filled in the same file: these row changes need the column on the subscriber
         update table1 set note = 'early ' || id where id <= 100;
         create index table1_amount on table1 (amount);
         create table table5 (id int primary key, v text);",
    );
    let out = run(&londiste, &["execute", &add]);
    assert!(
        out.contains("add_note.sql: executed on the provider"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    provider
        .batch_execute("update table1 set note = 'later' where id between 200 and 300")
        .await
        .unwrap();
    let again = run(&londiste, &["execute", &add]);
    assert!(
        again.contains("add_note.sql: executed here before; not run again"),
        "{again}"
    );
    load.stop().await;
    run(&londiste, &["wait-sync", "--timeout", "60"]);
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        TABLES,
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    let notes: i64 = subscriber
        .query_one("select count(*) from table1 where note like 'early %'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(notes > 0, "the back-fill did not reach the subscriber");
    let there: bool = subscriber
        .query_one(
            "select to_regclass('table1_amount') is not null and to_regclass('table5') is not null",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        there,
        "the index or the new table is missing on the subscriber"
    );
    let recorded: i64 = subscriber
        .query_one("select count(*) from ferry.subscriber_execute", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(recorded, 1);

    // refused on the provider, nothing applied anywhere
    for (name, sql, says) in [
        (
            "typo.sql",
            "alter table table2 add column x int; alter tabel table2 add column y int;",
            "failed on the provider; nothing was applied anywhere",
        ),
        (
            "commits.sql",
            "alter table table2 add column x int; commit;",
            "controls transactions (commit)",
        ),
        (
            "drops.sql",
            "alter table table2 add column x int; drop table table4;",
            "renames or drops public.table4 that queue",
        ),
        (
            "renames.sql",
            "alter table table2 add column x int; alter table table3 rename to table3_old;",
            "renames or drops public.table3 that queue",
        ),
    ] {
        let out = ferry(&[config, "execute", &file(name, sql)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(says), "{name}: {stderr}");
    }
    run(&londiste, &["wait-sync", "--timeout", "60"]);
    for client in [&provider, &subscriber] {
        assert!(
            !column_exists(client, "table2", "x").await,
            "a refused file left a column"
        );
    }
    let exists: bool = provider
        .query_one("select to_regclass('table4') is not null", &[])
        .await
        .unwrap()
        .get(0);
    assert!(exists);

    // the subscriber cannot run it: replay stops there, names the file, goes on once fixed
    subscriber
        .batch_execute("create table table6 (id int)")
        .await
        .unwrap();
    run(
        &londiste,
        &[
            "execute",
            &file("table6.sql", "create table table6 (id int primary key);"),
        ],
    );
    provider
        .batch_execute("insert into table4 values ('after table6', 1)")
        .await
        .unwrap();
    let mut status = String::new();
    common::wait_until(
        "replay to record the failing file",
        Duration::from_secs(60),
        || {
            status = run(&londiste, &["status", "--json"]);
            status.contains(r#"file \"table6.sql\" (run through the queue"#)
        },
    );
    assert!(status.contains("already exists"), "{status}");
    let out = ferry(&[config, "wait-sync", "--timeout", "1"]);
    assert_eq!(out.status.code(), Some(1));
    subscriber.batch_execute("drop table table6").await.unwrap();
    run(&londiste, &["wait-sync", "--timeout", "60"]);
    let arrived: i64 = subscriber
        .query_one(
            "select count(*) from table4 where code = 'after table6'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(arrived, 1);
    assert!(column_exists(&subscriber, "table6", "id").await);
}

/// Whether `table` has `column`.
async fn column_exists(client: &tokio_postgres::Client, table: &str, column: &str) -> bool {
    client
        .query_one(
            "select count(*) > 0 from information_schema.columns where table_name = $1 and column_name = $2",
            &[&table, &column],
        )
        .await
        .unwrap()
        .get(0)
}
