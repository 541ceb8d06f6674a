//! A zip writer for PyTorch checkpoints as `torch.save` lays them out: every entry STORED, its
//! data aligned to 64 bytes by an `FB` padding extra field (as PyTorch's stream writer does), and
//! zip64 records where offsets or sizes pass 4 GiB (or always, for tests of the reader).
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};

const ALIGN: u64 = 64;
const MAX32: u64 = 0xFFFF_FFFF;
/// The extra-field id PyTorch's writer pads entries with.
const PAD_ID: u16 = 0x4246;

/// The CRC-32 (IEEE) table.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// The CRC-32 of `data`, as zip headers record it.
pub fn crc32(data: &[u8]) -> u32 {
    !data.iter().fold(!0u32, |c, &b| CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8))
}

struct Written {
    name: String,
    crc: u32,
    size: u64,
    offset: u64,
}

struct Out {
    w: BufWriter<File>,
    at: u64,
}

impl Out {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)?;
        self.at += bytes.len() as u64;
        Ok(())
    }
    fn u16(&mut self, v: u16) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.put(&v.to_le_bytes())
    }
}

/// A 32-bit header field: the value, or 0xFFFFFFFF when it goes in the zip64 extra field.
fn field32(v: u64, zip64: bool) -> u32 {
    if zip64 || v >= MAX32 { u32::MAX } else { v as u32 }
}

/// Writes `entries` (name, bytes) to a new zip file at `path`; `force_zip64` writes zip64 records
/// and fields even where the sizes do not need them.
pub fn write_zip(path: &Path, entries: &[(&str, &[u8])], force_zip64: bool) -> Result<()> {
    let file = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut out = Out { w: BufWriter::new(file), at: 0 };
    write_all(&mut out, entries, force_zip64).map_err(|e| Error::io(path, e))
}

fn write_all(out: &mut Out, entries: &[(&str, &[u8])], force: bool) -> std::io::Result<()> {
    let mut written = Vec::new();
    for (name, data) in entries {
        let size = data.len() as u64;
        let zip64 = force || size >= MAX32;
        let offset = out.at;
        let fixed = 30 + name.len() as u64 + if zip64 { 20 } else { 0 };
        let mut pad = (ALIGN - (offset + fixed) % ALIGN) % ALIGN;
        if pad > 0 && pad < 4 {
            pad += ALIGN;
        }
        let extra_len = if zip64 { 20 } else { 0 } + pad;
        let crc = crc32(data);
        out.u32(0x0403_4b50)?;
        out.u16(if zip64 { 45 } else { 20 })?;
        out.u16(0)?; // flags
        out.u16(0)?; // STORED
        out.u32(0)?; // time, date
        out.u32(crc)?;
        out.u32(field32(size, zip64))?;
        out.u32(field32(size, zip64))?;
        out.u16(name.len() as u16)?;
        out.u16(extra_len as u16)?;
        out.put(name.as_bytes())?;
        if zip64 {
            out.u16(0x0001)?;
            out.u16(16)?;
            out.u64(size)?;
            out.u64(size)?;
        }
        if pad > 0 {
            out.u16(PAD_ID)?;
            out.u16((pad - 4) as u16)?;
            out.put(&vec![b'Z'; (pad - 4) as usize])?;
        }
        out.put(data)?;
        written.push(Written { name: name.to_string(), crc, size, offset });
    }
    let directory = out.at;
    for e in &written {
        let big = [force || e.size >= MAX32, force || e.size >= MAX32, force || e.offset >= MAX32];
        let extra: Vec<u64> = [e.size, e.size, e.offset].iter().zip(big).filter(|(_, b)| *b).map(|(v, _)| *v).collect();
        out.u32(0x0201_4b50)?;
        out.u16(if extra.is_empty() { 20 } else { 45 })?; // made by
        out.u16(if extra.is_empty() { 20 } else { 45 })?; // needed
        out.u16(0)?;
        out.u16(0)?;
        out.u32(0)?;
        out.u32(e.crc)?;
        out.u32(field32(e.size, big[1]))?;
        out.u32(field32(e.size, big[0]))?;
        out.u16(e.name.len() as u16)?;
        out.u16(if extra.is_empty() { 0 } else { 4 + 8 * extra.len() as u16 })?;
        out.u16(0)?; // comment
        out.u16(0)?; // disk
        out.u16(0)?; // internal attributes
        out.u32(0)?; // external attributes
        out.u32(field32(e.offset, big[2]))?;
        out.put(e.name.as_bytes())?;
        if !extra.is_empty() {
            out.u16(0x0001)?;
            out.u16(8 * extra.len() as u16)?;
            for v in extra {
                out.u64(v)?;
            }
        }
    }
    let size = out.at - directory;
    let count = written.len() as u64;
    let zip64 = force || count >= 0xFFFF || size >= MAX32 || directory >= MAX32;
    if zip64 {
        let record = out.at;
        out.u32(0x0606_4b50)?;
        out.u64(44)?;
        out.u16(45)?;
        out.u16(45)?;
        out.u32(0)?;
        out.u32(0)?;
        out.u64(count)?;
        out.u64(count)?;
        out.u64(size)?;
        out.u64(directory)?;
        out.u32(0x0706_4b50)?;
        out.u32(0)?;
        out.u64(record)?;
        out.u32(1)?;
    }
    let count16 = if zip64 { u16::MAX } else { count as u16 };
    out.u32(0x0605_4b50)?;
    out.u32(0)?; // disk numbers
    out.u16(count16)?;
    out.u16(count16)?;
    out.u32(field32(size, zip64))?;
    out.u32(field32(directory, zip64))?;
    out.u16(0)?;
    out.w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
