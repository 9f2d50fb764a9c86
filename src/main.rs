//! The `presenced` binary: parses the command line, loads the configuration, installs
//! logging, and hands off to the library. Exit codes (contract): 0 clean shutdown, 2 bad
//! configuration or arguments, 1 anything else (a Redis refused at start, a task that
//! panicked: `lib::Error`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{value_parser, Arg, ArgMatches, Command};
use presenced::config::{self, Config, Sources, KEYS};
use presenced::device::{Levels, TopicTemplate};
use presenced::simulate::{Outage, SimOptions};
use presenced::telemetry::LogFormat;

const EXIT_RUNTIME: u8 = 1;
const EXIT_USAGE: u8 = 2;

/// Any error, with its chain of sources.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a command failed, which decides the exit code.
enum Failure {
    /// Bad arguments or configuration: exit 2.
    Usage(BoxError),
    /// The async runtime could not start: exit 1.
    Startup(BoxError),
    /// Anything at run time: exit 1.
    Runtime(BoxError),
}

impl Failure {
    fn runtime(e: impl Into<BoxError>) -> Failure {
        Failure::Runtime(e.into())
    }
}

/// The error and its sources on one line, `: `-separated. A source whose text the line
/// already holds is skipped: many errors quote their source in their own message.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

fn cli() -> Command {
    let mut global = vec![
        Arg::new("config")
            .long("config")
            .env("PRESENCED_CONFIG")
            .value_name("FILE")
            .global(true)
            .help("TOML configuration file"),
        Arg::new("log-format")
            .long("log-format")
            .env("PRESENCED_LOG_FORMAT")
            .value_parser(["text", "json"])
            .default_value("text")
            .global(true)
            .help("Log format on stderr"),
    ];
    for key in KEYS {
        global.push(
            Arg::new(key.path())
                .long(key.flag())
                .value_name("VALUE")
                .global(true)
                .hide_short_help(true)
                .help(key.help),
        );
    }
    Command::new("presenced")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Tells IoT fleet operators which devices are online and which went silent.")
        // A flag given twice: the last one wins, as with the config sources.
        .args_override_self(true)
        .args(global)
        .subcommand(Command::new("run").about("Run the monitor (the default)"))
        .subcommand(
            Command::new("simulate")
                .about("Simulate a fleet publishing heartbeats")
                .arg(
                    Arg::new("devices")
                        .long("devices")
                        .required(true)
                        .value_parser(value_parser!(usize))
                        .help("Number of devices"),
                )
                .arg(
                    Arg::new("interval")
                        .long("interval")
                        .required(true)
                        .value_parser(|s: &str| config::parse_duration(s))
                        .help("Heartbeat interval per device, e.g. 10s"),
                )
                .arg(
                    Arg::new("offline-fraction")
                        .long("offline-fraction")
                        .default_value("0")
                        .value_parser(value_parser!(f64))
                        .help("Fraction of devices (the last ones) that go silent after their first heartbeat"),
                )
                .arg(
                    Arg::new("duration")
                        .long("duration")
                        .value_parser(|s: &str| config::parse_duration(s))
                        .help("Stop after this long (default: until SIGINT)"),
                )
                .arg(
                    Arg::new("prefix")
                        .long("prefix")
                        .default_value("sim")
                        .help("Device id prefix"),
                )
                .arg(
                    Arg::new("groups")
                        .long("groups")
                        .default_value("0")
                        .value_parser(value_parser!(usize))
                        .help("Spread the devices over this many groups (<prefix>-g001 ...), named in their heartbeats"),
                )
                .arg(
                    Arg::new("outage")
                        .long("outage")
                        .action(clap::ArgAction::Append)
                        .value_name("GROUP@DELAY+LENGTH")
                        .value_parser(|s: &str| Outage::parse(s).map_err(|e| e.to_string()))
                        .help("Silence every device of GROUP after DELAY for LENGTH, e.g. sim-g003@60s+30s (repeatable)"),
                )
                .arg(
                    Arg::new("will-topic")
                        .long("will-topic")
                        .value_name("TEMPLATE")
                        .value_parser(|s: &str| {
                            TopicTemplate::parse_with(s, Levels::DeviceAndGroup).map_err(|e| e.to_string())
                        })
                        .help("Devices that go silent publish their will (\"offline\") here, e.g. devices/{device}/will"),
                ),
        )
        .subcommand(
            Command::new("check-config")
                .about("Validate the configuration and reach Redis and MQTT"),
        )
}

fn sources(m: &ArgMatches) -> Sources {
    Sources {
        file: m.get_one::<String>("config").map(Into::into),
        env: std::env::vars().collect(),
        flags: KEYS
            .iter()
            .filter_map(|k| {
                m.get_one::<String>(&k.path())
                    .map(|v| (k.path(), v.clone()))
            })
            .collect(),
    }
}

/// The subcommand's options, as `simulate` takes them.
fn sim_options(sub: &ArgMatches) -> SimOptions {
    SimOptions {
        devices: sub.get_one::<usize>("devices").copied().unwrap_or(0),
        interval: sub
            .get_one::<Duration>("interval")
            .copied()
            .unwrap_or(Duration::from_secs(10)),
        offline_fraction: sub
            .get_one::<f64>("offline-fraction")
            .copied()
            .unwrap_or(0.0),
        duration: sub.get_one::<Duration>("duration").copied(),
        prefix: sub
            .get_one::<String>("prefix")
            .cloned()
            .unwrap_or_else(|| "sim".into()),
        groups: sub.get_one::<usize>("groups").copied().unwrap_or(0),
        outages: sub
            .get_many::<Outage>("outage")
            .map(|o| o.cloned().collect())
            .unwrap_or_default(),
        will_topic: sub.get_one::<TopicTemplate>("will-topic").cloned(),
    }
}

/// Runs the subcommand `name` (`run` when none was given).
async fn command(name: &str, sub: &ArgMatches, cfg: Config) -> Result<(), Failure> {
    match name {
        "simulate" => {
            let opts = sim_options(sub);
            if let Err(e) = opts.validate() {
                return Err(Failure::Usage(e.into()));
            }
            presenced::simulate::run(&cfg.mqtt, opts, presenced::shutdown::signal())
                .await
                .map(|_| ())
                .map_err(Failure::runtime)
        }
        "check-config" => {
            let lines = presenced::check::report(&cfg)
                .await
                .map_err(Failure::runtime)?;
            for l in lines {
                println!("{l}");
            }
            Ok(())
        }
        _ => {
            tracing::info!(config = ?cfg, "Effective configuration.");
            presenced::metrics::register_process_collector();
            presenced::run(cfg, presenced::shutdown::signal())
                .await
                .map_err(Failure::runtime)
        }
    }
}

/// Loads the configuration (exit 2 if it is bad) and logs its warnings.
fn config(sub: &ArgMatches) -> Result<Config, Failure> {
    let loaded = Config::load(&sources(sub)).map_err(|e| Failure::Usage(e.into()))?;
    for w in &loaded.warnings {
        tracing::warn!(warning = %w, "Configuration warning.");
    }
    Ok(loaded.config)
}

fn main() -> ExitCode {
    let matches = match cli().try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let format = match matches.get_one::<String>("log-format").map(String::as_str) {
        Some("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    presenced::telemetry::init(format);

    let (name, sub) = match matches.subcommand() {
        Some((name, sub)) => (name, sub),
        None => ("run", &matches),
    };
    let result = config(sub).and_then(|cfg| {
        let runtime = tokio::runtime::Runtime::new().map_err(|e| Failure::Startup(e.into()))?;
        let result = runtime.block_on(command(name, sub, cfg));
        // Don't wait for blocking tasks (e.g. a DNS lookup) left behind.
        runtime.shutdown_timeout(Duration::from_secs(1));
        result
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("presenced: {}", chain(e.as_ref()));
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Startup(e)) => {
            eprintln!("presenced: cannot start the runtime: {}", chain(e.as_ref()));
            ExitCode::from(EXIT_RUNTIME)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("presenced: {}", chain(e.as_ref()));
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
