//! ferry's queue: PgQ-style event queues in plain SQL and PL/pgSQL (installed by
//! [`install()`]), and a typed client for them.
//!
//! Writers call `ferry.insert_event` inside their transactions; the ticker calls
//! [`tick_queues`]; a consumer loops over [`next_batch`], reads the batch's events with
//! [`BatchCursor`] (in pages, inside a transaction), and calls [`finish_batch`]. Each committed
//! event reaches each registered consumer exactly once, in the first batch after its commit.

mod error;
mod install;

use std::time::SystemTime;

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Portal, Row, Transaction};

use error::ResultExt;
pub use error::{QueueError, NOT_PERMITTED_HINT};
pub use install::{
    install, install_component, installed_version, installed_version_of, latest_version, Component,
    InstallReport, Migration, COMPONENT, MIN_SERVER_VERSION_NUM, QUEUE,
};

/// The NOTIFY channel every tick signals on at its commit; the payload is `TICK_ID:QUEUE_NAME`
/// (read it with [`TickNotice::parse`]).
pub const TICK_CHANNEL: &str = "ferry_tick";

/// A tick's wake-up on [`TICK_CHANNEL`]: which queue ticked, and the new tick's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickNotice<'a> {
    /// The tick's id (ids of one queue increase with every tick).
    pub tick_id: i64,
    /// The queue that ticked.
    pub queue: &'a str,
}

impl<'a> TickNotice<'a> {
    /// Reads a payload of [`TICK_CHANNEL`]; `None` for one of another form (queue schemas
    /// before this one sent the queue's name alone).
    pub fn parse(payload: &'a str) -> Option<TickNotice<'a>> {
        let (tick_id, queue) = payload.split_once(':')?;
        Some(TickNotice {
            tick_id: tick_id.parse().ok()?,
            queue,
        })
    }
}

/// One event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event's id, unique within its queue, increasing in insert order.
    pub id: i64,
    /// When the inserting transaction started.
    pub time: SystemTime,
    /// The inserting transaction's txid.
    pub txid: i64,
    /// How many times it was retried (`None` for a first delivery).
    pub retry: Option<i32>,
    /// The event type.
    pub ev_type: Option<String>,
    /// The payload.
    pub data: Option<String>,
    /// Extra fields 1 to 4.
    pub extra: [Option<String>; 4],
}

impl Event {
    fn from_row(row: &Row) -> Event {
        Event {
            id: row.get(0),
            time: row.get(1),
            txid: row.get(2),
            retry: row.get(3),
            ev_type: row.get(4),
            data: row.get(5),
            extra: [row.get(6), row.get(7), row.get(8), row.get(9)],
        }
    }
}

/// A tick bounding a batch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tick {
    /// The tick's id within its queue.
    pub id: i64,
    /// When it was taken.
    pub time: SystemTime,
    /// The queue's event sequence value at that time.
    pub event_seq: i64,
}

/// A batch handed to a consumer: the events of transactions that became visible after
/// `prev_tick` and by `cur_tick`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Batch {
    /// The batch id, for reading and finishing it.
    pub id: i64,
    /// The consumer's position before the batch.
    pub prev_tick: Tick,
    /// The position the batch brings the consumer to.
    pub cur_tick: Tick,
}

/// State of a queue, from `ferry.get_queue_info()`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QueueInfo {
    /// The queue's name.
    pub name: String,
    /// Number of rotating event tables.
    pub ntables: i32,
    /// The table new events go to.
    pub cur_table: i32,
    /// Seconds between rotations.
    pub rotation_period_secs: f64,
    /// Seconds since the last rotation.
    pub since_rotation_secs: f64,
    /// The latest tick's id.
    pub last_tick_id: Option<i64>,
    /// Seconds since the latest tick.
    pub ticker_lag_secs: Option<f64>,
    /// Events inserted since the latest tick (by the event sequence).
    pub events_since_tick: Option<i64>,
    /// Registered consumers.
    pub consumers: i32,
    /// Seconds after which a queue without news is ticked all the same.
    pub ticker_idle_period_secs: f64,
    /// With news, seconds the ticker waits for `ticker_max_count` events at most (0: it
    /// ticks at the first check).
    pub ticker_max_lag_secs: f64,
    /// Events that make the ticker tick before `ticker_max_lag` (0: none).
    pub ticker_max_count: i64,
}

/// State of a consumer, from `ferry.get_consumer_info()`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ConsumerInfo {
    /// The queue.
    pub queue: String,
    /// The consumer.
    pub consumer: String,
    /// Age of the last tick it finished, in seconds.
    pub lag_secs: f64,
    /// Seconds since it last asked for a batch.
    pub last_seen_secs: f64,
    /// The last tick it finished.
    pub last_tick: i64,
    /// The batch it is working on.
    pub current_batch: Option<i64>,
    /// The tick that batch ends at.
    pub next_tick: Option<i64>,
    /// Events ticked past its position (by the event sequence).
    pub pending_events: i64,
}

/// Creates a queue; `false` when it existed already.
pub async fn create_queue(client: &impl GenericClient, queue: &str) -> Result<bool, QueueError> {
    let row = client
        .query_one(r#"select "ferry"."create_queue"($1)"#, &[&queue])
        .await
        .with_context(|| format!("creating queue \"{queue}\""))?;
    Ok(row.get::<_, i32>(0) == 1)
}

/// Drops a queue and its events; refuses while consumers are registered unless `force`.
/// `false` when there was no such queue.
pub async fn drop_queue(
    client: &impl GenericClient,
    queue: &str,
    force: bool,
) -> Result<bool, QueueError> {
    let row = client
        .query_one(r#"select "ferry"."drop_queue"($1, $2)"#, &[&queue, &force])
        .await
        .with_context(|| format!("dropping queue \"{queue}\""))?;
    Ok(row.get::<_, i32>(0) == 1)
}

/// Registers a consumer at the queue's latest tick; `false` when it was registered already.
pub async fn register_consumer(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
) -> Result<bool, QueueError> {
    let row = client
        .query_one(
            r#"select "ferry"."register_consumer"($1, $2)"#,
            &[&queue, &consumer],
        )
        .await
        .with_context(|| format!("registering consumer \"{consumer}\" on queue \"{queue}\""))?;
    Ok(row.get::<_, i32>(0) == 1)
}

/// Unregisters a consumer; `false` when it was not registered.
pub async fn unregister_consumer(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
) -> Result<bool, QueueError> {
    let row = client
        .query_one(
            r#"select "ferry"."unregister_consumer"($1, $2)"#,
            &[&queue, &consumer],
        )
        .await
        .with_context(|| format!("unregistering consumer \"{consumer}\" from queue \"{queue}\""))?;
    Ok(row.get::<_, i32>(0) == 1)
}

/// Inserts an event in the client's current transaction; returns its id.
pub async fn insert_event(
    client: &impl GenericClient,
    queue: &str,
    ev_type: &str,
    data: &str,
) -> Result<i64, QueueError> {
    let row = client
        .query_one(
            r#"select "ferry"."insert_event"($1, $2, $3)"#,
            &[&queue, &ev_type, &data],
        )
        .await
        .with_context(|| format!("inserting an event into queue \"{queue}\""))?;
    Ok(row.get(0))
}

/// Ticks every queue that has news or has idled long enough; returns how many were ticked.
pub async fn tick_queues(client: &impl GenericClient) -> Result<i32, QueueError> {
    // typed: one round trip (an untyped query is prepared first), fifty times a second
    let row = client
        .query_typed_one(r#"select "ferry"."ticker"()"#, &[])
        .await
        .context("ticking queues")?;
    Ok(row.get(0))
}

/// Ticks one queue now; returns the tick's id.
pub async fn tick(client: &impl GenericClient, queue: &str) -> Result<i64, QueueError> {
    let row = client
        .query_one(r#"select "ferry"."ticker"($1::text)"#, &[&queue])
        .await
        .with_context(|| format!("ticking queue \"{queue}\""))?;
    Ok(row.get(0))
}

/// The consumer's open batch, or a new one if a newer tick exists; `None` when there is
/// nothing yet. With `max_events`, one batch may span several ticks holding at most that many
/// events (at least one tick).
pub async fn next_batch(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
    max_events: Option<i64>,
) -> Result<Option<Batch>, QueueError> {
    // typed: one round trip (an untyped query is prepared first)
    let row = client
        .query_typed_one(
            r#"select batch_id, prev_tick_id, prev_tick_time, prev_tick_event_seq,
                      cur_tick_id, cur_tick_time, cur_tick_event_seq
                 from "ferry"."next_batch_info"($1, $2, $3)"#,
            &[
                (&queue, Type::TEXT),
                (&consumer, Type::TEXT),
                (&max_events, Type::INT8),
            ],
        )
        .await
        .with_context(|| {
            format!("asking queue \"{queue}\" for the next batch of consumer \"{consumer}\"")
        })?;
    let Some(id) = row.get::<_, Option<i64>>(0) else {
        return Ok(None);
    };
    Ok(Some(Batch {
        id,
        prev_tick: Tick {
            id: row.get(1),
            time: row.get(2),
            event_seq: row.get(3),
        },
        cur_tick: Tick {
            id: row.get(4),
            time: row.get(5),
            event_seq: row.get(6),
        },
    }))
}

/// Holds `consumer` at `tick` for at most `hold_for`: [`next_batch`] hands it no batch ending
/// past that tick meanwhile. Call it in the transaction that makes the tick. `false` when the
/// consumer is not registered.
pub async fn hold_consumer(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
    tick: i64,
    hold_for: std::time::Duration,
) -> Result<bool, QueueError> {
    let row = client
        .query_one(
            r#"select "ferry"."hold_consumer"($1, $2, $3, make_interval(secs => $4))"#,
            &[&queue, &consumer, &tick, &hold_for.as_secs_f64()],
        )
        .await
        .with_context(|| format!("holding consumer \"{consumer}\" at tick {tick}"))?;
    Ok(row.get(0))
}

/// Ends `consumer`'s hold at `tick` (see [`hold_consumer`]); a newer hold stays.
pub async fn release_consumer(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
    tick: i64,
) -> Result<(), QueueError> {
    client
        .execute(
            r#"select "ferry"."release_consumer"($1, $2, $3)"#,
            &[&queue, &consumer, &tick],
        )
        .await
        .with_context(|| format!("releasing consumer \"{consumer}\" from tick {tick}"))?;
    Ok(())
}

/// Finishes a batch: the consumer moves to its tick. `false` when the batch was not open.
pub async fn finish_batch(client: &impl GenericClient, batch_id: i64) -> Result<bool, QueueError> {
    let row = client
        .query_one(r#"select "ferry"."finish_batch"($1)"#, &[&batch_id])
        .await
        .with_context(|| format!("finishing batch {batch_id}"))?;
    Ok(row.get::<_, i32>(0) == 1)
}

/// Moves `consumer` on to `tick` (an existing tick at or past its last finished one),
/// dropping its open batch; `false` when it was there already. For a consumer whose own
/// durable record of progress is ahead of the queue's after a crash lost `finish_batch`es.
pub async fn move_consumer(
    client: &impl GenericClient,
    queue: &str,
    consumer: &str,
    tick: i64,
) -> Result<bool, QueueError> {
    let row = client
        .query_one(
            r#"select "ferry"."move_consumer"($1, $2, $3)"#,
            &[&queue, &consumer, &tick],
        )
        .await
        .with_context(|| format!("moving consumer {consumer} of queue {queue} to tick {tick}"))?;
    Ok(row.get::<_, i32>(0) == 1)
}

/// Asks for an event of an open batch to be delivered again to this consumer after
/// `retry_seconds`; `false` when the event is not in the batch.
pub async fn event_retry(
    client: &impl GenericClient,
    batch_id: i64,
    event_id: i64,
    retry_seconds: i32,
) -> Result<bool, QueueError> {
    let row = client
        .query_one(
            r#"select "ferry"."event_retry"($1, $2, $3)"#,
            &[&batch_id, &event_id, &retry_seconds],
        )
        .await
        .with_context(|| format!("retrying event {event_id} of batch {batch_id}"))?;
    Ok(row.get::<_, i32>(0) == 1)
}

/// All events of a batch at once. For batches of any size use [`BatchCursor`].
pub async fn get_batch_events(
    client: &impl GenericClient,
    batch_id: i64,
) -> Result<Vec<Event>, QueueError> {
    let rows = client
        .query(
            r#"select * from "ferry"."get_batch_events"($1)"#,
            &[&batch_id],
        )
        .await
        .with_context(|| format!("reading the events of batch {batch_id}"))?;
    Ok(rows.iter().map(Event::from_row).collect())
}

/// Events per part of a batch that [`BatchCursor`] reads (and the provider sorts) at a time.
pub const PART_EVENTS: i64 = 20_000;

/// Every event of open batch `batch_id` in one round trip and without a transaction, when it
/// holds at most `limit` events (in ev_id order, as [`BatchCursor`] reads them); `None` when it
/// holds more (read it with a [`BatchCursor`] then). Meant for the small batches of a consumer
/// that keeps up: one statement sees the whole batch, as the batch's transactions all
/// committed before its tick was taken.
pub async fn small_batch_events(
    client: &impl GenericClient,
    batch_id: i64,
    limit: i64,
) -> Result<Option<Vec<Event>>, QueueError> {
    let rows = client
        .query_typed(
            r#"select * from "ferry"."batch_events_upto"($1, $2)"#,
            &[(&batch_id, Type::INT8), (&(limit + 1), Type::INT8)],
        )
        .await
        .with_context(|| format!("reading the events of batch {batch_id}"))?;
    if rows.len() as i64 > limit {
        return Ok(None);
    }
    Ok(Some(rows.iter().map(Event::from_row).collect()))
}

/// Pages through a batch's events inside a transaction, holding at most one page in memory.
/// A big batch is read part after part (see `ferry.batch_parts`), each in id order: the first
/// events come without waiting for the whole batch to be sorted, and the order is as faithful
/// to the provider as the id order of the whole batch.
pub struct BatchCursor<'t, 'c> {
    tx: &'t Transaction<'c>,
    batch_id: i64,
    /// the query of each part not yet opened, last part first
    parts: Vec<String>,
    /// the part being read
    portal: Option<Portal>,
}

impl<'t, 'c> BatchCursor<'t, 'c> {
    /// Opens the cursor over batch `batch_id`'s events, in parts of about [`PART_EVENTS`].
    pub async fn open(
        tx: &'t Transaction<'c>,
        batch_id: i64,
    ) -> Result<BatchCursor<'t, 'c>, QueueError> {
        Self::open_in_parts(tx, batch_id, PART_EVENTS).await
    }

    /// Opens the cursor over batch `batch_id`'s events, in parts of about `part_events`.
    pub async fn open_in_parts(
        tx: &'t Transaction<'c>,
        batch_id: i64,
        part_events: i64,
    ) -> Result<BatchCursor<'t, 'c>, QueueError> {
        let mut parts: Vec<String> = tx
            .query(
                r#"select "ferry"."batch_event_sql"($1, p."from_tick", p."to_tick")
                     from "ferry"."batch_parts"($1, $2) p order by p."from_tick""#,
                &[&batch_id, &part_events],
            )
            .await
            .with_context(|| format!("building the queries for batch {batch_id}"))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        parts.reverse();
        Ok(BatchCursor {
            tx,
            batch_id,
            parts,
            portal: None,
        })
    }

    /// The next page of at most `page_size` events; empty when the batch is exhausted.
    pub async fn next_page(&mut self, page_size: i32) -> Result<Vec<Event>, QueueError> {
        let page_size = page_size.max(1);
        loop {
            let portal = match &self.portal {
                Some(portal) => portal,
                None => {
                    let Some(sql) = self.parts.pop() else {
                        return Ok(Vec::new());
                    };
                    let portal =
                        self.tx.bind(sql.as_str(), &[]).await.with_context(|| {
                            format!("opening a cursor for batch {}", self.batch_id)
                        })?;
                    self.portal.insert(portal)
                }
            };
            let rows = self
                .tx
                .query_portal(portal, page_size)
                .await
                .with_context(|| format!("reading the events of batch {}", self.batch_id))?;
            if rows.len() < page_size as usize {
                self.portal = None;
            }
            if !rows.is_empty() {
                return Ok(rows.iter().map(Event::from_row).collect());
            }
        }
    }
}

/// State of every queue.
pub async fn queue_info(client: &impl GenericClient) -> Result<Vec<QueueInfo>, QueueError> {
    let rows = client
        .query(
            r#"select i.queue_name, i.queue_ntables, i.queue_cur_table,
                      extract(epoch from i.queue_rotation_period)::float8,
                      extract(epoch from now() - i.queue_switch_time)::float8,
                      i.last_tick_id, extract(epoch from i.ticker_lag)::float8, i.ev_new,
                      i.consumers,
                      extract(epoch from q."queue_ticker_idle_period")::float8,
                      extract(epoch from q."queue_ticker_max_lag")::float8,
                      q."queue_ticker_max_count"
                 from "ferry"."get_queue_info"() i
                 join "ferry"."queue" q on q."queue_name" = i.queue_name
                order by i.queue_name"#,
            &[],
        )
        .await
        .context("reading queue state")?;
    Ok(rows
        .iter()
        .map(|r| QueueInfo {
            name: r.get(0),
            ntables: r.get(1),
            cur_table: r.get(2),
            rotation_period_secs: r.get(3),
            since_rotation_secs: r.get(4),
            last_tick_id: r.get(5),
            ticker_lag_secs: r.get(6),
            events_since_tick: r.get(7),
            consumers: r.get(8),
            ticker_idle_period_secs: r.get(9),
            ticker_max_lag_secs: r.get(10),
            ticker_max_count: r.get(11),
        })
        .collect())
}

/// State of the consumers of `queue` (of all queues when `None`).
pub async fn consumer_info(
    client: &impl GenericClient,
    queue: Option<&str>,
) -> Result<Vec<ConsumerInfo>, QueueError> {
    let rows = client
        .query(
            r#"select queue_name, consumer_name, extract(epoch from lag)::float8,
                      extract(epoch from last_seen)::float8, last_tick, current_batch, pending_events, next_tick
                 from "ferry"."get_consumer_info"($1)"#,
            &[&queue],
        )
        .await
        .context("reading consumer state")?;
    Ok(rows
        .iter()
        .map(|r| ConsumerInfo {
            queue: r.get(0),
            consumer: r.get(1),
            lag_secs: r.get(2),
            last_seen_secs: r.get(3),
            last_tick: r.get(4),
            current_batch: r.get(5),
            pending_events: r.get(6),
            next_tick: r.get(7),
        })
        .collect())
}

/// Sets `rotation_period`, `ticker_idle_period`, `ticker_max_lag` (intervals, e.g.
/// `'10 minutes'`) or `ticker_max_count` (a number of events) of a queue.
pub async fn set_queue_config(
    client: &impl GenericClient,
    queue: &str,
    param: &str,
    value: &str,
) -> Result<(), QueueError> {
    client
        .query_one(
            r#"select "ferry"."set_queue_config"($1, $2, $3)"#,
            &[&queue, &param, &value],
        )
        .await
        .with_context(|| format!("setting {param} of queue \"{queue}\""))?;
    Ok(())
}

/// Rotates the queue's event tables if due and safe; `true` when it rotated.
pub async fn maint_rotate_tables(
    client: &impl GenericClient,
    queue: &str,
) -> Result<bool, QueueError> {
    let row = client
        .query_one(r#"select "ferry"."maint_rotate_tables"($1)"#, &[&queue])
        .await
        .with_context(|| format!("rotating the event tables of queue \"{queue}\""))?;
    Ok(row.get::<_, i32>(0) == 1)
}

/// Rotates the event tables of `queue` when due, in a transaction of its own
/// (`before_commit` runs just before its commit), and then ticks the queue, so consumers pass
/// the switch at once instead of at the next idle tick. (The tick must come after the
/// rotation's commit: a tick's snapshot inside the rotating transaction would not count the
/// switch as passed.) Returns the new tick when it rotated.
pub async fn rotate_and_tick(
    client: &mut tokio_postgres::Client,
    queue: &str,
    before_commit: impl FnOnce(),
) -> Result<Option<i64>, QueueError> {
    let tx = client
        .transaction()
        .await
        .with_context(|| format!("starting the rotation of queue \"{queue}\""))?;
    if !maint_rotate_tables(&tx, queue).await? {
        return Ok(None);
    }
    before_commit();
    tx.commit()
        .await
        .with_context(|| format!("committing the rotation of queue \"{queue}\""))?;
    Ok(Some(tick(client, queue).await?))
}

/// Puts due retried events back into their queues; returns how many.
pub async fn maint_retry_events(client: &impl GenericClient) -> Result<i32, QueueError> {
    let row = client
        .query_one(r#"select "ferry"."maint_retry_events"()"#, &[])
        .await
        .context("moving due retried events back")?;
    Ok(row.get(0))
}

/// Deletes the queue's ticks that no consumer needs; returns how many.
pub async fn maint_tick_cleanup(
    client: &impl GenericClient,
    queue: &str,
) -> Result<i32, QueueError> {
    let row = client
        .query_one(r#"select "ferry"."maint_tick_cleanup"($1)"#, &[&queue])
        .await
        .with_context(|| format!("cleaning up the ticks of queue \"{queue}\""))?;
    Ok(row.get(0))
}

/// The txid snapshot (text form `xmin:xmax:xip,...`) of a queue's tick; `None` when the tick
/// is gone or never existed.
pub async fn tick_snapshot(
    client: &impl GenericClient,
    queue: &str,
    tick_id: i64,
) -> Result<Option<String>, QueueError> {
    let row = client
        .query_typed_opt(
            r#"select t."tick_snapshot"::text from "ferry"."tick" t
                 join "ferry"."queue" q on q."queue_id" = t."tick_queue"
                where q."queue_name" = $1 and t."tick_id" = $2"#,
            &[(&queue, Type::TEXT), (&tick_id, Type::INT8)],
        )
        .await
        .with_context(|| format!("reading tick {tick_id} of queue \"{queue}\""))?;
    Ok(row.map(|r| r.get(0)))
}

#[cfg(test)]
mod tests {
    use super::TickNotice;

    #[test]
    fn a_tick_notice_names_its_tick_and_queue() {
        assert_eq!(
            TickNotice::parse("42:orders:eu"),
            Some(TickNotice {
                tick_id: 42,
                queue: "orders:eu"
            })
        );
        assert_eq!(TickNotice::parse("orders"), None);
        assert_eq!(TickNotice::parse("x:orders"), None);
        assert_eq!(TickNotice::parse(""), None);
    }
}
