//! Timestamps on the wire: RFC 3339 in UTC, e.g. `2026-11-28T12:00:00Z`.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::text::string_type;

/// A point in time, written as RFC 3339 UTC (`Z`), with milliseconds when it
/// has a fraction of a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(SystemTime);

/// A string that is not an RFC 3339 UTC timestamp.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid timestamp {value:?}: expected RFC 3339 in UTC, e.g. 2026-11-28T12:00:00Z")]
pub struct TimestampError {
    /// The rejected value.
    pub value: String,
}

impl Timestamp {
    /// The instant `secs` seconds after the Unix epoch.
    pub fn from_unix_secs(secs: u64) -> Self {
        Self(UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// Seconds since the Unix epoch (0 for earlier instants).
    pub fn unix_secs(&self) -> u64 {
        self.0.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }

    /// The instant as a [`SystemTime`].
    pub fn system_time(&self) -> SystemTime {
        self.0
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        Self(t)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let whole_second = self
            .0
            .duration_since(UNIX_EPOCH)
            .map_or(true, |d| d.subsec_nanos() == 0);
        if whole_second {
            humantime::format_rfc3339_seconds(self.0).fmt(f)
        } else {
            humantime::format_rfc3339_millis(self.0).fmt(f)
        }
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;
    fn from_str(s: &str) -> Result<Self, TimestampError> {
        humantime::parse_rfc3339(s)
            .map(Self)
            .map_err(|_| TimestampError {
                value: s.to_owned(),
            })
    }
}

string_type!(Timestamp, {
    "type": "string",
    "format": "date-time",
    "description": "RFC 3339 in UTC, e.g. 2026-11-28T12:00:00Z."
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_seconds_and_millis() {
        let t = Timestamp::from_unix_secs(1_795_000_000);
        assert_eq!(t.to_string(), "2026-11-18T11:06:40Z");
        assert_eq!(t.to_string().parse::<Timestamp>().unwrap(), t);

        let ms = Timestamp::from(UNIX_EPOCH + Duration::from_millis(1_795_000_000_250));
        assert_eq!(ms.to_string(), "2026-11-18T11:06:40.250Z");
        assert_eq!(ms.to_string().parse::<Timestamp>().unwrap(), ms);
    }

    #[test]
    fn rejects_non_rfc3339() {
        for bad in ["yesterday", "2026-11-18", "2026-11-18 08:26:40", ""] {
            assert!(bad.parse::<Timestamp>().is_err(), "{bad}");
        }
    }
}
