//! One log line when a problem starts (or changes), one when it ends; nothing per attempt.

use std::time::Instant;

/// The current problem, if any, and since when.
#[derive(Debug, Default)]
pub(crate) struct Health {
    problem: Option<(String, Instant)>,
}

impl Health {
    /// Records a failing attempt; logs only when this problem is new.
    pub(crate) fn problem(&mut self, message: &str) {
        match &self.problem {
            Some((current, _)) if current == message => {
                tracing::debug!(error = %message, "still failing");
            }
            Some((_, since)) => {
                tracing::warn!(error = %message, "retrying");
                self.problem = Some((message.to_string(), *since));
            }
            None => {
                tracing::warn!(error = %message, "retrying");
                self.problem = Some((message.to_string(), Instant::now()));
            }
        }
    }

    /// Records a success; logs the end of a problem.
    pub(crate) fn ok(&mut self) {
        if let Some((_, since)) = self.problem.take() {
            tracing::info!(
                after_secs = since.elapsed().as_secs_f64().round(),
                "working again"
            );
        }
    }
}
