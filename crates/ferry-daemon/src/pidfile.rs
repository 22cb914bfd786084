//! Pid files that cannot lie: the running daemon holds an exclusive `flock` on its pid file
//! for as long as it lives, so "is it running?" is "is the file locked?", and a file left by a
//! killed daemon (or naming a pid reused by another process) is recognized as stale.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Problems with pid files.
#[derive(Debug, thiserror::Error)]
pub enum PidFileError {
    /// Another process runs this job.
    #[error("already running as pid {pid} (pid file {path})")]
    AlreadyRunning {
        /// The pid in the file.
        pid: i32,
        /// The pid file.
        path: PathBuf,
    },
    /// No process runs this job.
    #[error("not running (no live process holds pid file {path})")]
    NotRunning {
        /// The pid file.
        path: PathBuf,
    },
    /// A process holds the pid file but has not written its pid yet (it is starting).
    #[error("starting (pid file {path} is held but has no pid yet)")]
    Starting {
        /// The pid file.
        path: PathBuf,
    },
    /// The pid file could not be used.
    #[error("pid file {path}")]
    Io {
        /// The pid file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The signal could not be sent.
    #[error("cannot signal pid {pid}")]
    Signal {
        /// The process.
        pid: i32,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// A pid file this process holds. Dropping it removes the file.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    file: File,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> PidFileError + '_ {
    move |source| PidFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn try_lock(file: &File, mode: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

fn read_pid(file: &mut File) -> Option<i32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

impl PidFile {
    /// Takes the pid file at `path` for this job, creating its directory if needed. Fails with
    /// [`PidFileError::AlreadyRunning`] while another live process holds it; a stale file is
    /// taken over and emptied. Call [`PidFile::write_pid`] once the final process (after
    /// detaching) handles signals, so that whoever reads the pid can signal it safely.
    pub fn acquire(path: &Path) -> Result<PidFile, PidFileError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_error(path))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_error(path))?;
        if !try_lock(&file, libc::LOCK_EX).map_err(io_error(path))? {
            return Err(PidFileError::AlreadyRunning {
                pid: read_pid(&mut file).unwrap_or(0),
                path: path.to_path_buf(),
            });
        }
        // a stale pid must never be read as ours: empty the file until write_pid
        file.set_len(0).map_err(io_error(path))?;
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes this process's pid into the file.
    pub fn write_pid(&mut self) -> Result<(), PidFileError> {
        let path = self.path.clone();
        self.file.set_len(0).map_err(io_error(&path))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_error(&path))?;
        writeln!(self.file, "{}", std::process::id()).map_err(io_error(&path))?;
        self.file.sync_all().map_err(io_error(&path))
    }

    /// The pid file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // remove only if it still names us (a takeover may have replaced it)
        if read_pid(&mut self.file) == Some(std::process::id() as i32) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The pid of the live process holding the pid file at `path`.
pub fn running_pid(path: &Path) -> Result<i32, PidFileError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(PidFileError::NotRunning {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io_error(path)(e)),
    };
    if try_lock(&file, libc::LOCK_SH).map_err(io_error(path))? {
        // nobody holds it: stale
        return Err(PidFileError::NotRunning {
            path: path.to_path_buf(),
        });
    }
    read_pid(&mut file).ok_or_else(|| PidFileError::Starting {
        path: path.to_path_buf(),
    })
}

/// Sends `signal` to the process holding the pid file at `path`; returns its pid. A daemon
/// still starting (pid not written yet) is waited for up to `start_wait`.
pub fn signal_running(
    path: &Path,
    signal: libc::c_int,
    start_wait: std::time::Duration,
) -> Result<i32, PidFileError> {
    let started = std::time::Instant::now();
    let pid = loop {
        match running_pid(path) {
            Err(PidFileError::Starting { .. }) if started.elapsed() < start_wait => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => break other?,
        }
    };
    // SAFETY: kill with a pid read from a locked pid file.
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(PidFileError::Signal {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_stale_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/job.pid");
        let mut first = PidFile::acquire(&path).unwrap();
        first.write_pid().unwrap();
        assert_eq!(running_pid(&path).unwrap(), std::process::id() as i32);
        // flock is per open file description, so a second open in this process conflicts too
        match PidFile::acquire(&path) {
            Err(PidFileError::AlreadyRunning { pid, .. }) => {
                assert_eq!(pid, std::process::id() as i32)
            }
            other => panic!("expected AlreadyRunning, got {other:?}"),
        }
        drop(first);
        assert!(!path.exists(), "pid file removed on drop");
        // held but not yet written: starting, never the stale pid
        std::fs::write(&path, "999999\n").unwrap();
        let held = PidFile::acquire(&path).unwrap();
        assert!(matches!(
            running_pid(&path),
            Err(PidFileError::Starting { .. })
        ));
        drop(held);
        std::fs::write(&path, "999999\n").unwrap();
        assert!(matches!(
            running_pid(&path),
            Err(PidFileError::NotRunning { .. })
        ));
        let mut again = PidFile::acquire(&path).unwrap();
        again.write_pid().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            std::process::id().to_string()
        );
    }
}
