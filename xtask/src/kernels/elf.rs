//! Just enough ELF64 (little-endian) for the kernel matrix: section lists, a module's
//! `depends=`, whether busybox is static, and the helper calls of the probe object embedded
//! in the agent binary.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};

const SHF_EXECINSTR: u64 = 0x4;
const PT_INTERP: u32 = 3;
const EM_BPF: u16 = 247;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

pub struct Section<'a> {
    pub name: String,
    pub flags: u64,
    pub data: &'a [u8],
}

fn check_header(b: &[u8]) -> Result<()> {
    if b.len() < 64 || &b[0..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        bail!("not a little-endian ELF64 file");
    }
    Ok(())
}

pub fn sections(b: &[u8]) -> Result<Vec<Section<'_>>> {
    check_header(b)?;
    let shoff = u64_at(b, 0x28).context("e_shoff")? as usize;
    let shentsize = usize::from(u16_at(b, 0x3a).context("e_shentsize")?);
    let shnum = usize::from(u16_at(b, 0x3c).context("e_shnum")?);
    let shstrndx = usize::from(u16_at(b, 0x3e).context("e_shstrndx")?);
    let header = |i: usize| -> Result<(u32, u32, u64, usize, usize)> {
        let h = shoff + i * shentsize;
        let get = |o| u64_at(b, h + o).context("section header past the end");
        Ok((
            u32_at(b, h).context("section header past the end")?,
            u32_at(b, h + 4).context("section header past the end")?,
            get(8)?,
            get(24)? as usize,
            get(32)? as usize,
        ))
    };
    let (_, _, _, str_off, str_size) = header(shstrndx)?;
    let names = b
        .get(str_off..str_off + str_size)
        .context("section names past the end")?;
    let mut out = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let (name, kind, flags, off, size) = header(i)?;
        let n = names.get(name as usize..).unwrap_or_default();
        let end = n.iter().position(|&c| c == 0).unwrap_or(n.len());
        // SHT_NOBITS (8) occupies no file bytes.
        let data = if kind == 8 {
            &[][..]
        } else {
            b.get(off..off + size)
                .with_context(|| format!("section {i} past the end"))?
        };
        out.push(Section {
            name: String::from_utf8_lossy(&n[..end]).into_owned(),
            flags,
            data,
        });
    }
    Ok(out)
}

/// A statically linked executable has no program interpreter.
pub fn is_static_executable(b: &[u8]) -> Result<bool> {
    check_header(b)?;
    let phoff = u64_at(b, 0x20).context("e_phoff")? as usize;
    let phentsize = usize::from(u16_at(b, 0x36).context("e_phentsize")?);
    let phnum = usize::from(u16_at(b, 0x38).context("e_phnum")?);
    for i in 0..phnum {
        if u32_at(b, phoff + i * phentsize).context("program header past the end")? == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The modules a kernel module needs loaded first (its `.modinfo` `depends=`).
pub fn module_depends(b: &[u8]) -> Result<Vec<String>> {
    let info = sections(b)?
        .into_iter()
        .find(|s| s.name == ".modinfo")
        .context("module has no .modinfo")?;
    Ok(info
        .data
        .split(|&c| c == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect())
}

/// The first BPF ELF object embedded in `b` (the agent binary carries its probes as bytes).
pub fn embedded_bpf_object(b: &[u8]) -> Option<&[u8]> {
    let mut from = 0;
    while let Some(pos) = b[from..].windows(4).position(|w| w == b"\x7fELF") {
        let start = from + pos;
        let obj = &b[start..];
        if obj.len() >= 64 && obj[4] == 2 && obj[5] == 1 && u16_at(obj, 18) == Some(EM_BPF) {
            let shoff = u64_at(obj, 0x28)? as usize;
            let len = shoff + usize::from(u16_at(obj, 0x3a)?) * usize::from(u16_at(obj, 0x3c)?);
            if len <= obj.len() && sections(&obj[..len]).is_ok() {
                return Some(&obj[..len]);
            }
        }
        from = start + 4;
    }
    None
}

/// Helper ids each executable section of a BPF object calls (`call imm` with src_reg 0;
/// bpf-to-bpf calls and kfuncs use other src_reg values).
pub fn bpf_helper_calls(obj: &[u8]) -> Result<BTreeMap<String, BTreeSet<u32>>> {
    let mut out = BTreeMap::new();
    for s in sections(obj)? {
        if s.flags & SHF_EXECINSTR == 0 || s.data.is_empty() {
            continue;
        }
        let mut ids = BTreeSet::new();
        let mut i = 0;
        while i + 8 <= s.data.len() {
            let code = s.data[i];
            let src = s.data[i + 1] >> 4;
            if code == 0x85 && src == 0 {
                ids.insert(u32_at(s.data, i + 4).unwrap_or(0));
            }
            // ld_imm64 spans two slots.
            i += if code == 0x18 { 16 } else { 8 };
        }
        out.insert(s.name, ids);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with sections: null, `.shstrtab`, `.text` (exec), `.modinfo`.
    fn sample(machine: u16, text: &[u8], modinfo: &[u8]) -> Vec<u8> {
        let names = b"\0.shstrtab\0tracepoint\0.modinfo\0";
        let mut b = vec![0u8; 64];
        b[0..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&machine.to_le_bytes());
        let place = |b: &mut Vec<u8>, d: &[u8]| {
            let off = b.len();
            b.extend_from_slice(d);
            off
        };
        let n_off = place(&mut b, names);
        let t_off = place(&mut b, text);
        let m_off = place(&mut b, modinfo);
        let shoff = b.len();
        b[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        b[0x3c..0x3e].copy_from_slice(&4u16.to_le_bytes());
        b[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        let sh = |name: u32, flags: u64, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&1u32.to_le_bytes());
            h[8..16].copy_from_slice(&flags.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            h
        };
        let headers = [
            vec![0u8; 64],
            sh(1, 0, n_off, names.len()),
            sh(11, SHF_EXECINSTR, t_off, text.len()),
            sh(22, 0, m_off, modinfo.len()),
        ];
        for h in headers {
            b.extend_from_slice(&h);
        }
        b
    }

    #[test]
    fn reads_module_depends() {
        let elf = sample(
            62,
            &[],
            b"license=GPL\0depends=virtio,virtio_ring\0vermagic=x\0",
        );
        assert_eq!(module_depends(&elf).unwrap(), ["virtio", "virtio_ring"]);
        let none = sample(62, &[], b"depends=\0");
        assert!(module_depends(&none).unwrap().is_empty());
    }

    #[test]
    fn finds_helper_calls_in_an_embedded_object() {
        let mut text = Vec::new();
        // ld_imm64 whose second slot looks like a call, a helper call 158, a bpf-to-bpf call.
        text.extend_from_slice(&[0x18, 0x01, 0, 0, 0, 0, 0, 0]);
        text.extend_from_slice(&[0x85, 0x00, 0, 0, 7, 0, 0, 0]);
        text.extend_from_slice(&[0x85, 0x00, 0, 0, 158, 0, 0, 0]);
        text.extend_from_slice(&[0x85, 0x10, 0, 0, 3, 0, 0, 0]);
        text.extend_from_slice(&[0x95, 0, 0, 0, 0, 0, 0, 0]);
        let obj = sample(EM_BPF, &text, b"");
        let mut host = b"padding\x7fELFnot-really".to_vec();
        host.extend_from_slice(&obj);
        host.extend_from_slice(b"trailing bytes");
        let found = embedded_bpf_object(&host).expect("embedded object");
        assert_eq!(found, &obj[..]);
        let calls = bpf_helper_calls(found).unwrap();
        assert_eq!(calls["tracepoint"], BTreeSet::from([158]));
        assert!(embedded_bpf_object(&sample(62, &text, b"")).is_none());
    }
}
