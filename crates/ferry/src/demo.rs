//! `ferry demo`: two throwaway clusters, the seed's setup done with the real commands, a
//! write load, the tables' states and the lag while it runs, and a check that both sides end
//! identical. Everything is removed at the end (the clusters also when the demo is killed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_testkit::Cluster;
use tokio_postgres::Client;

use crate::Failure;

const SCHEMA: &str = "
create table accounts (aid int primary key, bid int not null, abalance int not null, filler text);
create table tellers (tid int primary key, bid int not null, tbalance int not null);
create table history (hid bigserial primary key, tid int, aid int, delta int,
                      mtime timestamptz not null default now());
";
const DATA: &str = "
insert into accounts select i, i % 10, 0, repeat(' ', 80) from generate_series(1, 1000000) i;
insert into tellers select i, i % 10, 0 from generate_series(1, 100) i;
";
const TABLES: &[&str] = &["accounts", "tellers", "history"];

/// Kills a daemon child if the demo fails half way.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `ferry demo`.
pub fn run() -> Result<(), Failure> {
    let fail = |what: &str, e: String| Failure::Runtime(format!("demo: {what}: {e}"));
    println!("starting two throwaway PostgreSQL clusters (provider and subscriber) ...");
    let provider = Cluster::start().map_err(|e| fail("starting the provider cluster", e))?;
    let subscriber = Cluster::start().map_err(|e| fail("starting the subscriber cluster", e))?;
    let dir = tempfile::tempdir().map_err(|e| fail("creating a directory", e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(&e))?;
    runtime.block_on(demo(&provider, &subscriber, dir.path()))
}

async fn demo(provider: &Cluster, subscriber: &Cluster, dir: &Path) -> Result<(), Failure> {
    let (p_db, s_db) = (
        provider.database("shop").await,
        subscriber.database("shop").await,
    );
    let p = ferry_testkit::connect(&p_db.conninfo).await;
    let s = ferry_testkit::connect(&s_db.conninfo).await;
    let sql_failed = |e: tokio_postgres::Error| Failure::Runtime(format!("demo: {e}"));
    p.batch_execute(&format!("{SCHEMA}{DATA}"))
        .await
        .map_err(sql_failed)?;
    // statistics, as a live database has them: the copy's progress knows how many rows to expect
    p.batch_execute("vacuum analyze")
        .await
        .map_err(sql_failed)?;
    // what `pg_dump -s | psql` does in the seed
    s.batch_execute(SCHEMA).await.map_err(sql_failed)?;
    println!(
        "provider: {}\nsubscriber: {}\n1000000 accounts, 100 tellers on the provider; the subscriber has the empty tables",
        p_db.conninfo, s_db.conninfo
    );
    let config = dir.join("demo.ini");
    std::fs::write(
        &config,
        format!(
            "[pgqadm]\njob_name = demo-ticker\ndb = {p}\nloop_delay = 0.05\n\
             logfile = {d}/%(job_name)s.log\npidfile = {d}/%(job_name)s.pid\n\n\
             [londiste]\njob_name = demo-replay\nprovider_db = {p}\nsubscriber_db = {s}\n\
             pgq_queue_name = demo-queue\nloop_delay = 0.2\n\
             logfile = {d}/%(job_name)s.log\npidfile = {d}/%(job_name)s.pid\n",
            p = p_db.conninfo,
            s = s_db.conninfo,
            d = dir.display()
        ),
    )
    .map_err(|e| Failure::Runtime(format!("demo: writing {}: {e}", config.display())))?;
    println!("config: {}\n", config.display());

    ferry(&config, &["install"])?;
    let _ticker = spawn(&config, "ticker")?;
    ferry(&config, &["provider", "install"])?;
    ferry(&config, &["subscriber", "install"])?;
    let _replay = spawn(&config, "replay")?;

    println!("starting a write load on the provider (pgbench-like transactions) ...");
    let load = Load::start(&p_db.conninfo).await;
    ferry(&config, &["provider", "add", "--all"])?;
    ferry(&config, &["subscriber", "add", "--all"])?;
    ferry(&config, &["provider", "add-seq", "--all"])?;
    ferry(&config, &["subscriber", "add-seq", "--all"])?;

    let start = Instant::now();
    let mut all_ok_since: Option<Instant> = None;
    while all_ok_since.is_none_or(|t| t.elapsed() < Duration::from_secs(5)) {
        // often while tables copy, so their progress shows
        let pause = if all_ok_since.is_some() { 1000 } else { 250 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let tables = capture(&config, &["subscriber", "tables"])?;
        let states: Vec<String> = tables
            .lines()
            .skip(1)
            .map(|l| l.replacen(' ', "=", 1))
            .collect();
        let lag = consumer_lag(&p).await;
        println!(
            "  {:>4.1} s  {}  lag {}  ({} transactions committed)",
            start.elapsed().as_secs_f64(),
            states.join("  "),
            lag.map(|l| format!("{l:.2} s"))
                .unwrap_or_else(|| "-".into()),
            load.committed()
        );
        if all_ok_since.is_none() && states.iter().all(|s| s.ends_with("=ok")) {
            println!("  every table is ok; the load goes on for 5 s");
            all_ok_since = Some(Instant::now());
        }
        if start.elapsed() > Duration::from_secs(300) {
            return Err(Failure::Runtime(format!(
                "demo: tables not ok after 300 s; see the logs in {}",
                dir.display()
            )));
        }
    }
    let committed = load.stop().await;
    println!(
        "load stopped after {committed} transactions; waiting for the subscriber to drain ..."
    );
    let drain = Instant::now();
    capture(&config, &["wait-sync", "--timeout", "60"])?;
    println!(
        "  in sync {:.2} s after the load stopped (`ferry demo.ini wait-sync`); checking every row:",
        drain.elapsed().as_secs_f64()
    );
    loop {
        let mut same = true;
        let mut lines = Vec::new();
        for table in TABLES {
            let (a, b) = (checksum(&p, table).await, checksum(&s, table).await);
            same &= a == b;
            lines.push(format!(
                "  {table}: provider {} rows, subscriber {} rows, checksums {}",
                a.0,
                b.0,
                if a == b { "equal" } else { "differ" }
            ));
        }
        if same {
            println!("{}", lines.join("\n"));
            println!("both sides identical");
            break;
        }
        if drain.elapsed() > Duration::from_secs(60) {
            println!("{}", lines.join("\n"));
            return Err(Failure::Runtime(format!(
                "demo: the sides differ 60 s after the load stopped; see the logs in {}",
                dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ferry(&config, &["subscriber", "tables"])?;
    // the proof at one consistent point, as an operator would ask for it
    ferry(&config, &["compare", "--all"])?;
    let stop = Command::new(std::env::current_exe().map_err(|e| Failure::runtime(&e))?)
        .args(["-s", config.to_str().unwrap_or_default()])
        .status()
        .map_err(|e| Failure::runtime(&e))?;
    if !stop.success() {
        return Err(Failure::Runtime("demo: stopping the daemons failed".into()));
    }
    println!("done; the clusters are removed");
    Ok(())
}

/// Runs `ferry CONFIG ARGS`, echoing the command and its output.
fn ferry(config: &Path, args: &[&str]) -> Result<(), Failure> {
    println!("$ ferry demo.ini {}", args.join(" "));
    let out = capture(config, args)?;
    for line in out.lines() {
        println!("  {line}");
    }
    Ok(())
}

/// Runs `ferry CONFIG ARGS` and returns its output; a failure is the demo's failure.
fn capture(config: &Path, args: &[&str]) -> Result<String, Failure> {
    let out = Command::new(std::env::current_exe().map_err(|e| Failure::runtime(&e))?)
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Failure::runtime(&e))?;
    if !out.status.success() {
        return Err(Failure::Runtime(format!(
            "demo: ferry {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `ferry CONFIG COMMAND` (a daemon, in the foreground, quiet: it logs to its file).
fn spawn(config: &PathBuf, command: &str) -> Result<Daemon, Failure> {
    println!("$ ferry demo.ini {command}     (in the background; log in the config's directory)");
    Command::new(std::env::current_exe().map_err(|e| Failure::runtime(&e))?)
        .arg(config)
        .args([command, "-q"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Daemon)
        .map_err(|e| Failure::runtime(&e))
}

/// Seconds between the consumer's last finished tick and now, from the provider's queue.
async fn consumer_lag(provider: &Client) -> Option<f64> {
    ferry_queue::consumer_info(provider, Some("demo-queue"))
        .await
        .ok()?
        .first()
        .map(|c| c.lag_secs)
}

async fn checksum(client: &Client, table: &str) -> (i64, String) {
    client
        .query_one(
            &format!("select count(*), coalesce(md5(string_agg(to_jsonb(t)::text, ',' order by to_jsonb(t)::text)), '') from \"{table}\" t"),
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap_or((-1, String::new()))
}

/// pgbench's TPC-B-like transaction on two connections until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    async fn start(conninfo: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let committed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for worker in 0..2u64 {
            let client = ferry_testkit::connect(conninfo).await;
            let (stop, committed) = (stop.clone(), committed.clone());
            tasks.push(tokio::spawn(async move {
                let mut n: u64 = worker;
                while !stop.load(Ordering::Relaxed) {
                    n = n
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let (aid, tid, delta) = (
                        (n >> 33) % 1_000_000 + 1,
                        (n >> 20) % 100 + 1,
                        (n >> 8) % 10001,
                    );
                    let delta = delta as i64 - 5000;
                    let tx = format!(
                        "begin;
                         update accounts set abalance = abalance + {delta} where aid = {aid};
                         update tellers set tbalance = tbalance + {delta} where tid = {tid};
                         insert into history (tid, aid, delta) values ({tid}, {aid}, {delta});
                         commit;"
                    );
                    if client.batch_execute(&tx).await.is_ok() {
                        committed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let _ = client.batch_execute("rollback").await;
                    }
                }
            }));
        }
        Load {
            stop,
            committed,
            tasks,
        }
    }

    fn committed(&self) -> u64 {
        self.committed.load(Ordering::Relaxed)
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.committed.load(Ordering::Relaxed)
    }
}
