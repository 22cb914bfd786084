//! One-shot queue commands against `[pgqadm] db`: install, status, create, drop, register,
//! unregister, config.

use std::future::Future;
use std::path::Path;

use ferry_connect::Session;
use ferry_queue::{ConsumerInfo, QueueError, QueueInfo};

use crate::Failure;

/// Connects to `[pgqadm] db` of `config` and runs `work` on a small runtime.
fn with_queue_db<T, F, Fut>(config: &Path, work: F) -> Result<T, Failure>
where
    F: FnOnce(Session) -> Fut,
    Fut: Future<Output = Result<T, QueueError>>,
{
    let (_, settings, warnings) = crate::settings::ticker(config)?;
    crate::settings::print_warnings(&warnings);
    let db = settings.db;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::runtime(&e))?;
    runtime.block_on(async {
        let session = ferry_connect::connect(&db, "ferry admin")
            .await
            .map_err(|e| {
                if e.is_configuration() {
                    Failure::usage(&e)
                } else {
                    Failure::runtime(&e)
                }
            })?;
        work(session).await.map_err(|e| {
            if e.is_invalid_value() {
                Failure::usage(&e)
            } else {
                Failure::runtime(&e)
            }
        })
    })
}

/// `ferry CONFIG install`.
pub fn install(config: &Path) -> Result<(), Failure> {
    let report = with_queue_db(config, |mut session| async move {
        ferry_queue::install(session.client_mut()).await
    })?;
    match report.previous_version {
        None => println!("queue schema installed (version {})", report.version),
        Some(old) if report.upgraded() => println!(
            "queue schema upgraded from version {old} to {}",
            report.version
        ),
        Some(_) => println!("queue schema is up to date (version {})", report.version),
    }
    Ok(())
}

/// `ferry CONFIG status [--json]`.
pub fn status(config: &Path, json: bool) -> Result<(), Failure> {
    let (queues, consumers): (Vec<QueueInfo>, Vec<ConsumerInfo>) =
        with_queue_db(config, |session| async move {
            let queues = ferry_queue::queue_info(session.client()).await?;
            let consumers = ferry_queue::consumer_info(session.client(), None).await?;
            Ok((queues, consumers))
        })?;
    if json {
        let doc = serde_json::json!({ "queues": queues, "consumers": consumers });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).expect("plain data serializes")
        );
        return Ok(());
    }
    if queues.is_empty() {
        println!("no queues");
    }
    for q in &queues {
        println!(
            "queue {}: last tick {} ({} ago), {} events not yet ticked, event table {} of {}, rotated {} ago (period {}), {} consumer(s); {}",
            q.name,
            q.last_tick_id.map(|t| t.to_string()).unwrap_or_else(|| "-".into()),
            q.ticker_lag_secs.map(human_secs).unwrap_or_else(|| "-".into()),
            q.events_since_tick.unwrap_or(0),
            q.cur_table,
            q.ntables,
            human_secs(q.since_rotation_secs),
            human_secs(q.rotation_period_secs),
            q.consumers,
            ticking(q)
        );
        for c in consumers.iter().filter(|c| c.queue == q.name) {
            println!(
                "  consumer {}: lag {}, last seen {} ago, {} events pending, {}",
                c.consumer,
                human_secs(c.lag_secs),
                human_secs(c.last_seen_secs),
                c.pending_events,
                c.current_batch
                    .map(|b| format!("batch {b} open"))
                    .unwrap_or_else(|| "no open batch".into())
            );
        }
    }
    Ok(())
}

/// When the ticker ticks `q`: its thresholds and idle period, in words.
fn ticking(q: &QueueInfo) -> String {
    let news = match (q.ticker_max_lag_secs > 0.0, q.ticker_max_count > 0) {
        (false, _) => "ticks at the first check that finds news".to_string(),
        (true, false) => format!(
            "news waits until the last tick is {} old",
            human_secs(q.ticker_max_lag_secs)
        ),
        (true, true) => format!(
            "news waits for {} events or until the last tick is {} old",
            q.ticker_max_count,
            human_secs(q.ticker_max_lag_secs)
        ),
    };
    format!(
        "{news}, and every {} without",
        human_secs(q.ticker_idle_period_secs)
    )
}

fn human_secs(secs: f64) -> String {
    if secs < 10.0 {
        format!("{secs:.1} s")
    } else if secs < 3600.0 {
        format!("{:.0} s", secs)
    } else {
        format!("{:.1} h", secs / 3600.0)
    }
}

/// `ferry CONFIG create QUEUE`.
pub fn create(config: &Path, queue: &str) -> Result<(), Failure> {
    let q = queue.to_string();
    let created = with_queue_db(config, |s| async move {
        ferry_queue::create_queue(s.client(), &q).await
    })?;
    println!(
        "queue {queue}: {}",
        if created { "created" } else { "exists already" }
    );
    Ok(())
}

/// `ferry CONFIG drop QUEUE [--force]`.
pub fn drop(config: &Path, queue: &str, force: bool) -> Result<(), Failure> {
    let q = queue.to_string();
    let dropped = with_queue_db(config, |s| async move {
        ferry_queue::drop_queue(s.client(), &q, force).await
    })?;
    println!(
        "queue {queue}: {}",
        if dropped { "dropped" } else { "does not exist" }
    );
    Ok(())
}

/// `ferry CONFIG register QUEUE CONSUMER`.
pub fn register(config: &Path, queue: &str, consumer: &str) -> Result<(), Failure> {
    let (q, c) = (queue.to_string(), consumer.to_string());
    let new = with_queue_db(config, |s| async move {
        ferry_queue::register_consumer(s.client(), &q, &c).await
    })?;
    println!(
        "consumer {consumer} on queue {queue}: {}",
        if new {
            "registered"
        } else {
            "registered already"
        }
    );
    Ok(())
}

/// `ferry CONFIG unregister QUEUE CONSUMER`.
pub fn unregister(config: &Path, queue: &str, consumer: &str) -> Result<(), Failure> {
    let (q, c) = (queue.to_string(), consumer.to_string());
    let gone = with_queue_db(config, |s| async move {
        ferry_queue::unregister_consumer(s.client(), &q, &c).await
    })?;
    println!(
        "consumer {consumer} on queue {queue}: {}",
        if gone {
            "unregistered"
        } else {
            "was not registered"
        }
    );
    Ok(())
}

/// `ferry CONFIG config QUEUE KEY=VALUE`.
pub fn set_config(config: &Path, queue: &str, key: &str, value: &str) -> Result<(), Failure> {
    let (q, k, v) = (queue.to_string(), key.to_string(), value.to_string());
    with_queue_db(config, |s| async move {
        ferry_queue::set_queue_config(s.client(), &q, &k, &v).await
    })?;
    println!("queue {queue}: {key} = {value}");
    Ok(())
}
