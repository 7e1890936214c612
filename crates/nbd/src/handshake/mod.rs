//! Server side of the NBD handshake (fixed newstyle) as a sans-IO state
//! machine.
//!
//! The caller owns the socket: it sends [`Handshake::greeting`], then feeds
//! whatever it reads into [`Handshake::receive`] and sends whatever that
//! appends to `out`, until `receive` returns [`Progress::Done`] (enter the
//! transmission phase), [`Progress::Close`] or an error (send `out`, then
//! close the connection).
//!
//! ```text
//! S: "NBDMAGIC" "IHAVEOPT" u16 handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
//! C: u32 client flags
//! C: "IHAVEOPT" u32 option u32 length, data      (repeated)
//! S: u64 OPTION_REPLY_MAGIC u32 option u32 reply type u32 length, data
//!    (one or more per option, the last one an ACK or an error)
//! ```
//!
//! Invariants:
//! - `receive` never panics and never buffers more than one option: an
//!   option header announcing more than `Config::max_option_len` bytes of
//!   data is an error as soon as its 16-byte header has arrived.
//! - `receive` only removes whole messages from the front of `input`;
//!   a partial message stays there until the rest arrives, so the result
//!   does not depend on how the byte stream was split. After `Done`, the
//!   bytes left in `input` belong to the transmission phase.
//! - Every option other than `NBD_OPT_EXPORT_NAME` and a successful
//!   `NBD_OPT_GO` gets a final reply (ACK or error) and negotiation goes
//!   on; malformed option data is answered with `NBD_REP_ERR_INVALID`,
//!   never by dropping the connection. Only unknown client flags, a bad
//!   option magic, an over-long option, or an `NBD_OPT_EXPORT_NAME` for an
//!   unknown export end the session.
//! - Once `receive` has returned `Done`, `Close` or an error, every later
//!   call returns [`HandshakeError::Finished`].
//! - TLS (`Config::tls`): with [`TlsMode::Off`], `NBD_OPT_STARTTLS` gets
//!   `NBD_REP_ERR_UNSUP`. Otherwise it gets an ACK and `receive` returns
//!   [`Progress::StartTls`]: the caller sends `out`, runs the TLS handshake
//!   on the socket and goes on feeding `receive` with what it reads inside
//!   TLS. Everything negotiated before (structured replies, meta context)
//!   is forgotten. Bytes the client sent after `NBD_OPT_STARTTLS`, before
//!   our ACK, are an error (they would be plain text smuggled into the TLS
//!   session). With [`TlsMode::Require`], before TLS every option but
//!   STARTTLS and ABORT gets `NBD_REP_ERR_TLS_REQD`, `NBD_OPT_EXPORT_NAME`
//!   ends the session, and a client without `FIXED_NEWSTYLE` (which cannot
//!   ask for TLS) is refused at once; once TLS is up, `NBD_REP_ERR_TLS_REQD`
//!   is never sent and a second STARTTLS gets `NBD_REP_ERR_INVALID`.
//! - Metadata contexts: `base:allocation`, with id [`BASE_ALLOCATION_ID`],
//!   and whatever else [`Exports::meta_contexts`] offers for an export
//!   (ids from [`FIRST_EXTRA_CONTEXT_ID`] in the order the client's SET
//!   named them, at most [`MAX_EXTRA_CONTEXTS`]). The selection is
//!   [`Negotiated::base_allocation`] and [`Negotiated::meta_contexts`],
//!   both set only if the last `NBD_OPT_SET_META_CONTEXT` named the very
//!   export that was finally chosen. A LIST query ending in `:` (`base:`,
//!   `qemu:`, `qemu:dirty-bitmap:`) lists every context it begins; no
//!   query lists them all.

use crate::proto::*;

/// Name of the only metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id of `base:allocation` once selected with
/// `NBD_OPT_SET_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Context id of the first other context a SET selects.
pub const FIRST_EXTRA_CONTEXT_ID: u32 = 2;
/// Contexts besides `base:allocation` one SET may select.
pub const MAX_EXTRA_CONTEXTS: usize = 16;
/// Longest export name or description we handle (the protocol's limit
/// for any string).
pub const MAX_STRING_LEN: usize = 4096;
/// Size of the greeting sent by [`Handshake::greeting`].
pub const GREETING_LEN: usize = 18;
/// Handshake flags sent in the greeting.
pub const HANDSHAKE_FLAGS: u16 = HANDSHAKE_FLAG_FIXED_NEWSTYLE | HANDSHAKE_FLAG_NO_ZEROES;

/// Export names are cut to this many bytes inside human-readable error
/// messages.
const NAME_IN_MESSAGE: usize = 64;
const OPTION_HEADER_LEN: usize = 16;

/// What the server knows about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// Human readable description, sent on request.
    pub description: Option<String>,
}

/// What the server offers; looked up during negotiation.
pub trait Exports {
    /// The export called `name` (`""` asks for the default export, if the
    /// server has one).
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// What `NBD_OPT_INFO` and the meta-context options need to know of
    /// export `name`, which the client may never use: a server can answer
    /// it more cheaply than [`Exports::lookup`], which `NBD_OPT_GO` and
    /// `NBD_OPT_EXPORT_NAME` call before transmission.
    fn describe(&self, name: &str) -> Option<ExportInfo> {
        self.lookup(name)
    }
    /// Every export, as (name, description), for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, Option<String>)>; // (name, description)
    /// Why the last [`Exports::lookup`] or [`Exports::describe`] of `name`
    /// found nothing, when the server knows better than "not found" (the
    /// client sees it in the error reply).
    fn why_not(&self, _name: &str) -> Option<String> {
        None
    }
    /// The metadata contexts export `name` offers besides
    /// `base:allocation` (full names, e.g. `qemu:allocation-depth`).
    fn meta_contexts(&self, _name: &str) -> Vec<String> {
        Vec::new()
    }
}

/// The error message for an export `lookup`/`describe` did not find.
fn not_found(exports: &dyn Exports, name: &str) -> String {
    let reason = exports
        .why_not(name)
        .unwrap_or_else(|| format!("export '{}' not found", truncate_str(name, NAME_IN_MESSAGE)));
    truncate_str(&reason, MAX_STRING_LEN).to_string()
}

/// A fixed set of exports: [`Exports`] for a server whose exports do not
/// change while it runs, and for tests and fuzz targets.
#[derive(Debug, Clone, Default)]
pub struct ExportTable {
    exports: Vec<(String, ExportInfo)>,
    /// The export that `""` stands for, if any.
    default: Option<String>,
}

impl ExportTable {
    /// Adds an export.
    pub fn with(
        mut self,
        name: &str,
        size: u64,
        read_only: bool,
        description: Option<&str>,
    ) -> Self {
        self.exports.push((
            name.to_string(),
            ExportInfo {
                size,
                read_only,
                description: description.map(str::to_string),
            },
        ));
        self
    }

    /// Makes `name` the default export (the one `""` asks for).
    pub fn with_default(mut self, name: &str) -> Self {
        self.default = Some(name.to_string());
        self
    }

    /// The exports the `nbd_handshake` fuzz target serves, shared with the
    /// seeds that drive it: "disk" (1 MiB, read-write, "rw") and "ro"
    /// (64 KiB, read-only).
    pub fn fuzz_fixture() -> Self {
        ExportTable::default()
            .with("disk", 1 << 20, false, Some("rw"))
            .with("ro", 1 << 16, true, None)
    }
}

impl Exports for ExportTable {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let name = match (name, &self.default) {
            ("", Some(d)) => d.as_str(),
            _ => name,
        };
        self.exports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, info)| info.clone())
    }

    fn list(&self) -> Vec<(String, Option<String>)> {
        self.exports
            .iter()
            .map(|(n, info)| (n.clone(), info.description.clone()))
            .collect()
    }
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Smallest addressable unit (power of two, at most 64 KiB).
    pub minimum: u32,
    /// Efficient I/O size (power of two, at least 512 and `minimum`).
    pub preferred: u32,
    /// Largest request the server accepts (a multiple of `minimum`).
    pub maximum: u32,
}

impl Default for BlockSizes {
    /// 1 / 4 KiB / 32 MiB: byte-granular access, 4 KiB preferred, and the
    /// largest request every client can be expected to honour.
    fn default() -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: 32 << 20,
        }
    }
}

/// Whether a connection may, or must, upgrade to TLS (`doc/proto.md`, "TLS
/// support").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS ("NOTLS"): `NBD_OPT_STARTTLS` is refused as unsupported.
    #[default]
    Off,
    /// TLS on the client's request; every export is available with or
    /// without it ("SELECTIVETLS" with no TLS-only export).
    Optional,
    /// Nothing but STARTTLS and ABORT before TLS ("FORCEDTLS").
    Require,
}

/// Server policy for negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Advertised to every client that asks with INFO or GO.
    pub block_sizes: BlockSizes,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`.
    pub multi_conn: bool,
    /// Largest option data accepted; a longer option closes the connection.
    pub max_option_len: u32,
    /// TLS policy; anything but `Off` needs a caller able to run TLS.
    pub tls: TlsMode,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            block_sizes: BlockSizes::default(),
            multi_conn: false,
            max_option_len: 65536,
            tls: TlsMode::Off,
        }
    }
}

/// Outcome of negotiation, handed to the transmission phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Export name as sent by the client.
    pub export: String,
    /// The export, as returned by [`Exports::lookup`].
    pub info: ExportInfo,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// The client negotiated structured replies.
    pub structured_replies: bool,
    /// Context id chosen for `base:allocation` by SET_META_CONTEXT, if selected.
    pub base_allocation: Option<u32>,
    /// The other contexts SET_META_CONTEXT selected: (id, name).
    pub meta_contexts: Vec<(u32, String)>,
    /// The connection was upgraded to TLS before the export was chosen.
    pub tls: bool,
}

/// Result of one [`Handshake::receive`] call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Read more bytes from the client and call `receive` again.
    NeedInput,
    /// Send `out`, then enter transmission with this export.
    Done(Negotiated),
    /// Send `out`, then close the connection (client sent ABORT, or asked
    /// for an unknown export via EXPORT_NAME which has no error reply).
    Close,
    /// Send `out` (the ACK of `NBD_OPT_STARTTLS`), run the TLS handshake as
    /// the server, then call `receive` with the bytes read inside TLS. A
    /// failed TLS handshake ends the session: the ACK cannot be taken back.
    StartTls,
}

/// A violation that ends the session; the caller sends `out` and closes
/// the connection.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client flags have bits other than FIXED_NEWSTYLE and NO_ZEROES.
    #[error("client sent unknown flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#x}")]
    BadOptionMagic(u64),
    /// An option announced more data than `Config::max_option_len`.
    #[error("option {option} announces {length} bytes of data, more than the limit of {max}")]
    OptionTooLong {
        /// The option number.
        option: u32,
        /// Its announced data length.
        length: u32,
        /// The configured limit.
        max: u32,
    },
    /// `receive` was called after negotiation had ended.
    #[error("negotiation already ended")]
    Finished,
    /// The client sent bytes after `NBD_OPT_STARTTLS` without waiting for
    /// the reply: they would be plain text taken as coming from inside TLS.
    #[error("data after NBD_OPT_STARTTLS, before the TLS handshake")]
    DataAfterStartTls,
    /// TLS is required and the client did not set `FIXED_NEWSTYLE`, without
    /// which it cannot ask for TLS.
    #[error("TLS is required and the client does not speak fixed newstyle")]
    TlsNeedsFixedNewstyle,
}

/// Transmission flags for `info`: everything we implement, minus the write
/// features on a read-only export; `NBD_FLAG_SEND_DF` only with structured
/// replies (the spec requires it clear otherwise).
pub fn transmission_flags(config: &Config, info: &ExportInfo, structured_replies: bool) -> u16 {
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_CACHE;
    if info.read_only {
        flags |= TF_READ_ONLY;
    } else {
        flags |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if structured_replies {
        flags |= TF_SEND_DF;
    }
    if config.multi_conn {
        flags |= TF_CAN_MULTI_CONN;
    }
    flags
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    Finished,
}

/// What handling one option leads to.
enum Step {
    Continue,
    Done(Negotiated),
    Close,
    StartTls,
}

/// The negotiation state of one connection.
#[derive(Debug)]
pub struct Handshake {
    config: Config,
    state: State,
    no_zeroes: bool,
    structured_replies: bool,
    /// What the last SET_META_CONTEXT selected, if anything.
    meta: Option<MetaSelection>,
    /// The session runs inside TLS.
    tls: bool,
    /// The server is shutting down ([`Handshake::shut_down`]).
    shutting_down: bool,
}

impl Handshake {
    /// A handshake waiting for the client flags.
    pub fn new(config: Config) -> Handshake {
        Handshake {
            config,
            state: State::ClientFlags,
            no_zeroes: false,
            structured_replies: false,
            meta: None,
            tls: false,
            shutting_down: false,
        }
    }

    /// The server is shutting down: from now on every option but ABORT
    /// gets `NBD_REP_ERR_SHUTDOWN` (`NBD_OPT_EXPORT_NAME`, which has no
    /// error reply, ends the session), so that the client can leave
    /// cleanly.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    /// Appends the server greeting (NBDMAGIC, IHAVEOPT, handshake flags
    /// FIXED_NEWSTYLE|NO_ZEROES) to `out`.
    pub fn greeting(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&HANDSHAKE_FLAGS.to_be_bytes());
    }

    /// True once `receive` has returned `StartTls`: the session runs inside
    /// TLS.
    pub fn in_tls(&self) -> bool {
        self.tls
    }

    /// True once `receive` has returned `Done`, `Close` or an error.
    pub fn is_finished(&self) -> bool {
        self.state == State::Finished
    }

    /// Consumes as many complete messages from the front of `input` as
    /// possible, draining the consumed bytes from `input` (so leftover
    /// partial message stays), appending replies to `out`. Stops at
    /// Done/Close (leaving any bytes after the final option in `input`,
    /// they belong to the transmission phase).
    pub fn receive(
        &mut self,
        input: &mut Vec<u8>,
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Result<Progress, HandshakeError> {
        let (consumed, result) = self.run(input, exports, out);
        input.drain(..consumed.min(input.len()));
        if !matches!(result, Ok(Progress::NeedInput | Progress::StartTls)) {
            self.state = State::Finished;
        }
        result
    }

    /// Handles messages from the front of `input`; returns how many bytes
    /// were consumed (whole messages only) and the outcome.
    fn run(
        &mut self,
        input: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> (usize, Result<Progress, HandshakeError>) {
        let mut pos = 0;
        loop {
            let mut r = Reader::new(input.get(pos..).unwrap_or_default());
            match self.state {
                State::Finished => return (pos, Err(HandshakeError::Finished)),
                State::ClientFlags => {
                    let Some(flags) = r.u32() else {
                        return (pos, Ok(Progress::NeedInput));
                    };
                    pos += 4;
                    if flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
                        return (pos, Err(HandshakeError::BadClientFlags(flags)));
                    }
                    if self.config.tls == TlsMode::Require
                        && flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0
                    {
                        return (pos, Err(HandshakeError::TlsNeedsFixedNewstyle));
                    }
                    // A client without FIXED_NEWSTYLE is served as if it had
                    // set it: it only differs in the replies it understands.
                    self.no_zeroes = flags & CLIENT_FLAG_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    let (Some(magic), Some(option), Some(length)) = (r.u64(), r.u32(), r.u32())
                    else {
                        return (pos, Ok(Progress::NeedInput));
                    };
                    if magic != IHAVEOPT {
                        return (pos, Err(HandshakeError::BadOptionMagic(magic)));
                    }
                    if length > self.config.max_option_len {
                        let max = self.config.max_option_len;
                        return (
                            pos,
                            Err(HandshakeError::OptionTooLong {
                                option,
                                length,
                                max,
                            }),
                        );
                    }
                    let len = usize::try_from(length).unwrap_or(usize::MAX);
                    let Some(data) = r.bytes(len) else {
                        return (pos, Ok(Progress::NeedInput));
                    };
                    let step = self.option(option, data, exports, out);
                    pos = pos.saturating_add(OPTION_HEADER_LEN).saturating_add(len);
                    match step {
                        Step::Continue => {}
                        Step::Done(negotiated) => return (pos, Ok(Progress::Done(negotiated))),
                        Step::Close => return (pos, Ok(Progress::Close)),
                        Step::StartTls => {
                            if pos != input.len() {
                                return (pos, Err(HandshakeError::DataAfterStartTls));
                            }
                            option_reply(out, option, REP_ACK, &[]);
                            self.tls = true;
                            self.structured_replies = false;
                            self.meta = None;
                            return (pos, Ok(Progress::StartTls));
                        }
                    }
                }
            }
        }
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Step {
        if self.shutting_down {
            return match option {
                OPT_ABORT => self.option_any_tls(option, data, exports, out),
                OPT_EXPORT_NAME => Step::Close,
                _ => {
                    reply_error(out, option, REP_ERR_SHUTDOWN, "the server is shutting down");
                    Step::Continue
                }
            };
        }
        if self.config.tls == TlsMode::Require && !self.tls {
            return match option {
                OPT_STARTTLS | OPT_ABORT => self.option_any_tls(option, data, exports, out),
                // No error reply exists for EXPORT_NAME.
                OPT_EXPORT_NAME => Step::Close,
                _ => {
                    reply_error(out, option, REP_ERR_TLS_REQD, "TLS is required");
                    Step::Continue
                }
            };
        }
        self.option_any_tls(option, data, exports, out)
    }

    /// Handles an option the TLS policy lets through.
    fn option_any_tls(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Step {
        match option {
            OPT_EXPORT_NAME => self.export_name(data, exports, out),
            OPT_ABORT => {
                // The spec asks servers to ignore any data sent with ABORT.
                option_reply(out, option, REP_ACK, &[]);
                Step::Close
            }
            OPT_LIST => {
                if data.is_empty() {
                    list(exports, out);
                } else {
                    reply_error(out, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
                }
                Step::Continue
            }
            OPT_STARTTLS => {
                if self.config.tls == TlsMode::Off {
                    reply_error(out, option, REP_ERR_UNSUP, "TLS is not offered");
                } else if self.tls {
                    reply_error(out, option, REP_ERR_INVALID, "TLS is already running");
                } else if !data.is_empty() {
                    reply_error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS takes no data",
                    );
                } else {
                    return Step::StartTls;
                }
                Step::Continue
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, exports, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.structured_replies {
                    reply_error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    self.structured_replies = true;
                    option_reply(out, option, REP_ACK, &[]);
                }
                Step::Continue
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, exports, out);
                Step::Continue
            }
            _ => {
                // Includes NBD_OPT_EXTENDED_HEADERS and NBD_OPT_PEEK_EXPORT.
                let message = format!("option {option} is not supported");
                reply_error(out, option, REP_ERR_UNSUP, &message);
                Step::Continue
            }
        }
    }

    fn negotiated(&self, export: &str, info: ExportInfo) -> Negotiated {
        let selected = self
            .meta
            .as_ref()
            .filter(|m| self.structured_replies && m.export == export);
        let base_allocation = selected
            .is_some_and(|m| m.base)
            .then_some(BASE_ALLOCATION_ID);
        let meta_contexts = selected
            .map(|m| {
                (FIRST_EXTRA_CONTEXT_ID..)
                    .zip(m.extra.iter().cloned())
                    .collect()
            })
            .unwrap_or_default();
        Negotiated {
            export: export.to_owned(),
            transmission_flags: transmission_flags(&self.config, &info, self.structured_replies),
            info,
            structured_replies: self.structured_replies,
            base_allocation,
            meta_contexts,
            tls: self.tls,
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: no error reply exists, so anything but a
    /// known export closes the connection.
    fn export_name(&mut self, data: &[u8], exports: &dyn Exports, out: &mut Vec<u8>) -> Step {
        let Ok(name) = export_name(data) else {
            return Step::Close;
        };
        let Some(info) = exports.lookup(name) else {
            return Step::Close;
        };
        let negotiated = self.negotiated(name, info);
        out.extend_from_slice(&negotiated.info.size.to_be_bytes());
        out.extend_from_slice(&negotiated.transmission_flags.to_be_bytes());
        if !self.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Step::Done(negotiated)
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: u32 name length, name, u16 count,
    /// count x u16 information requests.
    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &dyn Exports,
        out: &mut Vec<u8>,
    ) -> Step {
        let Some((name, requests)) = parse_info_request(data) else {
            reply_error(
                out,
                option,
                REP_ERR_INVALID,
                "malformed NBD_OPT_INFO/NBD_OPT_GO data",
            );
            return Step::Continue;
        };
        let name = match export_name(name) {
            Ok(name) => name,
            Err(why) => {
                reply_error(out, option, REP_ERR_INVALID, why);
                return Step::Continue;
            }
        };
        let found = if option == OPT_GO {
            exports.lookup(name)
        } else {
            exports.describe(name)
        };
        let Some(info) = found else {
            reply_error(out, option, REP_ERR_UNKNOWN, &not_found(exports, name));
            return Step::Continue;
        };
        let negotiated = self.negotiated(name, info);
        let mut payload = Vec::with_capacity(14);
        payload.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        payload.extend_from_slice(&negotiated.info.size.to_be_bytes());
        payload.extend_from_slice(&negotiated.transmission_flags.to_be_bytes());
        option_reply(out, option, REP_INFO, &payload);
        if requests.contains(&INFO_NAME) {
            payload.clear();
            payload.extend_from_slice(&INFO_NAME.to_be_bytes());
            payload.extend_from_slice(name.as_bytes());
            option_reply(out, option, REP_INFO, &payload);
        }
        if let Some(description) = negotiated.info.description.as_deref() {
            if requests.contains(&INFO_DESCRIPTION) {
                payload.clear();
                payload.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                payload.extend_from_slice(truncate_str(description, MAX_STRING_LEN).as_bytes());
                option_reply(out, option, REP_INFO, &payload);
            }
        }
        let sizes = self.config.block_sizes;
        payload.clear();
        payload.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        payload.extend_from_slice(&sizes.minimum.to_be_bytes());
        payload.extend_from_slice(&sizes.preferred.to_be_bytes());
        payload.extend_from_slice(&sizes.maximum.to_be_bytes());
        option_reply(out, option, REP_INFO, &payload);
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Step::Done(negotiated)
        } else {
            Step::Continue
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: u32 name
    /// length, name, u32 query count, count x (u32 length, query).
    fn meta_context(&mut self, option: u32, data: &[u8], exports: &dyn Exports, out: &mut Vec<u8>) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection even when it fails.
            self.meta = None;
        }
        if !self.structured_replies {
            reply_error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            reply_error(
                out,
                option,
                REP_ERR_INVALID,
                "malformed meta context request",
            );
            return;
        };
        let name = match export_name(name) {
            Ok(name) => name,
            Err(why) => {
                reply_error(out, option, REP_ERR_INVALID, why);
                return;
            }
        };
        if exports.describe(name).is_none() {
            reply_error(out, option, REP_ERR_UNKNOWN, &not_found(exports, name));
            return;
        }
        let offered = exports.meta_contexts(name);
        if set {
            let mut selection = MetaSelection {
                export: name.to_owned(),
                base: false,
                extra: Vec::new(),
            };
            for q in &queries {
                if *q == BASE_ALLOCATION.as_bytes() {
                    if !selection.base {
                        selection.base = true;
                        meta_context_reply(out, option, BASE_ALLOCATION_ID, BASE_ALLOCATION);
                    }
                } else if let Some(c) = offered.iter().find(|c| c.as_bytes() == *q) {
                    if !selection.extra.contains(c) && selection.extra.len() < MAX_EXTRA_CONTEXTS {
                        let id = FIRST_EXTRA_CONTEXT_ID + selection.extra.len() as u32;
                        meta_context_reply(out, option, id, c);
                        selection.extra.push(c.clone());
                    }
                }
            }
            if selection.base || !selection.extra.is_empty() {
                self.meta = Some(selection);
            }
        } else {
            let listed = |c: &str| {
                queries.is_empty()
                    || queries.iter().any(|q| {
                        *q == c.as_bytes() || (q.ends_with(b":") && c.as_bytes().starts_with(q))
                    })
            };
            for c in std::iter::once(BASE_ALLOCATION).chain(offered.iter().map(String::as_str)) {
                if listed(c) {
                    // Context ids in LIST replies are reserved: the spec says 0.
                    meta_context_reply(out, option, 0, c);
                }
            }
        }
        option_reply(out, option, REP_ACK, &[]);
    }
}

fn reply_error(out: &mut Vec<u8>, option: u32, reply_type: u32, message: &str) {
    option_reply(out, option, reply_type, message.as_bytes());
}

fn meta_context_reply(out: &mut Vec<u8>, option: u32, id: u32, name: &str) {
    let mut payload = Vec::with_capacity(4 + name.len());
    payload.extend_from_slice(&id.to_be_bytes());
    payload.extend_from_slice(name.as_bytes());
    option_reply(out, option, REP_META_CONTEXT, &payload);
}

/// What a SET_META_CONTEXT selected, for which export.
#[derive(Debug)]
struct MetaSelection {
    export: String,
    base: bool,
    /// The other contexts, in the order of their ids.
    extra: Vec<String>,
}

/// One `NBD_REP_SERVER` per export, then ACK.
fn list(exports: &dyn Exports, out: &mut Vec<u8>) {
    let mut payload = Vec::new();
    for (name, description) in exports.list() {
        payload.clear();
        payload.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
        payload.extend_from_slice(name.as_bytes());
        if let Some(description) = description.as_deref() {
            payload.extend_from_slice(truncate_str(description, MAX_STRING_LEN).as_bytes());
        }
        option_reply(out, OPT_LIST, REP_SERVER, &payload);
    }
    option_reply(out, OPT_LIST, REP_ACK, &[]);
}

/// Checks an export name received from the client.
fn export_name(bytes: &[u8]) -> Result<&str, &'static str> {
    if bytes.len() > MAX_STRING_LEN {
        return Err("export name longer than 4096 bytes");
    }
    std::str::from_utf8(bytes).map_err(|_| "export name is not valid UTF-8")
}

/// Splits INFO/GO data; `None` unless the lengths add up exactly.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut r = Reader::new(data);
    let name_len = usize::try_from(r.u32()?).ok()?;
    let name = r.bytes(name_len)?;
    let count = usize::from(r.u16()?);
    if r.remaining() != 2 * count {
        return None;
    }
    let requests = (0..count).map_while(|_| r.u16()).collect();
    Some((name, requests))
}

/// Splits LIST/SET_META_CONTEXT data; `None` unless the lengths add up
/// exactly. The query count is untrusted: each query takes at least four
/// bytes, so the loop is bounded by the data length.
fn parse_meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut r = Reader::new(data);
    let name_len = usize::try_from(r.u32()?).ok()?;
    let name = r.bytes(name_len)?;
    let count = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = usize::try_from(r.u32()?).ok()?;
        queries.push(r.bytes(len)?);
    }
    if r.remaining() != 0 {
        return None;
    }
    Some((name, queries))
}

#[cfg(test)]
mod tests;
