//! Command line: `serve` (the default), `token`, `check-config`, `publish`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use epoch_gateway::app::Application;
use epoch_gateway::auth::Authenticator;
use epoch_gateway::config::{Environment, Settings};
use epoch_gateway::delivery::publish::{self, Envelope, MessageId};
use epoch_gateway::telemetry;
use epoch_gateway::topic::{Topic, UserId};

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
    /// Publish one event with JetStream and wait until the event stream has stored it.
    ///
    /// The envelope `{"event": …, "payload": …}` goes to `<nats.subject_prefix>.user.<id|public|role>` on
    /// `nats.url`, with a `Nats-Msg-Id` header. Attempts without an ack are repeated with the same id until
    /// the stream acknowledges it or the timeout passes; the stream drops duplicates. Prints
    /// `stored in <stream> at <sequence>`.
    Publish(PublishArgs),
}

#[derive(Debug, Args)]
struct PublishArgs {
    #[command(flatten)]
    to: PublishTarget,
    /// Event name: not empty, at most 128 bytes, not starting with `phx_`.
    #[arg(long, value_name = "NAME")]
    event: String,
    /// Payload: a JSON object.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    payload: String,
    /// `Nats-Msg-Id` header: the stream stores one event per id within its duplicate window. A random UUID
    /// when omitted.
    #[arg(long, value_name = "ID")]
    msg_id: Option<MessageId>,
    /// Give up when the stream has not acknowledged the event after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
}

/// Exactly one of `--user` and `--topic`.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct PublishTarget {
    /// To the sockets of one user (`user:<ID>`).
    #[arg(long, value_name = "ID")]
    user: Option<u64>,
    /// To `user:public` (everyone) or `user:role` (every authenticated socket).
    #[arg(long)]
    topic: Option<SharedTopic>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum SharedTopic {
    Public,
    Role,
}

impl PublishTarget {
    fn topic(&self) -> Topic {
        match (self.user, self.topic) {
            (Some(user), _) => Topic::User(UserId::new(user)),
            (None, Some(SharedTopic::Role)) => Topic::Role,
            // clap requires one of the two; `--topic public` is the remaining case.
            (None, _) => Topic::Public,
        }
    }
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
        Command::Publish(args) => publish_event(&settings, &args),
    }
}

/// `publish`: exit code 2 for an event that ingress would drop, 1 when it was not stored.
fn publish_event(settings: &Settings, args: &PublishArgs) -> ExitCode {
    let envelope = match Envelope::new(&args.event, &args.payload, settings.nats.max_message_bytes)
    {
        Ok(envelope) => envelope,
        Err(error) => {
            eprintln!("epoch-gateway publish: {}", error_chain(&error));
            return ExitCode::from(2);
        }
    };
    let subject = publish::subject(&settings.nats.subject_prefix, args.to.topic());
    let msg_id = args.msg_id.clone().unwrap_or_else(MessageId::random);
    let timeout = std::time::Duration::from_secs(args.timeout);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("epoch-gateway publish: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(publish::publish(
        settings.nats_urls(),
        &subject,
        &envelope,
        &msg_id,
        timeout,
    ));
    match result {
        Ok(stored) if stored.duplicate => print_out(&format!(
            "stored in {} at {} (already stored: a duplicate of Nats-Msg-Id {})",
            stored.stream,
            stored.sequence,
            msg_id.as_str()
        )),
        Ok(stored) => print_out(&format!(
            "stored in {} at {}",
            stored.stream, stored.sequence
        )),
        Err(error) => {
            eprintln!("epoch-gateway publish: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, skipping a cause whose text is already part of the line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
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
        let app = Application::build(settings, telemetry.span_drops()).await?;
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
