//! `ferry CONFIG failover` (the provider is gone: its subscriber takes over) and `ferry CONFIG
//! rejoin` (the old provider, back, becomes a subscriber of the new one).
//!
//! Failover promotes the subscriber of CONFIG: it captures every table into its own queue and
//! takes writes. What the old provider committed after the last tick this subscriber applied
//! is lost to it; the command says which tick that was. Every other subscriber (where the
//! old provider last said they are) moves to the new provider: one that applied exactly as
//! much keeps its rows, one behind or ahead has the rows that differ repaired from the new
//! provider, in the same transaction that moves it (its replay waits meanwhile). A subscriber
//! further ahead than this one is a better candidate: the command refuses then, naming it,
//! unless forced (its extra rows are then undone, and listed).
//!
//! Rejoin runs on the old provider's side once it is back: its writers are stopped (the write
//! guard), the transactions it committed that never reached the new provider are written to a
//! file (one json line per row change) and reported, never applied; then its capture goes,
//! its rows that differ from the new provider's at one consistent point are repaired, and it
//! replicates from there, no copy.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use ferry_connect::{ConnInfo, Session};
use tokio_postgres::IsolationLevel;

use crate::compare::{plan_table, repair_tables, RowDifference, TableRepair};
use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::names::RelName;
use crate::replay::ReplaySettings;
use crate::session::{enter_replica_mode, open_session};
use crate::store::{self, TableState};
use crate::switchover::{all_ok, guard, refusal, refuse_running_replay, take_topology_lock};

/// How long a connection to a node that may be down is given.
const REACH_TIMEOUT: Duration = Duration::from_secs(10);

/// How failover and rejoin act.
#[derive(Debug, Clone, Copy)]
pub struct FailoverOptions {
    /// Go on although the provider answers (failover), a subscriber is further ahead or cannot
    /// be reached (it is left behind).
    pub force: bool,
    /// Longest wait for table locks (rejoin's consistent point on the new provider).
    pub lock_timeout: Duration,
}

/// What a failover did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FailoverReport {
    /// The old provider's last tick this node applied: what the old provider committed after
    /// it may be lost.
    pub applied_tick: Option<i64>,
    /// Seconds before the failover that tick was applied.
    pub applied_secs_ago: f64,
    /// Tables now captured here.
    pub tables: usize,
    /// The other subscribers that moved here, with the rows repaired on each.
    pub moved: Vec<MovedSubscriber>,
    /// Subscribers left behind (unreachable; `--force`).
    pub left_behind: Vec<String>,
}

/// A subscriber that moved to the new provider.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MovedSubscriber {
    /// Its consumer name.
    pub consumer: String,
    /// The old provider's tick it had applied.
    pub applied_tick: Option<i64>,
    /// Rows repaired, per table (empty when it had applied exactly as much).
    pub repaired: Vec<TableRepair>,
}

/// A reachable peer of the promoted subscriber.
struct Peer {
    consumer: String,
    location: String,
    session: Session,
    position: Option<i64>,
}

/// Connects to `conninfo`, giving up after [`REACH_TIMEOUT`].
async fn reach(conninfo: &ConnInfo, side: &str, name: &str) -> Result<Session, ReplicaError> {
    match tokio::time::timeout(REACH_TIMEOUT, open_session(conninfo, side, name)).await {
        Ok(result) => result,
        Err(_) => Err(ReplicaError::new(
            ErrorKind::ConnectionLost,
            format!(
                "the {side} did not answer within {} s",
                REACH_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// A failover checked and ready to run (see [`prepare_failover`]).
pub struct Failover {
    settings: ReplaySettings,
    subscriber: Session,
    old_location: String,
    applied_tick: Option<i64>,
    applied_secs_ago: f64,
    names: Vec<RelName>,
    seqs: Vec<RelName>,
    peers: Vec<Peer>,
    left_behind: Vec<String>,
}

/// Checks the subscriber of `settings` can take over (see the module's documentation) and
/// holds the lock against another switchover or failover; nothing is changed. Then
/// [`Failover::run`], once the caller has stopped its replay.
pub async fn prepare_failover(
    settings: &ReplaySettings,
    options: FailoverOptions,
) -> Result<Failover, ReplicaError> {
    let refused = |why: &str| refusal("failover", why);
    let (queue, consumer) = (settings.queue.as_str(), settings.job_name.as_str());
    let name = format!("ferry failover {consumer}");
    let subscriber = open_session(&settings.subscriber, "subscriber", &name).await?;
    crate::subscriber::require_installed(subscriber.client(), queue).await?;
    take_topology_lock(&subscriber, "failover").await?;
    let old_location = store::provider_location(subscriber.client(), queue)
        .await?
        .unwrap_or_else(|| settings.provider.location());
    let old = ConnInfo::parse(&old_location)
        .map_err(|e| ReplicaError::connect("provider (as recorded)", e))?;
    if reach(&old, "provider", &name).await.is_ok() && !options.force {
        return Err(refused(
            "the provider answers: use `ferry CONFIG switchover`, which loses nothing (or --force, if it must not be used any more)",
        ));
    }
    let tables = all_ok(
        &subscriber,
        queue,
        "failover",
        "its rows are incomplete, so this subscriber cannot take over",
    )
    .await?;
    let record = store::replay_record(subscriber.client(), queue)
        .await?
        .ok_or_else(|| refused("this subscriber has not applied anything yet"))?;
    let applied_tick = record.applied_tick;
    let seqs = store::seqs(subscriber.client(), queue).await?;

    // the other subscribers, as the old provider last listed them
    let mut peers = Vec::new();
    let mut left_behind = Vec::new();
    for (peer, location) in store::peers(subscriber.client(), queue).await? {
        let reached = match ConnInfo::parse(&location) {
            Ok(conninfo) => reach(&conninfo, "subscriber", &name).await,
            Err(e) => Err(ReplicaError::connect("subscriber", e)),
        };
        let session = match reached {
            Ok(session) => session,
            Err(e) if options.force => {
                tracing::warn!(consumer = %peer, error = %ferry_daemon::logging::one_line(&e), "left behind: cannot be reached");
                left_behind.push(peer);
                continue;
            }
            Err(e) => {
                return Err(refused(&format!(
                    "subscriber \"{peer}\" cannot be reached ({}): bring it up, or --force to leave it behind",
                    ferry_daemon::logging::one_line(&e)
                )))
            }
        };
        crate::subscriber::require_installed(session.client(), queue).await?;
        if let Some(t) = store::tables(session.client(), queue)
            .await?
            .into_iter()
            .find(|t| t.state != TableState::Ok)
        {
            return Err(refused(&format!(
                "table {} is {} on subscriber \"{peer}\": it cannot move without a copy",
                t.table, t.state
            )));
        }
        let position = store::position(session.client(), queue).await?;
        if position > applied_tick && !options.force {
            return Err(refused(&format!(
                "subscriber \"{peer}\" has applied more (the old provider's tick {}, this one {}): promote it instead, or --force (what it has beyond this one is undone there, and listed)",
                position.unwrap_or_default(),
                applied_tick.unwrap_or_default()
            )));
        }
        peers.push(Peer {
            consumer: peer,
            location,
            session,
            position,
        });
    }
    let names: Vec<RelName> = tables.iter().map(|t| t.table.clone()).collect();
    Ok(Failover {
        settings: settings.clone(),
        subscriber,
        old_location,
        applied_tick,
        applied_secs_ago: record.applied_secs_ago,
        names,
        seqs,
        peers,
        left_behind,
    })
}

impl Failover {
    /// Promotes this subscriber and moves the others here; `listed` is told each row
    /// repaired on another subscriber. Refused, nothing changed, while its replay is still
    /// connected.
    pub async fn run(
        self,
        mut listed: impl FnMut(&str, &RowDifference<'_>),
    ) -> Result<FailoverReport, ReplicaError> {
        let Failover {
            settings,
            mut subscriber,
            old_location,
            applied_tick,
            applied_secs_ago,
            names,
            seqs,
            mut peers,
            left_behind,
        } = self;
        let (queue, consumer) = (settings.queue.as_str(), settings.job_name.as_str());
        let name = format!("ferry failover {consumer}");
        refuse_running_replay("failover", &[("subscriber", &subscriber)], consumer).await?;

        // this node captures, still guarded: its rows are the others' source
        crate::provider::install(subscriber.client_mut(), queue).await?;
        {
            let tx = subscriber
                .client_mut()
                .transaction()
                .await
                .context("starting capture here")?;
            for table in &names {
                crate::provider::add_table(&tx, queue, &table.quoted()).await?;
            }
            for seq in &seqs {
                crate::provider::add_seq(&tx, queue, &seq.quoted()).await?;
            }
            for peer in &peers {
                ferry_queue::register_consumer(&tx, queue, &peer.consumer).await?;
            }
            crate::provider::record_failover(&tx, queue, &old_location, applied_tick.unwrap_or(0))
                .await?;
            tx.commit().await.context("starting capture here")?;
        }
        let start_tick = ferry_queue::consumer_info(subscriber.client(), Some(queue))
            .await?
            .into_iter()
            .map(|c| c.last_tick)
            .max();

        // the others move here, repaired where they applied more or less than this node
        let new_location = settings.subscriber.location();
        let source_catalog = open_session(&settings.subscriber, "subscriber", &name).await?;
        let mut moved = Vec::new();
        for peer in &mut peers {
            let plans = {
                let mut plans = Vec::new();
                for t in store::tables(peer.session.client(), queue).await? {
                    plans.push(
                        plan_table(source_catalog.client(), peer.session.client(), &t.table)
                            .await?,
                    );
                }
                plans
            };
            enter_replica_mode(peer.session.client()).await?;
            let stx = subscriber
                .client_mut()
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .context("reading this node's rows")?;
            let ptx = peer
                .session
                .client_mut()
                .transaction()
                .await
                .with_context(|| format!("moving subscriber \"{}\"", peer.consumer))?;
            store::lock_position(&ptx, queue).await?;
            ptx.batch_execute("set local ferry.replay = 'on'")
                .await
                .context("starting the repair")?;
            let repaired = if peer.position == applied_tick {
                Vec::new()
            } else {
                let consumer_name = peer.consumer.clone();
                repair_tables(&stx, &ptx, &plans, true, &mut |row| {
                    listed(&consumer_name, row)
                })
                .await?
            };
            store::set_position(
                &ptx,
                queue,
                &peer.consumer,
                start_tick.ok_or_else(|| ReplicaError::corrupt("no tick on the new queue"))?,
            )
            .await?;
            store::set_provider_location(&ptx, queue, Some(&new_location)).await?;
            ptx.commit()
                .await
                .with_context(|| format!("moving subscriber \"{}\"", peer.consumer))?;
            drop(stx);
            moved.push(MovedSubscriber {
                consumer: peer.consumer.clone(),
                applied_tick: peer.position,
                repaired,
            });
        }

        // writes allowed here
        {
            let tx = subscriber
                .client_mut()
                .transaction()
                .await
                .context("opening this node for writes")?;
            store::forget_queue(&tx, queue).await?;
            for peer in &peers {
                crate::provider::record_subscriber(&tx, queue, &peer.consumer, &peer.location)
                    .await?;
            }
            tx.commit().await.context("opening this node for writes")?;
        }
        Ok(FailoverReport {
            applied_tick,
            applied_secs_ago,
            tables: names.len(),
            moved,
            left_behind,
        })
    }
}

/// What a rejoin did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RejoinReport {
    /// Transactions committed here that never reached the new provider.
    pub lost_transactions: u64,
    /// Their row changes, written to the file.
    pub lost_changes: u64,
    /// Rows repaired here, per table.
    pub repaired: Vec<TableRepair>,
    /// The new provider's tick this node replicates from.
    pub start_tick: i64,
}

/// Makes the old provider (the subscriber of `settings`) a subscriber of the new one (its
/// provider), writing what it committed that never got there to `lost_file`.
pub async fn rejoin(
    settings: &ReplaySettings,
    lost_file: &Path,
    options: FailoverOptions,
) -> Result<RejoinReport, ReplicaError> {
    let refused = |why: &str| refusal("rejoin", why);
    let (queue, consumer) = (settings.queue.as_str(), settings.job_name.as_str());
    let name = format!("ferry rejoin {consumer}");
    let mut old = open_session(&settings.subscriber, "subscriber", &name).await?;
    let mut locker = open_session(&settings.provider, "provider", &name).await?;
    let mut reader = open_session(&settings.provider, "provider", &name).await?;
    crate::provider::require_installed(locker.client()).await?;
    let Some((_, old_tick)) = crate::provider::failover_origin(locker.client(), queue).await?
    else {
        return Err(refused(&format!(
            "queue \"{queue}\" on the provider was not made by `failover`: rejoin is for the old provider after a failover"
        )));
    };
    let was_provider: bool = old
        .client()
        .query_one(
            r#"select to_regclass('"ferry"."provider_table"') is not null
                  and exists (select 1 from "ferry"."tick" t join "ferry"."queue" q on q."queue_id" = t."tick_queue"
                               where q."queue_name" = $1 and t."tick_id" = $2)"#,
            &[&queue, &old_tick],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(false);
    if !was_provider {
        return Err(refused(&format!(
            "this database was never the provider of queue \"{queue}\" that the failover left (it has no tick {old_tick} of it)"
        )));
    }
    let tables = crate::provider::tables(old.client(), queue).await?;
    let seqs = crate::provider::seqs(old.client(), queue).await?;

    // its writers stop first, so the lost transactions are all there is
    ferry_queue::install_component(old.client_mut(), &crate::subscriber::SUBSCRIBER).await?;
    guard(old.client_mut(), &tables, Some(queue), options.lock_timeout).await?;
    let (lost_transactions, lost_changes) =
        write_lost(old.client(), queue, old_tick, lost_file).await?;

    // one consistent point on the new provider: this node's consumer starts there
    // in short attempts: writers there hold their tables in any order (see switchover::guard)
    let lock = format!(
        "set local lock_timeout = {}; lock table {} in share mode",
        crate::switchover::GUARD_ATTEMPT.as_millis(),
        tables
            .iter()
            .map(RelName::quoted)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let deadline = std::time::Instant::now() + options.lock_timeout;
    let ltx = loop {
        let ltx = locker
            .client_mut()
            .transaction()
            .await
            .context("locking the new provider's tables")?;
        match ltx.batch_execute(&lock).await {
            Ok(()) => break ltx,
            Err(e) if crate::switchover::is_lock_conflict(&e) && std::time::Instant::now() < deadline => {
                drop(ltx);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => {
                return Err(ReplicaError::with_cause(
                    ErrorKind::TimedOut,
                    format!(
                        "could not lock the new provider's tables within {} ms (long transactions hold them?): this node's writers stay stopped; run rejoin again",
                        options.lock_timeout.as_millis()
                    ),
                    e,
                ))
            }
        }
    };
    let start_tick = ferry_queue::tick(&ltx, queue).await?;
    ferry_queue::register_consumer(&ltx, queue, consumer).await?;
    let ntx = reader
        .client_mut()
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .context("reading the new provider")?;
    ntx.batch_execute("select 1")
        .await
        .context("reading the new provider")?;
    ltx.commit()
        .await
        .context("registering this node on the new provider")?;

    // repaired and turned around in one transaction
    let mut plans = Vec::new();
    for table in &tables {
        plans.push(plan_table(locker.client(), old.client(), table).await?);
    }
    let values = crate::provider::seq_values(locker.client(), queue).await?;
    enter_replica_mode(old.client()).await?;
    let otx = old
        .client_mut()
        .transaction()
        .await
        .context("turning this node into a subscriber")?;
    otx.batch_execute("set local ferry.replay = 'on'")
        .await
        .context("turning this node into a subscriber")?;
    let repaired = repair_tables(&ntx, &otx, &plans, true, &mut |_| {}).await?;
    for table in &tables {
        crate::provider::remove_table(&otx, queue, &table.quoted()).await?;
        store::adopt_table(&otx, queue, table).await?;
    }
    for seq in &seqs {
        crate::provider::remove_seq(&otx, queue, &seq.quoted()).await?;
        store::add_seq(&otx, queue, seq).await?;
    }
    for c in ferry_queue::consumer_info(&otx, Some(queue)).await? {
        ferry_queue::unregister_consumer(&otx, queue, &c.consumer).await?;
        crate::provider::forget_subscriber(&otx, queue, &c.consumer).await?;
    }
    store::set_position(&otx, queue, consumer, start_tick).await?;
    store::set_provider_location(&otx, queue, Some(&settings.provider.location())).await?;
    crate::apply::sync_sequences(&otx, queue, &values).await?;
    otx.commit()
        .await
        .context("turning this node into a subscriber")?;
    drop(ntx);
    crate::provider::record_subscriber(
        locker.client(),
        queue,
        consumer,
        &settings.subscriber.location(),
    )
    .await?;
    crate::provider::forget_failover(locker.client(), queue).await?;
    Ok(RejoinReport {
        lost_transactions,
        lost_changes,
        repaired,
        start_tick,
    })
}

/// Writes every event of `queue` here whose transaction tick `old_tick` did not see (never
/// reached the new provider) to `path`, one json object per line; returns (transactions,
/// changes).
async fn write_lost(
    client: &tokio_postgres::Client,
    queue: &str,
    old_tick: i64,
    path: &Path,
) -> Result<(u64, u64), ReplicaError> {
    let rows = client
        .query(
            r#"select e."ev_txid", e."ev_time"::text, e."ev_type", e."ev_data", e."ev_extra1", e."ev_extra2"
                 from "ferry"."event" e
                 join "ferry"."queue" q on q."queue_id" = e."ev_queue"
                 join "ferry"."tick" t on t."tick_queue" = q."queue_id" and t."tick_id" = $2
                where q."queue_name" = $1
                  and not txid_visible_in_snapshot(e."ev_txid", t."tick_snapshot")
                order by e."ev_id""#,
            &[&queue, &old_tick],
        )
        .await
        .context("reading the transactions that never reached the new provider")?;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| {
        ReplicaError::invalid_input(format!("cannot write {}: {e}", path.display()))
    })?);
    let mut transactions = std::collections::BTreeSet::new();
    for row in &rows {
        let txid: i64 = row.get(0);
        transactions.insert(txid);
        let (ev_type, data, extra1, extra2): (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = (row.get(2), row.get(3), row.get(4), row.get(5));
        let json = |text: &Option<String>| {
            text.as_deref()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
                .unwrap_or(serde_json::Value::Null)
        };
        let mut line = serde_json::json!({
            "txid": txid,
            "time": row.get::<_, String>(1),
        });
        match ev_type.as_deref() {
            Some("I") => {
                line["table"] = extra1.clone().into();
                line["change"] = "insert".into();
                line["row"] = json(&data);
            }
            Some("U") => {
                line["table"] = extra1.clone().into();
                line["change"] = "update".into();
                line["row"] = json(&data);
                line["old_key"] = json(&extra2);
            }
            Some("D") => {
                line["table"] = extra1.clone().into();
                line["change"] = "delete".into();
                line["key"] = json(&data);
            }
            Some("T") => {
                line["table"] = extra1.clone().into();
                line["change"] = "truncate".into();
            }
            Some(crate::event::EXECUTE) => {
                line["change"] = "execute".into();
                line["file"] = extra1.clone().into();
                line["sql"] = data.clone().into();
            }
            other => {
                line["change"] = other.unwrap_or("?").into();
                line["data"] = data.clone().into();
            }
        }
        writeln!(file, "{line}").map_err(|e| {
            ReplicaError::invalid_input(format!("cannot write {}: {e}", path.display()))
        })?;
    }
    file.flush().map_err(|e| {
        ReplicaError::invalid_input(format!("cannot write {}: {e}", path.display()))
    })?;
    Ok((transactions.len() as u64, rows.len() as u64))
}
