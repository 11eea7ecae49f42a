//! The checks that need no running node: the key and the home, the model files, the clock.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::Check;
use crate::models::{self, KnownModel};

/// The node key: present, a file, owned by this user, and readable by nobody else.
pub fn key_permissions(path: &Path, uid: u32) -> Check {
    let shown = path.display();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::ok(
                "key",
                format!(
                    "none yet at {shown}: the first `mesh join` or `mesh id` creates it (0600)"
                ),
            );
        }
        Err(e) => {
            return Check::fail(
                "key",
                format!("cannot read {shown}: {e}"),
                format!("check the ownership of {shown}"),
            );
        }
    };
    if !meta.is_file() {
        return Check::fail(
            "key",
            format!("{shown} is not a plain file"),
            "move it away; `mesh id` creates a new key (a new peer id)",
        );
    }
    if meta.uid() != uid {
        return Check::fail(
            "key",
            format!(
                "{shown} belongs to uid {}, not to this user ({uid})",
                meta.uid()
            ),
            format!("chown {uid} {shown}"),
        );
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Check::fail(
            "key",
            format!("{shown} has mode {mode:03o}: others can read the node's secret key (the node refuses to start with it)"),
            format!("chmod 600 {shown}; if others may have copied it, move it away for a new identity"),
        );
    }
    Check::ok("key", format!("{shown} is private ({mode:03o})"))
}

/// The home directory: others must not write it (the node refuses to start) and should not
/// read it (it holds `node.json` with the API key, the revocation list, the models).
pub fn home_permissions(root: &Path) -> Check {
    let shown = root.display();
    let Ok(meta) = std::fs::metadata(root) else {
        return Check::ok("home", format!("{shown} does not exist yet"));
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Check::fail(
            "home",
            format!(
                "{shown} has mode {mode:03o}: others can write into it (the node refuses to start)"
            ),
            format!("chmod 700 {shown}"),
        );
    }
    if mode & 0o077 != 0 {
        return Check::warn(
            "home",
            format!("{shown} has mode {mode:03o}: others can list it"),
            format!("chmod 700 {shown}"),
        );
    }
    Check::ok("home", format!("{shown} is private ({mode:03o})"))
}

/// Every known model fetched into `models_dir`, against its pinned sizes and sha256.
pub fn model_files(models_dir: &Path, known: &[KnownModel]) -> Vec<Check> {
    let mut checks = Vec::new();
    for model in known {
        let dir = models::model_dir(models_dir, model);
        if !dir.exists() {
            continue;
        }
        let area = format!("model {}", model.name);
        match models::verify_known(models_dir, model) {
            Ok(()) => checks.push(Check::ok(
                area,
                format!("{} matches its pinned sha256", dir.display()),
            )),
            Err(e) => checks.push(Check::fail(
                area,
                e,
                format!("rm -r {} && mesh model fetch {}", dir.display(), model.name),
            )),
        }
    }
    if checks.is_empty() {
        checks.push(Check::ok(
            "models",
            format!("no known model fetched into {}", models_dir.display()),
        ));
    }
    checks
}

/// What the kernel says of the clock's synchronisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSync {
    /// An NTP daemon (or PTP) keeps the clock in step.
    pub synchronised: bool,
    /// The kernel's estimate of the clock's error, in microseconds.
    pub est_error_us: i64,
}

/// The kernel's view of the clock (`adjtimex`), if it gives one.
pub fn clock_sync() -> Option<ClockSync> {
    // SAFETY: modes 0 only reads the kernel's clock state into the zeroed struct.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state < 0 {
        return None;
    }
    Some(ClockSync {
        synchronised: state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0,
        est_error_us: tx.esterror,
    })
}

/// The earliest time a sane clock can show: mesh did not exist before (2026-01-01).
pub const EARLIEST_SANE_UNIX: u64 = 1_767_225_600;

/// Tokens (not-before, expiry) and receipts carry times: a clock far off refuses good
/// tokens or accepts expired ones.
pub fn clock(now_unix: u64, sync: Option<ClockSync>) -> Check {
    if now_unix < EARLIEST_SANE_UNIX {
        return Check::fail(
            "clock",
            format!("the clock says {now_unix} s since 1970, before 2026: tokens will look not yet valid or expired"),
            "set the time: timedatectl set-ntp true (or ntpdate / chronyd)",
        );
    }
    match sync {
        Some(s) if s.synchronised && s.est_error_us <= 1_000_000 => Check::ok(
            "clock",
            format!("synchronised (estimated error {} ms)", s.est_error_us / 1000),
        ),
        Some(s) if s.synchronised => Check::warn(
            "clock",
            format!("synchronised, but the kernel estimates an error of {} s", s.est_error_us / 1_000_000),
            "check the time source: chronyc tracking (or timedatectl timesync-status)",
        ),
        Some(_) => Check::warn(
            "clock",
            "not synchronised by NTP: it drifts, and tokens' validity windows are checked against it",
            "timedatectl set-ntp true (or run chronyd / systemd-timesyncd)",
        ),
        None => Check::ok("clock", "the kernel does not say whether the clock is synchronised"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::Verdict;
    use super::*;
    use std::fs;

    #[test]
    fn a_key_readable_by_others_fails_with_a_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("node.key");
        let uid = crate::home::effective_uid();
        assert_eq!(
            key_permissions(&key, uid).verdict,
            Verdict::Ok,
            "not created yet"
        );
        fs::write(&key, b"secret").unwrap();
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(key_permissions(&key, uid).verdict, Verdict::Ok);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let check = key_permissions(&key, uid);
        assert_eq!(check.verdict, Verdict::Fail);
        assert!(check.summary.contains("644"), "{}", check.summary);
        assert!(check.fix.unwrap().starts_with("chmod 600"));
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            key_permissions(&key, uid + 1).verdict,
            Verdict::Fail,
            "another owner"
        );
    }

    #[test]
    fn a_home_others_can_list_warns_and_one_they_can_write_fails() {
        let dir = tempfile::tempdir().unwrap();
        let set = |mode| fs::set_permissions(dir.path(), fs::Permissions::from_mode(mode)).unwrap();
        set(0o700);
        assert_eq!(home_permissions(dir.path()).verdict, Verdict::Ok);
        set(0o755);
        assert_eq!(home_permissions(dir.path()).verdict, Verdict::Warn);
        set(0o777);
        assert_eq!(home_permissions(dir.path()).verdict, Verdict::Fail);
        set(0o700);
    }

    #[test]
    fn a_changed_model_file_fails_and_an_absent_model_is_not_checked() {
        static FILES: [models::KnownFile; 1] = [models::KnownFile {
            in_wheel: "x",
            name: "w.bin",
            // sha256 of b"hello"
            sha256: "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            blob_root: "",
            size: 5,
        }];
        let model = KnownModel {
            name: "tiny",
            description: "",
            package: "",
            license: "",
            files: &FILES,
            entry: "w.bin",
        };
        let dir = tempfile::tempdir().unwrap();
        let checks = model_files(dir.path(), &[model]);
        assert_eq!((checks.len(), checks[0].area.as_str()), (1, "models"));
        let model_dir = models::model_dir(dir.path(), &model);
        fs::create_dir_all(&model_dir).unwrap();
        fs::write(model_dir.join("w.bin"), b"hello").unwrap();
        assert_eq!(model_files(dir.path(), &[model])[0].verdict, Verdict::Ok);
        fs::write(model_dir.join("w.bin"), b"jello").unwrap();
        let check = &model_files(dir.path(), &[model])[0];
        assert_eq!(
            (check.verdict, check.area.as_str()),
            (Verdict::Fail, "model tiny")
        );
        assert!(check
            .fix
            .as_ref()
            .unwrap()
            .contains("mesh model fetch tiny"));
    }

    #[test]
    fn a_clock_before_2026_fails_and_an_unsynchronised_one_warns() {
        let synced = ClockSync {
            synchronised: true,
            est_error_us: 2_000,
        };
        let now = EARLIEST_SANE_UNIX + 1000;
        assert_eq!(clock(now, Some(synced)).verdict, Verdict::Ok);
        assert_eq!(clock(12, Some(synced)).verdict, Verdict::Fail);
        let adrift = ClockSync {
            synchronised: false,
            est_error_us: 16_000_000,
        };
        assert_eq!(clock(now, Some(adrift)).verdict, Verdict::Warn);
        let vague = ClockSync {
            synchronised: true,
            est_error_us: 5_000_000,
        };
        assert_eq!(clock(now, Some(vague)).verdict, Verdict::Warn);
        assert_eq!(clock(now, None).verdict, Verdict::Ok);
        // This machine's kernel answers.
        assert!(clock_sync().is_some());
    }
}
