//! Command line: `serve` (the default), `token`, `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use epoch_gateway::app::Application;
use epoch_gateway::auth::Authenticator;
use epoch_gateway::config::{Environment, Settings};
use epoch_gateway::telemetry;
use epoch_gateway::topic::UserId;

/// Phoenix-compatible WebSocket gateway between Epochtalk browsers and NATS.
#[derive(Debug, Parser)]
#[command(name = "epoch-gateway", version)]
struct Cli {
    /// Configuration file (TOML or YAML), applied over the defaults and under EPOCH_GATEWAY__* variables.
    #[arg(long, global = true, env = "EPOCH_GATEWAY_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print a signed access token for the configured secret (development, tests, smoke checks).
    Token {
        /// User id (the token's `sub`).
        #[arg(long, value_name = "ID")]
        user: u64,
        /// Lifetime in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 86_400)]
        ttl: u64,
        /// Session id (the token's `jti`); random when omitted.
        #[arg(long, value_name = "UUID")]
        jti: Option<uuid::Uuid>,
    },
    /// Load and validate the configuration, print the effective settings (secrets redacted).
    CheckConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("epoch-gateway: configuration error: {error}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(settings),
        Command::Token { user, ttl, jti } => {
            let auth = Authenticator::new(&settings.auth_secret(), settings.auth_algorithm());
            let jti = jti.unwrap_or_else(uuid::Uuid::new_v4).to_string();
            print_out(&auth.mint(UserId::new(user), ttl, &jti))
        }
        Command::CheckConfig => {
            // Settings hold only strings, numbers and addresses, which always serialise.
            let text = serde_json::to_string_pretty(&settings).expect("settings serialise");
            print_out(&text)
        }
    }
}

/// Prints a command's result; a closed pipe (`| head`) is not a failure worth a panic.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("epoch-gateway: cannot write the output: {error}");
            ExitCode::FAILURE
        }
    }
}

fn serve(settings: Settings) -> ExitCode {
    let telemetry = telemetry::init(&settings.log, &settings.telemetry);
    if telemetry.exporting() {
        tracing::info!("exporting traces over OTLP");
    }
    if settings.auth.secret.is_none() && settings.environment == Environment::Development {
        tracing::warn!(
            "NO auth.secret CONFIGURED: using the public development secret. Anyone can mint tokens. \
             Set EPOCH_GATEWAY__AUTH__SECRET (required when environment = production)."
        );
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = settings.runtime.worker_threads {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let app = Application::build(settings).await?;
        app.run_until_stopped(shutdown_signal()).await
    });
    drop(runtime);
    telemetry.shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(
                error = format!("{error:#}"),
                "epoch-gateway stopped with an error"
            );
            ExitCode::FAILURE
        }
    }
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
