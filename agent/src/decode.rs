//! Ring-buffer bytes → typed probe records. The only place that looks at raw layouts, and
//! the only place that sees a process's environment and command line: credentials in them
//! are fingerprinted here and the bytes are wiped before the record moves on.

use std::mem::size_of;

use credwatch_common as c;
use zeroize::Zeroize;

use crate::{
    credential::Fingerprinter,
    environ::{redact_command_line, scan_environment},
    event::ExposedCredential,
};

/// An exec with what its environment and command line held, minus the values.
#[derive(Clone, Debug)]
pub struct ExecRecord {
    pub fixed: c::ExecFixed,
    pub env_credentials: Vec<ExposedCredential>,
    pub argv: Vec<String>,
    pub argv_credentials: Vec<ExposedCredential>,
}

#[derive(Clone, Debug)]
pub enum Record {
    Exec(Box<ExecRecord>),
    Exit(c::Exit),
    SecretOpen(c::SecretOpen),
    Connect(c::Connect),
    UnixConnect(c::UnixConnect),
    PrivChange(c::PrivChange),
    /// Boxed: a DNS payload dwarfs the other records, and answers are rare.
    Dns(Box<c::Dns>),
    ProcessAccess(c::ProcessAccess),
    IoUringComplete(c::IoUringComplete),
    MetadataRequest(Box<c::MetadataRequest>),
    /// Not from the ring: opens the probe counted after its last record for (process,
    /// secret), read from its map when the process went quiet or exited.
    Repeats {
        key: c::RepeatKey,
        opens: u64,
        hdr: c::Header,
    },
}

impl Record {
    pub fn header(&self) -> &c::Header {
        match self {
            Record::Exec(r) => &r.fixed.hdr,
            Record::Exit(r) => &r.hdr,
            Record::SecretOpen(r) => &r.hdr,
            Record::Connect(r) => &r.hdr,
            Record::UnixConnect(r) => &r.hdr,
            Record::PrivChange(r) => &r.hdr,
            Record::Dns(r) => &r.hdr,
            Record::ProcessAccess(r) => &r.hdr,
            Record::IoUringComplete(r) => &r.hdr,
            Record::MetadataRequest(r) => &r.hdr,
            Record::Repeats { hdr, .. } => hdr,
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

/// `fp` fingerprints what exec records expose (the fleet key, as for secret files).
pub fn decode(buf: &[u8], fp: &Fingerprinter) -> Result<Record, DecodeError> {
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
        c::RecordKind::Exec => Record::Exec(Box::new(exec(buf, fp)?)),
        c::RecordKind::Exit => Record::Exit(read(buf, kind)?),
        c::RecordKind::SecretOpen => Record::SecretOpen(read(buf, kind)?),
        c::RecordKind::Connect => Record::Connect(read(buf, kind)?),
        c::RecordKind::UnixConnect => Record::UnixConnect(read(buf, kind)?),
        c::RecordKind::PrivChange => Record::PrivChange(read(buf, kind)?),
        c::RecordKind::Dns => Record::Dns(Box::new(read(buf, kind)?)),
        c::RecordKind::ProcessAccess => Record::ProcessAccess(read(buf, kind)?),
        c::RecordKind::IoUringComplete => Record::IoUringComplete(read(buf, kind)?),
        c::RecordKind::MetadataRequest => Record::MetadataRequest(Box::new(read(buf, kind)?)),
    })
}

/// The fixed part, then the environment and command line it announces (never trusting the
/// announced lengths beyond the bytes the record has).
fn exec(buf: &[u8], fp: &Fingerprinter) -> Result<ExecRecord, DecodeError> {
    let fixed: c::ExecFixed = read(buf, c::RecordKind::Exec as u32)?;
    let rest = &buf[size_of::<c::ExecFixed>()..];
    let env_len = (fixed.env_len as usize).min(rest.len());
    let argv_len = (fixed.argv_len as usize).min(rest.len() - env_len);
    // A private copy to parse and wipe: the ring's own bytes are the kernel's to reuse.
    let mut env = rest[..env_len].to_vec();
    let mut argv = rest[env_len..env_len + argv_len].to_vec();
    let truncated = fixed.flags & c::FLAG_ENV_TRUNCATED != 0;
    let env_credentials = scan_environment(&env, fp, truncated);
    let (args, argv_credentials) = redact_command_line(&argv, fp);
    env.zeroize();
    argv.zeroize();
    Ok(ExecRecord {
        fixed,
        env_credentials,
        argv: args,
        argv_credentials,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a POD value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn fp() -> Fingerprinter {
        Fingerprinter::new(b"decode-test-key-000000000000000000")
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
        match decode(&b, &fp()).unwrap() {
            Record::Exit(e) => {
                assert_eq!(e.exit_code, 3);
                assert_eq!(e.hdr.tgid, 42);
            }
            other => panic!("wrong record {other:?}"),
        }
        assert!(matches!(
            decode(&b[..10], &fp()),
            Err(DecodeError::Short { .. })
        ));
        let mut bad = b.clone();
        bad[0] = 99;
        assert_eq!(
            decode(&bad, &fp()).unwrap_err(),
            DecodeError::UnknownKind(99)
        );
        assert!(decode(&[], &fp()).is_err());
    }

    #[test]
    fn exec_environment_is_fingerprinted_and_lengths_are_not_trusted() {
        let secret = b"AWS_SECRET_ACCESS_KEY=fakeSecretKeyDoNotUse+EXAMPLE/0000000000\0HOME=/\0";
        let argv = b"app\0--token\0FAKE-ARGV-TOKEN\0";
        // SAFETY: an all-zero ExecFixed is a valid value.
        let mut fixed: c::ExecFixed = unsafe { std::mem::zeroed() };
        fixed.hdr.kind = c::RecordKind::Exec as u32;
        fixed.env_len = secret.len() as u32;
        fixed.argv_len = argv.len() as u32;
        let mut b = bytes_of(&fixed);
        b.extend_from_slice(secret);
        b.extend_from_slice(argv);
        let Record::Exec(r) = decode(&b, &fp()).unwrap() else {
            panic!()
        };
        assert_eq!(r.env_credentials.len(), 1);
        assert_eq!(r.argv_credentials.len(), 1);
        assert_eq!(r.argv[..2], ["app", "--token"]);
        assert!(!format!("{r:?}").contains("fakeSecretKey"));
        assert!(!format!("{r:?}").contains("FAKE-ARGV"));
        // Lengths beyond the record: clamped, no panic.
        fixed.env_len = u32::MAX;
        fixed.argv_len = u32::MAX;
        let mut b = bytes_of(&fixed);
        b.extend_from_slice(b"A=B\0");
        assert!(decode(&b, &fp()).is_ok());
    }
}
