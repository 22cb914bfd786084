//! Helpers shared by the end-to-end tests: config files, running the ferry binary, writers
//! and a consumer that checks exactly-once delivery.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_testkit::{Cluster, TestDb};
use tokio_postgres::Client;

pub mod application;
pub mod fidelity;
pub mod replication;

/// The ferry binary under test.
pub fn ferry_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferry")
}

/// Runs `ferry ARGS...` to completion.
pub fn ferry(args: &[&str]) -> Output {
    Command::new(ferry_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("ferry runs")
}

/// Runs `ferry ARGS...` and insists on exit code 0; returns stdout.
pub fn ferry_ok(args: &[&str]) -> String {
    let out = ferry(args);
    assert!(
        out.status.success(),
        "ferry {args:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A finished command's stderr, as text.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Polls `check` every 50 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A test's own database and a directory for its config, log and pid files.
pub struct Setup {
    pub db: TestDb,
    pub dir: tempfile::TempDir,
}

impl Setup {
    /// A fresh database on the shared cluster, the queue schema installed through the binary.
    pub async fn new(name: &str) -> Setup {
        let db = Cluster::shared().database(name).await;
        let setup = Setup {
            db,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        setup.write_ticker_config("0.05", "600");
        ferry_ok(&[setup.config().to_str().unwrap(), "install"]);
        setup
    }

    /// Creates `queue` and registers `consumers` on it, through the binary.
    pub fn queue_with_consumers(&self, queue: &str, consumers: &[&str]) {
        let config = self.config();
        let config = config.to_str().unwrap();
        ferry_ok(&[config, "create", queue]);
        for consumer in consumers {
            ferry_ok(&[config, "register", queue, consumer]);
        }
    }

    /// The ticker's config file.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("ticker.ini")
    }

    /// (Re)writes the config file with the given loop and maintenance delays (seconds).
    pub fn write_ticker_config(&self, loop_delay: &str, maint_delay: &str) {
        write_ticker_config(&self.config(), &self.db.conninfo, loop_delay, maint_delay);
    }

    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("ticker.log")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.path().join("test-ticker.pid")
    }

    pub async fn connect(&self) -> Client {
        ferry_testkit::connect(&self.db.conninfo).await
    }

    /// Starts `ferry CONFIG ticker` in the foreground as a child process, killed on drop.
    pub fn spawn_ticker(&self) -> ChildProcess {
        ChildProcess(
            Command::new(ferry_bin())
                .arg(self.config())
                .arg("ticker")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("ticker starts"),
        )
    }
}

/// Writes a `[pgqadm]` config for `conninfo`, with logfile and pidfile beside it.
pub fn write_ticker_config(path: &Path, conninfo: &str, loop_delay: &str, maint_delay: &str) {
    std::fs::write(
        path,
        format!(
            "[pgqadm]\njob_name = test-ticker\ndb = {conninfo}\nloop_delay = {loop_delay}\n\
             maint_delay = {maint_delay}   ; seconds\nlogfile = ticker.log\npidfile = %(job_name)s.pid\n"
        ),
    )
    .expect("config written");
}

/// Inserts `payloads` as events of `queue` in one transaction; commits or rolls back.
pub async fn insert_events(client: &mut Client, queue: &str, payloads: &[String], commit: bool) {
    let tx = client.transaction().await.expect("begin");
    tx.query_one(
        r#"select count("ferry"."insert_event"($1, 'test', x)) from unnest($2::text[]) as x"#,
        &[&queue, &payloads],
    )
    .await
    .expect("insert events");
    if commit {
        tx.commit().await.expect("commit");
    } else {
        tx.rollback().await.expect("rollback");
    }
}

/// What a consumer received: how many times each payload, and in which batch.
#[derive(Default, Debug)]
pub struct Received {
    pub count: HashMap<String, u32>,
    pub batch_of: HashMap<String, i64>,
    pub batches: u64,
}

impl Received {
    pub fn total(&self) -> usize {
        self.count.values().map(|c| *c as usize).sum()
    }
}

/// Processes at most one batch of `consumer`: reads it through a cursor in pages, records
/// every event, finishes it. Returns whether there was a batch.
pub async fn consume_one_batch(
    client: &mut Client,
    queue: &str,
    consumer: &str,
    max_events: Option<i64>,
    into: &mut Received,
) -> bool {
    let Some(batch) = ferry_queue::next_batch(&*client, queue, consumer, max_events)
        .await
        .expect("next batch")
    else {
        return false;
    };
    let tx = client.transaction().await.expect("begin");
    let mut seen = Vec::new();
    {
        let mut cursor = ferry_queue::BatchCursor::open(&tx, batch.id)
            .await
            .expect("cursor");
        loop {
            let page = cursor.next_page(1000).await.expect("page");
            if page.is_empty() {
                break;
            }
            seen.extend(page.into_iter().filter_map(|e| e.data));
        }
    }
    assert!(ferry_queue::finish_batch(&tx, batch.id)
        .await
        .expect("finish"));
    tx.commit().await.expect("commit");
    for payload in seen {
        *into.count.entry(payload.clone()).or_default() += 1;
        into.batch_of.insert(payload, batch.id);
    }
    into.batches += 1;
    true
}

/// Consumes until `received` holds every payload of `expected` (or `limit` passes), then a
/// little longer so that duplicates would show; asserts exactly-once delivery.
pub async fn consume_until_complete(
    client: &mut Client,
    queue: &str,
    consumer: &str,
    expected: &[String],
    received: &mut Received,
    limit: Duration,
) {
    let start = Instant::now();
    while expected.iter().any(|p| !received.count.contains_key(p)) {
        assert!(
            start.elapsed() < limit,
            "consumer {consumer}: {} of {} events after {limit:?}",
            received.count.len(),
            expected.len()
        );
        if !consume_one_batch(client, queue, consumer, None, received).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // a few more ticks: anything delivered twice would arrive now
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(500) {
        if !consume_one_batch(client, queue, consumer, None, received).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_exactly_once(consumer, expected, received);
}

/// Every expected payload received exactly once, nothing else received.
pub fn assert_exactly_once(consumer: &str, expected: &[String], received: &Received) {
    let duplicates: Vec<_> = received
        .count
        .iter()
        .filter(|(_, c)| **c > 1)
        .take(5)
        .collect();
    assert!(
        duplicates.is_empty(),
        "consumer {consumer} got duplicates: {duplicates:?}"
    );
    let expected_set: std::collections::HashSet<&String> = expected.iter().collect();
    let unexpected: Vec<_> = received
        .count
        .keys()
        .filter(|p| !expected_set.contains(p))
        .take(5)
        .collect();
    assert!(
        unexpected.is_empty(),
        "consumer {consumer} got events never committed: {unexpected:?}"
    );
    assert_eq!(
        received.count.len(),
        expected.len(),
        "consumer {consumer}: missing events"
    );
}

/// The latest tick id of `queue`.
pub async fn last_tick(client: &Client, queue: &str) -> i64 {
    ferry_queue::queue_info(client)
        .await
        .expect("queue info")
        .into_iter()
        .find(|q| q.name == queue)
        .and_then(|q| q.last_tick_id)
        .expect("queue has ticks")
}

/// Waits until the latest tick of `queue` is at least `target`.
pub async fn wait_for_tick(client: &Client, queue: &str, target: i64, limit: Duration) {
    let start = Instant::now();
    while last_tick(client, queue).await < target {
        assert!(
            start.elapsed() < limit,
            "queue {queue} did not reach tick {target} in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process that is SIGKILLed when dropped, so a failing test leaves none behind.
pub struct ChildProcess(Child);

impl From<Child> for ChildProcess {
    fn from(child: Child) -> ChildProcess {
        ChildProcess(child)
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        kill(self);
    }
}

/// SIGKILLs a child started with `spawn_ticker` and reaps it.
pub fn kill(child: &mut ChildProcess) {
    let _ = child.0.kill();
    let _ = child.0.wait();
}

/// Runs `ferry -k CONFIG` when dropped: stops any daemon a (failing) test started detached.
pub struct KillDaemonOnDrop(pub PathBuf);

impl Drop for KillDaemonOnDrop {
    fn drop(&mut self) {
        let _ = ferry(&["-k", self.0.to_str().unwrap_or_default()]);
    }
}
