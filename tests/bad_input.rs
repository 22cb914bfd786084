//! Bad input through the binary: an unreadable config file, connections that cannot be made,
//! and commands run against a database in the wrong state. Each ends with one line saying
//! what is wrong, where, and what to do, and with the exit code the README gives.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::replication::{run, wait_identical, Pair};
use common::{ferry, ferry_bin, stderr_of, wait_until, KillDaemonOnDrop};
use ferry_testkit::Cluster;

/// Runs `ferry CONFIG ARGS...`.
fn ferry_with(config: &Path, args: &[&str]) -> Output {
    let mut all = vec![config.to_str().unwrap()];
    all.extend_from_slice(args);
    ferry(&all)
}

/// Asserts that `out` failed with `code` and a single stderr line containing every one of
/// `needles`; returns the line.
fn one_line_failure(what: &str, out: &Output, code: i32, needles: &[impl AsRef<str>]) -> String {
    let stderr = stderr_of(out);
    assert_eq!(out.status.code(), Some(code), "{what}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: not one line: {stderr:?}"
    );
    for needle in needles.iter().map(AsRef::as_ref) {
        assert!(
            stderr.contains(needle),
            "{what}: {needle:?} is missing from {stderr:?}"
        );
    }
    stderr.trim_end().to_string()
}

#[test]
fn an_unreadable_config_file_exits_2_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dir.path().join("ticker.ini");
    std::fs::write(&config, "[pgqadm]\njob_name = t\ndb = dbname=x\n").unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o000)).unwrap();
    // root reads any file: then ferry runs as the unprivileged user the test servers run as,
    // from a copy of the binary that user can surely execute
    let mut command = match ferry_testkit::server_owner().expect("an unprivileged user") {
        None => Command::new(ferry_bin()),
        Some((uid, gid)) => {
            let binary = dir.path().join("ferry");
            std::fs::copy(ferry_bin(), &binary).unwrap();
            let mut command = Command::new(binary);
            command.uid(uid).gid(gid);
            command
        }
    };
    let out = command
        .arg(&config)
        .arg("status")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let line = one_line_failure("unreadable", &out, 2, &["cannot read the file"]);
    assert_eq!(
        line,
        format!(
            "ferry: {}: cannot read the file: Permission denied (os error 13)",
            config.display()
        )
    );
}

/// A ticker and a replication config whose every connection goes to `conninfo`.
fn configs_for(dir: &Path, name: &str, conninfo: &str) -> (PathBuf, PathBuf) {
    let ticker = dir.join(format!("{name}-ticker.ini"));
    let londiste = dir.join(format!("{name}-londiste.ini"));
    std::fs::write(
        &ticker,
        format!(
            "[pgqadm]\njob_name = {name}-ticker\ndb = {conninfo}\n\
             logfile = %(job_name)s.log\npidfile = %(job_name)s.pid\n"
        ),
    )
    .unwrap();
    std::fs::write(
        &londiste,
        format!(
            "[londiste]\njob_name = {name}-replay\nprovider_db = {conninfo}\n\
             subscriber_db = {conninfo}\npgq_queue_name = q\n\
             logfile = %(job_name)s.log\npidfile = %(job_name)s.pid\n"
        ),
    )
    .unwrap();
    (ticker, londiste)
}

/// Connections that cannot be made, from the queue commands and from the replication
/// commands alike: exit code 1, one line naming the server (never the password), the
/// server's reason, and what to check. A daemon's process title and log hold no password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_errors_exit_1_with_one_line_saying_what_to_check() {
    const PASSWORD: &str = "right-Pa55word-of-ferry";
    const WRONG: &str = "wrong-Pa55word-of-ferry";
    let cluster = Cluster::start().expect("cluster");
    let ca = cluster
        .enable_tls_and_scram(PASSWORD)
        .await
        .expect("tls and scram");
    let admin = cluster.connect("postgres").await;
    for statement in [
        "create database closed".to_string(),
        "revoke connect on database closed from public".to_string(),
        format!("create role outsider login password '{PASSWORD}'"),
    ] {
        admin.batch_execute(&statement).await.unwrap();
    }
    let tls = |db: &str, user: &str, password: &str| {
        cluster.tcp_conninfo(
            db,
            user,
            &format!(
                "sslmode=verify-full sslrootcert={} password={password}",
                ca.display()
            ),
        )
    };
    let nothing_listens = ferry_testkit::free_port().unwrap();
    let refused_target =
        format!("cannot connect to host=127.0.0.1 port={nothing_listens} dbname=x user=u:");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "nothing listens",
            format!("host=127.0.0.1 port={nothing_listens} dbname=x user=u password={PASSWORD}"),
            vec![
                &refused_target,
                "Connection refused",
                "is PostgreSQL running",
            ],
        ),
        (
            "no socket",
            format!("host=/nonexistent/socket/dir port=5432 dbname=x password={PASSWORD}"),
            vec!["host=/nonexistent/socket/dir", "no server socket there"],
        ),
        (
            "unreachable host",
            format!(
                "host=192.0.2.1 port=5432 connect_timeout=2 dbname=x user=u password={PASSWORD}"
            ),
            vec!["cannot connect to host=192.0.2.1", "; "],
        ),
        (
            "wrong password",
            tls("postgres", "postgres", WRONG),
            vec![
                "password authentication failed",
                "check the password (password= in the connection string",
            ],
        ),
        (
            "missing database",
            tls("nosuchdb", "postgres", PASSWORD),
            vec![
                "database \"nosuchdb\" does not exist",
                "check dbname=, or create the database",
            ],
        ),
        (
            "no CONNECT privilege",
            tls("closed", "outsider", PASSWORD),
            vec![
                "permission denied for database",
                "the role needs CONNECT on the database",
            ],
        ),
        (
            "rejected by pg_hba.conf",
            cluster.tcp_conninfo(
                "postgres",
                "postgres",
                &format!("sslmode=disable password={PASSWORD}"),
            ),
            vec![
                "pg_hba.conf rejects connection",
                "check user= and the server's pg_hba.conf",
            ],
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, conninfo, needles) in &cases {
        let (ticker, londiste) = configs_for(dir.path(), &name.replace(' ', "-"), conninfo);
        for (command, config, args) in [
            ("status", &ticker, &["status"][..]),
            ("provider tables", &londiste, &["provider", "tables"][..]),
        ] {
            let out = ferry_with(config, args);
            let what = format!("{name}, {command}");
            let line = one_line_failure(&what, &out, 1, needles);
            assert!(line.starts_with("ferry: "), "{what}: {line}");
            for secret in [PASSWORD, WRONG] {
                assert!(!line.contains(secret), "{what}: the password shows: {line}");
            }
        }
    }

    // a daemon connected with a password: not in its process title, nor in its log
    let (ticker, _) = configs_for(dir.path(), "title", &tls("postgres", "postgres", PASSWORD));
    let _stop = KillDaemonOnDrop(ticker.clone());
    run(&ticker, &["install"]);
    run(&ticker, &["ticker", "-d"]);
    let pid_file = dir.path().join("title-ticker.pid");
    let read_pid = || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
    };
    wait_until("the ticker's pid file", Duration::from_secs(30), || {
        read_pid().is_some()
    });
    let pid = read_pid().unwrap();
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("the daemon runs");
    let title = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(title.contains("ticker"), "{title}");
    assert!(
        !title.contains(PASSWORD),
        "the password shows in the title: {title}"
    );
    let start = std::time::Instant::now();
    loop {
        let connected: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity where application_name like 'ferry%'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if connected > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the ticker does not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let names: Vec<String> = admin
        .query("select application_name from pg_stat_activity", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        names.iter().all(|n| !n.contains(PASSWORD)),
        "the password shows in application_name: {names:?}"
    );
    let stopped = ferry(&["-s", ticker.to_str().unwrap()]);
    assert!(stopped.status.success(), "-s: {}", stderr_of(&stopped));
    let log = std::fs::read_to_string(dir.path().join("title-ticker.log")).unwrap();
    assert!(log.contains("ticker starting"), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the password shows in the log:\n{log}"
    );
}

/// Commands run against databases in the wrong state fail with exit code 1 and say what to
/// run; daemons started before anything is installed say the same in their logs, wait, and
/// replicate once the setup is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_in_the_wrong_state_say_what_to_run_and_daemons_wait_for_the_setup() {
    let pair = Pair::new(
        "wrong_state",
        "create table t (id int primary key, v text);
         create table only_here (id int primary key);
         insert into t select i, 'v' || i from generate_series(1, 100) i;",
        Some("create table t (id int primary key, v text)"),
    )
    .await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    run(&ticker, &["ticker", "-d"]);
    run(&londiste, &["replay", "-d"]);

    let queue_missing = [
        "the queue schema is not installed in this database",
        "(run `ferry CONFIG install`)",
    ];
    one_line_failure(
        "status before install",
        &ferry_with(&ticker, &["status"]),
        1,
        &queue_missing,
    );
    one_line_failure(
        "create before install",
        &ferry_with(&ticker, &["create", "other"]),
        1,
        &queue_missing,
    );
    one_line_failure(
        "provider tables before provider install",
        &ferry_with(&londiste, &["provider", "tables"]),
        1,
        &["ferry is not installed on the provider: run `ferry CONFIG provider install`"],
    );
    one_line_failure(
        "subscriber tables before subscriber install",
        &ferry_with(&londiste, &["subscriber", "tables"]),
        1,
        &["ferry is not installed on the subscriber for queue \"test-queue\": run `ferry CONFIG subscriber install`"],
    );
    // the daemons say the same and wait
    wait_for_log("ticker", &|| pair.ticker_log(), queue_missing[0]);
    wait_for_log(
        "replay",
        &|| pair.replay_log(),
        "ferry is not installed on the provider: run `ferry CONFIG provider install`",
    );

    run(&ticker, &["install"]);
    run(&londiste, &["provider", "install"]);
    one_line_failure(
        "register on a queue that does not exist",
        &ferry_with(&ticker, &["register", "nosuchq", "c"]),
        1,
        &["registering consumer \"c\" on queue \"nosuchq\": queue \"nosuchq\" does not exist"],
    );
    one_line_failure(
        "a queue setting that does not parse",
        &ferry_with(&ticker, &["config", "test-queue", "rotation_period=fast"]),
        2,
        &[
            "setting rotation_period of queue \"test-queue\"",
            "invalid input syntax for type interval: \"fast\"",
        ],
    );
    one_line_failure(
        "a negative ticker threshold",
        &ferry_with(&ticker, &["config", "test-queue", "ticker_max_count=-1"]),
        2,
        &["ticker_max_count must not be negative"],
    );
    run(&londiste, &["subscriber", "install"]);
    table_failure(
        "subscriber add before provider add",
        &ferry_with(&londiste, &["subscriber", "add", "t"]),
        "public.t is not registered on the provider for queue \"test-queue\": run `ferry CONFIG provider add public.t` first",
    );
    table_failure(
        "provider add of a table that does not exist",
        &ferry_with(&londiste, &["provider", "add", "nosuch"]),
        "ferry: nosuch: table public.nosuch does not exist on the provider",
    );
    run(&londiste, &["provider", "add", "--all"]);
    table_failure(
        "subscriber add of a table the subscriber lacks",
        &ferry_with(&londiste, &["subscriber", "add", "only_here"]),
        "table public.only_here does not exist on the subscriber: create it (pg_dump -s of the provider) or add it with --create",
    );
    run(&londiste, &["subscriber", "add", "t"]);
    ferry_testkit::connect(&pair.provider.conninfo)
        .await
        .batch_execute("update t set v = v || '!' where id % 2 = 0")
        .await
        .unwrap();
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["t"],
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
}

/// Waits until `log()` contains `text`.
fn wait_for_log(daemon: &str, log: &dyn Fn() -> String, text: &str) {
    let start = std::time::Instant::now();
    while !log().contains(text) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no {text:?} in the {daemon} log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that a per-table command failed with exit code 1: the table's line contains
/// `needle`, then the count of failures.
fn table_failure(what: &str, out: &Output, needle: &str) {
    let stderr = stderr_of(out);
    assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(lines.len(), 2, "{what}: {stderr:?}");
    assert!(
        lines[0].contains(needle),
        "{what}: {needle:?} is missing from {stderr:?}"
    );
    assert_eq!(lines[1], "ferry: 1 of 1 failed (see above)", "{what}");
}

/// Unknown keys and sections are one warning line each, naming file, section and key; the
/// command still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_and_sections_are_warnings_and_the_command_runs() {
    let db = Cluster::shared().database("unknown_keys").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ticker.ini");
    std::fs::write(
        &config,
        format!(
            "[pgqadm]\njob_name = t\ndb = {}\nloop_dealy = 0.1\n\n[extra]\nanything = 1\n",
            db.conninfo
        ),
    )
    .unwrap();
    let out = ferry_with(&config, &["install"]);
    let stderr = stderr_of(&out);
    assert!(out.status.success(), "{stderr}");
    let path = config.display();
    assert_eq!(
        stderr.lines().collect::<Vec<_>>(),
        [
            format!("ferry: warning: {path}: [pgqadm] loop_dealy: unknown key, ignored"),
            format!("ferry: warning: {path}: [extra]: unknown section, ignored"),
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("queue schema installed"));
}

/// A foreign key between replicated tables on the subscriber (as `pg_dump -s` brings along,
/// cascading here) holds nothing: both tables copy and replicate with the key in place, and
/// copying the parent again never empties the child (no TRUNCATE ... CASCADE, no cascaded
/// delete). A check constraint only the subscriber has holds its table's copy alone, with a
/// warning saying what to do; the other tables replicate meanwhile, and once the check is
/// dropped that table is copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_keys_copy_in_place_and_a_check_only_the_subscriber_has_holds_its_table() {
    let schema = "create table parent (id int primary key);
         create table other (id int primary key, v text);";
    let pair = Pair::new(
        "fk_copy",
        &format!(
            "{schema}
             create table child (id int primary key, parent_id int references parent);
             create table checked (id int primary key);
             insert into parent select generate_series(1, 500);
             insert into child select i, i from generate_series(1, 500) i;
             insert into other select i, 'v' || i from generate_series(1, 500) i;
             insert into checked select generate_series(1, 500);"
        ),
        Some(&format!(
            "{schema}
             create table child (id int primary key,
                                 parent_id int references parent on delete cascade on update cascade);
             create table checked (id int primary key constraint small check (id < 100));"
        )),
    )
    .await;
    let londiste = pair.londiste_ini();
    let _stop = [
        KillDaemonOnDrop(pair.ticker_ini()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "--all"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["replay", "-d"]);
    pair.wait_for_replay_line(
        &[
            "table=public.checked",
            "its rows break a constraint there",
            "new row for relation \"checked\" violates check constraint \"small\"",
        ],
        Duration::from_secs(60),
    )
    .await;
    // the tables joined by the key, and the other one, are copied and replicate meanwhile
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    provider
        .batch_execute(
            "update other set v = v || '!' where id % 2 = 0;
             insert into parent values (501); insert into child values (501, 501);
             delete from child where id <= 10; delete from parent where id <= 10;",
        )
        .await
        .unwrap();
    let joined = ["parent", "child", "other"];
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &joined,
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    let tables = run(&londiste, &["subscriber", "tables", "--json"]);
    let states: serde_json::Value = serde_json::from_str(&tables).unwrap();
    for row in states.as_array().unwrap() {
        let expected = if row["table"] == "public.checked" {
            "in-copy"
        } else {
            "ok"
        };
        assert_eq!(row["state"], expected, "{tables}");
    }
    let warned_about_joined = pair.replay_log().lines().any(|l| {
        l.contains("WARN")
            && (l.contains("table=public.parent") || l.contains("table=public.child"))
    });
    assert!(!warned_about_joined, "{}", pair.replay_log());

    // the parent copied again while the child is ok: the child keeps every row (its key
    // cascades on delete here, but replay's writes cascade to nothing)
    let subscriber = ferry_testkit::connect(&pair.subscriber.conninfo).await;
    let child_rows = || async {
        subscriber
            .query_one("select count(*) from child", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let before = child_rows().await;
    run(&londiste, &["subscriber", "resync", "parent"]);
    common::replication::wait_table_state(
        &londiste,
        "public.parent",
        "ok",
        Duration::from_secs(60),
        || pair.replay_log(),
    );
    let copies = pair
        .replay_log()
        .lines()
        .filter(|l| l.contains("copy done") && l.contains("table=public.parent"))
        .count();
    assert_eq!(copies, 2, "copied again: {}", pair.replay_log());
    assert_eq!(
        child_rows().await,
        before,
        "the child lost rows to the parent's copy"
    );

    // as the warning says: drop the check, and (replay restarted, so as not to wait for the
    // retry) its table is copied
    subscriber
        .batch_execute("alter table checked drop constraint small")
        .await
        .unwrap();
    let stopped = ferry(&["-s", londiste.to_str().unwrap()]);
    assert!(stopped.status.success(), "{}", stderr_of(&stopped));
    run(&londiste, &["replay", "-d"]);
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["parent", "child", "other", "checked"],
        Duration::from_secs(60),
        || pair.replay_log(),
    )
    .await;
    common::replication::wait_all_ok(&londiste, Duration::from_secs(60), || pair.replay_log());
}
