//! The interactive client (owned by the `client` helper; interface fixed here).
use std::process::ExitCode;

/// `sockpool client --addr HOST:PORT`: runs on the process's stdin/stdout.
pub fn main(_addr: &str) -> ExitCode {
    ExitCode::FAILURE
}
