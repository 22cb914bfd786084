//! The ini dialect of SkyTools (Python 2 `ConfigParser`): `[section]` headers, `key = value`
//! or `key: value`, `#`/`;` comment lines, inline comments after whitespace and `;`,
//! continuation lines, case-insensitive keys, `%(key)s` interpolation from the same section or
//! `[DEFAULT]`, and `%%` for a literal percent sign. Below `[DEFAULT]` stand SkyTools' built-in
//! defaults: `job_name` (the file's name without extension), `config_dir`, `config_file`,
//! `host_name` and `service_name` (the section's name).

use std::path::{Path, PathBuf};

use crate::error::{ConfigError, ErrorKind};

/// Interpolation stops after this many nested `%(key)s` references (as Python's does).
const MAX_INTERPOLATION_DEPTH: usize = 10;

/// The name of the section whose keys every other section inherits.
pub const DEFAULT_SECTION: &str = "DEFAULT";

#[derive(Debug, Clone)]
struct Entry {
    key: String,
    value: String,
}

#[derive(Debug, Clone)]
struct Section {
    name: String,
    entries: Vec<Entry>,
}

/// A parsed ini file. Values are kept raw; [`SectionRef::get`] interpolates them.
#[derive(Debug, Clone)]
pub struct IniFile {
    path: PathBuf,
    sections: Vec<Section>,
    /// SkyTools' built-in defaults, below `[DEFAULT]` (`service_name` aside: it is per section).
    builtins: Vec<Entry>,
}

/// SkyTools' built-in defaults for the file at `path`.
fn builtins(path: &Path) -> Vec<Entry> {
    let entry = |key: &str, value: String| Entry {
        key: key.to_string(),
        value,
    };
    let mut builtins = vec![entry("host_name", host_name())];
    if let Some(stem) = path.file_stem() {
        builtins.push(entry("job_name", stem.to_string_lossy().into_owned()));
    }
    if let Some(dir) = path.parent() {
        builtins.push(entry("config_dir", dir.to_string_lossy().into_owned()));
    }
    builtins.push(entry("config_file", path.to_string_lossy().into_owned()));
    builtins
}

/// This machine's host name (as Python's `socket.gethostname()`).
fn host_name() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: gethostname writes at most `len` bytes into the buffer we own.
    let ok = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) } == 0;
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    if ok {
        String::from_utf8_lossy(&buffer[..end]).into_owned()
    } else {
        "localhost".to_string()
    }
}

impl IniFile {
    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> Result<IniFile, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::new(path, ErrorKind::Unreadable { source }))?;
        IniFile::parse(path, &text)
    }

    /// Parses `text`; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<IniFile, ConfigError> {
        let mut sections: Vec<Section> = Vec::new();
        // (section index, entry index) of the last key, for continuation lines
        let mut last_entry: Option<(usize, usize)> = None;
        for (index, raw_line) in text.lines().enumerate() {
            let line_no = index + 1;
            let malformed = |message: &str| {
                ConfigError::new(
                    path,
                    ErrorKind::Malformed {
                        line: line_no,
                        message: message.to_string(),
                    },
                )
            };
            let trimmed = raw_line.trim();
            if trimmed.is_empty() {
                last_entry = None;
                continue;
            }
            if trimmed.starts_with('#') || trimmed.starts_with(';') {
                continue;
            }
            if raw_line.starts_with([' ', '\t']) {
                if let Some((s, e)) = last_entry {
                    let value = &mut sections[s].entries[e].value;
                    value.push('\n');
                    value.push_str(strip_inline_comment(trimmed));
                    continue;
                }
            }
            if let Some(rest) = trimmed.strip_prefix('[') {
                let Some(end) = rest.find(']') else {
                    return Err(malformed("section header without closing ']'"));
                };
                let name = rest[..end].trim().to_string();
                if name.is_empty() {
                    return Err(malformed("empty section name"));
                }
                last_entry = None;
                // a repeated section continues the earlier one, as in Python
                if !sections.iter().any(|s| s.name == name) {
                    sections.push(Section {
                        name,
                        entries: Vec::new(),
                    });
                } else {
                    let pos = sections.iter().position(|s| s.name == name).unwrap();
                    let section = sections.remove(pos);
                    sections.push(section);
                }
                continue;
            }
            let Some(split_at) = trimmed.find(['=', ':']) else {
                return Err(malformed(
                    "expected 'key = value', '[section]' or a comment",
                ));
            };
            let key = trimmed[..split_at].trim().to_lowercase();
            if key.is_empty() {
                return Err(malformed("a key name is missing before '='"));
            }
            let value = strip_inline_comment(trimmed[split_at + 1..].trim()).to_string();
            let Some(section_index) = sections.len().checked_sub(1) else {
                return Err(malformed(&format!(
                    "key '{key}' stands before any [section] header"
                )));
            };
            let entries = &mut sections[section_index].entries;
            let entry_index = match entries.iter().position(|e| e.key == key) {
                Some(existing) => {
                    entries[existing].value = value;
                    existing
                }
                None => {
                    entries.push(Entry { key, value });
                    entries.len() - 1
                }
            };
            last_entry = Some((section_index, entry_index));
        }
        Ok(IniFile {
            path: path.to_path_buf(),
            sections,
            builtins: builtins(path),
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The named section, if the file has it (`[DEFAULT]` is not returned as a section).
    pub fn section(&self, name: &str) -> Option<SectionRef<'_>> {
        if name == DEFAULT_SECTION {
            return None;
        }
        self.sections
            .iter()
            .find(|s| s.name == name)
            .map(|section| SectionRef {
                file: self,
                section,
            })
    }

    /// Whether the file has the named section.
    pub fn has_section(&self, name: &str) -> bool {
        self.section(name).is_some()
    }

    /// Names of all sections but `[DEFAULT]`, in file order.
    pub fn section_names(&self) -> impl Iterator<Item = &str> {
        self.sections
            .iter()
            .map(|s| s.name.as_str())
            .filter(|n| *n != DEFAULT_SECTION)
    }

    fn defaults(&self) -> Option<&Section> {
        self.sections.iter().find(|s| s.name == DEFAULT_SECTION)
    }
}

/// `;` starts an inline comment when whitespace stands before it (Python 2 rule).
fn strip_inline_comment(value: &str) -> &str {
    let bytes = value.as_bytes();
    for i in 1..bytes.len() {
        if bytes[i] == b';' && bytes[i - 1].is_ascii_whitespace() {
            return value[..i].trim_end();
        }
    }
    value
}

/// One section of an [`IniFile`], with `[DEFAULT]` behind it.
#[derive(Debug, Clone, Copy)]
pub struct SectionRef<'a> {
    file: &'a IniFile,
    section: &'a Section,
}

impl<'a> SectionRef<'a> {
    /// The section's name.
    pub fn name(&self) -> &str {
        &self.section.name
    }

    /// Keys set in this section itself (not those inherited from `[DEFAULT]`).
    pub fn own_keys(&self) -> impl Iterator<Item = &str> {
        self.section.entries.iter().map(|e| e.key.as_str())
    }

    fn raw(&self, key: &str) -> Option<&'a str> {
        let key = key.to_lowercase();
        self.section
            .entries
            .iter()
            .chain(
                self.file
                    .defaults()
                    .into_iter()
                    .flat_map(|d| d.entries.iter()),
            )
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
            .or_else(|| (key == "service_name").then_some(self.section.name.as_str()))
            .or_else(|| {
                self.file
                    .builtins
                    .iter()
                    .find(|e| e.key == key)
                    .map(|e| e.value.as_str())
            })
    }

    /// The interpolated value of `key`, or `None` when neither this section, nor `[DEFAULT]`,
    /// nor SkyTools' built-in defaults set it.
    pub fn get(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.raw(key) {
            None => Ok(None),
            Some(raw) => self.interpolate(key, raw, 0).map(Some),
        }
    }

    /// Like [`SectionRef::get`], but a missing key is an error naming it.
    pub fn require(&self, key: &str) -> Result<String, ConfigError> {
        self.get(key)?
            .ok_or_else(|| self.error(key, ErrorKind::MissingKey))
    }

    /// An error about `key` of this section.
    pub fn error(&self, key: &str, kind: ErrorKind) -> ConfigError {
        ConfigError::new(self.file.path(), kind)
            .in_section(self.name())
            .at_key(key)
    }

    fn interpolate(&self, key: &str, raw: &str, depth: usize) -> Result<String, ConfigError> {
        if depth > MAX_INTERPOLATION_DEPTH {
            return Err(self.error(
                key,
                ErrorKind::Interpolation {
                    message: "references nest too deep (a reference loop?)".into(),
                },
            ));
        }
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(pos) = rest.find('%') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(tail) = after.strip_prefix('%') {
                out.push('%');
                rest = tail;
            } else if let Some(tail) = after.strip_prefix('(') {
                let Some(close) = tail.find(")s") else {
                    return Err(self.error(
                        key,
                        ErrorKind::Interpolation {
                            message: "'%(' without a closing ')s'".into(),
                        },
                    ));
                };
                let name = &tail[..close];
                let Some(value) = self.raw(name) else {
                    return Err(self.error(
                        key,
                        ErrorKind::Interpolation {
                            message: format!("refers to '{name}', which is not set"),
                        },
                    ));
                };
                out.push_str(&self.interpolate(key, value, depth + 1)?);
                rest = &tail[close + 2..];
            } else {
                // a lone '%' stays as it is (Python 2 ConfigParser does the same)
                out.push('%');
                rest = after;
            }
        }
        out.push_str(rest);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> IniFile {
        IniFile::parse(Path::new("t.ini"), text).unwrap()
    }

    #[test]
    fn seed_ticker_file_parses_with_interpolation() {
        let ini = parse(
            "[pgqadm]\njob_name = db1-ticker\ndb = dbname=db1\n\
             # Задержка между запусками\nmaint_delay = 600\nloop_delay = 0.1\n\
             logfile = /var/log/skytools/%(job_name)s.log\n",
        );
        let s = ini.section("pgqadm").unwrap();
        assert_eq!(
            s.get("logfile").unwrap().unwrap(),
            "/var/log/skytools/db1-ticker.log"
        );
        assert_eq!(s.get("db").unwrap().unwrap(), "dbname=db1");
        assert_eq!(s.get("missing").unwrap(), None);
    }

    #[test]
    fn inline_comment_needs_whitespace_before_semicolon() {
        let ini = parse("[a]\nx = 600   ; seconds\ny = pass;word\n");
        let s = ini.section("a").unwrap();
        assert_eq!(s.get("x").unwrap().unwrap(), "600");
        assert_eq!(s.get("y").unwrap().unwrap(), "pass;word");
    }

    #[test]
    fn defaults_are_inherited_and_keys_are_case_insensitive() {
        let ini = parse("[DEFAULT]\nBase = /srv\n[a]\nlog = %(base)s/a.log\nKey: v\n");
        let s = ini.section("a").unwrap();
        assert_eq!(s.get("LOG").unwrap().unwrap(), "/srv/a.log");
        assert_eq!(s.get("key").unwrap().unwrap(), "v");
        assert!(ini.section("DEFAULT").is_none());
    }

    #[test]
    fn percent_escapes_and_lone_percent() {
        let ini = parse("[a]\nx = 100%% done\ny = 5% off\n");
        let s = ini.section("a").unwrap();
        assert_eq!(s.get("x").unwrap().unwrap(), "100% done");
        assert_eq!(s.get("y").unwrap().unwrap(), "5% off");
    }

    #[test]
    fn continuation_lines_join_with_newline() {
        let ini = parse("[a]\nx = one\n  two\n");
        assert_eq!(
            ini.section("a").unwrap().get("x").unwrap().unwrap(),
            "one\ntwo"
        );
    }

    #[test]
    fn reference_loop_is_an_error_naming_the_key() {
        let ini = parse("[a]\nx = %(y)s\ny = %(x)s\n");
        let err = ini.section("a").unwrap().get("x").unwrap_err().to_string();
        assert!(err.contains("[a] x"), "{err}");
    }

    #[test]
    fn missing_reference_is_an_error() {
        let ini = parse("[a]\nx = %(nope)s\n");
        let err = ini.section("a").unwrap().get("x").unwrap_err().to_string();
        assert!(err.contains("'nope'"), "{err}");
    }

    #[test]
    fn malformed_lines_are_errors_with_line_numbers() {
        let err = IniFile::parse(Path::new("t.ini"), "[a]\njust words\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.ini: line 2: expected 'key = value', '[section]' or a comment"
        );
        let err = IniFile::parse(Path::new("t.ini"), "x = 1\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = IniFile::parse(Path::new("t.ini"), "[a\n").unwrap_err();
        assert!(err.to_string().contains("closing ']'"), "{err}");
    }
}
