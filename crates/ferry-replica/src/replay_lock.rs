//! One replay per queue and subscriber database at a time.
//!
//! Two replays of one queue into one subscriber (the config copied to a second host, a daemon
//! left behind by a pid file removed by hand) would not lose or double a change, since every
//! batch takes the subscriber's position row lock, but they would race everywhere else: each
//! would finish the other's batches, start the same copies, and read the position and the
//! queue's record of the consumer at different moments and take the other's progress for a
//! subscriber restored from a backup. So replay holds a session-level advisory lock on the
//! subscriber for as long as its session lives; another replay waits for it (a standby that
//! takes over when the first stops or its session ends).

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::{ReplicaError, ResultExt};

/// The first key of replay's advisory lock (`fery` in ASCII); the second is the queue name's
/// `hashtext`. A two-key lock never meets one taken with a single bigint key (switchover's).
pub const REPLAY_LOCK_CLASS: i32 = 0x6665_7279;

/// How long a lock found held is given before it is tried again, once.
const SECOND_TRY_AFTER: Duration = Duration::from_millis(200);

/// Takes the replay lock of `queue` on the subscriber session `client`, for the session's
/// life. `None` when taken (or already held by this session); else who holds it, as a
/// phrase: "pid 123, ferry replay job, from 10.0.0.5, connected since ...".
pub async fn take(client: &Client, queue: &str) -> Result<Option<String>, ReplicaError> {
    // a second try after a moment: replay's own session of before a reconnect may still be
    // ending on the server, holding the lock
    for attempt in 0..2 {
        if attempt > 0 {
            tokio::time::sleep(SECOND_TRY_AFTER).await;
        }
        let taken: bool = client
            .query_one(
                "select pg_catalog.pg_try_advisory_lock($1, pg_catalog.hashtext($2))",
                &[&REPLAY_LOCK_CLASS, &queue],
            )
            .await
            .context("taking the replay lock of the queue on the subscriber")?
            .get(0);
        if taken {
            return Ok(None);
        }
    }
    // pg_locks shows the two keys as oids: the hash's bits as an unsigned 32-bit number
    let holder: Option<String> = client
        .query_opt(
            r#"select pg_catalog.concat_ws(', ', 'pid ' operator(pg_catalog.||) a.pid,
                      nullif(a.application_name, ''),
                      'from ' operator(pg_catalog.||) coalesce(pg_catalog.host(a.client_addr), 'a local socket'),
                      'connected since ' operator(pg_catalog.||) pg_catalog.date_trunc('second', a.backend_start))
                 from pg_catalog.pg_locks l
                 join pg_catalog.pg_stat_activity a on a.pid operator(pg_catalog.=) l.pid
                where l.locktype operator(pg_catalog.=) 'advisory' and l.granted
                  and l.database operator(pg_catalog.=) (select oid from pg_catalog.pg_database
                                                          where datname operator(pg_catalog.=) pg_catalog.current_database())
                  and l.objsubid operator(pg_catalog.=) 2
                  and l.classid operator(pg_catalog.=) $1::pg_catalog.int8::pg_catalog.oid
                  and l.objid operator(pg_catalog.=) (pg_catalog.hashtext($2)::pg_catalog.int8
                                                      operator(pg_catalog.&) 4294967295)::pg_catalog.oid
                limit 1"#,
            &[&i64::from(REPLAY_LOCK_CLASS), &queue],
        )
        .await
        .context("looking up who holds the replay lock of the queue")?
        .map(|row| row.get(0));
    // it may have been released in between: the next attempt takes it
    Ok(Some(
        holder.unwrap_or_else(|| "a session that just ended".into()),
    ))
}
