//! Moving a batch's rows without waiting on round trips: chunks of events read from the
//! provider bounded by count and bytes, and set-wise statements sent to the subscriber
//! pipelined, their results read later.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::Bytes;
use ferry_queue::{BatchCursor, Event};
use futures_util::SinkExt;
use tokio_postgres::{Statement, Transaction};

use crate::columns::copy_text;
use crate::error::{ReplicaError, ResultExt};
use crate::names::RelName;

/// Events applied together (and reduced set-wise) at most.
pub(crate) const CHUNK_EVENTS: usize = 5000;
/// Event text held per chunk at most, so that replay's memory stays bounded however wide the
/// rows are (two chunks are alive at a time: one applying, one being read).
const CHUNK_BYTES: usize = 8 << 20;
/// Rows asked for by the first fetch of a batch, before their size is known.
const FIRST_FETCH: i32 = 100;

/// What a set-wise statement does to its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SetOp {
    /// Deletes by primary key: each row must be found.
    Deletes,
    /// Updates by primary key: each row must be found.
    Updates,
    /// Inserts.
    Inserts,
}

impl std::fmt::Display for SetOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SetOp::Deletes => "deletes",
            SetOp::Updates => "updates",
            SetOp::Inserts => "inserts",
        })
    }
}

/// How a set-wise statement takes its rows.
pub(crate) enum SetSql {
    /// A prepared statement reading one text array per parameter.
    Prepared(Statement),
    /// `COPY ... FROM STDIN` (inserts only), the same arrays sent as `COPY` text.
    CopyIn(String),
}

/// One set-wise statement with its rows.
pub(crate) struct SetStatement {
    pub sql: SetSql,
    /// the rows as text arrays, one per parameter (see [`crate::columns::column_arrays`])
    pub arrays: Vec<Vec<Option<String>>>,
    pub rows: usize,
    pub op: SetOp,
    pub table: RelName,
}

/// Set-wise statements sent to the subscriber, their results not yet read.
pub(crate) type InFlight<'a> = Pin<Box<dyn Future<Output = Result<(), ReplicaError>> + Send + 'a>>;

/// Sends `statements` pipelined (the server runs them in order) and returns their results
/// to come: every statement is on its way when this returns, so whatever the caller sends
/// next runs after them. The results check that deletes and updates touched every row.
pub(crate) async fn send_set_statements<'a>(
    stx: &'a Transaction<'_>,
    statements: Vec<SetStatement>,
) -> InFlight<'a> {
    let runs = statements.into_iter().map(move |s| async move {
        let what = || format!("applying {} {} of {} set-wise", s.rows, s.op, s.table);
        let changed = match &s.sql {
            SetSql::Prepared(statement) => {
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = s
                    .arrays
                    .iter()
                    .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                stx.execute(statement, &params).await.with_context(what)?
            }
            SetSql::CopyIn(copy) => {
                // the connection sends nothing queued after the COPY before its data is done
                let sink = stx.copy_in(copy.as_str()).await.with_context(what)?;
                futures_util::pin_mut!(sink);
                sink.send(Bytes::from(copy_text(&s.arrays)))
                    .await
                    .with_context(what)?;
                let copied = sink.finish().await.with_context(what)?;
                tracing::debug!(table = %s.table, rows = copied, "inserts copied in");
                copied
            }
        };
        if s.op != SetOp::Inserts && changed != s.rows as u64 {
            return Err(ReplicaError::row_refused(format!(
                "{} of {}: {changed} of {} rows found on the subscriber",
                s.op, s.table, s.rows
            ))
            .about(&s.table));
        }
        Ok(())
    });
    let mut results: InFlight<'a> = Box::pin(async move {
        futures_util::future::try_join_all(runs).await?;
        Ok(())
    });
    // the first poll sends every statement (tokio-postgres sends a query when first polled)
    if let Poll::Ready(done) = futures_util::poll!(&mut results) {
        return Box::pin(std::future::ready(done));
    }
    results
}

/// Runs `statements` pipelined and waits for their results (see [`send_set_statements`]).
pub(crate) async fn run_set_statements(
    stx: &Transaction<'_>,
    statements: Vec<SetStatement>,
) -> Result<(), ReplicaError> {
    send_set_statements(stx, statements).await.await
}

/// Reads a batch's events in chunks bounded by count and by bytes.
pub(crate) struct ChunkReader<'t, 'c> {
    cursor: BatchCursor<'t, 'c>,
    /// rows asked for per fetch, adapted to the rows' size
    fetch: i32,
}

impl<'t, 'c> ChunkReader<'t, 'c> {
    /// Reads batch events through `cursor`.
    pub(crate) fn new(cursor: BatchCursor<'t, 'c>) -> Self {
        ChunkReader {
            cursor,
            fetch: FIRST_FETCH,
        }
    }

    /// The next chunk: at most [`CHUNK_EVENTS`] events and about [`CHUNK_BYTES`] of text;
    /// empty when the batch is done.
    pub(crate) async fn next_chunk(&mut self) -> Result<Vec<Event>, ReplicaError> {
        let mut chunk = Vec::new();
        let mut bytes = 0;
        while chunk.len() < CHUNK_EVENTS && bytes < CHUNK_BYTES {
            let want = self.fetch.min((CHUNK_EVENTS - chunk.len()) as i32);
            let page = self.cursor.next_page(want).await?;
            if page.is_empty() {
                break;
            }
            let page_bytes: usize = page.iter().map(event_bytes).sum();
            bytes += page_bytes;
            // each later fetch aims at a quarter of the budget
            let average = (page_bytes / page.len()).max(1);
            self.fetch = (CHUNK_BYTES / 4 / average).clamp(1, CHUNK_EVENTS) as i32;
            chunk.extend(page);
        }
        Ok(chunk)
    }
}

/// The text an event holds.
fn event_bytes(event: &Event) -> usize {
    event.data.as_ref().map_or(0, String::len)
        + event.extra.iter().flatten().map(String::len).sum::<usize>()
        + 64
}
