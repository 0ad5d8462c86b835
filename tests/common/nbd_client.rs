//! A minimal blocking NBD client for the reliability tests: fixed-newstyle handshake with
//! NBD_OPT_EXPORT_NAME, simple replies only. Every call returns `io::Result` so a test can
//! survive the server being killed under it.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub use thinnbd::nbd::codec::{Command, CMD_FLAG_FUA};
use thinnbd::nbd::codec::{
    Request, SimpleReply, CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, FLAG_NO_ZEROES, IHAVEOPT,
    NBD_MAGIC, OPT_EXPORT_NAME, SIMPLE_REPLY_LEN,
};
#[allow(unused_imports)] // the errors its replies carry, for the tests that check them
pub use thinnbd::nbd::{NBD_EIO, NBD_ENOSPC};

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
        self.call(
            Command::Write,
            flags,
            offset,
            data.len() as u32,
            data,
            &mut [],
        )
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<u32> {
        let len = buf.len() as u32;
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

    pub fn stream(&self) -> &TcpStream {
        &self.s
    }
}
