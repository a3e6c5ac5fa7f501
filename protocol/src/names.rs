//! Names that end up in topics, unit names and paths.
//!
//! Each is a newtype with one checking constructor, so a value of the type is
//! known to be safe wherever it is used: a [`DeviceId`] cannot hold a `/` or
//! an MQTT wildcard, a [`ServiceName`] is a valid systemd unit name part, and
//! a [`RelPath`] cannot climb out of the directory it is joined to.

use std::fmt;
use std::str::FromStr;

/// A name that broke the rules of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {reason}")]
pub struct NameError {
    /// Which kind of name, e.g. "device id".
    pub kind: &'static str,
    /// The rejected value.
    pub value: String,
    /// The rule it broke.
    pub reason: &'static str,
}

/// Defines a string newtype whose only constructor runs `$check`.
macro_rules! checked_name {
    (
        $(#[$doc:meta])*
        $name:ident, kind = $kind:literal, pattern = $pattern:literal, check = $check:path
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                match $check(&value) {
                    Ok(()) => Ok(Self(value)),
                    Err(reason) => Err(NameError { kind: $kind, value, reason }),
                }
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        crate::text::string_schema!($name, {
            "type": "string",
            "pattern": $pattern,
            "description": concat!("A ", $kind, ".")
        });
    };
}

checked_name! {
    /// A device's identity: its MQTT client id, username and topic segment.
    /// 1 to 64 ASCII letters, digits, `.`, `_` or `-`, starting with a letter or digit.
    DeviceId, kind = "device id", pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", check = check_device_id
}

checked_name! {
    /// A managed service's name; it becomes part of a systemd unit name and a
    /// directory name. 1 to 64 lowercase letters, digits, `_` or `-`,
    /// starting with a letter or digit.
    ServiceName, kind = "service name", pattern = "^[a-z0-9][a-z0-9_-]{0,63}$", check = check_service_name
}

checked_name! {
    /// A target triple such as `armv7-unknown-linux-gnueabihf`: lowercase
    /// letters, digits, `_` and `.` in three or four parts joined by `-`.
    Target, kind = "target", pattern = "^[a-z0-9_.]+(-[a-z0-9_.]+){2,3}$", check = check_target
}

checked_name! {
    /// A path inside a release, such as `bin/api`: relative, `/`-separated,
    /// with no empty, `.` or `..` component, so that joining it to a
    /// directory never leaves that directory, and no control character (it
    /// may end up on a line of a unit file).
    RelPath, kind = "relative path", pattern = "^[^/\\u0000-\\u001f\\u007f\\\\]+(/[^/\\u0000-\\u001f\\u007f\\\\]+)*$", check = check_rel_path
}

checked_name! {
    /// An environment variable's name: an ASCII letter or `_`, then
    /// letters, digits and `_`; at most 128 characters.
    EnvName, kind = "environment variable name", pattern = "^[A-Za-z_][A-Za-z0-9_]{0,127}$", check = check_env_name
}

checked_name! {
    /// A user name on the device, as `useradd` takes them: a lowercase
    /// letter or `_`, then lowercase letters, digits, `_` and `-`; at most 32.
    UserName, kind = "user name", pattern = "^[a-z_][a-z0-9_-]{0,31}$", check = check_user_name
}

checked_name! {
    /// An absolute path on the device, such as `/var/spool/sensor`: `/`, then
    /// components of ASCII letters, digits, `.`, `_`, `-`, `+` and `@`, none
    /// empty, `.` or `..`. Plain enough to stand unquoted on a unit line.
    DevicePath, kind = "device path", pattern = "^(/[A-Za-z0-9._+@-]+)+$", check = check_device_path
}

/// The target of the devices Ferry was built for.
pub const ARMV7_TARGET: &str = "armv7-unknown-linux-gnueabihf";

const MAX_NAME: usize = 64;
const MAX_PATH: usize = 4096;

fn check_device_id(s: &str) -> Result<(), &'static str> {
    check_short_name(s, |c| {
        c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-')
    })
    .map_err(|e| e.unwrap_or("may contain only ASCII letters, digits, '.', '_' and '-'"))
}

fn check_service_name(s: &str) -> Result<(), &'static str> {
    check_short_name(s, |c| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-')
    })
    .map_err(|e| e.unwrap_or("may contain only lowercase ASCII letters, digits, '_' and '-'"))
}

/// Length and first-character rules shared by ids and service names.
/// `Err(None)` means a character failed `allowed`.
fn check_short_name(s: &str, allowed: impl Fn(u8) -> bool) -> Result<(), Option<&'static str>> {
    let bytes = s.as_bytes();
    match bytes.first() {
        None => return Err(Some("must not be empty")),
        Some(c) if !c.is_ascii_alphanumeric() => {
            return Err(Some("must start with an ASCII letter or digit"));
        }
        Some(_) => {}
    }
    if bytes.len() > MAX_NAME {
        return Err(Some("must be at most 64 characters"));
    }
    if bytes.iter().all(|&c| allowed(c)) {
        Ok(())
    } else {
        Err(None)
    }
}

fn check_env_name(s: &str) -> Result<(), &'static str> {
    let bytes = s.as_bytes();
    match bytes.first() {
        None => Err("must not be empty"),
        Some(c) if !(c.is_ascii_alphabetic() || *c == b'_') => {
            Err("must start with an ASCII letter or '_'")
        }
        _ if bytes.len() > 128 => Err("must be at most 128 characters"),
        _ if bytes
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'_') =>
        {
            Ok(())
        }
        _ => Err("may contain only ASCII letters, digits and '_'"),
    }
}

fn check_user_name(s: &str) -> Result<(), &'static str> {
    let bytes = s.as_bytes();
    match bytes.first() {
        None => Err("must not be empty"),
        Some(c) if !(c.is_ascii_lowercase() || *c == b'_') => {
            Err("must start with a lowercase ASCII letter or '_'")
        }
        _ if bytes.len() > 32 => Err("must be at most 32 characters"),
        _ if bytes
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-')) =>
        {
            Ok(())
        }
        _ => Err("may contain only lowercase ASCII letters, digits, '_' and '-'"),
    }
}

fn check_target(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err("must be 1 to 64 characters");
    }
    let parts: Vec<&str> = s.split('-').collect();
    if !(3..=4).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err("must be three or four non-empty parts joined by '-'");
    }
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.');
    if parts.iter().all(|p| p.bytes().all(ok)) {
        Ok(())
    } else {
        Err("may contain only lowercase ASCII letters, digits, '_' and '.' between the '-'")
    }
}

fn check_rel_path(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    if s.len() > MAX_PATH {
        return Err("must be at most 4096 bytes");
    }
    if s.starts_with('/') {
        return Err("must be relative");
    }
    if s.contains('\\') || s.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err("must not contain '\\' or control characters");
    }
    for part in s.split('/') {
        match part {
            "" => return Err("must not contain an empty component ('//' or a trailing '/')"),
            "." | ".." => return Err("must not contain '.' or '..' components"),
            _ => {}
        }
    }
    Ok(())
}

fn check_device_path(s: &str) -> Result<(), &'static str> {
    let Some(rest) = s.strip_prefix('/') else {
        return Err("must be absolute (start with '/')");
    };
    if s.len() > MAX_PATH {
        return Err("must be at most 4096 bytes");
    }
    for part in rest.split('/') {
        match part {
            "" => return Err("must not contain an empty component (or be '/' alone)"),
            "." | ".." => return Err("must not contain '.' or '..' components"),
            _ if !part.bytes().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-' | b'+' | b'@')
            }) =>
            {
                return Err(
                    "may contain only ASCII letters, digits, '.', '_', '-', '+' and '@' between the '/'",
                );
            }
            _ => {}
        }
    }
    Ok(())
}

impl RelPath {
    /// The path's components, in order.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_paths() {
        for ok in ["/var/spool/sensor", "/a", "/run/x_y-1.2+b@c"] {
            assert!(DevicePath::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/",
            "relative/path",
            "/a//b",
            "/a/",
            "/a/../etc",
            "/./a",
            "/a b",
            "/a\nb",
            "/a\"b",
            "/a%i",
            "/a$b",
            "/a\\b",
        ] {
            assert!(DevicePath::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn device_ids() {
        for ok in ["gw-0042", "a", "A.b_c-9", &"x".repeat(64)] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-gw",
            ".hidden",
            "gw/1",
            "gw+",
            "gw#",
            "gw 1",
            "ü",
            &"x".repeat(65),
        ] {
            assert!(DeviceId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn service_names() {
        assert!(ServiceName::new("api_v2-x").is_ok());
        for bad in ["Api", "", "_x", "a.b", "a/b", "a b"] {
            assert!(ServiceName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets() {
        for ok in [
            ARMV7_TARGET,
            "x86_64-unknown-linux-gnu",
            "aarch64-linux-gnu",
        ] {
            assert!(Target::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "armv7",
            "a--b-c",
            "ARMV7-unknown-linux",
            "a-b-c-d-e",
            "a-b-c/",
        ] {
            assert!(Target::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rel_paths() {
        for ok in ["bin/api", "a", "a/b/c.txt", "..a/b..", ".config"] {
            assert!(RelPath::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "/bin/api", "a/../b", "..", ".", "a//b", "a/", "./a", "a\\b", "a\0b", "a\nb",
            "a\x7fb",
        ] {
            assert!(RelPath::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn error_names_the_kind_and_value() {
        let err = DeviceId::new("gw/1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid device id \"gw/1\": may contain only ASCII letters, digits, '.', '_' and '-'"
        );
    }

    #[test]
    fn serde_runs_the_check() {
        let ok: DeviceId = serde_json::from_str("\"gw-1\"").unwrap();
        assert_eq!(ok.as_str(), "gw-1");
        assert!(serde_json::from_str::<DeviceId>("\"gw/1\"").is_err());
        assert!(serde_json::from_str::<RelPath>("\"../etc/passwd\"").is_err());
    }
}
