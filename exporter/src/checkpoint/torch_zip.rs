//! The directory of a PyTorch zip checkpoint, read from its bytes (usually a memory map): where
//! each entry's data lies in the file, so tensors are sliced out without copying.
//!
//! Only what `torch.save` writes is supported: entries STORED (uncompressed), no encryption, one
//! disk; zip64 records and extra fields where offsets or sizes pass 4 GiB. CRCs are not checked
//! (they would cost a pass over every weight); offsets and sizes are.
use std::ops::Range;

const EOCD: u32 = 0x0605_4b50;
const EOCD64: u32 = 0x0606_4b50;
const EOCD64_LOCATOR: u32 = 0x0706_4b50;
const CENTRAL: u32 = 0x0201_4b50;
const LOCAL: u32 = 0x0403_4b50;
const ZIP64_EXTRA: u16 = 0x0001;
/// Compression method of an uncompressed entry.
pub const STORED: u16 = 0;

/// One entry of the archive.
#[derive(Debug, Clone)]
pub struct ZipEntry {
    /// Its name inside the archive (`archive/data/0`).
    pub name: String,
    /// Compression method (0 = stored).
    pub method: u16,
    /// Where its (stored) bytes lie in the file.
    pub data: Range<usize>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at.checked_add(2)?).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.checked_add(4)?).and_then(|s| s.try_into().ok()).map(u32::from_le_bytes)
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at.checked_add(8)?).and_then(|s| s.try_into().ok()).map(u64::from_le_bytes)
}

fn to_usize(v: u64, what: &str) -> Result<usize, String> {
    usize::try_from(v).map_err(|_| format!("{what} {v} does not fit in memory"))
}

/// The central directory's entry count, size and offset, from the (zip64) end records.
fn directory(b: &[u8]) -> Result<(u64, u64, u64), String> {
    let truncated =
        || format!("no end-of-central-directory record in {} bytes: not a zip archive, or truncated", b.len());
    let last = b.len().checked_sub(22).ok_or_else(truncated)?;
    let first = last.saturating_sub(u16::MAX as usize);
    let eocd = (first..=last).rev().find(|&at| u32_at(b, at) == Some(EOCD)).ok_or_else(truncated)?;
    let field = |off| u32_at(b, eocd + off).map(u64::from).ok_or_else(truncated);
    let count = u16_at(b, eocd + 10).map(u64::from).ok_or_else(truncated)?;
    let (size, offset) = (field(12)?, field(16)?);
    let locator = eocd.checked_sub(20).filter(|&at| u32_at(b, at) == Some(EOCD64_LOCATOR));
    let Some(locator) = locator else {
        if count == 0xFFFF || size == 0xFFFF_FFFF || offset == 0xFFFF_FFFF {
            return Err("zip64 sizes without a zip64 end-of-central-directory locator".into());
        }
        return Ok((count, size, offset));
    };
    let bad64 = || "zip64 end-of-central-directory record missing or cut short; truncated?".to_string();
    let at = u64_at(b, locator + 8).ok_or_else(bad64)?;
    let at = to_usize(at, "zip64 record offset")?;
    if u32_at(b, at) != Some(EOCD64) {
        return Err(bad64());
    }
    let read = |off| u64_at(b, at + off).ok_or_else(bad64);
    Ok((read(32)?, read(40)?, read(48)?))
}

/// The zip64 extended-information field of a central header: the 64-bit values of those of
/// `fields` (uncompressed size, compressed size, local header offset) that read 0xFFFFFFFF.
fn zip64_fields(extra: &[u8], fields: &mut [u64; 3]) -> Result<(), String> {
    let mut at = 0;
    while at + 4 <= extra.len() {
        let (id, len) = (u16_at(extra, at), u16_at(extra, at + 2));
        let (Some(id), Some(len)) = (id, len) else { break };
        let body = extra.get(at + 4..at + 4 + len as usize).ok_or("extra field runs past its header")?;
        if id == ZIP64_EXTRA {
            let mut pos = 0;
            for v in fields.iter_mut().filter(|v| **v == 0xFFFF_FFFF) {
                *v = u64_at(body, pos).ok_or("zip64 extra field too short")?;
                pos += 8;
            }
            return Ok(());
        }
        at += 4 + len as usize;
    }
    if fields.contains(&0xFFFF_FFFF) {
        return Err("zip64 sizes without a zip64 extra field".into());
    }
    Ok(())
}

/// Every entry of the archive in `b`, with the range of its data checked to lie inside `b`.
pub fn entries(b: &[u8]) -> Result<Vec<ZipEntry>, String> {
    let (count, size, offset) = directory(b)?;
    let start = to_usize(offset, "central directory offset")?;
    let end = start.checked_add(to_usize(size, "central directory size")?);
    if end.is_none_or(|e| e > b.len()) {
        return Err(format!(
            "central directory at bytes {offset}..{} lies past the end of the {}-byte file; truncated?",
            offset.saturating_add(size),
            b.len()
        ));
    }
    let mut out = Vec::new();
    let mut at = start;
    for i in 0..count {
        let cut = || format!("central directory entry {i} cut short");
        if u32_at(b, at) != Some(CENTRAL) {
            return Err(format!("central directory entry {i} has a bad signature"));
        }
        let flags = u16_at(b, at + 8).ok_or_else(cut)?;
        let method = u16_at(b, at + 10).ok_or_else(cut)?;
        let compressed = u32_at(b, at + 20).ok_or_else(cut)?;
        let uncompressed = u32_at(b, at + 24).ok_or_else(cut)?;
        let name_len = u16_at(b, at + 28).ok_or_else(cut)? as usize;
        let extra_len = u16_at(b, at + 30).ok_or_else(cut)? as usize;
        let comment_len = u16_at(b, at + 32).ok_or_else(cut)? as usize;
        let local = u32_at(b, at + 42).ok_or_else(cut)?;
        let name = b.get(at + 46..at + 46 + name_len).ok_or_else(cut)?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = b.get(at + 46 + name_len..at + 46 + name_len + extra_len).ok_or_else(cut)?;
        let mut fields = [u64::from(uncompressed), u64::from(compressed), u64::from(local)];
        zip64_fields(extra, &mut fields).map_err(|e| format!("entry {name}: {e}"))?;
        if flags & 1 != 0 {
            return Err(format!("entry {name} is encrypted"));
        }
        let data = local_data(b, &name, fields[2], fields[1])?;
        out.push(ZipEntry { name, method, data });
        at += 46 + name_len + extra_len + comment_len;
    }
    Ok(out)
}

/// The data range of the entry whose local header is at `local`, holding `len` stored bytes.
fn local_data(b: &[u8], name: &str, local: u64, len: u64) -> Result<Range<usize>, String> {
    let past = || format!("entry {name} lies past the end of the {}-byte file; truncated?", b.len());
    let local = to_usize(local, "local header offset")?;
    if u32_at(b, local) != Some(LOCAL) {
        return Err(if local >= b.len() { past() } else { format!("entry {name}: bad local header signature") });
    }
    let name_len = u16_at(b, local + 26).ok_or_else(past)? as usize;
    let extra_len = u16_at(b, local + 28).ok_or_else(past)? as usize;
    let start = local + 30 + name_len + extra_len;
    let end = start.checked_add(to_usize(len, "entry size")?).ok_or_else(past)?;
    if end > b.len() {
        return Err(past());
    }
    Ok(start..end)
}
