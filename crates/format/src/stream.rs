//! The send stream: one snapshot of a disk, whole or as its difference
//! from an older one, as `parallax send` writes it and `parallax receive`
//! reads it (`docs/SEND.md` describes the same layout for humans).
//!
//! ```text
//! stream := magic "PXSTREAM" (8 bytes), records
//! record := kind u32 | flags u32 (0) | length u64 | payload (length bytes)
//!   kind 1 HEADER (first, once): version u32 (1) | reserved u32 |
//!          store_id u64 | disk_id u64 | from_identity u64 (0: a full
//!          stream) | to_identity u64 | to_created_ns u64 | data_bytes u64
//!          | disk name, from name (`SNAP`, or `DISK@SNAP` when the base
//!          is another disk's snapshot), to name: each u16 length + UTF-8
//!   kind 2 SIZE (after the header, before any DATA or ZERO): size u64
//!   kind 3 DATA: offset u64 | the bytes (length - 8)
//!   kind 4 ZERO: offset u64 | length u64 (reads as zeros)
//!   kind 0xFFFF_FFFF END (last): records u64 (before END, the header
//!          included) | crc32c u32 of every byte before END's record |
//!          reserved u32
//! ```
//!
//! All integers little-endian. A reader skips records of a kind it does
//! not know (their length says how far); a change every reader must
//! understand raises the header's version, which a reader refuses when it
//! is newer than it knows. Nothing a stream says is trusted before its END
//! record checks out: [`StreamReader`] reports a stream cut short, a bad
//! checksum, a record out of place and any malformed field as an error,
//! and never panics on any input.

use std::io::{self, Read, Write};

/// The first 8 bytes of every stream.
pub const STREAM_MAGIC: &[u8; 8] = b"PXSTREAM";
/// The version this code writes and the newest it reads.
pub const STREAM_VERSION: u32 = 1;
/// The largest DATA payload a writer makes and a reader accepts.
pub const MAX_DATA_RECORD: usize = 4 << 20;
/// The largest record of another kind a reader accepts (or skips).
const MAX_OTHER_RECORD: u64 = 1 << 20;

const KIND_HEADER: u32 = 1;
const KIND_SIZE: u32 = 2;
const KIND_DATA: u32 = 3;
const KIND_ZERO: u32 = 4;
const KIND_END: u32 = 0xFFFF_FFFF;

/// What a stream is of: its HEADER record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// The sending store's id and the disk's id there.
    pub store_id: u64,
    pub disk_id: u64,
    /// The snapshot the stream is a difference from (0: a full stream).
    pub from_identity: u64,
    /// The snapshot the stream brings its receiver to.
    pub to_identity: u64,
    pub to_created_ns: u64,
    /// The bytes of all DATA records (for progress).
    pub data_bytes: u64,
    pub disk_name: String,
    /// The base snapshot: `SNAP` of the same disk, or `DISK@SNAP` (a
    /// clone's origin); empty in a full stream.
    pub from_name: String,
    pub to_name: String,
}

/// One record after the header.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamRecord {
    /// The disk's virtual size.
    Size(u64),
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        length: u64,
    },
    /// The END record, checked: the stream is whole.
    End,
}

/// Why a stream cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the stream: {0}")]
    Io(#[from] io::Error),
    #[error("the stream is cut short (no END record)")]
    Truncated,
    #[error("not a parallax send stream")]
    NotAStream,
    #[error("the stream is version {0}; this parallax reads up to version {STREAM_VERSION}")]
    Version(u32),
    #[error("the stream is corrupt: {0}")]
    Corrupt(String),
}

fn corrupt(what: impl Into<String>) -> StreamError {
    StreamError::Corrupt(what.into())
}

/// Writes a stream: [`StreamWriter::new`] (magic and header), then
/// records, then [`StreamWriter::finish`].
pub struct StreamWriter<W: Write> {
    out: W,
    crc: u32,
    records: u64,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(out: W, header: &StreamHeader) -> io::Result<Self> {
        let mut w = StreamWriter {
            out,
            crc: 0,
            records: 0,
        };
        w.put(STREAM_MAGIC)?;
        let mut p = Vec::with_capacity(64 + 3 * 98);
        p.extend_from_slice(&STREAM_VERSION.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        for x in [
            header.store_id,
            header.disk_id,
            header.from_identity,
            header.to_identity,
            header.to_created_ns,
            header.data_bytes,
        ] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        for name in [&header.disk_name, &header.from_name, &header.to_name] {
            let len = u16::try_from(name.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
            p.extend_from_slice(&len.to_le_bytes());
            p.extend_from_slice(name.as_bytes());
        }
        w.record(KIND_HEADER, &[&p])?;
        Ok(w)
    }

    pub fn size(&mut self, size: u64) -> io::Result<()> {
        self.record(KIND_SIZE, &[&size.to_le_bytes()])
    }

    /// A DATA record; `data` at most [`MAX_DATA_RECORD`] bytes.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() || data.len() > MAX_DATA_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a DATA record holds 1 byte to 4 MiB",
            ));
        }
        self.record(KIND_DATA, &[&offset.to_le_bytes(), data])
    }

    pub fn zero(&mut self, offset: u64, length: u64) -> io::Result<()> {
        self.record(KIND_ZERO, &[&offset.to_le_bytes(), &length.to_le_bytes()])
    }

    /// Writes the END record and flushes; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        let mut p = [0u8; 16];
        p[..8].copy_from_slice(&self.records.to_le_bytes());
        p[8..12].copy_from_slice(&self.crc.to_le_bytes());
        self.record(KIND_END, &[&p])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn record(&mut self, kind: u32, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let mut head = [0u8; 16];
        head[..4].copy_from_slice(&kind.to_le_bytes());
        head[8..].copy_from_slice(&(len as u64).to_le_bytes());
        self.put(&head)?;
        for p in parts {
            self.put(p)?;
        }
        self.records += 1;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.out.write_all(bytes)
    }
}

/// Reads a stream: [`StreamReader::new`] (magic and header), then
/// [`StreamReader::next_record`] until [`StreamRecord::End`].
pub struct StreamReader<R: Read> {
    input: R,
    crc: u32,
    records: u64,
    size: Option<u64>,
    ended: bool,
}

impl<R: Read> StreamReader<R> {
    pub fn new(input: R) -> Result<(Self, StreamHeader), StreamError> {
        let mut r = StreamReader {
            input,
            crc: 0,
            records: 0,
            size: None,
            ended: false,
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic).map_err(|e| match e {
            StreamError::Truncated => StreamError::NotAStream,
            e => e,
        })?;
        if &magic != STREAM_MAGIC {
            return Err(StreamError::NotAStream);
        }
        let (kind, len) = r.record_head()?;
        if kind != KIND_HEADER || !(56..=MAX_OTHER_RECORD).contains(&len) {
            return Err(corrupt("the first record is not a header"));
        }
        let p = r.payload(len)?;
        let version = u32::from_le_bytes(p[..4].try_into().expect("4 bytes"));
        if version > STREAM_VERSION || version == 0 {
            return Err(StreamError::Version(version));
        }
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
        let mut pos = 56;
        let mut name = || -> Result<String, StreamError> {
            let len = p
                .get(pos..pos + 2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
                .ok_or_else(|| corrupt("the header's names are cut short"))?;
            let bytes = p
                .get(pos + 2..pos + 2 + len)
                .ok_or_else(|| corrupt("the header's names are cut short"))?;
            pos += 2 + len;
            String::from_utf8(bytes.to_vec()).map_err(|_| corrupt("a name is not UTF-8"))
        };
        let (disk_name, from_name, to_name) = (name()?, name()?, name()?);
        let header = StreamHeader {
            store_id: u64_at(8),
            disk_id: u64_at(16),
            from_identity: u64_at(24),
            to_identity: u64_at(32),
            to_created_ns: u64_at(40),
            data_bytes: u64_at(48),
            disk_name,
            from_name,
            to_name,
        };
        if header.to_identity == 0 {
            return Err(corrupt("the header names no snapshot"));
        }
        Ok((r, header))
    }

    /// The next record; after [`StreamRecord::End`], an error.
    pub fn next_record(&mut self) -> Result<StreamRecord, StreamError> {
        if self.ended {
            return Err(corrupt("read past the END record"));
        }
        loop {
            // What END checks covers every byte before its own record.
            let (crc, records) = (self.crc, self.records);
            let (kind, len) = self.record_head()?;
            let limit = if kind == KIND_DATA {
                MAX_DATA_RECORD as u64 + 8
            } else {
                MAX_OTHER_RECORD
            };
            if len > limit {
                return Err(corrupt(format!("a record of kind {kind} is {len} bytes")));
            }
            let p = self.payload(len)?;
            let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
            match kind {
                KIND_END => {
                    if len != 16 || p[12..16] != [0; 4] {
                        return Err(corrupt("the END record is malformed"));
                    }
                    let want = u32::from_le_bytes(p[8..12].try_into().expect("4 bytes"));
                    if u64_at(0) != records || want != crc {
                        return Err(corrupt(
                            "its checksum or record count does not match (damaged in transit?)",
                        ));
                    }
                    if self.size.is_none() {
                        return Err(corrupt("the stream has no SIZE record"));
                    }
                    self.ended = true;
                    // Anything after END is not ours to accept.
                    let mut extra = [0u8; 1];
                    if self.input.read(&mut extra)? != 0 {
                        return Err(corrupt("bytes follow the END record"));
                    }
                    return Ok(StreamRecord::End);
                }
                KIND_HEADER => return Err(corrupt("a second header")),
                KIND_SIZE => {
                    if len != 8 || self.size.is_some() {
                        return Err(corrupt("a malformed or second SIZE record"));
                    }
                    let size = u64_at(0);
                    self.size = Some(size);
                    return Ok(StreamRecord::Size(size));
                }
                KIND_DATA | KIND_ZERO => {
                    let size = self
                        .size
                        .ok_or_else(|| corrupt("data before the SIZE record"))?;
                    let (offset, length) = match kind {
                        KIND_DATA if len > 8 => (u64_at(0), len - 8),
                        KIND_ZERO if len == 16 => (u64_at(0), u64_at(8)),
                        _ => return Err(corrupt("a malformed DATA or ZERO record")),
                    };
                    if length == 0 || offset.checked_add(length).is_none_or(|e| e > size) {
                        return Err(corrupt(format!(
                            "a record covers {length} bytes at {offset}, past the disk's {size}"
                        )));
                    }
                    return Ok(if kind == KIND_DATA {
                        let mut data = p;
                        data.drain(..8);
                        StreamRecord::Data { offset, data }
                    } else {
                        StreamRecord::Zero { offset, length }
                    });
                }
                // A kind added later that this reader may ignore.
                _ => continue,
            }
        }
    }

    /// A record's kind and payload length (flags must be 0).
    fn record_head(&mut self) -> Result<(u32, u64), StreamError> {
        let mut head = [0u8; 16];
        self.take(&mut head)?;
        self.records += 1;
        let kind = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
        if head[4..8] != [0; 4] {
            return Err(corrupt("a record has flags this version does not know"));
        }
        Ok((
            kind,
            u64::from_le_bytes(head[8..].try_into().expect("8 bytes")),
        ))
    }

    /// `len` payload bytes (the caller bounded `len`).
    fn payload(&mut self, len: u64) -> Result<Vec<u8>, StreamError> {
        let mut p = vec![0u8; len as usize];
        self.take(&mut p)?;
        Ok(p)
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), StreamError> {
        self.input.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => StreamError::Truncated,
            _ => StreamError::Io(e),
        })?;
        self.crc = crc32c::crc32c_append(self.crc, buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> StreamHeader {
        StreamHeader {
            store_id: 1,
            disk_id: 2,
            from_identity: 3,
            to_identity: 4,
            to_created_ns: 5,
            data_bytes: 8192,
            disk_name: "vm".into(),
            from_name: "a".into(),
            to_name: "b".into(),
        }
    }

    fn sample() -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        w.size(1 << 20).unwrap();
        w.data(4096, &[7u8; 8192]).unwrap();
        w.zero(65536, 4096).unwrap();
        w.finish().unwrap()
    }

    fn read_all(bytes: &[u8]) -> Result<(StreamHeader, Vec<StreamRecord>), StreamError> {
        let (mut r, h) = StreamReader::new(bytes)?;
        let mut out = Vec::new();
        loop {
            let rec = r.next_record()?;
            let end = rec == StreamRecord::End;
            out.push(rec);
            if end {
                return Ok((h, out));
            }
        }
    }

    #[test]
    fn round_trip() {
        let (h, records) = read_all(&sample()).unwrap();
        assert_eq!(h, header());
        assert_eq!(
            records,
            vec![
                StreamRecord::Size(1 << 20),
                StreamRecord::Data {
                    offset: 4096,
                    data: vec![7u8; 8192]
                },
                StreamRecord::Zero {
                    offset: 65536,
                    length: 4096
                },
                StreamRecord::End,
            ]
        );
    }

    /// Every proper prefix of a stream is refused: cut short (mutation
    /// tried: END not required, the reader stopping at EOF -> fails).
    #[test]
    fn every_prefix_is_refused() {
        let s = sample();
        for n in 0..s.len() {
            assert!(read_all(&s[..n]).is_err(), "a {n}-byte prefix was accepted");
        }
    }

    /// A record of an unknown kind is skipped (and counted by END).
    #[test]
    fn unknown_records_are_skipped() {
        let mut w = StreamWriter::new(Vec::new(), &header()).unwrap();
        w.size(1 << 20).unwrap();
        w.record(77, &[b"something new"]).unwrap();
        w.data(0, &[1u8; 4096]).unwrap();
        let (_, records) = read_all(&w.finish().unwrap()).unwrap();
        assert_eq!(records.len(), 3);
    }

    /// Every bit of the END record counts, its reserved bytes too (they
    /// are outside the checksum; mutation tried: not required to be 0 ->
    /// a flip there is accepted).
    #[test]
    fn every_bit_of_the_end_record_counts() {
        let s = sample();
        for pos in s.len() - 32..s.len() {
            for bit in 0..8 {
                let mut t = s.clone();
                t[pos] ^= 1 << bit;
                assert!(
                    read_all(&t).is_err(),
                    "bit {bit} of byte {pos} flipped was accepted"
                );
            }
        }
    }

    #[test]
    fn a_newer_version_is_refused() {
        let mut s = sample();
        s[8 + 16] = 2;
        assert!(matches!(read_all(&s), Err(StreamError::Version(2))));
    }

    proptest! {
        /// Any single flipped bit is refused, never accepted as other
        /// data (mutation tried: crc not compared -> a flipped data byte
        /// is accepted).
        #[test]
        fn a_flipped_bit_is_refused(pos in 0usize..8400, bit in 0u8..8) {
            let mut s = sample();
            let pos = pos % s.len();
            s[pos] ^= 1 << bit;
            prop_assert!(read_all(&s).is_err());
        }

        /// Arbitrary bytes after the magic never panic the reader.
        #[test]
        fn arbitrary_bytes_never_panic(tail in prop::collection::vec(any::<u8>(), 0..600)) {
            let mut s = STREAM_MAGIC.to_vec();
            s.extend(tail);
            let _ = read_all(&s);
        }
    }
}
