//! Logging: structured lines through `tracing`, to stderr and/or a log file that rotates by
//! size (`log_size`, `log_count`, as SkyTools does) and is reopened on SIGHUP, so external
//! logrotate works too.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::EnvFilter;

/// How verbose logs are: `-q` warnings and errors only, default info, `-v` debug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verbosity {
    /// Only warnings and errors (`-q`).
    Quiet,
    /// Informational lines (the default).
    Normal,
    /// Debug lines too (`-v`).
    Verbose,
    /// Trace lines too, the driver's included (`-vv`).
    Trace,
}

impl Verbosity {
    fn directive(self) -> &'static str {
        match self {
            Verbosity::Quiet => "warn",
            Verbosity::Normal => "info",
            // the driver's per-query lines would drown everything else
            Verbosity::Verbose => "debug,tokio_postgres=info",
            Verbosity::Trace => "trace",
        }
    }
}

/// Where log lines go, and in which form.
#[derive(Debug, Clone)]
pub struct LogTarget {
    /// Also write to stderr (in the foreground).
    pub stderr: bool,
    /// Write to this file, rotating it at `max_size` bytes and keeping `keep` old files.
    pub file: Option<LogFileSettings>,
    /// The lines' form.
    pub format: LogFormat,
}

/// The form of log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// `time level message field=value ...` (the default).
    #[default]
    Text,
    /// One json object per line: `timestamp`, `level`, `message` and the fields.
    Json,
}

/// A size-rotated log file.
#[derive(Debug, Clone)]
pub struct LogFileSettings {
    /// The log file.
    pub path: PathBuf,
    /// Rotate when the file would grow past this many bytes (0: never).
    pub max_size: u64,
    /// Keep this many rotated files (`path.1` newest ... `path.N` oldest).
    pub keep: u32,
}

/// Keeps logging alive; dropping it flushes what is buffered. Hold it until exit.
pub struct LogGuard {
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
    reopen: Option<Arc<AtomicBool>>,
}

impl LogGuard {
    /// A function that makes the log file be reopened before the next line (for SIGHUP).
    pub fn reopener(&self) -> impl Fn() + Send + Sync + 'static {
        let flag = self.reopen.clone();
        move || {
            if let Some(flag) = &flag {
                flag.store(true, Ordering::Relaxed);
            }
        }
    }
}

/// Errors setting up logging.
#[derive(Debug, thiserror::Error)]
#[error("cannot open log file {path}")]
pub struct LogError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Installs the global subscriber. `FERRY_LOG` (an `EnvFilter` directive) overrides the
/// verbosity. Colours only when stderr is a terminal; under systemd (stderr is the journal)
/// lines go to the journal alone, so each line is stored once.
pub fn init(target: &LogTarget, verbosity: Verbosity) -> Result<LogGuard, LogError> {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = std::env::var("FERRY_LOG")
        .ok()
        .and_then(|d| EnvFilter::try_new(d).ok())
        .unwrap_or_else(|| EnvFilter::new(verbosity.directive()));
    let journal = target.stderr && stderr_is_journal();
    let file = target.file.as_ref().filter(|_| !journal);
    let ansi = target.stderr && file.is_none() && io::stderr().is_terminal();
    let (writer, worker, reopen) = match file {
        Some(settings) => {
            let rotating = RotatingFile::open(settings)?;
            let reopen = rotating.reopen_flag();
            let (writer, worker) = tracing_appender::non_blocking(rotating);
            let writer = if target.stderr {
                BoxMakeWriter::new(writer.and(io::stderr))
            } else {
                BoxMakeWriter::new(writer)
            };
            (writer, Some(worker), Some(reopen))
        }
        None => (BoxMakeWriter::new(io::stderr), None, None),
    };
    let layer = match target.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(false)
            .with_ansi(false)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry().with(layer).init();
    if journal {
        if let Some(settings) = &target.file {
            tracing::info!(
                logfile = %settings.path.display(),
                "stderr is the systemd journal: logging there only, not to logfile"
            );
        }
    }
    Ok(LogGuard {
        _worker: worker,
        reopen,
    })
}

/// Whether stderr is connected to the systemd journal (`JOURNAL_STREAM` names its device and
/// inode, as systemd sets it for services).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stderr) = io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(metadata) = File::from(stderr).metadata() else {
        return false;
    };
    device.parse() == Ok(metadata.dev()) && inode.parse() == Ok(metadata.ino())
}

/// A log file that rotates itself by size: `f` → `f.1` → ... → `f.N`, oldest dropped.
pub struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    keep: u32,
    file: File,
    size: u64,
    reopen: Arc<AtomicBool>,
}

impl RotatingFile {
    /// Opens (appends to) the log file, creating its directory if needed.
    pub fn open(settings: &LogFileSettings) -> Result<RotatingFile, LogError> {
        let file = open_append(&settings.path)?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(RotatingFile {
            path: settings.path.clone(),
            max_size: settings.max_size,
            keep: settings.keep,
            file,
            size,
            reopen: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A flag that, once set, makes the next write reopen the file.
    pub fn reopen_flag(&self) -> Arc<AtomicBool> {
        self.reopen.clone()
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            self.file.set_len(0)?;
            self.size = 0;
            return Ok(());
        }
        for n in (1..self.keep).rev() {
            let from = numbered(&self.path, n);
            if from.exists() {
                std::fs::rename(&from, numbered(&self.path, n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1))?;
        self.reopen_now()
    }

    fn reopen_now(&mut self) -> io::Result<()> {
        self.file = open_append(&self.path).map_err(|e| e.source)?;
        self.size = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(())
    }
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

fn open_append(path: &Path) -> Result<File, LogError> {
    let err = |source| LogError {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.reopen.swap(false, Ordering::Relaxed) {
            self.reopen_now()?;
        }
        if self.max_size > 0 && self.size > 0 && self.size + buf.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(buf)?;
        self.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// An error and its causes on one line (for logs and stderr), messages that repeat their
/// cause's text left out.
pub fn one_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);
    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner\ndetail")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn one_line_joins_causes_and_skips_repeats() {
        let error = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(one_line(&error), "outer: middle: inner detail");
    }

    #[test]
    fn rotates_by_size_and_keeps_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("logs/job.log");
        let mut f = RotatingFile::open(&LogFileSettings {
            path: path.clone(),
            max_size: 100,
            keep: 2,
        })
        .unwrap();
        for i in 0..10 {
            writeln!(f, "line {i:02} {}", "x".repeat(40)).unwrap();
        }
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        assert!(numbered(&path, 1).exists());
        assert!(numbered(&path, 2).exists());
        assert!(!numbered(&path, 3).exists());
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(newest.contains("line 09"), "{newest}");
    }

    #[test]
    fn reopens_after_the_file_was_moved_away() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.log");
        let mut f = RotatingFile::open(&LogFileSettings {
            path: path.clone(),
            max_size: 0,
            keep: 3,
        })
        .unwrap();
        writeln!(f, "before").unwrap();
        std::fs::rename(&path, dir.path().join("moved.log")).unwrap();
        f.reopen_flag().store(true, Ordering::Relaxed);
        writeln!(f, "after").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "after\n");
    }
}
