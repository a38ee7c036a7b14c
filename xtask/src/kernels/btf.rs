//! Just enough of the BTF format to find a kernel type by name (an LSM hook, a function to
//! fentry) and to name helper ids (`enum bpf_func_id`).

use anyhow::{Result, bail};

pub const KIND_ENUM: u32 = 6;

pub struct Btf {
    data: Vec<u8>,
    strings: usize,
    strings_len: usize,
    /// (name offset, kind, offset of the type record) for type ids 1…
    types: Vec<(u32, u32, usize)>,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

impl Btf {
    pub fn open(path: &str) -> Result<Btf> {
        Btf::parse(std::fs::read(path)?)
    }

    pub fn parse(data: Vec<u8>) -> Result<Btf> {
        if data.len() < 24 || data[0..2] != [0x9f, 0xeb] {
            bail!("not little-endian BTF");
        }
        let field = |i: usize| u32_at(&data, 4 + 4 * i).unwrap_or(0) as usize;
        let (hdr_len, type_off, type_len, str_off, str_len) =
            (field(0), field(1), field(2), field(3), field(4));
        let start = hdr_len + type_off;
        let end = start + type_len;
        if end > data.len() || hdr_len + str_off + str_len > data.len() {
            bail!("BTF sections run past the end");
        }
        let mut types = Vec::new();
        let mut off = start;
        while off + 12 <= end {
            let name = u32_at(&data, off).unwrap_or(0);
            let info = u32_at(&data, off + 4).unwrap_or(0);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let extra = match kind {
                1 | 14 | 17 => 4,          // int, var, decl_tag
                3 => 12,                   // array
                4 | 5 => 12 * vlen,        // struct, union
                6 => 8 * vlen,             // enum
                13 => 8 * vlen,            // func_proto
                15 => 12 * vlen,           // datasec
                19 => 12 * vlen,           // enum64
                2 | 7..=12 | 16 | 18 => 0, // ptr, fwd, typedef, cv, func, float, type_tag
                k => bail!("unknown BTF kind {k} at offset {off}"),
            };
            types.push((name, kind, off));
            off += 12 + extra;
        }
        Ok(Btf {
            strings: hdr_len + str_off,
            strings_len: str_len,
            data,
            types,
        })
    }

    fn str_at(&self, off: u32) -> &str {
        let off = off as usize;
        if off >= self.strings_len {
            return "";
        }
        let s = &self.data[self.strings + off..self.strings + self.strings_len];
        let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
        std::str::from_utf8(&s[..end]).unwrap_or("")
    }

    /// The name of type `id`.
    pub fn name_of(&self, id: u32) -> Option<&str> {
        let &(n, _, _) = self.types.get((id as usize).checked_sub(1)?)?;
        Some(self.str_at(n)).filter(|s| !s.is_empty())
    }

    /// The id of the first type of `kind` named `name`.
    pub fn find(&self, name: &str, kind: u32) -> Option<u32> {
        self.types
            .iter()
            .position(|&(n, k, _)| k == kind && self.str_at(n) == name)
            .map(|i| i as u32 + 1)
    }

    /// Members of the enum named `name` as (name, value).
    pub fn enum_members(&self, name: &str) -> Vec<(String, i64)> {
        let Some(id) = self.find(name, KIND_ENUM) else {
            return Vec::new();
        };
        let off = self.types[id as usize - 1].2;
        let vlen = (u32_at(&self.data, off + 4).unwrap_or(0) & 0xffff) as usize;
        (0..vlen)
            .filter_map(|i| {
                let m = off + 12 + 8 * i;
                let n = u32_at(&self.data, m)?;
                let v = u32_at(&self.data, m + 4)? as i32;
                Some((self.str_at(n).to_owned(), i64::from(v)))
            })
            .collect()
    }
}

/// Helper names by id from a kernel's `enum bpf_func_id` (`BPF_FUNC_get_current_task_btf`
/// → `bpf_get_current_task_btf`).
pub fn helper_names(btf: &Btf) -> std::collections::BTreeMap<u32, String> {
    btf.enum_members("bpf_func_id")
        .into_iter()
        .filter_map(|(n, v)| {
            let short = n.strip_prefix("BPF_FUNC_")?;
            (short != "unspec" && !short.starts_with("__"))
                .then(|| (v as u32, format!("bpf_{short}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF blob with an int, a func named `f` and `enum bpf_func_id { BPF_FUNC_unspec,
    /// BPF_FUNC_map_lookup_elem }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0int\0f\0bpf_func_id\0BPF_FUNC_unspec\0BPF_FUNC_map_lookup_elem\0";
        let mut types = Vec::new();
        let mut ty = |name: u32, kind: u32, vlen: u32, size: u32, extra: &[u32]| {
            for v in [name, (kind << 24) | vlen, size].iter().chain(extra) {
                types.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(1, 1, 0, 4, &[32]); // int
        ty(5, 12, 0, 0, &[]); // func f (type 0 is fine for the lookup)
        ty(7, 6, 2, 4, &[19, 0, 35, 1]); // enum
        let mut out = vec![0x9f, 0xeb, 1, 0];
        for v in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_types_and_helper_names() {
        let btf = Btf::parse(sample()).unwrap();
        assert_eq!(btf.find("f", 12), Some(2));
        assert_eq!(btf.find("f", 1), None);
        assert_eq!(btf.find("int", 1), Some(1));
        assert_eq!(btf.name_of(2), Some("f"));
        assert_eq!(btf.name_of(0), None);
        assert_eq!(btf.name_of(9), None);
        let names = helper_names(&btf);
        assert_eq!(
            names.get(&1).map(String::as_str),
            Some("bpf_map_lookup_elem")
        );
        assert!(!names.contains_key(&0));
    }

    #[test]
    fn rejects_garbage() {
        assert!(Btf::parse(vec![0; 10]).is_err());
        let mut b = sample();
        b[8] = 0xff; // type_off past the end
        assert!(Btf::parse(b).is_err());
    }
}
