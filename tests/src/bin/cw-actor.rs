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
        if step == ["fork"] {
            // The steps after this one run in a child forked without exec (a pre-fork
            // worker); the parent waits for it and prints its pid.
            // SAFETY: single-threaded here; the child only runs the remaining steps.
            let child = unsafe { libc::fork() };
            check(child, "fork");
            if child > 0 {
                let mut st = 0;
                unsafe { libc::waitpid(child, &mut st, 0) };
                println!("child {child}");
                std::process::exit(if st == 0 { 0 } else { 1 });
            }
            continue;
        }
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
        ["uring-open", path, how] => {
            let fd = uring::open(path, how);
            if *how == "fixed" {
                println!("uring fixed slot {fd}");
            } else {
                read_close(fd);
                println!("uring fd {fd}");
            }
        }
        ["uring-connect", addr] => {
            let addr: SocketAddr = addr
                .parse()
                .unwrap_or_else(|e| fail(format!("bad address {addr}: {e}")));
            println!("uring connect {}", uring::connect(addr));
        }
        ["fastopen", addr] => {
            let addr: SocketAddr = addr
                .parse()
                .unwrap_or_else(|e| fail(format!("bad address {addr}: {e}")));
            let (sa, len) = sockaddr(addr);
            let fd = check(
                unsafe { libc::socket(family(addr), libc::SOCK_STREAM, 0) },
                "socket",
            );
            let msg = b"hello";
            // SAFETY: valid buffers; MSG_FASTOPEN connects and sends in one call.
            let n = unsafe {
                libc::sendto(
                    fd,
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_FASTOPEN,
                    (&raw const sa).cast(),
                    len,
                )
            };
            check(n as i32, "sendto(MSG_FASTOPEN)");
            unsafe { libc::close(fd) };
            println!("fastopen sent {n}");
        }
        ["connect-race", a, b, n] => {
            let a: SocketAddr = a.parse().unwrap_or_else(|_| fail("bad address".into()));
            let b: SocketAddr = b.parse().unwrap_or_else(|_| fail("bad address".into()));
            let n: usize = n.parse().unwrap_or_else(|_| fail("bad count".into()));
            println!("{}", connect_race(a, b, n));
        }
        ["connect-each", host, ports @ ..] => {
            // TCP connects to each port of `host`, twice.
            for p in ports.iter().chain(ports.iter()) {
                let _ = TcpStream::connect(format!("{host}:{p}"));
            }
            println!("connected {}", ports.len());
        }
        ["unix-connect", path] => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => println!("connected"),
            Err(e) => println!("error {e}"),
        },
        ["join-netns", path] => {
            let ns = std::fs::File::open(path).unwrap_or_else(|e| fail(format!("{path}: {e}")));
            // SAFETY: a namespace fd we own.
            check(
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) },
                "setns",
            );
        }
        ["serve-http", addr, n] => {
            let l = std::net::TcpListener::bind(addr)
                .unwrap_or_else(|e| fail(format!("bind {addr}: {e}")));
            println!("listening");
            let n: usize = n.parse().unwrap_or_else(|_| fail("bad count".into()));
            for conn in l.incoming().take(n) {
                let Ok(mut c) = conn else { continue };
                let mut buf = [0u8; 4096];
                let _ = std::io::Read::read(&mut c, &mut buf);
                let _ = std::io::Write::write_all(
                    &mut c,
                    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
                );
            }
        }
        ["exec", prog, rest @ ..] => {
            let err = Command::new(prog).args(rest).exec();
            fail(format!("exec {prog}: {err}"));
        }
        ["read-proc", pid, file] => {
            // /proc/PID/environ or /proc/PID/mem: what a credential thief opens.
            // `self`: the actor's own (no one else's secrets: no event).
            let p = format!("/proc/{pid}/{file}");
            let fd = check(
                unsafe { libc::open(cstr(&p).as_ptr(), libc::O_RDONLY) },
                "open",
            );
            unsafe { libc::close(fd) };
            println!("opened {p}");
        }
        ["vm-readv", pid] => {
            let pid: i32 = pid.parse().unwrap_or_else(|_| fail("bad pid".into()));
            let mut buf = [0u8; 8];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // The first readable mapping of the target: a real read of its memory.
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
                .unwrap_or_else(|e| fail(format!("maps: {e}")));
            let addr = maps
                .lines()
                .find(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .is_some_and(|p| p.starts_with('r'))
                })
                .and_then(|l| l.split('-').next())
                .and_then(|a| usize::from_str_radix(a, 16).ok())
                .unwrap_or_else(|| fail("no readable mapping".into()));
            let remote = libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: buf.len(),
            };
            let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
            println!("process_vm_readv {n}");
        }
        ["ptrace-attach", pid] => {
            let pid: i32 = pid.parse().unwrap_or_else(|_| fail("bad pid".into()));
            let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
            check(r as i32, "ptrace(PTRACE_SEIZE)");
            unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0) };
            println!("seized {pid}");
        }
        ["leader-exits", ms, code] => {
            // The main thread leaves first; the thread group (and the process) lives on.
            let ms: u64 = ms.parse().unwrap_or(0);
            let code: i32 = code.parse().unwrap_or(0);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                println!("last thread exiting");
                std::process::exit(code);
            });
            // SAFETY: SYS_exit ends only the calling thread, with no unwinding.
            unsafe { libc::syscall(libc::SYS_exit, 0) };
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

fn family(a: SocketAddr) -> i32 {
    if a.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    }
}

/// `a` as a C sockaddr (big enough for both families) and its length.
fn sockaddr(a: SocketAddr) -> (libc::sockaddr_in6, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr.
    let mut out: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            let sin = (&raw mut out).cast::<libc::sockaddr_in>();
            unsafe {
                (*sin).sin_family = libc::AF_INET as u16;
                (*sin).sin_port = v4.port().to_be();
                (*sin).sin_addr.s_addr = u32::from(*v4.ip()).to_be();
            }
            (out, std::mem::size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(v6) => {
            out.sin6_family = libc::AF_INET6 as u16;
            out.sin6_port = v6.port().to_be();
            out.sin6_addr.s6_addr = v6.ip().octets();
            (out, std::mem::size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

/// `n` blocking connects from one sockaddr buffer while another thread flips it between `a`
/// and `b` as fast as it can. Prints the port each socket really reached (getpeername), in
/// order: what a monitor reports must be exactly that, whatever the buffer said later.
fn connect_race(a: SocketAddr, b: SocketAddr, n: usize) -> String {
    use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
    static STOP: AtomicBool = AtomicBool::new(false);
    let (sa_a, len) = sockaddr(a);
    let (sa_b, _) = sockaddr(b);
    // The shared buffer: only its port differs between a and b (same address), so the
    // flipper writes one aligned u16 that the kernel copies whole.
    let shared = Box::leak(Box::new(sa_a));
    let port_cell: &'static AtomicU16 =
        // SAFETY: sin_port/sin6_port is an aligned u16 at offset 2 in both layouts.
        unsafe { &*((shared as *mut libc::sockaddr_in6).cast::<u8>().add(2).cast::<AtomicU16>()) };
    let (pa, pb) = (sa_a.sin6_port, sa_b.sin6_port);
    let flipper = std::thread::spawn(move || {
        let mut next = pb;
        while !STOP.load(Ordering::Relaxed) {
            port_cell.store(next, Ordering::Relaxed);
            next = if next == pa { pb } else { pa };
            // Each value stays a little while: a connect can start with either, and see
            // the other by the time it returns.
            for _ in 0..200 {
                std::hint::spin_loop();
            }
        }
    });
    let mut reached = Vec::with_capacity(n);
    for _ in 0..n {
        let fd = check(
            unsafe { libc::socket(family(a), libc::SOCK_STREAM, 0) },
            "socket",
        );
        let r = unsafe { libc::connect(fd, (shared as *const libc::sockaddr_in6).cast(), len) };
        check(r, "connect");
        let mut peer: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut plen = std::mem::size_of::<libc::sockaddr_in6>() as u32;
        check(
            unsafe { libc::getpeername(fd, (&raw mut peer).cast(), &mut plen) },
            "getpeername",
        );
        reached.push(u16::from_be(peer.sin6_port).to_string());
        unsafe { libc::close(fd) };
    }
    STOP.store(true, Ordering::Relaxed);
    let _ = flipper.join();
    reached.join(",")
}

/// IORING_OP_OPENAT and IORING_OP_CONNECT, the way a program avoiding syscall tracing would.
mod uring {
    use super::*;
    use io_uring::{IoUring, opcode, squeue, types};

    fn ring(how: &str) -> IoUring {
        let r = if how == "sqpoll" {
            IoUring::builder().setup_sqpoll(2000).build(8)
        } else {
            IoUring::new(8)
        };
        r.unwrap_or_else(|e| fail(format!("io_uring_setup: {e}")))
    }

    fn run(ring: &mut IoUring, sqe: squeue::Entry) -> i32 {
        // SAFETY: the buffers the entry points to outlive the wait below.
        unsafe { ring.submission().push(&sqe) }.unwrap_or_else(|_| fail("sq full".into()));
        ring.submit_and_wait(1)
            .unwrap_or_else(|e| fail(format!("io_uring_enter: {e}")));
        let cqe = ring
            .completion()
            .next()
            .unwrap_or_else(|| fail("no completion".into()));
        cqe.result()
    }

    /// `how`: `inline` (the submitting thread does it), `async` (IOSQE_ASYNC: an io-wq
    /// worker does), `sqpoll` (the kernel's SQ thread submits), `fixed` (into a fixed-file
    /// slot: no fd at all).
    pub fn open(path: &str, how: &str) -> i32 {
        let mut r = ring(how);
        let p = cstr(path);
        let mut op =
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), p.as_ptr()).flags(libc::O_RDONLY);
        if how == "fixed" {
            r.submitter()
                .register_files_sparse(1)
                .unwrap_or_else(|e| fail(format!("register files: {e}")));
            op = op.file_index(Some(
                types::DestinationSlot::try_from_slot_target(0).expect("slot 0"),
            ));
        }
        let mut sqe = op.build();
        if how == "async" {
            sqe = sqe.flags(squeue::Flags::ASYNC);
        }
        let res = run(&mut r, sqe);
        check(res, "IORING_OP_OPENAT");
        res
    }

    pub fn connect(addr: SocketAddr) -> String {
        let mut r = ring("inline");
        let fd = check(
            unsafe { libc::socket(family(addr), libc::SOCK_STREAM, 0) },
            "socket",
        );
        let (sa, len) = sockaddr(addr);
        let sqe = opcode::Connect::new(types::Fd(fd), (&raw const sa).cast(), len).build();
        let res = run(&mut r, sqe);
        unsafe { libc::close(fd) };
        if res == 0 {
            "ok".into()
        } else {
            std::io::Error::from_raw_os_error(-res).to_string()
        }
    }
}
