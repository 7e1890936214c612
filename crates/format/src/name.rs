//! Names of disks and snapshots, and the one spelling of a reference to
//! either: `NAME` for a disk, `NAME@SNAP` for one of its snapshots (NBD
//! export names, the command line, a clone's recorded origin).

use crate::MAX_NAME_LEN;
use std::fmt;

/// Checks a disk or snapshot name: 1 to [`MAX_NAME_LEN`] bytes, no `@`,
/// `/`, whitespace or control characters.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a name cannot be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name '{name}' is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '@' || *c == '/' || c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "name '{name}' contains the forbidden character {c:?}"
        ));
    }
    Ok(())
}

/// A disk (`NAME`) or one of its snapshots (`NAME@SNAP`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskRef {
    pub disk: String,
    pub snapshot: Option<String>,
}

impl DiskRef {
    pub fn disk(disk: &str) -> DiskRef {
        DiskRef {
            disk: disk.to_string(),
            snapshot: None,
        }
    }

    pub fn snapshot(disk: &str, snapshot: &str) -> DiskRef {
        DiskRef {
            disk: disk.to_string(),
            snapshot: Some(snapshot.to_string()),
        }
    }

    /// Splits `NAME` or `NAME@SNAP` at its first `@`, without judging the
    /// names (an unknown name is the caller's "not found").
    pub fn split(s: &str) -> DiskRef {
        match s.split_once('@') {
            Some((d, snap)) => DiskRef::snapshot(d, snap),
            None => DiskRef::disk(s),
        }
    }

    /// [`DiskRef::split`], then [`validate_name`] on each part.
    pub fn parse(s: &str) -> Result<DiskRef, String> {
        let r = DiskRef::split(s);
        validate_name(&r.disk)?;
        if let Some(snap) = &r.snapshot {
            validate_name(snap)?;
        }
        Ok(r)
    }
}

impl fmt::Display for DiskRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.snapshot {
            Some(s) => write!(f, "{}@{s}", self.disk),
            None => f.write_str(&self.disk),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects() {
        for s in ["vm1", "vm1@snap", "a@b"] {
            assert_eq!(DiskRef::parse(s).unwrap().to_string(), s);
        }
        assert_eq!(DiskRef::split("a@b@c").snapshot.as_deref(), Some("b@c"));
        assert!(DiskRef::parse("a@b@c").is_err());
        assert!(DiskRef::parse("a@").is_err());
        assert!(DiskRef::parse("@b").is_err());
        assert!(DiskRef::parse("a b").is_err());
    }
}
