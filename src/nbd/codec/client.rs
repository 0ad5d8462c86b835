//! The client half of the NBD wire format: encoding what a client sends (options, requests)
//! and decoding what a server sends back (greeting, option replies, simple and structured
//! replies). The server never needs it; the tests' raw clients and the codec's round trips do,
//! so it is built for tests and the `testing` feature only.

use super::*;
use crate::error::Result;

/// Checks the greeting's magic and returns the handshake flags.
pub fn decode_greeting(buf: &[u8]) -> Result<u16> {
    let mut r = Reader::new(buf);
    if r.u64("greeting")? != NBD_MAGIC || r.u64("greeting")? != IHAVEOPT {
        return malformed("greeting: bad magic");
    }
    let flags = r.u16("greeting")?;
    r.finish("greeting")?;
    Ok(flags)
}

impl OptionHeader {
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut out = [0u8; OPTION_HEADER_LEN];
        out[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        out[8..12].copy_from_slice(&self.option.to_be_bytes());
        out[12..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

impl OptionRequest {
    /// The option code this request is sent under.
    pub fn code(&self) -> u32 {
        match self {
            OptionRequest::ExportName(_) => OPT_EXPORT_NAME,
            OptionRequest::Abort => OPT_ABORT,
            OptionRequest::List => OPT_LIST,
            OptionRequest::Info { go: false, .. } => OPT_INFO,
            OptionRequest::Info { go: true, .. } => OPT_GO,
            OptionRequest::StructuredReply => OPT_STRUCTURED_REPLY,
            OptionRequest::MetaContext { set: false, .. } => OPT_LIST_META_CONTEXT,
            OptionRequest::MetaContext { set: true, .. } => OPT_SET_META_CONTEXT,
            OptionRequest::Unknown { option, .. } => *option,
        }
    }

    /// The option header plus data.
    pub fn encode(&self) -> Vec<u8> {
        let mut data = Vec::new();
        match self {
            OptionRequest::ExportName(name) => data.extend_from_slice(clamp_str(name).as_bytes()),
            OptionRequest::Abort | OptionRequest::List | OptionRequest::StructuredReply => {}
            OptionRequest::Info { name, requests, .. } => {
                put_string32(&mut data, name);
                data.extend_from_slice(
                    &u16::try_from(requests.len())
                        .unwrap_or(u16::MAX)
                        .to_be_bytes(),
                );
                for r in requests.iter().take(usize::from(u16::MAX)) {
                    data.extend_from_slice(&r.to_be_bytes());
                }
            }
            OptionRequest::MetaContext {
                export, queries, ..
            } => {
                put_string32(&mut data, export);
                data.extend_from_slice(&len_field(queries.len()).to_be_bytes());
                for q in queries {
                    put_string32(&mut data, q);
                }
            }
            OptionRequest::Unknown { data: d, .. } => data.extend_from_slice(d),
        }
        let header = OptionHeader {
            option: self.code(),
            length: len_field(data.len()),
        };
        let mut out = header.encode().to_vec();
        out.extend_from_slice(&data);
        out
    }
}

impl OptionReply {
    /// Decodes the 20-byte header into (option, reply type, data length).
    pub fn decode_header(buf: &[u8]) -> Result<(u32, u32, u32)> {
        let mut r = Reader::new(buf);
        if r.u64("option reply")? != OPTION_REPLY_MAGIC {
            return malformed("option reply: bad magic");
        }
        let option = r.u32("option reply")?;
        let reply_type = r.u32("option reply")?;
        let length = r.u32("option reply")?;
        r.finish("option reply header")?;
        Ok((option, reply_type, length))
    }

    /// Decodes a whole reply (header and data).
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let header = buf.get(..OPTION_REPLY_HEADER_LEN).unwrap_or(buf);
        let (option, reply_type, length) = Self::decode_header(header)?;
        let data = &buf[header.len()..];
        if usize::try_from(length).ok() != Some(data.len()) {
            return malformed("option reply: length does not match data");
        }
        let mut r = Reader::new(data);
        let kind = match reply_type {
            REP_ACK => OptionReplyKind::Ack,
            REP_SERVER => {
                let name = r.string32("server name")?;
                let description = r.rest_string("server description")?;
                OptionReplyKind::Server { name, description }
            }
            REP_INFO => {
                let info = r.u16("info type")?;
                OptionReplyKind::Info(match info {
                    INFO_EXPORT => InfoReply::Export {
                        size: r.u64("info")?,
                        flags: r.u16("info")?,
                    },
                    INFO_NAME => InfoReply::Name(r.rest_string("info name")?),
                    INFO_DESCRIPTION => InfoReply::Description(r.rest_string("info description")?),
                    INFO_BLOCK_SIZE => InfoReply::BlockSize {
                        minimum: r.u32("info")?,
                        preferred: r.u32("info")?,
                        maximum: r.u32("info")?,
                    },
                    _ => InfoReply::Unknown {
                        info,
                        data: r.rest().to_vec(),
                    },
                })
            }
            REP_META_CONTEXT => {
                let id = r.u32("meta context id")?;
                OptionReplyKind::MetaContext {
                    id,
                    name: r.rest_string("meta context name")?,
                }
            }
            code if code & REP_ERR_BIT != 0 => OptionReplyKind::Error {
                code,
                message: r.rest_string("error message")?,
            },
            other => return malformed(format!("option reply: unknown type {other:#x}")),
        };
        r.finish("option reply")?;
        Ok(OptionReply { option, kind })
    }
}

impl Command {
    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Other(v) => v,
        }
    }
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.length.to_be_bytes());
        out
    }
}

impl SimpleReply {
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        if r.u32("simple reply")? != SIMPLE_REPLY_MAGIC {
            return malformed("simple reply: bad magic");
        }
        let error = r.u32("simple reply")?;
        let cookie = r.u64("simple reply")?;
        r.finish("simple reply")?;
        Ok(SimpleReply { error, cookie })
    }
}

impl ChunkHeader {
    pub fn decode(buf: &[u8]) -> Result<Self> {
        let mut r = Reader::new(buf);
        if r.u32("chunk header")? != STRUCTURED_REPLY_MAGIC {
            return malformed("chunk header: bad magic");
        }
        let flags = r.u16("chunk header")?;
        let chunk_type = r.u16("chunk header")?;
        let cookie = r.u64("chunk header")?;
        let length = r.u32("chunk header")?;
        r.finish("chunk header")?;
        Ok(ChunkHeader {
            flags,
            chunk_type,
            cookie,
            length,
        })
    }
}

impl Chunk {
    /// Decodes a chunk payload of the given type.
    pub fn decode(chunk_type: u16, payload: &[u8]) -> Result<Self> {
        let mut r = Reader::new(payload);
        let chunk = match chunk_type {
            REPLY_TYPE_NONE => Chunk::None,
            REPLY_TYPE_OFFSET_DATA => {
                let offset = r.u64("offset data")?;
                Chunk::OffsetData {
                    offset,
                    data: r.rest().to_vec(),
                }
            }
            REPLY_TYPE_OFFSET_HOLE => Chunk::OffsetHole {
                offset: r.u64("offset hole")?,
                length: r.u32("offset hole")?,
            },
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32("block status")?;
                if !r.buf.len().is_multiple_of(8) {
                    return malformed("block status: partial descriptor");
                }
                let mut descriptors = Vec::with_capacity(r.buf.len() / 8);
                while !r.buf.is_empty() {
                    descriptors.push(BlockDescriptor {
                        length: r.u32("descriptor")?,
                        flags: r.u32("descriptor")?,
                    });
                }
                Chunk::BlockStatus {
                    context_id,
                    descriptors,
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let error = r.u32("error chunk")?;
                let len = r.u16("error chunk")?;
                let message = r.string(usize::from(len), "error message")?;
                if chunk_type == REPLY_TYPE_ERROR {
                    Chunk::Error { error, message }
                } else {
                    Chunk::ErrorOffset {
                        error,
                        message,
                        offset: r.u64("error chunk")?,
                    }
                }
            }
            other => return malformed(format!("chunk: unknown type {other:#x}")),
        };
        r.finish("chunk")?;
        Ok(chunk)
    }
}
