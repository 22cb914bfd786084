//! The command line, in the grammar of pgqadm.py and londiste.py: `ferry [OPTIONS] CONFIG
//! COMMAND [ARGS]`, options allowed anywhere (`ferry conf.ini ticker -d`, `ferry -s conf.ini`).

use std::path::{Path, PathBuf};

use clap::Parser;
use ferry_config::{ConfigError, IniFile};
use ferry_daemon::logging::Verbosity;

use crate::replication_admin::{self, Flags};
use crate::{daemon, queue_admin, Failure};

const COMMANDS: &str = "\
commands (CONFIG is a Londiste 2 / pgqadm ini file):
  ferry CONFIG install                   install or upgrade the queue schema ([pgqadm] db)
  ferry CONFIG ticker [-d]               run the ticker ([pgqadm]); -d detaches
  ferry CONFIG status [--json]           queues and consumers
  ferry CONFIG create QUEUE              create a queue
  ferry CONFIG drop QUEUE [--force]      drop a queue (--force: even with consumers)
  ferry CONFIG register QUEUE CONSUMER   register a consumer
  ferry CONFIG unregister QUEUE CONSUMER unregister a consumer
  ferry CONFIG config QUEUE KEY=VALUE    set rotation_period or ticker_idle_period
  ferry CONFIG replay [-d]               run replication ([londiste]); -d detaches
  ferry CONFIG provider install | add [--all | TABLE...] | remove TABLE... |
                        add-seq [--all | SEQ...] | remove-seq SEQ... | tables | seqs
  ferry CONFIG subscriber install | add [--all | TABLE...] [--create] [--skip-truncate] |
                        remove TABLE... | add-seq [--all | SEQ...] | remove-seq SEQ... |
                        tables | seqs | missing | resync TABLE... | check
  ferry demo                             two throwaway clusters replicating under load
  ferry -s CONFIG   stop the daemon of CONFIG gracefully (SIGINT) and wait for it
  ferry -k CONFIG   kill it (SIGTERM);  ferry -r CONFIG   reload its config (SIGHUP)
exit codes: 0 success, 1 runtime failure, 2 usage or configuration error";

/// Trigger-and-queue logical replication for PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, after_help = COMMANDS)]
pub struct Cli {
    /// Run detached, as a daemon (needs `pidfile` in the config).
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,
    /// Log debug lines too.
    #[arg(short = 'v', long = "verbose")]
    pub verbose: bool,
    /// Log only warnings and errors.
    #[arg(short = 'q', long = "quiet")]
    pub quiet: bool,
    /// Stop the running daemon of CONFIG gracefully (SIGINT) and wait until it is gone.
    #[arg(short = 's', long = "stop")]
    pub stop: bool,
    /// Kill the running daemon of CONFIG (SIGTERM) and wait until it is gone.
    #[arg(short = 'k', long = "kill")]
    pub kill: bool,
    /// Make the running daemon of CONFIG re-read its config and reopen its log (SIGHUP).
    #[arg(short = 'r', long = "reload")]
    pub reload: bool,
    /// Machine-readable output for listings.
    #[arg(long)]
    pub json: bool,
    /// Do it even if it is refused otherwise (drop a queue that has consumers).
    #[arg(long)]
    pub force: bool,
    /// add/add-seq: every table (sequence) of the provider, or of the queue on the subscriber.
    #[arg(long)]
    pub all: bool,
    /// subscriber add: create a missing table from the provider's definition.
    #[arg(long)]
    pub create: bool,
    /// subscriber add: keep the rows already in the subscriber's table when copying.
    #[arg(long = "skip-truncate")]
    pub skip_truncate: bool,
    /// CONFIG COMMAND [ARGS...]
    #[arg(value_name = "CONFIG COMMAND ARGS")]
    pub words: Vec<String>,
}

impl Cli {
    /// The log verbosity the flags ask for.
    pub fn verbosity(&self) -> Verbosity {
        if self.verbose {
            Verbosity::Verbose
        } else if self.quiet {
            Verbosity::Quiet
        } else {
            Verbosity::Normal
        }
    }
}

/// Runs what the command line asks for.
pub fn dispatch(cli: Cli) -> Result<(), Failure> {
    let control = [cli.stop, cli.kill, cli.reload]
        .iter()
        .filter(|f| **f)
        .count();
    if control > 1 {
        return Err(Failure::Usage("-s, -k and -r exclude each other".into()));
    }
    if cli.words.len() == 1 && cli.words[0] == "demo" && !Path::new("demo").exists() {
        return crate::demo::run();
    }
    let Some((config, rest)) = cli.words.split_first() else {
        return Err(Failure::Usage(format!(
            "a config file is required\n\n{COMMANDS}"
        )));
    };
    let config_path = absolute(Path::new(config));
    if control == 1 {
        let signal = if cli.stop {
            daemon::Control::Stop
        } else if cli.kill {
            daemon::Control::Kill
        } else {
            daemon::Control::Reload
        };
        return daemon::control(&config_path, rest.first().map(String::as_str), signal);
    }
    let Some((command, args)) = rest.split_first() else {
        return Err(Failure::Usage(format!(
            "a command is required after {config}\n\n{COMMANDS}"
        )));
    };
    let expect_args = |n: usize, shape: &str| {
        if args.len() == n {
            Ok(())
        } else {
            Err(Failure::Usage(format!(
                "usage: ferry CONFIG {command} {shape}"
            )))
        }
    };
    let flags = Flags {
        all: cli.all,
        create: cli.create,
        skip_truncate: cli.skip_truncate,
        json: cli.json,
    };
    match command.as_str() {
        "ticker" => {
            expect_args(0, "[-d]")?;
            daemon::run_ticker(&config_path, cli.daemon, cli.verbosity())
        }
        "replay" => {
            expect_args(0, "[-d]")?;
            daemon::run_replay(&config_path, cli.daemon, cli.verbosity())
        }
        "provider" => replication_admin::provider(&config_path, args, flags),
        "subscriber" => replication_admin::subscriber(&config_path, args, flags),
        "install" => {
            expect_args(0, "")?;
            queue_admin::install(&config_path)
        }
        "status" => {
            expect_args(0, "[--json]")?;
            queue_admin::status(&config_path, cli.json)
        }
        "create" => {
            expect_args(1, "QUEUE")?;
            queue_admin::create(&config_path, &args[0])
        }
        "drop" => {
            expect_args(1, "QUEUE [--force]")?;
            queue_admin::drop(&config_path, &args[0], cli.force)
        }
        "register" => {
            expect_args(2, "QUEUE CONSUMER")?;
            queue_admin::register(&config_path, &args[0], &args[1])
        }
        "unregister" => {
            expect_args(2, "QUEUE CONSUMER")?;
            queue_admin::unregister(&config_path, &args[0], &args[1])
        }
        "config" => {
            expect_args(2, "QUEUE KEY=VALUE")?;
            let Some((key, value)) = args[1].split_once('=') else {
                return Err(Failure::Usage(
                    "usage: ferry CONFIG config QUEUE KEY=VALUE".into(),
                ));
            };
            queue_admin::set_config(&config_path, &args[0], key.trim(), value.trim())
        }
        other => Err(Failure::Usage(format!(
            "unknown command '{other}'\n\n{COMMANDS}"
        ))),
    }
}

/// Reads the config file; any problem is a usage failure naming the file.
pub fn load_ini(path: &Path) -> Result<IniFile, Failure> {
    IniFile::load(path).map_err(|e: ConfigError| Failure::usage(&e))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
