//! The command line: subcommands, their arguments and `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The environment variables the host reads, for every `--help`.
const ENVIRONMENT: &str = "\
Environment:
  COMMISSAIRE_BUS_URI     The bus URI when --bus-uri does not give one; wins over [bus] uri
                          in the config file (keep a password here rather than in files or
                          on the command line)
  COMMISSAIRE_HTTP_TOKEN  run: the HTTP endpoint's bearer token; wins over [http] token
  COMMISSAIRE_LOG         The log filter, e.g. `debug` or `info,commissaire_host::supervise=debug`
                          [default: info, or debug for an original JSON config saying
                          \"debug\": true]; RUST_LOG when it is unset
  TRACEPARENT             call and notify: the W3C trace context their request joins
A setting comes from its flag, else its environment variable, else the config file; a bus
URI or token set in one place but hidden by another is named in one warning at start.";

/// `plugins`' exit statuses.
const PLUGINS_EXIT: &str = "\
Exit status:
  plugins DIR             0: every file loaded; 1: a file was refused, or DIR cannot be used
  plugins --diff OLD NEW  0: NEW is compatible with OLD; 1: NEW breaks callers of OLD;
                          2: OLD or NEW cannot be loaded";

/// Serves Commissaire bus services from plugin libraries.
#[derive(Debug, Parser)]
#[command(name = "commissaire-host", version, about, after_help = ENVIRONMENT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the bus is: these flags win over `COMMISSAIRE_BUS_URI`, which wins
/// over the config file. (Not clap's `env`: the configuration resolves the
/// variable itself, to warn once about each value a winner hides and to
/// say where the URI came from when the bus cannot be reached.)
#[derive(Debug, Args)]
pub struct BusArgs {
    /// The host's TOML config file (see examples/host.toml), or an
    /// original Commissaire service's JSON one (storage.conf: it serves the
    /// service its name names; see docs/deploy.md).
    #[arg(
        short = 'c',
        long = "config",
        visible_alias = "config-file",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,
    /// The bus URI: amqp://, amqps://, redis://, rediss:// or memory://. Wins
    /// over $COMMISSAIRE_BUS_URI, which wins over [bus] uri in the config
    /// file; memory:// when none of them gives one.
    #[arg(long, value_name = "URI")]
    pub bus_uri: Option<String>,
    /// The topic exchange. Wins over [bus] exchange in the config file;
    /// commissaire when neither gives one.
    #[arg(long, value_name = "NAME")]
    pub bus_exchange: Option<String>,
}

impl Cli {
    /// The config file the command reads, if it names one.
    pub fn config_file(&self) -> Option<&std::path::Path> {
        match &self.command {
            Command::Run { bus, .. }
            | Command::Worker { bus, .. }
            | Command::Call { bus, .. }
            | Command::Notify { bus, .. }
            | Command::Describe { bus, .. } => bus.config.as_deref(),
            Command::Quarantine(q) => q.bus().config.as_deref(),
            Command::Plugins { .. } => None,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serves every plugin of the plugin directory on the bus until
    /// SIGINT/SIGTERM. On a broker, each service runs in `workers` worker
    /// processes that are restarted when they die; SIGHUP restarts them one
    /// at a time to pick up new or replaced plugins.
    #[command(after_help = ENVIRONMENT)]
    Run {
        #[command(flatten)]
        bus: BusArgs,
        /// The directory of built plugins (.so files). Wins over [plugins]
        /// dir in the config file; ./plugins when neither gives one.
        #[arg(long, value_name = "DIR")]
        plugins_dir: Option<PathBuf>,
        /// Serve the HTTP endpoint here, e.g. 127.0.0.1:8080. Wins over
        /// [http] listen in the config file; no HTTP endpoint when neither
        /// gives one. Its bearer token comes from the environment variable
        /// COMMISSAIRE_HTTP_TOKEN (preferred: kept out of files and argv)
        /// or [http] token; without one, anyone who reaches the address can
        /// call every service.
        #[arg(long, value_name = "ADDR")]
        http_listen: Option<SocketAddr>,
        /// Exit at once if the broker is unreachable at startup, instead of
        /// retrying. (A broker that refuses the login, the vhost or TLS
        /// ends `run` after three attempts either way.)
        #[arg(long)]
        fail_fast: bool,
        /// Load plugins that someone other than root and the host's user
        /// could change: a file, or a directory on its real path up to /,
        /// owned by another user or writable by group or others (refused
        /// by default, as ssh refuses such keys: whoever can change them
        /// can run code in the host).
        #[arg(long)]
        allow_insecure_plugins: bool,
        /// Let a SIGHUP roll swap in a plugin whose contract breaks its
        /// callers (a method removed, a required parameter added, a type
        /// changed); refused by default, the old version serving on. As
        /// [host] allow_breaking_upgrades = true.
        #[arg(long)]
        allow_breaking: bool,
    },
    /// Internal: one worker process of `run`.
    #[command(hide = true)]
    Worker {
        #[command(flatten)]
        bus: BusArgs,
        /// The plugin directory.
        #[arg(long)]
        plugins_dir: Option<PathBuf>,
        /// The service this worker serves.
        #[arg(long)]
        service: String,
        /// Where it records the requests it is running.
        #[arg(long)]
        slot_file: Option<PathBuf>,
        /// Exit if the broker is unreachable.
        #[arg(long)]
        fail_fast: bool,
        /// As `run`'s.
        #[arg(long)]
        allow_insecure_plugins: bool,
    },
    /// Sends a request and prints its result as JSON. A JSON-RPC error goes
    /// to stderr and exits 2; no reply or no bus exits 1.
    #[command(after_help = ENVIRONMENT)]
    Call {
        /// Where to send it, e.g. `simple.add`.
        routing_key: String,
        /// The params: a JSON array or object.
        #[arg(value_name = "PARAMS_JSON")]
        params: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
        /// Seconds to wait for the reply, at most 300. Wins over [bus]
        /// request_timeout in the config file; 10 when neither gives one.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// Ask the service for its contract first (as `describe` does) and
        /// check the params against it: params that do not fit are said
        /// (which parameter, and why) and exit 2 without being sent.
        #[arg(long)]
        check: bool,
    },
    /// Sends a notification: the handler runs, nothing comes back.
    #[command(after_help = ENVIRONMENT)]
    Notify {
        /// Where to send it, e.g. `demo.ping`.
        routing_key: String,
        /// The params: a JSON array or object.
        #[arg(value_name = "PARAMS_JSON")]
        params: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Asks a running service for its contract (the discovery request,
    /// `SERVICE.rpc_discover`) and prints it: each method's parameters and
    /// result with their types, whether it is async or a notification, its
    /// doc and the errors it declares. A JSON-RPC error goes to stderr and
    /// exits 2 (a service without discovery answers -32601); no reply or
    /// no bus exits 1.
    #[command(after_help = ENVIRONMENT)]
    Describe {
        /// The service (`simple`), or a routing key of it (`simple.add`:
        /// only that method; `simple.*`: the whole service).
        #[arg(value_name = "ROUTING_KEY|SERVICE")]
        target: String,
        /// Print the OpenRPC document as the service sent it (the whole
        /// document, whatever method is named).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        bus: BusArgs,
        /// Seconds to wait for the answer, as `call`'s.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Requests kept because they were refused as poison, made their
    /// handler panic, or timed out: list, show, replay, turn into a test,
    /// drop (see docs/quarantine.md). The same bus options as `call`.
    #[command(subcommand)]
    Quarantine(QuarantineCommand),
    /// Lists the plugins in a directory: service, versions, methods, and
    /// "(no contract)" for a plugin built before contracts. `--openrpc`
    /// prints each service's contract instead; `--diff OLD NEW` compares
    /// two versions of a plugin as a SIGHUP roll does.
    #[command(after_help = PLUGINS_EXIT)]
    Plugins {
        /// The plugin directory.
        #[arg(required_unless_present = "diff", conflicts_with = "diff")]
        dir: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Print a JSON object mapping each service to its OpenRPC
        /// document (a plugin without its own gets one derived from its
        /// method list, marked "x-derived": true).
        #[arg(long, conflicts_with = "json")]
        openrpc: bool,
        /// Compare the contract of plugin file OLD with that of NEW: one
        /// line per difference, BREAKING where callers of OLD may fail
        /// against NEW, then the verdict.
        #[arg(long, num_args = 2, value_names = ["OLD", "NEW"], conflicts_with = "openrpc")]
        diff: Option<Vec<PathBuf>>,
        /// Load plugins that someone other than root and the host's user
        /// could change: a file, or a directory on its real path up to /,
        /// owned by another user or writable by group or others (refused
        /// by default, as ssh refuses such keys: whoever can change them
        /// can run code in the host).
        #[arg(long)]
        allow_insecure_plugins: bool,
    },
}

/// `quarantine`'s subcommands. An ID is `QUEUE:FINGERPRINT`, as `list`
/// prints it.
#[derive(Debug, Subcommand)]
pub enum QuarantineCommand {
    /// One line per quarantined request (repeats counted, not listed):
    /// id, last time, reason, method, body size, trace id, count.
    #[command(after_help = ENVIRONMENT)]
    List {
        /// Only this service's quarantines (default: every service of the
        /// config file).
        service: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Prints a request in full: properties, headers, the body
    /// pretty-printed with passwords and tokens replaced, control
    /// characters escaped.
    #[command(after_help = ENVIRONMENT)]
    Show {
        /// The entry, as `list` prints it.
        id: String,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Sends the request's params again to the live service (a new id,
    /// the caller's trace context) and prints the answer; or, with
    /// --plugin, runs the request as stored against that plugin file in a
    /// process of its own, without the bus, and prints what the handler
    /// answers or how it crashes.
    #[command(after_help = ENVIRONMENT)]
    Replay {
        /// The entry, as `list` prints it.
        id: String,
        /// Send it under this routing key instead of its own.
        #[arg(long, value_name = "ROUTING_KEY", conflicts_with = "plugin")]
        to: Option<String>,
        /// Run it against this plugin file (a fixed build, say) instead.
        #[arg(long, value_name = "FILE")]
        plugin: Option<PathBuf>,
        /// With --plugin: load a plugin file others could change (as
        /// `run`'s).
        #[arg(long)]
        allow_insecure_plugins: bool,
        /// Seconds to wait for the live service's answer (as `call`'s).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Prints a #[test] for the plugin's own test suite that calls the
    /// handler through plugin-api's TestService with exactly that
    /// request's params.
    #[command(after_help = ENVIRONMENT)]
    Test {
        /// The entry, as `list` prints it.
        id: String,
        /// The plugin's service type (default: the service name in
        /// CamelCase).
        #[arg(long = "type", value_name = "TYPE")]
        service_type: Option<String>,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Removes an entry (every entry of its fingerprint), or with --all
    /// every entry of a service's quarantines (default: every service of
    /// the config file).
    #[command(after_help = ENVIRONMENT)]
    Drop {
        /// The entry; with --all, a service.
        target: Option<String>,
        /// Every entry.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        bus: BusArgs,
    },
    /// Internal: `replay --plugin`'s child process (the entry and the
    /// plugin's config on stdin).
    #[command(hide = true)]
    RunEntry {
        /// The plugin file.
        #[arg(long)]
        plugin: PathBuf,
        /// As `replay`'s.
        #[arg(long)]
        allow_insecure_plugins: bool,
    },
}

impl QuarantineCommand {
    /// Its bus options.
    pub fn bus(&self) -> &BusArgs {
        static NONE: BusArgs = BusArgs {
            config: None,
            bus_uri: None,
            bus_exchange: None,
        };
        match self {
            Self::List { bus, .. }
            | Self::Show { bus, .. }
            | Self::Replay { bus, .. }
            | Self::Test { bus, .. }
            | Self::Drop { bus, .. } => bus,
            Self::RunEntry { .. } => &NONE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;

    #[test]
    fn help_names_every_environment_variable() {
        use clap::CommandFactory as _;
        let mut cli = Cli::command();
        for sub in ["run", "call", "notify", "describe"] {
            let help = cli
                .find_subcommand_mut(sub)
                .map(|c| c.render_long_help().to_string())
                .unwrap_or_default();
            for var in [
                "COMMISSAIRE_BUS_URI",
                "COMMISSAIRE_HTTP_TOKEN",
                "COMMISSAIRE_LOG",
                "RUST_LOG",
            ] {
                assert!(help.contains(var), "`{sub} --help` does not name {var}");
            }
            assert!(!help.contains("[default: memory://]"), "{help}");
        }
    }
}
