//! Ring-buffer bytes → typed probe records. The only place that looks at raw layouts.

use std::mem::size_of;

use credwatch_common as c;

#[derive(Clone, Debug)]
pub enum Record {
    Exec(c::Exec),
    Exit(c::Exit),
    SecretOpen(c::SecretOpen),
    Connect(c::Connect),
    PrivChange(c::PrivChange),
    /// Boxed: a DNS payload dwarfs the other records, and answers are rare.
    Dns(Box<c::Dns>),
}

impl Record {
    pub fn header(&self) -> &c::Header {
        match self {
            Record::Exec(r) => &r.hdr,
            Record::Exit(r) => &r.hdr,
            Record::SecretOpen(r) => &r.hdr,
            Record::Connect(r) => &r.hdr,
            Record::PrivChange(r) => &r.hdr,
            Record::Dns(r) => &r.hdr,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Short { kind: u32, len: usize, want: usize },
    UnknownKind(u32),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeError::Short { kind, len, want } => {
                write!(f, "record kind {kind} is {len} bytes, expected {want}")
            }
            DecodeError::UnknownKind(k) => write!(f, "unknown record kind {k}"),
        }
    }
}

fn read<T: Copy>(buf: &[u8], kind: u32) -> Result<T, DecodeError> {
    let want = size_of::<T>();
    if buf.len() < want {
        return Err(DecodeError::Short {
            kind,
            len: buf.len(),
            want,
        });
    }
    // SAFETY: length checked; T is a #[repr(C)] plain-old-data record valid for any bytes.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

pub fn decode(buf: &[u8]) -> Result<Record, DecodeError> {
    if buf.len() < 4 {
        return Err(DecodeError::Short {
            kind: 0,
            len: buf.len(),
            want: 4,
        });
    }
    let kind = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let Some(k) = c::RecordKind::from_u32(kind) else {
        return Err(DecodeError::UnknownKind(kind));
    };
    Ok(match k {
        c::RecordKind::Exec => Record::Exec(read(buf, kind)?),
        c::RecordKind::Exit => Record::Exit(read(buf, kind)?),
        c::RecordKind::SecretOpen => Record::SecretOpen(read(buf, kind)?),
        c::RecordKind::Connect => Record::Connect(read(buf, kind)?),
        c::RecordKind::PrivChange => Record::PrivChange(read(buf, kind)?),
        c::RecordKind::Dns => Record::Dns(Box::new(read(buf, kind)?)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a POD value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_by_kind_and_rejects_short_or_unknown() {
        let mut rec = c::Exit {
            hdr: c::Header::default(),
            exit_code: 3,
            _pad: 0,
        };
        rec.hdr.kind = c::RecordKind::Exit as u32;
        rec.hdr.tgid = 42;
        let b = bytes_of(&rec);
        match decode(&b).unwrap() {
            Record::Exit(e) => {
                assert_eq!(e.exit_code, 3);
                assert_eq!(e.hdr.tgid, 42);
            }
            other => panic!("wrong record {other:?}"),
        }
        assert!(matches!(decode(&b[..10]), Err(DecodeError::Short { .. })));
        let mut bad = b.clone();
        bad[0] = 99;
        assert_eq!(decode(&bad).unwrap_err(), DecodeError::UnknownKind(99));
        assert!(decode(&[]).is_err());
    }
}
