//! Process-level setup of the long-running subcommands: `tracing` output and signal handling.

use crate::config::Config;

/// Sets up `tracing` output as the config asks (text or JSON); `RUST_LOG` overrides the level.
pub fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.logging.level));
    use std::io::IsTerminal;
    // Colours only on a terminal, never into files and pipes, and never under NO_COLOR.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match config.logging.format {
        crate::config::LogFormat::Json => builder.json().try_init(),
        crate::config::LogFormat::Text => builder.try_init(),
    };
}

/// SIGINT/SIGTERM stop gracefully (a second one exits at once); SIGHUP reloads policies.
pub fn install_signal_handlers(control: std::sync::Arc<crate::clock::Control>) {
    spawn_async("segloop-signals", move || async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            eprintln!("error: cannot install signal handlers");
            return;
        };
        loop {
            let stop = tokio::select! {
                _ = term.recv() => true,
                _ = int.recv() => true,
                _ = hup.recv() => false,
            };
            if !stop {
                tracing::info!("SIGHUP: reloading policies");
                control.request_reload();
            } else if control.stopping() {
                eprintln!("second signal: exiting now");
                std::process::exit(130);
            } else {
                tracing::info!("signal: stopping gracefully (again to exit at once)");
                control.stop();
            }
        }
    })
    .expect("the signal thread should start");
}

/// Runs the future `task` makes on a single-threaded tokio runtime of its own, in a thread
/// named `name` (the signal handlers, the admin server).
///
/// # Errors
/// The thread cannot start. A runtime that cannot be built is logged and the thread ends.
pub fn spawn_async<F, Fut>(name: &str, task: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let thread = name.to_string();
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(task()),
                Err(e) => tracing::error!(thread, error = %e, "cannot start an async runtime"),
            }
        })
}
