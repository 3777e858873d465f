//! The `callgate` binary: parses the command line, loads and validates the config, sets up logging and
//! hands over to the library. Exit codes: 0 ok, 1 runtime failure, 64 configuration problems.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use callgate::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "callgate",
    version,
    about = "Gates contact-centre calls behind a BankID check"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run callgate against the PBX and identity providers in the config file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run simulated calls through every before-agent outcome (simulated Asterisk and BankID), print a
    /// table and exit.
    Demo,
    /// Measure the dialogue core and whole calls through the loopback fakes; print the figures.
    Bench {
        /// How many callers to place at once.
        #[arg(long, default_value_t = 100)]
        calls: usize,
        /// Counts of silent callers held in the gate at once for the memory figure (0: skip).
        #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
        hold: Vec<usize>,
        /// 2: two instances sharing a redis-server started on loopback (needs redis-server): API
        /// latency on the owning instance and through the other, and checks per second per instance.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
        instances: u8,
        /// With --instances 2: requests per latency figure.
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// Check a config file: print every problem (exit 64) or a summary per queue (exit 0).
    CheckConfig { file: PathBuf },
    /// Read an agent API token from stdin and print its SHA-256 (hex) for `[api.tokens.<name>] sha256`.
    /// The token is never taken from the command line.
    TokenHash,
    /// Check a config against the live PBX and identity providers: one line per check; exit 0 when
    /// none failed, 1 when one did, 64 when the config is not valid.
    Doctor {
        #[arg(long, short)]
        config: PathBuf,
        /// Report format on stdout.
        #[arg(long, value_enum, default_value = "text")]
        format: ReportFormat,
    },
    /// Read the audit trail: check its hash chain, export one person's records, show the latest.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run the BankID RP v6 simulator on loopback.
    SimIdp {
        #[arg(long, default_value = "127.0.0.1:8585")]
        listen: SocketAddr,
        /// Serve mutual TLS with generated certificates.
        #[arg(long)]
        tls: bool,
        /// Length of one scenario step, e.g. 1s or 500ms.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        step: Duration,
        /// Where to write the generated certificates.
        #[arg(long)]
        cert_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain over every file: exit 0 with a count when intact, 1 naming the first
    /// broken record (file, line, why).
    Verify {
        /// The config file (the trail is in `<server.data_dir>/audit`).
        #[arg(long, short, conflicts_with = "dir")]
        config: Option<PathBuf>,
        /// The trail's directory itself.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Read one personal number from standard input (never the command line) and print that
    /// person's records as JSON Lines: their verifications and the agent actions on them.
    Export {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print the last records.
    Tail {
        #[arg(long, short, conflicts_with = "dir")]
        config: Option<PathBuf>,
        #[arg(long)]
        dir: Option<PathBuf>,
        /// How many records.
        #[arg(short = 'n', long = "lines", default_value_t = 10)]
        lines: usize,
        /// Keep printing records as they are written.
        #[arg(long, short)]
        follow: bool,
    },
}

/// `callgate doctor` output.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    Text,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    callgate::config::duration::parse(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => {
            let (report, code) = callgate::config::check_config(&file);
            print!("{report}");
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::TokenHash => {
            let mut input = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
                eprintln!("cannot read the token from stdin: {e}");
                return ExitCode::FAILURE;
            }
            match callgate::api::agent::auth::token_hash(&input) {
                Ok(hash) => {
                    println!("{hash}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(64)
                }
            }
        }
        Command::Audit { command } => audit(command),
        Command::Doctor { config, format } => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let now = time::OffsetDateTime::now_utc();
            let (report, code) = rt.block_on(callgate::doctor::run_file(&config, now));
            match format {
                ReportFormat::Text => print!("{}", report.text()),
                ReportFormat::Json => println!("{}", report.json()),
            }
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Command::Serve { config } => {
            let cfg = match callgate::config::load_file(&config) {
                Ok(cfg) => cfg,
                Err(issues) => {
                    for i in issues {
                        eprintln!("{i}");
                    }
                    return ExitCode::from(64);
                }
            };
            telemetry::init_logging(cli.log_format);
            let opts = callgate::app::Options {
                config_path: Some(config),
                sighup: true,
                ..Default::default()
            };
            runtime(|| async move { callgate::app::run(cfg, opts, shutdown_signal()).await })
        }
        Command::Demo => runtime(|| async move {
            let ok = callgate::demo::run(cli.log_format).await?;
            anyhow::ensure!(ok, "some demo calls did not end as expected");
            Ok(())
        }),
        Command::Bench {
            calls,
            hold,
            instances,
            samples,
        } => {
            telemetry::init_logging_with(cli.log_format, "warn");
            if instances == 2 {
                runtime(|| async move {
                    println!(
                        "callgate bench, two instances sharing Redis{}\n",
                        callgate::bench::build_note()
                    );
                    print!("{}", callgate::bench::instances(calls, samples).await?);
                    Ok(())
                })
            } else {
                runtime(|| async move { callgate::bench::run(calls, &hold).await })
            }
        }
        Command::SimIdp {
            listen,
            tls,
            step,
            cert_dir,
        } => {
            telemetry::init_logging(cli.log_format);
            runtime(|| async move {
                let opts = callgate::idp::sim::SimOptions {
                    tls,
                    step,
                    cert_dir,
                };
                callgate::idp::sim::run_cli(listen, opts, shutdown_signal()).await?;
                Ok(())
            })
        }
    }
}

fn audit(command: AuditCommand) -> ExitCode {
    use callgate::audit::cli;
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let code = match command {
        AuditCommand::Verify { config, dir } => {
            match cli::locate(config.as_deref(), dir.as_deref(), &mut err) {
                Ok(loc) => cli::verify(&loc.dir, &mut out),
                Err(code) => code,
            }
        }
        AuditCommand::Export { config } => {
            let mut input = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
                eprintln!("cannot read the personal number from stdin: {e}");
                return ExitCode::FAILURE;
            }
            let result = cli::locate(Some(&config), None, &mut err)
                .and_then(|loc| cli::export(&loc, &input, &mut out, &mut err));
            drop(input);
            match result {
                Ok(n) => {
                    let _ = std::io::Write::flush(&mut out);
                    eprintln!("{n} records");
                    0
                }
                Err(code) => code,
            }
        }
        AuditCommand::Tail {
            config,
            dir,
            lines,
            follow,
        } => match cli::locate(config.as_deref(), dir.as_deref(), &mut err) {
            Ok(loc) if follow => cli::follow(&loc.dir, lines, &mut out).err().unwrap_or(0),
            Ok(loc) => cli::tail(&loc.dir, lines, &mut out).err().unwrap_or(0),
            Err(code) => code,
        },
    };
    ExitCode::from(code)
}

fn runtime<F, Fut>(f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("callgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on the first SIGTERM or Ctrl-C; a second one exits at once.
async fn shutdown_signal() {
    wait_signal().await;
    tracing::info!("shutdown requested; a second signal exits at once");
    tokio::spawn(async {
        wait_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
