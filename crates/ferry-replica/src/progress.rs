//! Reporting how far a running copy has got: to replay's metrics at once, and to the
//! subscriber's record (`ferry.subscriber_copy_progress`, read by `status` and `subscriber
//! tables`) twice a second, from a session of its own: the copy's transaction shows
//! nothing until it commits. Reporting is best effort: a failure is logged at debug level and
//! never disturbs the copy.

use std::time::{Duration, Instant};

use ferry_connect::{ConnInfo, Session};
use ferry_daemon::metrics::Gauge;

use crate::names::RelName;
use crate::session::open_session;
use crate::store;

/// How often the subscriber's record is written.
const RECORD_EVERY: Duration = Duration::from_millis(500);

/// The gauges of the copy in progress (zero between copies).
#[derive(Clone)]
pub struct CopyGauges {
    /// Rows copied so far.
    pub rows_done: Gauge,
    /// Bytes (COPY text) copied so far.
    pub bytes_done: Gauge,
    /// Rows the provider's statistics expect.
    pub rows_expected: Gauge,
}

/// Reports the progress of replay's copies, one at a time.
pub struct CopyReporter {
    subscriber: ConnInfo,
    application_name: String,
    session: Option<Session>,
    /// Whether connecting failed: no more attempts for this reporter.
    unavailable: bool,
    gauges: Option<CopyGauges>,
    started: Instant,
    last_recorded: Option<Instant>,
}

impl CopyReporter {
    /// A reporter writing to `subscriber` (connected at the first record) and `gauges`.
    pub fn new(
        subscriber: &ConnInfo,
        application_name: &str,
        gauges: Option<CopyGauges>,
    ) -> CopyReporter {
        CopyReporter {
            subscriber: subscriber.clone(),
            application_name: application_name.to_string(),
            session: None,
            unavailable: false,
            gauges,
            started: Instant::now(),
            last_recorded: None,
        }
    }

    /// A copy of `table` starts, expecting `rows_expected` rows.
    pub(crate) fn start(&mut self, rows_expected: Option<u64>) {
        self.started = Instant::now();
        self.last_recorded = None;
        if let Some(g) = &self.gauges {
            g.rows_done.set(0.0);
            g.bytes_done.set(0.0);
            g.rows_expected.set(rows_expected.unwrap_or(0) as f64);
        }
    }

    /// The copy of `table` has got to `rows` rows and `bytes` bytes.
    pub(crate) async fn report(
        &mut self,
        queue: &str,
        table: &RelName,
        rows: u64,
        bytes: u64,
        rows_expected: Option<u64>,
    ) {
        if let Some(g) = &self.gauges {
            g.rows_done.set(rows as f64);
            g.bytes_done.set(bytes as f64);
        }
        if self.unavailable
            || self
                .last_recorded
                .is_some_and(|at| at.elapsed() < RECORD_EVERY)
        {
            return;
        }
        self.last_recorded = Some(Instant::now());
        if self.session.as_ref().is_none_or(|s| s.is_closed()) {
            match open_session(&self.subscriber, "subscriber", &self.application_name).await {
                Ok(session) => self.session = Some(session),
                Err(e) => {
                    tracing::debug!(error = %ferry_daemon::logging::one_line(&e), "cannot record copy progress");
                    self.unavailable = true;
                    return;
                }
            }
        }
        let session = self.session.as_ref().expect("connected above");
        let recorded = store::record_copy_progress(
            session.client(),
            queue,
            table,
            rows,
            bytes,
            rows_expected,
            self.started.elapsed(),
        )
        .await;
        if let Err(e) = recorded {
            tracing::debug!(table = %table, error = %ferry_daemon::logging::one_line(&e), "cannot record copy progress");
        }
    }

    /// The copy ended (done or not): the gauges go back to zero.
    pub(crate) fn end(&mut self) {
        if let Some(g) = &self.gauges {
            g.rows_done.set(0.0);
            g.bytes_done.set(0.0);
            g.rows_expected.set(0.0);
        }
    }
}
