//! The `sockpool` command: parses flags and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use sockpool::config::{Config, ServeFlags};
use sockpool::notify::Notifier;
use sockpool::{bench, client, config, logging, server};

/// Exit code for usage and config errors (nothing was bound).
const EXIT_USAGE: u8 = 2;
/// Exit code for runtime failures such as an address in use.
const EXIT_RUNTIME: u8 = 1;

/// A TCP server that answers every message, on a fixed pool of worker threads.
#[derive(Parser, Debug)]
#[command(name = "sockpool", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand, `sockpool` runs `serve` with these flags.
    #[command(flatten)]
    serve: ServeFlags,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server (the default).
    Serve(Box<ServeFlags>),
    /// The interactive client: send each line, print each reply.
    Client {
        /// Server address.
        #[arg(long, default_value = "127.0.0.1:20000")]
        addr: String,
    },
    /// Load generator: throughput and latency, every reply verified.
    Bench(bench::BenchArgs),
    /// Validate a config file and print the effective configuration.
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// Print the documented default config file.
    PrintDefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(&cli.serve),
        Some(Command::Serve(flags)) => serve(&flags),
        Some(Command::Client { addr }) => client::main(&addr),
        Some(Command::Bench(args)) => bench::main(args),
        Some(Command::CheckConfig { file }) => check_config(&file),
        Some(Command::PrintDefaultConfig) => {
            print!("{}", config::default_file());
            ExitCode::SUCCESS
        }
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(Some(file), &[]) {
        Ok(c) => {
            println!("# {}: valid. Effective configuration:", file.display());
            print!("{}", c.to_toml());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sockpool: config error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn serve(flags: &ServeFlags) -> ExitCode {
    let config = match flags.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sockpool: config error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = logging::init(config.log.level, config.log.file.as_deref()) {
        eprintln!("sockpool: config error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    // Take over the signals before anything runs, so an early SIGTERM is queued
    // for the handler instead of killing the process mid-start.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let running = match server::start(&config) {
        Ok(r) => r,
        Err(e) => {
            log::error!("{e}");
            log::logger().flush();
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    // Both listeners are bound and every thread runs: tell systemd (Type=notify).
    let notifier = Notifier::from_env();
    notifier.notify(&format!(
        "READY=1\nSTATUS=serving on {}",
        running.local_addr()
    ));
    let trigger = running.trigger();
    let signals_handle = signals.handle();
    let grace = config::format_duration(config.shutdown.grace);
    let delay = match config.shutdown.drain_delay.is_zero() {
        true => "0s".to_string(),
        false => config::format_duration(config.shutdown.drain_delay),
    };
    let watcher = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut stops = 0;
            for sig in signals.forever() {
                let name = match sig {
                    SIGTERM => "SIGTERM",
                    SIGINT => "SIGINT",
                    _ => {
                        log::info!("SIGHUP ignored: restart sockpool to apply config changes");
                        continue;
                    }
                };
                stops += 1;
                if stops == 1 {
                    log::info!(
                        "{name} received: stopping (drain delay {delay}, grace {grace}; a second signal exits at once)"
                    );
                    notifier.notify("STOPPING=1\nSTATUS=draining connections");
                    trigger.fire();
                } else {
                    log::warn!("{name} received again: exiting now");
                    log::logger().flush();
                    std::process::exit(128 + sig);
                }
            }
        });
    let watcher = match watcher {
        Ok(w) => Some(w),
        Err(e) => {
            log::error!("cannot start the signal thread: {e}; stopping");
            running.trigger().fire();
            None
        }
    };
    running.wait();
    signals_handle.close();
    if let Some(w) = watcher {
        let _ = w.join();
    }
    log::info!("shutdown complete");
    log::logger().flush();
    ExitCode::SUCCESS
}
