//! The `ferry` command: parses the Londiste-style command line and hands each command to the
//! library crates. Configuration is read, the pid file taken and the process detached before
//! any runtime or logging thread starts.

mod cli;
mod daemon;
mod demo;
mod queue_admin;
mod replication_admin;

use std::process::ExitCode;

use clap::Parser;

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
    let args = cli::Cli::parse();
    match cli::dispatch(args) {
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
