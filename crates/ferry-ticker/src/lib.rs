//! The ticker daemon: every `loop_delay` it ticks the queues that have news (so events reach
//! consumers at most `loop_delay` late, and idle queues still tick now and then); every
//! `maint_delay` it rotates event tables (and ticks the rotated queue, so consumers pass the
//! switch soon), puts due retried events back and deletes ticks no consumer needs. Each tick NOTIFYs the queue's consumers. When the database goes away it
//! reconnects with backoff, logging one line when the outage starts and one when it ends.

use std::time::Duration;

use ferry_connect::{ConnInfo, ConnectError, Session};
use ferry_daemon::failpoint::{self, failpoint};
use ferry_daemon::logging::one_line as report;
use ferry_daemon::metrics::Metrics;
use ferry_daemon::{Health, Reload, Remedy, Shutdown};
use ferry_queue::QueueError;
use tokio::time::{interval, sleep, Instant, MissedTickBehavior};

/// After a failure that is not a lost connection, wait this long before trying again.
const PROBLEM_RETRY: Duration = Duration::from_secs(5);
/// First and longest wait between reconnection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(10);

/// What the ticker needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct TickerSettings {
    /// The job name, for the session's application_name and logs.
    pub job_name: String,
    /// The database holding the queues.
    pub db: ConnInfo,
    /// How often queues are checked for news.
    pub loop_delay: Duration,
    /// How often maintenance runs.
    pub maint_delay: Duration,
}

/// Errors that stop the ticker: ones that waiting cannot fix.
#[derive(Debug, thiserror::Error)]
pub enum TickerError {
    /// The connection settings are unusable.
    #[error("cannot use the ticker's database settings")]
    Connection(#[source] ConnectError),
}

enum Step {
    Stop,
    ConnectionLost,
    Reload,
    Maintenance,
    Tick,
}

/// Runs the ticker until `shutdown` is requested. On each `reload` request `load_settings` is
/// called; if it fails, the old settings stay (the error is logged); a changed `db` reconnects.
pub async fn run(
    mut settings: TickerSettings,
    mut load_settings: impl FnMut() -> Result<TickerSettings, String>,
    mut shutdown: Shutdown,
    mut reload: Reload,
    metrics: &Metrics,
) -> Result<(), TickerError> {
    let ticks = metrics.counter(
        "ferry_ticker_ticks_total",
        "Ticks made (one per queue ticked).",
    );
    let last_tick = metrics.gauge(
        "ferry_ticker_last_tick_timestamp_seconds",
        "When the ticker last ticked a queue (Unix time).",
    );
    let errors = metrics.counter(
        "ferry_ticker_errors_total",
        "Ticks or maintenance runs that failed.",
    );
    let reconnects = metrics.counter("ferry_ticker_reconnects_total", "Connections made again.");
    let mut connected_before = false;
    let mut health = Health::default();
    tracing::info!(job = %settings.job_name, db = %settings.db.resolve().describe(), "ticker starting");
    'connect: loop {
        let Some(mut session) = connect(&settings, &mut shutdown, &mut health).await? else {
            break 'connect;
        };
        if connected_before {
            reconnects.inc();
        }
        connected_before = true;
        let mut tick_timer = interval(settings.loop_delay.max(Duration::from_millis(1)));
        tick_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut maint_timer = interval(settings.maint_delay.max(Duration::from_millis(1)));
        maint_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            // 1 shutdown, 2 connection loss, 3 reload, 4 maintenance timer, 5 tick timer
            let step = tokio::select! {
                biased;
                _ = shutdown.wait() => Step::Stop,
                _ = session.closed() => Step::ConnectionLost,
                _ = reload.requested() => Step::Reload,
                _ = maint_timer.tick() => Step::Maintenance,
                _ = tick_timer.tick() => Step::Tick,
            };
            let outcome = match step {
                Step::Stop => break 'connect,
                Step::ConnectionLost => {
                    health.problem("database connection lost; reconnecting");
                    continue 'connect;
                }
                Step::Reload => match load_settings() {
                    Ok(new) => {
                        let reconnect = new.db != settings.db;
                        settings = new;
                        tracing::info!(
                            loop_delay = ?settings.loop_delay,
                            maint_delay = ?settings.maint_delay,
                            "configuration reloaded"
                        );
                        if reconnect {
                            continue 'connect;
                        }
                        tick_timer = interval(settings.loop_delay.max(Duration::from_millis(1)));
                        tick_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        maint_timer = interval(settings.maint_delay.max(Duration::from_millis(1)));
                        maint_timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        Ok(())
                    }
                    Err(message) => {
                        tracing::error!(error = %message, "configuration not reloaded; keeping the old one");
                        Ok(())
                    }
                },
                Step::Maintenance => maintenance(&mut session).await,
                Step::Tick => ferry_queue::tick_queues(session.client())
                    .await
                    .map(|ticked| {
                        if ticked > 0 {
                            ticks.add(ticked as f64);
                            if let Ok(now) =
                                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)
                            {
                                last_tick.set(now.as_secs_f64());
                            }
                            tracing::trace!(queues = ticked, "ticked");
                        }
                    }),
            };
            if outcome.is_err() {
                errors.inc();
            }
            match outcome {
                Ok(()) => health.ok(),
                Err(error) if error.remedy() == Remedy::Reconnect || session.is_closed() => {
                    health.problem(&format!("database connection lost: {}", report(&error)));
                    continue 'connect;
                }
                Err(error) => {
                    health.problem(&report(&error));
                    tick_timer.reset_at(Instant::now() + PROBLEM_RETRY);
                }
            }
        }
    }
    tracing::info!(job = %settings.job_name, "ticker stopped");
    Ok(())
}

/// Connects, retrying with backoff until it works or a stop is requested (`None`).
async fn connect(
    settings: &TickerSettings,
    shutdown: &mut Shutdown,
    health: &mut Health,
) -> Result<Option<Session>, TickerError> {
    let application_name = format!("ferry ticker {}", settings.job_name);
    let mut delay = RECONNECT_MIN;
    loop {
        let attempt = tokio::select! {
            biased;
            _ = shutdown.wait() => return Ok(None),
            attempt = ferry_connect::connect(&settings.db, &application_name) => attempt,
        };
        match attempt {
            Ok(session) => {
                health.ok();
                return Ok(Some(session));
            }
            Err(error) if error.is_configuration() => return Err(TickerError::Connection(error)),
            Err(error) => health.problem(&format!("database unavailable: {}", report(&error))),
        }
        tokio::select! {
            biased;
            _ = shutdown.wait() => return Ok(None),
            _ = sleep(delay) => {}
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// One maintenance run over every queue: rotate, clean ticks, then requeue due retries.
async fn maintenance(session: &mut Session) -> Result<(), QueueError> {
    for queue in ferry_queue::queue_info(session.client()).await? {
        // consumers pass the switch at their next tick; one comes with the rotation, so an
        // idle queue need not wait a whole idle period for the next rotation
        let rotated = ferry_queue::rotate_and_tick(session.client_mut(), &queue.name, || {
            failpoint(failpoint::TICKER_DURING_ROTATION)
        })
        .await?;
        if let Some(tick) = rotated {
            tracing::info!(queue = %queue.name, tick, "event tables rotated");
        }
        let client = session.client();
        let cleaned = ferry_queue::maint_tick_cleanup(client, &queue.name).await?;
        tracing::debug!(queue = %queue.name, ticks = cleaned, "old ticks deleted");
    }
    let requeued = ferry_queue::maint_retry_events(session.client()).await?;
    if requeued > 0 {
        tracing::info!(
            events = requeued,
            "retried events put back into their queues"
        );
    }
    Ok(())
}
