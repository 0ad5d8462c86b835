//! A minimal blocking NBD client for the reliability tests: fixed-newstyle handshake with
//! NBD_OPT_EXPORT_NAME, simple replies only. Every call returns `io::Result` so a test can
//! survive the server being killed under it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1;
const CLIENT_NO_ZEROES: u32 = 2;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;

pub const EIO: u32 = 5;
pub const ENOSPC: u32 = 28;

pub struct Client {
    s: TcpStream,
    pub size: u64,
    pub flags: u16,
    next_cookie: u64,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

impl Client {
    /// Connects and selects `export` with NBD_OPT_EXPORT_NAME (the server closes the
    /// connection when the export does not exist, which shows up as an error here).
    pub fn connect(port: u16, export: &str) -> io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        s.set_write_timeout(Some(Duration::from_secs(120)))?;
        s.set_nodelay(true)?;
        let mut c = Client {
            s,
            size: 0,
            flags: 0,
            next_cookie: 1,
        };
        let mut g = [0u8; 18];
        c.s.read_exact(&mut g)?;
        if u64::from_be_bytes(g[0..8].try_into().unwrap()) != NBD_MAGIC
            || u64::from_be_bytes(g[8..16].try_into().unwrap()) != IHAVEOPT
        {
            return Err(bad("not a newstyle NBD server"));
        }
        let hflags = u16::from_be_bytes([g[16], g[17]]);
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= CLIENT_NO_ZEROES;
        }
        let mut msg = cflags.to_be_bytes().to_vec();
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
        msg.extend_from_slice(export.as_bytes());
        c.s.write_all(&msg)?;
        let mut r = [0u8; 10];
        c.s.read_exact(&mut r)?;
        c.size = u64::from_be_bytes(r[0..8].try_into().unwrap());
        c.flags = u16::from_be_bytes([r[8], r[9]]);
        if !no_zeroes {
            let mut z = [0u8; 124];
            c.s.read_exact(&mut z)?;
        }
        Ok(c)
    }

    /// Sends one request (with its payload for writes) and returns its cookie.
    pub fn send(
        &mut self,
        cmd: u16,
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
        cmd: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut m = Vec::with_capacity(28 + payload.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(payload);
        self.s.write_all(&m)
    }

    pub fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Reads one simple reply: (errno, cookie); for a successful read, `data` is filled.
    pub fn reply(&mut self, data: &mut [u8]) -> io::Result<(u32, u64)> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if u32::from_be_bytes(h[0..4].try_into().unwrap()) != SIMPLE_REPLY_MAGIC {
            return Err(bad("bad reply magic"));
        }
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        if err == 0 && !data.is_empty() {
            self.s.read_exact(data)?;
        }
        Ok((err, cookie))
    }

    fn call(
        &mut self,
        cmd: u16,
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
        let flags = if fua { FLAG_FUA } else { 0 };
        self.call(CMD_WRITE, flags, offset, data.len() as u32, data, &mut [])
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<u32> {
        let len = buf.len() as u32;
        self.call(CMD_READ, 0, offset, len, &[], buf)
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        self.call(CMD_FLUSH, 0, 0, 0, &[], &mut [])
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<u32> {
        self.call(CMD_TRIM, 0, offset, len, &[], &mut [])
    }

    /// Sends NBD_CMD_DISC and waits for the server to close the connection.
    pub fn disconnect(mut self) {
        if self.send(CMD_DISC, 0, 0, 0, &[]).is_ok() {
            let mut b = [0u8; 1];
            let _ = self.s.read(&mut b);
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.s
    }
}
