//! The replay daemon: applies each batch of the queue to the subscriber while tables waiting
//! for their copy are copied beside it ([`crate::copies`]), and waits for the ticker's wake-up
//! (or `loop_delay`) when there is nothing to do. Failures are retried with backoff, nothing
//! is skipped; a lost connection is re-established.

use std::time::{Duration, Instant};

use ferry_connect::{ConnInfo, Session};
use ferry_daemon::failpoint::{self, failpoint};
use ferry_daemon::logging::one_line as report;
use ferry_daemon::metrics::{Counter, Gauge, Metrics};
use ferry_daemon::{Health, Reload, Remedy, Shutdown, StopMode};
use tokio::time::sleep;
use tokio_postgres::Notification;

use crate::apply::{self, Applier, BatchOutcome};
use crate::catalog::table_shape;
use crate::copies::{log_ended, Copies, CopyTarget};
use crate::error::{ReplicaError, ResultExt};
use crate::names::RelName;
use crate::progress::CopyGauges;
use crate::session::{open_sides, provider_for};
use crate::store::{self, BatchStep, TableState};
use crate::subscriber;

/// First and longest wait after a failure that is not a lost connection (a row the
/// subscriber refuses, a missing column) before trying the same work again.
const PROBLEM_RETRY_MIN: Duration = Duration::from_secs(1);
const PROBLEM_RETRY_MAX: Duration = Duration::from_secs(30);
/// First and longest wait between reconnection attempts.
const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// Most events one batch may span when replay is behind (several ticks merged).
const MAX_BATCH_EVENTS: i64 = 100_000;
/// How often an idle replay looks at the age of the queue's newest tick.
const TICKER_CHECK_EVERY: Duration = Duration::from_secs(5);

/// What replay needs to run.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplaySettings {
    /// The job name: the consumer's name on the queue, and in logs.
    pub job_name: String,
    /// The provider (where the queue is).
    pub provider: ConnInfo,
    /// The subscriber.
    pub subscriber: ConnInfo,
    /// The queue.
    pub queue: String,
    /// Longest wait for a new batch without a wake-up.
    pub loop_delay: Duration,
    /// How many tables are copied at once, beside the batch stream (at least 1).
    pub parallel_copies: usize,
    /// How many slices, each on a session pair of its own, a big table's copy is split into
    /// at most (1: one stream).
    pub copy_slices: usize,
}

/// Errors that stop replay: ones waiting cannot fix (see [`ReplicaError::remedy`]).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The connection settings are unusable.
    #[error("cannot use the replay's database settings")]
    Connection(#[source] ReplicaError),
    /// Something waiting cannot fix (corrupt data, a broken invariant).
    #[error("replay cannot go on")]
    Unrecoverable(#[source] ReplicaError),
}

impl ReplayError {
    /// Whether the configuration is at fault (exit code 2) rather than the data (1).
    pub fn is_configuration(&self) -> bool {
        matches!(self, ReplayError::Connection(_))
    }

    /// The error for `error`, whose remedy is to stop.
    fn stopping(error: ReplicaError) -> ReplayError {
        if error.is_configuration() {
            ReplayError::Connection(error)
        } else {
            ReplayError::Unrecoverable(error)
        }
    }
}

/// Both connections.
struct Link {
    provider: Session,
    subscriber: Session,
    /// Where the provider session went when a switchover or failover moved the provider.
    moved_to: Option<String>,
    /// The newest tick of the queue whose wake-up arrived on this provider session.
    newest_tick: Option<i64>,
}

impl Link {
    /// Takes the ticker's wake-ups that have arrived, keeping the newest tick announced for
    /// `queue` (with `first`, one already taken).
    fn take_wake_ups(&mut self, queue: &str, first: Option<Notification>) {
        let mut taken = first;
        while let Some(notification) = taken.take().or_else(|| self.provider.try_notification()) {
            if let Some(notice) = ferry_queue::TickNotice::parse(notification.payload()) {
                if notice.queue == queue && self.newest_tick < Some(notice.tick_id) {
                    self.newest_tick = Some(notice.tick_id);
                }
            }
        }
    }

    /// Whether the ticker's wake-ups say no tick came after `tick`: the wake-up of `tick` has
    /// arrived and none of a later one (one still on its way wakes replay when it arrives).
    fn caught_up_at(&self, tick: i64) -> bool {
        self.newest_tick == Some(tick)
    }
}

/// How a round of work ended.
enum Round {
    /// Nothing left to do: wait for a wake-up.
    Idle,
    /// Paused (`ferry CONFIG pause`): nothing done; wait as when idle.
    Paused,
    /// A switchover or failover moved the provider: connect there.
    ProviderMoved,
    /// Stopped because a stop was requested.
    Stopped,
}

/// Runs replay until `shutdown`. On `reload`, `load_settings` is called; if it fails the old
/// settings stay; changed connection settings reconnect.
pub async fn run(
    mut settings: ReplaySettings,
    mut load_settings: impl FnMut() -> Result<ReplaySettings, String>,
    mut shutdown: Shutdown,
    mut reload: Reload,
    metrics: &Metrics,
) -> Result<(), ReplayError> {
    let counts = ReplayMetrics::new(metrics);
    let mut health = Health::default();
    let mut ticker_silent = false;
    // whether the last round found replay paused (said once per pause)
    let mut paused = false;
    // what the subscriber records as the error holding replay up, for `status`: Some(error
    // or none) as last written; None while unknown (at start, or after a failed write), so the
    // next round writes it, clearing whatever an earlier run left
    let mut recorded_error: Option<Option<String>> = None;
    tracing::info!(
        job = %settings.job_name,
        queue = %settings.queue,
        provider = %settings.provider.resolve().describe(),
        subscriber = %settings.subscriber.resolve().describe(),
        "replay starting"
    );
    // the wait after a failure that is not a lost connection, doubled while it lasts
    let mut problem_retry = PROBLEM_RETRY_MIN;
    let mut connected_before = false;
    // copies run on sessions of their own: they outlive a reconnect of replay's sessions
    let mut copies = Copies::default();
    'connect: loop {
        let Some(mut link) = connect(&settings, &mut shutdown, &mut health).await? else {
            break 'connect;
        };
        if connected_before {
            counts.reconnects.inc();
        }
        connected_before = true;
        let mut applier = Applier::default();
        let mut ticker_checked = Instant::now();
        // the table differences last logged, so a stuck batch logs them once
        let mut explained: Vec<String> = Vec::new();
        // the round looks at the stop request between units; the select below acts on an
        // immediate one at once
        let stop_watch = shutdown.clone();
        if let Err(error) = prepare(&mut link, &settings).await {
            if remedy(&mut health, &error, &link) == Remedy::Reconnect {
                continue 'connect;
            }
            if error.remedy() == Remedy::Stop {
                return Err(ReplayError::stopping(error));
            }
            record_error(&link, &settings.queue, Some(&error), &mut recorded_error).await;
            if wait_or_stop(&mut shutdown, problem_retry).await {
                break 'connect;
            }
            problem_retry = (problem_retry * 2).min(PROBLEM_RETRY_MAX);
            continue 'connect;
        }
        loop {
            // the round itself: an immediate stop abandons it (its transactions roll back)
            let round = tokio::select! {
                biased;
                _ = shutdown.wait_immediate() => break 'connect,
                round = work(&mut link, &mut applier, &mut copies, &settings, &stop_watch, &counts) => round,
            };
            match round {
                Ok(Round::Stopped) => break 'connect,
                Ok(Round::ProviderMoved) => {
                    tracing::info!(queue = %settings.queue, "the provider moved (a switchover or failover): connecting to it");
                    copies.abandon();
                    continue 'connect;
                }
                Ok(Round::Paused) => {
                    counts.paused.set(1.0);
                    health.ok();
                    record_error(&link, &settings.queue, None, &mut recorded_error).await;
                    if !paused {
                        paused = true;
                        tracing::info!(queue = %settings.queue, "replay paused: nothing is applied until `ferry CONFIG resume`");
                    }
                }
                Ok(Round::Idle) => {
                    counts.paused.set(0.0);
                    if paused {
                        paused = false;
                        tracing::info!(queue = %settings.queue, "replay resumed");
                    }
                    health.ok();
                    record_error(&link, &settings.queue, None, &mut recorded_error).await;
                    problem_retry = PROBLEM_RETRY_MIN;
                    explained.clear();
                    if ticker_checked.elapsed() >= TICKER_CHECK_EVERY {
                        ticker_checked = Instant::now();
                        watch_ticker(&link, &settings.queue, &mut ticker_silent).await;
                        observe_lag(&link, &settings, &counts).await;
                        if let Err(e) = record_peers(&mut link, &settings).await {
                            tracing::debug!(error = %report(&e), "could not record the other subscribers");
                        }
                    }
                }
                Err(error) => {
                    applier.forget_tables();
                    counts.errors.inc();
                    match remedy(&mut health, &error, &link) {
                        Remedy::Reconnect => continue 'connect,
                        Remedy::Stop => return Err(ReplayError::stopping(error)),
                        Remedy::RetryLater => {}
                    }
                    record_error(&link, &settings.queue, Some(&error), &mut recorded_error).await;
                    if let Some(table) = error.table() {
                        let problems = table_problems(&link, table).await;
                        if problems != explained {
                            for problem in &problems {
                                tracing::warn!(table = %table, problem = %problem, "the subscriber's table differs from the provider's");
                            }
                            explained = problems;
                        }
                    }
                    if wait_or_stop(&mut shutdown, problem_retry).await {
                        break 'connect;
                    }
                    problem_retry = (problem_retry * 2).min(PROBLEM_RETRY_MAX);
                    continue;
                }
            }
            // 1 shutdown, 2 connection loss, 3 reload, 4 wake-up from the ticker, 5 timer
            tokio::select! {
                biased;
                _ = shutdown.wait() => break 'connect,
                _ = link.provider.closed() => {
                    health.problem("provider connection lost; reconnecting");
                    continue 'connect;
                }
                _ = link.subscriber.closed() => {
                    health.problem("subscriber connection lost; reconnecting");
                    continue 'connect;
                }
                _ = reload.requested() => match load_settings() {
                    Ok(new) => {
                        let reconnect = new.provider != settings.provider
                            || new.subscriber != settings.subscriber
                            || new.queue != settings.queue
                            || new.job_name != settings.job_name;
                        settings = new;
                        tracing::info!(loop_delay = ?settings.loop_delay, parallel_copies = settings.parallel_copies, copy_slices = settings.copy_slices, "configuration reloaded");
                        if reconnect {
                            copies.abandon();
                            continue 'connect;
                        }
                    }
                    Err(message) => {
                        tracing::error!(error = %message, "configuration not reloaded; keeping the old one");
                    }
                },
                woken = link.provider.notification() => link.take_wake_ups(&settings.queue, woken),
                _ = sleep(settings.loop_delay) => {}
            }
        }
    }
    // a graceful stop lets the copies in hand finish; an immediate one abandons them
    match shutdown.requested() {
        Some(StopMode::Graceful) => copies.finish(&mut shutdown).await,
        _ => copies.abandon(),
    }
    tracing::info!(job = %settings.job_name, "replay stopped");
    Ok(())
}

/// Records on the subscriber the error holding replay up (`None`: work goes on), unless
/// `recorded` says it is recorded already. Best effort: a failure to record is logged at debug
/// level and tried again with the next round.
async fn record_error(
    link: &Link,
    queue: &str,
    error: Option<&ReplicaError>,
    recorded: &mut Option<Option<String>>,
) {
    let text = error.map(|e| report(e));
    if recorded.as_ref() == Some(&text) {
        return;
    }
    match store::record_error(link.subscriber.client(), queue, text.as_deref()).await {
        Ok(()) => *recorded = Some(text),
        Err(e) => {
            tracing::debug!(error = %report(&e), "could not record replay's last error");
            *recorded = None;
        }
    }
}

/// Replay's metrics, served on `/metrics` when the config names `metrics_address`.
struct ReplayMetrics {
    batches: Counter,
    events_applied: Counter,
    events_skipped: Counter,
    tables_copied: Counter,
    errors: Counter,
    reconnects: Counter,
    lag: Gauge,
    pending: Gauge,
    tables_not_ok: Gauge,
    paused: Gauge,
    copy: CopyGauges,
}

impl ReplayMetrics {
    fn new(metrics: &Metrics) -> ReplayMetrics {
        ReplayMetrics {
            batches: metrics.counter(
                "ferry_replay_batches_total",
                "Batches applied to the subscriber.",
            ),
            events_applied: metrics.counter(
                "ferry_replay_events_applied_total",
                "Events applied to the subscriber.",
            ),
            events_skipped: metrics.counter(
                "ferry_replay_events_skipped_total",
                "Events skipped: of tables not replicated here, or in a copy.",
            ),
            tables_copied: metrics.counter(
                "ferry_replay_tables_copied_total",
                "Initial copies finished.",
            ),
            errors: metrics.counter(
                "ferry_replay_errors_total",
                "Rounds of work that failed (each retried).",
            ),
            reconnects: metrics.counter(
                "ferry_replay_reconnects_total",
                "Connections to the provider and subscriber made again.",
            ),
            lag: metrics.gauge(
                "ferry_replay_lag_seconds",
                "Age of the tick the subscriber has applied up to.",
            ),
            pending: metrics.gauge(
                "ferry_replay_pending_events",
                "Events ticked past the subscriber's position.",
            ),
            tables_not_ok: metrics.gauge(
                "ferry_replay_tables_not_ok",
                "Tables waiting for or in their copy, or catching up.",
            ),
            paused: metrics.gauge("ferry_replay_paused", "1 while replay is paused."),
            copy: CopyGauges {
                rows_done: metrics.gauge(
                    "ferry_replay_copy_rows",
                    "Rows the running initial copy has copied (0 between copies).",
                ),
                bytes_done: metrics.gauge(
                    "ferry_replay_copy_bytes",
                    "Bytes (COPY text) the running initial copy has copied.",
                ),
                rows_expected: metrics.gauge(
                    "ferry_replay_copy_rows_expected",
                    "Rows the provider's statistics expect the running copy to copy (0: unknown).",
                ),
            },
        }
    }
}

/// Reads this consumer's lag and pending events from the queue, for the metrics (an idle
/// replay applies no batch to measure it by). A failed look is left to the next.
async fn observe_lag(link: &Link, settings: &ReplaySettings, counts: &ReplayMetrics) {
    if let Ok(consumers) =
        ferry_queue::consumer_info(link.provider.client(), Some(&settings.queue)).await
    {
        if let Some(c) = consumers.iter().find(|c| c.consumer == settings.job_name) {
            counts.lag.set(c.lag_secs);
            counts.pending.set(c.pending_events as f64);
        }
    }
}

/// Says once when the queue's newest tick is older than twice its idle period plus 10 s (a
/// running ticker ticks at least once per idle period), and once when ticks come again.
/// `silent` remembers which was said last. A failed look is left to the next round.
async fn watch_ticker(link: &Link, queue: &str, silent: &mut bool) {
    let row = link
        .provider
        .client()
        .query_opt(
            r#"select extract(epoch from now() - max(t."tick_time"))::float8,
                      extract(epoch from q."queue_ticker_idle_period")::float8
                 from "ferry"."queue" q
                 left join "ferry"."tick" t on t."tick_queue" = q."queue_id"
                where q."queue_name" = $1
                group by q."queue_ticker_idle_period""#,
            &[&queue],
        )
        .await;
    let Ok(Some(row)) = row else {
        return;
    };
    let (age, idle): (Option<f64>, f64) = (row.get(0), row.get(1));
    let age = age.unwrap_or(f64::INFINITY);
    let stale = age > 2.0 * idle + 10.0;
    if stale && !*silent {
        tracing::warn!(
            queue,
            last_tick_secs_ago = age.round(),
            "no ticks for this queue: is the ticker running? (`ferry TICKER.ini ticker -d` on the provider)"
        );
    } else if !stale && *silent {
        tracing::info!(queue, "ticks arrive again");
    }
    *silent = stale;
}

/// What differs between `table`'s provider and subscriber definitions (a missing column, a
/// column of another type): after a failure about the table, usually its cause. A failed
/// look finds nothing.
async fn table_problems(link: &Link, table: &RelName) -> Vec<String> {
    let (source, target) = tokio::join!(
        table_shape(link.provider.client(), table),
        table_shape(link.subscriber.client(), table)
    );
    match (source, target) {
        (Ok(Some(source)), Ok(Some(target))) => subscriber::column_problems(&source, &target),
        _ => Vec::new(),
    }
}

/// Logs a failed round and says what to do about it: the error's remedy, except that a
/// session found closed always means reconnecting.
fn remedy(health: &mut Health, error: &ReplicaError, link: &Link) -> Remedy {
    let remedy = if link.provider.is_closed() || link.subscriber.is_closed() {
        Remedy::Reconnect
    } else {
        error.remedy()
    };
    match remedy {
        Remedy::Reconnect => health.problem(&format!("connection lost: {}", report(error))),
        Remedy::RetryLater => health.problem(&report(error)),
        Remedy::Stop => {}
    }
    remedy
}

/// Sleeps `delay` unless a stop comes first (`true`).
async fn wait_or_stop(shutdown: &mut Shutdown, delay: Duration) -> bool {
    tokio::select! {
        biased;
        _ = shutdown.wait() => true,
        _ = sleep(delay) => false,
    }
}

/// Connects to both sides and takes the queue's replay lock on the subscriber
/// ([`replay_lock`](crate::replay_lock)), retrying with backoff until both work or a stop is
/// requested: while another replay of the queue holds the lock, this one waits.
async fn connect(
    settings: &ReplaySettings,
    shutdown: &mut Shutdown,
    health: &mut Health,
) -> Result<Option<Link>, ReplayError> {
    let application_name = format!("ferry replay {}", settings.job_name);
    let mut delay = RECONNECT_MIN;
    loop {
        let attempt = tokio::select! {
            biased;
            _ = shutdown.wait() => return Ok(None),
            attempt = open_link(settings, &application_name) => attempt,
        };
        let locked = match attempt {
            Ok(link) => crate::replay_lock::take(link.subscriber.client(), &settings.queue)
                .await
                .map(|holder| (link, holder)),
            Err(error) => Err(error),
        };
        match locked {
            Ok((link, None)) => return Ok(Some(link)),
            // the sessions close here: the holder's end is found at the next attempt
            Ok((_, Some(holder))) => health.problem(&format!(
                "another replay of queue \"{}\" into this subscriber is running ({holder}): waiting until it stops",
                settings.queue
            )),
            Err(error) if error.remedy() == Remedy::Stop => {
                return Err(ReplayError::stopping(error))
            }
            Err(error) => health.problem(&format!("database unavailable: {}", report(&error))),
        }
        if wait_or_stop(shutdown, delay).await {
            return Ok(None);
        }
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

async fn open_link(
    settings: &ReplaySettings,
    application_name: &str,
) -> Result<Link, ReplicaError> {
    let sides = open_sides(
        &settings.provider,
        &settings.subscriber,
        &settings.queue,
        application_name,
    )
    .await?;
    if let Some(location) = &sides.moved_to {
        tracing::info!(provider = %location, "the provider is where a switchover or failover moved it, not where the config says");
    }
    Ok(Link {
        provider: sides.provider,
        subscriber: sides.subscriber,
        moved_to: sides.moved_to,
        newest_tick: None,
    })
}

/// Checks both sides are installed, makes sure the consumer is registered (copying every
/// table again if it was not: events before the registration are lost to it), and listens for
/// the ticker's wake-ups.
async fn prepare(link: &mut Link, settings: &ReplaySettings) -> Result<(), ReplicaError> {
    crate::provider::require_installed(link.provider.client()).await?;
    subscriber::require_installed(link.subscriber.client(), &settings.queue).await?;
    crate::session::enter_replica_mode(link.subscriber.client()).await?;
    let registered = ferry_queue::consumer_info(link.provider.client(), Some(&settings.queue))
        .await?
        .iter()
        .any(|c| c.consumer == settings.job_name);
    if !registered {
        ferry_queue::register_consumer(link.provider.client(), &settings.queue, &settings.job_name)
            .await?;
        let resynced = store::send_all_to_copy(link.subscriber.client(), &settings.queue).await?;
        store::forget_position(link.subscriber.client(), &settings.queue).await?;
        tracing::warn!(
            queue = %settings.queue,
            consumer = %settings.job_name,
            tables = resynced,
            "the consumer was not registered on the queue: registered it; its tables are copied again"
        );
    }
    reconcile_position(link, settings).await?;
    // where this subscriber is, for switchover and failover
    crate::provider::record_subscriber(
        link.provider.client(),
        &settings.queue,
        &settings.job_name,
        &settings.subscriber.location(),
    )
    .await?;
    record_peers(link, settings).await?;
    link.provider
        .client()
        .batch_execute(&format!("listen {}", ferry_queue::TICK_CHANNEL))
        .await
        .context("listening for ticks")?;
    Ok(())
}

/// Copies the provider's list of the queue's other subscribers to the subscriber: a failover
/// reads it there when the provider is gone. Done at start and every idle check.
async fn record_peers(link: &mut Link, settings: &ReplaySettings) -> Result<(), ReplicaError> {
    let peers: Vec<(String, String)> =
        crate::provider::subscribers(link.provider.client(), &settings.queue)
            .await?
            .into_iter()
            .filter(|(consumer, _)| consumer != &settings.job_name)
            .collect();
    if store::peers(link.subscriber.client(), &settings.queue).await? != peers {
        store::record_peers(link.subscriber.client_mut(), &settings.queue, &peers).await?;
    }
    Ok(())
}

/// Brings the queue's record of this consumer in line with the subscriber's position, which
/// is the truth (it commits with the batches' changes, durably). A provider crash can lose
/// `finish_batch` calls, leaving the consumer behind: it is moved on to the subscriber's
/// tick. A consumer ahead of the subscriber means batches finished without reaching it
/// (restored from a backup, commits lost in a crash): unless every table here waits for its
/// copy anyway, that is refused, and nothing is applied until the tables are copied again.
async fn reconcile_position(link: &Link, settings: &ReplaySettings) -> Result<(), ReplicaError> {
    let queue = settings.queue.as_str();
    let Some(recorded) = store::position(link.subscriber.client(), queue).await? else {
        return Ok(());
    };
    let Some(consumer) = ferry_queue::consumer_info(link.provider.client(), Some(queue))
        .await?
        .into_iter()
        .find(|c| c.consumer == settings.job_name)
    else {
        return Ok(());
    };
    if let (Some(batch), Some(batch_end)) = (consumer.current_batch, consumer.next_tick) {
        if store::batch_step(Some(recorded), consumer.last_tick, batch_end) == BatchStep::FinishOnly
        {
            // killed between the subscriber's commit and the finish: only finish it
            ferry_queue::finish_batch(link.provider.client(), batch).await?;
            tracing::info!(
                batch,
                tick = recorded,
                "batch was applied before the last stop; finished it"
            );
            return Ok(());
        }
    }
    if recorded > consumer.last_tick {
        if ferry_queue::move_consumer(link.provider.client(), queue, &settings.job_name, recorded)
            .await?
        {
            tracing::warn!(
                queue,
                consumer = %settings.job_name,
                from_tick = consumer.last_tick,
                to_tick = recorded,
                "the queue had lost the end of batches this subscriber applied (a provider crash?): the consumer moves on to the subscriber's position"
            );
        }
    } else if recorded < consumer.last_tick {
        let tables = store::tables(link.subscriber.client(), queue).await?;
        if tables.iter().all(|t| t.state.in_copy()) {
            // copies running or cut short may have left events out that batches finished
            // without reaching here held: every copy starts afresh
            store::send_all_to_copy(link.subscriber.client(), queue).await?;
            store::forget_position(link.subscriber.client(), queue).await?;
            tracing::info!(
                queue,
                "every table waits for its copy: the subscriber's old position is forgotten"
            );
        } else {
            return Err(ReplicaError::needs_setup(format!(
                "the subscriber has applied queue \"{queue}\" up to tick {recorded}, but consumer \"{}\" has finished batches up to tick {} on the provider: those batches never reached this subscriber (was it restored from a backup, or did it lose commits in a crash with fsync off?); copy its tables again with `ferry CONFIG subscriber resync TABLE...` for every table",
                settings.job_name, consumer.last_tick
            )));
        }
    }
    Ok(())
}

/// One round: start copies of tables waiting for one (they run beside), then apply batches
/// until none is left, reaping copies as they end. A graceful stop is honoured between units.
async fn work(
    link: &mut Link,
    applier: &mut Applier,
    copies: &mut Copies,
    settings: &ReplaySettings,
    shutdown: &Shutdown,
    counts: &ReplayMetrics,
) -> Result<Round, ReplicaError> {
    let queue = settings.queue.as_str();
    link.take_wake_ups(queue, None);
    // sent together, the provider's question beside the subscriber's two: one round trip. A
    // batch asked for in vain (paused, or the provider moved) stays open on the queue, as it
    // would have had the pause come a moment later; the answer is not looked at then.
    let (flags, tables, next) = tokio::join!(
        store::round_flags(link.subscriber.client(), applier.prepared(), queue),
        store::tables_prepared(link.subscriber.client(), Some(applier.prepared()), queue),
        apply::next_batch(
            link.provider.client(),
            queue,
            &settings.job_name,
            MAX_BATCH_EVENTS
        )
    );
    let (paused, moved_to) = flags?;
    if moved_to != link.moved_to {
        return Ok(Round::ProviderMoved);
    }
    if paused {
        return Ok(Round::Paused);
    }
    let target = CopyTarget {
        provider: provider_for(&settings.provider, link.moved_to.as_deref())?,
        subscriber: settings.subscriber.clone(),
        queue: settings.queue.clone(),
        job_name: settings.job_name.clone(),
        gauges: counts.copy.clone(),
        slices: settings.copy_slices,
    };
    reap_copies(copies, counts).await?;
    start_copies_of(&tables?, copies, settings, &target, counts);
    let mut next = next?;
    loop {
        if shutdown.requested().is_some() {
            return Ok(Round::Stopped);
        }
        if copies.any_running() && reap_copies(copies, counts).await? {
            start_copies(link, copies, settings, &target, counts).await?;
        }
        let Some(batch) = next.take() else {
            return Ok(Round::Idle);
        };
        let started = Instant::now();
        let outcome = applier
            .apply_batch(
                link.provider.client_mut(),
                link.subscriber.client_mut(),
                queue,
                &batch,
            )
            .await?;
        match outcome {
            BatchOutcome::Applied {
                applied,
                skipped,
                kept,
                unstashed,
                ..
            } => {
                counts.batches.inc();
                counts.events_applied.add(applied as f64);
                counts.events_skipped.add(skipped as f64);
                let tick_age = std::time::SystemTime::now()
                    .duration_since(batch.cur_tick.time)
                    .unwrap_or_default();
                counts.lag.set(tick_age.as_secs_f64());
                tracing::debug!(
                    batch = batch.id,
                    tick = batch.cur_tick.id,
                    tick_age_ms = tick_age.as_secs_f64() * 1e3,
                    apply_ms = started.elapsed().as_secs_f64() * 1e3,
                    applied,
                    skipped,
                    kept,
                    unstashed,
                    "batch applied"
                )
            }
            BatchOutcome::Paused => return Ok(Round::Paused),
            BatchOutcome::AlreadyApplied => tracing::info!(
                batch = batch.id,
                tick = batch.cur_tick.id,
                "batch was applied before the last stop; finished it"
            ),
            BatchOutcome::OutOfStep { recorded } => {
                tracing::info!(
                    batch = batch.id,
                    batch_start_tick = batch.prev_tick.id,
                    recorded_tick = recorded,
                    "the batch does not start where the subscriber is; reconciling"
                );
                reconcile_position(link, settings).await?;
                link.take_wake_ups(queue, None);
                next = apply::next_batch(
                    link.provider.client(),
                    queue,
                    &settings.job_name,
                    MAX_BATCH_EVENTS,
                )
                .await?;
                continue;
            }
        }
        // the subscriber has the batch: finish it, and unless it ends at the newest tick
        // announced, ask for the next one on the way (when caught up the question would only
        // cost the provider a call: the next tick's wake-up starts the next round)
        failpoint(failpoint::REPLAY_BEFORE_FINISH);
        link.take_wake_ups(queue, None);
        if link.caught_up_at(batch.cur_tick.id) {
            apply::finish(link.provider.client(), batch.id).await?;
            return Ok(Round::Idle);
        }
        next = apply::finish_and_next(
            link.provider.client(),
            batch.id,
            queue,
            &settings.job_name,
            MAX_BATCH_EVENTS,
        )
        .await?;
    }
}

/// Starts copies of the tables waiting for one, up to `parallel_copies` at once; the count
/// of tables not `ok` is refreshed on the way.
async fn start_copies(
    link: &Link,
    copies: &mut Copies,
    settings: &ReplaySettings,
    target: &CopyTarget,
    counts: &ReplayMetrics,
) -> Result<(), ReplicaError> {
    let tables = store::tables(link.subscriber.client(), &settings.queue).await?;
    start_copies_of(&tables, copies, settings, target, counts);
    Ok(())
}

/// Starts copies of those of `tables` (all of the queue's, just read) waiting for one, up to
/// `parallel_copies` at once, and refreshes the count of tables not `ok`.
fn start_copies_of(
    tables: &[store::StoredTable],
    copies: &mut Copies,
    settings: &ReplaySettings,
    target: &CopyTarget,
    counts: &ReplayMetrics,
) {
    counts
        .tables_not_ok
        .set(tables.iter().filter(|t| t.state != TableState::Ok).count() as f64);
    copies.start(tables, settings.parallel_copies, target);
}

/// Reports the copies that ended. `true` when any did; an error replay must stop for (corrupt
/// data, a broken invariant) is returned.
async fn reap_copies(copies: &mut Copies, counts: &ReplayMetrics) -> Result<bool, ReplicaError> {
    let ended = copies.reap().await;
    let any = !ended.is_empty();
    for ended in ended {
        if matches!(ended.result, Ok(Some(_))) {
            counts.tables_copied.inc();
        }
        if let Some(error) = log_ended(ended) {
            return Err(error);
        }
    }
    Ok(any)
}
