//! Failpoint names, in one place so a misspelt `fail::cfg` cannot silently do nothing.
//!
//! Each marks a step of the raft loop where a crash must lose no acknowledged change. Enabled
//! with the `failpoints` feature; tests set them at run time through the SetFailpoint RPC with
//! the action `return`, which aborts the process on the spot (no destructors, no flushes: as
//! close to `kill -9` as a process can do to itself).

/// Leader or follower: new entries are in hand, nothing of them is persisted yet.
pub const BEFORE_PERSIST: &str = "meta::before_persist";
/// Entries and hard state are on media; the messages that tell peers so are not sent yet.
pub const AFTER_PERSIST: &str = "meta::after_persist";
/// Committed entries are in hand, not applied yet.
pub const BEFORE_APPLY: &str = "meta::before_apply";
/// Entries are applied and their records written; the clients have not been answered.
pub const AFTER_APPLY: &str = "meta::after_apply";
/// A snapshot from the leader is in hand, not installed yet.
pub const BEFORE_SNAPSHOT_INSTALL: &str = "meta::before_snapshot_install";
/// Applied entries are about to be removed from the log.
pub const BEFORE_COMPACT: &str = "meta::before_compact";

/// Every failpoint, for the SetFailpoint RPC's validation.
pub const ALL: &[&str] = &[
    BEFORE_PERSIST,
    AFTER_PERSIST,
    BEFORE_APPLY,
    AFTER_APPLY,
    BEFORE_SNAPSHOT_INSTALL,
    BEFORE_COMPACT,
];

/// Crashes the process here when the named failpoint is set to `return`.
macro_rules! crash_point {
    ($name:expr) => {{
        let _name: &str = $name;
        fail::fail_point!($name, |_| {
            tracing::error!(failpoint = $name, "failpoint: aborting the process");
            std::process::abort()
        })
    }};
}
pub(crate) use crash_point;

/// Configures failpoints from the `FAILPOINTS` environment variable (`name=action;…`), in
/// builds with the `failpoints` feature; does nothing otherwise.
pub fn setup_from_env() {
    #[cfg(feature = "failpoints")]
    {
        if let Ok(spec) = std::env::var("FAILPOINTS") {
            for item in spec.split(';').filter(|s| !s.trim().is_empty()) {
                match item.split_once('=') {
                    Some((name, actions)) if ALL.contains(&name.trim()) => {
                        if let Err(e) = fail::cfg(name.trim(), actions.trim()) {
                            tracing::error!(name, error = %e, "bad failpoint action in FAILPOINTS");
                        }
                    }
                    _ => tracing::error!(item, "unknown failpoint in FAILPOINTS"),
                }
            }
        }
    }
}
