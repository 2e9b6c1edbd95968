//! `keel report sqlite:///study.db`: an Optuna study drawn as a keel sweep. The Python
//! package's `keel.optuna export` reads the study (Optuna's own storage code, so any RDB URL
//! works) into keel's sweep format; the analysis, the stability maps and the page are the
//! sweep's, here.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// An Optuna storage: an RDB URL (sqlite:///x.db, postgresql://...) or an SQLite file.
pub fn is_storage(p: &Path) -> bool {
    let s = p.to_string_lossy();
    s.contains("://")
        || (p.is_file()
            && p.extension()
                .is_some_and(|e| matches!(e.to_str(), Some("db" | "sqlite" | "sqlite3"))))
}

pub fn report(storage: &Path, study: Option<&str>, out: Option<&Path>) -> Result<PathBuf> {
    let url = storage.to_string_lossy().to_string();
    let out: PathBuf = match out {
        Some(o) => o.to_path_buf(),
        None if !url.contains("://") => storage.with_extension("keel"),
        None => bail!(
            "{url}: an Optuna storage URL; fix: give the directory to write its sweep report to with --out DIR"
        ),
    };
    let python = std::env::var("KEEL_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut cmd = std::process::Command::new(&python);
    cmd.args(["-m", "keel.optuna", "export", "--storage", &url, "--out"])
        .arg(&out)
        .arg("--no-report");
    if let Some(s) = study {
        cmd.args(["--study", s]);
    }
    let o = cmd.output().with_context(|| {
        format!("cannot run {python} to read the Optuna study; fix: install Python 3 with `pip install optuna ./bindings/python`, or set KEEL_PYTHON")
    })?;
    if !o.status.success() {
        let err = String::from_utf8_lossy(&o.stderr);
        let err = err.trim();
        if err.contains("No module named keel") {
            bail!("{url}: reading an Optuna study needs keel's Python package; fix: pip install ./bindings/python (and optuna)");
        }
        bail!(
            "{url}: {}",
            if err.is_empty() {
                "keel.optuna export failed"
            } else {
                err
            }
        );
    }
    eprint!("{}", String::from_utf8_lossy(&o.stdout));
    crate::sweep::run::refresh(&out)?;
    super::write(&out)
}
