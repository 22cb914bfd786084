//! Settings built once from the config file: the ini read, `[pgqadm]` / `[londiste]` checked,
//! and connection strings parsed, for daemons and one-shot commands alike. Every problem is
//! a usage failure naming the file, section and key.

use std::path::Path;

use ferry_config::{
    ConfigError, IniFile, ReplicationConfig, TickerConfig, REPLICATION_SECTION, TICKER_SECTION,
};
use ferry_connect::ConnInfo;
use ferry_replica::ReplaySettings;
use ferry_ticker::TickerSettings;

use crate::Failure;

/// Reads the config file; any problem is a usage failure naming the file.
pub fn load_ini(path: &Path) -> Result<IniFile, Failure> {
    IniFile::load(path).map_err(|e: ConfigError| Failure::usage(&e))
}

/// `[pgqadm]` of `config`, its `db` parsed, and the config's warnings.
pub fn ticker(config: &Path) -> Result<(TickerConfig, TickerSettings, Vec<String>), Failure> {
    let ini = load_ini(config)?;
    let (ticker, warnings) = TickerConfig::from_ini(&ini).map_err(|e| Failure::usage(&e))?;
    let settings = TickerSettings {
        job_name: ticker.daemon.job_name.clone(),
        db: conninfo(config, TICKER_SECTION, "db", &ticker.db)?,
        loop_delay: ticker.loop_delay,
        maint_delay: ticker.maint_delay,
    };
    Ok((ticker, settings, warnings))
}

/// `[londiste]` of `config`, both connection strings parsed, and the config's warnings.
pub fn replication(
    config: &Path,
) -> Result<(ReplicationConfig, ReplaySettings, Vec<String>), Failure> {
    let ini = load_ini(config)?;
    let (replication, warnings) =
        ReplicationConfig::from_ini(&ini).map_err(|e| Failure::usage(&e))?;
    let settings = ReplaySettings {
        job_name: replication.daemon.job_name.clone(),
        provider: conninfo(
            config,
            REPLICATION_SECTION,
            "provider_db",
            &replication.provider_db,
        )?,
        subscriber: conninfo(
            config,
            REPLICATION_SECTION,
            "subscriber_db",
            &replication.subscriber_db,
        )?,
        queue: replication.queue_name.clone(),
        loop_delay: replication.loop_delay,
        parallel_copies: replication.parallel_copies as usize,
        copy_slices: replication.copy_slices as usize,
    };
    Ok((replication, settings, warnings))
}

/// The connection string `value` of `[section] key`, parsed.
fn conninfo(config: &Path, section: &str, key: &str, value: &str) -> Result<ConnInfo, Failure> {
    ConnInfo::parse(value).map_err(|e| {
        Failure::Usage(format!(
            "{}: [{section}] {key}: {}",
            config.display(),
            ferry_daemon::logging::one_line(&e)
        ))
    })
}

/// Prints the config's warnings on stderr (one-shot commands; daemons log them).
pub fn print_warnings(warnings: &[String]) {
    for warning in warnings {
        eprintln!("ferry: warning: {warning}");
    }
}
