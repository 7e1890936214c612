//! Read-only qcow2 (versions 2 and 3) reader, written from the format
//! specification in qemu's `docs/interop/qcow2.rst`.
//!
//! # Supported subset
//!
//! Images without a backing file, without encryption, without an external
//! data file and without extended L2 entries. Unallocated clusters and zero
//! clusters read as zeros, standard clusters are read from the image file.
//! Compressed clusters are rejected with [`ImageError::Unsupported`] when a
//! read (or zero query) reaches one. Internal snapshots and bitmaps are
//! ignored: only the active L1 table is used. The dirty bit is accepted (it
//! only concerns refcounts, which a reader never uses); an image with the
//! corrupt bit set is rejected as malformed.
//!
//! # Invariants
//!
//! * [`parse_qcow2_header`] is a pure function over untrusted bytes: it never
//!   panics and never allocates proportionally to a field value.
//! * After [`Qcow2Image::open`] succeeds:
//!   - `cluster_bits` is in `9..=21`, so `cluster_size` fits comfortably in
//!     `usize` and every shift below is in range;
//!   - the L1 table covers the whole virtual size and lies inside the file;
//!   - every L1 entry used for the virtual disk is either zero or points to a
//!     cluster-aligned L2 table that lies entirely inside the file, with no
//!     reserved bit set.
//! * L2 entries are validated when they are used: reserved bits, alignment,
//!   and that the data actually read lies inside the file. A violation is
//!   [`ImageError::Malformed`]; missing data is never replaced by zeros.
//! * The image file is only ever read with positional reads; there is no
//!   cursor state, and the only mutable state is the L2 table cache.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{check_range, file_size, DiskImage, ImageError};

/// The four magic bytes every qcow2 image starts with: `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Length of a version 2 header (and of the common part of a v3 header).
const V2_HEADER_LEN: u32 = 72;
/// Minimum `header_length` of a version 3 header.
const V3_MIN_HEADER_LEN: u32 = 104;
/// Offset of the optional `compression_type` byte in a v3 header.
const COMPRESSION_TYPE_OFFSET: u32 = 104;

/// Smallest supported cluster size: 512 bytes (required by the spec).
const MIN_CLUSTER_BITS: u32 = 9;
/// Largest supported cluster size: 2 MiB (qemu's implementation limit).
const MAX_CLUSTER_BITS: u32 = 21;

/// Largest L1 table accepted, in bytes (qemu's implementation limit).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table accepted, in bytes (qemu's implementation limit).
const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// Largest number of internal snapshots accepted (qemu's limit).
const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name allowed by the spec.
const MAX_BACKING_NAME_LEN: u32 = 1023;

/// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// Header extension types.
const EXT_END: u32 = 0x0000_0000;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;
/// Size of one feature name table entry.
const FEATURE_NAME_ENTRY_LEN: usize = 48;

/// Bits 9..=55 of an L1 or L2 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (0..=8 and 56..=62).
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 entry flag: the cluster is compressed.
const L2E_COMPRESSED: u64 = 1 << 62;
/// Standard cluster descriptor flag: the cluster reads as zeros (v3 only).
const L2E_ZERO: u64 = 1 << 0;
/// Reserved bits of a standard cluster descriptor (1..=8 and 56..=61).
const L2E_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;

/// Number of L2 tables kept in memory.
const L2_CACHE_ENTRIES: usize = 8;

/// A validated qcow2 header (the fixed part; header extensions are checked
/// but not retained).
///
/// Values of this type are only produced by [`parse_qcow2_header`], so the
/// documented ranges hold for them; the helper methods assume they do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Qcow2Header {
    /// Format version: 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, in `9..=21`.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Number of entries in the active L1 table (enough to cover `size`).
    pub l1_size: u32,
    /// Cluster-aligned file offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Cluster-aligned file offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Cluster-aligned file offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (only the dirty and compression-type bits can
    /// be set in an accepted header). Always 0 for version 2.
    pub incompatible_features: u64,
    /// Compatible feature bits. Always 0 for version 2.
    pub compatible_features: u64,
    /// Auto-clear feature bits. Always 0 for version 2.
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits (4 for version 2).
    pub refcount_order: u32,
    /// Length of the header structure in bytes (72 for version 2).
    pub header_length: u32,
    /// Compression type of compressed clusters: 0 = zlib (deflate), 1 = zstd.
    pub compression_type: u8,
}

impl Qcow2Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Number of entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// log2 of [`Self::l2_entries`].
    fn l2_bits(&self) -> u32 {
        self.cluster_bits - 3
    }

    /// Number of L1 entries needed to map the whole virtual size.
    fn needed_l1_entries(&self) -> u64 {
        needed_l1_entries(self.size, self.cluster_bits)
    }

    /// Human-readable name of the compression type.
    fn compression_name(&self) -> String {
        match self.compression_type {
            0 => "zlib".to_string(),
            1 => "zstd".to_string(),
            n => format!("unknown type {n}"),
        }
    }

    /// Checks that the tables referenced by the header lie inside a file of
    /// `file_len` bytes.
    fn check_layout(&self, file_len: u64) -> Result<(), ImageError> {
        let l1_end = u64::from(self.l1_size)
            .checked_mul(8)
            .and_then(|n| n.checked_add(self.l1_table_offset));
        match l1_end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(malformed(format!(
                "L1 table at offset {} with {} entries extends past the end of the file ({} bytes)",
                self.l1_table_offset, self.l1_size, file_len
            )))
            }
        }
        let rt_end = u64::from(self.refcount_table_clusters)
            .checked_mul(self.cluster_size())
            .and_then(|n| n.checked_add(self.refcount_table_offset));
        match rt_end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(malformed(format!(
                    "refcount table at offset {} with {} clusters extends past the end of the file ({} bytes)",
                    self.refcount_table_offset, self.refcount_table_clusters, file_len
                )))
            }
        }
        if self.nb_snapshots > 0 && self.snapshots_offset >= file_len {
            return Err(malformed(format!(
                "snapshots_offset {} is past the end of the file ({} bytes)",
                self.snapshots_offset, file_len
            )));
        }
        Ok(())
    }
}

fn malformed(msg: String) -> ImageError {
    ImageError::Malformed(msg)
}

/// Number of L1 entries needed to map `size` bytes with the given cluster size.
fn needed_l1_entries(size: u64, cluster_bits: u32) -> u64 {
    // One L1 entry maps cluster_size * (cluster_size / 8) bytes; at most 2^39.
    let bytes_per_l1_entry = 1u64 << (2 * cluster_bits - 3);
    size.div_ceil(bytes_per_l1_entry)
}

/// Reads a big-endian `u32` at `off`; the caller has checked the length, but a
/// short slice still yields an error rather than a panic.
fn be32(bytes: &[u8], off: usize) -> Result<u32, ImageError> {
    bytes
        .get(off..off.wrapping_add(4))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| malformed(format!("header is truncated at byte {off}")))
}

/// Reads a big-endian `u64` at `off`; see [`be32`].
fn be64(bytes: &[u8], off: usize) -> Result<u64, ImageError> {
    bytes
        .get(off..off.wrapping_add(8))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| malformed(format!("header is truncated at byte {off}")))
}

/// Renders untrusted bytes from the image as a single-line quoted string.
fn quote_untrusted(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    format!("\"{}\"", text.escape_debug())
}

/// Parses and validates a qcow2 header from the start of an image file.
///
/// `bytes` should hold the first cluster of the image (or the whole file if it
/// is shorter); it must at least contain the fixed header. Header extensions
/// are validated as far as `bytes` reaches within the first cluster; if the
/// end-of-extensions marker is not found there, the header is reported as
/// truncated or malformed. Checks that depend on the file length (tables
/// inside the file) are done by [`Qcow2Image::open`].
///
/// Never panics, whatever the input.
pub fn parse_qcow2_header(bytes: &[u8]) -> Result<Qcow2Header, ImageError> {
    match bytes.get(0..4) {
        Some(m) if m == QCOW2_MAGIC => {}
        Some(m) => {
            return Err(ImageError::NotQcow2(format!(
                "bad magic {m:02x?}, expected {QCOW2_MAGIC:02x?} (\"QFI\\xfb\")"
            )))
        }
        None => {
            return Err(ImageError::NotQcow2(format!(
                "only {} bytes, too short for the 4-byte magic",
                bytes.len()
            )))
        }
    }

    let version = be32(bytes, 4)?;
    match version {
        2 | 3 => {}
        1 => return Err(ImageError::Unsupported(
            "qcow version 1 images are not supported: convert it with qemu-img convert -O qcow2"
                .to_string(),
        )),
        v => {
            return Err(ImageError::Unsupported(format!(
                "qcow2 version {v} is not supported (only versions 2 and 3)"
            )))
        }
    }

    if bytes.len() < V2_HEADER_LEN as usize {
        return Err(malformed(format!(
            "header is truncated: {} bytes, a version {version} header needs at least {V2_HEADER_LEN}",
            bytes.len()
        )));
    }
    let backing_file_offset = be64(bytes, 8)?;
    let backing_file_size = be32(bytes, 16)?;
    let cluster_bits = be32(bytes, 20)?;
    let size = be64(bytes, 24)?;
    let crypt_method = be32(bytes, 32)?;
    let l1_size = be32(bytes, 36)?;
    let l1_table_offset = be64(bytes, 40)?;
    let refcount_table_offset = be64(bytes, 48)?;
    let refcount_table_clusters = be32(bytes, 56)?;
    let nb_snapshots = be32(bytes, 60)?;
    let snapshots_offset = be64(bytes, 64)?;

    let (incompatible_features, compatible_features, autoclear_features);
    let (refcount_order, header_length);
    if version >= 3 {
        if bytes.len() < V3_MIN_HEADER_LEN as usize {
            return Err(malformed(format!(
                "header is truncated: {} bytes, a version 3 header needs at least {V3_MIN_HEADER_LEN}",
                bytes.len()
            )));
        }
        incompatible_features = be64(bytes, 72)?;
        compatible_features = be64(bytes, 80)?;
        autoclear_features = be64(bytes, 88)?;
        refcount_order = be32(bytes, 96)?;
        header_length = be32(bytes, 100)?;
        if header_length < V3_MIN_HEADER_LEN || header_length % 8 != 0 {
            return Err(malformed(format!(
                "header_length {header_length} is invalid: it must be a multiple of 8 and at least {V3_MIN_HEADER_LEN}"
            )));
        }
    } else {
        incompatible_features = 0;
        compatible_features = 0;
        autoclear_features = 0;
        refcount_order = 4;
        header_length = V2_HEADER_LEN;
    }

    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(malformed(format!(
            "cluster_bits {cluster_bits} is outside the supported range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS} (512 B to 2 MiB clusters)"
        )));
    }
    let cluster_size = 1u64 << cluster_bits;
    if u64::from(header_length) > cluster_size {
        return Err(malformed(format!(
            "header_length {header_length} is larger than the cluster size {cluster_size}"
        )));
    }
    if bytes.len() < header_length as usize {
        return Err(malformed(format!(
            "header is truncated: {} bytes, header_length is {header_length}",
            bytes.len()
        )));
    }

    if backing_file_offset != 0 {
        let mut msg = "qcow2 images with a backing file are not supported: flatten it first with qemu-img convert".to_string();
        let name = usize::try_from(backing_file_offset).ok().and_then(|start| {
            if backing_file_size > MAX_BACKING_NAME_LEN {
                return None;
            }
            bytes.get(start..start.checked_add(backing_file_size as usize)?)
        });
        if let Some(name) = name {
            msg.push_str(&format!(" (backing file {})", quote_untrusted(name)));
        }
        return Err(ImageError::Unsupported(msg));
    }
    match crypt_method {
        0 => {}
        1 => {
            return Err(ImageError::Unsupported(
                "encrypted qcow2 images (AES) are not supported: decrypt it first with qemu-img convert".to_string(),
            ))
        }
        2 => {
            return Err(ImageError::Unsupported(
                "encrypted qcow2 images (LUKS) are not supported: decrypt it first with qemu-img convert".to_string(),
            ))
        }
        m => {
            return Err(ImageError::Unsupported(format!(
                "qcow2 encryption method {m} is not supported"
            )))
        }
    }

    let feature_names = parse_extensions(bytes, header_length, cluster_size)?;

    if incompatible_features & INCOMPAT_CORRUPT != 0 {
        return Err(malformed(
            "the image is marked corrupt (incompatible feature bit 1); repair it with qemu-img check -r all first".to_string(),
        ));
    }
    if incompatible_features & INCOMPAT_DATA_FILE != 0 {
        return Err(ImageError::Unsupported(
            "qcow2 images with an external data file are not supported: convert it first with qemu-img convert".to_string(),
        ));
    }
    if incompatible_features & INCOMPAT_EXTL2 != 0 {
        return Err(ImageError::Unsupported(
            "qcow2 images with extended L2 entries (subclusters) are not supported: convert it first with qemu-img convert".to_string(),
        ));
    }
    let unknown = incompatible_features & !INCOMPAT_KNOWN;
    if unknown != 0 {
        let bits: Vec<String> = (0..64u8)
            .filter(|bit| unknown & (1u64 << bit) != 0)
            .map(|bit| match feature_names.iter().find(|(b, _)| *b == bit) {
                Some((_, name)) => format!("{bit} ({name})"),
                None => bit.to_string(),
            })
            .collect();
        return Err(ImageError::Unsupported(format!(
            "qcow2 image uses unknown incompatible feature bits: {}",
            bits.join(", ")
        )));
    }

    let compression_type = if header_length > COMPRESSION_TYPE_OFFSET {
        bytes
            .get(COMPRESSION_TYPE_OFFSET as usize)
            .copied()
            .ok_or_else(|| malformed("header is truncated at byte 104".to_string()))?
    } else {
        0
    };
    if incompatible_features & INCOMPAT_COMPRESSION != 0 {
        if compression_type == 0 {
            return Err(malformed(
                "the compression type feature bit is set but compression_type is absent or 0"
                    .to_string(),
            ));
        }
    } else if compression_type != 0 {
        return Err(malformed(format!(
            "compression_type is {compression_type} but the compression type feature bit is not set"
        )));
    }

    if refcount_order > 6 {
        return Err(malformed(format!(
            "refcount_order {refcount_order} is larger than 6"
        )));
    }

    let needed = needed_l1_entries(size, cluster_bits);
    let max_l1_entries = MAX_L1_BYTES / 8;
    if needed > max_l1_entries {
        return Err(malformed(format!(
            "virtual size {size} is too large for {cluster_size}-byte clusters (needs {needed} L1 entries, limit {max_l1_entries})"
        )));
    }
    if u64::from(l1_size) > max_l1_entries {
        return Err(malformed(format!(
            "l1_size {l1_size} exceeds the limit of {max_l1_entries} entries"
        )));
    }
    if u64::from(l1_size) < needed {
        return Err(malformed(format!(
            "l1_size {l1_size} is too small for virtual size {size}: {needed} entries are needed"
        )));
    }
    let misaligned = |off: u64| off & (cluster_size - 1) != 0;
    if misaligned(l1_table_offset) {
        return Err(malformed(format!(
            "l1_table_offset {l1_table_offset} is not aligned to the cluster size {cluster_size}"
        )));
    }
    if l1_size > 0 && l1_table_offset == 0 {
        return Err(malformed(
            "l1_table_offset is 0 (overlaps the header) but l1_size is not 0".to_string(),
        ));
    }

    if misaligned(refcount_table_offset) {
        return Err(malformed(format!(
            "refcount_table_offset {refcount_table_offset} is not aligned to the cluster size {cluster_size}"
        )));
    }
    if refcount_table_offset == 0 {
        return Err(malformed(
            "refcount_table_offset is 0 (overlaps the header)".to_string(),
        ));
    }
    if refcount_table_clusters == 0 {
        return Err(malformed("refcount_table_clusters is 0".to_string()));
    }
    if u64::from(refcount_table_clusters) > MAX_REFCOUNT_TABLE_BYTES >> cluster_bits {
        return Err(malformed(format!(
            "refcount_table_clusters {refcount_table_clusters} exceeds the limit of {MAX_REFCOUNT_TABLE_BYTES} bytes"
        )));
    }

    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(malformed(format!(
            "nb_snapshots {nb_snapshots} exceeds the limit of {MAX_SNAPSHOTS}"
        )));
    }
    if misaligned(snapshots_offset) {
        return Err(malformed(format!(
            "snapshots_offset {snapshots_offset} is not aligned to the cluster size {cluster_size}"
        )));
    }
    if nb_snapshots > 0 && snapshots_offset == 0 {
        return Err(malformed(format!(
            "snapshots_offset is 0 (overlaps the header) but nb_snapshots is {nb_snapshots}"
        )));
    }

    Ok(Qcow2Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        nb_snapshots,
        snapshots_offset,
        incompatible_features,
        compatible_features,
        autoclear_features,
        refcount_order,
        header_length,
        compression_type,
    })
}

/// Walks the header extensions that start at `header_length` and must end
/// (with an end marker) inside the first cluster. Returns the names of
/// incompatible features from the feature name table, for error messages.
fn parse_extensions(
    bytes: &[u8],
    header_length: u32,
    cluster_size: u64,
) -> Result<Vec<(u8, String)>, ImageError> {
    // Extensions must lie in the first cluster; `bytes` may be shorter.
    let limit = usize::try_from(cluster_size).map_or(bytes.len(), |cs| cs.min(bytes.len()));
    let area = bytes.get(..limit).unwrap_or(bytes);
    let mut pos = header_length as usize;
    let mut seen: Vec<u32> = Vec::new();
    let mut names = Vec::new();
    loop {
        let (Ok(kind), Ok(len)) = (be32(area, pos), be32(area, pos.saturating_add(4))) else {
            return Err(if (limit as u64) < cluster_size && limit == bytes.len() {
                malformed(format!(
                    "header extensions are truncated at byte {pos} ({} bytes available)",
                    bytes.len()
                ))
            } else {
                malformed(format!(
                    "header extension at byte {pos} runs past the end of the first cluster"
                ))
            });
        };
        if kind == EXT_END {
            return Ok(names);
        }
        let data_start = pos + 8;
        let data = data_start
            .checked_add(len as usize)
            .and_then(|end| area.get(data_start..end))
            .ok_or_else(|| {
                malformed(format!(
                    "header extension {kind:#010x} at byte {pos} with length {len} runs past the end of the first cluster (or of the data read)"
                ))
            })?;
        let known = matches!(
            kind,
            EXT_BACKING_FORMAT | EXT_FEATURE_NAMES | EXT_BITMAPS | EXT_CRYPTO | EXT_DATA_FILE
        );
        if known {
            if seen.contains(&kind) {
                return Err(malformed(format!(
                    "header extension {kind:#010x} appears more than once"
                )));
            }
            seen.push(kind);
        }
        if kind == EXT_FEATURE_NAMES {
            if data.len() % FEATURE_NAME_ENTRY_LEN != 0 {
                return Err(malformed(format!(
                    "feature name table length {} is not a multiple of {FEATURE_NAME_ENTRY_LEN}",
                    data.len()
                )));
            }
            for entry in data.chunks_exact(FEATURE_NAME_ENTRY_LEN) {
                if let [0, bit, name @ ..] = entry {
                    if *bit < 64 {
                        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                        let name = name.get(..end).unwrap_or(name);
                        names.push((*bit, quote_untrusted(name)));
                    }
                }
            }
        }
        // The next extension starts at the data end rounded up to 8 bytes.
        pos = data_start + data.len().div_ceil(8) * 8;
    }
}

/// Where the data of one guest cluster comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mapping {
    /// Reads as zeros (unallocated or zero cluster).
    Zero,
    /// Stored in the image file at this cluster-aligned host offset.
    Data(u64),
}

/// Cached, decoded L2 table.
struct CachedL2 {
    /// File offset of the table.
    offset: u64,
    /// Last use, for LRU eviction.
    last_use: u64,
    entries: Vec<u64>,
}

/// A qcow2 image opened for reading.
pub struct Qcow2Image {
    file: File,
    path: PathBuf,
    file_len: u64,
    header: Qcow2Header,
    /// The first `needed_l1_entries` entries of the active L1 table, validated.
    l1: Vec<u64>,
    l2_cache: Vec<CachedL2>,
    tick: u64,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The tables can be megabytes long; only summarize them.
        f.debug_struct("Qcow2Image")
            .field("path", &self.path)
            .field("file_len", &self.file_len)
            .field("header", &self.header)
            .field("l1_entries_used", &self.l1.len())
            .field("cached_l2_tables", &self.l2_cache.len())
            .finish()
    }
}

impl Qcow2Image {
    /// Opens and validates the qcow2 image at `path`.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        let file = File::open(path).map_err(|e| ImageError::io(path, e))?;
        Self::from_file(file, path)
    }

    /// Validates an already opened qcow2 file; `path` is used for messages.
    pub fn from_file(file: File, path: &Path) -> Result<Self, ImageError> {
        let file_len = file_size(&file, path)?;
        let head_len = file_len.min(1u64 << MAX_CLUSTER_BITS) as usize;
        let mut head = vec![0u8; head_len];
        file.read_exact_at(&mut head, 0)
            .map_err(|e| ImageError::io(path, e))?;
        let header = parse_qcow2_header(&head)?;
        drop(head);
        header.check_layout(file_len)?;

        // Only the entries that map the virtual disk are read; the rest of
        // the table (if l1_size is larger) is never consulted.
        let needed = header.needed_l1_entries();
        let mut raw = vec![0u8; (needed * 8) as usize];
        file.read_exact_at(&mut raw, header.l1_table_offset)
            .map_err(|e| ImageError::io(path, e))?;
        let l1 = decode_be64_table(&raw);
        drop(raw);

        let cluster_size = header.cluster_size();
        for (index, &entry) in l1.iter().enumerate() {
            if entry & L1E_RESERVED_MASK != 0 {
                return Err(malformed(format!(
                    "L1 entry {index} ({entry:#018x}) has reserved bits set"
                )));
            }
            let l2_offset = entry & OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            if l2_offset & (cluster_size - 1) != 0 {
                return Err(malformed(format!(
                    "L1 entry {index}: L2 table offset {l2_offset} is not aligned to the cluster size {cluster_size}"
                )));
            }
            match l2_offset.checked_add(cluster_size) {
                Some(end) if end <= file_len => {}
                _ => {
                    return Err(malformed(format!(
                        "L1 entry {index}: L2 table at offset {l2_offset} extends past the end of the file ({file_len} bytes)"
                    )))
                }
            }
        }

        Ok(Qcow2Image {
            file,
            path: path.to_path_buf(),
            file_len,
            header,
            l1,
            l2_cache: Vec::with_capacity(L2_CACHE_ENTRIES),
            tick: 0,
        })
    }

    /// The validated header.
    pub fn header(&self) -> &Qcow2Header {
        &self.header
    }

    /// Returns the cache slot holding the L2 table at `l2_offset`, loading it
    /// (and evicting the least recently used table) if needed.
    fn l2_slot(&mut self, l2_offset: u64) -> Result<usize, ImageError> {
        self.tick += 1;
        if let Some(slot) = self.l2_cache.iter().position(|c| c.offset == l2_offset) {
            if let Some(c) = self.l2_cache.get_mut(slot) {
                c.last_use = self.tick;
            }
            return Ok(slot);
        }
        let mut raw = vec![0u8; self.header.cluster_size() as usize];
        self.file
            .read_exact_at(&mut raw, l2_offset)
            .map_err(|e| ImageError::io(&self.path, e))?;
        let table = CachedL2 {
            offset: l2_offset,
            last_use: self.tick,
            entries: decode_be64_table(&raw),
        };
        if self.l2_cache.len() < L2_CACHE_ENTRIES {
            self.l2_cache.push(table);
            return Ok(self.l2_cache.len() - 1);
        }
        let victim = self
            .l2_cache
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.last_use)
            .map_or(0, |(i, _)| i);
        match self.l2_cache.get_mut(victim) {
            Some(slot) => {
                *slot = table;
                Ok(victim)
            }
            None => {
                self.l2_cache.push(table);
                Ok(self.l2_cache.len() - 1)
            }
        }
    }

    /// Maps one guest cluster (index, not byte offset).
    fn map_cluster(&mut self, guest_cluster: u64) -> Result<Mapping, ImageError> {
        let l2_bits = self.header.l2_bits();
        let l1_index = guest_cluster >> l2_bits;
        let l2_index = guest_cluster & ((1u64 << l2_bits) - 1);
        let l2_offset = self.l1_entry_offset(l1_index)?;
        if l2_offset == 0 {
            return Ok(Mapping::Zero);
        }
        let slot = self.l2_slot(l2_offset)?;
        let entry = self
            .l2_cache
            .get(slot)
            .and_then(|c| c.entries.get(l2_index as usize))
            .copied()
            .ok_or_else(|| malformed(format!("L2 index {l2_index} is out of range")))?;
        decode_l2_entry(&self.header, entry, guest_cluster)
    }

    /// The L2 table offset of L1 entry `l1_index` (0 if unallocated).
    fn l1_entry_offset(&self, l1_index: u64) -> Result<u64, ImageError> {
        usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .map(|e| e & OFFSET_MASK)
            .ok_or_else(|| {
                malformed(format!(
                    "L1 index {l1_index} is beyond the L1 table ({} entries used)",
                    self.l1.len()
                ))
            })
    }

    /// Reads `buf.len()` bytes at host offset `host` into `buf`, checking
    /// that they lie inside the file.
    fn read_host(&self, buf: &mut [u8], host: u64, guest: u64) -> Result<(), ImageError> {
        match host.checked_add(buf.len() as u64) {
            Some(end) if end <= self.file_len => {}
            _ => {
                return Err(malformed(format!(
                    "data for guest offset {guest} at host offset {host} ({} bytes) extends past the end of the file ({} bytes)",
                    buf.len(),
                    self.file_len
                )))
            }
        }
        self.file
            .read_exact_at(buf, host)
            .map_err(|e| ImageError::io(&self.path, e))
    }
}

/// Decodes a table of big-endian `u64`s; a trailing partial entry is ignored.
fn decode_be64_table(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_be_bytes(b)
        })
        .collect()
}

/// Interprets the L2 entry of `guest_cluster`.
fn decode_l2_entry(
    header: &Qcow2Header,
    entry: u64,
    guest_cluster: u64,
) -> Result<Mapping, ImageError> {
    let guest = guest_cluster << header.cluster_bits;
    if entry & L2E_COMPRESSED != 0 {
        return Err(ImageError::Unsupported(format!(
            "qcow2 compressed clusters are not supported (guest offset {guest}, compression {}): convert it first with qemu-img convert -O qcow2 without -c",
            header.compression_name()
        )));
    }
    if entry & L2E_RESERVED_MASK != 0 {
        return Err(malformed(format!(
            "L2 entry for guest offset {guest} ({entry:#018x}) has reserved bits set"
        )));
    }
    if entry & L2E_ZERO != 0 {
        if header.version < 3 {
            return Err(malformed(format!(
                "L2 entry for guest offset {guest} has the zero flag set in a version 2 image"
            )));
        }
        return Ok(Mapping::Zero);
    }
    let host = entry & OFFSET_MASK;
    if host == 0 {
        // Unallocated (bit 63 without an offset only has a meaning with an
        // external data file, which is rejected at open).
        return Ok(Mapping::Zero);
    }
    if host & (header.cluster_size() - 1) != 0 {
        return Err(malformed(format!(
            "L2 entry for guest offset {guest}: host offset {host} is not aligned to the cluster size {}",
            header.cluster_size()
        )));
    }
    Ok(Mapping::Data(host))
}

impl DiskImage for Qcow2Image {
    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.header.size)?;
        let cluster_bits = self.header.cluster_bits;
        let cluster_mask = self.header.cluster_size() - 1;
        // Pending run of host-contiguous data: (buffer start, host offset, length).
        let mut run: Option<(usize, u64, usize)> = None;
        let mut pos = 0usize;
        while pos < buf.len() {
            let guest = offset + pos as u64;
            let in_cluster = guest & cluster_mask;
            let chunk = ((cluster_mask + 1 - in_cluster) as usize).min(buf.len() - pos);
            match self.map_cluster(guest >> cluster_bits)? {
                Mapping::Zero => {
                    if let Some(r) = run.take() {
                        self.flush_run(buf, r, offset)?;
                    }
                    if let Some(dst) = buf.get_mut(pos..pos + chunk) {
                        dst.fill(0);
                    }
                }
                Mapping::Data(host_cluster) => {
                    let host = host_cluster + in_cluster;
                    run = match run {
                        Some((start, h, len)) if h + len as u64 == host => {
                            Some((start, h, len + chunk))
                        }
                        other => {
                            if let Some(r) = other {
                                self.flush_run(buf, r, offset)?;
                            }
                            Some((pos, host, chunk))
                        }
                    };
                }
            }
            pos += chunk;
        }
        if let Some(r) = run {
            self.flush_run(buf, r, offset)?;
        }
        Ok(())
    }

    fn is_zero_range(&mut self, offset: u64, len: u64) -> Result<bool, ImageError> {
        check_range(offset, len, self.header.size)?;
        if len == 0 {
            return Ok(true);
        }
        let cluster_bits = self.header.cluster_bits;
        let l2_bits = self.header.l2_bits();
        let first = offset >> cluster_bits;
        let last = (offset + len - 1) >> cluster_bits;
        let mut cluster = first;
        while cluster <= last {
            let l1_index = cluster >> l2_bits;
            if self.l1_entry_offset(l1_index)? == 0 {
                // The whole L2 range of this L1 entry is unallocated.
                cluster = (l1_index + 1) << l2_bits;
                continue;
            }
            if self.map_cluster(cluster)? != Mapping::Zero {
                return Ok(false);
            }
            cluster += 1;
        }
        Ok(true)
    }
}

impl Qcow2Image {
    /// Reads a pending run of host-contiguous data into `buf`.
    fn flush_run(
        &self,
        buf: &mut [u8],
        (start, host, len): (usize, u64, usize),
        offset: u64,
    ) -> Result<(), ImageError> {
        let dst = buf
            .get_mut(start..start + len)
            .ok_or_else(|| malformed(format!("internal: run {start}+{len} out of buffer")))?;
        self.read_host(dst, host, offset + start as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic xorshift64* generator for tests.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn put32(buf: &mut [u8], off: usize, v: u32) {
        buf[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn put64(buf: &mut [u8], off: usize, v: u64) {
        buf[off..off + 8].copy_from_slice(&v.to_be_bytes());
    }

    /// A valid header cluster: `size` bytes, L1 table at cluster 2, refcount
    /// table at cluster 1; extension area empty (zeros = end marker).
    fn header_cluster(version: u32, cluster_bits: u32, size: u64) -> Vec<u8> {
        let cs = 1usize << cluster_bits;
        let mut h = vec![0u8; cs];
        h[0..4].copy_from_slice(&QCOW2_MAGIC);
        put32(&mut h, 4, version);
        put32(&mut h, 20, cluster_bits);
        put64(&mut h, 24, size);
        let l1_size = needed_l1_entries(size, cluster_bits) as u32;
        put32(&mut h, 36, l1_size);
        put64(&mut h, 40, 2 * cs as u64);
        put64(&mut h, 48, cs as u64);
        put32(&mut h, 56, 1);
        if version >= 3 {
            put32(&mut h, 96, 4);
            put32(&mut h, 100, 104);
        }
        h
    }

    fn err_of(bytes: &[u8]) -> ImageError {
        match parse_qcow2_header(bytes) {
            Ok(h) => panic!("header unexpectedly accepted: {h:?}"),
            Err(e) => e,
        }
    }

    fn assert_malformed(bytes: &[u8], needle: &str) {
        match err_of(bytes) {
            ImageError::Malformed(msg) => assert!(msg.contains(needle), "{msg:?} lacks {needle:?}"),
            e => panic!("expected Malformed containing {needle:?}, got {e:?}"),
        }
    }

    fn assert_unsupported(bytes: &[u8], needle: &str) {
        match err_of(bytes) {
            ImageError::Unsupported(msg) => {
                assert!(msg.contains(needle), "{msg:?} lacks {needle:?}")
            }
            e => panic!("expected Unsupported containing {needle:?}, got {e:?}"),
        }
    }

    #[test]
    fn parses_valid_v3_header() {
        let h = parse_qcow2_header(&header_cluster(3, 16, 64 << 20)).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.l2_entries(), 8192);
        assert_eq!(h.size, 64 << 20);
        assert_eq!(h.l1_size, 1);
        assert_eq!(h.l1_table_offset, 131072);
        assert_eq!(h.refcount_table_offset, 65536);
        assert_eq!(h.header_length, 104);
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.compression_type, 0);
    }

    #[test]
    fn parses_valid_v2_header_with_only_72_bytes() {
        let mut bytes = header_cluster(2, 12, 10 << 20);
        let h = parse_qcow2_header(&bytes).unwrap();
        assert_eq!(h.version, 2);
        assert_eq!(h.header_length, 72);
        assert_eq!(h.refcount_order, 4);
        assert_eq!(h.l1_size, 5); // 10 MiB / (4 KiB * 512 entries) = 5
                                  // With only the fixed header available the extensions are truncated.
        bytes.truncate(72);
        assert_malformed(&bytes, "truncated");
        // ...but an explicit end marker is enough.
        bytes.extend_from_slice(&[0u8; 8]);
        assert!(parse_qcow2_header(&bytes).is_ok());
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = header_cluster(3, 9, 1 << 20);
        assert!(parse_qcow2_header(&full).is_ok());
        for len in 0..112 {
            let e = err_of(&full[..len]);
            if len < 4 {
                assert!(matches!(e, ImageError::NotQcow2(_)), "{len}: {e:?}");
            } else {
                assert!(
                    matches!(e, ImageError::Malformed(ref m) if m.contains("truncated")),
                    "{len}: {e:?}"
                );
            }
        }
        assert!(parse_qcow2_header(&full[..112]).is_ok());
    }

    #[test]
    fn bad_magic_and_versions() {
        let mut h = header_cluster(3, 16, 1 << 20);
        h[3] = 0xfc;
        assert!(matches!(err_of(&h), ImageError::NotQcow2(m) if m.contains("bad magic")));
        let mut h = header_cluster(3, 16, 1 << 20);
        put32(&mut h, 4, 1);
        assert_unsupported(&h, "version 1");
        put32(&mut h, 4, 4);
        assert_unsupported(&h, "version 4");
        put32(&mut h, 4, 0);
        assert_unsupported(&h, "version 0");
    }

    #[test]
    fn cluster_bits_bounds() {
        for bits in [0, 8, 22, 31, 63, 64, 200, u32::MAX] {
            let mut h = header_cluster(3, 16, 1 << 20);
            put32(&mut h, 20, bits);
            assert_malformed(&h, &format!("cluster_bits {bits}"));
        }
        for bits in 9..=21 {
            let h = header_cluster(3, bits, 1 << 30);
            assert_eq!(parse_qcow2_header(&h).unwrap().cluster_bits, bits);
        }
    }

    #[test]
    fn header_length_rules() {
        for bad in [0, 72, 100, 108, 103] {
            let mut h = header_cluster(3, 16, 1 << 20);
            put32(&mut h, 100, bad);
            assert_malformed(&h, &format!("header_length {bad}"));
        }
        let mut h = header_cluster(3, 9, 1 << 20);
        put32(&mut h, 100, 1024);
        assert_malformed(&h, "larger than the cluster size");
        let mut h = header_cluster(3, 16, 1 << 20);
        put32(&mut h, 100, 4096);
        assert_malformed(&h[..2048], "truncated");
        // A longer header with zero padding is fine.
        assert!(parse_qcow2_header(&h).is_ok());
    }

    #[test]
    fn backing_file_and_encryption_are_unsupported() {
        let mut h = header_cluster(3, 16, 1 << 20);
        put64(&mut h, 8, 512);
        put32(&mut h, 16, 8);
        h[512..520].copy_from_slice(b"base.img");
        let e = err_of(&h);
        assert!(matches!(e, ImageError::Unsupported(_)));
        let msg = e.to_string();
        assert!(msg.contains("qcow2 images with a backing file are not supported: flatten it first with qemu-img convert"), "{msg}");
        assert!(msg.contains("\"base.img\""), "{msg}");
        // A name pointing outside the data is still reported (without the name).
        put64(&mut h, 8, u64::MAX);
        assert_unsupported(&h, "backing file");

        for (method, needle) in [(1, "AES"), (2, "LUKS"), (9, "method 9")] {
            let mut h = header_cluster(3, 16, 1 << 20);
            put32(&mut h, 32, method);
            assert_unsupported(&h, needle);
        }
    }

    #[test]
    fn incompatible_features() {
        let base = header_cluster(3, 16, 1 << 20);
        let with = |bits: u64| {
            let mut h = base.clone();
            put64(&mut h, 72, bits);
            h
        };
        // Dirty bit only: readable.
        assert!(parse_qcow2_header(&with(INCOMPAT_DIRTY)).is_ok());
        assert_malformed(&with(INCOMPAT_CORRUPT), "corrupt");
        assert_unsupported(&with(INCOMPAT_DATA_FILE), "external data file");
        assert_unsupported(&with(INCOMPAT_EXTL2), "extended L2");
        assert_unsupported(
            &with(1 << 5 | 1 << 63),
            "unknown incompatible feature bits: 5, 63",
        );
        // Compatible and autoclear bits are ignored.
        let mut h = base.clone();
        put64(&mut h, 80, u64::MAX);
        put64(&mut h, 88, u64::MAX);
        assert!(parse_qcow2_header(&h).is_ok());
    }

    #[test]
    fn unknown_feature_is_named_from_feature_table() {
        let mut h = header_cluster(3, 16, 1 << 20);
        put64(&mut h, 72, 1 << 9);
        put32(&mut h, 104, EXT_FEATURE_NAMES);
        put32(&mut h, 108, 96);
        // Entry 1: incompatible bit 9 "shiny".
        h[112] = 0;
        h[113] = 9;
        h[114..119].copy_from_slice(b"shiny");
        // Entry 2: compatible bit 9 "other" must not be used.
        h[160] = 1;
        h[161] = 9;
        h[162..167].copy_from_slice(b"other");
        assert_unsupported(&h, "bits: 9 (\"shiny\")");
        // A table whose length is not a multiple of 48 is malformed.
        put32(&mut h, 108, 50);
        assert_malformed(&h, "feature name table length 50");
    }

    #[test]
    fn header_extension_bounds() {
        let mut h = header_cluster(3, 9, 1 << 20);
        put32(&mut h, 104, 0x1234_5678);
        put32(&mut h, 108, 400); // 112 + 400 > 512
        assert_malformed(&h, "runs past the end of the first cluster");
        put32(&mut h, 108, u32::MAX);
        assert_malformed(&h, "runs past the end");
        // Unknown extension that fits, followed by the end marker.
        put32(&mut h, 108, 5);
        assert!(parse_qcow2_header(&h).is_ok());
        // Duplicate known extension.
        put32(&mut h, 104, EXT_BACKING_FORMAT);
        put32(&mut h, 120, EXT_BACKING_FORMAT);
        put32(&mut h, 124, 0);
        assert_malformed(&h, "more than once");
        // Extensions filling the whole cluster without an end marker.
        let mut h = header_cluster(3, 9, 1 << 20);
        let mut pos = 104;
        while pos + 8 <= 512 {
            put32(&mut h, pos, 0x1111_1111);
            put32(&mut h, pos + 4, 0);
            pos += 8;
        }
        assert_malformed(&h, "past the end of the first cluster");
    }

    #[test]
    fn compression_type_consistency() {
        let mut h = header_cluster(3, 16, 1 << 20);
        put32(&mut h, 100, 112);
        h[104] = 1;
        assert_malformed(&h, "feature bit is not set");
        put64(&mut h, 72, INCOMPAT_COMPRESSION);
        assert_eq!(parse_qcow2_header(&h).unwrap().compression_type, 1);
        h[104] = 0;
        assert_malformed(&h, "compression_type is absent or 0");
        put32(&mut h, 100, 104);
        // Byte 104 is now the (harmless) extension area, so the feature bit
        // has no compression_type field.
        h[104] = 1;
        assert_malformed(&h, "compression_type is absent or 0");
    }

    #[test]
    fn size_and_l1_consistency() {
        let mut h = header_cluster(3, 16, 1 << 30); // needs 2 entries
        assert_eq!(parse_qcow2_header(&h).unwrap().l1_size, 2);
        put32(&mut h, 36, 1);
        assert_malformed(&h, "l1_size 1 is too small for virtual size 1073741824");
        put32(&mut h, 36, u32::MAX);
        assert_malformed(&h, "l1_size 4294967295 exceeds the limit");
        // Larger than needed but within limits is accepted.
        put32(&mut h, 36, 100);
        assert!(parse_qcow2_header(&h).is_ok());
        let mut h = header_cluster(3, 9, 0);
        put64(&mut h, 24, u64::MAX);
        assert_malformed(&h, "is too large for 512-byte clusters");
        // Zero-sized disk.
        let h = header_cluster(3, 16, 0);
        assert_eq!(parse_qcow2_header(&h).unwrap().l1_size, 0);
    }

    #[test]
    fn misaligned_and_zero_offsets() {
        let cases: [(usize, u64, &str); 6] = [
            (40, 131072 + 8, "l1_table_offset 131080 is not aligned"),
            (40, 0, "l1_table_offset is 0"),
            (48, 512, "refcount_table_offset 512 is not aligned"),
            (48, 0, "refcount_table_offset is 0"),
            (64, 3, "snapshots_offset 3 is not aligned"),
            (64, 1 << 40, ""),
        ];
        for (off, value, needle) in cases {
            let mut h = header_cluster(3, 16, 1 << 20);
            put64(&mut h, off, value);
            if needle.is_empty() {
                assert!(parse_qcow2_header(&h).is_ok());
            } else {
                assert_malformed(&h, needle);
            }
        }
        let mut h = header_cluster(3, 16, 1 << 20);
        put32(&mut h, 56, 0);
        assert_malformed(&h, "refcount_table_clusters is 0");
        put32(&mut h, 56, 129);
        assert_malformed(&h, "refcount_table_clusters 129 exceeds");
        let mut h = header_cluster(3, 16, 1 << 20);
        put32(&mut h, 60, 2);
        assert_malformed(&h, "snapshots_offset is 0");
        put32(&mut h, 60, MAX_SNAPSHOTS + 1);
        assert_malformed(&h, "nb_snapshots 65537 exceeds");
        let mut h = header_cluster(3, 16, 1 << 20);
        put32(&mut h, 96, 7);
        assert_malformed(&h, "refcount_order 7");
    }

    #[test]
    fn mutated_headers_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let seeds = [
            header_cluster(3, 9, 1 << 20),
            header_cluster(2, 9, 1 << 20),
            header_cluster(3, 12, 123_456_789),
        ];
        let mut accepted = 0;
        for i in 0..20_000 {
            let mut h = seeds[i % seeds.len()].clone();
            for _ in 0..=rng.below(4) {
                let pos = rng.below(120) as usize;
                h[pos] = rng.next() as u8;
            }
            let len = if rng.below(4) == 0 {
                rng.below(h.len() as u64 + 1) as usize
            } else {
                h.len()
            };
            if let Ok(hdr) = parse_qcow2_header(&h[..len]) {
                accepted += 1;
                assert!((9..=21).contains(&hdr.cluster_bits));
                assert!(u64::from(hdr.l1_size) >= hdr.needed_l1_entries());
                assert_eq!(hdr.l1_table_offset % hdr.cluster_size(), 0);
                assert_eq!(hdr.refcount_table_offset % hdr.cluster_size(), 0);
            }
        }
        // Harmless mutations (e.g. of the size or padding) keep some accepted.
        assert!(accepted > 0);
    }

    /// Builds small qcow2 files in memory, laid out as: header, refcount
    /// table, L1 table, then L2 tables and data clusters in allocation order.
    struct Synth {
        bits: u32,
        file: Vec<u8>,
        l1_off: usize,
    }

    impl Synth {
        fn new(version: u32, bits: u32, size: u64) -> Self {
            let mut file = header_cluster(version, bits, size);
            let cs = 1usize << bits;
            let l1_bytes = needed_l1_entries(size, bits) as usize * 8;
            file.resize(2 * cs + l1_bytes.div_ceil(cs) * cs, 0);
            Synth {
                bits,
                file,
                l1_off: 2 * cs,
            }
        }
        fn cs(&self) -> usize {
            1 << self.bits
        }
        fn alloc(&mut self) -> u64 {
            let off = self.file.len();
            self.file.resize(off + self.cs(), 0);
            off as u64
        }
        fn l2_offset(&mut self, guest_cluster: u64) -> usize {
            let l1_index = (guest_cluster >> (self.bits - 3)) as usize;
            let pos = self.l1_off + 8 * l1_index;
            let entry = u64::from_be_bytes(self.file[pos..pos + 8].try_into().unwrap());
            if entry & OFFSET_MASK != 0 {
                return (entry & OFFSET_MASK) as usize;
            }
            let l2 = self.alloc();
            put64(&mut self.file, pos, l2 | 1 << 63);
            l2 as usize
        }
        fn set_l2(&mut self, guest_cluster: u64, entry: u64) {
            let l2 = self.l2_offset(guest_cluster);
            let index = (guest_cluster & ((1 << (self.bits - 3)) - 1)) as usize;
            put64(&mut self.file, l2 + 8 * index, entry);
        }
        fn data(&mut self, guest_cluster: u64, data: &[u8]) -> u64 {
            let host = self.alloc();
            self.file[host as usize..host as usize + data.len()].copy_from_slice(data);
            self.set_l2(guest_cluster, host | 1 << 63);
            host
        }
        fn write(&self, dir: &Path) -> PathBuf {
            let path = dir.join("synth.qcow2");
            std::fs::write(&path, &self.file).unwrap();
            path
        }
    }

    fn open_err(path: &Path) -> ImageError {
        match Qcow2Image::open(path) {
            Ok(_) => panic!("image unexpectedly opened"),
            Err(e) => e,
        }
    }

    #[test]
    fn synthetic_image_reads_match_model() {
        let dir = tempfile::tempdir().unwrap();
        let bits = 9;
        let cs = 512usize;
        // 40 L2 tables worth of clusters (each maps 64 * 512 = 32 KiB), plus a
        // partial last cluster, so the 8-entry L2 cache has to evict.
        let size = 40 * 32 * 1024 + 700;
        let clusters = (size as usize).div_ceil(cs);
        let mut model = vec![0u8; size as usize];
        let mut s = Synth::new(3, bits, size);
        let mut rng = Rng(42);
        let mut expect_zero_flag = Vec::new();
        let mut guest_clusters: Vec<u64> = (0..clusters as u64).collect();
        // Allocate in a shuffled order so host layout differs from guest order,
        // but keep some runs host-contiguous (allocated back to back).
        for i in (1..guest_clusters.len()).rev() {
            if rng.below(3) == 0 {
                let j = rng.below(i as u64 + 1) as usize;
                guest_clusters.swap(i, j);
            }
        }
        for &gc in &guest_clusters {
            let start = gc as usize * cs;
            let end = (start + cs).min(model.len());
            match rng.below(5) {
                0 | 1 => {
                    let data: Vec<u8> = (0..cs).map(|_| rng.next() as u8).collect();
                    s.data(gc, &data);
                    model[start..end].copy_from_slice(&data[..end - start]);
                }
                2 => {
                    // Preallocated zero cluster: host data is garbage but must
                    // read as zeros.
                    let host = s.data(gc, &[0xee; 512]);
                    s.set_l2(gc, host | 1 << 63 | L2E_ZERO);
                    expect_zero_flag.push(gc);
                }
                3 => {
                    s.set_l2(gc, L2E_ZERO);
                    expect_zero_flag.push(gc);
                }
                _ => {} // unallocated
            }
        }
        let path = s.write(dir.path());
        let mut img = Qcow2Image::open(&path).unwrap();
        assert_eq!(img.virtual_size(), size);
        assert_eq!(img.format(), "qcow2");

        let mut all = vec![0xffu8; size as usize];
        img.read_at(&mut all, 0).unwrap();
        assert!(all == model, "full read differs from the model");

        for _ in 0..2000 {
            let off = rng.below(size);
            let len = rng.below((size - off).min(5000) + 1);
            let mut buf = vec![0xffu8; len as usize];
            img.read_at(&mut buf, off).unwrap();
            assert_eq!(
                buf,
                model[off as usize..(off + len) as usize],
                "read {len} at {off}"
            );
            let zero = img.is_zero_range(off, len).unwrap();
            if zero {
                assert!(
                    buf.iter().all(|&b| b == 0),
                    "is_zero_range lied at {off}+{len}"
                );
            }
        }
        for gc in expect_zero_flag {
            let off = gc * cs as u64;
            let len = (cs as u64).min(size - off);
            assert!(img.is_zero_range(off, len).unwrap(), "cluster {gc}");
        }
        assert!(img.l2_cache.len() <= L2_CACHE_ENTRIES);
        assert!(matches!(
            img.read_at(&mut [0u8; 2], size - 1),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(matches!(
            img.is_zero_range(size, 1),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(img.is_zero_range(size, 0).unwrap());
    }

    #[test]
    fn unallocated_l1_ranges_are_zero() {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB clusters: one L1 entry maps 512 MiB.
        let size = 4u64 << 30;
        let mut s = Synth::new(3, 16, size);
        s.data(3 * 8192 + 5, &[1u8; 100]); // in the 4th L1 entry
        let path = s.write(dir.path());
        let mut img = Qcow2Image::open(&path).unwrap();
        assert!(img.is_zero_range(0, 3 << 29).unwrap());
        assert!(img.is_zero_range(0, (3 << 29) + 5 * 65536).unwrap());
        assert!(!img.is_zero_range(0, (3 << 29) + 5 * 65536 + 1).unwrap());
        assert!(img
            .is_zero_range((3 << 29) + 6 * 65536, size - (3 << 29) - 6 * 65536)
            .unwrap());
        let mut buf = vec![0xffu8; 200];
        img.read_at(&mut buf, (3 << 29) + 5 * 65536 - 50).unwrap();
        assert!(buf[..50].iter().all(|&b| b == 0));
        assert!(buf[50..150].iter().all(|&b| b == 1));
        assert!(buf[150..].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_l2_entries_are_reported_on_use() {
        let dir = tempfile::tempdir().unwrap();
        let size = 1u64 << 20;
        let mut buf = [0u8; 16];

        let mut s = Synth::new(3, 12, size);
        s.set_l2(3, 1 << 62 | 12345);
        let path = s.write(dir.path());
        let mut img = Qcow2Image::open(&path).unwrap();
        img.read_at(&mut buf, 0).unwrap(); // other clusters are fine
        let e = img.read_at(&mut buf, 3 * 4096 + 10).unwrap_err();
        assert!(
            matches!(e, ImageError::Unsupported(ref m) if m.starts_with("qcow2 compressed clusters are not supported") && m.contains("zlib")),
            "{e:?}"
        );
        assert!(matches!(
            img.is_zero_range(0, size),
            Err(ImageError::Unsupported(_))
        ));

        let cases: [(u32, u64, &str); 5] = [
            (3, 1 << 63 | 1 << 60, "reserved bits"),
            (3, 1 << 63 | 0x2, "reserved bits"),
            (3, 1 << 63 | (4096 * 100 + 512), "not aligned"),
            (3, 1 << 63 | (4096 * 1000), "past the end of the file"),
            (2, 1 << 63 | L2E_ZERO, "zero flag set in a version 2 image"),
        ];
        for (version, entry, needle) in cases {
            let mut s = Synth::new(version, 12, size);
            s.set_l2(3, entry);
            let path = s.write(dir.path());
            let mut img = Qcow2Image::open(&path).unwrap();
            match img.read_at(&mut buf, 3 * 4096) {
                Err(ImageError::Malformed(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("{needle}: got {other:?}"),
            }
        }

        // An entry with only the COPIED flag and no offset reads as zeros.
        let mut s = Synth::new(3, 12, size);
        s.set_l2(3, 1 << 63);
        let mut img = Qcow2Image::open(&s.write(dir.path())).unwrap();
        let mut buf = [0xffu8; 16];
        img.read_at(&mut buf, 3 * 4096).unwrap();
        assert_eq!(buf, [0u8; 16]);
    }

    #[test]
    fn data_cut_off_by_end_of_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Synth::new(3, 12, 1 << 20);
        s.set_l2(7, 0); // allocate the L2 table before the data cluster
        s.data(7, &[9u8; 4096]);
        // Only the first half of the data cluster is in the file.
        let new_len = s.file.len() - 2048;
        s.file.truncate(new_len);
        let mut img = Qcow2Image::open(&s.write(dir.path())).unwrap();
        let mut buf = [0u8; 2048];
        img.read_at(&mut buf, 7 * 4096).unwrap();
        assert_eq!(buf, [9u8; 2048]);
        let e = img.read_at(&mut buf, 7 * 4096 + 1).unwrap_err();
        assert!(
            matches!(e, ImageError::Malformed(ref m) if m.contains("past the end of the file")),
            "{e:?}"
        );
    }

    #[test]
    fn bad_l1_entries_fail_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let size = 64u64 << 20; // 4 KiB clusters: 32 L1 entries
        let cases: [(u64, &str); 4] = [
            (1 << 63 | 1, "reserved bits"),
            (1 << 62 | 8192, "reserved bits"),
            (8192 + 512, "not aligned"),
            (1 << 40, "extends past the end of the file"),
        ];
        for (entry, needle) in cases {
            let mut s = Synth::new(3, 12, size);
            let pos = s.l1_off + 8 * 5;
            put64(&mut s.file, pos, entry);
            match open_err(&s.write(dir.path())) {
                ImageError::Malformed(m) => {
                    assert!(m.contains("L1 entry 5") && m.contains(needle), "{m}")
                }
                e => panic!("{needle}: got {e:?}"),
            }
        }
    }

    #[test]
    fn tables_outside_the_file_fail_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Synth::new(3, 12, 64 << 20);
        put32(&mut s.file, 36, 100_000); // L1 table now extends past EOF
        match open_err(&s.write(dir.path())) {
            ImageError::Malformed(m) => assert!(m.contains("L1 table at offset 8192"), "{m}"),
            e => panic!("got {e:?}"),
        }
        let mut s = Synth::new(3, 12, 64 << 20);
        put32(&mut s.file, 56, 100);
        match open_err(&s.write(dir.path())) {
            ImageError::Malformed(m) => assert!(m.contains("refcount table"), "{m}"),
            e => panic!("got {e:?}"),
        }
        let mut s = Synth::new(3, 12, 64 << 20);
        put32(&mut s.file, 60, 1);
        put64(&mut s.file, 64, 1 << 30);
        match open_err(&s.write(dir.path())) {
            ImageError::Malformed(m) => assert!(m.contains("snapshots_offset"), "{m}"),
            e => panic!("got {e:?}"),
        }
        // A non-qcow2 file opened as qcow2.
        let path = dir.path().join("plain");
        std::fs::write(&path, b"hello world").unwrap();
        assert!(matches!(open_err(&path), ImageError::NotQcow2(_)));
    }
}
