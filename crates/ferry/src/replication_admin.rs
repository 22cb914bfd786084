//! `ferry CONFIG provider ...` and `ferry CONFIG subscriber ...`: installing, registering
//! tables and sequences, and showing their state, against `[londiste]`'s databases.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_connect::Session;
use ferry_replica::subscriber::AddOptions;
use ferry_replica::{
    compare, execute, provider, subscriber, switchover, RelName, ReplaySettings, ReplicaError,
};

use crate::cli::{Capture, PointArgs, ProviderCommand, Selection, SubscriberCommand};
use crate::Failure;

/// The open connections a command needs.
struct Sides {
    settings: ReplaySettings,
    provider: Session,
    subscriber: Option<Session>,
}

impl Sides {
    fn subscriber(&self) -> &Session {
        self.subscriber.as_ref().expect("subscriber connected")
    }
}

/// Connects as `[londiste]` of `config` says (the subscriber only if asked) and runs `work`.
fn with_sides<T, F, Fut>(config: &Path, with_subscriber: bool, work: F) -> Result<T, Failure>
where
    F: FnOnce(Sides) -> Fut,
    Fut: Future<Output = Result<T, ReplicaError>>,
{
    with_settings(config, |settings| async move {
        let name = format!("ferry admin {}", settings.job_name);
        let (provider, subscriber) = if with_subscriber {
            // the provider where a switchover or failover moved it, if it did
            let sides = ferry_replica::session::open_sides(
                &settings.provider,
                &settings.subscriber,
                &settings.queue,
                &name,
            )
            .await?;
            (sides.provider, Some(sides.subscriber))
        } else {
            (
                ferry_replica::open_session(&settings.provider, "provider", &name).await?,
                None,
            )
        };
        work(Sides {
            settings,
            provider,
            subscriber,
        })
        .await
    })
}

/// Prints names one per line, or as a json array.
fn print_names(names: &[RelName], json: bool) {
    if json {
        let names: Vec<String> = names.iter().map(ToString::to_string).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&names).expect("strings serialize")
        );
    } else {
        for name in names {
            println!("{name}");
        }
    }
}

/// One line per item of a multi-item command; `Err` if any item failed (after doing the rest).
fn report_each(results: Vec<(String, Result<String, ReplicaError>)>) -> Result<(), Failure> {
    let mut failed = 0;
    for (item, result) in &results {
        match result {
            Ok(message) => println!("{message}"),
            Err(error) => {
                failed += 1;
                eprintln!("ferry: {item}: {}", ferry_daemon::logging::one_line(error));
            }
        }
    }
    if failed > 0 {
        Err(Failure::Runtime(format!(
            "{failed} of {} failed (see above)",
            results.len()
        )))
    } else {
        Ok(())
    }
}

/// `ferry CONFIG status [--json]` with a `[londiste]` config: what replay is doing, its lag,
/// the error holding it up, each table's state and since when.
pub fn status(config: &Path, json: bool) -> Result<(), Failure> {
    let (status, peers) = with_settings(config, |settings| async move {
        let name = format!("ferry admin {}", settings.job_name);
        let subscriber =
            ferry_replica::open_session(&settings.subscriber, "subscriber", &name).await?;
        let location =
            ferry_replica::store::provider_location(subscriber.client(), &settings.queue).await?;
        let provider_conninfo =
            ferry_replica::session::provider_for(&settings.provider, location.as_deref())?;
        // the provider may be gone: then what the subscribers have applied helps choose
        // which one to promote
        let provider = match tokio::time::timeout(
            Duration::from_secs(5),
            ferry_replica::open_session(&provider_conninfo, "provider", &name),
        )
        .await
        {
            Ok(Ok(session)) => Some(session),
            // settings that cannot work are the config's fault, not a provider gone
            Ok(Err(error)) if error.is_configuration() => return Err(error),
            Ok(Err(_)) | Err(_) => None,
        };
        let status = ferry_replica::status::status(
            provider.as_ref().map(|p| p.client()),
            subscriber.client(),
            &settings.queue,
            &settings.job_name,
        )
        .await?;
        let peers = if provider.is_none() {
            Some(
                ferry_replica::status::peer_positions(
                    subscriber.client(),
                    &settings.queue,
                    Duration::from_secs(5),
                )
                .await?,
            )
        } else {
            None
        };
        Ok((status, peers))
    })?;
    if json {
        let mut value = serde_json::to_value(&status).expect("plain data");
        value["provider_reachable"] = peers.is_none().into();
        if let Some(peers) = &peers {
            value["peers"] = serde_json::to_value(peers).expect("plain data");
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("plain data")
        );
        return Ok(());
    }
    if let Some(peers) = &peers {
        println!("provider: does not answer; `ferry CONFIG failover` promotes this subscriber, best the one that applied the most:");
        println!(
            "  this subscriber: applied tick {}",
            status
                .applied_tick
                .map_or_else(|| "none".to_string(), |t| t.to_string())
        );
        for peer in peers {
            match (&peer.applied_tick, &peer.error) {
                (_, Some(error)) => println!("  {}: cannot be read ({error})", peer.consumer),
                (tick, None) => println!(
                    "  {}: applied tick {}",
                    peer.consumer,
                    tick.map_or_else(|| "none".to_string(), |t| t.to_string())
                ),
            }
        }
    }
    let secs = |s: Option<f64>| s.map_or_else(|| "-".to_string(), |s| format!("{s:.1} s"));
    println!(
        "queue {}, consumer {}: {}",
        status.queue, status.consumer, status.state
    );
    println!(
        "  lag {}, {} events pending, last asked for a batch {} ago",
        secs(status.lag_secs),
        status
            .pending_events
            .map_or_else(|| "-".to_string(), |n| n.to_string()),
        secs(status.last_seen_secs)
    );
    println!(
        "  applied {}, {} ago",
        status
            .applied_tick
            .map_or_else(|| "nothing yet".to_string(), |t| format!("tick {t}")),
        secs(Some(status.applied_secs_ago))
    );
    if let Some(location) = &status.provider_moved_to {
        println!("  provider moved to {location} (a switchover or failover; the config's provider_db is not used)");
    }
    match &status.last_error {
        Some(error) => println!(
            "  last error ({} ago): {error}",
            secs(status.last_error_secs_ago)
        ),
        None => println!("  last error: none"),
    }
    println!("Table State Since");
    for t in &status.tables {
        match &t.copy {
            Some(copy) => println!(
                "{} {} {} ({copy})",
                t.table,
                t.state,
                secs(Some(t.since_secs))
            ),
            None => println!("{} {} {}", t.table, t.state, secs(Some(t.since_secs))),
        }
    }
    Ok(())
}

/// `ferry CONFIG wait-sync [--timeout SECONDS]`.
pub fn wait_sync(config: &Path, timeout: f64) -> Result<(), Failure> {
    if !(timeout.is_finite() && timeout >= 0.0) {
        return Err(Failure::Usage(format!(
            "--timeout {timeout}: give a number of seconds"
        )));
    }
    let state = with_sides(config, true, |s| async move {
        let (sub, prov, queue) = (
            s.subscriber().client(),
            s.provider.client(),
            &s.settings.queue,
        );
        provider::require_installed(prov).await?;
        subscriber::require_installed(sub, queue).await?;
        ferry_replica::sync::wait_sync(prov, sub, queue, None, Duration::from_secs_f64(timeout))
            .await
    })?;
    println!(
        "in sync: every table ok, tick {} applied (everything committed before the wait is in tick {})",
        state.applied_tick.unwrap_or_default(),
        state.target_tick
    );
    Ok(())
}

/// `ferry CONFIG pause` (`paused`) / `ferry CONFIG resume`: replay of the queue on this
/// subscriber stops (or goes on) applying, keeping its position; a running replay notices
/// within its `loop_delay`.
pub fn pause(config: &Path, paused: bool) -> Result<(), Failure> {
    with_sides(config, true, |s| async move {
        let (sub, queue) = (s.subscriber().client(), &s.settings.queue);
        subscriber::require_installed(sub, queue).await?;
        ferry_replica::store::set_paused(sub, queue, paused).await
    })?;
    println!(
        "replay {}",
        if paused {
            "paused: nothing is applied until `resume` (the position is kept)"
        } else {
            "resumed"
        }
    );
    Ok(())
}

/// The tables of a compare or repair.
fn compared_tables(selection: Selection) -> compare::Tables {
    if selection.all {
        compare::Tables::All
    } else {
        compare::Tables::Named(selection.names)
    }
}

/// Checks `--lock-timeout` and `--timeout`.
fn point_options(point: PointArgs) -> Result<compare::PointOptions, Failure> {
    if !(point.timeout.is_finite() && point.timeout >= 0.0) {
        return Err(Failure::Usage(format!(
            "--timeout {}: give a number of seconds",
            point.timeout
        )));
    }
    if point.lock_timeout == 0 {
        return Err(Failure::Usage(
            "--lock-timeout 0 would let writers wait forever: give milliseconds".into(),
        ));
    }
    Ok(compare::PointOptions {
        lock_timeout: Duration::from_millis(point.lock_timeout),
        wait: Duration::from_secs_f64(point.timeout),
    })
}

/// A runtime for one command.
fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(&e))
}

/// The failure for `error`: a usage error when the configuration is at fault.
fn failure(error: &ReplicaError) -> Failure {
    if error.is_configuration() {
        Failure::usage(error)
    } else {
        Failure::runtime(error)
    }
}

/// Runs `work` with `[londiste]`'s settings, on a runtime of its own.
fn with_settings<T, F, Fut>(config: &Path, work: F) -> Result<T, Failure>
where
    F: FnOnce(ReplaySettings) -> Fut,
    Fut: Future<Output = Result<T, ReplicaError>>,
{
    let (_, settings, warnings) = crate::settings::replication(config)?;
    crate::settings::print_warnings(&warnings);
    runtime()?.block_on(work(settings)).map_err(|e| failure(&e))
}

/// `ferry CONFIG compare [TABLE... | --all] [--count-only]`: exit 1 on a difference.
pub fn compare(
    config: &Path,
    selection: Selection,
    count_only: bool,
    point: PointArgs,
    json: bool,
) -> Result<(), Failure> {
    let options = point_options(point)?;
    let tables = compared_tables(selection);
    let result = with_settings(config, |settings| async move {
        compare::compare(&settings, &tables, count_only, options).await
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).expect("plain data")
        );
    } else {
        println!(
            "compared at tick {} (provider tables locked {:.0} ms)",
            result.tick, result.lock_held_ms
        );
        for t in &result.tables {
            let sums = match (&t.provider_checksum, &t.subscriber_checksum) {
                (Some(p), Some(s)) => format!(" checksum {p} / {s}"),
                _ => String::new(),
            };
            println!(
                "{}: provider {} rows, subscriber {} rows{sums}: {}",
                t.table,
                t.provider_rows,
                t.subscriber_rows,
                if t.identical() {
                    "identical".to_string()
                } else if count_only {
                    "counts differ".to_string()
                } else {
                    format!("{} rows differ", t.rows_differ)
                }
            );
            for r in &t.ranges {
                println!(
                    "  keys {} .. {}: {} rows differ",
                    r.first, r.last, r.rows_differ
                );
            }
            if t.more_ranges > 0 {
                println!("  and {} more key ranges", t.more_ranges);
            }
        }
    }
    if result.identical() {
        Ok(())
    } else {
        Err(Failure::Runtime(
            "the sides differ (`ferry CONFIG repair TABLE...` lists the rows)".into(),
        ))
    }
}

/// `ferry CONFIG repair TABLE... [--apply]`: exit 1 if rows differ and were not fixed.
pub fn repair(
    config: &Path,
    selection: Selection,
    apply: bool,
    point: PointArgs,
    json: bool,
) -> Result<(), Failure> {
    let options = point_options(point)?;
    let tables = compared_tables(selection);
    let result = with_settings(config, |settings| async move {
        compare::repair(&settings, &tables, apply, options, |row| {
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&serde_json::json!({
                        "table": row.table.to_string(),
                        "key": row.key,
                        "difference": row.difference,
                    }))
                    .expect("plain data")
                );
            } else {
                println!("{} {} {}", row.table, row.key, row.difference.name());
            }
        })
        .await
    })?;
    let differ: u64 = result
        .tables
        .iter()
        .map(|t| t.missing + t.extra + t.different)
        .sum();
    let summary = format!(
        "at tick {} (provider tables locked {:.0} ms): {}",
        result.tick,
        result.lock_held_ms,
        result
            .tables
            .iter()
            .map(|t| format!(
                "{} {} missing, {} extra, {} different",
                t.table, t.missing, t.extra, t.different
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    if json {
        println!("{}", serde_json::to_string(&result).expect("plain data"));
    } else {
        println!("{summary}");
    }
    if differ == 0 {
        if !json {
            println!("no rows differ");
        }
        Ok(())
    } else if apply {
        if !json {
            println!("repaired {differ} rows on the subscriber");
        }
        Ok(())
    } else {
        Err(Failure::Runtime(format!(
            "{differ} rows differ; `--apply` fixes them on the subscriber"
        )))
    }
}

/// `ferry CONFIG execute FILE...`: each file on the provider and, through the queue, on every
/// subscriber; the first failure stops the rest.
pub fn execute(config: &Path, files: &[PathBuf], lock_timeout: u64) -> Result<(), Failure> {
    if lock_timeout == 0 {
        return Err(Failure::Usage(
            "--lock-timeout 0 would let writers wait forever: give milliseconds".into(),
        ));
    }
    let mut loaded = Vec::new();
    for path in files {
        let sql = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .ok_or_else(|| Failure::Usage(format!("{}: not a file", path.display())))?;
        loaded.push((name, sql));
    }
    with_sides(config, false, |mut s| async move {
        provider::require_installed(s.provider.client()).await?;
        for (name, sql) in &loaded {
            let done = execute::execute_on_provider(
                s.provider.client_mut(),
                &s.settings.queue,
                name,
                sql,
                Duration::from_millis(lock_timeout),
            )
            .await?;
            match done {
                execute::Executed::Now => println!(
                    "{name}: executed on the provider; each subscriber runs it at this point of the stream"
                ),
                execute::Executed::Before => {
                    println!("{name}: executed here before; not run again")
                }
            }
        }
        Ok(())
    })
}

/// `ferry CONFIG switchover`: stops the replay daemon of CONFIG, turns replication around,
/// and says what to run next.
pub fn switchover(
    config: &Path,
    lock_timeout: u64,
    timeout: f64,
    json: bool,
) -> Result<(), Failure> {
    if lock_timeout == 0 {
        return Err(Failure::Usage(
            "--lock-timeout 0 would let writers wait forever: give milliseconds".into(),
        ));
    }
    if !(timeout.is_finite() && timeout >= 0.0) {
        return Err(Failure::Usage(format!(
            "--timeout {timeout}: give a number of seconds"
        )));
    }
    let (_, settings, warnings) = crate::settings::replication(config)?;
    crate::settings::print_warnings(&warnings);
    let options = switchover::SwitchoverOptions {
        lock_timeout: Duration::from_millis(lock_timeout),
        timeout: Duration::from_secs_f64(timeout),
    };
    let runtime = runtime()?;
    let checked = runtime
        .block_on(switchover::prepare(&settings, options))
        .map_err(|e| failure(&e))?;
    // a replay daemon of CONFIG would apply batches beside the switchover's own: it stops
    // once the checks passed (a refused switchover changes nothing)
    let stopped = stop_replay(config)?;
    let report = runtime.block_on(checked.run()).map_err(|e| failure(&e))?;
    if !json {
        for line in &stopped {
            println!("{line}");
        }
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data")
        );
        return Ok(());
    }
    println!(
        "switched over: {} tables and {} sequences now replicate from {} to {}; writes were refused for {:.0} ms",
        report.tables,
        report.seqs,
        settings.subscriber.resolve().describe(),
        settings.provider.resolve().describe(),
        report.downtime_ms
    );
    println!(
        "  every subscriber applied everything up to the old provider's tick {}; the new provider's queue \"{}\" starts at tick {}",
        report.last_tick, settings.queue, report.start_tick
    );
    if !report.moved.is_empty() {
        println!(
            "  moved to the new provider with no copy (their replays reconnect by themselves): {}",
            report.moved.join(", ")
        );
    }
    println!("next:");
    println!(
        "  point the application (or pgpool's backend) at the new provider, which takes writes now"
    );
    println!("  run a ticker on the new provider: a [pgqadm] config with db = its connection string, `ferry TICKER.ini ticker -d`");
    println!(
        "  start replay into the old provider: {} with subscriber_db = the old provider and provider_db = the new one (same job_name and queue), `replay -d`",
        config.display()
    );
    println!("  the other subscribers' configs may keep their provider_db: their store records where the provider is now (`status` shows it)");
    Ok(())
}

/// Stops the replay daemon of `config`, if it names a pid file; what it said.
fn stop_replay(config: &Path) -> Result<Vec<String>, Failure> {
    let section = ferry_config::REPLICATION_SECTION;
    if crate::daemon::has_pidfile(config, section)? {
        crate::daemon::control_saying(config, Some(section), crate::daemon::Control::Stop)
    } else {
        Ok(Vec::new())
    }
}

/// `ferry CONFIG failover [--force]`.
pub fn failover(config: &Path, force: bool, json: bool) -> Result<(), Failure> {
    let (_, settings, warnings) = crate::settings::replication(config)?;
    crate::settings::print_warnings(&warnings);
    let options = ferry_replica::failover::FailoverOptions {
        force,
        lock_timeout: Duration::from_secs(5),
    };
    let runtime = runtime()?;
    let checked = runtime
        .block_on(ferry_replica::failover::prepare_failover(
            &settings, options,
        ))
        .map_err(|e| failure(&e))?;
    // its replay stops once the checks passed (a refused failover changes nothing)
    let stopped = stop_replay(config)?;
    let report = runtime
        .block_on(checked.run(|peer, row| {
            if !json {
                println!(
                    "  {peer}: {} {} {} (repaired)",
                    row.table,
                    row.key,
                    row.difference.name()
                );
            }
        }))
        .map_err(|e| failure(&e))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data")
        );
        return Ok(());
    }
    for line in stopped {
        println!("{line}");
    }
    println!(
        "failed over: this node captures {} tables and takes writes now",
        report.tables
    );
    println!(
        "  it had applied the old provider's tick {} ({:.1} s before): what the old provider committed after it may be lost; `rejoin` on the old provider, once it is back, writes it to a file",
        report
            .applied_tick
            .map_or_else(|| "none".to_string(), |t| t.to_string()),
        report.applied_secs_ago
    );
    for moved in &report.moved {
        let rows: u64 = moved
            .repaired
            .iter()
            .map(|t| t.missing + t.extra + t.different)
            .sum();
        println!(
            "  subscriber {} moved here ({} rows repaired; their replay reconnects by itself)",
            moved.consumer, rows
        );
    }
    for left in &report.left_behind {
        println!("  subscriber {left} could not be reached and was left behind");
    }
    println!(
        "next: point the application at this node; run a ticker on it ([pgqadm] db = this node)"
    );
    Ok(())
}

/// `ferry CONFIG rejoin --lost-file FILE`.
pub fn rejoin(
    config: &Path,
    lost_file: &Path,
    lock_timeout: u64,
    json: bool,
) -> Result<(), Failure> {
    if lock_timeout == 0 {
        return Err(Failure::Usage(
            "--lock-timeout 0 would let writers wait forever: give milliseconds".into(),
        ));
    }
    let stopped = stop_replay(config)?;
    let options = ferry_replica::failover::FailoverOptions {
        force: false,
        lock_timeout: Duration::from_millis(lock_timeout),
    };
    let file = lost_file.to_path_buf();
    let report = with_settings(config, |settings| async move {
        ferry_replica::failover::rejoin(&settings, &file, options).await
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("plain data")
        );
        return Ok(());
    }
    for line in stopped {
        println!("{line}");
    }
    let repaired: u64 = report
        .repaired
        .iter()
        .map(|t| t.missing + t.extra + t.different)
        .sum();
    println!(
        "rejoined as a subscriber from the new provider's tick {}: {} rows repaired, no copy",
        report.start_tick, repaired
    );
    println!(
        "  {} transactions ({} row changes) committed here never reached the new provider: written to {}, not applied anywhere",
        report.lost_transactions,
        report.lost_changes,
        lost_file.display()
    );
    println!("next: `ferry CONFIG replay -d`");
    Ok(())
}

/// `subscriber add --wait-sync`: waits until `tables` are ok and the subscriber has everything
/// committed before.
fn wait_for_tables(config: &Path, tables: Vec<RelName>, timeout: f64) -> Result<(), Failure> {
    if !(timeout.is_finite() && timeout >= 0.0) {
        return Err(Failure::Usage(format!(
            "--timeout {timeout}: give a number of seconds"
        )));
    }
    let state = with_sides(config, true, |s| async move {
        ferry_replica::sync::wait_sync(
            s.provider.client(),
            s.subscriber().client(),
            &s.settings.queue,
            Some(&tables),
            Duration::from_secs_f64(timeout),
        )
        .await
    })?;
    println!(
        "in sync: the tables added are ok, tick {} applied",
        state.applied_tick.unwrap_or_default()
    );
    Ok(())
}

/// `ferry CONFIG provider COMMAND ARGS`.
pub fn provider(config: &Path, command: ProviderCommand) -> Result<(), Failure> {
    match command {
        ProviderCommand::Install => {
            let done = with_sides(config, false, |mut s| async move {
                provider::install(s.provider.client_mut(), &s.settings.queue).await
            })?;
            println!(
                "provider installed (queue schema version {}, provider version {}); queue {}",
                done.queue.version,
                done.provider.version,
                if done.queue_created {
                    "created"
                } else {
                    "exists already"
                }
            );
            if done.partition_ddl_capture {
                println!("partitions attached, detached and created are captured (event trigger ferry_partition_ddl)");
            } else {
                println!("partitions attached or detached are not captured: as a superuser, run select ferry.provider_enable_partition_ddl_capture(); (README, \"Partitioned tables\")");
            }
            Ok(())
        }
        ProviderCommand::Add { ref selection, .. } | ProviderCommand::AddSeq(ref selection) => {
            let sequences = matches!(command, ProviderCommand::AddSeq(_));
            let capture = match command {
                ProviderCommand::Add { capture, .. } => capture.map(|c| match c {
                    Capture::Statement => provider::CaptureMode::Statement,
                    Capture::Row => provider::CaptureMode::Row,
                }),
                _ => None,
            };
            let Selection { all, names } = selection.clone();
            let results = with_sides(config, false, |s| async move {
                provider::require_installed(s.provider.client()).await?;
                let client = s.provider.client();
                let queue = &s.settings.queue;
                let names: Vec<String> = if all {
                    provider::candidates(client, sequences)
                        .await?
                        .iter()
                        .map(RelName::to_string)
                        .collect()
                } else {
                    names
                };
                let mut results = Vec::new();
                for name in names {
                    let result = match (sequences, capture) {
                        (true, _) => provider::add_seq(client, queue, &name)
                            .await
                            .map(|(rel, new)| (rel, new, None)),
                        (false, None) => provider::add_table(client, queue, &name)
                            .await
                            .map(|(rel, new)| (rel, new, None)),
                        (false, Some(mode)) => provider::capture_table(client, queue, &name, mode)
                            .await
                            .map(|(rel, new, mode)| (rel, new, Some(mode))),
                    };
                    results.push((
                        name,
                        result.map(|(rel, new, mode)| {
                            format!(
                                "{rel}: {}{}",
                                if new { "added" } else { "registered already" },
                                mode.map(|m| format!(", captured per {m}"))
                                    .unwrap_or_default()
                            )
                        }),
                    ));
                }
                // --all never leaves a table out silently
                if all && !sequences {
                    for (table, reason) in provider::skipped(client).await? {
                        results.push((
                            table.to_string(),
                            Ok(format!("{table}: skipped ({reason})")),
                        ));
                    }
                }
                Ok(results)
            })?;
            report_each(results)
        }
        ProviderCommand::Remove(ref names) | ProviderCommand::RemoveSeq(ref names) => {
            let sequences = matches!(command, ProviderCommand::RemoveSeq(_));
            let names = names.names.clone();
            let results = with_sides(config, false, |s| async move {
                provider::require_installed(s.provider.client()).await?;
                let mut results = Vec::new();
                for name in names {
                    let client = s.provider.client();
                    let result = if sequences {
                        provider::remove_seq(client, &s.settings.queue, &name).await
                    } else {
                        provider::remove_table(client, &s.settings.queue, &name).await
                    };
                    results.push((
                        name,
                        result.map(|(rel, gone)| {
                            format!(
                                "{rel}: {}",
                                if gone {
                                    "removed"
                                } else {
                                    "was not registered"
                                }
                            )
                        }),
                    ));
                }
                Ok(results)
            })?;
            report_each(results)
        }
        ProviderCommand::Tables(output) | ProviderCommand::Seqs(output) => {
            let sequences = matches!(command, ProviderCommand::Seqs(_));
            let names = with_sides(config, false, |s| async move {
                provider::require_installed(s.provider.client()).await?;
                if sequences {
                    provider::seqs(s.provider.client(), &s.settings.queue).await
                } else {
                    provider::tables(s.provider.client(), &s.settings.queue).await
                }
            })?;
            print_names(&names, output.json);
            Ok(())
        }
    }
}

/// `ferry CONFIG subscriber COMMAND ARGS`.
pub fn subscriber(config: &Path, command: SubscriberCommand) -> Result<(), Failure> {
    match command {
        SubscriberCommand::Install => {
            let done = with_sides(config, true, |mut s| async move {
                let subscriber = s.subscriber.as_mut().expect("subscriber connected");
                let done = subscriber::install(
                    subscriber.client_mut(),
                    s.provider.client(),
                    &s.settings.queue,
                    &s.settings.job_name,
                )
                .await?;
                // where this subscriber is, for switchover and failover
                provider::record_subscriber(
                    s.provider.client(),
                    &s.settings.queue,
                    &s.settings.job_name,
                    &s.settings.subscriber.location(),
                )
                .await?;
                Ok(done)
            })?;
            println!(
                "subscriber installed (version {}); consumer {}",
                done.subscriber.version,
                if done.consumer_registered {
                    "registered on the queue"
                } else {
                    "was registered already"
                }
            );
            for trigger in &done.copied_triggers_dropped {
                println!("dropped capture trigger {trigger}, copied from the provider's schema");
            }
            for statement in &done.copied_triggers_left {
                eprintln!(
                    "ferry: warning: a capture trigger copied from the provider's schema is left (the subscriber role does not own its table; replay is not affected, but writes there fail once the table is no longer replicated); as its owner run: {statement}"
                );
            }
            Ok(())
        }
        SubscriberCommand::Add { .. } | SubscriberCommand::AddSeq(_) => {
            let (sequences, Selection { all, names }, options, wait) = match command {
                SubscriberCommand::Add {
                    selection,
                    create,
                    skip_truncate,
                    wait_sync,
                    timeout,
                } => (
                    false,
                    selection,
                    AddOptions {
                        create,
                        skip_truncate,
                    },
                    wait_sync.then_some(timeout),
                ),
                SubscriberCommand::AddSeq(selection) => {
                    (true, selection, AddOptions::default(), None)
                }
                _ => unreachable!("matched above"),
            };
            let (results, tables) = with_sides(config, true, |s| async move {
                let (sub, prov, queue) = (
                    s.subscriber().client(),
                    s.provider.client(),
                    &s.settings.queue,
                );
                provider::require_installed(prov).await?;
                subscriber::require_installed(sub, queue).await?;
                let names: Vec<String> = if all {
                    let (tables, seqs) = subscriber::missing(sub, prov, queue).await?;
                    let wanted = if sequences { seqs } else { tables };
                    wanted.iter().map(RelName::to_string).collect()
                } else {
                    names
                };
                let mut results = Vec::new();
                let mut tables = Vec::new();
                for name in names {
                    let result = if sequences {
                        subscriber::add_seq(sub, prov, queue, &name).await
                    } else {
                        subscriber::add_table(sub, prov, queue, &name, options).await
                    };
                    if let Ok((rel, _)) = &result {
                        tables.push(rel.clone());
                    }
                    results.push((
                        name,
                        result.map(|(rel, new)| {
                            format!("{rel}: {}", if new { "added" } else { "added already" })
                        }),
                    ));
                }
                Ok((results, tables))
            })?;
            report_each(results)?;
            match wait {
                Some(timeout) => wait_for_tables(config, tables, timeout),
                None => Ok(()),
            }
        }
        SubscriberCommand::Remove(ref names)
        | SubscriberCommand::RemoveSeq(ref names)
        | SubscriberCommand::Resync(ref names) => {
            let names = names.names.clone();
            let results = with_sides(config, true, |s| async move {
                let (sub, queue) = (s.subscriber().client(), &s.settings.queue);
                subscriber::require_installed(sub, queue).await?;
                let mut results = Vec::new();
                for name in names {
                    let result = match &command {
                        SubscriberCommand::Remove(_) => subscriber::remove_table(sub, queue, &name)
                            .await
                            .map(|(rel, done)| (rel, done, "removed")),
                        SubscriberCommand::RemoveSeq(_) => {
                            subscriber::remove_seq(sub, queue, &name)
                                .await
                                .map(|(rel, done)| (rel, done, "removed"))
                        }
                        _ => subscriber::resync_table(sub, queue, &name)
                            .await
                            .map(|(rel, done)| (rel, done, "will be copied again")),
                    };
                    results.push((
                        name,
                        result.map(|(rel, done, what)| {
                            format!("{rel}: {}", if done { what } else { "was not added" })
                        }),
                    ));
                }
                Ok(results)
            })?;
            report_each(results)
        }
        SubscriberCommand::Tables(output) => {
            let states = with_sides(config, true, |s| async move {
                let (sub, prov, queue) = (
                    s.subscriber().client(),
                    s.provider.client(),
                    &s.settings.queue,
                );
                subscriber::require_installed(sub, queue).await?;
                subscriber::table_states(sub, prov, queue).await
            })?;
            if output.json {
                let rows: Vec<_> = states
                    .iter()
                    .map(|t| {
                        let mut row =
                            serde_json::json!({ "table": t.table.to_string(), "state": t.state });
                        if let Some(copy) = &t.copy {
                            row["copy"] = serde_json::to_value(copy).expect("plain data");
                        }
                        row
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).expect("plain data")
                );
            } else {
                println!("Table State");
                for t in &states {
                    match &t.copy {
                        Some(copy) => println!("{} {} ({copy})", t.table, t.state),
                        None => println!("{} {}", t.table, t.state),
                    }
                }
            }
            Ok(())
        }
        SubscriberCommand::Seqs(output) => {
            let seqs = with_sides(config, true, |s| async move {
                subscriber::require_installed(s.subscriber().client(), &s.settings.queue).await?;
                subscriber::seqs(s.subscriber().client(), &s.settings.queue).await
            })?;
            print_names(&seqs, output.json);
            Ok(())
        }
        SubscriberCommand::Missing(output) => {
            let (tables, seqs) = with_sides(config, true, |s| async move {
                let (sub, prov, queue) = (
                    s.subscriber().client(),
                    s.provider.client(),
                    &s.settings.queue,
                );
                subscriber::require_installed(sub, queue).await?;
                subscriber::missing(sub, prov, queue).await
            })?;
            if output.json {
                let doc = serde_json::json!({
                    "tables": tables.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "seqs": seqs.iter().map(ToString::to_string).collect::<Vec<_>>(),
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&doc).expect("plain data")
                );
            } else {
                for t in &tables {
                    println!("table {t}");
                }
                for s in &seqs {
                    println!("sequence {s}");
                }
            }
            Ok(())
        }
        SubscriberCommand::Check(output) => {
            let report = with_sides(config, true, |s| async move {
                let (sub, prov, queue) = (
                    s.subscriber().client(),
                    s.provider.client(),
                    &s.settings.queue,
                );
                subscriber::require_installed(sub, queue).await?;
                subscriber::check(sub, prov, queue).await
            })?;
            if output.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("strings")
                );
            } else {
                if report.problems.is_empty() {
                    println!("ok: every replicated table matches the provider");
                }
                for p in &report.problems {
                    println!("{p}");
                }
                for n in &report.notes {
                    println!("note: {n}");
                }
            }
            if report.problems.is_empty() {
                Ok(())
            } else {
                Err(Failure::Runtime(format!(
                    "{} problem(s) found",
                    report.problems.len()
                )))
            }
        }
    }
}
