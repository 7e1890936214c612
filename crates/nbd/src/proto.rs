//! NBD wire constants and codecs for the transmission phase.
//!
//! All integers on the wire are big-endian. Layouts (sizes in bytes):
//!
//! ```text
//! request header (28), client -> server
//!   0 4 magic 0x25609513   4 2 command flags   6 2 type
//!   8 8 cookie            16 8 offset         24 4 length
//!   (then `length` bytes of data for NBD_CMD_WRITE only)
//!
//! simple reply header (16), server -> client
//!   0 4 magic 0x67446698   4 4 error   8 8 cookie
//!   (then the read data, for a successful NBD_CMD_READ only)
//!
//! structured reply chunk header (20), server -> client
//!   0 4 magic 0x668e33ef   4 2 flags   6 2 type   8 8 cookie   16 4 payload length
//! ```
//!
//! Invariants:
//! - Decoding never panics: [`Request::decode`] takes exactly one header and
//!   fails only on a bad magic; unknown command types and flags are kept
//!   as they are ([`Command::Unknown`], `flags`) for the server to reject.
//! - Encoders only append to `out`, never clear or rewrite it, and always
//!   append a well-formed message whose length fields match what they
//!   wrote (over-long inputs are clamped, see each function).
//! - `Request::encode(&Request::decode(h)?) == *h` for every header `h`.

/// "NBDMAGIC": first 8 bytes sent by the server.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle magic, sent by the server in the greeting and by
/// the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Size of a request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_HEADER_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;

// Handshake flags (u16, server greeting).
/// Server supports fixed newstyle negotiation.
pub const HANDSHAKE_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server may omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const HANDSHAKE_FLAG_NO_ZEROES: u16 = 1 << 1;

// Client flags (u32, first thing the client sends).
/// Client speaks fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client asks the server to omit the 124 zero bytes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

// Transmission flags (u16).
/// Must always be set.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// The export behaves like a rotational medium.
pub const TF_ROTATIONAL: u16 = 1 << 4;
/// `NBD_CMD_TRIM` is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` and `NBD_CMD_FLAG_NO_HOLE` are supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported (only with structured replies).
pub const TF_SEND_DF: u16 = 1 << 7;
/// Flush and FUA are visible across all connections to the export.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_RESIZE` is supported (experimental; never set by us).
pub const TF_SEND_RESIZE: u16 = 1 << 9;
/// `NBD_CMD_CACHE` is understood.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Command flags (u16, in requests).
/// Force unit access: persist before replying.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES`: do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_READ`: do not fragment the structured reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_BLOCK_STATUS`: one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_WRITE_ZEROES`: fail with `ENOTSUP` unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Error values sent on the wire (fixed by the protocol, not the host errno).
/// Operation not permitted (e.g. write to a read-only export).
pub const EPERM: u32 = 1;
/// Input/output error.
pub const EIO: u32 = 5;
/// Cannot allocate memory.
pub const ENOMEM: u32 = 12;
/// Invalid argument.
pub const EINVAL: u32 = 22;
/// No space left (e.g. write beyond the end of the export).
pub const ENOSPC: u32 = 28;
/// Value too large (e.g. DF read too long for one chunk).
pub const EOVERFLOW: u32 = 75;
/// Operation not supported (e.g. FAST_ZERO that would be slow).
pub const ENOTSUP: u32 = 95;
/// Server is shutting down.
pub const ESHUTDOWN: u32 = 108;

// base:allocation status flags.
/// The extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// The extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// Structured reply flags and types.
/// Last chunk of a structured reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
/// `NBD_REPLY_TYPE_ERROR_OFFSET`.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// Options (u32, handshake phase).
/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_PEEK_EXPORT` (withdrawn).
pub const OPT_PEEK_EXPORT: u32 = 4;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option reply types (u32).
/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit set in every error reply type.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR + 1;
/// `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR + 2;
/// `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR + 3;
/// `NBD_REP_ERR_PLATFORM`.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR + 4;
/// `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR + 5;
/// `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR + 6;
/// `NBD_REP_ERR_SHUTDOWN`.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR + 7;
/// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR + 8;
/// `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR + 9;

// Information types (u16) of NBD_OPT_INFO / NBD_OPT_GO.
/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: human readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Largest `data_len` that [`structured_data_header`] can describe (the
/// chunk length field is a u32 that also covers the 8-byte offset).
pub const MAX_STRUCTURED_DATA: usize = u32::MAX as usize - 8;
/// Error messages in structured error chunks are cut to this many bytes
/// (the protocol's limit for any string).
pub const MAX_ERROR_MESSAGE: usize = 4096;
/// Most extents one block status chunk can carry (u32 length field).
pub const MAX_EXTENTS_PER_CHUNK: usize = (u32::MAX as usize - 4) / 8;

/// Errors of the transmission-phase decoder.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ProtoError {
    /// The header does not start with [`REQUEST_MAGIC`]; the stream is out
    /// of sync and the connection must be closed.
    #[error("bad request magic {0:#x}")]
    BadMagic(u32),
}

/// A request type. Values outside the known set are kept in `Unknown`
/// so that the server can answer them with `EINVAL`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1); the header is followed by `length` bytes.
    Write,
    /// `NBD_CMD_DISC` (2): soft disconnect, no reply.
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Any other type value. Never holds one of the values above when
    /// produced by [`Command::from_wire`].
    Unknown(u16),
}

impl Command {
    /// Maps the 16-bit type field of a request to a command.
    pub fn from_wire(value: u16) -> Command {
        match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    /// The 16-bit type field for this command.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(other) => other,
        }
    }
}

/// A decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`), unchecked.
    pub flags: u16,
    /// Request type.
    pub command: Command,
    /// Opaque value echoed in every reply to this request (the spec's
    /// "handle").
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length of the request.
    pub length: u32,
}

impl Request {
    /// Decodes a 28-byte request header. Err only on bad magic.
    pub fn decode(header: &[u8; REQUEST_HEADER_LEN]) -> Result<Request, ProtoError> {
        // Destructuring a fixed-size array cannot go out of bounds.
        let [m0, m1, m2, m3, f0, f1, t0, t1, rest @ ..] = *header;
        let [c0, c1, c2, c3, c4, c5, c6, c7, rest @ ..] = rest;
        let [o0, o1, o2, o3, o4, o5, o6, o7, l0, l1, l2, l3] = rest;
        let magic = u32::from_be_bytes([m0, m1, m2, m3]);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes([f0, f1]),
            command: Command::from_wire(u16::from_be_bytes([t0, t1])),
            cookie: u64::from_be_bytes([c0, c1, c2, c3, c4, c5, c6, c7]),
            offset: u64::from_be_bytes([o0, o1, o2, o3, o4, o5, o6, o7]),
            length: u32::from_be_bytes([l0, l1, l2, l3]),
        })
    }

    /// Encodes a header (used by tests and fuzzers that play the client).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_LEN] {
        let mut v = Vec::with_capacity(REQUEST_HEADER_LEN);
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&self.flags.to_be_bytes());
        v.extend_from_slice(&self.command.to_wire().to_be_bytes());
        v.extend_from_slice(&self.cookie.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.length.to_be_bytes());
        let mut header = [0u8; REQUEST_HEADER_LEN];
        for (dst, src) in header.iter_mut().zip(v) {
            *dst = src;
        }
        header
    }

    /// Bytes of payload that follow this header on the wire (length for
    /// Write, else 0).
    pub fn payload_len(&self) -> u32 {
        match self.command {
            Command::Write => self.length,
            _ => 0,
        }
    }
}

/// Appends a simple reply header (16 bytes). For a successful read the
/// caller appends the data right after it.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

fn chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_DATA` chunk header (20 bytes) and its
/// 8-byte offset; the caller appends exactly `data_len` bytes of data.
/// `data_len` is clamped to [`MAX_STRUCTURED_DATA`] (a caller must split
/// longer reads into several chunks). The protocol wants `data_len >= 1`.
pub fn structured_data_header(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    data_len: usize,
    done: bool,
) {
    let len = u32::try_from(data_len.min(MAX_STRUCTURED_DATA) + 8).unwrap_or(u32::MAX);
    chunk_header(out, cookie, done_flag(done), REPLY_TYPE_OFFSET_DATA, len);
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: `len` bytes at `offset`
/// read as zeroes (the protocol wants `len >= 1`).
pub fn structured_hole(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32, done: bool) {
    chunk_header(out, cookie, done_flag(done), REPLY_TYPE_OFFSET_HOLE, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends an `NBD_REPLY_TYPE_NONE` chunk with the DONE flag: the final
/// chunk of a successful structured reply.
pub fn structured_done(out: &mut Vec<u8>, cookie: u64) {
    chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// Longest prefix of `s` of at most `max` bytes that ends on a character
/// boundary.
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1; // terminates: 0 is always a boundary
    }
    s.get(..end).unwrap_or("")
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk with the DONE flag. `error`
/// should be one of the wire errno values and nonzero; `message` is cut
/// to [`MAX_ERROR_MESSAGE`] bytes on a character boundary.
pub fn structured_error(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let message = truncate_str(message, MAX_ERROR_MESSAGE);
    let msg_len = u16::try_from(message.len()).unwrap_or(0);
    let message = if msg_len == 0 { "" } else { message };
    chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + u32::from(msg_len),
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for metadata context
/// `context_id` with `(length, flags)` descriptors. At most
/// [`MAX_EXTENTS_PER_CHUNK`] extents are written; the protocol wants at
/// least one, each with a nonzero length.
pub fn structured_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    let extents = extents.get(..MAX_EXTENTS_PER_CHUNK).unwrap_or(extents);
    let len = u32::try_from(4 + 8 * extents.len()).unwrap_or(u32::MAX);
    chunk_header(out, cookie, done_flag(done), REPLY_TYPE_BLOCK_STATUS, len);
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// Appends one option reply (handshake phase): magic, option, reply type,
/// data length, data. `data` longer than `u32::MAX` is cut.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    let data = data.get(..u32::MAX as usize).unwrap_or(data);
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends one client option (handshake phase): `IHAVEOPT`, option, data
/// length, data. For tests and fuzzers that play the client; `data`
/// longer than `u32::MAX` is cut.
pub fn client_option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    let data = data.get(..u32::MAX as usize).unwrap_or(data);
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// Client side: the data of `NBD_OPT_INFO` / `NBD_OPT_GO`: the export
/// name, then the information requests.
pub fn info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

/// Client side: the data of `NBD_OPT_LIST_META_CONTEXT` /
/// `NBD_OPT_SET_META_CONTEXT`: the export name, then the queries.
pub fn meta_context_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Big-endian cursor over untrusted bytes: every read is checked and
/// returns `None` past the end, never panics.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.buf.split_first_chunk::<N>()?;
        self.buf = rest;
        Some(*head)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

#[cfg(test)]
mod tests;
