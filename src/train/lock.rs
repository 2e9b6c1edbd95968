//! One trainer per run directory: `DIR/keel.lock` holds the owner's PID. A lock whose process
//! is gone (killed, crashed) is stale and is taken over.

use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct RunLock {
    path: PathBuf,
}

fn alive(pid: u32) -> bool {
    // Linux: a live process has /proc/PID; check it is a keel process (PIDs get reused).
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmd) => String::from_utf8_lossy(&cmd).contains("keel"),
        Err(_) => false,
    }
}

/// The PID of the live keel process holding `dir`'s lock, if any.
pub fn holder(dir: &Path) -> Option<u32> {
    let owner = std::fs::read_to_string(dir.join("keel.lock")).ok()?;
    let pid = owner.trim().parse::<u32>().ok()?;
    (pid != std::process::id() && alive(pid)).then_some(pid)
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join("keel.lock");
        for _ in 0..3 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id())
                        .with_context(|| format!("{}: cannot write", path.display()))?;
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    match owner.trim().parse::<u32>() {
                        Ok(pid) if pid != std::process::id() && alive(pid) => bail!(
                            "{}: run directory is in use by keel process {pid}; fix: wait for it, stop it, or pick another --out",
                            dir.display()
                        ),
                        _ => {
                            // stale: its owner is gone
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("{}: cannot create lock", path.display()))
                }
            }
        }
        bail!("{}: could not take the run lock", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
