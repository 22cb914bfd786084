//! Helpers for replication tests: a provider and a subscriber database with configs in the
//! seed's shape, a concurrent write load, and table comparison.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_testkit::{Cluster, TestDb};
use rand::Rng;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::ferry;

/// The walk-through's schema: tables of several key shapes, sequences, data to copy.
pub const SCHEMA: &str = r#"
create table table1 (id serial primary key, name text not null, amount numeric(12,2),
                     updated timestamptz default now());
create table table2 (a int, b int, payload jsonb, primary key (a, b));
create table table3 (id bigserial primary key, ref int, note text);
create table table4 (code text primary key, counter int not null default 0);
create sequence extra_seq;
"#;

/// Rows present before replication starts (the copy carries them).
pub const SEED_DATA: &str = r#"
insert into table1 (name, amount) select 'name ' || i, i / 7.0 from generate_series(1, 20000) i;
insert into table2 select i % 100, i, jsonb_build_object('i', i) from generate_series(1, 5000) i;
insert into table3 (ref, note) select i, repeat('x', i % 50) from generate_series(1, 20000) i;
insert into table4 select 'code' || i, 0 from generate_series(1, 50) i;
"#;

/// The walk-through's tables.
pub const TABLES: &[&str] = &["table1", "table2", "table3", "table4"];

/// A provider and a subscriber database and a directory for configs, logs and pid files.
pub struct Pair {
    pub provider: TestDb,
    pub subscriber: TestDb,
    pub dir: tempfile::TempDir,
}

impl Pair {
    /// Two fresh databases; `schema` runs on the provider and `subscriber_schema` (if any) on
    /// the subscriber. Writes ticker.ini and londiste.ini.
    pub async fn new(name: &str, schema: &str, subscriber_schema: Option<&str>) -> Pair {
        let cluster = Cluster::shared();
        Pair::on_clusters(name, schema, subscriber_schema, cluster, cluster).await
    }

    /// As [`Pair::new`], with the provider and the subscriber database on the given clusters
    /// (a test's own, when it stops servers).
    pub async fn on_clusters(
        name: &str,
        schema: &str,
        subscriber_schema: Option<&str>,
        provider: &Cluster,
        subscriber: &Cluster,
    ) -> Pair {
        let pair = Pair {
            provider: provider.database(&format!("{name}_p")).await,
            subscriber: subscriber.database(&format!("{name}_s")).await,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        ferry_testkit::connect(&pair.provider.conninfo)
            .await
            .batch_execute(schema)
            .await
            .expect("provider schema");
        if let Some(sub) = subscriber_schema {
            ferry_testkit::connect(&pair.subscriber.conninfo)
                .await
                .batch_execute(sub)
                .await
                .expect("subscriber schema");
        }
        std::fs::write(
            pair.ticker_ini(),
            format!(
                "[pgqadm]\njob_name = test-ticker\ndb = {}\nloop_delay = 0.05\nmaint_delay = 600\n\
                 logfile = %(job_name)s.log\npidfile = %(job_name)s.pid\n",
                pair.provider.conninfo
            ),
        )
        .expect("write ticker.ini");
        pair.write_londiste_ini(&pair.londiste_ini(), "test-londiste", &pair.subscriber);
        pair
    }

    pub fn ticker_ini(&self) -> PathBuf {
        self.dir.path().join("ticker.ini")
    }

    pub fn londiste_ini(&self) -> PathBuf {
        self.dir.path().join("londiste.ini")
    }

    /// Writes a [londiste] config replicating the provider into `subscriber` as `job_name`.
    pub fn write_londiste_ini(&self, path: &Path, job_name: &str, subscriber: &TestDb) {
        std::fs::write(
            path,
            format!(
                "[londiste]\njob_name = {job_name}\nprovider_db = {}\nsubscriber_db = {}\n\
                 pgq_queue_name = test-queue\nloop_delay = 0.2\n\
                 logfile = %(job_name)s.log\npidfile = %(job_name)s.pid\n",
                self.provider.conninfo, subscriber.conninfo
            ),
        )
        .expect("write londiste.ini");
    }

    /// Appends `lines` (`key = value`, each ending in a newline) to londiste.ini.
    #[allow(dead_code)]
    pub fn add_to_londiste_ini(&self, lines: &str) {
        let path = self.londiste_ini();
        let ini = std::fs::read_to_string(&path).expect("read londiste.ini");
        std::fs::write(&path, format!("{ini}{lines}")).expect("write londiste.ini");
    }

    /// Installs the queue, starts the ticker detached, installs provider and subscriber: the
    /// setup every test shares before it adds tables.
    pub fn install_and_start_ticker(&self) {
        run(&self.ticker_ini(), &["install"]);
        run(&self.ticker_ini(), &["ticker", "-d"]);
        run(&self.londiste_ini(), &["provider", "install"]);
        run(&self.londiste_ini(), &["subscriber", "install"]);
    }

    /// Sets the ticker's `maint_delay` (seconds) in ticker.ini, for tests that need rotations;
    /// before the ticker starts.
    pub fn set_maint_delay(&self, secs: &str) {
        let ini = std::fs::read_to_string(self.ticker_ini())
            .expect("read ticker.ini")
            .replace("maint_delay = 600", &format!("maint_delay = {secs}"));
        std::fs::write(self.ticker_ini(), ini).expect("write ticker.ini");
    }

    /// `provider add --all`, `subscriber add --all` and the same for sequences.
    pub fn add_everything(&self) {
        let londiste = self.londiste_ini();
        run(&londiste, &["provider", "add", "--all"]);
        run(&londiste, &["subscriber", "add", "--all"]);
        run(&londiste, &["provider", "add-seq", "--all"]);
        run(&londiste, &["subscriber", "add-seq", "--all"]);
    }

    /// The ticker's log, for failure messages.
    pub fn ticker_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("test-ticker.log")).unwrap_or_default()
    }

    /// The replay log of the default subscriber, for failure messages.
    pub fn replay_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("test-londiste.log")).unwrap_or_default()
    }

    /// The positive barrier before a negative check ("not applied"): ticks the queue, then
    /// waits until the default subscriber's replay has begun two rounds since: asked the queue
    /// for a batch twice (`ferry.subscription.sub_active`), or, when it is held before asking
    /// (a refused position), connected to the provider twice (`pg_stat_activity`). So at least
    /// one whole round ran after everything written before this call was ticked: whatever
    /// replay would apply of it, it has applied or tried to. Returns the tick.
    #[allow(dead_code)]
    pub async fn wait_replay_rounds_after_writes(&self) -> i64 {
        let provider = ferry_testkit::connect(&self.provider.conninfo).await;
        let tick = ferry_queue::tick(&provider, "test-queue").await.unwrap();
        let since: std::time::SystemTime = provider
            .query_one("select clock_timestamp()", &[])
            .await
            .unwrap()
            .get(0);
        let (mut asks, mut connects) = (Vec::new(), Vec::new());
        let start = Instant::now();
        while asks.len() < 2 && connects.len() < 2 {
            let row = provider
                .query_one(
                    r#"select (select s."sub_active" from "ferry"."subscription" s
                                 join "ferry"."queue" q on q."queue_id" = s."sub_queue"
                                where q."queue_name" = 'test-queue'
                                  and s."sub_consumer" = 'test-londiste'),
                              array(select backend_start from pg_stat_activity
                                     where application_name = 'ferry replay test-londiste')"#,
                    &[],
                )
                .await
                .unwrap();
            let asked: std::time::SystemTime = row.get(0);
            let backends: Vec<std::time::SystemTime> = row.get(1);
            if asked > since && !asks.contains(&asked) {
                asks.push(asked);
            }
            for started in backends {
                if started > since && !connects.contains(&started) {
                    connects.push(started);
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "replay did not begin two rounds after tick {tick}:\n{}",
                self.replay_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tick
    }

    /// Waits until the replay log has a line containing every one of `needles`; returns that
    /// line. Panics with the log after `limit`.
    pub async fn wait_for_replay_line(&self, needles: &[&str], limit: Duration) -> String {
        let start = Instant::now();
        loop {
            let log = self.replay_log();
            if let Some(line) = log
                .lines()
                .find(|line| needles.iter().all(|n| line.contains(n)))
            {
                return line.to_string();
            }
            if start.elapsed() > limit {
                panic!("no replay log line with {needles:?} after {limit:?}:\n{log}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs `ferry ARGS` with the given config paths, insisting on success.
pub fn run(config: &Path, args: &[&str]) -> String {
    let mut all = vec![config.to_str().unwrap()];
    all.extend_from_slice(args);
    super::ferry_ok(&all)
}

/// The seed's check, literally: how many tables `subscriber tables` shows not `ok`.
pub fn tables_not_ok(config: &Path) -> usize {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} {} subscriber tables | tail -n+2 | awk '{{print $2}}' | grep -v ok | wc -l",
            super::ferry_bin(),
            config.display()
        ))
        .output()
        .expect("sh runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("wc prints a number")
}

/// Polls the seed's check until every table is `ok`.
pub fn wait_all_ok(config: &Path, limit: Duration, log: impl Fn() -> String) {
    let start = Instant::now();
    while tables_not_ok(config) != 0 {
        if start.elapsed() > limit {
            panic!(
                "tables not ok after {limit:?}:\n{}\nreplay log:\n{}",
                String::from_utf8_lossy(
                    &ferry(&[config.to_str().unwrap(), "subscriber", "tables"]).stdout
                ),
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls `subscriber tables --json` until `table` (as listed, `public.t`) is in `state`.
#[allow(dead_code)]
pub fn wait_table_state(
    config: &Path,
    table: &str,
    state: &str,
    limit: Duration,
    log: impl Fn() -> String,
) {
    let start = Instant::now();
    loop {
        let listed = run(config, &["subscriber", "tables", "--json"]);
        let rows: serde_json::Value = serde_json::from_str(&listed).expect("a json listing");
        let found = rows
            .as_array()
            .expect("an array")
            .iter()
            .any(|row| row["table"] == table && row["state"] == state);
        if found {
            return;
        }
        if start.elapsed() > limit {
            panic!(
                "{table} not {state} after {limit:?}:\n{listed}\nreplay log:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `subscriber tables` until every table's state (the line's last word: names may
/// hold spaces, which the seed's awk check cannot take) is `ok`.
pub fn wait_tables_ok(config: &Path, limit: Duration, log: impl Fn() -> String) {
    let start = Instant::now();
    loop {
        let listed = run(config, &["subscriber", "tables"]);
        if listed
            .lines()
            .skip(1)
            .all(|line| line.split_whitespace().last() == Some("ok"))
        {
            return;
        }
        if start.elapsed() > limit {
            panic!(
                "tables not ok after {limit:?}:\n{listed}\nreplay log:\n{}",
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A write load on the walk-through's tables: transactions of a few random changes each
/// (inserts, updates, primary-key updates, deletes, upserts, sequence calls), some rolled
/// back, on `connections` connections, until stopped.
pub struct WriteLoad {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl WriteLoad {
    pub async fn start(conninfo: &str, connections: usize) -> WriteLoad {
        WriteLoad::start_on(Arc::new(Mutex::new(conninfo.to_string())), connections).await
    }

    /// A load on the database `target` names; when `target` changes (a switchover), the
    /// load's sessions move there.
    pub async fn start_on(target: Arc<Mutex<String>>, connections: usize) -> WriteLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let mut conninfo = target.lock().unwrap().clone();
            let mut client = ferry_testkit::connect(&conninfo).await;
            let stop = stop.clone();
            let committed = committed.clone();
            let target = target.clone();
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if one_transaction(&mut client).await {
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    // the server restarted, the session was terminated, or the application
                    // moved: a new session, once the server is back
                    let wanted = target.lock().unwrap().clone();
                    if client.is_closed() || wanted != conninfo {
                        match tokio_postgres::connect(&wanted, tokio_postgres::NoTls).await {
                            Ok((new, connection)) => {
                                tokio::spawn(connection);
                                client = new;
                                conninfo = wanted;
                            }
                            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                        }
                    }
                }
            }));
        }
        WriteLoad {
            stop,
            committed,
            tasks,
        }
    }

    /// Transactions committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    /// Stops the load and waits for its last transactions to end; returns how many committed.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("load task");
        }
        self.committed.load(Ordering::Relaxed)
    }
}

/// One random transaction; `true` when it committed. Conflicts (a key taken meanwhile) just
/// roll the transaction back.
async fn one_transaction(client: &mut Client) -> bool {
    let statements: Vec<String> = {
        let mut rng = rand::rng();
        (0..rng.random_range(1..=5))
            .map(|_| {
                let id = rng.random_range(1..25000);
                let a = rng.random_range(0..100);
                let b = rng.random_range(0..6000);
                match rng.random_range(0..11) {
                    0 | 1 => format!("insert into table1 (name, amount) values ('new {id}', {id} / 3.0)"),
                    2 => format!("update table1 set amount = amount + 1, updated = now() where id = {id}"),
                    3 => format!("update table1 set id = nextval('table1_id_seq') where id = {id}"),
                    4 => format!("delete from table1 where id = {id}"),
                    5 => format!("insert into table2 values ({a}, {b}, '{{\"n\": {id}}}') on conflict (a, b) do update set payload = excluded.payload"),
                    6 => format!("delete from table2 where a = {a} and b = {b}"),
                    7 => format!("insert into table3 (ref, note) values ({id}, 'note {id}')"),
                    8 => format!("update table3 set note = note || '!' where id = {id}"),
                    9 => format!("update table4 set counter = counter + 1 where code = 'code{}'", id % 50 + 1),
                    _ => "select nextval('extra_seq')".to_string(),
                }
            })
            .collect()
    };
    let rollback = rand::rng().random_range(0..10) == 0;
    let Ok(tx) = client.transaction().await else {
        return false;
    };
    for sql in &statements {
        if tx.batch_execute(sql).await.is_err() {
            return false;
        }
    }
    if rollback {
        let _ = tx.rollback().await;
        false
    } else {
        tx.commit().await.is_ok()
    }
}

/// Row count and a checksum of a table's rows (column order does not matter).
pub async fn checksum(client: &Client, table: &str) -> (i64, String) {
    let row = client
        .query_one(
            &format!(
                "select count(*), coalesce(md5(string_agg(to_jsonb(t)::text, E'\\n' order by to_jsonb(t)::text)), '') from {table} t"
            ),
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("checksum of {table}: {e:?}"));
    (row.get(0), row.get(1))
}

/// Waits until every table in `tables` has the same rows on both sides; panics with the
/// differing tables after `limit`.
pub async fn wait_identical(
    provider: &str,
    subscriber: &str,
    tables: &[&str],
    limit: Duration,
    log: impl Fn() -> String,
) {
    let p = ferry_testkit::connect(provider).await;
    let s = ferry_testkit::connect(subscriber).await;
    let start = Instant::now();
    loop {
        let mut differing = Vec::new();
        for table in tables {
            let (a, b) = (checksum(&p, table).await, checksum(&s, table).await);
            if a != b {
                differing.push(format!("{table}: provider {a:?}, subscriber {b:?}"));
            }
        }
        if differing.is_empty() {
            return;
        }
        if start.elapsed() > limit {
            panic!(
                "not identical after {limit:?}:\n{}\nreplay log:\n{}",
                differing.join("\n"),
                log()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Asserts each sequence on the subscriber is at or above the provider's.
pub async fn assert_sequences_caught_up(provider: &str, subscriber: &str, seqs: &[&str]) {
    let p = ferry_testkit::connect(provider).await;
    let s = ferry_testkit::connect(subscriber).await;
    for seq in seqs {
        let sql = format!("select last_value from {seq}");
        let pv: i64 = p.query_one(&sql, &[]).await.unwrap().get(0);
        let sv: i64 = s.query_one(&sql, &[]).await.unwrap().get(0);
        assert!(sv >= pv, "sequence {seq}: subscriber {sv} < provider {pv}");
    }
}

/// `pg_dump -s FROM | psql INTO`, as the seed restores the schema on a subscriber (with the
/// shared cluster's client tools). Errors in the restore are ignored, as `psql` without
/// ON_ERROR_STOP does: a dump of a database ferry runs in may hold what exists already.
pub fn dump_schema_into(from: &str, into: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let bindir = Cluster::shared().bindir();
    let dump = Command::new(bindir.join("pg_dump"))
        .args(["-s", "-d", from])
        .output()
        .expect("pg_dump runs");
    assert!(
        dump.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let mut psql = Command::new(bindir.join("psql"))
        .args(["-q", "-v", "ON_ERROR_STOP=0", "-d", into])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("psql runs");
    psql.stdin
        .take()
        .unwrap()
        .write_all(&dump.stdout)
        .expect("feed psql");
    assert!(psql.wait().unwrap().success());
}

/// Asserts that `sql` run on the subscriber by anyone but replay is refused by the write guard.
pub async fn assert_write_refused(subscriber: &tokio_postgres::Client, sql: &str) {
    let refused = subscriber.batch_execute(sql).await.unwrap_err();
    assert!(
        refused
            .as_db_error()
            .is_some_and(|db| db.message().contains("only ferry replay may change it")),
        "{sql}: {refused:?}"
    );
}

/// Asserts that `log` (replay's) says `table` (as logged, `public.t`) was copied in `slices`
/// slices.
#[allow(dead_code)]
pub fn assert_copied_in_slices(log: &str, table: &str, slices: usize) {
    let table = format!("table={table} ");
    let slices = format!("slices={slices} ");
    assert!(
        log.lines()
            .any(|l| l.contains("copy done") && l.contains(&table) && l.contains(&slices)),
        "no copy of {table} in {slices}:\n{log}"
    );
}
