//! The `modelyard` command line: the edge where errors become messages and exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use modelyard::config::{Config, PublicKey};
use modelyard::plugins::{
    HOST_VERSION, Limits, PACKAGE, PluginEngine, SigningKey, WorldKind, new_plugin, read_signature,
    verify,
};
use modelyard::telemetry::{self, LogFormat};

// musl's allocator takes one lock for every thread's allocations: under load the static
// build lost a third of its throughput to it, and compiling plugins at start-up took up to
// twice as long.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Modelyard serves ONNX models over the Open Inference Protocol (KServe v2).
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log format on stderr: readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the model repository over HTTP until SIGINT or SIGTERM.
    ///
    /// Models live in `<models>/<name>/<version>/model.onnx`, with an optional
    /// `<models>/<name>/model.toml`; adding, replacing or removing them takes effect while
    /// the server runs. On SIGINT/SIGTERM the server stops accepting connections, finishes
    /// the requests in flight and exits 0.
    Serve {
        /// Configuration file. Default: ./modelyard.toml if it exists, else built-in defaults.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address to listen on (overrides server.listen; default 127.0.0.1:8080).
        #[arg(long, short)]
        listen: Option<String>,
        /// Model repository directory (overrides models.dir; default ./models).
        #[arg(long, short)]
        models: Option<PathBuf>,
    },
    /// Check, create and sign plugins (WebAssembly components for wasm32-wasip2).
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Say which world a component implements, with its exports and imports, or exactly
    /// why it would be refused (exit status 1).
    Check {
        /// The component, e.g. target/wasm32-wasip2/release/my_plugin.wasm.
        file: PathBuf,
    },
    /// Create a plugin crate that builds with
    /// `cargo build --release --target wasm32-wasip2`.
    New {
        /// Crate name: lowercase letters, digits, '-' and '_'.
        name: String,
        /// The world it implements.
        #[arg(long, value_enum)]
        kind: WorldKind,
        /// Where to create the crate's directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// A local modelyard-sdk crate (an unpacked .crate) to build with instead of the
        /// registry's: written as a `[patch.crates-io]` entry.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Make an ed25519 key pair for signing plugins: the private key goes to `--out`
    /// (PKCS#8 PEM, mode 0600); the public key (base64) is printed on stdout, for
    /// `plugins.trusted_keys`.
    Keygen {
        /// The private key file to create; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a component with a private key: writes `<file>.sig` beside it, which goes into
    /// the plugin directory with the component.
    Sign {
        /// The private key file `keygen` wrote.
        #[arg(long)]
        key: PathBuf,
        file: PathBuf,
    },
    /// Check a component's `<file>.sig`: exit status 0 and who signed it, or 1 and why it
    /// is not signed by a trusted key.
    Verify {
        /// A trusted public key (base64); repeat for several.
        #[arg(long = "key", required_unless_present = "config")]
        keys: Vec<PublicKey>,
        /// Trust the keys of this configuration's `plugins.trusted_keys`.
        #[arg(long)]
        config: Option<PathBuf>,
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The whole cause chain, one line, no backtrace: this is for operators.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init(cli.log_format);
    // A panic inside a backend run is caught and answered with a 500; report it as one
    // log event rather than a raw backtrace on stderr.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "caught a panic; the request it belonged to failed");
    }));
    match cli.command {
        Command::Serve {
            config,
            listen,
            models,
        } => serve(config, listen, models),
        Command::Plugin {
            command: PluginCommand::Check { file },
        } => check(&file),
        Command::Plugin {
            command:
                PluginCommand::New {
                    name,
                    kind,
                    dir,
                    sdk,
                },
        } => {
            let sdk = sdk
                .map(|sdk| {
                    sdk.canonicalize()
                        .with_context(|| format!("no modelyard-sdk at {}", sdk.display()))
                })
                .transpose()?;
            let root = new_plugin(&dir, &name, kind, sdk.as_deref())?;
            println!(
                "created {}; build it with:\n  cd {} && cargo build --release --target wasm32-wasip2",
                root.display(),
                root.display()
            );
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::Keygen { out },
        } => {
            let key = SigningKey::generate(&out)?;
            eprintln!(
                "wrote the private key to {} (keep it secret: it signs plugins); trust the \
                 public key below with plugins.trusted_keys",
                out.display()
            );
            println!("{}", key.public_key());
            Ok(())
        }
        Command::Plugin {
            command: PluginCommand::Sign { key, file },
        } => {
            let key = SigningKey::read(&key)?;
            let written = key.sign_file(&file)?;
            println!(
                "wrote {} (signed by {})",
                written.display(),
                key.public_key()
            );
            Ok(())
        }
        Command::Plugin {
            command:
                PluginCommand::Verify {
                    mut keys,
                    config,
                    file,
                },
        } => {
            if let Some(config) = config {
                keys.extend(Config::load(&config)?.plugins.trusted_keys);
            }
            anyhow::ensure!(!keys.is_empty(), "no trusted keys to verify with");
            let bytes =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let signer = verify(&bytes, &read_signature(&file), &keys)
                .with_context(|| format!("{} is not accepted", file.display()))?;
            println!("{}: signed by {signer}", file.display());
            Ok(())
        }
    }
}

fn check(file: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let engine = PluginEngine::new(Limits::default(), None, false)?;
    // Named by its path: a refusal says which file.
    let inspection = engine.inspect(&file.display().to_string(), &bytes)?;
    println!(
        "{}: a {} plugin built for {PACKAGE}@{} (this host speaks {PACKAGE}@{HOST_VERSION})",
        file.display(),
        inspection.world.as_str(),
        inspection.built_for,
    );
    println!("exports: {}", inspection.exports.join(", "));
    println!("imports: {}", inspection.imports.join(", "));
    Ok(())
}

fn serve(
    config: Option<PathBuf>,
    listen: Option<String>,
    models: Option<PathBuf>,
) -> anyhow::Result<()> {
    let default = Path::new("modelyard.toml");
    let config_file = match config {
        Some(path) => Some(path),
        None if default.is_file() => Some(default.to_path_buf()),
        None => None,
    };
    let mut config = match &config_file {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = listen {
        config.server.listen = listen;
    }
    if let Some(models) = models {
        config.models.dir = models;
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let result = runtime.block_on(modelyard::server::run(
        &config,
        config_file,
        shutdown_signal(),
    ));
    // A model load still running on a blocking thread must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(result?)
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
