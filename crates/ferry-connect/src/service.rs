//! libpq's connection service files (`service=NAME` or `PGSERVICE`): named groups of
//! connection parameters in `pg_service.conf`. As libpq does, the user's file
//! (`PGSERVICEFILE`, else `~/.pg_service.conf`) is searched first and the system's
//! (`PGSYSCONFDIR/pg_service.conf`, else Debian's `/etc/postgresql-common/pg_service.conf`)
//! only when the user's has no such service; parameters the connection string gives win over
//! the service's, which win over the PG* environment variables.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::ConnectError;

/// Where libpq as Debian builds it looks for the system-wide file without `PGSYSCONFDIR`.
const DEFAULT_SYSCONFDIR: &str = "/etc/postgresql-common";

/// The parameters of service `name`, from the first file that defines it. A file that
/// does not exist is skipped; one that cannot be read, or a malformed line in the section
/// read, is an error naming the file and line.
pub(crate) fn lookup(
    name: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, ConnectError> {
    let mut searched = Vec::new();
    for file in service_files(env) {
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                searched.push(file.display().to_string());
                continue;
            }
            Err(e) => {
                return Err(ConnectError::invalid(format!(
                    "cannot read service file {}: {e}",
                    file.display()
                )))
            }
        };
        if let Some(params) = section(&text, name).map_err(|(line, message)| {
            ConnectError::invalid(format!(
                "service file {}, line {line}: {message}",
                file.display()
            ))
        })? {
            return Ok(params);
        }
        searched.push(file.display().to_string());
    }
    Err(ConnectError::invalid(format!(
        "definition of service \"{name}\" not found (looked in {})",
        searched.join(", ")
    )))
}

/// The files searched, in order.
fn service_files(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    match env("PGSERVICEFILE").filter(|v| !v.is_empty()) {
        Some(file) => files.push(PathBuf::from(file)),
        None => {
            if let Some(home) = env("HOME").filter(|v| !v.is_empty()) {
                files.push(PathBuf::from(home).join(".pg_service.conf"));
            }
        }
    }
    let sysconfdir = env("PGSYSCONFDIR")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_SYSCONFDIR.to_string());
    files.push(PathBuf::from(sysconfdir).join("pg_service.conf"));
    files
}

/// The `key=value` lines of section `[name]` of a service file (`None`: no such section).
/// Errors carry the line number.
fn section(text: &str, name: &str) -> Result<Option<BTreeMap<String, String>>, (usize, String)> {
    let mut found: Option<BTreeMap<String, String>> = None;
    let mut inside = false;
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[') {
            let Some(section) = header.strip_suffix(']') else {
                return Err((index + 1, "section header without closing ']'".into()));
            };
            if found.is_some() && inside {
                // libpq stops at the end of the service's section
                break;
            }
            inside = section == name;
            if inside {
                found = Some(BTreeMap::new());
            }
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err((index + 1, format!("syntax error: \"{line}\"")));
        };
        let key = key.trim();
        if key == "service" {
            return Err((
                index + 1,
                "nested service specifications are not supported".into(),
            ));
        }
        if let Some(params) = found.as_mut() {
            params
                .entry(key.to_string())
                .or_insert_with(|| value.trim().to_string());
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str =
        "# services\n[shop]\nhost=db1\nport = 6432\ndbname=shop\n\n[other]\nhost=db2\n";

    #[test]
    fn a_section_is_read_and_ends_at_the_next() {
        let shop = section(FILE, "shop").unwrap().unwrap();
        assert_eq!(shop.get("host").map(String::as_str), Some("db1"));
        assert_eq!(shop.get("port").map(String::as_str), Some("6432"));
        assert_eq!(shop.len(), 3);
        assert_eq!(section(FILE, "nope").unwrap(), None);
        assert!(section("[a]\njunk\n", "a")
            .unwrap_err()
            .1
            .contains("syntax error"));
    }

    #[test]
    fn the_users_file_comes_first_then_the_systems() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user.conf");
        std::fs::write(&user, "[shop]\nhost=from-user\n").unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/pg_service.conf"),
            "[shop]\nhost=from-system\n[sys]\nhost=only-system\n",
        )
        .unwrap();
        let env = |name: &str| match name {
            "PGSERVICEFILE" => Some(user.to_str().unwrap().to_string()),
            "PGSYSCONFDIR" => Some(dir.path().join("etc").to_str().unwrap().to_string()),
            _ => None,
        };
        assert_eq!(lookup("shop", &env).unwrap()["host"], "from-user");
        assert_eq!(lookup("sys", &env).unwrap()["host"], "only-system");
        let missing = lookup("none", &env).unwrap_err().to_string();
        assert!(
            missing.contains("definition of service \"none\" not found"),
            "{missing}"
        );
    }
}
