use clap::Parser;

#[cfg(unix)]
fn default_sigpipe() {
    // Rust ignores SIGPIPE, so `keel check | head` would panic on the closed pipe; a CLI
    // should end quietly instead, as other Unix tools do.
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: restoring the default disposition of one signal at start-up, before any thread.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

fn main() {
    #[cfg(unix)]
    default_sigpipe();
    // Usage errors exit 1 like any bad input: 2 means "diverged", and a sidecar script must
    // not stop a healthy job over a typo in its own flags.
    let cli = match keel::cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match e.kind() {
                clap::error::ErrorKind::DisplayHelp
                | clap::error::ErrorKind::DisplayVersion
                | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => 0,
                _ => 1,
            };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    match keel::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
