//! A skewed wall clock for a child process, with libfaketime (Debian's `faketime` package,
//! installed by `scripts/setup`): only the wall clock moves; the monotonic clock (tokio
//! timers, `Instant`) stays real, so the process keeps its pace and only its idea of the
//! time of day differs, as with a replica whose NTP is off.

use std::path::{Path, PathBuf};

/// Where Debian puts the library: `/usr/lib/<multiarch triplet>/faketime/`, so look through
/// `/usr/lib/*/faketime/` rather than name one architecture. `PRESENCED_LIBFAKETIME` names
/// another path.
pub fn libfaketime() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PRESENCED_LIBFAKETIME") {
        return Some(PathBuf::from(p));
    }
    let name = "faketime/libfaketime.so.1";
    let mut dirs = vec![PathBuf::from("/usr/lib"), PathBuf::from("/usr/local/lib")];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        let mut arch: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        arch.sort();
        dirs.extend(arch);
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| Path::new(p).is_file())
}

/// Environment for a child whose wall clock is `offset` off, in libfaketime's relative
/// syntax: `"+15s"`, `"-2.5"` (seconds), `"+1m"`. Panics if libfaketime is not installed.
pub fn skewed_clock(offset: &str) -> Vec<(String, String)> {
    assert!(
        offset.starts_with('+') || offset.starts_with('-'),
        "a relative offset like +15s, not {offset:?}"
    );
    let lib = libfaketime().expect(
        "libfaketime not found: install it (apt-get install -y faketime) or set PRESENCED_LIBFAKETIME",
    );
    vec![
        ("LD_PRELOAD".into(), lib.to_string_lossy().into_owned()),
        ("FAKETIME".into(), offset.into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}
