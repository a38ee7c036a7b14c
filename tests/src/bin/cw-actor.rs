//! The process the integration tests observe: performs exactly one kind of syscall sequence
//! (open a path in a given way, connect, change ids…) so each test knows which pid did what.
//! Prints a one-line result on stdout; exits non-zero on failure.

use std::{
    ffi::CString,
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::process::CommandExt,
    path::Path,
    process::Command,
    time::Duration,
};

fn cstr(s: &str) -> CString {
    CString::new(s).expect("argument contains NUL")
}

fn fail(msg: String) -> ! {
    eprintln!("cw-actor: {msg}");
    std::process::exit(1)
}

fn check(fd: i32, what: &str) -> i32 {
    if fd < 0 {
        fail(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    fd
}

fn read_close(fd: i32) {
    let mut b = [0u8; 1];
    // SAFETY: valid fd and buffer.
    unsafe {
        libc::read(fd, b.as_mut_ptr().cast(), 1);
        libc::close(fd);
    }
}

/// Steps are separated by `+`: `cw-actor join-cgroup DIR + open PATH + connect tcp ADDR`.
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    for step in a.split(|s| *s == "+") {
        run(step);
    }
}

fn run(a: &[&str]) {
    match a {
        ["open", path] => {
            // SAFETY: plain syscalls with valid C strings.
            let fd = check(
                unsafe { libc::open(cstr(path).as_ptr(), libc::O_RDONLY) },
                "open",
            );
            read_close(fd);
            println!("opened {path}");
        }
        ["open-rel", dir, name] => {
            std::env::set_current_dir(dir).unwrap_or_else(|e| fail(format!("chdir {dir}: {e}")));
            let fd = check(
                unsafe { libc::open(cstr(name).as_ptr(), libc::O_RDONLY) },
                "open",
            );
            read_close(fd);
        }
        ["openat", dir, name] => {
            let dfd = check(
                unsafe { libc::open(cstr(dir).as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) },
                "open dir",
            );
            let fd = check(
                unsafe { libc::openat(dfd, cstr(name).as_ptr(), libc::O_RDONLY) },
                "openat",
            );
            read_close(fd);
        }
        ["openat2", path] => {
            #[repr(C)]
            struct OpenHow {
                flags: u64,
                mode: u64,
                resolve: u64,
            }
            let how = OpenHow {
                flags: libc::O_RDONLY as u64,
                mode: 0,
                resolve: 0,
            };
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    libc::AT_FDCWD,
                    cstr(path).as_ptr(),
                    &how as *const OpenHow,
                    std::mem::size_of::<OpenHow>(),
                )
            } as i32;
            read_close(check(fd, "openat2"));
        }
        ["flood", path, n] => {
            let n: u64 = n.parse().unwrap_or_else(|_| fail(format!("bad count {n}")));
            let p = cstr(path);
            for _ in 0..n {
                let fd = check(unsafe { libc::open(p.as_ptr(), libc::O_RDONLY) }, "open");
                unsafe { libc::close(fd) };
            }
            println!("flooded {n}");
        }
        ["forks", n] => {
            // A fork flood: n children that exit at once.
            let n: u64 = n.parse().unwrap_or_else(|_| fail(format!("bad count {n}")));
            for _ in 0..n {
                // SAFETY: the child only calls _exit.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    unsafe { libc::_exit(0) };
                }
                check(pid, "fork");
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            }
            println!("forked {n}");
        }
        ["connect", proto, addr] => {
            let addr: SocketAddr = addr
                .parse()
                .unwrap_or_else(|e| fail(format!("bad address {addr}: {e}")));
            let res = match *proto {
                "tcp" => TcpStream::connect(addr).map(|_| ()),
                // std's connect_timeout is a non-blocking connect + poll.
                "tcp-nonblocking" => {
                    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|_| ())
                }
                "udp" => {
                    let bind: SocketAddr = if addr.is_ipv6() {
                        "[::]:0"
                    } else {
                        "0.0.0.0:0"
                    }
                    .parse()
                    .unwrap();
                    UdpSocket::bind(bind).and_then(|s| s.connect(addr))
                }
                _ => fail(format!("unknown protocol {proto}")),
            };
            match res {
                Ok(()) => println!("connected"),
                Err(e) => println!("error {e}"),
            }
        }
        ["dns", server, name] => {
            let server: SocketAddr = server
                .parse()
                .unwrap_or_else(|e| fail(format!("bad server: {e}")));
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| fail(format!("bind: {e}")));
            sock.set_read_timeout(Some(Duration::from_secs(3))).ok();
            let mut q = simple_dns::Packet::new_query(0x4242);
            q.questions.push(simple_dns::Question::new(
                simple_dns::Name::new_unchecked(name),
                simple_dns::TYPE::A.into(),
                simple_dns::CLASS::IN.into(),
                false,
            ));
            // Unconnected send: what the sendmsg hook sees.
            sock.send_to(&q.build_bytes_vec().unwrap(), server)
                .unwrap_or_else(|e| fail(format!("send: {e}")));
            let mut buf = [0u8; 1500];
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| fail(format!("no DNS answer: {e}")));
            println!("answer {n} bytes");
        }
        ["join-cgroup", dir] => {
            let procs = Path::new(dir).join("cgroup.procs");
            std::fs::write(&procs, std::process::id().to_string())
                .unwrap_or_else(|e| fail(format!("joining {}: {e}", procs.display())));
        }
        ["as-user", uid, prog, rest @ ..] => {
            let uid: u32 = uid.parse().unwrap_or_else(|_| fail("bad uid".into()));
            // SAFETY: dropping privileges before exec.
            unsafe {
                check(libc::setgid(uid), "setgid");
                check(libc::setuid(uid), "setuid");
            }
            let err = Command::new(prog).args(rest).exec();
            fail(format!("exec {prog}: {err}"));
        }
        ["setuid", uid] => {
            let uid: u32 = uid.parse().unwrap_or_else(|_| fail("bad uid".into()));
            check(unsafe { libc::setresuid(uid, uid, uid) }, "setresuid");
            println!("uid now {uid}");
        }
        ["ids"] => {
            // SAFETY: trivial getters.
            let (u, e) = unsafe { (libc::getuid(), libc::geteuid()) };
            println!("uid={u} euid={e}");
        }
        ["sleep", ms] => std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0))),
        ["open-hex", hexpath] => {
            // A path given as hex bytes, so tests can use non-UTF-8 names.
            let bytes = hex_decode(hexpath);
            let p = CString::new(bytes).unwrap_or_else(|_| fail("NUL in path".into()));
            let fd = check(unsafe { libc::open(p.as_ptr(), libc::O_RDONLY) }, "open");
            read_close(fd);
        }
        _ => fail(format!("unknown command {a:?}")),
    }
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| fail("bad hex".into())))
        .collect()
}
