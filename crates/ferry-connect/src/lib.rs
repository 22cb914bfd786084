//! Connections to PostgreSQL the way libpq makes them: connection strings in both forms, the
//! PG* environment variables, `~/.pgpass`, local-socket defaults, SCRAM (through
//! tokio-postgres), TLS with libpq's `sslmode` (through rustls). A [`Session`] owns its
//! connection task, forwards LISTEN notifications and says when the connection is gone.
//! Passwords never appear in errors, logs or `Debug`.

mod conninfo;
mod pgpass;
mod service;
mod tls;

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::config::{ChannelBinding, SslMode};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls, Notification};

pub use conninfo::ConnInfo;
pub use tls::TlsSetupError;

/// Whether `error` means the connection is gone (closed, terminated by the server, server
/// shutting down or not accepting connections): reconnecting is the remedy.
pub fn is_connection_lost(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if error.is_closed() {
        return true;
    }
    match error.code() {
        Some(code) => {
            code.code().starts_with("08")
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
        }
        // an error without SQLSTATE is the transport failing
        None => true,
    }
}

/// Waiting for a connection gives up after this long unless `connect_timeout` says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Notifications held for a session before further ones are dropped (they only wake).
const NOTIFICATION_BUFFER: usize = 64;

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection string is not valid.
    #[error("invalid connection string: {0}")]
    Invalid(String),
    /// The connection string's TLS settings cannot be used (a missing or unreadable
    /// certificate file, say).
    #[error("{target}: {source}")]
    Tls {
        /// Where the connection was going (no password).
        target: String,
        /// What is wrong and what to do.
        #[source]
        source: tls::TlsSetupError,
    },
    /// The server could not be reached or refused the connection. Displays the driver's
    /// reason with its causes and then, for the common reasons, what to check (so that the
    /// advice ends the line).
    #[error("cannot connect to {target}: {reason}{}", hint.map(|h| format!("; {h}")).unwrap_or_default())]
    Connect {
        /// Where the connection was going (no password).
        target: String,
        /// The driver's error and its causes, in one line.
        reason: String,
        /// What to check, when the reason is a common one.
        hint: Option<&'static str>,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },
}

impl ConnectError {
    pub(crate) fn invalid(message: impl Into<String>) -> ConnectError {
        ConnectError::Invalid(message.into())
    }

    /// Whether the problem is in the configuration (retrying cannot help) rather than in
    /// reaching the server.
    pub fn is_configuration(&self) -> bool {
        !matches!(self, ConnectError::Connect { .. })
    }

    /// What to check, for the common reasons a server refuses or cannot be reached.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ConnectError::Connect { hint, .. } => *hint,
            _ => None,
        }
    }
}

/// The driver's error followed by its causes, each once, on one line.
fn driver_reason(error: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    let mut reason = error.to_string();
    let mut cause = error.source();
    while let Some(current) = cause {
        let text = current.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        cause = current.source();
    }
    reason.replace('\n', " ")
}

/// What an operator should check when a connection fails with `error`, for the common
/// reasons: nothing listening, no answer, a certificate not accepted, wrong password, unknown
/// user or database, no CONNECT privilege, a full or restarting server.
fn connect_hint(error: &tokio_postgres::Error) -> Option<&'static str> {
    use std::error::Error as _;
    use tokio_postgres::error::SqlState;
    if let Some(code) = error.code() {
        return Some(match code {
            c if *c == SqlState::INVALID_PASSWORD => {
                "check the password (password= in the connection string, PGPASSWORD or ~/.pgpass)"
            }
            c if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                "check user= and the server's pg_hba.conf, which must let that user connect to that database from here"
            }
            c if *c == SqlState::INVALID_CATALOG_NAME => "check dbname=, or create the database",
            c if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
                "the role needs CONNECT on the database (README, \"Privileges\")"
            }
            c if *c == SqlState::TOO_MANY_CONNECTIONS => {
                "the server has no connection slots left (max_connections)"
            }
            c if *c == SqlState::CANNOT_CONNECT_NOW => {
                "the server is starting up or shutting down: try again shortly"
            }
            _ => return None,
        });
    }
    let mut cause = error.source();
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
                return Some(match tls {
                    rustls::Error::InvalidCertificate(_) => {
                        "the server's certificate is not accepted: check sslrootcert (the CA that signed it) and that host= is the name it is made out to, or use sslmode=require to encrypt without checking"
                    }
                    _ => "the TLS handshake failed: check sslmode and the server's ssl settings",
                });
            }
            return Some(match io.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "nothing listens there: is PostgreSQL running, and are host= and port= right (listen_addresses, port)?"
                }
                std::io::ErrorKind::NotFound => {
                    "no server socket there: is PostgreSQL running, and are host= and port= right?"
                }
                std::io::ErrorKind::TimedOut => {
                    "no answer within connect_timeout: check host=, port= and any firewall on the way"
                }
                _ => "check host= and port=, and that the server is running and reachable from here",
            });
        }
        cause = current.source();
    }
    None
}

/// An open connection: the client, the notifications that arrive on it, and whether it still
/// lives.
pub struct Session {
    client: Client,
    notifications: mpsc::Receiver<Notification>,
    closed: watch::Receiver<bool>,
}

impl Session {
    /// The client, for queries.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The client mutably, for transactions.
    pub fn client_mut(&mut self) -> &mut Client {
        &mut self.client
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow() || self.client.is_closed()
    }

    /// Resolves when the connection ends (the server went away, or it was terminated).
    pub fn closed(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut closed = self.closed.clone();
        async move {
            while !*closed.borrow_and_update() {
                if closed.changed().await.is_err() {
                    return;
                }
            }
        }
    }

    /// The next LISTEN notification; `None` once the connection has ended.
    pub async fn notification(&mut self) -> Option<Notification> {
        self.notifications.recv().await
    }

    /// Drops notifications that arrived so far (they are wake-ups, not data).
    pub fn drain_notifications(&mut self) {
        while self.notifications.try_recv().is_ok() {}
    }

    /// A notification that has arrived already, without waiting; `None` when there is none.
    pub fn try_notification(&mut self) -> Option<Notification> {
        self.notifications.try_recv().ok()
    }
}

/// Connects as `conninfo` (after [`ConnInfo::resolve`]) says, naming the session
/// `application_name` unless the string names it.
pub async fn connect(conninfo: &ConnInfo, application_name: &str) -> Result<Session, ConnectError> {
    let resolved = conninfo.resolve();
    let target = resolved.describe();
    let (config, tls) = build_config(&resolved, application_name)?;
    let connected = match tls {
        None => config.connect(NoTls).await.map(|(client, connection)| {
            let closed = spawn_connection(connection);
            (client, closed)
        }),
        Some(settings) => {
            let tls_config = settings
                .client_config()
                .map_err(|source| ConnectError::Tls {
                    target: target.clone(),
                    source,
                })?;
            config
                .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls_config))
                .await
                .map(|(client, connection)| {
                    let closed = spawn_connection(connection);
                    (client, closed)
                })
        }
    };
    let (client, (notifications, closed)) = connected.map_err(|source| ConnectError::Connect {
        target,
        reason: driver_reason(&source),
        hint: connect_hint(&source),
        source,
    })?;
    Ok(Session {
        client,
        notifications,
        closed,
    })
}

/// Drives `connection` in a task of its own: forwards its notifications, logs its notices at
/// debug level, and says when it ends.
fn spawn_connection<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
) -> (mpsc::Receiver<Notification>, watch::Receiver<bool>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (note_tx, note_rx) = mpsc::channel(NOTIFICATION_BUFFER);
    let (closed_tx, closed_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    let _ = note_tx.try_send(note);
                }
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!(target: "ferry::postgres", severity = notice.severity(), "{}", notice.message());
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(target: "ferry::postgres", %error, "connection ended");
                    break;
                }
            }
        }
        let _ = closed_tx.send(true);
    });
    (note_rx, closed_rx)
}

/// The driver's configuration for `resolved`, and the TLS settings when TLS may be used.
/// Passes libpq's TCP keys to the driver: `keepalives` (0 or 1), `keepalives_idle`,
/// `keepalives_interval` (seconds), `keepalives_count`, `tcp_user_timeout` (milliseconds,
/// 0: the system's default), `load_balance_hosts` (disable, random).
fn apply_tcp_settings<'a>(
    config: &mut Config,
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<(), ConnectError> {
    let number = |key: &str| -> Result<Option<u64>, ConnectError> {
        get(key)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| {
                    ConnectError::invalid(format!("invalid integer value \"{v}\" for {key}"))
                })
            })
            .transpose()
    };
    match get("keepalives") {
        None | Some("1") => config.keepalives(true),
        Some("0") => config.keepalives(false),
        Some(other) => {
            return Err(ConnectError::invalid(format!(
                "invalid keepalives value \"{other}\" (0 or 1)"
            )))
        }
    };
    if let Some(idle) = number("keepalives_idle")? {
        config.keepalives_idle(Duration::from_secs(idle));
    }
    if let Some(interval) = number("keepalives_interval")? {
        config.keepalives_interval(Duration::from_secs(interval));
    }
    if let Some(count) = number("keepalives_count")? {
        config.keepalives_retries(u32::try_from(count).unwrap_or(u32::MAX));
    }
    if let Some(millis) = number("tcp_user_timeout")?.filter(|m| *m > 0) {
        config.tcp_user_timeout(Duration::from_millis(millis));
    }
    if let Some(mode) = get("load_balance_hosts") {
        config.load_balance_hosts(match mode {
            "disable" => tokio_postgres::config::LoadBalanceHosts::Disable,
            "random" => tokio_postgres::config::LoadBalanceHosts::Random,
            other => {
                return Err(ConnectError::invalid(format!(
                    "invalid load_balance_hosts value \"{other}\" (disable, random)"
                )))
            }
        });
    }
    Ok(())
}

fn build_config(
    resolved: &ConnInfo,
    application_name: &str,
) -> Result<(Config, Option<tls::TlsSettings>), ConnectError> {
    let mut config = Config::new();
    let params = resolved.params();
    let get = |k: &str| params.get(k).map(String::as_str);
    if let Some(hosts) = get("host") {
        for host in hosts.split(',') {
            config.host(host);
        }
    }
    if let Some(addrs) = get("hostaddr") {
        for addr in addrs.split(',') {
            let ip = addr
                .parse()
                .map_err(|_| ConnectError::invalid(format!("invalid hostaddr \"{addr}\"")))?;
            config.hostaddr(ip);
        }
    }
    if let Some(ports) = get("port") {
        for port in ports.split(',') {
            let port = if port.is_empty() { "5432" } else { port };
            config.port(
                port.parse().map_err(|_| {
                    ConnectError::invalid(format!("invalid port number \"{port}\""))
                })?,
            );
        }
    }
    if let Some(user) = get("user") {
        config.user(user);
    }
    if let Some(dbname) = get("dbname") {
        config.dbname(dbname);
    }
    if let Some(options) = get("options") {
        config.options(options);
    }
    config.application_name(get("application_name").unwrap_or(application_name));
    let password = match get("password") {
        Some(p) => Some(p.to_string()),
        None => pgpass::lookup(resolved),
    };
    if let Some(password) = password {
        config.password(password);
    }
    let timeout = match get("connect_timeout") {
        None => DEFAULT_CONNECT_TIMEOUT,
        Some(t) => {
            let secs: u64 = t
                .parse()
                .map_err(|_| ConnectError::invalid(format!("invalid connect_timeout \"{t}\"")))?;
            if secs == 0 {
                DEFAULT_CONNECT_TIMEOUT
            } else {
                Duration::from_secs(secs.max(2))
            }
        }
    };
    config.connect_timeout(timeout);
    apply_tcp_settings(&mut config, &get)?;
    // again after the environment was added (PGSSLCRL, PGGSSENCMODE, ...)
    conninfo::refuse_unsupported(&get)?;
    if let Some(attrs) = get("target_session_attrs") {
        config.target_session_attrs(match attrs {
            "any" => tokio_postgres::config::TargetSessionAttrs::Any,
            "read-write" => tokio_postgres::config::TargetSessionAttrs::ReadWrite,
            other => {
                return Err(ConnectError::invalid(format!(
                    "target_session_attrs \"{other}\" is not supported (any, read-write)"
                )))
            }
        });
    }
    if let Some(binding) = get("channel_binding") {
        config.channel_binding(match binding {
            "disable" => ChannelBinding::Disable,
            "prefer" => ChannelBinding::Prefer,
            "require" => ChannelBinding::Require,
            other => {
                return Err(ConnectError::invalid(format!(
                    "invalid channel_binding value: \"{other}\" (disable, prefer, require)"
                )))
            }
        });
    }
    // libpq never uses TLS over Unix sockets, whatever sslmode says
    let only_sockets = get("hostaddr").is_none()
        && get("host").is_some_and(|hosts| hosts.split(',').all(|h| h.starts_with('/')));
    let mode = get("sslmode").unwrap_or("prefer");
    let ssl_mode = match mode {
        "disable" => SslMode::Disable,
        "allow" | "prefer" => SslMode::Prefer,
        "require" | "verify-ca" | "verify-full" => SslMode::Require,
        other => {
            return Err(ConnectError::invalid(format!(
                "invalid sslmode value: \"{other}\" (disable, allow, prefer, require, verify-ca, verify-full)"
            )))
        }
    };
    if ssl_mode == SslMode::Disable || only_sockets {
        config.ssl_mode(SslMode::Disable);
        return Ok((config, None));
    }
    config.ssl_mode(ssl_mode);
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let settings = tls::TlsSettings::new(
        mode,
        get("sslrootcert"),
        get("sslcert"),
        get("sslkey"),
        home.as_deref(),
    )
    .map_err(|source| ConnectError::Tls {
        target: resolved.describe(),
        source,
    })?;
    Ok((config, Some(settings)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_of(conninfo: &str) -> Result<Config, ConnectError> {
        let info = ConnInfo::parse_with(conninfo, &|_| None)?;
        build_config(&info, "test").map(|(config, _)| config)
    }

    #[test]
    fn tcp_keys_reach_the_driver() {
        let config = config_of(
            "host=/tmp keepalives=1 keepalives_idle=30 keepalives_interval=5 keepalives_count=4 tcp_user_timeout=9000",
        )
        .unwrap();
        assert!(config.get_keepalives());
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(
            config.get_keepalives_interval(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(config.get_keepalives_retries(), Some(4));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_millis(9000))
        );
        assert!(!config_of("host=/tmp keepalives=0")
            .unwrap()
            .get_keepalives());
        assert!(config_of("host=/tmp keepalives_idle=soon").is_err());
    }

    #[test]
    fn keys_ferry_cannot_honour_are_refused_not_ignored() {
        for (conninfo, needle) in [
            ("host=/tmp sslcrl=/etc/crl.pem", "certificate revocation"),
            ("host=/tmp gssencmode=require", "GSSAPI"),
            ("host=/tmp sslsni=0", "sslsni=0"),
            ("host=/tmp client_encoding=LATIN1", "UTF-8"),
        ] {
            let error = config_of(conninfo).unwrap_err();
            assert!(error.is_configuration(), "{conninfo}");
            assert!(error.to_string().contains(needle), "{conninfo}: {error}");
        }
        for fine in [
            "host=/tmp gssencmode=disable",
            "host=/tmp sslsni=1",
            "host=/tmp client_encoding=UTF8",
            "host=/tmp sslcompression=0",
        ] {
            assert!(config_of(fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn a_service_fills_in_what_the_string_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("services.conf");
        std::fs::write(&file, "[shop]\nhost=db1\nport=6432\ndbname=shop\n").unwrap();
        let env = |name: &str| match name {
            "PGSERVICEFILE" => Some(file.to_str().unwrap().to_string()),
            "PGSYSCONFDIR" => Some(dir.path().to_str().unwrap().to_string()),
            _ => None,
        };
        let info = ConnInfo::parse_with("service=shop dbname=other", &env).unwrap();
        assert_eq!(info.get("host"), Some("db1"));
        assert_eq!(info.get("port"), Some("6432"));
        assert_eq!(info.get("dbname"), Some("other"), "the string wins");
        let with_env = |name: &str| match name {
            "PGSERVICE" => Some("shop".to_string()),
            other => env(other),
        };
        let info = ConnInfo::parse_with("user=u", &with_env).unwrap();
        assert_eq!(info.get("host"), Some("db1"), "PGSERVICE names the service");
        let error = ConnInfo::parse_with("service=nope", &env).unwrap_err();
        assert!(
            error.to_string().contains("service \"nope\" not found"),
            "{error}"
        );
        std::fs::write(&file, "[shop]\nhots=db1\n").unwrap();
        let error = ConnInfo::parse_with("service=shop", &env).unwrap_err();
        assert!(error.to_string().contains("\"hots\""), "{error}");
    }
}
