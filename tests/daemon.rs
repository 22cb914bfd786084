//! Daemon control and configuration handling of the real binary: `-d`, pid files, `-s`, `-k`,
//! `-r`, stale pid files, options anywhere on the line, configuration errors (exit code 2,
//! one line), and reconnecting after the database restarts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use ferry_testkit::{Cluster, StopMode};

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn pid_in(path: &Path) -> i32 {
    read(path)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {}", path.display()))
}

/// Whether `pid` runs; a zombie has exited (orphans may stay zombies where PID 1 does not
/// reap, as in some containers).
fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let exists = unsafe { libc::kill(pid, 0) == 0 };
    let zombie = read(Path::new(&format!("/proc/{pid}/stat")))
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    exists && !zombie
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_pidfile_second_instance_reload_stop_kill_and_stale_takeover() {
    let setup = Setup::new("daemon_control").await;
    let _cleanup = KillDaemonOnDrop(setup.config());
    let config = setup.config();
    let config = config.to_str().unwrap();
    let pidfile = setup.pid_file();

    // -d after the command, as the seed writes it
    let out = ferry(&[config, "ticker", "-d"]);
    assert!(out.status.success(), "ticker -d: {}", stderr_of(&out));
    wait_until("pid file", Duration::from_secs(10), || {
        read(&pidfile).trim().parse::<i32>().is_ok()
    });
    let pid = pid_in(&pidfile);
    assert!(alive(pid));

    // a second instance, detached or not, is refused and names the running pid
    for args in [vec![config, "ticker", "-d"], vec![config, "ticker"]] {
        let out = ferry(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stderr_of(&out));
        assert!(
            stderr_of(&out).contains(&format!("already running as pid {pid}")),
            "{}",
            stderr_of(&out)
        );
    }
    assert_eq!(
        pid_in(&pidfile),
        pid,
        "the refused instance left the pid file alone"
    );

    // -r: the changed config is read again, and a moved-away log file is reopened
    wait_until("ticker log", Duration::from_secs(10), || {
        read(&setup.log_file()).contains("ticker starting")
    });
    std::fs::rename(setup.log_file(), setup.dir.path().join("ticker.log.old")).unwrap();
    setup.write_ticker_config("0.25", "600");
    let out = ferry(&["-r", config]);
    assert!(out.status.success(), "-r: {}", stderr_of(&out));
    wait_until(
        "reload logged in a new log file",
        Duration::from_secs(10),
        || read(&setup.log_file()).contains("configuration reloaded loop_delay=250ms"),
    );

    // -s (before the config): graceful stop, waited for, pid file removed
    let out = ferry(&["-s", config]);
    assert!(out.status.success(), "-s: {}", stderr_of(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stopped"));
    assert!(!alive(pid), "ticker still alive after -s returned");
    assert!(!pidfile.exists(), "pid file left after a graceful stop");
    let log = read(&setup.log_file());
    assert!(
        log.contains("sigint received") && log.contains("ticker stopped"),
        "{log}"
    );

    // stopping what is not running is fine; reloading it is not
    let out = ferry(&["-s", config]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not running"));
    assert_eq!(ferry(&["-r", config]).status.code(), Some(1));

    // SIGKILL leaves a stale pid file, which the next start takes over
    ferry_ok(&["-d", config, "ticker"]);
    wait_until("pid file", Duration::from_secs(10), || {
        read(&pidfile).trim().parse::<i32>().is_ok()
    });
    let killed = pid_in(&pidfile);
    // SAFETY: sending SIGKILL to the daemon this test started.
    unsafe { libc::kill(killed, libc::SIGKILL) };
    wait_until("killed daemon gone", Duration::from_secs(10), || {
        !alive(killed)
    });
    assert!(pidfile.exists(), "SIGKILL cannot remove the pid file");
    let out = ferry(&[config, "ticker", "-d"]);
    assert!(
        out.status.success(),
        "stale pid file not taken over: {}",
        stderr_of(&out)
    );
    wait_until("new pid", Duration::from_secs(10), || {
        read(&pidfile)
            .trim()
            .parse::<i32>()
            .is_ok_and(|p| p != killed)
    });
    let new_pid = pid_in(&pidfile);

    // -k (after the config): SIGTERM stops it at once
    let out = ferry(&[config, "-k"]);
    assert!(out.status.success(), "-k: {}", stderr_of(&out));
    assert!(!alive(new_pid));
    assert!(!pidfile.exists());
    assert!(read(&setup.log_file()).contains("sigterm received"));
}

#[test]
fn configuration_errors_exit_2_with_one_line_naming_file_section_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let missing = dir.path().join("missing.ini").to_str().unwrap().to_string();
    let directory = dir.path().to_str().unwrap().to_string();
    let malformed = write("malformed.ini", "[pgqadm]\njust some words\n");
    let no_db = write("no_db.ini", "[pgqadm]\njob_name = t\n");
    let bad_delay = write(
        "bad_delay.ini",
        "[pgqadm]\njob_name = t\ndb = dbname=x\nloop_delay = fast\n",
    );
    let no_section = write("no_section.ini", "[londiste]\njob_name = t\n");
    let bad_conninfo = write(
        "bad_conninfo.ini",
        "[pgqadm]\njob_name = t\ndb = dbname=x colour=red\n",
    );
    let no_pidfile = write("no_pidfile.ini", "[pgqadm]\njob_name = t\ndb = dbname=x\n");
    let crl = write(
        "crl.ini",
        "[pgqadm]\njob_name = t\ndb = dbname=x sslmode=verify-full sslcrl=/etc/crl.pem\n",
    );
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec![&missing, "ticker"],
            format!("{missing}: cannot read the file"),
        ),
        (
            vec![&directory, "ticker"],
            format!("{directory}: cannot read the file"),
        ),
        (
            vec![&malformed, "ticker"],
            format!("{malformed}: line 2: expected 'key = value'"),
        ),
        (
            vec![&no_db, "ticker"],
            format!("{no_db}: [pgqadm] db: required key is missing"),
        ),
        (
            vec![&bad_delay, "install"],
            format!("{bad_delay}: [pgqadm] loop_delay: 'fast' is not a number of seconds"),
        ),
        (
            vec![&no_section, "ticker"],
            format!("{no_section}: [pgqadm]: section is missing"),
        ),
        (
            vec![&bad_conninfo, "ticker"],
            format!("{bad_conninfo}: [pgqadm] db: invalid connection string"),
        ),
        (
            vec![&crl, "ticker"],
            format!("{crl}: [pgqadm] db: invalid connection string: sslcrl=/etc/crl.pem is not supported: ferry cannot check certificate revocation"),
        ),
        (
            vec![&no_pidfile, "ticker", "-d"],
            format!("{no_pidfile}: [pgqadm] pidfile: required to run detached"),
        ),
        (
            vec![&no_pidfile, "fly"],
            "unknown command 'fly'".to_string(),
        ),
        (vec![&no_pidfile], "a command is required".to_string()),
        (
            vec![&no_pidfile, "-s", "-k"],
            "-s, -k and -r exclude each other".to_string(),
        ),
    ];
    for (args, expected) in cases {
        let out = ferry(&args);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("ferry: {expected}")),
            "{args:?}: expected {expected:?}, got {stderr:?}"
        );
        let is_usage = expected.contains("command") || expected.contains("exclude");
        if !is_usage {
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "{args:?}: not one line: {stderr:?}"
            );
        }
    }
    // no arguments at all is a usage error too
    assert_eq!(ferry(&[]).status.code(), Some(2));
}

/// The command line is one clap tree: help at every level, an option a command does not take
/// refused naming it (exit 2), and completions, the man page and the example config generated
/// from the same definitions.
#[test]
fn the_command_tree_helps_refuses_and_generates() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("any.ini");
    let config = config.to_str().unwrap();

    let help = ferry(&[config, "subscriber", "--help"]);
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for command in ["install", "add", "resync", "tables", "missing", "check"] {
        assert!(text.contains(command), "{command} missing from {text}");
    }
    let help = ferry(&[config, "subscriber", "add", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("ferry CONFIG subscriber add"), "{text}");
    for option in ["--all", "--create", "--skip-truncate", "-d, --daemon"] {
        assert!(text.contains(option), "{option} missing from {text}");
    }

    for (args, option) in [
        (vec![config, "provider", "tables", "--create"], "--create"),
        (vec![config, "ticker", "--force"], "--force"),
        (vec![config, "status", "--all"], "--all"),
    ] {
        let out = ferry(&args);
        let stderr = stderr_of(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("ferry: unexpected argument '{option}'")),
            "{args:?}: {stderr}"
        );
    }
    let out = ferry(&[config, "provider", "add"]);
    assert_eq!(out.status.code(), Some(2), "a table or --all is required");
    let out = ferry(&["-d", config, "status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("-d (--daemon) is for `ticker` and `replay` only"));

    let completions = ferry_ok(&["completions", "bash"]);
    assert!(completions.contains("_ferry()") && completions.contains("skip-truncate"));
    let man = ferry_ok(&["man"]);
    assert!(
        man.contains(".TH ferry 1") && man.contains("subscriber"),
        "{man}"
    );
    let ini = ferry_ok(&["--ini"]);
    assert!(
        ini.contains("[pgqadm]") && ini.contains("[londiste]"),
        "{ini}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ticker_reconnects_after_the_database_restarts_and_logs_once_per_outage() {
    let cluster = Cluster::start().expect("own cluster");
    let db = cluster.database("reconnect").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ticker.ini");
    write_ticker_config(&config, &db.conninfo, "0.05", "600");
    let _cleanup = KillDaemonOnDrop(config.clone());
    let config = config.to_str().unwrap();
    ferry_ok(&[config, "install"]);
    ferry_ok(&[config, "create", "q"]);
    ferry_ok(&[config, "ticker", "-d"]);
    let log_file = dir.path().join("ticker.log");
    let warnings = || {
        read(&log_file)
            .lines()
            .filter(|l| l.contains(" WARN "))
            .count()
    };
    wait_until("ticker started", Duration::from_secs(10), || {
        read(&log_file).contains("ticker starting")
    });

    // an outage of a few seconds: many failed attempts, one warning
    cluster.stop(StopMode::Fast).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(warnings(), 1, "{}", read(&log_file));
    cluster.restart().unwrap();
    wait_until("recovery logged", Duration::from_secs(30), || {
        read(&log_file).contains("working again")
    });

    // ticking goes on: a new event gets ticked
    let client = ferry_testkit::connect(&db.conninfo).await;
    let before = last_tick(&client, "q").await;
    ferry_queue::insert_event(&client, "q", "t", "after the outage")
        .await
        .unwrap();
    wait_for_tick(&client, "q", before + 1, Duration::from_secs(10)).await;
    drop(client);

    // a second outage: one more warning; -s stops the ticker while it waits to reconnect
    cluster.stop(StopMode::Immediate).unwrap();
    wait_until("second outage noticed", Duration::from_secs(10), || {
        warnings() == 2
    });
    let started = Instant::now();
    let out = ferry(&["-s", config]);
    assert!(
        out.status.success(),
        "-s during an outage: {}",
        stderr_of(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "-s took {:?}",
        started.elapsed()
    );
    assert_eq!(warnings(), 2, "{}", read(&log_file));
}

/// Logs as an operator expects them: `--log-format json` (or `log_format = json`) writes one
/// json object per line; text on a pipe has no colour escapes; under systemd (stderr is the
/// journal, as `JOURNAL_STREAM` says) lines go to the journal only, not also to `logfile`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_colours_and_the_journal() {
    use std::os::unix::fs::MetadataExt;

    let db = Cluster::shared().database("log_format").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ticker.ini");
    write_ticker_config(&config, &db.conninfo, "0.05", "600");
    let _cleanup = KillDaemonOnDrop(config.clone());
    let config_arg = config.to_str().unwrap();
    ferry_ok(&[config_arg, "install"]);
    let log_file = dir.path().join("ticker.log");

    // runs the ticker in the foreground with stderr into `name` until it logged its start
    let run = |name: &str, args: &[&str], journal: bool| -> String {
        let stderr_path = dir.path().join(name);
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut command = std::process::Command::new(ferry_bin());
        command
            .arg(config_arg)
            .arg("ticker")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .env_remove("JOURNAL_STREAM");
        if journal {
            let meta = stderr.metadata().unwrap();
            command.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        let mut child = command.stderr(stderr).spawn().unwrap();
        wait_until("ticker started", Duration::from_secs(10), || {
            read(&stderr_path).contains("ticker starting")
        });
        ferry_ok(&["-s", config_arg]);
        child.wait().unwrap();
        read(&stderr_path)
    };

    let text = run("text.txt", &[], false);
    assert!(
        !text.contains('\u{1b}'),
        "colour escapes on a pipe: {text:?}"
    );
    assert!(read(&log_file).contains("ticker starting"));

    let json = run("json.txt", &["--log-format", "json"], false);
    let mut lines = 0;
    for line in json.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a json line ({e}): {line}"));
        assert!(
            object["level"].is_string() && object["message"].is_string(),
            "{line}"
        );
        lines += 1;
    }
    assert!(lines >= 2, "{json}");
    let last_in_file = read(&log_file)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(
        last_in_file.starts_with('{'),
        "the log file is json too: {last_in_file}"
    );

    let file_before = read(&log_file);
    let journal = run("journal.txt", &[], true);
    assert!(journal.contains("logging there only"), "{journal}");
    assert!(
        !journal.contains('\u{1b}'),
        "colour escapes in the journal: {journal:?}"
    );
    assert!(journal.contains("ticker stopped"), "{journal}");
    assert_eq!(
        read(&log_file),
        file_before,
        "nothing written to logfile under systemd"
    );

    // the ini key, and a value it does not take
    let ini = read(&config);
    std::fs::write(&config, format!("{ini}log_format = json\n")).unwrap();
    let from_ini = run("from_ini.txt", &[], false);
    assert!(from_ini.lines().all(|l| l.starts_with('{')), "{from_ini}");
    std::fs::write(&config, format!("{ini}log_format = xml\n")).unwrap();
    let out = ferry(&[config_arg, "ticker"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains("[pgqadm] log_format: 'xml' is not text or json"),
        "{}",
        stderr_of(&out)
    );
}

/// `metrics_address` makes the ticker serve Prometheus text on `/metrics` (ticks counted, the
/// last tick's time); an address that cannot be used is a configuration error (exit 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ticker_serves_metrics() {
    let db = Cluster::shared().database("ticker_metrics").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ticker.ini");
    write_ticker_config(&config, &db.conninfo, "0.05", "600");
    let _cleanup = KillDaemonOnDrop(config.clone());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ini = read(&config);
    std::fs::write(
        &config,
        format!("{ini}metrics_address = 127.0.0.1:{port}\n"),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    ferry_ok(&[config_arg, "install"]);
    ferry_ok(&[config_arg, "create", "q"]);
    ferry_ok(&[config_arg, "ticker", "-d"]);
    let client = ferry_testkit::connect(&db.conninfo).await;
    ferry_queue::insert_event(&client, "q", "t", "one")
        .await
        .unwrap();
    let metrics = || {
        ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
            .call()
            .ok()
            .and_then(|r| r.into_body().read_to_string().ok())
            .unwrap_or_default()
    };
    wait_until("a tick counted", Duration::from_secs(10), || {
        metrics()
            .lines()
            .find_map(|l| l.strip_prefix("ferry_ticker_ticks_total "))
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|v| v >= 1.0)
    });
    let text = metrics();
    assert!(
        text.contains("# TYPE ferry_ticker_ticks_total counter"),
        "{text}"
    );
    assert!(
        text.contains("ferry_ticker_last_tick_timestamp_seconds 1"),
        "{text}"
    );
    ferry_ok(&["-s", config_arg]);

    std::fs::write(&config, format!("{ini}metrics_address = not an address\n")).unwrap();
    let out = ferry(&[config_arg, "ticker"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out)
            .contains("[pgqadm] metrics_address: 'not an address' is not an address to listen on"),
        "{}",
        stderr_of(&out)
    );
}
