//! The fidelity round trip: one column of every built-in type family, values that break naive
//! encodings, through the copy and through events, compared as text on both sides. Used by
//! `tests/replication.rs` (one cluster) and `tests/versions.rs` (every major-version pair).

use std::time::Duration;

use super::replication::{run, wait_all_ok, Pair};
use super::KillDaemonOnDrop;

/// Columns of the fidelity table: one of every built-in type family, and values that break
/// naive encodings (special floats, json spacing and duplicate keys, quotes in arrays,
/// infinities, time zones, a multi-megabyte TOASTed value).
pub const FIDELITY_COLUMNS: &[(&str, &str, &str, &str)] = &[
    // name, type, value A, value B
    (
        "n",
        "numeric",
        "'NaN'",
        "'123456789012345678901234567890.123456789012345'",
    ),
    ("n_inf", "numeric", "'Infinity'", "'-Infinity'"),
    ("f8", "float8", "'-0'", "'1.7976931348623157e308'"),
    ("f8b", "float8", "'NaN'", "'0.1'"),
    ("f4", "real", "'-Infinity'", "'1.4e-45'"),
    ("i2", "smallint", "-32768", "32767"),
    (
        "i8",
        "bigint",
        "-9223372036854775808",
        "9223372036854775807",
    ),
    ("m", "money", "'12.34'", "'-0.01'"),
    ("t", "text", "E'tab\\there \"quoted\" \\\\ back, 😀'", "''"),
    ("vc", "varchar(10)", "'short'", "'ten chars!'"),
    ("ch", "char(5)", "'ab'", "'abcde'"),
    ("b", "bytea", "'\\x00ff10'", "'\\x'"),
    ("bo", "boolean", "true", "false"),
    ("d", "date", "'infinity'", "'4713-01-01 BC'"),
    ("d2", "date", "'-infinity'", "'2024-02-29'"),
    (
        "ts",
        "timestamp",
        "'infinity'",
        "'1999-12-31 23:59:59.999999'",
    ),
    (
        "tstz",
        "timestamptz",
        "'2024-03-31 02:30:00+05:45'",
        "'-infinity'",
    ),
    ("tm", "time", "'24:00:00'", "'00:00:00.000001'"),
    ("tmtz", "timetz", "'12:34:56+14'", "'00:00:00-12'"),
    (
        "iv",
        "interval",
        "'-1 year 2 months -3 days 04:05:06.789'",
        "'1 day -00:00:01'",
    ),
    // (whitespace around a whole json value is not kept by events: see README, known limits)
    (
        "j",
        "json",
        "'{\"a\" : 1,   \"a\":2, \"b\": [1, 2 ,3]}'",
        "'[ \"just\",\"a string\" ]'",
    ),
    (
        "jb",
        "jsonb",
        "'{\"x\": {\"y\": [null, true, 1.50]}}'",
        "'[]'",
    ),
    // the JSON value null is not SQL NULL (the row's json cannot tell them apart: ev_extra3)
    ("jn", "json", "'null'", "'\"null\"'"),
    ("jbn", "jsonb", "'null'", "'{\"k\": null}'"),
    ("x", "xml", "'<a x=\"1\">text &amp; more</a>'", "'<empty/>'"),
    (
        "u",
        "uuid",
        "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
        "'00000000-0000-0000-0000-000000000000'",
    ),
    ("ia", "int[]", "'{1,NULL,3}'", "'{{1,2},{3,4}}'"),
    (
        "ta",
        "text[]",
        "ARRAY[NULL, 'a\"b', 'c,d', 'NULL', '{}', ' ']",
        "'{}'",
    ),
    ("r", "int4range", "'[1,5)'", "'empty'"),
    (
        "tr",
        "tstzrange",
        "'[2024-01-01 00:00+00,infinity)'",
        "'(,)'",
    ),
    ("nr", "numrange", "'(1.5,2.25]'", "'[-Infinity,0]'"),
    ("ip", "inet", "'192.168.0.1/24'", "'::ffff:1.2.3.4'"),
    ("cidr_", "cidr", "'10.0.0.0/8'", "'2001:db8::/32'"),
    (
        "mac",
        "macaddr",
        "'08:00:2b:01:02:03'",
        "'ff:ff:ff:ff:ff:ff'",
    ),
    ("pt", "point", "'(1.5,-2)'", "'(0,-0)'"),
    ("bx", "box", "'(1,1),(0,0)'", "'(2,3),(-1,-1)'"),
    ("pg", "polygon", "'((0,0),(1,1),(1,0))'", "'((0,0))'"),
    ("ci", "circle", "'<(0,0),1.5>'", "'<(1,1),0>'"),
    ("ln", "line", "'{1,-1,0}'", "'{0,1,2}'"),
    ("ls", "lseg", "'[(0,0),(1,1)]'", "'[(1,2),(3,4)]'"),
    ("pa", "path", "'[(0,0),(1,1),(2,0)]'", "'((0,0),(1,1))'"),
    ("e", "mood", "'happy'", "'sad'"),
    ("dm", "posint", "1", "2147483647"),
    (
        "cp",
        "pair",
        "ROW(1, 'a \"quoted\", label')::pair",
        "ROW(NULL, NULL)::pair",
    ),
    ("bits", "bit varying(16)", "B'1010'", "B''"),
    ("bit4", "bit(4)", "B'1010'", "B'0001'"),
    ("tsv", "tsvector", "'a fat:2 cat'", "''"),
    (
        "big",
        "text",
        "(select string_agg(md5(i::text), '') from generate_series(1, 100000) i)",
        "repeat('y', 3000000)",
    ),
];

/// The first major version that has a column's type or values (numeric infinities, also as
/// range bounds: 14).
fn since(column: &str) -> u32 {
    match column {
        "n_inf" | "nr" => 14,
        _ => 12,
    }
}

/// The fidelity columns both sides of major version `version` and later can hold.
fn columns(
    version: u32,
) -> impl Iterator<Item = &'static (&'static str, &'static str, &'static str, &'static str)> {
    FIDELITY_COLUMNS
        .iter()
        .filter(move |c| since(c.0) <= version)
}

/// The fidelity columns set-wise apply passes as text (no arrays or composites, which go
/// through `json_populate_record`; not the two whose value A is the JSON null, which sends a
/// row one by one; not the multi-megabyte one): the columns of `fidelity_flat`, whose bulk
/// insert replay applies by `COPY`.
fn flat_columns(
    version: u32,
) -> impl Iterator<Item = &'static (&'static str, &'static str, &'static str, &'static str)> {
    columns(version)
        .filter(|c| !c.1.ends_with("[]") && c.1 != "pair" && !["big", "jn", "jbn"].contains(&c.0))
}

/// The major version of the server at `conninfo`.
pub async fn server_major(conninfo: &str) -> u32 {
    let version: i32 = ferry_testkit::connect(conninfo)
        .await
        .query_one("select current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    version as u32 / 10000
}

/// The fidelity table (with `reverse`, its columns in the other order) for servers of major
/// version `version` and later.
pub fn fidelity_schema(reverse: bool, version: u32) -> String {
    let definitions = |columns: &mut dyn Iterator<Item = &(&str, &str, &str, &str)>| {
        let mut list: Vec<String> = columns
            .map(|(name, ty, _, _)| format!("{name} {ty}"))
            .collect();
        if reverse {
            list.reverse();
        }
        list.join(", ")
    };
    format!(
        "create type mood as enum ('sad', 'ok', 'happy');
         create domain posint as int check (value > 0);
         create type pair as (x int, label text);
         create table fidelity ({}, id int primary key);
         create table fidelity_flat ({}, id int primary key);",
        definitions(&mut columns(version)),
        definitions(&mut flat_columns(version))
    )
}

/// `insert into fidelity (id, cols...) values (id, values...)` with value set A or B.
fn fidelity_insert(id: i32, second: bool, version: u32) -> String {
    let names: Vec<&str> = columns(version).map(|c| c.0).collect();
    let values: Vec<&str> = columns(version)
        .map(|c| if second { c.3 } else { c.2 })
        .collect();
    format!(
        "insert into fidelity (id, {}) values ({id}, {})",
        names.join(", "),
        values.join(", ")
    )
}

/// Each column of each row of `fidelity` and `fidelity_flat` as text, from one side (a flat
/// row's id counted from 100 000).
async fn fidelity_rows(conninfo: &str, version: u32) -> Vec<(i32, String, Option<String>)> {
    let client = ferry_testkit::connect(conninfo).await;
    client
        .batch_execute("set extra_float_digits = 3; set timezone = 'UTC'; set datestyle = 'ISO, YMD'; set intervalstyle = 'postgres'")
        .await
        .unwrap();
    let mut out = Vec::new();
    let tables: [(&str, i32, Vec<&str>); 2] = [
        ("fidelity", 0, columns(version).map(|c| c.0).collect()),
        (
            "fidelity_flat",
            100_000,
            flat_columns(version).map(|c| c.0).collect(),
        ),
    ];
    for (table, offset, names) in tables {
        for name in names {
            for row in client
                .query(
                    &format!("select id + {offset}, {name}::text from {table} order by id"),
                    &[],
                )
                .await
                .unwrap()
            {
                out.push((row.get(0), name.to_string(), row.get(1)));
            }
        }
    }
    out
}

/// One transaction inserting 300 rows of value set A, 300 of B and 300 of NULLs into
/// `fidelity_flat` (ids from `first`), each set by one `INSERT ... SELECT`.
fn flat_bulk_insert(first: i32, version: u32) -> String {
    let names: Vec<&str> = flat_columns(version).map(|c| c.0).collect();
    let mut sql = String::from("begin;");
    for (set, values) in [
        flat_columns(version).map(|c| c.2).collect::<Vec<_>>(),
        flat_columns(version).map(|c| c.3).collect(),
        flat_columns(version).map(|_| "null").collect(),
    ]
    .iter()
    .enumerate()
    {
        let from = first + 300 * set as i32;
        sql.push_str(&format!(
            "insert into fidelity_flat (id, {}) select g, {} from generate_series({from}, {}) g;",
            names.join(", "),
            values.join(", "),
            from + 299
        ));
    }
    sql.push_str("commit;");
    sql
}

/// Replicates the fidelity table of `pair` (made with [`fidelity_schema`]: `false` on the
/// provider, `true` on the subscriber) through the copy and through events (insert, update of
/// every column, primary-key update, delete), whatever the writer's session settings, and
/// asserts every value arrived exactly, all through set-wise apply where it can.
pub async fn round_trip(pair: &Pair, version: u32) {
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    let writer = ferry_testkit::connect(&pair.provider.conninfo).await;
    // settings that change how values are written out
    writer
        .batch_execute(
            "set datestyle = 'SQL, DMY'; set intervalstyle = 'sql_standard'; \
             set extra_float_digits = -15; set bytea_output = 'escape'; \
             set timezone = 'Asia/Kathmandu'",
        )
        .await
        .unwrap();
    // through the copy
    writer
        .batch_execute(&fidelity_insert(1, false, version))
        .await
        .unwrap();
    writer
        .batch_execute(&fidelity_insert(2, true, version))
        .await
        .unwrap();
    writer
        .batch_execute("insert into fidelity (id) values (3)")
        .await
        .unwrap();
    pair.install_and_start_ticker();
    // -v: the debug log says which inserts went in by COPY
    run(&londiste, &["replay", "-d", "-v"]);
    run(&londiste, &["provider", "add", "fidelity", "fidelity_flat"]);
    run(
        &londiste,
        &["subscriber", "add", "fidelity", "fidelity_flat"],
    );
    wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());

    // through events
    writer
        .batch_execute(&fidelity_insert(11, false, version))
        .await
        .unwrap();
    writer
        .batch_execute(&fidelity_insert(12, true, version))
        .await
        .unwrap();
    writer
        .batch_execute("insert into fidelity (id) values (13)")
        .await
        .unwrap();
    writer
        .batch_execute(&fidelity_insert(14, false, version))
        .await
        .unwrap();
    writer
        .batch_execute(&fidelity_insert(15, false, version))
        .await
        .unwrap();
    let all: Vec<&str> = columns(version).map(|c| c.0).collect();
    let set_from = |target: i32, source: i32| {
        format!(
            "update fidelity set ({cols}) = (select {cols} from fidelity where id = {source}) where id = {target}",
            cols = all.join(", ")
        )
    };
    writer.batch_execute(&set_from(11, 2)).await.unwrap(); // every column changes
    writer.batch_execute(&set_from(13, 1)).await.unwrap(); // from NULLs to values
    writer.batch_execute(&set_from(2, 3)).await.unwrap(); // from values to NULLs
    writer
        .batch_execute("update fidelity set id = 20 where id = 12")
        .await
        .unwrap();
    writer
        .batch_execute("update fidelity set id = 21, t = 'moved' where id = 14")
        .await
        .unwrap();
    writer
        .batch_execute("delete from fidelity where id = 1")
        .await
        .unwrap();
    // a bulk insert: its rows go in by COPY
    writer
        .batch_execute(&flat_bulk_insert(1, version))
        .await
        .unwrap();

    let expected = fidelity_rows(&pair.provider.conninfo, version).await;
    let start = std::time::Instant::now();
    loop {
        let got = fidelity_rows(&pair.subscriber.conninfo, version).await;
        if got == expected {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let diff: Vec<String> = expected
                .iter()
                .filter(|e| !got.contains(e))
                .map(|(id, col, v)| {
                    let shown = v.as_deref().map(|v| v.chars().take(80).collect::<String>());
                    format!("row {id} column {col}: provider {shown:?}")
                })
                .collect();
            panic!(
                "values differ:\n{}\nreplay log:\n{}",
                diff.join("\n"),
                pair.replay_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ids: Vec<i32> = expected.iter().map(|r| r.0).collect();
    assert!(ids.contains(&20) && ids.contains(&21) && !ids.contains(&1) && !ids.contains(&12));
    // every value went through set-wise apply (text arrays, json for arrays and composites),
    // not through the event-order retry
    assert!(
        !pair.replay_log().contains("again in event order"),
        "set-wise apply failed:\n{}",
        pair.replay_log()
    );
    // the bulk insert's rows went in by COPY (all 900 at once, unless the batch was read in
    // parts that cut it: replay copies in 200 inserts and more)
    assert!(
        pair.replay_log()
            .lines()
            .any(|l| l.contains("inserts copied in")
                && l.contains("table=public.fidelity_flat")
                && l.split_once("rows=")
                    .and_then(|(_, n)| n.trim().parse::<u32>().ok())
                    .is_some_and(|n| (200..=900).contains(&n))),
        "no COPY of the bulk insert:\n{}",
        pair.replay_log()
    );
}
