//! Throwaway PostgreSQL clusters for ferry's tests and `ferry demo`: `initdb` + `pg_ctl` of the machine's
//! PostgreSQL on a free port, listening on 127.0.0.1 and on a private socket directory.
//!
//! * The server binaries are found through `FERRY_PG_BINDIR`, `pg_config --bindir`, `PATH`,
//!   or the newest `/usr/lib/postgresql/*/bin`.
//! * Run as root, the cluster belongs to and runs as the `postgres` OS user.
//! * [`Cluster::shared`] is one cluster per test binary; [`Cluster::database`] gives each test
//!   its own database in it. [`Cluster::start`] gives a test a cluster of its own (to stop,
//!   restart or break).
//! * Every cluster has a watchdog process holding a pipe to the test process: whenever the
//!   test process ends (normally, by panic, or killed), the watchdog stops the server and
//!   removes its directory.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The superuser every test cluster has.
pub const SUPERUSER: &str = "postgres";

static SHARED: OnceLock<Cluster> = OnceLock::new();
static START_LOCK: Mutex<()> = Mutex::new(());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A running throwaway cluster.
pub struct Cluster {
    root: PathBuf,
    bindir: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
    watchdog: Mutex<Option<(Child, ChildStdin)>>,
}

/// A database of its own for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    /// The database name.
    pub name: String,
    /// A libpq connection string for it (socket directory, port, superuser).
    pub conninfo: String,
}

/// How to stop a cluster, as `pg_ctl -m`.
#[derive(Debug, Clone, Copy)]
pub enum StopMode {
    /// Wait for sessions to end.
    Smart,
    /// Disconnect sessions, shut down cleanly.
    Fast,
    /// Crash-stop (recovery on the next start).
    Immediate,
}

impl Cluster {
    /// The cluster shared by all tests of this test binary, started on first use.
    pub fn shared() -> &'static Cluster {
        SHARED.get_or_init(|| {
            Cluster::start().unwrap_or_else(|e| panic!("cannot start the test cluster: {e}"))
        })
    }

    /// Starts a new cluster for the caller alone. It is stopped and removed on drop (and, at
    /// the latest, when the test process ends).
    pub fn start() -> Result<Cluster, String> {
        Cluster::start_with(find_bindir()?)
    }

    /// Starts a new cluster of PostgreSQL `major` (12 to 18), from the binaries
    /// `tests/pg-versions/install` puts in `FERRY_PG_VERSIONS_DIR` (default
    /// `/var/tmp/ferry-pg`), for the caller alone.
    pub fn start_version(major: u32) -> Result<Cluster, String> {
        let dir = std::env::var_os("FERRY_PG_VERSIONS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp/ferry-pg"));
        let bindir = dir.join(major.to_string()).join("bin");
        if !(bindir.join("initdb").is_file() && bindir.join("pg_ctl").is_file()) {
            return Err(format!(
                "no PostgreSQL {major} server binaries in {}: run tests/pg-versions/install",
                bindir.display()
            ));
        }
        Cluster::start_with(bindir)
    }

    /// Starts a new cluster from the server binaries in `bindir`, for the caller alone.
    pub fn start_with(bindir: PathBuf) -> Result<Cluster, String> {
        let _serialized = START_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let owner = server_owner()?;
        let root = std::env::temp_dir().join(format!(
            "ferry-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", root.display()))?;
        }
        let mut cluster = Cluster {
            root,
            bindir,
            port: 0,
            owner,
            watchdog: Mutex::new(None),
        };
        cluster.start_watchdog()?;
        cluster.initdb()?;
        let mut last_error = String::new();
        for _ in 0..5 {
            cluster.port = free_port()?;
            cluster.write_port()?;
            match cluster.pg_ctl_start() {
                Ok(()) => return Ok(cluster),
                Err(e) => last_error = e,
            }
        }
        Err(last_error)
    }

    /// The port the server listens on (127.0.0.1 and the socket directory).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.clone()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The server's log file.
    pub fn log_file(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// The directory of the PostgreSQL binaries in use (psql, pg_dump, ...).
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// A connection string for `dbname` as the superuser, over the socket.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user={SUPERUSER} dbname={dbname}",
            self.root.display(),
            self.port
        )
    }

    /// Creates a fresh database named after `hint` (made unique) and returns it.
    pub async fn database(&self, hint: &str) -> TestDb {
        let clean: String = hint
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(40)
            .collect();
        let name = format!("{clean}_{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let client = self.connect("postgres").await;
        client
            .batch_execute(&format!("create database \"{name}\""))
            .await
            .unwrap_or_else(|e| panic!("create database {name}: {e:?}"));
        TestDb {
            conninfo: self.conninfo(&name),
            name,
        }
    }

    /// A plain client connected to `dbname` as the superuser; its connection task is spawned
    /// on the current runtime.
    pub async fn connect(&self, dbname: &str) -> tokio_postgres::Client {
        connect(&self.conninfo(dbname)).await
    }

    /// Stops the server (`pg_ctl stop -m MODE`).
    pub fn stop(&self, mode: StopMode) -> Result<(), String> {
        let mode = match mode {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        self.run(
            self.bindir.join("pg_ctl"),
            &[
                "-D",
                &self.data_dir().to_string_lossy(),
                "-m",
                mode,
                "-w",
                "stop",
            ],
        )
    }

    /// Starts the server again after [`Cluster::stop`], on the same port.
    pub fn restart(&self) -> Result<(), String> {
        self.pg_ctl_start()
    }

    /// Turns on TLS and password authentication: a throwaway CA signs a certificate for
    /// `localhost` and 127.0.0.1; TCP connections must use TLS (`hostssl`) and SCRAM-SHA-256,
    /// plain TCP is rejected; the socket stays `trust` for the test kit itself. The superuser
    /// gets `password`. Returns the CA certificate's path (for `sslrootcert`).
    pub async fn enable_tls_and_scram(&self, password: &str) -> Result<PathBuf, String> {
        let certificates = TestCertificates::generate()?;
        let data = self.data_dir();
        self.write_owned(&data.join("server.crt"), &certificates.server_cert)?;
        self.write_owned(&data.join("server.key"), &certificates.server_key)?;
        let ca = self.root.join("ca.crt");
        std::fs::write(&ca, &certificates.ca_cert).map_err(|e| format!("{}: {e}", ca.display()))?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .map_err(|e| format!("postgresql.conf: {e}"))?;
        writeln!(
            conf,
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             password_encryption = 'scram-sha-256'"
        )
        .map_err(|e| format!("postgresql.conf: {e}"))?;
        self.write_owned(
            &data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             host all all 127.0.0.1/32 reject\n",
        )?;
        self.run(
            self.bindir.join("pg_ctl"),
            &["-D", &data.to_string_lossy(), "reload"],
        )?;
        // the reload is asynchronous: wait until the server reports TLS on
        let client = self.connect("postgres").await;
        client
            .batch_execute(&format!(
                "alter role {SUPERUSER} password '{}'",
                password.replace('\'', "''")
            ))
            .await
            .map_err(|e| format!("setting the password: {e}"))?;
        for _ in 0..100 {
            let on: String = client
                .query_one("show ssl", &[])
                .await
                .map_err(|e| format!("show ssl: {e}"))?
                .get(0);
            if on == "on" {
                return Ok(ca);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(format!(
            "the server did not turn TLS on; see {}",
            self.log_file().display()
        ))
    }

    /// A connection string for `dbname` over TCP to `localhost` (127.0.0.1), with the given
    /// user and extra parameters (sslmode, sslrootcert, password, ...).
    pub fn tcp_conninfo(&self, dbname: &str, user: &str, extra: &str) -> String {
        format!(
            "host=localhost hostaddr=127.0.0.1 port={} user={user} dbname={dbname} {extra}",
            self.port
        )
    }

    /// Writes `contents` to `path` readable by the server only (and owned by its OS user).
    fn write_owned(&self, path: &Path, contents: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, contents).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
        Ok(())
    }

    fn initdb(&self) -> Result<(), String> {
        self.run(
            self.bindir.join("initdb"),
            &[
                "-D",
                &self.data_dir().to_string_lossy(),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data_dir().join("postgresql.conf"))
            .map_err(|e| format!("postgresql.conf: {e}"))?;
        writeln!(
            conf,
            "\n# ferry test cluster\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n\
             shared_buffers = 128MB\nwal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             include_if_exists = 'port.conf'\n",
            self.root.display()
        )
        .map_err(|e| format!("postgresql.conf: {e}"))
    }

    fn write_port(&self) -> Result<(), String> {
        let path = self.data_dir().join("port.conf");
        std::fs::write(&path, format!("port = {}\n", self.port))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|e| format!("chown: {e}"))?;
        }
        Ok(())
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        self.run(
            self.bindir.join("pg_ctl"),
            &[
                "-D",
                &self.data_dir().to_string_lossy(),
                "-l",
                &self.log_file().to_string_lossy(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(self.log_file()).unwrap_or_default();
            format!("{e}\nserver log:\n{log}")
        })
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(&self.root)
            .env("LC_ALL", "C")
            .env_remove("PGDATA");
        if let Some((uid, gid)) = self.owner {
            command.uid(uid).gid(gid).env("HOME", &self.root);
        }
        command
    }

    fn run(&self, program: PathBuf, args: &[&str]) -> Result<(), String> {
        let output = self
            .command(&program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", program.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} {} failed ({}): {}{}",
                program.display(),
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }

    /// The watchdog waits for its stdin to close (this process ending, or drop), then stops
    /// the server and removes the cluster's directory.
    fn start_watchdog(&mut self) -> Result<(), String> {
        let script = r#"read _ignored; "$1/pg_ctl" -D "$2/data" -m immediate -w stop >/dev/null 2>&1; rm -rf "$2""#;
        let mut child = self
            .command("/bin/sh")
            .args(["-c", script, "ferry-test-watchdog"])
            .arg(&self.bindir)
            .arg(&self.root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting the cluster watchdog: {e}"))?;
        let stdin = child.stdin.take().expect("piped stdin");
        *self.watchdog.lock().unwrap() = Some((child, stdin));
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((mut child, stdin)) = self
            .watchdog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

/// A plain client for `conninfo`; its connection task is spawned on the current runtime.
pub async fn connect(conninfo: &str) -> tokio_postgres::Client {
    let mut last = None;
    for _ in 0..50 {
        match tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                return client;
            }
            Err(e) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot connect to {conninfo}: {last:?}")
}

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago.
pub fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// When run as root the server must run as an unprivileged user: `postgres`. Returns its
/// uid and gid then, `None` when not root (everything runs as the caller).
pub fn server_owner() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new(SUPERUSER).unwrap();
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(
            "running as root needs an OS user named postgres to run the test server".into(),
        );
    }
    // SAFETY: non-null pointer from getpwnam.
    unsafe { Ok(Some(((*pw).pw_uid, (*pw).pw_gid))) }
}

/// The directory of the PostgreSQL server binaries (with `initdb` and `pg_ctl`).
pub fn find_bindir() -> Result<PathBuf, String> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("FERRY_PG_BINDIR").map(PathBuf::from) {
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "FERRY_PG_BINDIR={} has no initdb and pg_ctl",
                dir.display()
            ))
        };
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && has_server(&dir) {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                // follow a symlinked initdb to the real binary directory
                let real = std::fs::canonicalize(dir.join("initdb")).ok();
                return Ok(real
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .unwrap_or(dir));
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or_else(|| {
        "no PostgreSQL server binaries found (set FERRY_PG_BINDIR, or install postgresql)".into()
    })
}

/// A throwaway CA and a server certificate it signed, in PEM.
pub struct TestCertificates {
    /// The CA's certificate (what clients trust).
    pub ca_cert: String,
    /// The server's certificate, for `localhost` and 127.0.0.1.
    pub server_cert: String,
    /// The server certificate's private key.
    pub server_key: String,
}

impl TestCertificates {
    /// A new CA and server certificate; every call makes a different CA.
    pub fn generate() -> Result<TestCertificates, String> {
        let fail = |e: rcgen::Error| format!("making test certificates: {e}");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(fail)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ferry test CA");
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().map_err(fail)?;
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).map_err(fail)?;
        let mut server_params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .map_err(fail)?;
        server_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let server_key = rcgen::KeyPair::generate().map_err(fail)?;
        let server_cert = server_params.signed_by(&server_key, &ca).map_err(fail)?;
        Ok(TestCertificates {
            ca_cert: ca.pem(),
            server_cert: server_cert.pem(),
            server_key: server_key.serialize_pem(),
        })
    }
}

/// An error with all its sources, `outer: inner: ...`, the way logs show it.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
