//! ferry's configuration: Londiste 2 / SkyTools ini files, read unchanged.
//!
//! `[pgqadm]` configures the ticker, `[londiste]` replication. Each typed config is built from
//! its section; missing required keys and values of the wrong form are [`ConfigError`]s naming
//! the file, section and key; unknown keys and sections are returned as warnings for the
//! caller to log.

mod error;
mod ini;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, ErrorKind};
pub use ini::{IniFile, SectionRef, DEFAULT_SECTION};

/// Section name of the ticker's configuration (as pgqadm.py's).
pub const TICKER_SECTION: &str = "pgqadm";
/// Section name of the replication configuration (as londiste.py's).
pub const REPLICATION_SECTION: &str = "londiste";

/// Keys every daemon section understands.
const DAEMON_KEYS: &[&str] = &[
    "job_name",
    "logfile",
    "pidfile",
    "log_size",
    "log_count",
    "loop_delay",
    "log_format",
    "metrics_address",
    "metrics_port",
    // accepted for compatibility with SkyTools files, without effect
    "use_skylog",
    "connection_lifetime",
];

/// Default `log_size`: rotate the log file at 5 MiB.
pub const DEFAULT_LOG_SIZE: u64 = 5 * 1024 * 1024;
/// Default `log_count`: keep three rotated log files.
pub const DEFAULT_LOG_COUNT: u32 = 3;

/// Settings every long-running job has: its name, log and pid files.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonSettings {
    /// `job_name`: names the job in logs (and, for replication, the consumer).
    pub job_name: String,
    /// `logfile`: where logs go when detached (and also in the foreground, when set).
    pub logfile: Option<PathBuf>,
    /// `pidfile`: holds the running daemon's pid; required for `-d`, `-s`, `-k`, `-r`.
    pub pidfile: Option<PathBuf>,
    /// `log_size`: bytes after which the log file is rotated.
    pub log_size: u64,
    /// `log_count`: how many rotated log files are kept.
    pub log_count: u32,
    /// `log_format = json`: one json object per log line (default `text`).
    pub json_logs: bool,
    /// `metrics_address = HOST:PORT` (or `metrics_port = PORT`, on every interface): serve
    /// Prometheus metrics on `/metrics` there. Off when neither is set.
    pub metrics_address: Option<std::net::SocketAddr>,
}

impl DaemonSettings {
    /// Reads the daemon keys of `section`. `~` and `~user` at the start of a path are home
    /// directories (as SkyTools expands them); relative paths are taken relative to the config
    /// file's directory, so a detached daemon (whose working directory is `/`) finds them.
    pub fn from_section(section: &SectionRef<'_>, config_dir: &Path) -> Result<Self, ConfigError> {
        let path_of = |key: &str| -> Result<Option<PathBuf>, ConfigError> {
            match section.get(key)?.filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(value) => {
                    let path = expand_home(&value).map_err(|message| {
                        section.error(key, ErrorKind::Interpolation { message })
                    })?;
                    Ok(Some(config_dir.join(path)))
                }
            }
        };
        Ok(DaemonSettings {
            job_name: section.require("job_name")?,
            logfile: path_of("logfile")?,
            pidfile: path_of("pidfile")?,
            log_size: parse_or(section, "log_size", DEFAULT_LOG_SIZE)?,
            log_count: parse_or(section, "log_count", DEFAULT_LOG_COUNT)?,
            metrics_address: metrics_address(section)?,
            json_logs: match section.get("log_format")?.as_deref().map(str::trim) {
                None | Some("text") => false,
                Some("json") => true,
                Some(other) => {
                    return Err(section.error(
                        "log_format",
                        ErrorKind::WrongType {
                            value: other.to_string(),
                            expected: "text or json",
                        },
                    ))
                }
            },
        })
    }
}

/// The ticker's configuration, from `[pgqadm]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TickerConfig {
    /// Job name, log and pid files.
    pub daemon: DaemonSettings,
    /// `db`: connection string of the database holding the queues.
    pub db: String,
    /// `loop_delay`: how often the ticker checks the queues for news (default 0.02 s).
    pub loop_delay: Duration,
    /// `maint_delay`: how often rotation, retry and tick cleanup run (default 600 s).
    pub maint_delay: Duration,
}

impl TickerConfig {
    /// Builds the ticker's configuration from `[pgqadm]` of `ini`; also returns warnings.
    pub fn from_ini(ini: &IniFile) -> Result<(TickerConfig, Vec<String>), ConfigError> {
        let section = required_section(ini, TICKER_SECTION, "the ticker reads [pgqadm]")?;
        let warnings = unknown_keys(ini, &section, &["db", "maint_delay"]);
        let config = TickerConfig {
            daemon: DaemonSettings::from_section(&section, &config_dir(ini))?,
            db: section.require("db")?,
            loop_delay: seconds_or(&section, "loop_delay", 0.02)?,
            maint_delay: seconds_or(&section, "maint_delay", 600.0)?,
        };
        Ok((config, warnings))
    }
}

/// The replication configuration, from `[londiste]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicationConfig {
    /// Job name (also the consumer name on the queue), log and pid files.
    pub daemon: DaemonSettings,
    /// `provider_db`: connection string of the provider (where the queue is).
    pub provider_db: String,
    /// `subscriber_db`: connection string of the subscriber.
    pub subscriber_db: String,
    /// `pgq_queue_name`: the queue carrying the changes.
    pub queue_name: String,
    /// `loop_delay`: longest wait for a new batch when no wake-up arrives (default 1 s).
    pub loop_delay: Duration,
    /// `parallel_copies`: how many tables are copied at once, beside the batch stream
    /// (default 1, as Londiste's; 0 is taken as 1).
    pub parallel_copies: u32,
    /// `copy_slices`: how many slices (session pairs sharing the copy's snapshot) a big
    /// table's copy is split into at most (default 1: one stream, invisible until it commits;
    /// 0 is taken as 1).
    pub copy_slices: u32,
}

impl ReplicationConfig {
    /// Builds the replication configuration from `[londiste]` of `ini`; also returns warnings.
    pub fn from_ini(ini: &IniFile) -> Result<(ReplicationConfig, Vec<String>), ConfigError> {
        let section = required_section(ini, REPLICATION_SECTION, "replication reads [londiste]")?;
        let warnings = unknown_keys(
            ini,
            &section,
            &[
                "provider_db",
                "subscriber_db",
                "pgq_queue_name",
                "pgq_lazy_fetch",
                "parallel_copies",
                "copy_slices",
            ],
        );
        let config = ReplicationConfig {
            daemon: DaemonSettings::from_section(&section, &config_dir(ini))?,
            provider_db: section.require("provider_db")?,
            subscriber_db: section.require("subscriber_db")?,
            queue_name: section.require("pgq_queue_name")?,
            loop_delay: seconds_or(&section, "loop_delay", 1.0)?,
            parallel_copies: parse_or(&section, "parallel_copies", 1u32)?.max(1),
            copy_slices: parse_or(&section, "copy_slices", 1u32)?.max(1),
        };
        Ok((config, warnings))
    }
}

/// The daemon settings of every daemon section the file has (`[pgqadm]`, `[londiste]`), for
/// `-s`, `-k` and `-r`, which only need the pid file.
pub fn daemon_sections(ini: &IniFile) -> Result<Vec<(String, DaemonSettings)>, ConfigError> {
    let mut found = Vec::new();
    for name in [TICKER_SECTION, REPLICATION_SECTION] {
        if let Some(section) = ini.section(name) {
            found.push((
                name.to_string(),
                DaemonSettings::from_section(&section, &config_dir(ini))?,
            ));
        }
    }
    Ok(found)
}

/// `metrics_address` (HOST:PORT) or, without it, `metrics_port` (every interface).
fn metrics_address(section: &SectionRef<'_>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    use std::net::ToSocketAddrs;
    if let Some(value) = section.get("metrics_address")? {
        let address = value.trim();
        return address
            .to_socket_addrs()
            .ok()
            .and_then(|mut all| all.next())
            .map(Some)
            .ok_or_else(|| {
                section.error(
                    "metrics_address",
                    ErrorKind::WrongType {
                        value: value.clone(),
                        expected: "an address to listen on, HOST:PORT",
                    },
                )
            });
    }
    match section.get("metrics_port")? {
        None => Ok(None),
        Some(value) => value
            .trim()
            .parse::<u16>()
            .map(|port| Some(std::net::SocketAddr::from(([0, 0, 0, 0], port))))
            .map_err(|_| {
                section.error(
                    "metrics_port",
                    ErrorKind::WrongType {
                        value,
                        expected: "a port number",
                    },
                )
            }),
    }
}

/// `path` with a leading `~` (the user's home, `$HOME`) or `~user` (that user's home)
/// expanded, as Python's `os.path.expanduser`; any other path as it is.
fn expand_home(path: &str) -> Result<PathBuf, String> {
    let Some(rest) = path.strip_prefix('~') else {
        return Ok(PathBuf::from(path));
    };
    let (user, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let home = if user.is_empty() {
        std::env::var_os("HOME")
            .map(PathBuf::from)
            .or_else(|| home_of_uid(unsafe { libc::getuid() }))
            .ok_or_else(|| format!("'{path}': HOME is not set"))?
    } else {
        home_of_user(user).ok_or_else(|| format!("'{path}': there is no user '{user}'"))?
    };
    Ok(if tail.is_empty() {
        home
    } else {
        home.join(tail)
    })
}

/// The home directory of the user named `name`, from the password database.
fn home_of_user(name: &str) -> Option<PathBuf> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: configs are read before any thread starts; the entry is copied out at once.
    unsafe { home_of(libc::getpwnam(name.as_ptr())) }
}

/// The home directory of user `uid`, from the password database.
fn home_of_uid(uid: libc::uid_t) -> Option<PathBuf> {
    // SAFETY: as in home_of_user.
    unsafe { home_of(libc::getpwuid(uid)) }
}

/// The home directory of a password entry (null: none).
///
/// # Safety
/// `entry` is null or points to a valid `passwd` entry not changed while this runs.
unsafe fn home_of(entry: *const libc::passwd) -> Option<PathBuf> {
    if entry.is_null() || (*entry).pw_dir.is_null() {
        return None;
    }
    use std::os::unix::ffi::OsStrExt;
    let dir = std::ffi::CStr::from_ptr((*entry).pw_dir);
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes())))
}

fn config_dir(ini: &IniFile) -> PathBuf {
    let dir = ini.path().parent().unwrap_or(Path::new("."));
    if dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        dir.to_path_buf()
    }
}

fn required_section<'a>(
    ini: &'a IniFile,
    name: &str,
    purpose: &str,
) -> Result<SectionRef<'a>, ConfigError> {
    ini.section(name).ok_or_else(|| {
        ConfigError::new(
            ini.path(),
            ErrorKind::MissingSection {
                purpose: purpose.to_string(),
            },
        )
        .in_section(name)
    })
}

/// Warnings for keys `section` sets that nobody reads, and for sections ferry does not know.
fn unknown_keys(ini: &IniFile, section: &SectionRef<'_>, extra_known: &[&str]) -> Vec<String> {
    let mut warnings: Vec<String> = section
        .own_keys()
        .filter(|k| !DAEMON_KEYS.contains(k) && !extra_known.contains(k))
        .map(|k| {
            format!(
                "{}: [{}] {k}: unknown key, ignored",
                ini.path().display(),
                section.name()
            )
        })
        .collect();
    warnings.extend(
        ini.section_names()
            .filter(|n| *n != TICKER_SECTION && *n != REPLICATION_SECTION)
            .map(|n| format!("{}: [{n}]: unknown section, ignored", ini.path().display())),
    );
    warnings
}

fn parse_or<T: std::str::FromStr>(
    section: &SectionRef<'_>,
    key: &str,
    default: T,
) -> Result<T, ConfigError> {
    match section.get(key)? {
        None => Ok(default),
        Some(value) => value.trim().parse().map_err(|_| {
            section.error(
                key,
                ErrorKind::WrongType {
                    value,
                    expected: "a whole non-negative number",
                },
            )
        }),
    }
}

fn seconds_or(section: &SectionRef<'_>, key: &str, default: f64) -> Result<Duration, ConfigError> {
    let seconds = match section.get(key)? {
        None => default,
        Some(value) => match value.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s >= 0.0 => s,
            _ => {
                return Err(section.error(
                    key,
                    ErrorKind::WrongType {
                        value,
                        expected: "a number of seconds",
                    },
                ))
            }
        },
    };
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ini(text: &str) -> IniFile {
        IniFile::parse(Path::new("/etc/ferry/t.ini"), text).unwrap()
    }

    #[test]
    fn skytools_built_in_defaults() {
        // the template SkyTools ships: no job_name, paths under the home directory
        let (c, warnings) = TickerConfig::from_ini(&ini(
            "[pgqadm]\ndb = dbname=db1 host=%(host_name)s\n\
             logfile = ~/log/%(job_name)s.log\npidfile = %(config_dir)s/pid/%(service_name)s.pid\n",
        ))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            c.daemon.job_name, "t",
            "the config file's name without extension"
        );
        let home = std::env::var("HOME").unwrap();
        assert_eq!(
            c.daemon.logfile.unwrap(),
            Path::new(&home).join("log/t.log")
        );
        assert_eq!(
            c.daemon.pidfile.unwrap(),
            Path::new("/etc/ferry/pid/pgqadm.pid")
        );
        assert!(!c.db.ends_with("host="), "{}", c.db);
        // what the file sets wins over the built-ins
        let (c, _) = TickerConfig::from_ini(&ini(
            "[DEFAULT]\njob_name = from-default\n[pgqadm]\ndb = x\n",
        ))
        .unwrap();
        assert_eq!(c.daemon.job_name, "from-default");
    }

    #[test]
    fn home_directories_expand() {
        let home = PathBuf::from(std::env::var("HOME").unwrap());
        assert_eq!(expand_home("~").unwrap(), home);
        assert_eq!(expand_home("~/a/b").unwrap(), home.join("a/b"));
        assert_eq!(expand_home("/var/~x").unwrap(), Path::new("/var/~x"));
        assert_eq!(expand_home("rel/x").unwrap(), Path::new("rel/x"));
        assert_eq!(expand_home("~root/x").unwrap(), Path::new("/root/x"));
        let error = expand_home("~no-such-user-here/x").unwrap_err();
        assert!(error.contains("no user 'no-such-user-here'"), "{error}");
    }

    #[test]
    fn seed_ticker_config() {
        let (c, warnings) = TickerConfig::from_ini(&ini(
            "[pgqadm]\njob_name = db1-ticker\ndb = dbname=db1\nmaint_delay = 600\nloop_delay = 0.1\n\
             logfile = /var/log/skytools/%(job_name)s.log\npidfile = /var/run/skytools/%(job_name)s.pid\n",
        ))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c.daemon.job_name, "db1-ticker");
        assert_eq!(c.db, "dbname=db1");
        assert_eq!(c.loop_delay, Duration::from_millis(100));
        assert_eq!(c.maint_delay, Duration::from_secs(600));
        assert_eq!(
            c.daemon.logfile.unwrap(),
            Path::new("/var/log/skytools/db1-ticker.log")
        );
        assert_eq!(c.daemon.log_size, DEFAULT_LOG_SIZE);
    }

    #[test]
    fn seed_replication_config() {
        let (c, warnings) = ReplicationConfig::from_ini(&ini(
            "[londiste]\njob_name = db1-londiste\nprovider_db = dbname=db1 port=5432 host=host1\n\
             subscriber_db = dbname=db1\n# comment\npgq_queue_name = db1-londiste-queue\n\
             logfile = /var/log/skytools/%(job_name)s.log\npidfile = /var/run/skytools/%(job_name)s.pid\n\
             log_size = 5242880\nlog_count = 3\n",
        ))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c.queue_name, "db1-londiste-queue");
        assert_eq!(c.provider_db, "dbname=db1 port=5432 host=host1");
        assert_eq!(c.daemon.log_count, 3);
        assert_eq!(
            c.parallel_copies, 1,
            "Londiste's default: one copy at a time"
        );
        assert_eq!(c.copy_slices, 1, "one stream, invisible until it commits");
    }

    #[test]
    fn parallel_copies_is_read_and_checked() {
        let base =
            "[londiste]\njob_name = j\nprovider_db = a\nsubscriber_db = b\npgq_queue_name = q\n";
        let (c, warnings) = ReplicationConfig::from_ini(&ini(&format!(
            "{base}parallel_copies = 3\ncopy_slices = 4\n"
        )))
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(c.parallel_copies, 3);
        assert_eq!(c.copy_slices, 4);
        let (c, _) =
            ReplicationConfig::from_ini(&ini(&format!("{base}parallel_copies = 0\n"))).unwrap();
        assert_eq!(c.parallel_copies, 1);
        let err =
            ReplicationConfig::from_ini(&ini(&format!("{base}copy_slices = -2\n"))).unwrap_err();
        assert!(err.to_string().contains("[londiste] copy_slices"), "{err}");
        let err = ReplicationConfig::from_ini(&ini(&format!("{base}parallel_copies = many\n")))
            .unwrap_err();
        assert!(
            err.to_string().contains("[londiste] parallel_copies"),
            "{err}"
        );
    }

    #[test]
    fn missing_key_names_file_section_and_key() {
        let err = TickerConfig::from_ini(&ini("[pgqadm]\njob_name = x\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/ferry/t.ini: [pgqadm] db: required key is missing"
        );
    }

    #[test]
    fn missing_section_is_an_error() {
        let err = TickerConfig::from_ini(&ini("[londiste]\njob_name = x\n")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/etc/ferry/t.ini: [pgqadm]: section is missing"),
            "{err}"
        );
    }

    #[test]
    fn wrong_types_are_errors() {
        let err =
            TickerConfig::from_ini(&ini("[pgqadm]\njob_name = x\ndb = d\nloop_delay = fast\n"))
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/ferry/t.ini: [pgqadm] loop_delay: 'fast' is not a number of seconds"
        );
        let err = TickerConfig::from_ini(&ini("[pgqadm]\njob_name = x\ndb = d\nlog_count = -1\n"))
            .unwrap_err();
        assert!(err.to_string().contains("[pgqadm] log_count"), "{err}");
    }

    #[test]
    fn unknown_keys_and_sections_warn() {
        let (_, warnings) = TickerConfig::from_ini(&ini(
            "[pgqadm]\njob_name = x\ndb = d\ncolour = red\n[extra]\na = b\n",
        ))
        .unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("[pgqadm] colour: unknown key"));
        assert!(warnings[1].contains("[extra]: unknown section"));
    }

    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let (c, _) = TickerConfig::from_ini(&ini(
            "[pgqadm]\njob_name = x\ndb = d\npidfile = run/x.pid\n",
        ))
        .unwrap();
        assert_eq!(c.daemon.pidfile.unwrap(), Path::new("/etc/ferry/run/x.pid"));
    }
}

#[cfg(test)]
mod shipped_examples {
    use super::*;

    #[test]
    fn the_example_configs_in_etc_parse_without_warnings() {
        let ticker = IniFile::parse(
            Path::new("etc/db1-ticker.ini"),
            include_str!("../../../etc/db1-ticker.ini"),
        )
        .unwrap();
        let (config, warnings) = TickerConfig::from_ini(&ticker).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            config.daemon.pidfile.unwrap(),
            Path::new("/var/run/ferry/db1-ticker.pid")
        );
        let replication = IniFile::parse(
            Path::new("etc/db1-londiste.ini"),
            include_str!("../../../etc/db1-londiste.ini"),
        )
        .unwrap();
        let (config, warnings) = ReplicationConfig::from_ini(&replication).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.queue_name, "db1-londiste-queue");
    }
}
