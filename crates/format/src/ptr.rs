//! Block pointers, as stored in tree nodes, VDI headers, logs and the
//! superblock.
//!
//! ```text
//! bit 63      writable: the tree holding this pointer owns the target
//!             exclusively and may change it in place
//! bits 40..63 check: low 23 bits of the target's crc32c when the target is
//!             a metadata block; 0 for data blocks
//! bits 0..40  block address; 0 means "unmapped" (block 0 is a superblock,
//!             never a valid target)
//! ```
//!
//! The whole u64 is 0 for an unmapped entry, which reads as zeros.

use crate::MAX_BLOCK_ADDR;

const WRITABLE: u64 = 1 << 63;
const CHECK_SHIFT: u32 = 40;
const CHECK_MASK: u64 = (1 << 23) - 1;

/// A tagged block pointer. See the module documentation.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Ptr(pub u64);

impl std::fmt::Debug for Ptr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_null() {
            return f.write_str("Ptr(null)");
        }
        write!(
            f,
            "Ptr({}{}, check {:#x})",
            self.addr(),
            if self.writable() { " W" } else { "" },
            self.check()
        )
    }
}

impl Ptr {
    /// The unmapped pointer.
    pub const NULL: Ptr = Ptr(0);

    /// A pointer to a data block.
    pub fn data(addr: u64, writable: bool) -> Ptr {
        Self::new(addr, 0, writable)
    }

    /// A pointer to a metadata block whose crc32c is `crc`.
    pub fn meta(addr: u64, crc: u32, writable: bool) -> Ptr {
        Self::new(addr, crc, writable)
    }

    fn new(addr: u64, crc: u32, writable: bool) -> Ptr {
        debug_assert!(addr != 0 && addr <= MAX_BLOCK_ADDR);
        let mut v = (addr & MAX_BLOCK_ADDR) | ((crc as u64 & CHECK_MASK) << CHECK_SHIFT);
        if writable {
            v |= WRITABLE;
        }
        Ptr(v)
    }

    pub fn is_null(self) -> bool {
        self.0 == 0
    }
    pub fn addr(self) -> u64 {
        self.0 & MAX_BLOCK_ADDR
    }
    pub fn writable(self) -> bool {
        self.0 & WRITABLE != 0
    }
    /// The 23-bit check value kept of the target's crc.
    pub fn check(self) -> u32 {
        ((self.0 >> CHECK_SHIFT) & CHECK_MASK) as u32
    }
    /// Whether a metadata block with crc `crc` is the one this pointer meant.
    pub fn matches_crc(self, crc: u32) -> bool {
        self.check() == crc & CHECK_MASK as u32
    }
    /// [`Ptr::matches_crc`] as a result: the `Stale` error when the block
    /// this pointer reaches (crc `crc`) is not the one it meant.
    pub fn verify_crc(self, crc: u32) -> Result<(), crate::FormatError> {
        if self.matches_crc(crc) {
            return Ok(());
        }
        Err(crate::FormatError::Stale {
            addr: self.addr(),
            found: crc & CHECK_MASK as u32,
            expected: self.check(),
        })
    }
    /// The same pointer with the writable bit cleared (shared).
    pub fn shared(self) -> Ptr {
        Ptr(self.0 & !WRITABLE)
    }
    /// The same pointer with the writable bit set (owned); null stays null.
    pub fn owned(self) -> Ptr {
        if self.is_null() {
            self
        } else {
            Ptr(self.0 | WRITABLE)
        }
    }
    /// Well-formed: null, or a non-zero address (no bits outside the fields
    /// are possible, so only the address needs checking).
    pub fn is_valid(self) -> bool {
        self.is_null() || self.addr() != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip() {
        let p = Ptr::meta(123_456, 0xdead_beef, true);
        assert_eq!(p.addr(), 123_456);
        assert!(p.writable());
        assert!(p.matches_crc(0xdead_beef));
        assert!(!p.matches_crc(0xdead_beee));
        let s = p.shared();
        assert!(!s.writable());
        assert_eq!(s.addr(), 123_456);
        assert_eq!(s.check(), p.check());
        let d = Ptr::data(MAX_BLOCK_ADDR, false);
        assert_eq!(d.addr(), MAX_BLOCK_ADDR);
        assert_eq!(d.check(), 0);
        assert!(Ptr::NULL.is_null());
        assert!(!Ptr(1 << 63).is_valid());
    }
}
