//! Who a service runs as under the direct supervisor, and its state
//! directory.
//!
//! A service whose manifest names no user gets one of its own, as systemd's
//! `DynamicUser=` gives under the other supervisor: a uid from the range
//! systemd keeps for that (61184–65519), not in the device's user database,
//! recorded in `service-users.json` so that a service keeps its uid (and
//! owns its files) across restarts, reboots and agent upgrades. It can read
//! its release and write its state directory (`$STATE_DIRECTORY`), nothing
//! of the agent's: state, journal, configuration and keys stay the agent's.
//!
//! Only root can give a process another uid: an agent running as a user
//! runs its services as itself.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ferry_protocol::ServiceName;
use nix::unistd::{Gid, Uid, User, chown};

use super::{RunAs, ServiceSpec};
use crate::durable;
use crate::layout::Layout;

/// The uids handed out, as systemd's `DynamicUser=` range.
pub const FIRST_UID: u32 = 61184;
/// The last uid handed out.
pub const LAST_UID: u32 = 65519;

/// How one start of a service runs: the ids to take (none: the agent's)
/// and the variables that go with them.
#[derive(Debug)]
pub struct Identity {
    /// The user and group ids, when not the agent's.
    pub ids: Option<(Uid, Gid)>,
    /// `STATE_DIRECTORY`, and `HOME`, `USER`, `LOGNAME` where they apply.
    pub env: Vec<(String, String)>,
}

/// Serialises allocations: two services must never get the same uid.
static ALLOCATING: Mutex<()> = Mutex::new(());

/// Prepares a start of `spec`: resolves its user, creates its state
/// directory owned by that user (0700), and checks that the user can reach
/// its program.
pub fn prepare(layout: &Layout, spec: &ServiceSpec) -> io::Result<Identity> {
    let root = Uid::effective().is_root();
    let state_dir = layout.service_state(&spec.service);
    std::fs::create_dir_all(&state_dir)?;
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o700))?;
    let state_env = (
        "STATE_DIRECTORY".to_owned(),
        state_dir.display().to_string(),
    );
    let identity = match &spec.user {
        RunAs::Own if root => {
            let uid = Uid::from_raw(uid_of(layout, &spec.service)?);
            let gid = Gid::from_raw(uid.as_raw());
            reachable(layout.root())?;
            Identity {
                ids: Some((uid, gid)),
                env: vec![
                    state_env,
                    ("HOME".to_owned(), state_dir.display().to_string()),
                ],
            }
        }
        RunAs::Own | RunAs::Agent => Identity {
            ids: None,
            env: vec![state_env],
        },
        RunAs::Named(name) => {
            // As systemd's User= does: the user's ids (supplementary groups
            // dropped), and HOME, USER, LOGNAME.
            let user = User::from_name(name)
                .map_err(io::Error::from)?
                .ok_or_else(|| {
                    io::Error::other(format!("user {name} does not exist on this device"))
                })?;
            Identity {
                ids: Some((user.uid, user.gid)),
                env: vec![
                    state_env,
                    ("HOME".to_owned(), user.dir.display().to_string()),
                    ("USER".to_owned(), name.clone()),
                    ("LOGNAME".to_owned(), name.clone()),
                ],
            }
        }
    };
    if let Some((uid, gid)) = identity.ids {
        chown(&state_dir, Some(uid), Some(gid))?;
    }
    Ok(identity)
}

/// The uid `service` runs as: the one recorded for it, or the first free
/// one, recorded durably before it is used.
fn uid_of(layout: &Layout, service: &ServiceName) -> io::Result<u32> {
    let _allocating = ALLOCATING.lock().unwrap_or_else(|p| p.into_inner());
    let path = layout.service_users();
    let mut users: BTreeMap<String, u32> = durable::read_json(&path)?.unwrap_or_default();
    if let Some(uid) = users.get(service.as_str()) {
        return Ok(*uid);
    }
    let taken: Vec<u32> = users.values().copied().collect();
    let uid = (FIRST_UID..=LAST_UID)
        .find(|uid| {
            !taken.contains(uid)
                // Not a user the device already has (its files are not ours).
                && matches!(User::from_uid(Uid::from_raw(*uid)), Ok(None))
        })
        .ok_or_else(|| io::Error::other("no free uid left for a service user"))?;
    users.insert(service.to_string(), uid);
    durable::write_json(&path, &users)?;
    Ok(uid)
}

/// Refuses, with a reason an operator can act on, a data directory that
/// another user cannot reach: the service could not run its program.
fn reachable(data_dir: &Path) -> io::Result<()> {
    let mut dir: Option<PathBuf> = Some(data_dir.canonicalize()?);
    while let Some(d) = dir {
        let mode = std::fs::metadata(&d)?.permissions().mode();
        if mode & 0o001 == 0 {
            return Err(io::Error::other(format!(
                "a service's own user cannot reach its program: {} is mode {:o}; \
                 let others search it (o+x) or set isolate_services = false",
                d.display(),
                mode & 0o7777
            )));
        }
        dir = d.parent().map(Path::to_owned);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_service_keeps_a_uid_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let api = ServiceName::new("api").unwrap();
        let sensor = ServiceName::new("sensor").unwrap();
        let a = uid_of(&layout, &api).unwrap();
        let s = uid_of(&layout, &sensor).unwrap();
        assert_ne!(a, s);
        assert!((FIRST_UID..=LAST_UID).contains(&a) && (FIRST_UID..=LAST_UID).contains(&s));
        // Recorded: the same again, also for a new agent reading the file.
        assert_eq!(uid_of(&layout, &api).unwrap(), a);
        let recorded: BTreeMap<String, u32> = durable::read_json(&layout.service_users())
            .unwrap()
            .unwrap();
        assert_eq!(recorded.get("sensor"), Some(&s));
    }

    #[test]
    fn a_private_data_directory_is_named_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let err = reachable(&dir.path().join(".")).unwrap_err().to_string();
        assert!(
            err.contains("mode 700") && err.contains("isolate_services"),
            "{err}"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        // Its parents (the system's temporary directory) let others search.
        reachable(dir.path()).unwrap();
    }
}
