//! The `relay` binary: parse, set up logging, run, map the outcome to an exit code.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use relay::cli::Cli;
use relay::config::LogFormat;
use relay::error::EXIT_CONFIG;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// jemalloc rather than glibc's malloc: glibc gives each busy thread an arena of its own and
/// keeps what they free, so an agent that drained a large backlog stayed at several times its
/// idle size unless `MALLOC_ARENA_MAX` was set around it. jemalloc's background threads give
/// pages freed for about ten seconds back to the system, in any environment, idle or not.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The log filter from `RELAY_LOG`, or `default`; a value that is no filter is said on stderr
/// (logging is not up yet) rather than dropped without a word.
fn log_filter(value: Option<std::ffi::OsString>, default: &str) -> tracing_subscriber::EnvFilter {
    let fallback = || tracing_subscriber::EnvFilter::new(default);
    let Some(value) = value else {
        return fallback();
    };
    let Some(text) = value.to_str() else {
        eprintln!("relay: RELAY_LOG is not valid UTF-8; using the default ({default})");
        return fallback();
    };
    match tracing_subscriber::EnvFilter::try_new(text) {
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("relay: RELAY_LOG {text:?} is not a valid filter: {e}; using the default ({default})");
            fallback()
        }
    }
}

fn init_logging(format: LogFormat, daemon: bool) {
    let default = if daemon { "info" } else { "warn" };
    let filter = log_filter(std::env::var_os("RELAY_LOG"), default);
    use std::io::IsTerminal;
    // journald stamps and prioritises each line itself: no time, no colour, a priority prefix.
    let journal = format == LogFormat::Text && relay::notify::stderr_is_journal();
    // Colour only on a terminal: journald, Docker and files get plain text.
    let ansi = !journal && std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text if journal => builder
            .event_format(JournalPriority(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false)
                    .with_ansi(false),
            ))
            .init(),
        LogFormat::Text => builder.init(),
    }
}

/// Starts each line with its syslog priority (`<3>` error … `<7>` debug), which journald
/// strips and records, so `journalctl -p warning` works; then the level and the event.
struct JournalPriority<F>(F);

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let level = *event.metadata().level();
        let priority = match level {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            _ => 7,
        };
        // The level unpadded: the inner format would right-align it, leaving a leading space.
        write!(writer, "<{priority}>{level} ")?;
        self.0.format_event(ctx, writer, event)
    }
}

fn main() -> ExitCode {
    // Before anything is created: database files, keys and the admin socket are private even
    // when started under `umask 000`.
    relay::fsutil::private_umask();
    let cli = Cli::parse();
    let settings = match cli.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("relay: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    init_logging(settings.log_format, cli.is_daemon());
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        // Freed memory is then returned only as the process allocates, not while it idles.
        tracing::warn!(error = %e, "cannot start the allocator's background purging threads");
    }
    for name in relay::config::ignored_env(
        std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().unwrap_or_default()))),
    ) {
        tracing::debug!(variable = %name, "ignoring {name}: it is not a relay setting");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("relay: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(relay::cli::run(cli, settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relay: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
