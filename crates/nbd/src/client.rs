//! The client side, as decoders of what a server sends (the encoders are
//! in [`crate::proto`]): the greeting, option replies, the information an
//! `NBD_OPT_GO` returns, and simple replies. The caller does the I/O; this
//! module only reads fixed-size headers and untrusted payloads, and never
//! panics on any input.

use crate::proto::*;

/// What the server's greeting offers (fixed newstyle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// `HANDSHAKE_FLAG_*`.
    pub flags: u16,
}

/// Length of the fixed newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, flags.
pub const GREETING_LEN: usize = 18;

/// Length of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Why the server's bytes cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("not an NBD server (greeting magic {0:#x})")]
    NotNbd(u64),
    #[error("the server speaks an NBD dialect other than fixed newstyle (magic {0:#x})")]
    NotNewstyle(u64),
    #[error("the server does not offer fixed newstyle negotiation")]
    NotFixedNewstyle,
    #[error("bad option reply magic {0:#x}")]
    BadOptionReplyMagic(u64),
    #[error("bad reply magic {0:#x} (structured replies were not asked for)")]
    BadReplyMagic(u32),
    #[error("the server answered option {got} to option {asked}")]
    WrongOption { asked: u32, got: u32 },
    #[error("malformed {0} from the server")]
    Malformed(&'static str),
}

/// Decodes the greeting of a fixed newstyle server.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> Result<Greeting, ClientError> {
    let mut r = Reader::new(b);
    let magic = r.u64().ok_or(ClientError::Malformed("greeting"))?;
    if magic != NBD_MAGIC {
        return Err(ClientError::NotNbd(magic));
    }
    let second = r.u64().ok_or(ClientError::Malformed("greeting"))?;
    if second != IHAVEOPT {
        return Err(ClientError::NotNewstyle(second));
    }
    let flags = r.u16().ok_or(ClientError::Malformed("greeting"))?;
    if flags & HANDSHAKE_FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::NotFixedNewstyle);
    }
    Ok(Greeting { flags })
}

/// An option reply header; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    /// `REP_*`; errors have `REP_FLAG_ERROR` set.
    pub reply_type: u32,
    pub length: u32,
}

/// Decodes an option reply header, checking that it answers `asked`.
pub fn decode_option_reply(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
    asked: u32,
) -> Result<OptionReply, ClientError> {
    let mut r = Reader::new(b);
    let magic = r.u64().ok_or(ClientError::Malformed("option reply"))?;
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientError::BadOptionReplyMagic(magic));
    }
    let reply = OptionReply {
        option: r.u32().ok_or(ClientError::Malformed("option reply"))?,
        reply_type: r.u32().ok_or(ClientError::Malformed("option reply"))?,
        length: r.u32().ok_or(ClientError::Malformed("option reply"))?,
    };
    if reply.option != asked {
        return Err(ClientError::WrongOption {
            asked,
            got: reply.option,
        });
    }
    Ok(reply)
}

/// One `NBD_REP_INFO` payload the client understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`: size in bytes and transmission flags.
    Export { size: u64, flags: u16 },
    /// `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
    BlockSize { min: u32, preferred: u32, max: u32 },
    /// Any other information type (names, descriptions...).
    Other(u16),
}

/// Decodes the data of an `NBD_REP_INFO` reply.
pub fn decode_info(data: &[u8]) -> Result<Info, ClientError> {
    let mut r = Reader::new(data);
    let bad = || ClientError::Malformed("information reply");
    let kind = r.u16().ok_or_else(bad)?;
    Ok(match kind {
        INFO_EXPORT if data.len() == 12 => Info::Export {
            size: r.u64().ok_or_else(bad)?,
            flags: r.u16().ok_or_else(bad)?,
        },
        INFO_BLOCK_SIZE if data.len() == 14 => Info::BlockSize {
            min: r.u32().ok_or_else(bad)?,
            preferred: r.u32().ok_or_else(bad)?,
            max: r.u32().ok_or_else(bad)?,
        },
        INFO_EXPORT | INFO_BLOCK_SIZE => return Err(bad()),
        other => Info::Other(other),
    })
}

/// A simple reply header: for a successful read, the data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0, or an errno value (`EIO`, `ENOSPC`...).
    pub error: u32,
    pub cookie: u64,
}

/// Decodes a simple reply header.
pub fn decode_simple_reply(b: &[u8; SIMPLE_REPLY_HEADER_LEN]) -> Result<SimpleReply, ClientError> {
    let mut r = Reader::new(b);
    let magic = r.u32().ok_or(ClientError::Malformed("reply"))?;
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ClientError::BadReplyMagic(magic));
    }
    Ok(SimpleReply {
        error: r.u32().ok_or(ClientError::Malformed("reply"))?,
        cookie: r.u64().ok_or(ClientError::Malformed("reply"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_round_trip_and_refusals() {
        let mut b = [0u8; GREETING_LEN];
        b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[16..].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(decode_greeting(&b).unwrap().flags, 3);
        b[17] = 2;
        assert_eq!(decode_greeting(&b), Err(ClientError::NotFixedNewstyle));
        b[8] = 0;
        assert!(matches!(
            decode_greeting(&b),
            Err(ClientError::NotNewstyle(_))
        ));
        b[0] = 0;
        assert!(matches!(decode_greeting(&b), Err(ClientError::NotNbd(_))));
    }

    #[test]
    fn option_replies_must_answer_the_option_asked() {
        let mut out = Vec::new();
        option_reply(&mut out, OPT_GO, REP_ACK, &[]);
        let b: [u8; OPTION_REPLY_HEADER_LEN] = out[..20].try_into().unwrap();
        let r = decode_option_reply(&b, OPT_GO).unwrap();
        assert_eq!((r.reply_type, r.length), (REP_ACK, 0));
        assert!(matches!(
            decode_option_reply(&b, OPT_INFO),
            Err(ClientError::WrongOption { .. })
        ));
    }

    #[test]
    fn info_payloads() {
        let mut d = INFO_EXPORT.to_be_bytes().to_vec();
        d.extend_from_slice(&(1u64 << 30).to_be_bytes());
        d.extend_from_slice(&(TF_HAS_FLAGS | TF_SEND_FLUSH).to_be_bytes());
        assert_eq!(
            decode_info(&d).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: TF_HAS_FLAGS | TF_SEND_FLUSH
            }
        );
        assert!(decode_info(&d[..11]).is_err(), "short export info");
        assert_eq!(decode_info(&[0, 2, b'x']).unwrap(), Info::Other(2));
        assert!(decode_info(&[0]).is_err());
    }

    #[test]
    fn simple_replies() {
        let mut out = Vec::new();
        simple_reply(&mut out, 77, EIO);
        let b: [u8; SIMPLE_REPLY_HEADER_LEN] = out[..16].try_into().unwrap();
        assert_eq!(
            decode_simple_reply(&b).unwrap(),
            SimpleReply {
                error: EIO,
                cookie: 77
            }
        );
        let mut bad = b;
        bad[0] ^= 1;
        assert!(decode_simple_reply(&bad).is_err());
    }
}
