//! The tests' one raw NBD client: blocking, over TCP or a unix socket, speaking the wire through
//! the codec's client half (`thinnbd::nbd::codec`, built for tests), so that a test can send any
//! option or request, well-formed or not, and read every reply byte.
//!
//! Two layers. The request calls (`send`, `reply`, `write`, `read`, `flush`, `trim`) return
//! `io::Result`, so that a reliability test survives the server being killed under it. The
//! exact-control calls (`option`, `go`, `request`, `simple_reply`, `any_reply`, `write_at`,
//! `read_at`) panic on a broken stream: the protocol tests want every byte answered.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use thinnbd::nbd::codec::{
    decode_greeting, Chunk, ChunkHeader, InfoReply, OptionReply, OptionReplyKind, OptionRequest,
    Request, SimpleReply, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, FLAG_NO_ZEROES, GREETING_LEN,
    INFO_BLOCK_SIZE, META_BASE_ALLOCATION, OPTION_REPLY_HEADER_LEN, REPLY_FLAG_DONE,
    SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};
pub use thinnbd::nbd::codec::{Command, CMD_FLAG_FUA};
#[allow(unused_imports)] // the errors its replies carry, for the tests that check them
pub use thinnbd::nbd::{NBD_EINVAL, NBD_EIO, NBD_ENOSPC};

/// How long a blocking read or write may wait before a protocol test counts the server as hung.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// The same for the reliability tests, whose server works under load (and is killed under them).
const LOADED_IO_TIMEOUT: Duration = Duration::from_secs(120);

/// A stream the client can use: TCP or unix.
pub trait Stream: Read + Write + Send {
    /// Shuts down the sending side, so the server sees end-of-file.
    fn half_close(&self);
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl Stream for TcpStream {
    fn half_close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
}

impl Stream for UnixStream {
    fn half_close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

pub struct Client {
    pub s: Box<dyn Stream>,
    /// What the server's greeting offered.
    pub handshake_flags: u16,
    /// Size and transmission flags of the export, once one is chosen.
    pub size: u64,
    pub flags: u16,
    next_cookie: u64,
}

impl Client {
    /// Connects over TCP, reads the greeting and answers it (fixed newstyle, and no zeroes
    /// when the server offers it); the client is then in option negotiation.
    pub fn connect_tcp(port: u16) -> Client {
        Client::try_connect_tcp(port, IO_TIMEOUT).expect("connect and greet over TCP")
    }

    fn try_connect_tcp(port: u16, timeout: Duration) -> io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Client::greet(Box::new(s))
    }

    /// [`Client::connect_tcp`] over a unix socket.
    pub fn connect_unix(path: &Path) -> Client {
        let s = UnixStream::connect(path).expect("connect unix");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        Client::greet(Box::new(s)).expect("greet over unix")
    }

    /// Reads the greeting on `s` and answers it; the client is then in option negotiation.
    pub fn greet(mut s: Box<dyn Stream>) -> io::Result<Client> {
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g)?;
        let handshake_flags =
            decode_greeting(&g).map_err(|_| bad("not a fixed newstyle NBD server"))?;
        let mut client_flags = CLIENT_FIXED_NEWSTYLE;
        if handshake_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= CLIENT_NO_ZEROES;
        }
        s.write_all(&client_flags.to_be_bytes())?;
        Ok(Client {
            s,
            handshake_flags,
            size: 0,
            flags: 0,
            next_cookie: 1,
        })
    }

    /// Connects and selects `export` with NBD_OPT_EXPORT_NAME (the server closes the
    /// connection when the export does not exist, which shows up as an error here).
    pub fn connect(port: u16, export: &str) -> io::Result<Client> {
        let mut c = Client::try_connect_tcp(port, LOADED_IO_TIMEOUT)?;
        c.try_export_name(export)?;
        Ok(c)
    }

    /// Connects and opens `export` with NBD_OPT_GO; returns the client with the export's size
    /// and transmission flags.
    pub fn open(port: u16, export: &str) -> (Client, u64, u16) {
        let mut c = Client::connect_tcp(port);
        let (size, flags) = c.go(export, false);
        (c, size, flags)
    }

    // === Option negotiation ======================================================================

    /// Sends an option and collects replies up to and including the final ACK or error.
    pub fn option(&mut self, req: &OptionRequest) -> Vec<OptionReply> {
        self.s.write_all(&req.encode()).expect("send option");
        let mut replies = Vec::new();
        loop {
            let r = self.read_option_reply();
            let last = !matches!(
                r.kind,
                OptionReplyKind::Server { .. }
                    | OptionReplyKind::Info(_)
                    | OptionReplyKind::MetaContext { .. }
            );
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    pub fn read_option_reply(&mut self) -> OptionReply {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).expect("option reply header");
        let (_, _, len) = OptionReply::decode_header(&h).expect("option reply header");
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let mut all = h.to_vec();
        all.resize(OPTION_REPLY_HEADER_LEN + len as usize, 0);
        self.s
            .read_exact(&mut all[OPTION_REPLY_HEADER_LEN..])
            .expect("option reply data");
        OptionReply::decode(&all).expect("valid option reply")
    }

    /// Negotiates structured replies and base:allocation (when asked), then GO. Returns the
    /// export size and transmission flags.
    pub fn go(&mut self, name: &str, structured: bool) -> (u64, u16) {
        if structured {
            let r = self.option(&OptionRequest::StructuredReply);
            assert_eq!(r[0].kind, OptionReplyKind::Ack);
            let r = self.option(&OptionRequest::MetaContext {
                set: true,
                export: name.to_owned(),
                queries: vec![META_BASE_ALLOCATION.to_owned()],
            });
            assert_eq!(r.len(), 2, "{r:?}");
        }
        let replies = self.option(&OptionRequest::Info {
            go: true,
            name: name.to_owned(),
            requests: vec![INFO_BLOCK_SIZE],
        });
        assert_eq!(
            replies.last().map(|r| &r.kind),
            Some(&OptionReplyKind::Ack),
            "GO {name}: {replies:?}"
        );
        for r in &replies {
            if let OptionReplyKind::Info(InfoReply::Export { size, flags }) = r.kind {
                (self.size, self.flags) = (size, flags);
                return (size, flags);
            }
        }
        panic!("GO without NBD_INFO_EXPORT: {replies:?}");
    }

    /// Opens `name` the old way, with NBD_OPT_EXPORT_NAME (no block size limits are told);
    /// returns the export size and transmission flags.
    pub fn export_name(&mut self, name: &str) -> (u64, u16) {
        self.try_export_name(name).expect("EXPORT_NAME")
    }

    pub fn try_export_name(&mut self, name: &str) -> io::Result<(u64, u16)> {
        self.s
            .write_all(&OptionRequest::ExportName(name.to_owned()).encode())?;
        let mut reply = [0u8; 10];
        self.s.read_exact(&mut reply)?;
        let size = u64::from_be_bytes(reply[..8].try_into().expect("8 bytes"));
        let flags = u16::from_be_bytes([reply[8], reply[9]]);
        if self.handshake_flags & FLAG_NO_ZEROES == 0 {
            let mut zeroes = [0u8; 124];
            self.s.read_exact(&mut zeroes)?;
        }
        (self.size, self.flags) = (size, flags);
        Ok((size, flags))
    }

    // === Transmission, io::Result ================================================================

    /// Sends one request (with its payload for writes) under the next cookie; returns it.
    pub fn send(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.send_raw(cmd, flags, cookie, offset, len, payload)?;
        Ok(cookie)
    }

    /// Sends a request header with any values (hostile tests), then `payload`.
    pub fn send_raw(
        &mut self,
        cmd: Command,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let header = Request {
            flags,
            command: cmd,
            cookie,
            offset,
            length: len,
        };
        let mut m = header.encode().to_vec();
        m.extend_from_slice(payload);
        self.s.write_all(&m)
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.s.set_read_timeout(timeout)
    }

    /// Reads one simple reply: (errno, cookie); for a successful read, `data` is filled.
    pub fn reply(&mut self, data: &mut [u8]) -> io::Result<(u32, u64)> {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h)?;
        let reply = SimpleReply::decode(&h).map_err(|_| bad("bad reply magic"))?;
        let (err, cookie) = (reply.error, reply.cookie);
        if err == 0 && !data.is_empty() {
            self.s.read_exact(data)?;
        }
        Ok((err, cookie))
    }

    fn call(
        &mut self,
        cmd: Command,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
        data: &mut [u8],
    ) -> io::Result<u32> {
        let cookie = self.send(cmd, flags, offset, len, payload)?;
        let (err, got) = self.reply(data)?;
        if got != cookie {
            return Err(bad("reply for another cookie"));
        }
        Ok(err)
    }

    /// Writes `data` at `offset`; Ok(errno).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u32> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        let len = u32::try_from(data.len()).expect("write within 4 GiB");
        self.call(Command::Write, flags, offset, len, data, &mut [])
    }

    /// Reads into `buf` from `offset`; Ok(errno).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<u32> {
        let len = u32::try_from(buf.len()).expect("read within 4 GiB");
        self.call(Command::Read, 0, offset, len, &[], buf)
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        self.call(Command::Flush, 0, 0, 0, &[], &mut [])
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        self.call(Command::Trim, 0, offset, len, &[], &mut [])
    }

    /// Sends NBD_CMD_DISC and waits for the server to close the connection.
    pub fn disconnect(mut self) {
        if self.send(Command::Disc, 0, 0, 0, &[]).is_ok() {
            let mut b = [0u8; 1];
            let _ = self.s.read(&mut b);
        }
    }

    // === Transmission, exact control =============================================================

    /// Sends a request header with the caller's cookie (the caller sends any payload).
    pub fn request(&mut self, command: Command, flags: u16, cookie: u64, offset: u64, length: u32) {
        self.send_raw(command, flags, cookie, offset, length, &[])
            .expect("send request");
    }

    /// Sends a write request and its payload, without reading the reply.
    pub fn request_write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        let len = u32::try_from(data.len()).expect("write within 4 GiB");
        self.send_raw(Command::Write, 0, cookie, offset, len, data)
            .expect("send write");
    }

    /// Reads a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).expect("simple reply");
        let r = SimpleReply::decode(&h).expect("valid simple reply");
        (r.error, r.cookie)
    }

    /// Writes `data` at `offset` under `cookie` and returns the reply's errno.
    pub fn write_at(&mut self, cookie: u64, offset: u64, data: &[u8]) -> u32 {
        self.request_write(cookie, offset, data);
        let (err, c) = self.simple_reply();
        assert_eq!(c, cookie, "reply for another cookie");
        err
    }

    /// Reads `len` bytes at `offset` under `cookie` (simple replies): the data, or the errno.
    pub fn read_at(&mut self, cookie: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(Command::Read, 0, cookie, offset, len);
        let (err, c) = self.simple_reply();
        assert_eq!(c, cookie, "reply for another cookie");
        if err != 0 {
            return Err(err);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).expect("read data");
        Ok(data)
    }

    /// Reads one reply of either kind: (cookie, magic-specific parts). For structured replies,
    /// reads chunks until DONE.
    pub fn any_reply(&mut self, read_len: usize) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).expect("reply magic");
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut all = [0u8; SIMPLE_REPLY_LEN];
                all[..4].copy_from_slice(&magic);
                self.s.read_exact(&mut all[4..]).expect("simple reply");
                let r = SimpleReply::decode(&all).expect("simple reply");
                let mut data = Vec::new();
                if r.error == 0 && read_len > 0 {
                    data.resize(read_len, 0);
                    self.s.read_exact(&mut data).expect("read data");
                }
                Reply::Simple {
                    error: r.error,
                    cookie: r.cookie,
                    data,
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut chunks = Vec::new();
                let mut first = Some(magic);
                loop {
                    let mut h = [0u8; STRUCTURED_HEADER_LEN];
                    match first.take() {
                        Some(m) => {
                            h[..4].copy_from_slice(&m);
                            self.s.read_exact(&mut h[4..]).expect("chunk header");
                        }
                        None => self.s.read_exact(&mut h).expect("chunk header"),
                    }
                    let ch = ChunkHeader::decode(&h).expect("chunk header");
                    let mut payload = vec![0u8; ch.length as usize];
                    self.s.read_exact(&mut payload).expect("chunk payload");
                    let c = Chunk::decode(ch.chunk_type, &payload).expect("chunk");
                    chunks.push((ch.cookie, c));
                    if ch.flags & REPLY_FLAG_DONE != 0 {
                        return Reply::Structured {
                            cookie: ch.cookie,
                            chunks,
                        };
                    }
                }
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }
}

/// A whole reply as [`Client::any_reply`] read it.
#[derive(Debug)]
pub enum Reply {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Structured {
        cookie: u64,
        chunks: Vec<(u64, Chunk)>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Structured { cookie, .. } => *cookie,
        }
    }

    /// The errno of a reply (0 for success).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Structured { chunks, .. } => chunks
                .iter()
                .find_map(|(_, c)| match c {
                    Chunk::Error { error, .. } | Chunk::ErrorOffset { error, .. } => Some(*error),
                    _ => None,
                })
                .unwrap_or(0),
        }
    }

    /// Reassembles read data from a structured reply covering [offset, offset+len).
    pub fn read_data(&self, offset: u64, len: usize) -> Vec<u8> {
        match self {
            Reply::Simple { data, .. } => data.clone(),
            Reply::Structured { chunks, .. } => {
                let mut out = vec![0xeeu8; len];
                let mut covered = 0usize;
                for (_, c) in chunks {
                    match c {
                        Chunk::OffsetData { offset: o, data } => {
                            let at = usize::try_from(o - offset).expect("offset in the read");
                            out[at..at + data.len()].copy_from_slice(data);
                            covered += data.len();
                        }
                        Chunk::OffsetHole { offset: o, length } => {
                            let at = usize::try_from(o - offset).expect("offset in the read");
                            out[at..at + *length as usize].fill(0);
                            covered += *length as usize;
                        }
                        other => panic!("unexpected chunk in read reply: {other:?}"),
                    }
                }
                assert_eq!(covered, len, "read reply chunks do not cover the request");
                out
            }
        }
    }
}
