//! The password file (`~/.pgpass`, or `passfile` / PGPASSFILE), read as libpq reads it.

use std::os::unix::fs::PermissionsExt;

use crate::ConnInfo;

/// The password the password file gives for this (resolved) connection, if any. A file that
/// group or others can read is ignored, with a warning, as libpq does.
pub(crate) fn lookup(resolved: &ConnInfo) -> Option<String> {
    let path = resolved.passfile()?;
    let metadata = std::fs::metadata(&path).ok()?;
    if !metadata.is_file() {
        return None;
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            file = %path.display(),
            "password file has group or world access; permissions should be u=rw (0600) or less; ignored"
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let host = resolved
        .get("host")
        .or(resolved.get("hostaddr"))
        .unwrap_or("localhost");
    let host = host.split(',').next().unwrap_or("localhost");
    let port = resolved
        .get("port")
        .unwrap_or("5432")
        .split(',')
        .next()
        .unwrap_or("5432");
    find(
        &text,
        host,
        port,
        resolved.get("dbname").unwrap_or(""),
        resolved.get("user").unwrap_or(""),
    )
}

fn find(text: &str, host: &str, port: &str, dbname: &str, user: &str) -> Option<String> {
    let is_default_socket =
        host.starts_with('/') && ["/var/run/postgresql", "/run/postgresql", "/tmp"].contains(&host);
    text.lines()
        .filter(|line| !line.trim_start().starts_with('#') && !line.trim().is_empty())
        .find_map(|line| {
            let fields = split_fields(line);
            if fields.len() < 5 {
                return None;
            }
            let matches = |pattern: &str, value: &str| pattern == "*" || pattern == value;
            let host_ok =
                matches(&fields[0], host) || (is_default_socket && fields[0] == "localhost");
            (host_ok
                && matches(&fields[1], port)
                && matches(&fields[2], dbname)
                && matches(&fields[3], user))
            .then(|| fields[4].clone())
        })
}

/// Splits a line at unescaped `:`; `\:` and `\\` stand for `:` and `\`.
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().unwrap().push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            other => fields.last_mut().unwrap().push(other),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_matching_line_wins_with_wildcards_and_escapes() {
        let text =
            "# comment\nother:5432:*:*:nope\n*:5432:db1:postgres:s3cr\\:et\n*:*:*:*:fallback\n";
        assert_eq!(
            find(text, "h", "5432", "db1", "postgres").as_deref(),
            Some("s3cr:et")
        );
        assert_eq!(
            find(text, "h", "5433", "db1", "postgres").as_deref(),
            Some("fallback")
        );
        assert_eq!(find("h:1:d:u:p\n", "h", "2", "d", "u"), None);
    }

    #[test]
    fn localhost_matches_the_default_socket() {
        assert_eq!(
            find(
                "localhost:5432:*:*:pw\n",
                "/var/run/postgresql",
                "5432",
                "d",
                "u"
            )
            .as_deref(),
            Some("pw")
        );
        assert_eq!(
            find("localhost:5432:*:*:pw\n", "/srv/sock", "5432", "d", "u"),
            None
        );
    }
}
