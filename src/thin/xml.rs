//! thin_dump / thin_restore XML: `dump` writes exactly what Debian's thin-provisioning-tools
//! 0.9.0 `thin_dump` prints (attribute order, two-space indentation, runs merged into
//! `range_mapping`), `dump_metadata_snap` is `thin_dump -m`, and `restore` streams the XML into
//! freshly formatted metadata with one bulk-built tree per device.
//!
//! Restore never inserts mappings one by one: each device's mappings are gathered in order
//! (sorted only when the XML is out of order) and handed to `bulk_load_device`.

use std::io::{BufRead, Write};
use std::sync::Arc;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::error::{fail, Error, ErrorKind, Result};
use crate::pdata::block_io::BlockIo;
use crate::pdata::btree;
use crate::pdata::checksum::{read_u64, BlockKind};
use crate::pdata::space_map::SpaceMap;
use crate::pdata::tm::TransactionManager;

use super::metadata::{DeviceDetails, ThinId, ThinMetadata};
use super::superblock::Superblock;
use super::values::{unpack_block_time, BlockTime, DeviceRoot, DETAILS};

fn write_err(e: std::io::Error) -> Error {
    Error::io("writing XML", e)
}

/// Header values printed on the `<superblock>` line.
struct Header {
    time: u32,
    transaction: u64,
    flags: u32,
    version: u32,
    data_block_size: u32,
    nr_data_blocks: u64,
}

/// Streams one device's mappings, merging runs the way 0.9.0 does: the next mapping extends a
/// run when its virtual block and data block both follow on and its time is the same.
struct RunEmitter<'a, W: Write> {
    out: &'a mut W,
    run: Option<(u64, u64, u64, u32)>,
}

impl<W: Write> RunEmitter<'_, W> {
    fn push(&mut self, vblock: u64, data: u64, time: u32) -> std::io::Result<()> {
        if let Some((v0, d0, len, t0)) = &mut self.run {
            if v0.checked_add(*len) == Some(vblock)
                && d0.checked_add(*len) == Some(data)
                && *t0 == time
            {
                *len += 1;
                return Ok(());
            }
        }
        self.flush()?;
        self.run = Some((vblock, data, 1, time));
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self.run.take() {
            None => Ok(()),
            Some((v, d, 1, t)) => {
                writeln!(self.out, "    <single_mapping origin_block=\"{v}\" data_block=\"{d}\" time=\"{t}\"/>")
            }
            Some((v, d, len, t)) => writeln!(
                self.out,
                "    <range_mapping origin_begin=\"{v}\" data_begin=\"{d}\" length=\"{len}\" time=\"{t}\"/>"
            ),
        }
    }
}

fn dump_devices(
    tm: &TransactionManager,
    header: &Header,
    devices: &[(ThinId, DeviceDetails, u64)],
    out: &mut impl Write,
) -> Result<()> {
    writeln!(
        out,
        "<superblock uuid=\"\" time=\"{}\" transaction=\"{}\" flags=\"{}\" version=\"{}\" data_block_size=\"{}\" nr_data_blocks=\"{}\">",
        header.time, header.transaction, header.flags, header.version, header.data_block_size, header.nr_data_blocks
    )
    .map_err(write_err)?;
    for (dev, d, root) in devices {
        writeln!(
            out,
            "  <device dev_id=\"{dev}\" mapped_blocks=\"{}\" transaction=\"{}\" creation_time=\"{}\" snap_time=\"{}\">",
            d.mapped_blocks, d.transaction_id, d.creation_time, d.snapshotted_time
        )
        .map_err(write_err)?;
        let mut runs = RunEmitter {
            out: &mut *out,
            run: None,
        };
        btree::iterate(tm, *root, BlockTime, 0, u64::MAX, &mut |k, v| {
            let (data, time) = unpack_block_time(read_u64(v, 0));
            runs.push(k, data, time).map_err(write_err)?;
            Ok(true)
        })
        .map_err(|e| e.within(format_args!("dumping device {dev}")))?;
        runs.flush().map_err(write_err)?;
        writeln!(out, "  </device>").map_err(write_err)?;
    }
    writeln!(out, "</superblock>").map_err(write_err)?;
    Ok(())
}

/// Writes the pool's devices and mappings as 0.9.0 `thin_dump` does (including changes not yet
/// committed).
pub fn dump(md: &ThinMetadata, out: &mut impl Write) -> Result<()> {
    let sb = md.superblock();
    let header = Header {
        time: sb.time,
        transaction: sb.transaction_id,
        flags: sb.flags,
        version: sb.version,
        data_block_size: sb.data_block_size,
        nr_data_blocks: md.status().data_total,
    };
    let mut devices = Vec::new();
    for dev in md.thin_ids() {
        devices.push((dev, md.device_details(dev)?, md.device_root(dev)?));
    }
    dump_devices(md.tm(), &header, &devices, out)
}

/// `thin_dump -m`: dumps the metadata snapshot named by the committed superblock. Its space map
/// roots are zero, so `nr_data_blocks` is 0, as 0.9.0 prints it.
pub fn dump_metadata_snap(io: Arc<dyn BlockIo>, out: &mut impl Write) -> Result<()> {
    let tm = TransactionManager::new(io, SpaceMap::new(0), SpaceMap::new(0));
    let live = Superblock::decode(&*tm.read(0, BlockKind::Superblock)?)?;
    if live.metadata_snap == 0 {
        return fail(
            ErrorKind::NotFound,
            "the superblock names no metadata snapshot",
        );
    }
    let sb = Superblock::decode(&*tm.read(live.metadata_snap, BlockKind::Superblock)?)?;
    let mut details = std::collections::BTreeMap::new();
    for (dev, v) in btree::entries(&tm, sb.details_root, DETAILS)? {
        details.insert(dev, DeviceDetails::decode(&v));
    }
    let mut devices = Vec::new();
    for (dev, v) in btree::entries(&tm, sb.mapping_root, DeviceRoot)? {
        let d = details.get(&dev).copied().ok_or_else(|| {
            Error::corrupt(format!(
                "metadata snapshot: mapping tree has device {dev} with no details"
            ))
        })?;
        let id = ThinId::try_from(dev).map_err(|_| {
            Error::corrupt(format!("metadata snapshot: device id {dev} is not 32-bit"))
        })?;
        devices.push((id, d, read_u64(&v, 0)));
    }
    let header = Header {
        time: sb.time,
        transaction: sb.transaction_id,
        flags: sb.flags,
        version: sb.version,
        data_block_size: sb.data_block_size,
        nr_data_blocks: sb.data_sm_root.nr_blocks,
    };
    dump_devices(&tm, &header, &devices, out)
}

/// Counts lines as quick-xml consumes input, so errors can say where they are.
struct LineCounter<R> {
    inner: R,
    line: u64,
}

impl<R: std::io::Read> std::io::Read for LineCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.line += buf[..n].iter().filter(|&&c| c == b'\n').count() as u64;
        Ok(n)
    }
}

impl<R: BufRead> BufRead for LineCounter<R> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.inner.fill_buf()
    }
    fn consume(&mut self, amt: usize) {
        if let Ok(buf) = self.inner.fill_buf() {
            let n = amt.min(buf.len());
            self.line += buf[..n].iter().filter(|&&c| c == b'\n').count() as u64;
        }
        self.inner.consume(amt);
    }
}

/// Attributes of one element, looked up by name; numbers parsed strictly.
struct Attrs {
    element: String,
    line: u64,
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Attrs {
    fn parse(e: &BytesStart<'_>, line: u64) -> Result<Self> {
        let element = String::from_utf8_lossy(e.name().as_ref()).into_owned();
        let mut pairs = Vec::new();
        for a in e.attributes() {
            let a = a.map_err(|err| {
                Error::new(
                    ErrorKind::InvalidInput,
                    format!("XML line {line}: <{element}>: bad attribute: {err}"),
                )
            })?;
            pairs.push((a.key.as_ref().to_vec(), a.value.into_owned()));
        }
        Ok(Attrs {
            element,
            line,
            pairs,
        })
    }

    fn bad(&self, what: String) -> Error {
        Error::new(
            ErrorKind::InvalidInput,
            format!("XML line {}: <{}>: {what}", self.line, self.element),
        )
    }

    fn get(&self, name: &str) -> Option<&[u8]> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    fn opt_u64(&self, name: &str) -> Result<Option<u64>> {
        let Some(v) = self.get(name) else {
            return Ok(None);
        };
        if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
            return Err(self.bad(format!(
                "{name}=\"{}\" is not a number",
                String::from_utf8_lossy(v)
            )));
        }
        let mut n: u64 = 0;
        for &c in v {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(c - b'0')))
                .ok_or_else(|| self.bad(format!("{name} is too large")))?;
        }
        Ok(Some(n))
    }

    fn u64(&self, name: &str) -> Result<u64> {
        self.opt_u64(name)?
            .ok_or_else(|| self.bad(format!("missing attribute {name}")))
    }

    fn u32(&self, name: &str) -> Result<u32> {
        let v = self.u64(name)?;
        u32::try_from(v).map_err(|_| self.bad(format!("{name}={v} does not fit in 32 bits")))
    }

    fn opt_u32(&self, name: &str, default: u32) -> Result<u32> {
        match self.opt_u64(name)? {
            None => Ok(default),
            Some(v) => u32::try_from(v)
                .map_err(|_| self.bad(format!("{name}={v} does not fit in 32 bits"))),
        }
    }
}

/// A device being read from the XML.
struct PendingDevice {
    id: ThinId,
    details: DeviceDetails,
    line: u64,
    mappings: Vec<(u64, u64, u32)>,
    sorted: bool,
}

impl PendingDevice {
    fn add(&mut self, vblock: u64, data: u64, time: u32) {
        if let Some(last) = self.mappings.last() {
            if last.0 >= vblock {
                self.sorted = false;
            }
        }
        self.mappings.push((vblock, data, time));
    }
}

/// Restore state: the metadata once `<superblock>` was seen, and the open device.
struct Restorer {
    io: Arc<dyn BlockIo>,
    md: Option<ThinMetadata>,
    nr_data_blocks: u64,
    device: Option<PendingDevice>,
    superblock_closed: bool,
}

impl Restorer {
    fn start_superblock(&mut self, a: &Attrs) -> Result<()> {
        if self.md.is_some() {
            return Err(a.bad("a second <superblock>".into()));
        }
        let time = a.u32("time")?;
        if time > 0xff_ffff {
            return Err(a.bad(format!("time {time} exceeds 24 bits")));
        }
        let transaction = a.u64("transaction")?;
        let flags = a.opt_u32("flags", 0)?;
        let version = a.opt_u32("version", 1)?;
        if !(1..=2).contains(&version) {
            return Err(a.bad(format!("unsupported metadata version {version}")));
        }
        let data_block_size = a.u32("data_block_size")?;
        let nr_data_blocks = a.u64("nr_data_blocks")?;
        let mut md = ThinMetadata::format(self.io.clone(), data_block_size, nr_data_blocks)
            .map_err(|e| e.within(format_args!("XML line {}: <superblock>", a.line)))?;
        md.set_restored_header(time, transaction, flags);
        md.set_restored_version(version);
        self.nr_data_blocks = nr_data_blocks;
        self.md = Some(md);
        Ok(())
    }

    fn start_device(&mut self, a: &Attrs) -> Result<()> {
        if self.md.is_none() || self.superblock_closed {
            return Err(a.bad("<device> outside <superblock>".into()));
        }
        if self.device.is_some() {
            return Err(a.bad("<device> inside another <device>".into()));
        }
        let id = a.u32("dev_id")?;
        let details = DeviceDetails {
            // Recomputed from the mappings, as 0.9.0 thin_restore does; still parsed so that a
            // malformed value is reported.
            mapped_blocks: a.u64("mapped_blocks")?,
            transaction_id: a.u64("transaction")?,
            creation_time: a.u32("creation_time")?,
            snapshotted_time: a.u32("snap_time")?,
        };
        self.device = Some(PendingDevice {
            id,
            details,
            line: a.line,
            mappings: Vec::new(),
            sorted: true,
        });
        Ok(())
    }

    fn end_device(&mut self, line: u64) -> Result<()> {
        let Some(mut d) = self.device.take() else {
            return fail(
                ErrorKind::InvalidInput,
                format!("XML line {line}: </device> without <device>"),
            );
        };
        if !d.sorted {
            d.mappings.sort_unstable_by_key(|m| m.0);
            if let Some(w) = d.mappings.windows(2).find(|w| w[0].0 == w[1].0) {
                return fail(
                    ErrorKind::InvalidInput,
                    format!(
                        "XML: device {} (line {}): virtual block {} is mapped twice",
                        d.id, d.line, w[0].0
                    ),
                );
            }
        }
        let md = self
            .md
            .as_mut()
            .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "device before superblock"))?;
        md.bulk_load_device(d.id, d.details, &d.mappings)
            .map_err(|e| e.within(format_args!("XML: device {} (line {})", d.id, d.line)))
    }

    fn mapping(&mut self, a: &Attrs, range: bool) -> Result<()> {
        let nr_data_blocks = self.nr_data_blocks;
        let Some(d) = self.device.as_mut() else {
            return Err(a.bad("mapping outside <device>".into()));
        };
        let (vblock, data, len) = if range {
            (
                a.u64("origin_begin")?,
                a.u64("data_begin")?,
                a.u64("length")?,
            )
        } else {
            (a.u64("origin_block")?, a.u64("data_block")?, 1)
        };
        let time = a.u32("time")?;
        if time > 0xff_ffff {
            return Err(a.bad(format!("time {time} exceeds 24 bits")));
        }
        if len == 0 {
            return Err(a.bad("length 0".into()));
        }
        if data
            .checked_add(len)
            .filter(|&end| end <= nr_data_blocks)
            .is_none()
        {
            return Err(a.bad(format!(
                "data blocks {data}..{data}+{len} reach past nr_data_blocks {nr_data_blocks}"
            )));
        }
        vblock
            .checked_add(len)
            .ok_or_else(|| a.bad("virtual block range overflows".into()))?;
        d.mappings
            .reserve(usize::try_from(len).unwrap_or(0).min(1 << 20));
        for i in 0..len {
            d.add(vblock + i, data + i, time);
        }
        Ok(())
    }

    fn element(&mut self, e: &BytesStart<'_>, line: u64, empty: bool) -> Result<()> {
        let a = Attrs::parse(e, line)?;
        match e.name().as_ref() {
            b"superblock" => {
                self.start_superblock(&a)?;
                if empty {
                    self.superblock_closed = true;
                }
            }
            b"device" => {
                self.start_device(&a)?;
                if empty {
                    self.end_device(line)?;
                }
            }
            b"single_mapping" => self.mapping(&a, false)?,
            b"range_mapping" => self.mapping(&a, true)?,
            _ => return Err(a.bad("unknown element".into())),
        }
        Ok(())
    }
}

/// Restores XML (as written by `thin_dump`) onto `io`: fresh metadata sized by the device, every
/// device bulk-loaded, time / transaction / flags / version taken from the XML. `mapped_blocks`
/// is recomputed from the mappings. Errors name the XML line and element.
pub fn restore(xml: &mut impl BufRead, io: Arc<dyn BlockIo>) -> Result<ThinMetadata> {
    let mut reader = Reader::from_reader(LineCounter {
        inner: xml,
        line: 1,
    });
    reader.config_mut().trim_text(true);
    let mut st = Restorer {
        io,
        md: None,
        nr_data_blocks: 0,
        device: None,
        superblock_closed: false,
    };
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        let ev = reader.read_event_into(&mut buf);
        let line = reader.get_ref().line;
        match ev {
            Err(e) => {
                return fail(
                    ErrorKind::InvalidInput,
                    format!("XML line {line}: malformed XML: {e}"),
                );
            }
            Ok(Event::Start(e)) => st.element(&e, line, false)?,
            Ok(Event::Empty(e)) => st.element(&e, line, true)?,
            Ok(Event::End(e)) => match e.name().as_ref() {
                b"device" => st.end_device(line)?,
                b"superblock" => {
                    if st.device.is_some() {
                        return fail(
                            ErrorKind::InvalidInput,
                            format!("XML line {line}: </superblock> inside <device>"),
                        );
                    }
                    st.superblock_closed = true;
                }
                // Mapping elements written as <x ...></x> close here; nothing to do.
                b"single_mapping" | b"range_mapping" => {}
                other => {
                    return fail(
                        ErrorKind::InvalidInput,
                        format!(
                            "XML line {line}: unexpected </{}>",
                            String::from_utf8_lossy(other)
                        ),
                    )
                }
            },
            Ok(Event::Text(t)) => {
                if !t.iter().all(u8::is_ascii_whitespace) {
                    return fail(
                        ErrorKind::InvalidInput,
                        format!("XML line {line}: unexpected text"),
                    );
                }
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
        }
    }
    let line = reader.get_ref().line;
    if st.device.is_some() {
        return fail(
            ErrorKind::InvalidInput,
            format!("XML line {line}: input ends inside <device>"),
        );
    }
    if !st.superblock_closed {
        return fail(
            ErrorKind::InvalidInput,
            format!("XML line {line}: input ends without </superblock>"),
        );
    }
    let mut md = st
        .md
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, "XML has no <superblock>"))?;
    md.commit()?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::mem_block_io::MemBlockIo;

    const SAMPLE: &str = r#"<superblock uuid="" time="1" transaction="5" flags="0" version="2" data_block_size="128" nr_data_blocks="1000">
  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <single_mapping origin_block="10" data_block="20" time="0"/>
  </device>
  <device dev_id="2" mapped_blocks="0" transaction="3" creation_time="1" snap_time="1">
  </device>
</superblock>
"#;

    fn restore_str(s: &str) -> Result<ThinMetadata> {
        restore(&mut s.as_bytes(), Arc::new(MemBlockIo::new(1024)))
    }

    #[test]
    fn restore_then_dump_round_trips() {
        let md = restore_str(SAMPLE).unwrap();
        assert_eq!(
            md.device_mappings(1).unwrap(),
            vec![(0, 0, 0), (1, 1, 0), (2, 2, 0), (10, 20, 0)]
        );
        let mut out = Vec::new();
        dump(&md, &mut out).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), SAMPLE);
    }

    #[test]
    fn runs_break_on_time_and_gaps() {
        let xml = SAMPLE.replace(
            r#"<single_mapping origin_block="10" data_block="20" time="0"/>"#,
            r#"<single_mapping origin_block="3" data_block="3" time="1"/>
    <single_mapping origin_block="4" data_block="5" time="1"/>"#,
        );
        let md = restore_str(&xml).unwrap();
        let mut out = Vec::new();
        dump(&md, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text
            .contains(r#"<range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>"#));
        assert!(text.contains(r#"<single_mapping origin_block="3" data_block="3" time="1"/>"#));
        assert!(text.contains(r#"<single_mapping origin_block="4" data_block="5" time="1"/>"#));
    }

    #[test]
    fn unsorted_mappings_are_sorted_and_duplicates_rejected() {
        let xml = SAMPLE.replace(
            r#"<single_mapping origin_block="10" data_block="20" time="0"/>"#,
            r#"<single_mapping origin_block="10" data_block="20" time="0"/>
    <single_mapping origin_block="5" data_block="21" time="0"/>"#,
        );
        let md = restore_str(&xml).unwrap();
        assert_eq!(md.device_mappings(1).unwrap()[3], (5, 21, 0));
        let dup = SAMPLE.replace(
            r#"<single_mapping origin_block="10" data_block="20" time="0"/>"#,
            r#"<single_mapping origin_block="1" data_block="20" time="0"/>"#,
        );
        let e = restore_str(&dup).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.context().contains("mapped twice"), "{e}");
    }

    #[test]
    fn errors_name_the_line_and_element() {
        let past = SAMPLE.replace(r#"data_block="20""#, r#"data_block="1000""#);
        let e = restore_str(&past).err().unwrap();
        assert!(
            e.context().contains("line 4") && e.context().contains("single_mapping"),
            "{e}"
        );

        let bad = SAMPLE.replace(r#"length="3""#, r#"length="x3""#);
        let e = restore_str(&bad).err().unwrap();
        assert!(
            e.context().contains("line 3") && e.context().contains("range_mapping"),
            "{e}"
        );

        let unknown = SAMPLE.replace("<single_mapping", "<ref name=\"a\"/><single_mapping");
        let e = restore_str(&unknown).err().unwrap();
        assert!(e.context().contains("<ref>"), "{e}");

        let truncated = &SAMPLE[..SAMPLE.len() - 30];
        assert!(restore_str(truncated).is_err());
        let broken = SAMPLE.replace("</device>\n  <device", "</devic>\n  <device");
        assert!(restore_str(&broken).is_err());
        assert!(restore_str("").is_err());
    }
}
