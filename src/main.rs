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
    let cli = keel::cli::Cli::parse();
    match keel::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
