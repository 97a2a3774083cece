//! The command line. Kept apart from `main.rs` so the man page and shell
//! completions (the packaging issue) can be generated from the same definition.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub const DEFAULT_CONFIG: &str = "/etc/airgate/airgate.toml";

#[derive(Debug, Parser)]
#[command(
    name = "airgate",
    version,
    about = "Licence-enforcing inference daemon for air-gapped hosts",
    long_about = "airgate serves local open-weight models over a Unix socket (and, later, mutual TLS), \
                  decides every request against signed per-tenant policy and keeps a tamper-evident audit log."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve {
        /// Configuration file.
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and report every problem; exit 64 if any.
    CheckConfig {
        /// Configuration file.
        #[arg(default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the running daemon's status (operators only).
    Status {
        /// The daemon's Unix socket; defaults to the one in the configuration.
        #[arg(long, short)]
        socket: Option<PathBuf>,
        /// Configuration file to take the socket path from.
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "AIRGATE_CONFIG")]
        config: PathBuf,
        /// Print the raw JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Work with model files.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Load a GGUF (llama.cpp) or ONNX (tract) file and describe it.
    Inspect {
        /// The model file.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}
