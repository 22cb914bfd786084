//! `ferry CONFIG switchover`: the subscriber of CONFIG becomes the provider and the provider
//! its subscriber, both servers up, nothing lost and nothing copied; every other subscriber
//! of the queue moves to the new provider.
//!
//! Order of work:
//! 1. checks: replay of CONFIG not running, every table `ok` here and on every other
//!    subscriber of the queue (found where the provider records them), no other switchover
//!    (an advisory lock on the subscriber);
//! 2. both sides get the catalogs they will need (queue and provider here, subscriber
//!    there), and the subscriber catches up in this process;
//! 3. downtime begins: the provider's replicated tables get the write guard (writers get an
//!    error naming the table, never a silent loss; taking it waits for writers in flight),
//!    a last tick is made there, and this subscriber applies up to it, the others' replays
//!    too: all identical; sequences are moved up to the provider's. A failure here lifts the
//!    guard again: nothing changed;
//! 4. the new provider captures every table into its own queue (same name) and registers
//!    every consumer (CONFIG's `job_name` for the old provider, the others' own) at its
//!    latest tick, while its own tables are still guarded, so every later write reaches them;
//! 5. the other subscribers move along (their position that tick, their provider the new one:
//!    their replays reconnect there), then the old provider becomes a subscriber: its tables
//!    `ok` at that tick (no copy), its capture and consumers removed;
//! 6. the new provider's guard and subscriber records go: downtime ends.

use std::time::{Duration, Instant};

use ferry_connect::Session;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::apply::{self, sync_sequences, Applier, BatchOutcome};
use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::names::RelName;
use crate::replay::ReplaySettings;
use crate::session::{enter_replica_mode, open_session, open_sides};
use crate::store::{self, TableState};

/// Longest wait of one attempt at the write guard's locks (see [`guard`]).
pub(crate) const GUARD_ATTEMPT: Duration = Duration::from_millis(100);
/// Most events one batch may span while catching up.
const MAX_BATCH_EVENTS: i64 = 100_000;
/// The advisory lock key a switchover, failover or rejoin holds on the node it promotes
/// (`ferry` in ASCII): one such change at a time.
pub(crate) const TOPOLOGY_LOCK: i64 = 0x0066_6572_7279;

/// How a switchover waits.
#[derive(Debug, Clone, Copy)]
pub struct SwitchoverOptions {
    /// Longest wait for the lock that puts the write guard on the provider's tables.
    pub lock_timeout: Duration,
    /// Longest wait for the subscribers to catch up.
    pub timeout: Duration,
}

/// What a switchover did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwitchoverReport {
    /// The old provider's last tick, applied on every subscriber before the new provider
    /// took writes.
    pub last_tick: i64,
    /// The new provider's tick its consumers start from.
    pub start_tick: i64,
    /// Tables that changed direction.
    pub tables: usize,
    /// Sequences that changed direction.
    pub seqs: usize,
    /// Milliseconds between the write guard on the old provider and writes allowed on the
    /// new one: the application's downtime.
    pub downtime_ms: f64,
    /// The other subscribers, which moved along.
    pub moved: Vec<String>,
}

/// Another subscriber of the queue: it moves to the new provider with it.
struct Other {
    consumer: String,
    location: String,
    session: Session,
}

/// A switchover checked and ready to run (see [`prepare`]).
pub struct Switchover {
    settings: ReplaySettings,
    options: SwitchoverOptions,
    provider: Session,
    subscriber: Session,
    old_location: String,
    new_location: String,
    names: Vec<RelName>,
    seqs: Vec<RelName>,
    others: Vec<Other>,
}

/// Checks a switchover of `settings` can run (step 1 but for a running replay, which the
/// caller stops next) and holds the switchover lock; nothing is changed. Then
/// [`Switchover::run`].
pub async fn prepare(
    settings: &ReplaySettings,
    options: SwitchoverOptions,
) -> Result<Switchover, ReplicaError> {
    let (queue, consumer) = (settings.queue.as_str(), settings.job_name.as_str());
    let name = format!("ferry switchover {consumer}");
    let sides = open_sides(&settings.provider, &settings.subscriber, queue, &name).await?;
    let old_location = match &sides.moved_to {
        Some(location) => location.clone(),
        None => settings.provider.location(),
    };
    let new_location = settings.subscriber.location();
    let (provider, subscriber) = (sides.provider, sides.subscriber);
    crate::provider::require_installed(provider.client()).await?;
    crate::subscriber::require_installed(subscriber.client(), queue).await?;

    // 1. checks
    take_topology_lock(&subscriber, "switchover").await?;
    let tables = all_ok(
        &subscriber,
        queue,
        "switchover",
        "switch over once every table is ok (`ferry CONFIG wait-sync`)",
    )
    .await?;
    let carried = crate::provider::tables(provider.client(), queue).await?;
    if let Some(missing) = carried
        .iter()
        .find(|c| !tables.iter().any(|t| &t.table == *c))
    {
        return Err(refused(&format!(
            "the provider's queue carries {missing}, which is not replicated here: add it here (or remove it there) first"
        )));
    }
    let others = other_subscribers(&provider, queue, consumer, &name).await?;
    let seqs = store::seqs(subscriber.client(), queue).await?;
    let names: Vec<RelName> = tables.iter().map(|t| t.table.clone()).collect();
    Ok(Switchover {
        settings: settings.clone(),
        options,
        provider,
        subscriber,
        old_location,
        new_location,
        names,
        seqs,
        others,
    })
}

impl Switchover {
    /// Runs the switchover (steps 2 to 6); refused, with nothing changed, while a replay of
    /// CONFIG is still connected.
    pub async fn run(self) -> Result<SwitchoverReport, ReplicaError> {
        let Switchover {
            settings,
            options,
            mut provider,
            mut subscriber,
            old_location,
            new_location,
            names,
            seqs,
            mut others,
        } = self;
        let (queue, consumer) = (settings.queue.as_str(), settings.job_name.as_str());
        refuse_running_replay(
            "switchover",
            &[("provider", &provider), ("subscriber", &subscriber)],
            consumer,
        )
        .await?;

        // 2. catalogs, and most of the catching up before the downtime; how each table is
        // captured here, to capture it the same way there
        let modes = crate::provider::capture_modes(provider.client(), queue, &names).await?;
        crate::provider::install(subscriber.client_mut(), queue).await?;
        ferry_queue::install_component(provider.client_mut(), &crate::subscriber::SUBSCRIBER)
            .await?;
        enter_replica_mode(subscriber.client()).await?;
        let mut applier = Applier::default();
        catch_up(
            &mut provider,
            &mut subscriber,
            &mut applier,
            queue,
            consumer,
            None,
            options.timeout,
        )
        .await?;

        // 3. downtime: the old provider's writers stop, every subscriber gets everything
        let down = Instant::now();
        guard(
            provider.client_mut(),
            &names,
            Some(queue),
            options.lock_timeout,
        )
        .await?;
        let drained = drain(
            &mut provider,
            &mut subscriber,
            &mut applier,
            &others,
            queue,
            consumer,
            options.timeout,
        )
        .await;
        let last_tick = match drained {
            Ok(tick) => tick,
            Err(error) => {
                // nothing has changed direction yet: the old provider takes writes again
                let lifted = guard(provider.client_mut(), &names, None, options.lock_timeout).await;
                if let Err(e) = lifted {
                    tracing::error!(
                        error = %ferry_daemon::logging::one_line(&e),
                        "could not lift the write guard from the provider's tables after a failed switchover: run `ferry CONFIG switchover` again, or `select ferry.subscriber_protect(TABLE::regclass, null)` for each table there"
                    );
                }
                return Err(error);
            }
        };

        // 4. the new provider captures, and knows its consumers
        let start_tick = {
            let stx = subscriber
                .client_mut()
                .transaction()
                .await
                .context("starting capture on the new provider")?;
            for table in &names {
                match modes.iter().find(|(t, _)| t == table) {
                    Some((_, mode)) => {
                        crate::provider::capture_table(&stx, queue, &table.quoted(), *mode).await?;
                    }
                    None => {
                        crate::provider::add_table(&stx, queue, &table.quoted()).await?;
                    }
                }
            }
            for seq in &seqs {
                crate::provider::add_seq(&stx, queue, &seq.quoted()).await?;
            }
            ferry_queue::register_consumer(&stx, queue, consumer).await?;
            for other in &others {
                ferry_queue::register_consumer(&stx, queue, &other.consumer).await?;
            }
            let start = ferry_queue::consumer_info(&stx, Some(queue))
                .await?
                .into_iter()
                .find(|c| c.consumer == consumer)
                .map(|c| c.last_tick)
                .ok_or_else(|| {
                    ReplicaError::corrupt("the consumer registered a moment ago is gone")
                })?;
            stx.commit()
                .await
                .context("starting capture on the new provider")?;
            start
        };

        // 5. the other subscribers follow (before the old provider forgets them, so that a replay
        // reconnecting meanwhile finds its consumer where it looks), then the old provider
        for other in &mut others {
            let tx = other
                .session
                .client_mut()
                .transaction()
                .await
                .with_context(|| format!("moving subscriber \"{}\" along", other.consumer))?;
            // locked: its replay applies no batch of the old provider's meanwhile
            let (position, _) = store::lock_position(&tx, queue).await?;
            if position.is_none_or(|p| p < last_tick) {
                return Err(ReplicaError::corrupt(format!(
                    "subscriber \"{}\" went back from tick {last_tick} to {position:?}",
                    other.consumer
                )));
            }
            store::set_position(&tx, queue, &other.consumer, start_tick).await?;
            store::set_provider_location(&tx, queue, Some(&new_location)).await?;
            tx.commit()
                .await
                .with_context(|| format!("moving subscriber \"{}\" along", other.consumer))?;
        }
        {
            let ptx = provider
                .client_mut()
                .transaction()
                .await
                .context("turning the old provider into a subscriber")?;
            store::set_position(&ptx, queue, consumer, start_tick).await?;
            store::set_provider_location(&ptx, queue, Some(&new_location)).await?;
            for table in &names {
                store::adopt_table(&ptx, queue, table).await?;
                crate::provider::remove_table(&ptx, queue, &table.quoted()).await?;
            }
            for seq in &seqs {
                store::add_seq(&ptx, queue, seq).await?;
                crate::provider::remove_seq(&ptx, queue, &seq.quoted()).await?;
            }
            for gone in std::iter::once(consumer).chain(others.iter().map(|o| o.consumer.as_str()))
            {
                ferry_queue::unregister_consumer(&ptx, queue, gone).await?;
                crate::provider::forget_subscriber(&ptx, queue, gone).await?;
            }
            ptx.commit()
                .await
                .context("turning the old provider into a subscriber")?;
        }

        // 6. the new provider takes writes
        {
            let stx = subscriber
                .client_mut()
                .transaction()
                .await
                .context("opening the new provider for writes")?;
            store::forget_queue(&stx, queue).await?;
            // where its subscribers are, for the next switchover
            crate::provider::record_subscriber(&stx, queue, consumer, &old_location).await?;
            for other in &others {
                crate::provider::record_subscriber(&stx, queue, &other.consumer, &other.location)
                    .await?;
            }
            stx.commit()
                .await
                .context("opening the new provider for writes")?;
        }
        let downtime = down.elapsed();
        Ok(SwitchoverReport {
            last_tick,
            start_tick,
            tables: names.len(),
            seqs: seqs.len(),
            downtime_ms: downtime.as_secs_f64() * 1000.0,
            moved: others.iter().map(|o| o.consumer.clone()).collect(),
        })
    }
}

/// Connects to every other subscriber of `queue` (where the provider records them) and checks
/// each can move along: its store installed, its tables `ok`.
async fn other_subscribers(
    provider: &Session,
    queue: &str,
    consumer: &str,
    application_name: &str,
) -> Result<Vec<Other>, ReplicaError> {
    let located = crate::provider::subscribers(provider.client(), queue).await?;
    let mut others = Vec::new();
    for info in ferry_queue::consumer_info(provider.client(), Some(queue)).await? {
        if info.consumer == consumer {
            continue;
        }
        let Some((_, location)) = located.iter().find(|(c, _)| *c == info.consumer) else {
            return Err(refused(&format!(
                "consumer \"{}\" of queue \"{queue}\" has no recorded location (its replay records it when it starts): start its replay once, or unregister it",
                info.consumer
            )));
        };
        let conninfo = ferry_connect::ConnInfo::parse(location)
            .map_err(|e| ReplicaError::connect(&format!("subscriber {}", info.consumer), e))?;
        let session = open_session(&conninfo, "subscriber", application_name).await?;
        crate::subscriber::require_installed(session.client(), queue).await?;
        if let Some(t) = store::tables(session.client(), queue)
            .await?
            .into_iter()
            .find(|t| t.state != TableState::Ok)
        {
            return Err(refused(&format!(
                "table {} is {} on subscriber \"{}\": switch over once it is ok",
                t.table, t.state, info.consumer
            )));
        }
        others.push(Other {
            consumer: info.consumer,
            location: location.clone(),
            session,
        });
    }
    Ok(others)
}

/// With the provider's writers stopped: a last tick, applied here in this process and by
/// every other subscriber's replay; the sequences moved up. Returns that tick.
async fn drain(
    provider: &mut Session,
    subscriber: &mut Session,
    applier: &mut Applier,
    others: &[Other],
    queue: &str,
    consumer: &str,
    timeout: Duration,
) -> Result<i64, ReplicaError> {
    let last_tick = ferry_queue::tick(provider.client(), queue).await?;
    catch_up(
        provider,
        subscriber,
        applier,
        queue,
        consumer,
        Some(last_tick),
        timeout,
    )
    .await?;
    let values = crate::provider::seq_values(provider.client(), queue).await?;
    let stx = subscriber
        .client_mut()
        .transaction()
        .await
        .context("moving the sequences")?;
    sync_sequences(&stx, queue, &values).await?;
    stx.commit().await.context("moving the sequences")?;
    let deadline = Instant::now() + timeout;
    for other in others {
        loop {
            let position = store::position(other.session.client(), queue).await?;
            if position.is_some_and(|p| p >= last_tick) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ReplicaError::new(
                    ErrorKind::TimedOut,
                    format!(
                        "subscriber \"{}\" did not apply tick {last_tick} within {} s (is its replay running?): nothing changed; the provider takes writes again",
                        other.consumer,
                        timeout.as_secs_f64()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    Ok(last_tick)
}

/// Takes the lock one switchover, failover or rejoin at a time holds on the node it
/// promotes, for the session's life; `command` is refused when another holds it.
pub(crate) async fn take_topology_lock(
    session: &Session,
    command: &str,
) -> Result<(), ReplicaError> {
    let locked: bool = session
        .client()
        .query_one("select pg_try_advisory_lock($1)", &[&TOPOLOGY_LOCK])
        .await
        .with_context(|| format!("taking the {command} lock"))?
        .get(0);
    if locked {
        Ok(())
    } else {
        Err(refusal(
            command,
            "another switchover is in progress on this node (or a failover)",
        ))
    }
}

/// The tables of `queue` on `session`'s subscriber, each `ok`; else `command` is refused,
/// saying `remedy`.
pub(crate) async fn all_ok(
    session: &Session,
    queue: &str,
    command: &str,
    remedy: &str,
) -> Result<Vec<store::StoredTable>, ReplicaError> {
    let tables = store::tables(session.client(), queue).await?;
    if let Some(t) = tables.iter().find(|t| t.state != TableState::Ok) {
        return Err(refusal(
            command,
            &format!("table {} is {} here: {remedy}", t.table, t.state),
        ));
    }
    if tables.is_empty() {
        return Err(refusal(command, "no table is replicated here"));
    }
    Ok(tables)
}

/// A refusal: nothing was changed.
fn refused(why: &str) -> ReplicaError {
    refusal("switchover", why)
}

/// `COMMAND refused, nothing changed: WHY`.
pub(crate) fn refusal(command: &str, why: &str) -> ReplicaError {
    ReplicaError::invalid_input(format!("{command} refused, nothing changed: {why}"))
}

/// Refuses (for `command`) while a replay of `consumer` has a session on one of `sides` (5 s
/// after a stop at most): it would apply batches beside the command's own, and register
/// itself again afterwards.
pub(crate) async fn refuse_running_replay(
    command: &str,
    sides: &[(&str, &Session)],
    consumer: &str,
) -> Result<(), ReplicaError> {
    let application = format!("ferry replay {consumer}");
    for (side, session) in sides {
        // a replay stopped a moment ago may still show for a little while
        let deadline = Instant::now() + Duration::from_secs(5);
        let running = loop {
            let running: bool = session
                .client()
                .query_one(
                    "select exists (select 1 from pg_stat_activity where application_name = $1)",
                    &[&application],
                )
                .await
                .with_context(|| format!("looking for replay on the {side}"))?
                .get(0);
            if !running || Instant::now() >= deadline {
                break running;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if running {
            return Err(refusal(command, &format!(
                "replay of \"{consumer}\" is connected to the {side}: stop it first (`ferry -s CONFIG`)"
            )));
        }
    }
    Ok(())
}

/// Puts the write guard of `queue` on `tables` of the provider (`None`: lifts it), in one
/// transaction that first locks them all. Writers hold their tables in any order, so a long
/// wait could deadlock with one of them and cost PostgreSQL's `deadlock_timeout` (1 s) before
/// either gives way: each attempt waits at most [`GUARD_ATTEMPT`], then lets go (writers go
/// on) and tries again, until `lock_timeout` has passed.
pub(crate) async fn guard(
    provider: &mut Client,
    tables: &[RelName],
    queue: Option<&str>,
    lock_timeout: Duration,
) -> Result<(), ReplicaError> {
    let names: Vec<String> = tables.iter().map(RelName::quoted).collect();
    let lock = format!(
        "set local lock_timeout = {}; lock table {} in share row exclusive mode",
        GUARD_ATTEMPT.as_millis(),
        names.join(", ")
    );
    let deadline = Instant::now() + lock_timeout;
    loop {
        let tx = provider
            .transaction()
            .await
            .context("stopping the provider's writers")?;
        match tx.batch_execute(&lock).await {
            Ok(()) => {
                for table in tables {
                    tx.execute(
                        r#"select "ferry"."subscriber_protect"(to_regclass($1), $2)"#,
                        &[&table.quoted(), &queue],
                    )
                    .await
                    .with_context(|| format!("putting the write guard on {table}"))?;
                }
                return tx.commit().await.context("stopping the provider's writers");
            }
            Err(e) if is_lock_conflict(&e) && Instant::now() < deadline => {
                drop(tx);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                return Err(ReplicaError::with_cause(
                    ErrorKind::TimedOut,
                    format!(
                        "could not lock {} on the provider within {} ms (long transactions hold them? see pg_locks): nothing changed; try again",
                        names.join(", "),
                        lock_timeout.as_millis()
                    ),
                    e,
                ))
            }
        }
    }
}

/// Whether `error` is a lock not granted in time or a deadlock with other sessions: worth
/// another attempt.
pub(crate) fn is_lock_conflict(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
        || error.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED)
}

/// Applies batches of `queue` to the subscriber in this process until none is left, and, given
/// `until`, until the subscriber's position has reached that tick (at most `timeout`).
async fn catch_up(
    provider: &mut Session,
    subscriber: &mut Session,
    applier: &mut Applier,
    queue: &str,
    consumer: &str,
    until: Option<i64>,
    timeout: Duration,
) -> Result<(), ReplicaError> {
    let deadline = Instant::now() + timeout;
    loop {
        let batch =
            ferry_queue::next_batch(provider.client(), queue, consumer, Some(MAX_BATCH_EVENTS))
                .await?;
        let Some(batch) = batch else {
            let position = store::position(subscriber.client(), queue).await?;
            if until.is_none_or(|tick| position.is_some_and(|p| p >= tick)) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ReplicaError::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the subscriber did not reach tick {} within {} s",
                        until.unwrap_or_default(),
                        timeout.as_secs_f64()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        match applier
            .apply_batch(provider.client_mut(), subscriber.client_mut(), queue, &batch)
            .await?
        {
            BatchOutcome::Applied { .. } | BatchOutcome::AlreadyApplied => {
                apply::finish(provider.client(), batch.id).await?
            }
            BatchOutcome::Paused => {
                return Err(refused("replay is paused here: `ferry CONFIG resume` first"))
            }
            BatchOutcome::OutOfStep { recorded } => {
                return Err(ReplicaError::needs_setup(format!(
                    "the subscriber is at tick {recorded}, which batch {} does not start from: run replay once to reconcile, then switch over",
                    batch.id
                )))
            }
        }
    }
}
