//! `ferry CONFIG execute FILE...`: schema changes through the queue. The file's SQL runs on
//! the provider in one transaction with an `EXECUTE` event holding it (see
//! `"ferry"."provider_execute_start"` for the guarantees), and replay runs it on each
//! subscriber at exactly that place in the stream, in the batch's transaction. Each file runs
//! once per node: recorded on the provider and on every subscriber by name and contents.

use std::time::Duration;

use tokio_postgres::{Client, Transaction};

use crate::error::{ErrorKind, ReplicaError, ResultExt};
use crate::event::ExecuteEvent;
use crate::names::quote_literal;

/// What `execute` did with a file on the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executed {
    /// Ran now, and queued for the subscribers.
    Now,
    /// Ran here before with the same contents: nothing done.
    Before,
}

/// Runs `sql` (the file `file`) on the provider and queues it for `queue`'s subscribers, in
/// one transaction; waits at most `lock_timeout` for the locks on the queue's tables (writers
/// of those tables wait for the file to run). A file holding transaction control is refused
/// before anything runs; a file that fails rolls back, and nothing reaches any subscriber.
pub async fn execute_on_provider(
    client: &mut Client,
    queue: &str,
    file: &str,
    sql: &str,
    lock_timeout: Duration,
) -> Result<Executed, ReplicaError> {
    if let Some(statement) = transaction_control(sql) {
        return Err(ReplicaError::invalid_input(format!(
            "file \"{file}\" controls transactions ({statement}): execute runs each file in one transaction of its own; take that statement out"
        )));
    }
    // the locks in short attempts: writers hold their tables in any order, and a long wait
    // could deadlock with one of them (see switchover::guard)
    let deadline = std::time::Instant::now() + lock_timeout;
    let (tx, started) = loop {
        let tx = client
            .transaction()
            .await
            .context("starting the execute's transaction")?;
        tx.batch_execute(&format!(
            "set local lock_timeout = {}",
            crate::switchover::GUARD_ATTEMPT.as_millis()
        ))
        .await
        .context("setting the lock timeout")?;
        match tx
            .query_one(
                r#"select "ferry"."provider_execute_start"($1, $2, $3)"#,
                &[&queue, &file, &sql],
            )
            .await
        {
            Ok(row) => break (tx, row),
            Err(e)
                if crate::switchover::is_lock_conflict(&e)
                    && std::time::Instant::now() < deadline =>
            {
                drop(tx);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) if crate::switchover::is_lock_conflict(&e) => {
                return Err(ReplicaError::with_cause(
                    ErrorKind::TimedOut,
                    format!(
                        "could not lock the tables of queue \"{queue}\" within {} ms to run file \"{file}\": long transactions hold them (see pg_locks); try again, or with a longer --lock-timeout",
                        lock_timeout.as_millis()
                    ),
                    e,
                ))
            }
            Err(e) => {
                return Err(ReplicaError::with_cause(
                    ErrorKind::InvalidInput,
                    format!("file \"{file}\" cannot be executed"),
                    e,
                ))
            }
        }
    };
    if !started.get::<_, bool>(0) {
        return Ok(Executed::Before);
    }
    // the file's own statements wait for locks as the session would
    tx.batch_execute("set local lock_timeout to default")
        .await
        .context("resetting the lock timeout")?;
    tx.batch_execute(sql).await.map_err(|e| {
        ReplicaError::with_cause(
            ErrorKind::InvalidInput,
            format!("file \"{file}\" failed on the provider; nothing was applied anywhere"),
            e,
        )
    })?;
    tx.execute(
        r#"select "ferry"."provider_execute_finish"($1, $2, $3)"#,
        &[&queue, &file, &sql],
    )
    .await
    .map_err(|e| {
        ReplicaError::with_cause(
            ErrorKind::InvalidInput,
            format!("file \"{file}\" cannot be executed; nothing was applied anywhere"),
            e,
        )
    })?;
    tx.commit()
        .await
        .with_context(|| format!("committing file \"{file}\""))?;
    Ok(Executed::Now)
}

/// Runs the SQL of `event` on the subscriber, in the batch's transaction, unless this node ran
/// that file already (then `false`). A failure stops replay at this batch, naming the file.
pub(crate) async fn run_on_subscriber(
    stx: &Transaction<'_>,
    queue: &str,
    event: &ExecuteEvent<'_>,
) -> Result<bool, ReplicaError> {
    let recorded: Option<String> = stx
        .query_opt(
            r#"select "file_hash" from "ferry"."subscriber_execute"
                where "queue_name" = $1 and "file_name" = $2"#,
            &[&queue, &event.file],
        )
        .await
        .context("reading the files executed here")?
        .map(|row| row.get(0));
    match recorded {
        Some(hash) if hash == event.hash => {
            tracing::info!(
                file = event.file,
                "file executed here before; not run again"
            );
            return Ok(false);
        }
        Some(_) => {
            return Err(ReplicaError::schema_mismatch(format!(
                "file \"{}\" was executed on this subscriber with other contents than the provider's: make the subscriber match by hand, then record the provider's version: update ferry.subscriber_execute set file_hash = {} where queue_name = {} and file_name = {}",
                event.file,
                quote_literal(event.hash),
                quote_literal(queue),
                quote_literal(event.file)
            )));
        }
        None => {}
    }
    stx.batch_execute(event.sql).await.map_err(|e| {
        ReplicaError::with_cause(
            ErrorKind::SchemaMismatch,
            format!(
                "file \"{}\" (run through the queue, event {}) failed on the subscriber: make the subscriber able to run it and replay tries again; or, if the change is made here already, record it: insert into ferry.subscriber_execute (queue_name, file_name, file_hash) values ({}, {}, {})",
                event.file,
                event.id,
                quote_literal(queue),
                quote_literal(event.file),
                quote_literal(event.hash)
            ),
            e,
        )
    })?;
    stx.execute(
        r#"insert into "ferry"."subscriber_execute" ("queue_name", "file_name", "file_hash")
           values ($1, $2, $3)"#,
        &[&queue, &event.file, &event.hash],
    )
    .await
    .context("recording the file executed")?;
    tracing::info!(file = event.file, event = event.id, "file executed");
    Ok(true)
}

/// The first statement of `sql` that controls transactions (`BEGIN`, `COMMIT`, `ROLLBACK`,
/// `SAVEPOINT`, ...), if any: comments, quoted strings and identifiers, and dollar-quoted
/// bodies are skipped, so a function body holding `COMMIT` is no such statement.
pub fn transaction_control(sql: &str) -> Option<String> {
    const CONTROL: &[&str] = &[
        "begin",
        "commit",
        "rollback",
        "abort",
        "end",
        "savepoint",
        "release",
    ];
    for statement in statements(sql) {
        let words: Vec<String> = statement
            .split_whitespace()
            .take(2)
            .map(|w| w.trim_end_matches(';').to_ascii_lowercase())
            .collect();
        let first = words.first().map(String::as_str).unwrap_or("");
        let second = words.get(1).map(String::as_str).unwrap_or("");
        let controls = CONTROL.contains(&first)
            || (first == "start" && second == "transaction")
            || (first == "prepare" && second == "transaction");
        if controls {
            return Some(statement.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    None
}

/// The top-level statements of `sql` with comments removed (strings kept), split at `;`.
fn statements(sql: &str) -> Vec<String> {
    let chars: Vec<char> = sql.chars().collect();
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        match c {
            '-' if next == Some('-') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
                current.push(' ');
                continue;
            }
            '/' if next == Some('*') => {
                let mut depth = 0;
                while i < chars.len() {
                    if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                current.push(' ');
                continue;
            }
            '\'' | '"' => {
                // E'...' strings take backslash escapes
                let escapes =
                    c == '\'' && current.chars().last().is_some_and(|p| p == 'e' || p == 'E');
                current.push(c);
                i += 1;
                while i < chars.len() {
                    let d = chars[i];
                    current.push(d);
                    i += 1;
                    if escapes && d == '\\' {
                        if let Some(&e) = chars.get(i) {
                            current.push(e);
                            i += 1;
                        }
                    } else if d == c {
                        if chars.get(i) == Some(&c) {
                            current.push(c);
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
                continue;
            }
            '$' => {
                // $tag$ ... $tag$ (a tag is empty or an identifier; $1 is a parameter)
                let tag_end = chars[i + 1..]
                    .iter()
                    .position(|&d| !(d.is_alphanumeric() || d == '_'))
                    .map(|n| i + 1 + n);
                if let Some(end) = tag_end.filter(|&e| chars[e] == '$') {
                    let tag: String = chars[i..=end].iter().collect();
                    let starts_with_digit = chars.get(i + 1).is_some_and(|d| d.is_ascii_digit());
                    if !starts_with_digit {
                        let rest: String = chars[end + 1..].iter().collect();
                        let close = rest.find(&tag).map_or(rest.len(), |n| n + tag.len());
                        current.push_str(&tag);
                        current.push_str(&rest[..close]);
                        i = end + 1 + rest[..close].chars().count();
                        continue;
                    }
                }
            }
            ';' => {
                statements.push(std::mem::take(&mut current));
                i += 1;
                continue;
            }
            _ => {}
        }
        current.push(c);
        i += 1;
    }
    statements.push(current);
    statements
        .into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_control_is_found_at_the_top_level_only() {
        assert_eq!(
            transaction_control("alter table t add c int; COMMIT;"),
            Some("COMMIT".into())
        );
        assert_eq!(
            transaction_control("begin;\nalter table t add c int"),
            Some("begin".into())
        );
        assert_eq!(
            transaction_control("start   transaction isolation level serializable"),
            Some("start transaction isolation level serializable".into())
        );
        assert_eq!(
            transaction_control("savepoint a"),
            Some("savepoint a".into())
        );
        for harmless in [
            "alter table t add c int; create index on t (c)",
            "-- commit;\nalter table t add c int",
            "/* begin; /* nested */ commit; */ select 1",
            "insert into t values ('commit; rollback')",
            "insert into t values (E'it\\'s; commit')",
            "create function f() returns void language plpgsql as $$ begin commit; end $$",
            "create function f() returns void language plpgsql as $body$ begin; $x$ commit $x$ end $body$",
            "select $1::int; prepare q as select 1",
            "create table \"begin\" (id int)",
            "",
        ] {
            assert_eq!(transaction_control(harmless), None, "{harmless}");
        }
    }

    #[test]
    fn statements_split_at_top_level_semicolons() {
        assert_eq!(
            statements("a 'x;y'; b $$;$$ ; -- c;\n d"),
            ["a 'x;y'", "b $$;$$", "d"]
        );
    }
}
