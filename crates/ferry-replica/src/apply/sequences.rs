//! Sequences in a batch: each subscriber sequence of the queue is moved up to the provider's
//! value (never down), in the batch's transaction.

use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::error::{ReplicaError, ResultExt};
use crate::provider::SeqValue;

/// Moves each subscriber sequence of `queue` (registered here and on the provider) up to the
/// provider's value, never down: one statement, whatever the number of sequences. A
/// sequence's position is the last value it handed out (or is about to: `last_value` minus
/// the increment while not yet called), compared in the provider's direction.
pub(crate) async fn sync_sequences(
    stx: &Transaction<'_>,
    queue: &str,
    provider_values: &[SeqValue],
) -> Result<(), ReplicaError> {
    if provider_values.is_empty() {
        return Ok(());
    }
    let schemas: Vec<&str> = provider_values
        .iter()
        .map(|v| v.seq.schema.as_str())
        .collect();
    let names: Vec<&str> = provider_values
        .iter()
        .map(|v| v.seq.name.as_str())
        .collect();
    let values: Vec<i64> = provider_values.iter().map(|v| v.last_value).collect();
    let called: Vec<bool> = provider_values.iter().map(|v| v.is_called).collect();
    let increments: Vec<i64> = provider_values.iter().map(|v| v.increment).collect();
    stx.query_typed(
        r#"select pg_catalog.setval(pg_catalog.format('%I.%I', p.nsp, p.rel)::regclass, p.val, p.called)
             from unnest($1::text[], $2::text[], $3::int8[], $4::bool[], $5::int8[])
                  as p(nsp, rel, val, called, inc)
             join "ferry"."subscriber_seq" r
               on r."queue_name" = $6 and r."seq_schema" = p.nsp and r."seq_name" = p.rel
             join pg_catalog.pg_sequences s on s.schemaname = p.nsp and s.sequencename = p.rel
            cross join lateral (select case when p.called then p.val else p.val - p.inc end as there,
                                       coalesce(s.last_value, s.start_value - p.inc) as here) pos
            where case when p.inc >= 0 then pos.there > pos.here else pos.there < pos.here end"#,
        &[
            (&schemas, Type::TEXT_ARRAY),
            (&names, Type::TEXT_ARRAY),
            (&values, Type::INT8_ARRAY),
            (&called, Type::BOOL_ARRAY),
            (&increments, Type::INT8_ARRAY),
            (&queue, Type::TEXT),
        ],
    )
    .await
    .context("moving the subscriber's sequences forward")?;
    Ok(())
}
