//! Names of disks and snapshots, and the one spelling of a reference to
//! either: `NAME` for a disk, `NAME@SNAP` for one of its snapshots (NBD
//! export names, the command line, a clone's recorded origin).

use crate::MAX_NAME_LEN;
use std::fmt;

/// Longest name given to a new disk or snapshot, in characters (all ASCII).
pub const MAX_NEW_NAME_LEN: usize = 64;

/// Checks the name of a new disk or snapshot: 1 to [`MAX_NEW_NAME_LEN`]
/// characters from `A-Z a-z 0-9 . _ -`, not starting with `.` or `-` (so
/// no `..`, no `-rf`, nothing to escape in a path or a shell, and no two
/// names that print alike: no control, invisible, confusable or
/// right-to-left characters).
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a name cannot be empty".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "name {name:?} contains {c:?}; names use only A-Z a-z 0-9 . _ -"
        ));
    }
    if name.len() > MAX_NEW_NAME_LEN {
        return Err(format!(
            "name '{name}' is {} characters long; the limit is {MAX_NEW_NAME_LEN}",
            name.len()
        ));
    }
    if name.starts_with(['.', '-']) {
        return Err(format!("name '{name}' cannot start with '.' or '-'"));
    }
    Ok(())
}

/// Checks a name used to look up an existing disk or snapshot: any name a
/// store may hold (older versions accepted more than [`validate_name`]
/// does): 1 to [`MAX_NAME_LEN`] bytes, no `@`, `/` or control characters.
pub fn validate_lookup_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a name cannot be empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name {name:?} is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '@' || *c == '/' || c.is_control())
    {
        return Err(format!(
            "name {name:?} contains the forbidden character {c:?}"
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

    /// [`DiskRef::split`], then [`validate_lookup_name`] on each part.
    pub fn parse(s: &str) -> Result<DiskRef, String> {
        let r = DiskRef::split(s);
        validate_lookup_name(&r.disk)?;
        if let Some(snap) = &r.snapshot {
            validate_lookup_name(snap)?;
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
        assert!(DiskRef::parse("a\nb").is_err());
        // Lookups accept names older versions created.
        assert!(DiskRef::parse("a b@é").is_ok());
    }

    #[test]
    fn new_names_are_plain_and_unambiguous() {
        for ok in [
            "vm1",
            "web-01.img",
            "A_b",
            "20261129T101010.123Z-7",
            &"x".repeat(64),
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-rf",
            ".hidden",
            "a b",
            "a/b",
            "a@b",
            "evil\u{202e}gpj",
            "zero\u{200b}width",
            "caf\u{e9}",
            "\u{0430}pple",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
