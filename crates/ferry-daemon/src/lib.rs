//! Everything a ferry daemon needs around its work: a pid file that refuses a second instance,
//! detaching (`-d`), the shutdown and reload primitives handed to every task, the signals that
//! drive them (SIGINT: finish the current unit and stop; SIGTERM: stop now; SIGHUP: reload),
//! and logging.

pub mod failpoint;
mod health;
pub mod logging;
pub mod metrics;
pub mod pidfile;
mod remedy;

use std::path::Path;

use tokio::sync::watch;

pub use health::Health;
pub use pidfile::{PidFile, PidFileError};
pub use remedy::Remedy;

/// How a daemon was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum StopMode {
    /// Finish the unit of work in hand, then exit (SIGINT, `ferry -s`).
    Graceful,
    /// Abandon the unit in hand (it rolls back) and exit at once (SIGTERM, `ferry -k`).
    Immediate,
}

/// The receiving side of the shutdown request, passed to every task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Option<StopMode>>,
}

/// The sending side: asks every [`Shutdown`] holder to stop.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: watch::Sender<Option<StopMode>>,
}

/// A connected shutdown handle and receiver.
pub fn shutdown_channel() -> (ShutdownHandle, Shutdown) {
    let (tx, rx) = watch::channel(None);
    (ShutdownHandle { tx }, Shutdown { rx })
}

impl ShutdownHandle {
    /// Asks for a stop; a later, stronger request (Immediate after Graceful) wins.
    pub fn request(&self, mode: StopMode) {
        self.tx.send_if_modified(|current| {
            if current.is_none_or(|c| mode > c) {
                *current = Some(mode);
                true
            } else {
                false
            }
        });
    }
}

impl Shutdown {
    /// The stop asked for so far, if any.
    pub fn requested(&self) -> Option<StopMode> {
        *self.rx.borrow()
    }

    /// Resolves when a stop is asked for (at once if it already was), with its mode. If every
    /// handle is gone without asking, it never resolves.
    pub async fn wait(&mut self) -> StopMode {
        loop {
            if let Some(mode) = *self.rx.borrow_and_update() {
                return mode;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when an immediate stop is asked for.
    pub async fn wait_immediate(&mut self) {
        while self.wait().await != StopMode::Immediate {
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Reload requests (SIGHUP): each one bumps a counter; holders wait for a change.
#[derive(Debug, Clone)]
pub struct Reload {
    rx: watch::Receiver<u64>,
}

/// The sending side of [`Reload`].
#[derive(Debug, Clone)]
pub struct ReloadHandle {
    tx: watch::Sender<u64>,
}

/// A connected reload handle and receiver.
pub fn reload_channel() -> (ReloadHandle, Reload) {
    let (tx, rx) = watch::channel(0);
    (ReloadHandle { tx }, Reload { rx })
}

impl ReloadHandle {
    /// Asks holders of [`Reload`] to re-read their configuration.
    pub fn request(&self) {
        self.tx.send_modify(|n| *n += 1);
    }
}

impl Reload {
    /// Resolves at the next reload request; never, once every handle is gone.
    pub async fn requested(&mut self) {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Turns SIGINT, SIGTERM and SIGHUP into shutdown and reload requests. On SIGHUP `on_hangup`
/// (reopening the log file) runs before reloaders are woken, so what they log lands in the
/// new file. Must run inside a tokio runtime; the task lives as long as the runtime.
pub fn handle_signals(
    shutdown: ShutdownHandle,
    reload: ReloadHandle,
    on_hangup: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Some(()) = interrupt.recv() => {
                    tracing::info!("sigint received: finishing the current work, then stopping");
                    shutdown.request(StopMode::Graceful);
                }
                Some(()) = terminate.recv() => {
                    tracing::info!("sigterm received: stopping now");
                    shutdown.request(StopMode::Immediate);
                }
                Some(()) = hangup.recv() => {
                    on_hangup();
                    tracing::info!("sighup received: reloading configuration and reopening the log file");
                    reload.request();
                }
                else => break,
            }
        }
    });
    Ok(())
}

/// Detaches from the terminal: forks, starts a new session, points stdin/stdout/stderr at
/// /dev/null and changes to `/`. The parent exits 0. Call before any thread or runtime starts;
/// open descriptors (a held pid file) stay open in the daemon.
pub fn detach() -> Result<(), daemonize::Error> {
    daemonize::Daemonize::new()
        .working_directory(Path::new("/"))
        .umask(0o022)
        .start()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stronger_stop_wins_and_waiters_see_it() {
        let (handle, mut shutdown) = shutdown_channel();
        assert_eq!(shutdown.requested(), None);
        handle.request(StopMode::Graceful);
        assert_eq!(shutdown.wait().await, StopMode::Graceful);
        handle.request(StopMode::Immediate);
        handle.request(StopMode::Graceful);
        assert_eq!(shutdown.requested(), Some(StopMode::Immediate));
        shutdown.wait_immediate().await;
    }

    #[tokio::test]
    async fn reload_wakes_waiters() {
        let (handle, mut reload) = reload_channel();
        let waiter = tokio::spawn(async move { reload.requested().await });
        handle.request();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
