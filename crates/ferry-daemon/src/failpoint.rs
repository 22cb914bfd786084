//! Named points where a test can have the process SIGKILLed, to prove that a crash exactly
//! there loses nothing. Compiled in only with the `failpoints` feature, which only the test
//! build enables (the `ferry` package's dev-dependencies); in a release build a failpoint is
//! an empty inline function.
//!
//! With the feature, `FERRY_FAILPOINTS` (a comma-separated list of names) arms points. An
//! armed point, when reached, appends its name and a newline to the file named by
//! `FERRY_FAILPOINT_HITS` (if set; written and synced before anything else, so a test can
//! tell the kill happened there) and SIGKILLs the process: no destructor, no flush, no
//! rollback sent, as with a real crash.

/// Replay, after a batch's changes and position are written to the subscriber, before its
/// commit.
pub const REPLAY_BEFORE_SUBSCRIBER_COMMIT: &str = "replay-before-subscriber-commit";
/// Replay, after the subscriber committed a batch, before it is finished on the provider.
pub const REPLAY_BEFORE_FINISH: &str = "replay-before-finish";
/// Replay, in the middle of a table's copy (after its first block reached the subscriber).
pub const REPLAY_DURING_COPY: &str = "replay-during-copy";
/// The ticker, after rotating a queue's event tables, before that transaction commits.
pub const TICKER_DURING_ROTATION: &str = "ticker-during-rotation";

/// Kills the process here when `name` is armed (see the module documentation).
#[cfg(feature = "failpoints")]
pub fn failpoint(name: &str) {
    use std::io::Write;
    use std::sync::OnceLock;

    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var("FERRY_FAILPOINTS")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    if !armed.iter().any(|a| a == name) {
        return;
    }
    if let Some(path) = std::env::var_os("FERRY_FAILPOINT_HITS") {
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{name}");
            let _ = file.sync_all();
        }
    }
    // SAFETY: kill(2) on our own pid with a valid signal number has no memory effects
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
}

/// Kills the process here when `name` is armed: never, without the `failpoints` feature.
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn failpoint(_name: &str) {}
