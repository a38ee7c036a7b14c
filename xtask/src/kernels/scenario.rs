//! The scenario every kernel of the matrix runs: a list of steps, each a process the guest
//! starts and the events the agent must have written about that process. The guest runs the
//! steps and records each one's pid; the host checks the expectations on the NDJSON the
//! agent wrote. Adding a case is adding a `Step` to `steps` (and, for a new kind of event, an
//! `Expect` variant with its check).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What the guest set up before the steps run; the host rebuilds the same steps from it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ctx {
    /// The test actor binary (`cw-actor`).
    pub actor: String,
    /// The watched secret (absolute path on a guest tmpfs) and its (dev, inode).
    pub secret: String,
    pub secret_dev: u64,
    pub secret_ino: u64,
    /// A symlink to the secret.
    pub link: String,
    /// A TCP listener on 127.0.0.1 the guest keeps accepting on.
    pub tcp_port: u16,
    /// A 32-bit (`gcc -m32`) program that opens its first argument, waits its second
    /// (ms), and opens it again.
    pub ia32_reader: String,
}

pub struct Step {
    pub name: &'static str,
    pub argv: Vec<String>,
    pub expect: Vec<Expect>,
}

/// An expectation about the events of one step's process (matched by `process.tgid`).
pub enum Expect {
    /// Exactly one `secret_read` of the watched secret, with its dev/inode and the name as
    /// the process passed it.
    SecretRead { opened_as: String },
    /// At least one `secret_read` of the watched secret, each with this `syscall` (when
    /// given) and `abi`: opens the name of which the process did not pass in a syscall.
    SecretReadVia {
        syscall: Option<&'static str>,
        abi: &'static str,
    },
    /// An `exec` whose environment held a credential variable `name` (fingerprinted).
    EnvCredential { name: &'static str },
    /// A `connect` to 127.0.0.1:`port` over `proto` with `result`.
    Connect {
        port: u16,
        proto: &'static str,
        result: &'static str,
    },
    /// An `exec` of `filename`.
    Exec { filename: String },
    /// A `priv_change` via the given syscall to uid `new_uid`.
    PrivChange { via: &'static str, new_uid: u32 },
    /// No event of this kind.
    NoEvent { kind: &'static str },
}

pub fn steps(c: &Ctx) -> Vec<Step> {
    let actor = |args: &[&str]| {
        std::iter::once(c.actor.clone())
            .chain(args.iter().map(|s| s.to_string()))
            .collect::<Vec<_>>()
    };
    let via_proc = format!("/proc/self/root{}", c.secret);
    let tcp = format!("127.0.0.1:{}", c.tcp_port);
    vec![
        Step {
            name: "open secret by absolute path",
            argv: actor(&["open", &c.secret]),
            expect: vec![Expect::SecretRead {
                opened_as: c.secret.clone(),
            }],
        },
        Step {
            name: "open secret through a symlink",
            argv: actor(&["open", &c.link]),
            expect: vec![Expect::SecretRead {
                opened_as: c.link.clone(),
            }],
        },
        Step {
            name: "open secret via /proc/self/root",
            argv: actor(&["open", &via_proc]),
            expect: vec![Expect::SecretRead {
                opened_as: via_proc.clone(),
            }],
        },
        Step {
            name: "open secret through io_uring (io-wq worker)",
            argv: actor(&["uring-open", &c.secret, "async"]),
            expect: vec![Expect::SecretReadVia {
                syscall: Some("io_uring_openat"),
                abi: "native",
            }],
        },
        Step {
            name: "open secret from a 32-bit process",
            // 1.5 s apart: with the syscall hooks the ia32 probe attaches at this exec, so
            // the second open is the one seen; with file_open both are.
            argv: vec![c.ia32_reader.clone(), c.secret.clone(), "1500".into()],
            expect: vec![Expect::SecretReadVia {
                syscall: None,
                abi: "ia32",
            }],
        },
        Step {
            name: "credential in the environment",
            argv: vec![
                "/usr/bin/env".into(),
                "AWS_SECRET_ACCESS_KEY=fakeKernelMatrixSecretKey000000000000000".into(),
                c.actor.clone(),
                "sleep".into(),
                "0".into(),
            ],
            expect: vec![Expect::EnvCredential {
                name: "AWS_SECRET_ACCESS_KEY",
            }],
        },
        Step {
            name: "TCP connect to a local listener",
            argv: actor(&["connect", "tcp", &tcp]),
            expect: vec![
                Expect::Connect {
                    port: c.tcp_port,
                    proto: "tcp",
                    result: "ok",
                },
                Expect::NoEvent {
                    kind: "secret_read",
                },
            ],
        },
        Step {
            name: "exec",
            // as-user 0 keeps root and execs in place: the exec is the actor's own pid.
            argv: actor(&["as-user", "0", "/bin/true"]),
            expect: vec![Expect::Exec {
                filename: "/bin/true".into(),
            }],
        },
        Step {
            name: "setuid change",
            argv: actor(&["setuid", "65534"]),
            expect: vec![Expect::PrivChange {
                via: "setresuid",
                new_uid: 65534,
            }],
        },
    ]
}

impl Expect {
    pub fn describe(&self) -> String {
        match self {
            Expect::SecretRead { opened_as } => format!("one secret_read as {opened_as}"),
            Expect::SecretReadVia { syscall, abi } => format!(
                "secret_read via {} abi {abi}",
                syscall.unwrap_or("any open")
            ),
            Expect::EnvCredential { name } => format!("exec with {name} fingerprinted"),
            Expect::Connect {
                port,
                proto,
                result,
            } => format!("connect {proto} 127.0.0.1:{port} {result}"),
            Expect::Exec { filename } => format!("exec {filename}"),
            Expect::PrivChange { via, new_uid } => format!("priv_change {via} → uid {new_uid}"),
            Expect::NoEvent { kind } => format!("no {kind}"),
        }
    }

    /// Checks `events` (all events of the step's process) against this expectation.
    pub fn check(&self, c: &Ctx, events: &[&Value]) -> Result<(), String> {
        let of = |kind: &str| -> Vec<&Value> {
            events
                .iter()
                .copied()
                .filter(|e| e["kind"] == kind)
                .collect()
        };
        match self {
            Expect::SecretRead { opened_as } => {
                let reads = of("secret_read");
                if reads.len() != 1 {
                    return Err(format!("{} secret_read events, want 1", reads.len()));
                }
                let s = &reads[0]["secret"];
                let mut bad = Vec::new();
                if s["inode"] != c.secret_ino {
                    bad.push(format!("inode {} want {}", s["inode"], c.secret_ino));
                }
                if s["dev"] != c.secret_dev {
                    bad.push(format!("dev {} want {}", s["dev"], c.secret_dev));
                }
                if s["opened_as"] != opened_as.as_str() {
                    bad.push(format!("opened_as {} want {opened_as}", s["opened_as"]));
                }
                if s["path"] != c.secret.as_str() {
                    bad.push(format!("path {} want {}", s["path"], c.secret));
                }
                if bad.is_empty() {
                    Ok(())
                } else {
                    Err(bad.join(", "))
                }
            }
            Expect::SecretReadVia { syscall, abi } => {
                let reads = of("secret_read");
                if reads.is_empty() {
                    return Err("no secret_read".into());
                }
                for r in &reads {
                    let s = &r["secret"];
                    let ok = s["inode"] == c.secret_ino
                        && s["dev"] == c.secret_dev
                        && syscall.is_none_or(|v| s["syscall"] == v)
                        && s["abi"].as_str().unwrap_or("native") == *abi;
                    if !ok {
                        return Err(format!("secret_read seen: {}", brief(&reads, &["secret"])));
                    }
                }
                Ok(())
            }
            Expect::EnvCredential { name } => {
                let all = of("exec");
                let hit = all.iter().any(|e| {
                    e["exec"]["env_credentials"]
                        .as_array()
                        .is_some_and(|v| v.iter().any(|c| c["name"] == *name))
                });
                if hit {
                    Ok(())
                } else {
                    Err(format!("exec events seen: {}", brief(&all, &["exec"])))
                }
            }
            Expect::Connect {
                port,
                proto,
                result,
            } => {
                let all = of("connect");
                let hit = all.iter().any(|e| {
                    e["dst"]["ip"] == "127.0.0.1"
                        && e["dst"]["port"] == *port
                        && e["dst"]["proto"] == *proto
                        && e["result"] == *result
                });
                if hit {
                    Ok(())
                } else {
                    Err(format!(
                        "connect events seen: {}",
                        brief(&all, &["dst", "result"])
                    ))
                }
            }
            Expect::Exec { filename } => {
                let all = of("exec");
                if all
                    .iter()
                    .any(|e| e["exec"]["filename"] == filename.as_str())
                {
                    Ok(())
                } else {
                    Err(format!("exec events seen: {}", brief(&all, &["exec"])))
                }
            }
            Expect::PrivChange { via, new_uid } => {
                let all = of("priv_change");
                let hit = all.iter().any(|e| {
                    e["priv_change"]["via"] == *via && e["priv_change"]["new_uid"] == *new_uid
                });
                if hit {
                    Ok(())
                } else {
                    Err(format!(
                        "priv_change events seen: {}",
                        brief(&all, &["priv_change"])
                    ))
                }
            }
            Expect::NoEvent { kind } => {
                let all = of(kind);
                if all.is_empty() {
                    Ok(())
                } else {
                    Err(format!("{} {kind} events", all.len()))
                }
            }
        }
    }
}

fn brief(events: &[&Value], fields: &[&str]) -> String {
    if events.is_empty() {
        return "none".into();
    }
    events
        .iter()
        .map(|e| {
            fields
                .iter()
                .map(|f| e[*f].to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The events of one process.
pub fn of_tgid(events: &[Value], tgid: u32) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| e["process"]["tgid"] == tgid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Ctx {
        Ctx {
            actor: "/a/cw-actor".into(),
            secret: "/tmp/cw/secret/token".into(),
            secret_dev: 22,
            secret_ino: 7,
            link: "/tmp/cw/link".into(),
            tcp_port: 4000,
            ia32_reader: "/a/reader32".into(),
        }
    }

    fn read(ino: u64, opened_as: &str) -> Value {
        json!({"kind":"secret_read","process":{"tgid":5},
               "secret":{"path":"/tmp/cw/secret/token","opened_as":opened_as,"dev":22,"inode":ino}})
    }

    #[test]
    fn secret_read_needs_exactly_one_with_the_right_inode() {
        let c = ctx();
        let e = Expect::SecretRead {
            opened_as: "/tmp/cw/link".into(),
        };
        let good = read(7, "/tmp/cw/link");
        assert!(e.check(&c, &[&good]).is_ok());
        let wrong_ino = read(8, "/tmp/cw/link");
        assert!(e.check(&c, &[&wrong_ino]).unwrap_err().contains("inode"));
        assert!(e.check(&c, &[&good, &good]).is_err());
        assert!(e.check(&c, &[]).is_err());
        let wrong_name = read(7, "/tmp/cw/secret/token");
        assert!(e.check(&c, &[&wrong_name]).is_err());
    }

    #[test]
    fn connect_exec_priv_and_absence() {
        let c = ctx();
        let conn = json!({"kind":"connect","dst":{"ip":"127.0.0.1","port":4000,"proto":"tcp"},"result":"ok"});
        let refused = json!({"kind":"connect","dst":{"ip":"127.0.0.1","port":4000,"proto":"tcp"},"result":"refused"});
        let e = Expect::Connect {
            port: 4000,
            proto: "tcp",
            result: "ok",
        };
        assert!(e.check(&c, &[&conn]).is_ok());
        assert!(e.check(&c, &[&refused]).is_err());
        let exec = json!({"kind":"exec","exec":{"filename":"/bin/true"}});
        assert!(
            Expect::Exec {
                filename: "/bin/true".into()
            }
            .check(&c, &[&exec])
            .is_ok()
        );
        assert!(
            Expect::Exec {
                filename: "/bin/false".into()
            }
            .check(&c, &[&exec])
            .is_err()
        );
        let p = json!({"kind":"priv_change","priv_change":{"via":"setresuid","new_uid":65534}});
        let e = Expect::PrivChange {
            via: "setresuid",
            new_uid: 65534,
        };
        assert!(e.check(&c, &[&p]).is_ok());
        assert!(e.check(&c, &[&exec]).is_err());
        let none = Expect::NoEvent {
            kind: "secret_read",
        };
        assert!(none.check(&c, &[&conn]).is_ok());
        assert!(none.check(&c, &[&read(7, "x")]).is_err());
    }

    #[test]
    fn reads_by_io_uring_and_ia32_and_environment_credentials() {
        let c = ctx();
        let uring = Expect::SecretReadVia {
            syscall: Some("io_uring_openat"),
            abi: "native",
        };
        let mut r = read(7, "token");
        r["secret"]["syscall"] = json!("io_uring_openat");
        assert!(uring.check(&c, &[&r]).is_ok());
        assert!(uring.check(&c, &[]).is_err());
        let mut plain = read(7, "/tmp/cw/secret/token");
        plain["secret"]["syscall"] = json!("openat");
        assert!(uring.check(&c, &[&r, &plain]).is_err());
        let ia32 = Expect::SecretReadVia {
            syscall: None,
            abi: "ia32",
        };
        assert!(ia32.check(&c, &[&plain]).is_err());
        plain["secret"]["abi"] = json!("ia32");
        assert!(ia32.check(&c, &[&plain]).is_ok());
        let env = Expect::EnvCredential {
            name: "AWS_SECRET_ACCESS_KEY",
        };
        let exec = json!({"kind":"exec","exec":{"filename":"/a/cw-actor",
            "env_credentials":[{"name":"AWS_SECRET_ACCESS_KEY","kind":"aws_access_key"}]}});
        assert!(env.check(&c, &[&exec]).is_ok());
        let bare = json!({"kind":"exec","exec":{"filename":"/a/cw-actor"}});
        assert!(env.check(&c, &[&bare]).is_err());
    }

    #[test]
    fn every_step_expects_something() {
        for s in steps(&ctx()) {
            assert!(!s.expect.is_empty(), "{} expects nothing", s.name);
        }
    }
}
