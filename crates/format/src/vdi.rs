//! VDI headers: the commit point of one virtual disk.
//!
//! Each VDI has two header blocks (A and B, named in its registry slot),
//! written alternately: a commit writes the copy with the lower generation
//! after the other copy is durable, and opening takes the valid copy with
//! the higher generation. A VDI's owner can thus commit without touching
//! any block shared with other VDIs or hosts.
//!
//! ```text
//! offset size field
//!      0   64 common header (kind 4, owner = vdi_id, generation = commit generation)
//!     64    8 size_bytes        virtual size, a multiple of 4096
//!     72    8 root              Ptr to the live tree's root node (writable)
//!     80    8 log_head          Ptr to the newest snapshot log block, or null
//!     88    8 snapshot_count    snapshots alive (taken and not deleted)
//!     96    8 next_snapshot_id  ids start at 1
//!    104    8 created_ns        ns since the Unix epoch
//!    112    8 origin_vdi        VDI this one was cloned from, 0 = none
//!    120    8 origin_snapshot   snapshot id it was cloned from
//!    128    2 name_len          136 96 name (copy of the registry name)
//!    130    6 reserved
//!    232    2 origin_len        240 193 origin "NAME@SNAP" as at clone time
//!    234    6 reserved
//!    440    8 flags             bit 0 = LINEAGE: log records carry parent ids
//!    448    8 live_parent       snapshot id the live tree derives from, 0 = origin
//!    456    8 every_ns          snapshot schedule interval, 0 = no schedule
//!    464    4 keep_last         retention of scheduled snapshots (0 = rule off)
//!    468    4 keep_minutely
//!    472    4 keep_hourly
//!    476    4 keep_daily
//!    480    4 keep_monthly
//!    484    4 reserved
//!    488    8 writer_epoch      epoch of the writer key under which this
//!                              commit was made (cluster mode); 0 = none
//!    496    8 writer_host       host id of that writer; 0 = none
//!    504    1 cache_policy      the local cache's use for this disk:
//!                              0 = write-through (reads cached, writes to
//!                              the pool), 1 = none, 2 = write-back (writes
//!                              acknowledged once in the local write-back
//!                              log); others refused
//!    505    7 reserved
//!    512    8 journal_head      Ptr to the newest block of the live tree's
//!                              entry journal (format 2, `journal.rs`), or
//!                              null: the live tree is `root` plus the
//!                              journal's records
//!    520 3576 reserved
//! ```
//!
//! `root` and `journal_head` are writable pointers unless a journal
//! snapshot shares them (it names the same base tree and, if nothing was
//! appended since, the same head).
//!
//! Headers written before `cache_policy` existed have 0 there
//! (write-through, the default). A binary that predates it drops the field
//! at its next commit of the disk (the disk goes back to the default).

use crate::bytes::*;
use crate::{zeroed_block, Block, FormatError, Kind, MetaHeader, Ptr, MAX_NAME_LEN};

const ORIGIN_CAP: usize = 2 * MAX_NAME_LEN + 1;

/// Header flag: the disk's log records carry parent ids and `live_parent`
/// is meaningful (every disk created by this version).
pub const VDI_FLAG_LINEAGE: u64 = 1;

/// A disk's snapshot schedule and the retention of what it takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Schedule {
    /// Interval between snapshots in ns; 0 = no schedule.
    pub every_ns: u64,
    /// Keep the newest N scheduled snapshots.
    pub keep_last: u32,
    /// Keep the newest scheduled snapshot of each of the last N minutes.
    pub keep_minutely: u32,
    pub keep_hourly: u32,
    pub keep_daily: u32,
    /// Months of 30 days.
    pub keep_monthly: u32,
}

/// How the local cache serves a disk (the daemon's `--cache`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum CachePolicy {
    /// Reads of its snapshot and clone-origin blocks are cached; writes go
    /// to the pool.
    #[default]
    WriteThrough,
    /// The cache is not used for the disk or its snapshots.
    None,
    /// Like write-through for reads; writes (and a FLUSH) are acknowledged
    /// once they are in the appliance's local write-back log, and reach the
    /// pool later, in order.
    WriteBack,
}

impl CachePolicy {
    pub fn code(self) -> u8 {
        match self {
            CachePolicy::WriteThrough => 0,
            CachePolicy::None => 1,
            CachePolicy::WriteBack => 2,
        }
    }

    pub fn from_code(code: u8) -> Option<CachePolicy> {
        match code {
            0 => Some(CachePolicy::WriteThrough),
            1 => Some(CachePolicy::None),
            2 => Some(CachePolicy::WriteBack),
            _ => None,
        }
    }

    /// `write-through`, `none` or `write-back`.
    pub fn name(self) -> &'static str {
        match self {
            CachePolicy::WriteThrough => "write-through",
            CachePolicy::None => "none",
            CachePolicy::WriteBack => "write-back",
        }
    }

    pub fn parse(s: &str) -> Result<CachePolicy, String> {
        match s {
            "write-through" => Ok(CachePolicy::WriteThrough),
            "none" => Ok(CachePolicy::None),
            "write-back" => Ok(CachePolicy::WriteBack),
            _ => Err(format!(
                "'{s}' is not a cache policy (write-through, write-back or none)"
            )),
        }
    }
}

/// A decoded VDI header.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct VdiHeader {
    pub vdi_id: u64,
    pub generation: u64,
    pub size_bytes: u64,
    pub root: Ptr,
    pub log_head: Ptr,
    pub snapshot_count: u64,
    pub next_snapshot_id: u64,
    pub created_ns: u64,
    pub origin_vdi: u64,
    pub origin_snapshot: u64,
    pub name: String,
    pub origin: String,
    /// `VDI_FLAG_*` bits.
    pub flags: u64,
    pub live_parent: u64,
    pub schedule: Schedule,
    /// Epoch of the writer key this commit was made under (cluster mode;
    /// 0 in a store no coordinator ever wrote).
    pub writer_epoch: u64,
    /// Host id of that writer (0 = none).
    pub writer_host: u64,
    pub cache_policy: CachePolicy,
    /// The live tree's entry journal (see the layout above).
    pub journal_head: Ptr,
}

impl VdiHeader {
    pub fn encode(&self, store_id: u64, addr: u64) -> (Box<Block>, u32) {
        let mut b = zeroed_block();
        put_u64(&mut b[..], 64, self.size_bytes);
        put_u64(&mut b[..], 72, self.root.0);
        put_u64(&mut b[..], 80, self.log_head.0);
        put_u64(&mut b[..], 88, self.snapshot_count);
        put_u64(&mut b[..], 96, self.next_snapshot_id);
        put_u64(&mut b[..], 104, self.created_ns);
        put_u64(&mut b[..], 112, self.origin_vdi);
        put_u64(&mut b[..], 120, self.origin_snapshot);
        put_name(&mut b[..], 128, 136, MAX_NAME_LEN, &self.name);
        put_name(&mut b[..], 232, 240, ORIGIN_CAP, &self.origin);
        put_u64(&mut b[..], 440, self.flags);
        put_u64(&mut b[..], 448, self.live_parent);
        put_u64(&mut b[..], 456, self.schedule.every_ns);
        put_u32(&mut b[..], 464, self.schedule.keep_last);
        put_u32(&mut b[..], 468, self.schedule.keep_minutely);
        put_u32(&mut b[..], 472, self.schedule.keep_hourly);
        put_u32(&mut b[..], 476, self.schedule.keep_daily);
        put_u32(&mut b[..], 480, self.schedule.keep_monthly);
        put_u64(&mut b[..], 488, self.writer_epoch);
        put_u64(&mut b[..], 496, self.writer_host);
        b[504] = self.cache_policy.code();
        put_u64(&mut b[..], 512, self.journal_head.0);
        let crc = MetaHeader {
            kind: Kind::VdiHeader,
            level: 0,
            store_id,
            self_addr: addr,
            owner: self.vdi_id,
            generation: self.generation,
        }
        .seal(&mut b);
        (b, crc)
    }

    pub fn decode(block: &[u8], addr: u64, store_id: Option<u64>) -> Result<Self, FormatError> {
        let (h, _) = MetaHeader::open(block, Kind::VdiHeader, addr, store_id)?;
        let v = VdiHeader {
            vdi_id: h.owner,
            generation: h.generation,
            size_bytes: get_u64(block, 64),
            root: Ptr(get_u64(block, 72)),
            log_head: Ptr(get_u64(block, 80)),
            snapshot_count: get_u64(block, 88),
            next_snapshot_id: get_u64(block, 96),
            created_ns: get_u64(block, 104),
            origin_vdi: get_u64(block, 112),
            origin_snapshot: get_u64(block, 120),
            name: get_name(block, 128, 136, MAX_NAME_LEN, addr)?,
            origin: get_name(block, 232, 240, ORIGIN_CAP, addr)?,
            flags: get_u64(block, 440),
            live_parent: get_u64(block, 448),
            schedule: Schedule {
                every_ns: get_u64(block, 456),
                keep_last: get_u32(block, 464),
                keep_minutely: get_u32(block, 468),
                keep_hourly: get_u32(block, 472),
                keep_daily: get_u32(block, 476),
                keep_monthly: get_u32(block, 480),
            },
            writer_epoch: get_u64(block, 488),
            writer_host: get_u64(block, 496),
            cache_policy: CachePolicy::from_code(block[504]).ok_or_else(|| {
                FormatError::field(addr, "unknown cache policy (made by a newer version?)")
            })?,
            journal_head: Ptr(get_u64(block, 512)),
        };
        if !v.size_bytes.is_multiple_of(crate::BLOCK_SIZE_U64) {
            return Err(FormatError::field(
                addr,
                "VDI size is not a multiple of 4096",
            ));
        }
        if v.root.is_null()
            || !v.root.is_valid()
            || !v.log_head.is_valid()
            || !v.journal_head.is_valid()
        {
            return Err(FormatError::field(
                addr,
                "VDI root or log pointer is malformed",
            ));
        }
        if v.next_snapshot_id == 0 || v.vdi_id == 0 {
            return Err(FormatError::field(addr, "VDI id or next snapshot id is 0"));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v = VdiHeader {
            vdi_id: 3,
            generation: 17,
            size_bytes: 1 << 30,
            root: Ptr::meta(99, 0xabcdef, true),
            log_head: Ptr::NULL,
            snapshot_count: 0,
            next_snapshot_id: 1,
            created_ns: 123,
            origin_vdi: 1,
            origin_snapshot: 2,
            name: "vm1".into(),
            origin: format!("{}@{}", "a".repeat(96), "b".repeat(96)),
            flags: VDI_FLAG_LINEAGE,
            live_parent: 5,
            schedule: Schedule {
                every_ns: 10_000_000,
                keep_last: 1000,
                keep_minutely: 60,
                keep_hourly: 24,
                keep_daily: 30,
                keep_monthly: 12,
            },
            writer_epoch: 1234,
            cache_policy: CachePolicy::None,
            writer_host: 3,
            journal_head: Ptr::meta(400, 0x1234, false),
        };
        let (b, _) = v.encode(8, 50);
        assert_eq!(VdiHeader::decode(&b[..], 50, Some(8)).unwrap(), v);
    }

    /// A header from before the cache policy (0 there) is write-through; a
    /// policy this version does not know is refused, not guessed.
    #[test]
    fn cache_policy_defaults_and_unknown_values() {
        let mut v = VdiHeader::decode(&sample().encode(8, 50).0[..], 50, Some(8)).unwrap();
        assert_eq!(v.cache_policy, CachePolicy::WriteThrough);
        v.cache_policy = CachePolicy::None;
        let (mut b, _) = v.encode(8, 50);
        assert_eq!(b[504], 1);
        b[504] = 3;
        let h = MetaHeader {
            kind: Kind::VdiHeader,
            level: 0,
            store_id: 8,
            self_addr: 50,
            owner: v.vdi_id,
            generation: v.generation,
        };
        h.seal(&mut b);
        let err = VdiHeader::decode(&b[..], 50, Some(8)).unwrap_err();
        assert!(err.to_string().contains("cache policy"), "{err}");
        assert_eq!(CachePolicy::parse("none"), Ok(CachePolicy::None));
        assert_eq!(CachePolicy::parse("write-back"), Ok(CachePolicy::WriteBack));
        assert!(CachePolicy::parse("back").is_err());
    }

    fn sample() -> VdiHeader {
        VdiHeader {
            vdi_id: 3,
            generation: 1,
            size_bytes: 1 << 20,
            root: Ptr::meta(99, 0xabc, true),
            log_head: Ptr::NULL,
            snapshot_count: 0,
            next_snapshot_id: 1,
            created_ns: 1,
            origin_vdi: 0,
            origin_snapshot: 0,
            name: "d".into(),
            origin: String::new(),
            flags: VDI_FLAG_LINEAGE,
            live_parent: 0,
            schedule: Schedule::default(),
            writer_epoch: 0,
            writer_host: 0,
            cache_policy: CachePolicy::WriteThrough,
            journal_head: Ptr::NULL,
        }
    }
}
