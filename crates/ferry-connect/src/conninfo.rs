//! libpq connection strings: `key=value` pairs (values optionally single-quoted) and
//! `postgresql://` URIs, with the PG* environment variables and libpq's defaults behind them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::{service, ConnectError};

/// Keys libpq accepts that ferry understands.
const KNOWN_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslcompression",
    "sslsni",
    "gssencmode",
    "channel_binding",
    "target_session_attrs",
    "load_balance_hosts",
    "service",
];

/// libpq's environment variables and the keys they stand for.
const ENVIRONMENT: &[(&str, &str)] = &[
    ("PGHOST", "host"),
    ("PGHOSTADDR", "hostaddr"),
    ("PGPORT", "port"),
    ("PGDATABASE", "dbname"),
    ("PGUSER", "user"),
    ("PGPASSWORD", "password"),
    ("PGPASSFILE", "passfile"),
    ("PGOPTIONS", "options"),
    ("PGAPPNAME", "application_name"),
    ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"),
    ("PGSSLCERT", "sslcert"),
    ("PGSSLKEY", "sslkey"),
    ("PGCONNECT_TIMEOUT", "connect_timeout"),
    ("PGTARGETSESSIONATTRS", "target_session_attrs"),
    ("PGCHANNELBINDING", "channel_binding"),
    ("PGSSLCRL", "sslcrl"),
    ("PGGSSENCMODE", "gssencmode"),
    ("PGSSLSNI", "sslsni"),
    ("PGCLIENTENCODING", "client_encoding"),
    ("PGLOADBALANCEHOSTS", "load_balance_hosts"),
];

/// Socket directories tried, in order, when no host is given (Debian's, then upstream's).
const DEFAULT_SOCKET_DIRS: &[&str] = &["/var/run/postgresql", "/tmp"];

/// A parsed connection string. Holds only what the string says; [`ConnInfo::resolve`] adds
/// the environment and defaults.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    params: BTreeMap<String, String>,
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // never show the password
        f.debug_struct("ConnInfo")
            .field("params", &redacted(&self.params))
            .finish()
    }
}

fn redacted(params: &BTreeMap<String, String>) -> BTreeMap<&str, &str> {
    params
        .iter()
        .map(|(k, v)| {
            (
                k.as_str(),
                if k == "password" {
                    "********"
                } else {
                    v.as_str()
                },
            )
        })
        .collect()
}

impl ConnInfo {
    /// Parses a libpq connection string (`key=value ...` or a `postgresql://` URI). A
    /// service (`service=NAME`, or `PGSERVICE`) is looked up at once (see [`crate::service`]):
    /// its parameters fill in what the string leaves out.
    pub fn parse(text: &str) -> Result<ConnInfo, ConnectError> {
        ConnInfo::parse_with(text, &|name| std::env::var(name).ok())
    }

    /// [`ConnInfo::parse`] with the environment given, for tests.
    pub fn parse_with(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ConnInfo, ConnectError> {
        let trimmed = text.trim();
        let mut params =
            if trimmed.starts_with("postgresql://") || trimmed.starts_with("postgres://") {
                parse_uri(trimmed)?
            } else {
                parse_key_values(trimmed)?
            };
        check_keys(params.keys(), "connection option")?;
        let service = params
            .get("service")
            .cloned()
            .or_else(|| env("PGSERVICE").filter(|v| !v.is_empty()));
        if let Some(name) = service {
            let from_service = service::lookup(&name, env)?;
            check_keys(
                from_service.keys(),
                &format!("option of service \"{name}\""),
            )?;
            for (key, value) in from_service {
                params.entry(key).or_insert(value);
            }
        }
        refuse_unsupported(&|key| params.get(key).map(String::as_str))?;
        Ok(ConnInfo { params })
    }

    /// The value the string gives for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params.get(key).map(String::as_str)
    }

    /// Adds the PG* environment variables and libpq's defaults (host: the local socket
    /// directory; port 5432; user: the OS user; dbname: the user) for every key the string
    /// leaves out.
    pub fn resolve(&self) -> ConnInfo {
        self.resolve_with(&|name| std::env::var(name).ok(), &os_user_name)
    }

    /// [`ConnInfo::resolve`] with the environment and OS user given, for tests.
    pub fn resolve_with(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
        os_user: &dyn Fn() -> Option<String>,
    ) -> ConnInfo {
        let mut params = self.params.clone();
        for (variable, key) in ENVIRONMENT {
            if !params.contains_key(*key) {
                if let Some(value) = env(variable).filter(|v| !v.is_empty()) {
                    params.insert(key.to_string(), value);
                }
            }
        }
        let port = params
            .entry("port".into())
            .or_insert_with(|| "5432".into())
            .clone();
        if !params.contains_key("host") && !params.contains_key("hostaddr") {
            params.insert("host".into(), default_socket_dir(&port));
        }
        if !params.contains_key("user") {
            if let Some(user) = os_user() {
                params.insert("user".into(), user);
            }
        }
        if !params.contains_key("dbname") {
            if let Some(user) = params.get("user").cloned() {
                params.insert("dbname".into(), user);
            }
        }
        ConnInfo { params }
    }

    /// Where this string connects, for logs and errors: host, port, dbname and user, never
    /// the password.
    pub fn describe(&self) -> String {
        ["host", "hostaddr", "port", "dbname", "user"]
            .iter()
            .filter_map(|k| self.params.get(*k).map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// This string resolved (see [`ConnInfo::resolve`]) and written out as `key='value' ...`
    /// without its password: where a database is, for other ferry commands to connect to
    /// (they find the password in `.pgpass` or a service file). Parses back to the same
    /// parameters, minus the password.
    pub fn location(&self) -> String {
        self.resolve()
            .params
            .iter()
            .filter(|(k, _)| k.as_str() != "password")
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// All parameters (password included), for building a connection.
    pub(crate) fn params(&self) -> &BTreeMap<String, String> {
        &self.params
    }

    /// Where a password file would be looked up.
    pub(crate) fn passfile(&self) -> Option<PathBuf> {
        if let Some(path) = self.params.get("passfile") {
            return Some(PathBuf::from(path));
        }
        std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".pgpass"))
    }
}

/// Refuses the libpq keys (and values) ferry accepts but cannot honour, so that none is
/// silently ignored: a certificate revocation list (ferry cannot check revocation), GSSAPI
/// encryption required, TLS without SNI, a client encoding other than UTF-8.
pub(crate) fn refuse_unsupported<'a>(
    get: &impl Fn(&str) -> Option<&'a str>,
) -> Result<(), ConnectError> {
    if let Some(crl) = get("sslcrl").filter(|v| !v.is_empty()) {
        return Err(ConnectError::invalid(format!(
            "sslcrl={crl} is not supported: ferry cannot check certificate revocation, and will not connect pretending it does; remove sslcrl (revoke by replacing the CA or the server certificate)"
        )));
    }
    if get("gssencmode") == Some("require") {
        return Err(ConnectError::invalid(
            "gssencmode=require is not supported: ferry has no GSSAPI encryption (use sslmode)",
        ));
    }
    if let Some(mode) = get("gssencmode").filter(|m| !matches!(*m, "disable" | "prefer")) {
        return Err(ConnectError::invalid(format!(
            "invalid gssencmode value \"{mode}\" (disable, prefer, require)"
        )));
    }
    if get("sslsni") == Some("0") {
        return Err(ConnectError::invalid(
            "sslsni=0 is not supported: ferry always sends the server name over TLS",
        ));
    }
    if let Some(encoding) = get("client_encoding") {
        let utf8 = matches!(
            encoding
                .to_ascii_lowercase()
                .replace(['-', '_'], "")
                .as_str(),
            "utf8" | "unicode" | "auto"
        );
        if !utf8 {
            return Err(ConnectError::invalid(format!(
                "client_encoding={encoding} is not supported: ferry always talks UTF-8 to the server (the server converts)"
            )));
        }
    }
    Ok(())
}

/// Refuses any key libpq does not know (`what` names where it came from).
fn check_keys<'k>(
    mut keys: impl Iterator<Item = &'k String>,
    what: &str,
) -> Result<(), ConnectError> {
    match keys.find(|key| !KNOWN_KEYS.contains(&key.as_str())) {
        Some(key) => Err(ConnectError::invalid(format!("invalid {what} \"{key}\""))),
        None => Ok(()),
    }
}

fn default_socket_dir(port: &str) -> String {
    let first_port = port.split(',').next().unwrap_or("5432");
    DEFAULT_SOCKET_DIRS
        .iter()
        .find(|dir| std::path::Path::new(&format!("{dir}/.s.PGSQL.{first_port}")).exists())
        .or_else(|| {
            DEFAULT_SOCKET_DIRS
                .iter()
                .find(|dir| std::path::Path::new(dir).is_dir())
        })
        .unwrap_or(&"/tmp")
        .to_string()
}

fn os_user_name() -> Option<String> {
    // SAFETY: getpwuid_r writes into the buffers we own and returns a pointer into them.
    unsafe {
        let uid = libc::geteuid();
        let mut pwd: libc::passwd = std::mem::zeroed();
        let mut buf = vec![0 as libc::c_char; 4096];
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc != 0 || result.is_null() {
            return std::env::var("USER").ok();
        }
        Some(
            std::ffi::CStr::from_ptr(pwd.pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

fn parse_key_values(text: &str) -> Result<BTreeMap<String, String>, ConnectError> {
    let mut params = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnectError::invalid(format!(
                "missing \"=\" after \"{key}\" in connection string"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            let mut closed = false;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '\'' => {
                        closed = true;
                        break;
                    }
                    other => value.push(other),
                }
            }
            if !closed {
                return Err(ConnectError::invalid(
                    "unterminated quoted string in connection string",
                ));
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        params.insert(key, value);
    }
    Ok(params)
}

fn percent_decode(text: &str) -> Result<String, ConnectError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConnectError::invalid("invalid percent-encoded token in URI"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ConnectError::invalid("URI is not valid UTF-8 after decoding"))
}

fn parse_uri(text: &str) -> Result<BTreeMap<String, String>, ConnectError> {
    let mut params = BTreeMap::new();
    let rest = text.split_once("://").map(|(_, r)| r).unwrap_or_default();
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    let hosts_part = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if !user.is_empty() {
                params.insert("user".into(), percent_decode(user)?);
            }
            if let Some(password) = password {
                params.insert("password".into(), percent_decode(password)?);
            }
            hosts
        }
        None => authority,
    };
    if !hosts_part.is_empty() {
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for spec in hosts_part.split(',') {
            let (host, port) = if let Some(inner) = spec.strip_prefix('[') {
                let (h, after) = inner
                    .split_once(']')
                    .ok_or_else(|| ConnectError::invalid("unterminated IPv6 address in URI"))?;
                (h.to_string(), after.strip_prefix(':').map(str::to_string))
            } else {
                match spec.split_once(':') {
                    Some((h, p)) => (h.to_string(), Some(p.to_string())),
                    None => (spec.to_string(), None),
                }
            };
            hosts.push(percent_decode(&host)?);
            ports.push(port.unwrap_or_default());
        }
        if hosts.iter().any(|h| !h.is_empty()) {
            params.insert("host".into(), hosts.join(","));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            params.insert("port".into(), ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        params.insert("dbname".into(), percent_decode(db)?);
    }
    for pair in query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ConnectError::invalid(format!("missing \"=\" in URI parameter \"{pair}\""))
        })?;
        params.insert(percent_decode(k)?, percent_decode(v)?);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_location_parses_back_without_its_password() {
        let info = ConnInfo::parse_with(
            "host=db1 port=6432 dbname='my db' user=o\\'k password=secret sslmode=require",
            &|_| None,
        )
        .unwrap();
        let location = info.location();
        assert!(!location.contains("secret"), "{location}");
        let back = ConnInfo::parse_with(&location, &|_| None).unwrap();
        for key in ["host", "port", "dbname", "user", "sslmode"] {
            assert_eq!(back.get(key), info.get(key), "{key} in {location}");
        }
        assert_eq!(back.get("password"), None);
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn key_values_with_quotes_and_escapes() {
        let c =
            ConnInfo::parse(r"dbname=db1 port = 5432 host=host1 password='it''s' user='a \'b\' c'")
                .unwrap_err();
        // '' is not an escape in libpq: the value ends at the second quote, then "s'" is junk
        assert!(c.to_string().contains("connection string"), "{c}");
        let c =
            ConnInfo::parse(r"dbname=db1 port = 5432 host=host1 user='a \'b\' c' password=p\ w")
                .unwrap();
        assert_eq!(c.get("user"), Some("a 'b' c"));
        assert_eq!(c.get("password"), Some("p w"));
        assert_eq!(c.get("port"), Some("5432"));
    }

    #[test]
    fn unknown_option_is_rejected_like_libpq() {
        let e = ConnInfo::parse("dbname=x colour=red").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid connection string: invalid connection option \"colour\""
        );
    }

    #[test]
    fn uri_form() {
        let c = ConnInfo::parse(
            "postgresql://us%40er:pa%3Ass@[::1]:6432,h2/my%20db?sslmode=disable&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(c.get("user"), Some("us@er"));
        assert_eq!(c.get("password"), Some("pa:ss"));
        assert_eq!(c.get("host"), Some("::1,h2"));
        assert_eq!(c.get("port"), Some("6432,"));
        assert_eq!(c.get("dbname"), Some("my db"));
        assert_eq!(c.get("sslmode"), Some("disable"));
        let c = ConnInfo::parse("postgresql://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(c.get("host"), Some("/var/run/postgresql"));
    }

    #[test]
    fn environment_fills_what_the_string_leaves_out() {
        let env = |name: &str| match name {
            "PGHOST" => Some("envhost".to_string()),
            "PGPORT" => Some("6000".to_string()),
            "PGUSER" => Some("envuser".to_string()),
            _ => None,
        };
        let c = ConnInfo::parse("dbname=db1 port=5433")
            .unwrap()
            .resolve_with(&env, &|| None);
        assert_eq!(
            c.describe(),
            "host=envhost port=5433 dbname=db1 user=envuser"
        );
    }

    #[test]
    fn defaults_are_libpqs() {
        let c = ConnInfo::parse("dbname=db1")
            .unwrap()
            .resolve_with(&no_env, &|| Some("postgres".into()));
        assert_eq!(c.get("user"), Some("postgres"));
        assert_eq!(c.get("port"), Some("5432"));
        assert!(c.get("host").unwrap().starts_with('/'));
        let c = ConnInfo::parse("")
            .unwrap()
            .resolve_with(&no_env, &|| Some("alice".into()));
        assert_eq!(c.get("dbname"), Some("alice"));
    }

    #[test]
    fn password_never_shows() {
        let c = ConnInfo::parse("host=h password=secret user=u").unwrap();
        assert!(!c.describe().contains("secret"));
        assert!(!format!("{c:?}").contains("secret"));
    }
}
