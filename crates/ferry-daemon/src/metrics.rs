//! Metrics in Prometheus' text format, served on `/metrics` when a daemon's config names
//! `metrics_address` (or `metrics_port`). A daemon registers its counters and gauges once and
//! updates them as it works; serving reads them without locking the work.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::Shutdown;

/// The most of a request read before answering (a request line and a few headers).
const MAX_REQUEST: usize = 8 << 10;

/// A daemon's metrics. Cheap to clone; clones share the values.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    families: Arc<Mutex<Vec<Family>>>,
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    value: Arc<AtomicU64>,
}

/// A value that only goes up (events applied, errors).
#[derive(Debug, Clone)]
pub struct Counter(Arc<AtomicU64>);

/// A value that goes up and down (lag, pending events).
#[derive(Debug, Clone)]
pub struct Gauge(Arc<AtomicU64>);

impl Metrics {
    /// Registers counter `name` (with `_total` at its end, as Prometheus names counters).
    pub fn counter(&self, name: &'static str, help: &'static str) -> Counter {
        Counter(self.register(name, help, "counter"))
    }

    /// Registers gauge `name`.
    pub fn gauge(&self, name: &'static str, help: &'static str) -> Gauge {
        Gauge(self.register(name, help, "gauge"))
    }

    fn register(
        &self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
    ) -> Arc<AtomicU64> {
        let value = Arc::new(AtomicU64::new(0f64.to_bits()));
        self.families
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Family {
                name,
                help,
                kind,
                value: value.clone(),
            });
        value
    }

    /// Every metric in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        for f in families.iter() {
            let value = f64::from_bits(f.value.load(Ordering::Relaxed));
            text.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n",
                name = f.name,
                help = f.help,
                kind = f.kind
            ));
        }
        text
    }
}

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: f64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + n).to_bits())
            });
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1.0);
    }
}

impl Gauge {
    /// Sets the value.
    pub fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// Binds `address` for [`serve`]: done before the daemon starts working, so a port in use is
/// a configuration error at once.
pub async fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(address).await
}

/// Answers `GET /metrics` on `listener` with `metrics` (anything else: 404) until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Metrics, mut shutdown: Shutdown) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.wait() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buffer = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < MAX_REQUEST {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let line = String::from_utf8_lossy(&request);
            let target = line.split_whitespace().take(2).collect::<Vec<_>>();
            let (status, content_type, body) = if target == ["GET", "/metrics"] {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    metrics.render(),
                )
            } else {
                (
                    "404 Not Found",
                    "text/plain; charset=utf-8",
                    "only /metrics is here\n".to_string(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_as_prometheus_text() {
        let metrics = Metrics::default();
        let applied = metrics.counter("ferry_replay_events_applied_total", "Events applied.");
        let lag = metrics.gauge("ferry_replay_lag_seconds", "Lag.");
        applied.add(5.0);
        applied.inc();
        lag.set(0.25);
        assert_eq!(
            metrics.render(),
            "# HELP ferry_replay_events_applied_total Events applied.\n\
             # TYPE ferry_replay_events_applied_total counter\n\
             ferry_replay_events_applied_total 6\n\
             # HELP ferry_replay_lag_seconds Lag.\n\
             # TYPE ferry_replay_lag_seconds gauge\n\
             ferry_replay_lag_seconds 0.25\n"
        );
    }
}
