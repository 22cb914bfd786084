//! Sequences in a batch: each subscriber sequence of the queue is moved up to the provider's
//! value (never down), in the batch's transaction.

use tokio_postgres::Transaction;

use crate::error::{ReplicaError, ResultExt};
use crate::provider::SeqValue;
use crate::store;

/// Moves each subscriber sequence of `queue` up to the provider's value (never down).
pub(crate) async fn sync_sequences(
    stx: &Transaction<'_>,
    queue: &str,
    provider_values: &[SeqValue],
) -> Result<(), ReplicaError> {
    if provider_values.is_empty() {
        return Ok(());
    }
    for seq in store::seqs(stx, queue).await? {
        let Some(p) = provider_values.iter().find(|v| v.seq == seq) else {
            continue;
        };
        let row = stx
            .query_one(
                &format!("select last_value, is_called from {}", seq.quoted()),
                &[],
            )
            .await
            .with_context(|| format!("reading sequence {seq}"))?;
        let (last, called): (i64, bool) = (row.get(0), row.get(1));
        if is_behind(p, last, called) {
            stx.execute(
                "select setval($1::text::regclass, $2, $3)",
                &[&seq.quoted(), &p.last_value, &p.is_called],
            )
            .await
            .with_context(|| format!("moving sequence {seq} forward"))?;
        }
    }
    Ok(())
}

/// Whether the subscriber's sequence (`last`, `called`) is behind the provider's `p`: the
/// last value handed out (or about to be) on each side, compared in the sequence's direction.
fn is_behind(p: &SeqValue, last: i64, called: bool) -> bool {
    let effective = |value: i64, called: bool| if called { value } else { value - p.increment };
    if p.increment >= 0 {
        effective(p.last_value, p.is_called) > effective(last, called)
    } else {
        effective(p.last_value, p.is_called) < effective(last, called)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::RelName;

    fn provider(last_value: i64, is_called: bool, increment: i64) -> SeqValue {
        SeqValue {
            seq: RelName::new("public", "s"),
            last_value,
            is_called,
            increment,
        }
    }

    #[test]
    fn sequences_only_move_forward() {
        assert!(is_behind(&provider(10, true, 1), 5, true));
        assert!(!is_behind(&provider(10, true, 1), 10, true));
        assert!(!is_behind(&provider(10, true, 1), 12, true));
        // a fresh sequence (not called) at 1 has handed out nothing
        assert!(is_behind(&provider(1, true, 1), 1, false));
        assert!(!is_behind(&provider(1, false, 1), 1, false));
        // descending
        assert!(is_behind(&provider(-10, true, -1), -5, true));
        assert!(!is_behind(&provider(-10, true, -1), -12, true));
    }
}
