//! One warning when trouble starts, one line when it ends; the attempts in between (and how
//! the trouble's message changes while it lasts) are debug lines only.

use std::time::Instant;

/// Whether a daemon's work is failing, and since when: it keeps retry logs to one warning per
/// outage.
#[derive(Debug, Default)]
pub struct Health {
    failing_since: Option<Instant>,
}

impl Health {
    /// Records a failed attempt; warns only if things were fine until now.
    pub fn problem(&mut self, message: &str) {
        if self.failing_since.is_some() {
            tracing::debug!(error = %message, "still failing; retrying");
        } else {
            tracing::warn!(error = %message, "retrying until it works");
            self.failing_since = Some(Instant::now());
        }
    }

    /// Records a success; logs the end of the trouble.
    pub fn ok(&mut self) {
        if let Some(since) = self.failing_since.take() {
            tracing::info!(
                after_secs = since.elapsed().as_secs_f64().round(),
                "working again"
            );
        }
    }
}
