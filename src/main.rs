use clap::Parser;

fn main() {
    let cli = keel::cli::Cli::parse();
    match keel::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
