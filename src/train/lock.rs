//! One writer per run directory: `DIR/keel.lock` carries an OS advisory lock (`flock`) held
//! for the owning process's life, and the owner's PID for messages. The kernel drops the lock
//! when the process dies however it dies, so there is no stale lock to guess about, and no
//! window between creating the file and writing the PID in which a second process could take
//! it over (the PID is informative only; the lock is the truth).

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

pub struct RunLock {
    path: PathBuf,
    file: File,
}

#[cfg(unix)]
fn try_flock(f: &File, exclusive: bool) -> std::io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor we own for the duration of the call.
    let r = unsafe { libc::flock(f.as_raw_fd(), op) };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

#[cfg(not(unix))]
fn try_flock(_f: &File, _exclusive: bool) -> std::io::Result<bool> {
    Ok(true)
}

fn same_file(f: &File, path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (f.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (f, path);
        true
    }
}

fn pid_in(path: &Path) -> Option<u32> {
    let mut s = String::new();
    File::open(path).ok()?.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The PID of another live process holding `dir`'s lock, if any (0 when it has not written
/// its PID yet).
pub fn holder(dir: &Path) -> Option<u32> {
    let path = dir.join("keel.lock");
    let f = File::open(&path).ok()?;
    match try_flock(&f, false) {
        Ok(true) => None, // nobody holds it (dropping `f` releases our probe)
        Ok(false) => {
            let pid = pid_in(&path).unwrap_or(0);
            (pid != std::process::id()).then_some(pid)
        }
        Err(_) => None,
    }
}

impl RunLock {
    pub fn acquire(dir: &Path) -> Result<RunLock> {
        let path = dir.join("keel.lock");
        // a holder that removes the file as it exits can leave us a lock on an unlinked
        // file: lock, then check the name still points to what we locked, else retry
        for _ in 0..5 {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .with_context(|| format!("{}: cannot create the run lock", path.display()))?;
            let got = try_flock(&file, true)
                .with_context(|| format!("{}: cannot lock", path.display()))?;
            if !got {
                let who = match pid_in(&path) {
                    Some(pid) => format!("keel process {pid}"),
                    None => "another keel process".to_string(),
                };
                bail!(
                    "{}: run directory is in use by {who}; fix: wait for it, stop it, or pick another --out",
                    dir.display()
                );
            }
            if !same_file(&file, &path) {
                continue;
            }
            file.set_len(0)?;
            file.rewind()?;
            writeln!(file, "{}", std::process::id())
                .with_context(|| format!("{}: cannot write", path.display()))?;
            return Ok(RunLock { path, file });
        }
        bail!("{}: could not take the run lock", path.display())
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // remove the name while still holding the lock; a process that opened the old file
        // meanwhile sees the name gone after locking it, and retries
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
    }
}
