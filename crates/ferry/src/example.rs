//! The annotated example config `ferry --ini` prints (`etc/ferry.ini`), as SkyTools scripts
//! print theirs.

/// `etc/ferry.ini`, compiled in.
pub const EXAMPLE_INI: &str = include_str!("../../../etc/ferry.ini");

#[cfg(test)]
mod tests {
    use ferry_config::{IniFile, ReplicationConfig, TickerConfig};

    use super::*;

    #[test]
    fn the_example_is_a_valid_config_for_both_sections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.ini");
        std::fs::write(&path, EXAMPLE_INI).unwrap();
        let ini = IniFile::load(&path).unwrap();
        let (ticker, warnings) = TickerConfig::from_ini(&ini).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(ticker.daemon.job_name, "db1-ticker");
        let (replication, warnings) = ReplicationConfig::from_ini(&ini).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(replication.queue_name, "db1-londiste-queue");
    }
}
