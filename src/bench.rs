//! The load generator (owned by the `bench` helper; interface fixed here).
use std::process::ExitCode;

/// `sockpool bench` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:20000")]
    pub addr: String,
}

/// Runs the load generator.
pub fn main(_args: BenchArgs) -> ExitCode {
    ExitCode::FAILURE
}
