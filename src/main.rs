//! `patroni-proxy`: command line, logging, exit codes. Everything else is in
//! the library; `run` returns a `Result` and `main` maps it to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use log::{error, info, warn};
use patroni_proxy::config;
use patroni_proxy::proxy::Proxy;

const USAGE: &str = "\
usage: patroni-proxy [OPTIONS] [CONFIG]

Routes PostgreSQL clients to the members of Patroni clusters by role.

arguments:
  CONFIG              configuration file (default /etc/patroni-proxy/patroni-proxy.yaml)

options:
  -c, --config FILE   configuration file (same as CONFIG)
  -t, --test          check the configuration and exit: 0 if valid, 2 if not
  -v, --verbose       more logging; repeat for more (-vv)
  -h, --help          print this help
  -V, --version       print the version

signals: HUP reloads the configuration, TERM/INT drain and exit (twice: at
once), QUIT exits at once, USR1 polls Patroni now. See patroni-proxy(1).
";

const DEFAULT_CONFIG: &str = "/etc/patroni-proxy/patroni-proxy.yaml";

struct Args {
    config: PathBuf,
    test: bool,
    verbosity: u8,
}

enum Cli {
    Run(Args),
    Exit(ExitCode),
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Cli, String> {
    let mut config: Option<PathBuf> = None;
    let mut test = false;
    let mut verbosity = 0u8;
    let mut args = args.peekable();
    let set_config = |path: String, config: &mut Option<PathBuf>| {
        if config.replace(PathBuf::from(&path)).is_some() {
            return Err("more than one configuration file given".to_string());
        }
        Ok(())
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(Cli::Exit(ExitCode::SUCCESS));
            }
            "-V" | "--version" => {
                println!("patroni-proxy {}", env!("CARGO_PKG_VERSION"));
                return Ok(Cli::Exit(ExitCode::SUCCESS));
            }
            "-t" | "--test" => test = true,
            "-c" | "--config" => {
                let path = args.next().ok_or("-c needs a file")?;
                set_config(path, &mut config)?;
            }
            s if s.starts_with("--config=") => {
                set_config(s["--config=".len()..].to_string(), &mut config)?
            }
            s if s.starts_with("-v") && s[1..].chars().all(|c| c == 'v') => {
                verbosity = verbosity.saturating_add((s.len() - 1) as u8)
            }
            "--verbose" => verbosity = verbosity.saturating_add(1),
            s if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option {s}")),
            _ => set_config(arg, &mut config)?,
        }
    }
    Ok(Cli::Run(Args {
        config: config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG)),
        test,
        verbosity,
    }))
}

fn init_logging(level: log::LevelFilter) {
    let cfg = simplelog::ConfigBuilder::new()
        .set_target_level(log::LevelFilter::Off)
        .set_thread_level(log::LevelFilter::Off)
        .set_time_format_rfc3339()
        // Only our own lines: the dependencies' debug output is noise here.
        .add_filter_allow_str("patroni_proxy")
        .build();
    // Stderr: journald and container runtimes capture it.
    let _ = simplelog::WriteLogger::init(log::LevelFilter::Trace, cfg, std::io::stderr());
    log::set_max_level(level);
}

fn run(args: Args) -> ExitCode {
    let cfg = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("patroni-proxy: {e}");
            return ExitCode::from(e.exit_code());
        }
    };
    if args.test {
        for w in cfg.warnings() {
            eprintln!("patroni-proxy: warning: {w}");
        }
        println!(
            "patroni-proxy: configuration {} is valid",
            args.config.display()
        );
        return ExitCode::SUCCESS;
    }
    init_logging(config::raise_level(cfg.log_level, args.verbosity));
    info!(
        "patroni-proxy {} starting with {}",
        env!("CARGO_PKG_VERSION"),
        args.config.display()
    );
    for w in cfg.warnings() {
        warn!("{w}");
    }
    let mut proxy = match Proxy::new(cfg, args.config, args.verbosity) {
        Ok(p) => p,
        Err(e) => {
            error!("{e}");
            return ExitCode::from(e.exit_code());
        }
    };
    match proxy.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn main() -> ExitCode {
    match parse_args(std::env::args().skip(1)) {
        Ok(Cli::Run(args)) => run(args),
        Ok(Cli::Exit(code)) => code,
        Err(msg) => {
            eprintln!("patroni-proxy: {msg}\n\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
