//! Our `debug!`, `trace!` and `log!` macros.
//!
//! Cargo.toml turns on `log`'s `release_max_level_info`, which compiles every
//! `log::debug!` and `log::trace!` out of release builds, the dependencies'
//! (rustls, ureq: about 80 kB of the binary) and ours alike. The
//! dependencies' lines never reached the log anyway (main.rs lets only our
//! target through); ours are what `-v` and `log_level: debug`/`trace`
//! promise, so these macros emit them past that compile-time cap, checked
//! against the run-time level only. clippy.toml forbids `log::debug!` and
//! `log::trace!` in this crate; a `log!` whose level may be Debug must be
//! ours too.

use log::{Level, Record};

/// Callers import them from here: `use crate::logging::{debug, log, trace}`.
pub use super::{debug, log, trace};

/// `log::log!` that survives `release_max_level_info`.
#[macro_export]
macro_rules! log {
    ($lvl:expr, $($arg:tt)+) => {{
        let lvl: ::log::Level = $lvl;
        if lvl <= ::log::max_level() {
            $crate::logging::emit(
                lvl,
                ::core::format_args!($($arg)+),
                &(::core::module_path!(), ::core::file!(), ::core::line!()),
            );
        }
    }};
}

/// `log::debug!` that survives `release_max_level_info`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)+) => { $crate::logging::log!(::log::Level::Debug, $($arg)+) };
}

/// `log::trace!` that survives `release_max_level_info`.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)+) => { $crate::logging::log!(::log::Level::Trace, $($arg)+) };
}

/// Hands one record to the logger, with the target, module, file and line
/// that the `log` macros would give it.
#[doc(hidden)]
pub fn emit(
    level: Level,
    args: std::fmt::Arguments<'_>,
    &(module, file, line): &'static (&'static str, &'static str, u32),
) {
    log::logger().log(
        &Record::builder()
            .level(level)
            .args(args)
            .target(module)
            .module_path_static(Some(module))
            .file_static(Some(file))
            .line(Some(line))
            .build(),
    );
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use log::{Level, LevelFilter, Log, Metadata, Record};

    /// (level, target, file, message) of every record from this module.
    static SEEN: Mutex<Vec<(Level, String, String, String)>> = Mutex::new(Vec::new());

    struct Capture;

    impl Log for Capture {
        fn enabled(&self, _: &Metadata) -> bool {
            true
        }
        fn log(&self, r: &Record) {
            if r.target() == module_path!() {
                let file = r.file().unwrap_or("").to_string();
                let entry = (
                    r.level(),
                    r.target().to_string(),
                    file,
                    r.args().to_string(),
                );
                SEEN.lock().unwrap().push(entry);
            }
        }
        fn flush(&self) {}
    }

    #[test]
    fn records_carry_level_target_and_location_and_respect_the_run_time_level() {
        static CAPTURE: Capture = Capture;
        // The only test in the crate that installs a logger.
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(LevelFilter::Trace);
        let n = 3;
        debug!("debug {n}");
        trace!("trace {}", n + 1);
        log!(Level::Warn, "warn");
        log::set_max_level(LevelFilter::Debug);
        trace!("not shown");
        debug!("shown");
        log::set_max_level(LevelFilter::Off);
        let seen = SEEN.lock().unwrap().clone();
        let here = (module_path!().to_string(), file!().to_string());
        let got: Vec<_> = seen
            .iter()
            .map(|(l, t, f, m)| {
                assert_eq!((t, f), (&here.0, &here.1));
                (*l, m.as_str())
            })
            .collect();
        assert_eq!(
            got,
            [
                (Level::Debug, "debug 3"),
                (Level::Trace, "trace 4"),
                (Level::Warn, "warn"),
                (Level::Debug, "shown"),
            ]
        );
    }
}
