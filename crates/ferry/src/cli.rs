//! The command line, in the grammar of pgqadm.py and londiste.py: `ferry [OPTIONS] CONFIG
//! COMMAND [ARGS]`. The options of every command (`-d`, `-v`, `-q`, `-s`, `-k`, `-r`) may stand
//! anywhere (`ferry conf.ini ticker -d`, `ferry -s conf.ini`); each command's own options
//! (`--all`, `--json`, ...) belong to it, and any other is a usage error naming it. The same
//! definitions give `--help` at every level, the shell completions and the man page.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_daemon::logging::Verbosity;

/// Exit codes and how to learn more, under every `--help`.
const AFTER_HELP: &str = "\
CONFIG is a Londiste 2 / SkyTools ini file ([pgqadm] for the queue commands and the ticker,
[londiste] for replay, provider and subscriber); `ferry --ini` prints an annotated example.
Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.";

/// Trigger-and-queue logical replication for PostgreSQL.
#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    // subcommands' usage lines read `ferry CONFIG provider add ...`
    bin_name = "ferry CONFIG",
    override_usage = "ferry [OPTIONS] CONFIG COMMAND [ARGS]\n       ferry demo | completions SHELL | man | --ini",
    version,
    after_help = AFTER_HELP,
    allow_external_subcommands = true,
    disable_help_subcommand = true
)]
pub struct Cli {
    /// Options every command takes, anywhere on the line.
    #[command(flatten)]
    pub global: GlobalOptions,
    /// The config file.
    #[arg(value_name = "CONFIG")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Options that stand anywhere on the line, as in SkyTools.
#[derive(Debug, Clone, Copy, Args)]
pub struct GlobalOptions {
    /// Run detached, as a daemon (ticker and replay; needs `pidfile` in the config).
    #[arg(short = 'd', long = "daemon", global = true)]
    pub daemon: bool,
    /// Log debug lines too; twice: trace lines.
    #[arg(short = 'v', long = "verbose", global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log only warnings and errors.
    #[arg(short = 'q', long = "quiet", global = true)]
    pub quiet: bool,
    /// Stop the running daemon of CONFIG gracefully (SIGINT) and wait until it is gone.
    #[arg(short = 's', long = "stop", global = true)]
    pub stop: bool,
    /// Kill the running daemon of CONFIG (SIGTERM) and wait until it is gone.
    #[arg(short = 'k', long = "kill", global = true)]
    pub kill: bool,
    /// Make the running daemon of CONFIG re-read its config and reopen its log (SIGHUP).
    #[arg(short = 'r', long = "reload", global = true)]
    pub reload: bool,
    /// Log lines as text or as one json object each (overrides `log_format` of the config).
    #[arg(long = "log-format", value_name = "FORMAT", global = true)]
    pub log_format: Option<LogFormatArg>,
    /// Print an annotated example config and exit.
    #[arg(long = "ini")]
    pub ini: bool,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    /// `time level message field=value ...`.
    Text,
    /// One json object per line.
    Json,
}

impl GlobalOptions {
    /// The log verbosity the flags ask for.
    pub fn verbosity(&self) -> Verbosity {
        match (self.verbose, self.quiet) {
            (0, true) => Verbosity::Quiet,
            (0, false) => Verbosity::Normal,
            (1, _) => Verbosity::Verbose,
            _ => Verbosity::Trace,
        }
    }
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install or upgrade the queue schema in [pgqadm] db (running it again changes nothing).
    Install,
    /// Run the ticker of [pgqadm] (foreground, or detached with -d).
    Ticker,
    /// With [pgqadm]: every queue and consumer (lag, pending). With [londiste]: what replay
    /// is doing, its lag, the error holding it up, each table's state and since when.
    Status(JsonOption),
    /// Create a queue.
    Create {
        /// The queue.
        queue: String,
    },
    /// Drop a queue and its events.
    Drop {
        /// The queue.
        queue: String,
        /// Drop it even while consumers are registered.
        #[arg(long)]
        force: bool,
    },
    /// Register a consumer on a queue.
    Register {
        /// The queue.
        queue: String,
        /// The consumer.
        consumer: String,
    },
    /// Unregister a consumer.
    Unregister {
        /// The queue.
        queue: String,
        /// The consumer.
        consumer: String,
    },
    /// Set a queue's rotation_period, ticker_idle_period, ticker_max_lag (intervals, e.g.
    /// `30 minutes`) or ticker_max_count (events).
    Config {
        /// The queue.
        queue: String,
        /// KEY=VALUE.
        #[arg(value_name = "KEY=VALUE")]
        setting: String,
    },
    /// Run replication of [londiste]: copy new tables, apply batches (-d detaches).
    Replay,
    /// Pause replay of [londiste]: it applies and copies nothing, and keeps its position.
    Pause,
    /// Resume a paused replay.
    Resume,
    /// Wait until every table of [londiste] is ok and the subscriber has applied everything
    /// committed on the provider before the command started; exit 1 on timeout.
    WaitSync {
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
        timeout: f64,
    },
    /// Prove both sides of [londiste] identical at one point while writes go on: per table
    /// rows and a checksum per side, and the key ranges that differ; exit 1 on a difference.
    Compare {
        /// The tables (or --all).
        #[command(flatten)]
        tables: Selection,
        /// Compare row counts only (fast; no checksums).
        #[arg(long)]
        count_only: bool,
        #[command(flatten)]
        point: PointArgs,
        #[command(flatten)]
        output: JsonOption,
    },
    /// List the rows that differ between the sides (missing, extra, different, by primary
    /// key); with --apply fix them on the subscriber. Exit 1 if rows differ and were not fixed.
    Repair {
        /// The tables (or --all).
        #[command(flatten)]
        tables: Selection,
        /// Fix the subscriber: insert the missing, delete the extra, update the different.
        #[arg(long)]
        apply: bool,
        #[command(flatten)]
        point: PointArgs,
        #[command(flatten)]
        output: JsonOption,
    },
    /// Run SQL files on the provider and, through the queue, on every subscriber at exactly
    /// that point of the stream (ALTER TABLE ... ADD COLUMN, CREATE INDEX, a new table). Each
    /// file runs once per node: running it again is harmless.
    Execute {
        /// The files, run in order; the first that fails stops the rest.
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
        /// Longest wait for the locks on the queue's tables (writers wait while a file runs).
        #[arg(long, value_name = "MILLISECONDS", default_value_t = 5000)]
        lock_timeout: u64,
    },
    /// Turn replication of [londiste] around, both servers up: its subscriber becomes the
    /// provider and the provider its subscriber, nothing lost, nothing copied. Stops the
    /// replay daemon of CONFIG first.
    Switchover {
        /// Longest wait for the lock that stops writers on the provider's tables.
        #[arg(long, value_name = "MILLISECONDS", default_value_t = 5000)]
        lock_timeout: u64,
        /// Longest wait for the subscriber to catch up.
        #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
        timeout: f64,
        #[command(flatten)]
        output: JsonOption,
    },
    /// The provider of [londiste] is gone: its subscriber takes over (refused while the
    /// provider answers). Prints the last tick applied: what came after may be lost. Other
    /// subscribers move here, repaired where they applied more or less.
    Failover {
        /// Go on although the provider answers, another subscriber applied more, or one
        /// cannot be reached (it is left behind).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        output: JsonOption,
    },
    /// Run on the old provider once it is back ([londiste]: provider_db the new provider,
    /// subscriber_db the old one): it becomes a subscriber; what it committed that never
    /// reached the new provider is written to --lost-file, never applied.
    Rejoin {
        /// Where to write the lost transactions (one json line per row change).
        #[arg(long, value_name = "FILE")]
        lost_file: PathBuf,
        /// Longest wait for the locks on the new provider's tables (a consistent point).
        #[arg(long, value_name = "MILLISECONDS", default_value_t = 5000)]
        lock_timeout: u64,
        #[command(flatten)]
        output: JsonOption,
    },
    /// The provider's side of [londiste]: what the queue carries.
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// The subscriber's side of [londiste]: what is replicated here.
    #[command(subcommand)]
    Subscriber(SubscriberCommand),
    /// Two throwaway clusters replicating under a write load (needs PostgreSQL's server
    /// binaries; this build must have the `demo` feature).
    Demo,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `ferry man | man -l -`.
    Man,
    /// Anything else: refused as an unknown command.
    #[command(external_subcommand)]
    Unknown(Vec<String>),
}

impl Command {
    /// Whether this command needs CONFIG.
    pub fn needs_config(&self) -> bool {
        !matches!(
            self,
            Command::Demo | Command::Completions { .. } | Command::Man
        )
    }

    /// Whether this command runs a daemon (takes `-d`).
    pub fn is_daemon(&self) -> bool {
        matches!(self, Command::Ticker | Command::Replay)
    }
}

/// `--json`: machine-readable output.
#[derive(Debug, Clone, Copy, Args)]
pub struct JsonOption {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// How compare and repair wait for their consistent point.
#[derive(Debug, Clone, Copy, Args)]
pub struct PointArgs {
    /// Longest wait for the lock on the provider's tables, taken in attempts of at most
    /// 100 ms (a writer of those tables waits at most one attempt).
    #[arg(long, value_name = "MILLISECONDS", default_value_t = 5000)]
    pub lock_timeout: u64,
    /// Longest wait for replay to reach the compared point.
    #[arg(long, value_name = "SECONDS", default_value_t = 300.0)]
    pub timeout: f64,
}

/// Tables or sequences named on the line, or `--all`.
#[derive(Debug, Clone, Args)]
pub struct Selection {
    /// Every candidate: every table (sequence) of the provider, or on the subscriber every
    /// one the provider registered for the queue and not added here yet.
    #[arg(long, conflicts_with = "names")]
    pub all: bool,
    /// `name` (schema public), `schema.name` or quoted identifiers (`'"My Schema"."T"'`).
    #[arg(value_name = "NAME", required_unless_present = "all")]
    pub names: Vec<String>,
}

/// Names given on the line (at least one).
#[derive(Debug, Clone, Args)]
pub struct Names {
    /// `name` (schema public), `schema.name` or quoted identifiers.
    #[arg(value_name = "NAME", required = true)]
    pub names: Vec<String>,
}

/// `ferry CONFIG provider ...`.
#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Install the queue schema and the provider catalog into provider_db; create the queue.
    Install,
    /// Capture tables into the queue (creates their triggers).
    Add {
        /// The tables.
        #[command(flatten)]
        selection: Selection,
        /// How plain tables are captured: `statement` (one trigger call per statement; the
        /// default for a table not captured yet) or `row` (one per changed row: cheaper for
        /// single-row statements, far dearer for bulk ones). Without it a table keeps the
        /// mode it has. Partitioned tables and inheritance trees are always captured per row.
        #[arg(long, value_enum, value_name = "MODE")]
        capture: Option<Capture>,
    },
    /// Stop capturing tables.
    Remove(Names),
    /// Register sequences with the queue.
    AddSeq(Selection),
    /// Unregister sequences.
    RemoveSeq(Names),
    /// The tables the queue carries.
    Tables(JsonOption),
    /// The sequences registered with the queue.
    Seqs(JsonOption),
}

/// `provider add --capture`: how plain tables are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Capture {
    /// One trigger call per statement, reading its transition tables.
    Statement,
    /// One trigger call per changed row.
    Row,
}

/// `ferry CONFIG subscriber ...`.
#[derive(Debug, Subcommand)]
pub enum SubscriberCommand {
    /// Install the subscriber catalog into subscriber_db; register job_name on the queue.
    Install,
    /// Replicate provider tables here: replay copies them, then applies their changes.
    Add {
        /// The tables.
        #[command(flatten)]
        selection: Selection,
        /// Create a missing table from the provider's definition.
        #[arg(long)]
        create: bool,
        /// Keep the rows already in the table when copying.
        #[arg(long = "skip-truncate")]
        skip_truncate: bool,
        /// Then wait until the tables added are ok and the subscriber has everything committed
        /// before (as wait-sync does; replay must run).
        #[arg(long = "wait-sync")]
        wait_sync: bool,
        /// With --wait-sync: give up after this many seconds.
        #[arg(
            long,
            value_name = "SECONDS",
            default_value_t = 3600.0,
            requires = "wait_sync"
        )]
        timeout: f64,
    },
    /// Stop replicating tables here (they become writable).
    Remove(Names),
    /// Copy tables again.
    Resync(Names),
    /// Keep sequences at or above the provider's.
    AddSeq(Selection),
    /// Stop keeping sequences in step.
    RemoveSeq(Names),
    /// `Table State`, then `schema.table state` per table (in-copy, catching-up, ok, or `-`).
    Tables(JsonOption),
    /// The sequences kept in step here.
    Seqs(JsonOption),
    /// Provider tables and sequences of the queue not added here.
    Missing(JsonOption),
    /// Every difference that would stop replay; exit 1 if any.
    Check(JsonOption),
}

/// The clap definition of the whole command line (for completions and the man page).
pub fn definition() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ferry").chain(args.iter().copied()))
    }

    #[test]
    fn the_definition_is_consistent() {
        definition().debug_assert();
    }

    #[test]
    fn options_stand_anywhere() {
        for args in [
            &["-d", "c.ini", "ticker"][..],
            &["c.ini", "-d", "ticker"],
            &["c.ini", "ticker", "-d"],
        ] {
            let cli = parse(args).unwrap();
            assert!(cli.global.daemon, "{args:?}");
            assert!(matches!(cli.command, Some(Command::Ticker)), "{args:?}");
            assert_eq!(cli.config.unwrap().to_str(), Some("c.ini"));
        }
        let cli = parse(&["c.ini", "-k"]).unwrap();
        assert!(cli.global.kill && cli.command.is_none());
        let cli = parse(&["-q", "c.ini", "subscriber", "add", "-vv", "--all"]).unwrap();
        assert_eq!(cli.global.verbose, 2);
        assert!(cli.global.quiet);
        assert_eq!(cli.global.verbosity(), Verbosity::Trace);
    }

    #[test]
    fn commands_parse_into_the_tree() {
        let cli = parse(&["c.ini", "subscriber", "add", "t1", "--create", "s.t2"]).unwrap();
        match cli.command {
            Some(Command::Subscriber(SubscriberCommand::Add {
                selection, create, ..
            })) => {
                assert!(create && !selection.all);
                assert_eq!(selection.names, ["t1", "s.t2"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["demo"]).unwrap().command,
            Some(Command::Demo)
        ));
        assert!(matches!(
            parse(&["c.ini", "fly"]).unwrap().command,
            Some(Command::Unknown(words)) if words == ["fly"]
        ));
    }

    #[test]
    fn an_option_a_command_does_not_take_is_refused() {
        for args in [
            &["c.ini", "provider", "tables", "--create"][..],
            &["c.ini", "ticker", "--force"],
            &["c.ini", "provider", "add", "--all", "t1"],
            &["c.ini", "provider", "add"],
            &["c.ini", "subscriber", "remove"],
            &["c.ini", "status", "extra"],
        ] {
            let error = parse(args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }
}
