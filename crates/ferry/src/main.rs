//! The `ferry` command: parses the Londiste-style command line (see [`cli`]) and hands each
//! command to the library crates. Configuration is read, the pid file taken and the process
//! detached before any runtime or logging thread starts.

mod cli;
mod daemon;
#[cfg(feature = "demo")]
mod demo;
mod example;
mod queue_admin;
mod replication_admin;
mod settings;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use cli::{Cli, Command};
use ferry_config::{REPLICATION_SECTION, TICKER_SECTION};

/// How a command failed, which decides the exit code.
#[derive(Debug)]
pub enum Failure {
    /// Bad command line or configuration: exit code 2.
    Usage(String),
    /// Something failed while running: exit code 1.
    Runtime(String),
}

impl Failure {
    /// A runtime failure from an error and its causes.
    pub fn runtime(error: &dyn std::error::Error) -> Failure {
        Failure::Runtime(ferry_daemon::logging::one_line(error))
    }

    /// A usage or configuration failure from an error and its causes.
    pub fn usage(error: &dyn std::error::Error) -> Failure {
        Failure::Usage(ferry_daemon::logging::one_line(error))
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return command_line_error(error),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("ferry: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("ferry: {message}");
            ExitCode::from(1)
        }
    }
}

/// Prints what clap found wrong (or the help or version asked for) and gives its exit code:
/// 0 for help and version, 2 for a usage error.
fn command_line_error(error: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
        }
        _ => {
            let text = error.render().to_string();
            eprint!("ferry: {}", text.strip_prefix("error: ").unwrap_or(&text));
        }
    }
    ExitCode::from(error.exit_code() as u8)
}

/// Runs what the command line asks for.
fn run(cli: Cli) -> Result<(), Failure> {
    let options = cli.global;
    if options.ini {
        print!("{}", example::EXAMPLE_INI);
        return Ok(());
    }
    let control = [options.stop, options.kill, options.reload]
        .iter()
        .filter(|f| **f)
        .count();
    if control > 1 {
        return Err(Failure::Usage("-s, -k and -r exclude each other".into()));
    }
    if let Some(Command::Unknown(words)) = &cli.command {
        return Err(Failure::Usage(format!(
            "unknown command '{}' (`ferry --help` lists the commands)",
            words.first().map(String::as_str).unwrap_or_default()
        )));
    }
    if let Some(command) = cli.command.as_ref().filter(|c| !c.needs_config()) {
        if let Some(config) = &cli.config {
            return Err(Failure::Usage(format!(
                "this command takes no config file ({} given)",
                config.display()
            )));
        }
        return run_without_config(command);
    }
    let Some(config) = cli.config else {
        return Err(Failure::Usage(
            "a config file is required: ferry [OPTIONS] CONFIG COMMAND (`ferry --help` lists the commands)".into(),
        ));
    };
    let config = absolute(&config);
    if control == 1 {
        let signal = if options.stop {
            daemon::Control::Stop
        } else if options.kill {
            daemon::Control::Kill
        } else {
            daemon::Control::Reload
        };
        let section = cli.command.as_ref().map(section_of);
        return daemon::control(&config, section, signal);
    }
    let Some(command) = cli.command else {
        return Err(Failure::Usage(format!(
            "a command is required after {} (`ferry --help` lists them)",
            config.display()
        )));
    };
    if options.daemon && !command.is_daemon() {
        return Err(Failure::Usage(
            "-d (--daemon) is for `ticker` and `replay` only".into(),
        ));
    }
    let run_options = daemon::RunOptions {
        detach: options.daemon,
        verbosity: options.verbosity(),
        log_format: options.log_format.map(|format| match format {
            cli::LogFormatArg::Text => ferry_daemon::logging::LogFormat::Text,
            cli::LogFormatArg::Json => ferry_daemon::logging::LogFormat::Json,
        }),
    };
    match command {
        Command::Ticker => daemon::run_ticker(&config, run_options),
        Command::Replay => daemon::run_replay(&config, run_options),
        Command::WaitSync { timeout } => replication_admin::wait_sync(&config, timeout),
        Command::Compare {
            tables,
            count_only,
            point,
            output,
        } => replication_admin::compare(&config, tables, count_only, point, output.json),
        Command::Repair {
            tables,
            apply,
            point,
            output,
        } => replication_admin::repair(&config, tables, apply, point, output.json),
        Command::Execute {
            files,
            lock_timeout,
        } => replication_admin::execute(&config, &files, lock_timeout),
        Command::Switchover {
            lock_timeout,
            timeout,
            output,
        } => replication_admin::switchover(&config, lock_timeout, timeout, output.json),
        Command::Failover { force, output } => {
            replication_admin::failover(&config, force, output.json)
        }
        Command::Rejoin {
            lost_file,
            lock_timeout,
            output,
        } => replication_admin::rejoin(&config, &lost_file, lock_timeout, output.json),
        Command::Pause => replication_admin::pause(&config, true),
        Command::Resume => replication_admin::pause(&config, false),
        Command::Provider(command) => replication_admin::provider(&config, command),
        Command::Subscriber(command) => replication_admin::subscriber(&config, command),
        Command::Install => queue_admin::install(&config),
        Command::Status(output) => {
            // replication's status with a [londiste] config, the queues' with [pgqadm] alone
            if settings::load_ini(&config)?.has_section(REPLICATION_SECTION) {
                replication_admin::status(&config, output.json)
            } else {
                queue_admin::status(&config, output.json)
            }
        }
        Command::Create { queue } => queue_admin::create(&config, &queue),
        Command::Drop { queue, force } => queue_admin::drop(&config, &queue, force),
        Command::Register { queue, consumer } => queue_admin::register(&config, &queue, &consumer),
        Command::Unregister { queue, consumer } => {
            queue_admin::unregister(&config, &queue, &consumer)
        }
        Command::Config { queue, setting } => {
            let Some((key, value)) = setting.split_once('=') else {
                return Err(Failure::Usage(
                    "usage: ferry CONFIG config QUEUE KEY=VALUE".into(),
                ));
            };
            queue_admin::set_config(&config, &queue, key.trim(), value.trim())
        }
        Command::Demo | Command::Completions { .. } | Command::Man | Command::Unknown(_) => {
            unreachable!("handled before the config is read")
        }
    }
}

/// The commands that need no config file: the demo, completions and the man page.
fn run_without_config(command: &Command) -> Result<(), Failure> {
    let mut text = Vec::new();
    match command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut cli::definition(), "ferry", &mut text);
            print_all(&text)
        }
        Command::Man => {
            clap_mangen::Man::new(cli::definition().bin_name("ferry"))
                .render(&mut text)
                .map_err(|e| Failure::runtime(&e))?;
            print_all(&text)
        }
        #[cfg(feature = "demo")]
        Command::Demo => demo::run(),
        #[cfg(not(feature = "demo"))]
        Command::Demo => Err(Failure::Usage(
            "this ferry was built without the demo: `cargo run --release --features demo -- demo`"
                .into(),
        )),
        _ => unreachable!("only commands without a config come here"),
    }
}

/// Writes `text` to stdout; a reader that went away early (`| head`) is no failure.
fn print_all(text: &[u8]) -> Result<(), Failure> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Failure::runtime(&e)),
        _ => Ok(()),
    }
}

/// The config section whose daemon `-s`, `-k` or `-r` with `command` means.
fn section_of(command: &Command) -> &'static str {
    match command {
        Command::Replay
        | Command::WaitSync { .. }
        | Command::Pause
        | Command::Resume
        | Command::Compare { .. }
        | Command::Execute { .. }
        | Command::Switchover { .. }
        | Command::Failover { .. }
        | Command::Rejoin { .. }
        | Command::Repair { .. }
        | Command::Provider(_)
        | Command::Subscriber(_) => REPLICATION_SECTION,
        _ => TICKER_SECTION,
    }
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
