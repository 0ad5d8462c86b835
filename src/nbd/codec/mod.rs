//! NBD wire format: encoding and decoding of every message the server sends or receives
//! (handshake, options, option replies, requests, simple and structured replies).
//!
//! Pure functions over byte slices, no I/O: the connection code reads fixed-size headers and
//! the payload lengths they announce, then hands the bytes here. Every decoder returns an
//! `InvalidInput` error for malformed input and never panics, whatever the bytes. The
//! client-side halves (encoding requests, decoding replies) live in `client`, built for tests
//! and the `testing` feature only.
//! Numbers follow doc/proto.md of the NBD project; all integers are big-endian.

use crate::error::{fail, ErrorKind, Result};

#[cfg(any(test, feature = "testing"))]
mod client;
#[cfg(any(test, feature = "testing"))]
pub use client::decode_greeting;

// --- Magic numbers -------------------------------------------------------------------------
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// --- Handshake flags -----------------------------------------------------------------------
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// --- Options -------------------------------------------------------------------------------
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// --- Option reply types --------------------------------------------------------------------
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR_BIT: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR_BIT | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR_BIT | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR_BIT | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR_BIT | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR_BIT | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR_BIT | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR_BIT | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR_BIT | 9;

// --- NBD_REP_INFO types --------------------------------------------------------------------
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- Transmission flags --------------------------------------------------------------------
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// --- Command flags -------------------------------------------------------------------------
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// --- Structured replies --------------------------------------------------------------------
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Bits of a `base:allocation` block status descriptor.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The metadata context every export offers.
pub const META_BASE_ALLOCATION: &str = "base:allocation";

/// The prefix of qemu's dirty bitmap contexts (qemu's docs/interop/nbd.rst), and their one
/// bit: the range may have changed since the bitmap's reference point.
pub const META_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";
pub const STATE_DIRTY: u32 = 1 << 0;

/// Longest string (export name, description, error message) the protocol allows.
pub const MAX_STRING: usize = 4096;

// --- Fixed sizes ---------------------------------------------------------------------------
pub const GREETING_LEN: usize = 18;
pub const OPTION_HEADER_LEN: usize = 16;
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
pub const REQUEST_LEN: usize = 28;
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const STRUCTURED_HEADER_LEN: usize = 20;

fn malformed<T>(what: impl Into<String>) -> Result<T> {
    fail(ErrorKind::InvalidInput, what)
}

/// A bounds-checked cursor over untrusted bytes.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return malformed(format!("{what}: need {n} bytes, have {}", self.buf.len()));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A string of `len` bytes that must be UTF-8 and within the protocol's limit.
    fn string(&mut self, len: usize, what: &str) -> Result<String> {
        if len > MAX_STRING {
            return malformed(format!("{what}: string of {len} bytes is too long"));
        }
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) if !s.contains('\0') => Ok(s.to_owned()),
            _ => malformed(format!("{what}: not a valid NBD string")),
        }
    }

    /// A string preceded by its 32-bit length.
    fn string32(&mut self, what: &str) -> Result<String> {
        let len = self.u32(what)?;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.string(len, what)
    }

    /// Everything left, as a string.
    fn rest_string(&mut self, what: &str) -> Result<String> {
        let len = self.buf.len();
        self.string(len, what)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    fn finish(&self, what: &str) -> Result<()> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            malformed(format!(
                "{what}: {} unexpected trailing bytes",
                self.buf.len()
            ))
        }
    }
}

/// Appends a string with its 32-bit length; strings longer than the protocol allows are cut at
/// a character boundary (they only ever come from our own configuration).
fn put_string32(out: &mut Vec<u8>, s: &str) {
    let s = clamp_str(s);
    out.extend_from_slice(&u32::from(clamped_len(s)).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The longest prefix of `s` within `MAX_STRING` bytes that ends on a character boundary.
pub fn clamp_str(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// A string cut by `clamp_str` fits every length field the protocol gives strings (16 or 32 bits).
const _: () = assert!(MAX_STRING <= u16::MAX as usize);

/// The length of a string already cut by `clamp_str`.
#[expect(
    clippy::cast_possible_truncation,
    reason = "clamp_str keeps strings within MAX_STRING, asserted above to fit 16 bits"
)]
fn clamped_len(s: &str) -> u16 {
    debug_assert!(s.len() <= MAX_STRING);
    s.len() as u16
}

/// A 32-bit length or count field of a message this codec built. Every such message is far
/// below 4 GiB: strings are clamped, read data and block-status descriptors are bounded by the
/// request's own 32-bit length, and an option request holds what its caller passed.
#[expect(
    clippy::cast_possible_truncation,
    reason = "every message this codec builds is below 4 GiB (see above)"
)]
fn len_field(n: usize) -> u32 {
    debug_assert!(u32::try_from(n).is_ok(), "length field of {n}");
    n as u32
}

// === Handshake ===============================================================================

/// The server's first message of the fixed newstyle handshake.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&handshake_flags.to_be_bytes());
    out
}

/// The client's flags, sent right after the greeting.
pub fn decode_client_flags(buf: &[u8]) -> Result<u32> {
    let mut r = Reader::new(buf);
    let flags = r.u32("client flags")?;
    r.finish("client flags")?;
    Ok(flags)
}

/// The header of an option the client sends: magic, option code, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        if r.u64("option header")? != IHAVEOPT {
            return malformed("option header: bad magic");
        }
        let option = r.u32("option header")?;
        let length = r.u32("option header")?;
        r.finish("option header")?;
        Ok(OptionHeader { option, length })
    }
}

/// An option with its data decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName(String),
    Abort,
    List,
    /// NBD_OPT_INFO (`go == false`) or NBD_OPT_GO (`go == true`).
    Info {
        go: bool,
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    /// NBD_OPT_LIST_META_CONTEXT (`set == false`) or NBD_OPT_SET_META_CONTEXT (`set == true`).
    MetaContext {
        set: bool,
        export: String,
        queries: Vec<String>,
    },
    /// Any option this server does not implement, with its data.
    Unknown {
        option: u32,
        data: Vec<u8>,
    },
}

impl OptionRequest {
    /// Decodes an option's data. An error means the data does not fit the option (the server
    /// answers NBD_REP_ERR_INVALID and keeps the connection).
    pub fn decode(option: u32, data: &[u8]) -> Result<Self> {
        let mut r = Reader::new(data);
        let req = match option {
            OPT_EXPORT_NAME => OptionRequest::ExportName(r.rest_string("export name")?),
            OPT_ABORT => OptionRequest::Abort,
            OPT_LIST => OptionRequest::List,
            OPT_STRUCTURED_REPLY => OptionRequest::StructuredReply,
            OPT_INFO | OPT_GO => {
                let name = r.string32("info export name")?;
                let count = r.u16("info request count")?;
                let mut requests = Vec::with_capacity(usize::from(count).min(r.buf.len() / 2));
                for _ in 0..count {
                    requests.push(r.u16("info request")?);
                }
                OptionRequest::Info {
                    go: option == OPT_GO,
                    name,
                    requests,
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let export = r.string32("meta context export name")?;
                let count = r.u32("meta context query count")?;
                // Each query takes at least 4 bytes, which bounds the allocation.
                let cap = usize::try_from(count)
                    .unwrap_or(usize::MAX)
                    .min(r.buf.len() / 4);
                let mut queries = Vec::with_capacity(cap);
                for _ in 0..count {
                    queries.push(r.string32("meta context query")?);
                }
                OptionRequest::MetaContext {
                    set: option == OPT_SET_META_CONTEXT,
                    export,
                    queries,
                }
            }
            _ => {
                return Ok(OptionRequest::Unknown {
                    option,
                    data: r.rest().to_vec(),
                })
            }
        };
        // ABORT, LIST and STRUCTURED_REPLY take no data; the rest must be consumed exactly.
        r.finish("option data")?;
        Ok(req)
    }
}

/// What a server tells about an export in an NBD_REP_INFO reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    Export {
        size: u64,
        flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    Unknown {
        info: u16,
        data: Vec<u8>,
    },
}

/// One reply to an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionReplyKind {
    Ack,
    Server {
        name: String,
        description: String,
    },
    Info(InfoReply),
    MetaContext {
        id: u32,
        name: String,
    },
    /// An NBD_REP_ERR_* code with a human-readable message.
    Error {
        code: u32,
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub kind: OptionReplyKind,
}

impl OptionReply {
    pub fn new(option: u32, kind: OptionReplyKind) -> Self {
        OptionReply { option, kind }
    }

    pub fn error(option: u32, code: u32, message: impl Into<String>) -> Self {
        OptionReply {
            option,
            kind: OptionReplyKind::Error {
                code,
                message: message.into(),
            },
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        let reply_type = match &self.kind {
            OptionReplyKind::Ack => REP_ACK,
            OptionReplyKind::Server { name, description } => {
                put_string32(&mut data, name);
                data.extend_from_slice(clamp_str(description).as_bytes());
                REP_SERVER
            }
            OptionReplyKind::Info(info) => {
                match info {
                    InfoReply::Export { size, flags } => {
                        data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                        data.extend_from_slice(&size.to_be_bytes());
                        data.extend_from_slice(&flags.to_be_bytes());
                    }
                    InfoReply::Name(name) => {
                        data.extend_from_slice(&INFO_NAME.to_be_bytes());
                        data.extend_from_slice(clamp_str(name).as_bytes());
                    }
                    InfoReply::Description(d) => {
                        data.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                        data.extend_from_slice(clamp_str(d).as_bytes());
                    }
                    InfoReply::BlockSize {
                        minimum,
                        preferred,
                        maximum,
                    } => {
                        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                        data.extend_from_slice(&minimum.to_be_bytes());
                        data.extend_from_slice(&preferred.to_be_bytes());
                        data.extend_from_slice(&maximum.to_be_bytes());
                    }
                    InfoReply::Unknown { info, data: d } => {
                        data.extend_from_slice(&info.to_be_bytes());
                        data.extend_from_slice(d);
                    }
                }
                REP_INFO
            }
            OptionReplyKind::MetaContext { id, name } => {
                data.extend_from_slice(&id.to_be_bytes());
                data.extend_from_slice(clamp_str(name).as_bytes());
                REP_META_CONTEXT
            }
            OptionReplyKind::Error { code, message } => {
                data.extend_from_slice(clamp_str(message).as_bytes());
                *code
            }
        };
        let mut out = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.option.to_be_bytes());
        out.extend_from_slice(&reply_type.to_be_bytes());
        out.extend_from_slice(&len_field(data.len()).to_be_bytes());
        out.extend_from_slice(&data);
        out
    }
}

/// The reply to NBD_OPT_EXPORT_NAME: size, transmission flags and, unless the client asked for
/// NO_ZEROES, 124 bytes of padding.
pub fn encode_export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(10 + 124, 0);
    }
    out
}

// === Transmission ============================================================================

/// The commands of the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Other(u16),
}

impl Command {
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            other => Command::Other(other),
        }
    }
}

/// A request header (the write payload, if any, follows it on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        let magic = r.u32("request")?;
        if magic != REQUEST_MAGIC {
            return malformed(format!("request: bad magic {magic:#010x}"));
        }
        let flags = r.u16("request")?;
        let command = Command::from_u16(r.u16("request")?);
        let cookie = r.u64("request")?;
        let offset = r.u64("request")?;
        let length = r.u32("request")?;
        r.finish("request")?;
        Ok(Request {
            flags,
            command,
            cookie,
            offset,
            length,
        })
    }

    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// A simple reply header (read data, if any, follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut out = [0u8; SIMPLE_REPLY_LEN];
        out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&self.error.to_be_bytes());
        out[8..].copy_from_slice(&self.cookie.to_be_bytes());
        out
    }
}

/// The header of one structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self) -> [u8; STRUCTURED_HEADER_LEN] {
        let mut out = [0u8; STRUCTURED_HEADER_LEN];
        out[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.chunk_type.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

/// One block status descriptor: a run of `length` bytes with the context's state flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockDescriptor {
    pub length: u32,
    pub flags: u32,
}

/// The payload of a structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        descriptors: Vec<BlockDescriptor>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
}

impl Chunk {
    pub fn chunk_type(&self) -> u16 {
        match self {
            Chunk::None => REPLY_TYPE_NONE,
            Chunk::OffsetData { .. } => REPLY_TYPE_OFFSET_DATA,
            Chunk::OffsetHole { .. } => REPLY_TYPE_OFFSET_HOLE,
            Chunk::BlockStatus { .. } => REPLY_TYPE_BLOCK_STATUS,
            Chunk::Error { .. } => REPLY_TYPE_ERROR,
            Chunk::ErrorOffset { .. } => REPLY_TYPE_ERROR_OFFSET,
        }
    }

    /// Appends header and payload to `out`.
    pub fn encode_into(&self, cookie: u64, done: bool, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0u8; STRUCTURED_HEADER_LEN]);
        match self {
            Chunk::None => {}
            Chunk::OffsetData { offset, data } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(data);
            }
            Chunk::OffsetHole { offset, length } => {
                out.extend_from_slice(&offset.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
            }
            Chunk::BlockStatus {
                context_id,
                descriptors,
            } => {
                out.extend_from_slice(&context_id.to_be_bytes());
                for d in descriptors {
                    out.extend_from_slice(&d.length.to_be_bytes());
                    out.extend_from_slice(&d.flags.to_be_bytes());
                }
            }
            Chunk::Error { error, message } | Chunk::ErrorOffset { error, message, .. } => {
                let message = clamp_str(message);
                out.extend_from_slice(&error.to_be_bytes());
                out.extend_from_slice(&clamped_len(message).to_be_bytes());
                out.extend_from_slice(message.as_bytes());
                if let Chunk::ErrorOffset { offset, .. } = self {
                    out.extend_from_slice(&offset.to_be_bytes());
                }
            }
        }
        let length = len_field(out.len() - start - STRUCTURED_HEADER_LEN);
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let header = ChunkHeader {
            flags,
            chunk_type: self.chunk_type(),
            cookie,
            length,
        };
        out[start..start + STRUCTURED_HEADER_LEN].copy_from_slice(&header.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greeting_layout() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        assert_eq!(decode_greeting(&g).unwrap(), 3);
        assert!(decode_greeting(&g[..17]).is_err());
    }

    #[test]
    fn request_layout_matches_spec() {
        let req = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let bytes = req.encode();
        assert_eq!(&bytes[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&bytes[4..8], &[0, 1, 0, 1]);
        assert_eq!(&bytes[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&bytes[16..24], &[0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(&bytes[24..], &[0, 0, 2, 0]);
        assert_eq!(Request::decode(&bytes).unwrap(), req);
    }

    #[test]
    fn request_with_bad_magic_or_size_is_rejected() {
        let mut bytes = Request {
            flags: 0,
            command: Command::Read,
            cookie: 1,
            offset: 0,
            length: 1,
        }
        .encode();
        assert!(Request::decode(&bytes[..27]).is_err());
        bytes[0] ^= 0xff;
        let err = Request::decode(&bytes).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn simple_reply_layout() {
        let r = SimpleReply {
            error: 22,
            cookie: 9,
        };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&b[4..8], &[0, 0, 0, 22]);
        assert_eq!(SimpleReply::decode(&b).unwrap(), r);
    }

    #[test]
    fn go_option_decodes() {
        let mut data = vec![0, 0, 0, 3];
        data.extend_from_slice(b"foo");
        data.extend_from_slice(&[0, 2, 0, 3, 0, 1]);
        let req = OptionRequest::decode(OPT_GO, &data).unwrap();
        assert_eq!(
            req,
            OptionRequest::Info {
                go: true,
                name: "foo".into(),
                requests: vec![3, 1]
            }
        );
        // One info request short.
        assert!(OptionRequest::decode(OPT_GO, &data[..data.len() - 2]).is_err());
        // Trailing garbage.
        data.push(0);
        assert!(OptionRequest::decode(OPT_GO, &data).is_err());
    }

    #[test]
    fn options_without_data_reject_data() {
        assert_eq!(
            OptionRequest::decode(OPT_LIST, &[]).unwrap(),
            OptionRequest::List
        );
        assert!(OptionRequest::decode(OPT_LIST, &[1]).is_err());
        assert!(OptionRequest::decode(OPT_STRUCTURED_REPLY, &[0, 0]).is_err());
    }

    #[test]
    fn export_name_must_be_utf8_without_nul() {
        assert!(OptionRequest::decode(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
        assert!(OptionRequest::decode(OPT_EXPORT_NAME, b"a\0b").is_err());
        assert!(OptionRequest::decode(OPT_EXPORT_NAME, &vec![b'a'; MAX_STRING + 1]).is_err());
        assert_eq!(
            OptionRequest::decode(OPT_EXPORT_NAME, b"disk").unwrap(),
            OptionRequest::ExportName("disk".into())
        );
    }

    #[test]
    fn meta_context_query_count_cannot_force_a_huge_allocation() {
        let mut data = vec![0, 0, 0, 0];
        data.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(OptionRequest::decode(OPT_SET_META_CONTEXT, &data).is_err());
    }

    #[test]
    fn unknown_option_keeps_its_data() {
        let req = OptionRequest::decode(0x1234, &[1, 2, 3]).unwrap();
        assert_eq!(
            req,
            OptionRequest::Unknown {
                option: 0x1234,
                data: vec![1, 2, 3]
            }
        );
        assert_eq!(req.code(), 0x1234);
    }

    #[test]
    fn error_reply_layout() {
        let b = OptionReply::error(OPT_GO, REP_ERR_UNKNOWN, "no such export").encode();
        assert_eq!(&b[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&b[8..12], &[0, 0, 0, 7]);
        assert_eq!(&b[12..16], &[0x80, 0, 0, 6]);
        assert_eq!(&b[16..20], &[0, 0, 0, 14]);
        assert_eq!(&b[20..], b"no such export");
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(encode_export_name_reply(1, 3, false).len(), 134);
        assert_eq!(encode_export_name_reply(1, 3, true).len(), 10);
    }

    #[test]
    fn chunk_layouts() {
        let mut out = Vec::new();
        Chunk::OffsetHole {
            offset: 8,
            length: 4096,
        }
        .encode_into(5, false, &mut out);
        assert_eq!(out.len(), 20 + 12);
        let h = ChunkHeader::decode(&out[..20]).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                flags: 0,
                chunk_type: REPLY_TYPE_OFFSET_HOLE,
                cookie: 5,
                length: 12
            }
        );
        let mut out = Vec::new();
        Chunk::Error {
            error: 5,
            message: "eio".into(),
        }
        .encode_into(5, true, &mut out);
        assert_eq!(&out[4..8], &[0, 1, 0x80, 1]);
        assert_eq!(&out[20..], &[0, 0, 0, 5, 0, 3, b'e', b'i', b'o']);
    }

    #[test]
    fn block_status_chunk_rejects_partial_descriptor() {
        assert!(Chunk::decode(REPLY_TYPE_BLOCK_STATUS, &[0, 0, 0, 1, 0, 0, 0, 1]).is_err());
        let c = Chunk::decode(
            REPLY_TYPE_BLOCK_STATUS,
            &[0, 0, 0, 1, 0, 0, 0, 9, 0, 0, 0, 3],
        );
        assert_eq!(
            c.unwrap(),
            Chunk::BlockStatus {
                context_id: 1,
                descriptors: vec![BlockDescriptor {
                    length: 9,
                    flags: 3
                }]
            }
        );
    }

    #[test]
    fn long_strings_are_clamped_on_a_char_boundary() {
        let s = "é".repeat(MAX_STRING);
        let c = clamp_str(&s);
        assert!(c.len() <= MAX_STRING);
        assert!(c.len() >= MAX_STRING - 1);
    }

    fn nbd_string() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:/._ é-]{0,40}"
    }

    fn option_request() -> impl Strategy<Value = OptionRequest> {
        prop_oneof![
            nbd_string().prop_map(OptionRequest::ExportName),
            Just(OptionRequest::Abort),
            Just(OptionRequest::List),
            Just(OptionRequest::StructuredReply),
            (
                any::<bool>(),
                nbd_string(),
                proptest::collection::vec(any::<u16>(), 0..8)
            )
                .prop_map(|(go, name, requests)| OptionRequest::Info {
                    go,
                    name,
                    requests
                }),
            (
                any::<bool>(),
                nbd_string(),
                proptest::collection::vec(nbd_string(), 0..5)
            )
                .prop_map(|(set, export, queries)| OptionRequest::MetaContext {
                    set,
                    export,
                    queries
                }),
            (11u32..1000, proptest::collection::vec(any::<u8>(), 0..32))
                .prop_map(|(option, data)| OptionRequest::Unknown { option, data }),
        ]
    }

    fn option_reply() -> impl Strategy<Value = OptionReply> {
        let kind = prop_oneof![
            Just(OptionReplyKind::Ack),
            (nbd_string(), nbd_string())
                .prop_map(|(name, description)| OptionReplyKind::Server { name, description }),
            (any::<u64>(), any::<u16>())
                .prop_map(|(size, flags)| OptionReplyKind::Info(InfoReply::Export { size, flags })),
            nbd_string().prop_map(|n| OptionReplyKind::Info(InfoReply::Name(n))),
            nbd_string().prop_map(|n| OptionReplyKind::Info(InfoReply::Description(n))),
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(minimum, preferred, maximum)| {
                OptionReplyKind::Info(InfoReply::BlockSize {
                    minimum,
                    preferred,
                    maximum,
                })
            }),
            (any::<u32>(), nbd_string())
                .prop_map(|(id, name)| OptionReplyKind::MetaContext { id, name }),
            (1u32..20, nbd_string()).prop_map(|(c, message)| OptionReplyKind::Error {
                code: REP_ERR_BIT | c,
                message
            }),
        ];
        (any::<u32>(), kind).prop_map(|(option, kind)| OptionReply { option, kind })
    }

    fn chunk() -> impl Strategy<Value = Chunk> {
        prop_oneof![
            Just(Chunk::None),
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(offset, data)| Chunk::OffsetData { offset, data }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(offset, length)| Chunk::OffsetHole { offset, length }),
            (
                any::<u32>(),
                proptest::collection::vec(
                    (any::<u32>(), any::<u32>())
                        .prop_map(|(length, flags)| BlockDescriptor { length, flags }),
                    0..8
                )
            )
                .prop_map(|(context_id, descriptors)| Chunk::BlockStatus {
                    context_id,
                    descriptors
                }),
            (any::<u32>(), nbd_string())
                .prop_map(|(error, message)| Chunk::Error { error, message }),
            (any::<u32>(), nbd_string(), any::<u64>()).prop_map(|(error, message, offset)| {
                Chunk::ErrorOffset {
                    error,
                    message,
                    offset,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), code in any::<u32>(), t in any::<u16>()) {
            let _ = decode_greeting(&bytes);
            let _ = decode_client_flags(&bytes);
            let _ = OptionHeader::decode(&bytes);
            let _ = OptionRequest::decode(code, &bytes);
            let _ = OptionRequest::decode(code % 12, &bytes);
            let _ = OptionReply::decode(&bytes);
            let _ = OptionReply::decode_header(&bytes);
            let _ = Request::decode(&bytes);
            let _ = SimpleReply::decode(&bytes);
            let _ = ChunkHeader::decode(&bytes);
            let _ = Chunk::decode(t, &bytes);
            let _ = Chunk::decode(t % 6, &bytes);
        }

        #[test]
        fn option_replies_with_valid_header_and_random_data_never_panic(
            reply_type in prop_oneof![Just(REP_ACK), Just(REP_SERVER), Just(REP_INFO), Just(REP_META_CONTEXT), Just(REP_ERR_UNSUP), any::<u32>()],
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut b = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&OPT_GO.to_be_bytes());
            b.extend_from_slice(&reply_type.to_be_bytes());
            b.extend_from_slice(&len_field(data.len()).to_be_bytes());
            b.extend_from_slice(&data);
            let _ = OptionReply::decode(&b);
        }

        #[test]
        fn requests_round_trip(flags in any::<u16>(), cmd in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), length in any::<u32>()) {
            let req = Request { flags, command: Command::from_u16(cmd), cookie, offset, length };
            prop_assert_eq!(Request::decode(&req.encode()).unwrap(), req);
            prop_assert_eq!(Command::from_u16(cmd).to_u16(), cmd);
        }

        #[test]
        fn simple_replies_round_trip(error in any::<u32>(), cookie in any::<u64>()) {
            let r = SimpleReply { error, cookie };
            prop_assert_eq!(SimpleReply::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn option_requests_round_trip(req in option_request()) {
            let bytes = req.encode();
            let header = OptionHeader::decode(&bytes[..OPTION_HEADER_LEN]).unwrap();
            prop_assert_eq!(header.length as usize, bytes.len() - OPTION_HEADER_LEN);
            let back = OptionRequest::decode(header.option, &bytes[OPTION_HEADER_LEN..]).unwrap();
            prop_assert_eq!(back, req);
        }

        #[test]
        fn option_replies_round_trip(reply in option_reply()) {
            prop_assert_eq!(OptionReply::decode(&reply.encode()).unwrap(), reply);
        }

        #[test]
        fn chunks_round_trip(c in chunk(), cookie in any::<u64>(), done in any::<bool>()) {
            let mut out = Vec::new();
            c.encode_into(cookie, done, &mut out);
            let h = ChunkHeader::decode(&out[..STRUCTURED_HEADER_LEN]).unwrap();
            prop_assert_eq!(h.cookie, cookie);
            prop_assert_eq!(h.flags & REPLY_FLAG_DONE != 0, done);
            prop_assert_eq!(h.length as usize, out.len() - STRUCTURED_HEADER_LEN);
            prop_assert_eq!(Chunk::decode(h.chunk_type, &out[STRUCTURED_HEADER_LEN..]).unwrap(), c);
        }
    }
}
