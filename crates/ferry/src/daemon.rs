//! Running daemons and controlling running ones (`-s`, `-k`, `-r`).

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_config::{daemon_sections, DaemonSettings, REPLICATION_SECTION, TICKER_SECTION};
use ferry_daemon::logging::{self, LogFileSettings, LogFormat, LogTarget, Verbosity};
use ferry_daemon::metrics::Metrics;
use ferry_daemon::{pidfile, PidFile, PidFileError};

use crate::settings::{self, load_ini};
use crate::Failure;

/// What `-s`, `-k` and `-r` ask of a running daemon.
#[derive(Debug, Clone, Copy)]
pub enum Control {
    /// SIGINT, then wait for it to exit.
    Stop,
    /// SIGTERM, then wait for it to exit.
    Kill,
    /// SIGHUP.
    Reload,
}

/// How a daemon runs, from the command line.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// `-d`: detach.
    pub detach: bool,
    /// `-q`, `-v`, `-vv`.
    pub verbosity: Verbosity,
    /// `--log-format`, over the config's `log_format`.
    pub log_format: Option<LogFormat>,
}

/// `ferry CONFIG replay [-d]`.
pub fn run_replay(config: &Path, options: RunOptions) -> Result<(), Failure> {
    let (replication, replay, warnings) = settings::replication(config)?;
    let daemon = prepare(config, REPLICATION_SECTION, &replication.daemon, options)?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let config = config.to_path_buf();
    let reload_settings = move || {
        settings::replication(&config)
            .map(|(_, settings, _)| settings)
            .map_err(|f| match f {
                Failure::Usage(m) | Failure::Runtime(m) => m,
            })
    };
    let metrics_address = replication.daemon.metrics_address;
    daemon.run(|shutdown, reload| async move {
        let metrics = Metrics::default();
        serve_metrics(metrics_address, REPLICATION_SECTION, &metrics, &shutdown).await?;
        ferry_replica::run(replay, reload_settings, shutdown, reload, &metrics)
            .await
            .map_err(|e| {
                if e.is_configuration() {
                    Failure::usage(&e)
                } else {
                    Failure::runtime(&e)
                }
            })
    })
}

/// `ferry CONFIG ticker [-d]`.
pub fn run_ticker(config: &Path, options: RunOptions) -> Result<(), Failure> {
    let (ticker, ticker_settings, warnings) = settings::ticker(config)?;
    let daemon = prepare(config, TICKER_SECTION, &ticker.daemon, options)?;
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let config = config.to_path_buf();
    let reload_settings = move || {
        settings::ticker(&config)
            .map(|(_, settings, _)| settings)
            .map_err(|f| match f {
                Failure::Usage(m) | Failure::Runtime(m) => m,
            })
    };
    let metrics_address = ticker.daemon.metrics_address;
    daemon.run(|shutdown, reload| async move {
        let metrics = Metrics::default();
        serve_metrics(metrics_address, TICKER_SECTION, &metrics, &shutdown).await?;
        ferry_ticker::run(ticker_settings, reload_settings, shutdown, reload, &metrics)
            .await
            .map_err(|e| Failure::usage(&e))
    })
}

/// Serves `metrics` on `/metrics` at `address` (the `[section]`'s `metrics_address` or
/// `metrics_port`) until `shutdown`; nothing when it is not set. An address that cannot be
/// listened on is a configuration error.
async fn serve_metrics(
    address: Option<std::net::SocketAddr>,
    section: &str,
    metrics: &Metrics,
    shutdown: &ferry_daemon::Shutdown,
) -> Result<(), Failure> {
    let Some(address) = address else {
        return Ok(());
    };
    let listener = ferry_daemon::metrics::bind(address).await.map_err(|e| {
        Failure::Usage(format!(
            "[{section}] metrics_address: cannot listen on {address}: {e}"
        ))
    })?;
    tracing::info!(address = %address, "metrics served on /metrics");
    tokio::spawn(ferry_daemon::metrics::serve(
        listener,
        metrics.clone(),
        shutdown.clone(),
    ));
    Ok(())
}

/// A daemon ready to run: pid file held, detached if asked, logging on.
struct Prepared {
    pidfile: Option<PidFile>,
    log: logging::LogGuard,
}

/// Takes the pid file, detaches if asked, and starts logging — in that order, before any
/// thread exists, so that a second instance is refused on the terminal, not in a log.
fn prepare(
    config: &Path,
    section: &str,
    daemon: &DaemonSettings,
    options: RunOptions,
) -> Result<Prepared, Failure> {
    let detach = options.detach;
    if detach && daemon.pidfile.is_none() {
        return Err(Failure::Usage(format!(
            "{}: [{section}] pidfile: required to run detached (-d)",
            config.display()
        )));
    }
    let pidfile = match &daemon.pidfile {
        Some(path) => Some(PidFile::acquire(path).map_err(|e| match e {
            PidFileError::AlreadyRunning { .. } => Failure::Runtime(format!(
                "{}: {}",
                daemon.job_name,
                ferry_daemon::logging::one_line(&e)
            )),
            other => Failure::runtime(&other),
        })?),
        None => None,
    };
    let target = LogTarget {
        stderr: !detach,
        file: daemon.logfile.as_ref().map(|path| LogFileSettings {
            path: path.clone(),
            max_size: daemon.log_size,
            keep: daemon.log_count,
        }),
        format: options.log_format.unwrap_or(if daemon.json_logs {
            LogFormat::Json
        } else {
            LogFormat::Text
        }),
    };
    if detach {
        if target.file.is_none() {
            eprintln!("ferry: warning: [{section}] has no logfile; the detached daemon's logs are discarded");
        }
        // open the log file while errors can still reach the terminal
        if let Some(file) = &target.file {
            logging::RotatingFile::open(file).map_err(|e| Failure::runtime(&e))?;
        }
        ferry_daemon::detach().map_err(|e| Failure::Runtime(format!("cannot detach: {e}")))?;
    }
    let log = logging::init(&target, options.verbosity).map_err(|e| Failure::runtime(&e))?;
    Ok(Prepared { pidfile, log })
}

impl Prepared {
    /// Builds the runtime, wires signals to shutdown and reload (reload also reopens the log
    /// file), runs `job` to its end, then releases the pid file.
    fn run<F, Fut>(mut self, job: F) -> Result<(), Failure>
    where
        F: FnOnce(ferry_daemon::Shutdown, ferry_daemon::Reload) -> Fut,
        Fut: std::future::Future<Output = Result<(), Failure>>,
    {
        // one thread: a daemon's work is a chain of short round trips, and on a multi-thread
        // runtime each one woke another thread (the connection's task and the job ping-pong
        // between workers): perf showed half of replay's CPU in futex wake-ups and context
        // switches (README, "Round two")
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Failure::runtime(&e))?;
        let result = runtime.block_on(async {
            let (shutdown_handle, shutdown) = ferry_daemon::shutdown_channel();
            let (reload_handle, reload) = ferry_daemon::reload_channel();
            ferry_daemon::handle_signals(shutdown_handle, reload_handle, self.log.reopener())
                .map_err(|e| Failure::runtime(&e))?;
            // only now may anyone read our pid and signal us
            if let Some(pidfile) = self.pidfile.as_mut() {
                pidfile.write_pid().map_err(|e| Failure::runtime(&e))?;
            }
            job(shutdown, reload).await
        });
        if let Err(Failure::Runtime(message) | Failure::Usage(message)) = &result {
            tracing::error!(error = %message, "stopped by an error");
        }
        runtime.shutdown_timeout(Duration::from_secs(1));
        drop(self.log);
        drop(self.pidfile);
        result
    }
}

/// Whether section `wanted` of CONFIG names a pidfile (so its daemon can be signalled).
pub fn has_pidfile(config: &Path, wanted: &str) -> Result<bool, Failure> {
    let ini = load_ini(config)?;
    Ok(daemon_sections(&ini)
        .map_err(|e| Failure::usage(&e))?
        .into_iter()
        .any(|(name, d)| name == wanted && d.pidfile.is_some()))
}

/// `ferry -s|-k|-r CONFIG [COMMAND]`: signals the daemon(s) of CONFIG (of section `wanted`
/// only, when the command names one); `-s` and `-k` wait for them to exit. A daemon that is
/// not running is fine for `-s`/`-k` (it is stopped) and an error for `-r`.
pub fn control(config: &Path, wanted: Option<&str>, what: Control) -> Result<(), Failure> {
    for line in control_saying(config, wanted, what)? {
        println!("{line}");
    }
    Ok(())
}

/// [`control`], returning what it would print (a line per daemon).
pub fn control_saying(
    config: &Path,
    wanted: Option<&str>,
    what: Control,
) -> Result<Vec<String>, Failure> {
    let mut said = Vec::new();
    let ini = load_ini(config)?;
    let sections: Vec<(String, DaemonSettings)> = daemon_sections(&ini)
        .map_err(|e| Failure::usage(&e))?
        .into_iter()
        .filter(|(name, _)| wanted.is_none_or(|w| w == name))
        .collect();
    let with_pidfile: Vec<_> = sections
        .iter()
        .filter(|(_, d)| d.pidfile.is_some())
        .collect();
    if with_pidfile.is_empty() {
        return Err(Failure::Usage(format!(
            "{}: no daemon section with a pidfile ({})",
            config.display(),
            wanted
                .map(|w| format!("[{w}]"))
                .unwrap_or_else(|| format!("[{TICKER_SECTION}] or [{REPLICATION_SECTION}]"))
        )));
    }
    for (_, daemon) in with_pidfile {
        let path = daemon.pidfile.as_ref().expect("filtered");
        let signal = match what {
            Control::Stop => libc::SIGINT,
            Control::Kill => libc::SIGTERM,
            Control::Reload => libc::SIGHUP,
        };
        match pidfile::signal_running(path, signal, Duration::from_secs(10)) {
            Ok(pid) => match what {
                Control::Reload => {
                    said.push(format!("{}: reload requested (pid {pid})", daemon.job_name))
                }
                Control::Stop | Control::Kill => {
                    let limit = if matches!(what, Control::Stop) {
                        120
                    } else {
                        30
                    };
                    wait_gone(path, pid, Duration::from_secs(limit)).map_err(|_| {
                        Failure::Runtime(format!(
                            "{}: pid {pid} still running after {limit} s",
                            daemon.job_name
                        ))
                    })?;
                    said.push(format!("{}: stopped (pid {pid})", daemon.job_name));
                }
            },
            Err(PidFileError::NotRunning { .. }) => match what {
                Control::Reload => {
                    return Err(Failure::Runtime(format!(
                        "{}: not running",
                        daemon.job_name
                    )))
                }
                _ => said.push(format!("{}: not running", daemon.job_name)),
            },
            Err(e @ PidFileError::Starting { .. }) => {
                return Err(Failure::Runtime(format!(
                    "{}: {}",
                    daemon.job_name,
                    ferry_daemon::logging::one_line(&e)
                )))
            }
            Err(other) => return Err(Failure::runtime(&other)),
        }
    }
    Ok(said)
}

/// Waits until the daemon has released its pid file and its process has exited.
fn wait_gone(path: &Path, pid: i32, limit: Duration) -> Result<(), ()> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if pidfile::running_pid(path).is_err() && process_gone(pid) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(())
}

/// Whether `pid` has exited (a zombie waiting for its parent counts as exited).
fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}
