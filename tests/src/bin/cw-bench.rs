//! Load generator for `cargo xtask bench`: runs one syscall pattern N times and prints
//! `<ns per op>` on stdout, so the harness can compare monitors on identical work. Also
//! writes synthetic NDJSON event streams for pipeline throughput runs.

use std::{
    ffi::CString,
    io::{BufWriter, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    time::Instant,
};

fn fail(msg: String) -> ! {
    eprintln!("cw-bench: {msg}");
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["open", path, n] => {
            let n = count(n);
            let p = CString::new(*path).unwrap();
            let t = Instant::now();
            for _ in 0..n {
                // SAFETY: valid C string; fd closed right away.
                let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY) };
                if fd < 0 {
                    fail(format!("open {path}: {}", std::io::Error::last_os_error()));
                }
                unsafe { libc::close(fd) };
            }
            report(t, n);
        }
        ["udp-connect", addr, n] => {
            let n = count(n);
            let addr: SocketAddr = addr.parse().unwrap_or_else(|e| fail(format!("{e}")));
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            let t = Instant::now();
            for _ in 0..n {
                s.connect(addr)
                    .unwrap_or_else(|e| fail(format!("connect: {e}")));
            }
            report(t, n);
        }
        ["tcp-connect", n] => {
            let n = count(n);
            // One thread: loopback connects complete in the kernel, the accept that follows
            // is immediate, and no thread hand-off adds scheduler noise. Closing with
            // SO_LINGER 0 (RST) leaves no TIME_WAIT, so repeated runs do not exhaust ports.
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.set_nonblocking(true).unwrap();
            let addr = l.local_addr().unwrap();
            let t = Instant::now();
            for _ in 0..n {
                let s = std::net::TcpStream::connect(addr)
                    .unwrap_or_else(|e| fail(format!("connect: {e}")));
                linger0(&s);
                drop(s);
                while let Ok((c, _)) = l.accept() {
                    linger0(&c);
                    drop(c);
                }
            }
            report(t, n);
        }
        ["getppid", n] => {
            let n = count(n);
            let t = Instant::now();
            for _ in 0..n {
                // SAFETY: no arguments, no side effects.
                unsafe { libc::getppid() };
            }
            report(t, n);
        }
        ["open-each", dir] => {
            // Every file in `dir` once: each open is this process's first of that file.
            let paths: Vec<CString> = std::fs::read_dir(dir)
                .unwrap_or_else(|e| fail(format!("{dir}: {e}")))
                .filter_map(|e| e.ok())
                .map(|e| CString::new(e.path().into_os_string().into_encoded_bytes()).unwrap())
                .collect();
            let t = Instant::now();
            for p in &paths {
                let fd = unsafe { libc::open(p.as_ptr(), libc::O_RDONLY) };
                if fd < 0 {
                    fail(format!("open: {}", std::io::Error::last_os_error()));
                }
                unsafe { libc::close(fd) };
            }
            report(t, paths.len() as u64);
        }
        ["uring-open", path, n] => {
            let n = count(n);
            uring_open(path, n);
        }
        ["exec-env", bytes, n] => {
            // fork+exec of /bin/true with one environment variable of `bytes` bytes: what
            // capturing the environment at exec costs.
            let n = count(n);
            let pad = "a".repeat(count(bytes) as usize);
            let t = Instant::now();
            for _ in 0..n {
                let st = std::process::Command::new("/bin/true")
                    .env_clear()
                    .env("BENCH_PAD", &pad)
                    .status()
                    .unwrap_or_else(|e| fail(format!("exec: {e}")));
                if !st.success() {
                    fail("true failed".into());
                }
            }
            report(t, n);
        }
        ["tcp-stream", n] => {
            // Small writes on one loopback connection (TCP_NODELAY: one packet each), read
            // by another thread: per-packet costs (the cgroup skb hook sees every packet).
            let n = count(n);
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let reader = std::thread::spawn(move || {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 65536];
                while std::io::Read::read(&mut c, &mut buf).is_ok_and(|r| r > 0) {}
            });
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            let msg = [7u8; 64];
            let t = Instant::now();
            for _ in 0..n {
                s.write_all(&msg)
                    .unwrap_or_else(|e| fail(format!("write: {e}")));
            }
            report(t, n);
            drop(s);
            let _ = reader.join();
        }
        ["gen-events", n, out] => gen_events(count(n), out),
        _ => fail(format!(
            "usage: open PATH N | open-each DIR | getppid N | uring-open PATH N | \
             exec-env BYTES N | udp-connect ADDR N | tcp-connect N | tcp-stream N | \
             gen-events N FILE (got {a:?})"
        )),
    }
}

/// IORING_OP_OPENAT + close of `path`, `n` times, one request in flight.
fn uring_open(path: &str, n: u64) {
    use io_uring::{IoUring, opcode, types};
    let mut ring = IoUring::new(8).unwrap_or_else(|e| fail(format!("io_uring_setup: {e}")));
    let p = CString::new(path).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        let sqe = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), p.as_ptr())
            .flags(libc::O_RDONLY)
            .build();
        // SAFETY: `p` outlives the request, which completes before the next loop.
        unsafe { ring.submission().push(&sqe) }.unwrap_or_else(|_| fail("sq full".into()));
        ring.submit_and_wait(1)
            .unwrap_or_else(|e| fail(format!("io_uring_enter: {e}")));
        let res = ring.completion().next().map(|c| c.result()).unwrap_or(-1);
        if res < 0 {
            fail(format!("IORING_OP_OPENAT: {res}"));
        }
        unsafe { libc::close(res) };
    }
    report(t, n);
}

fn linger0(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid socket fd and a correctly sized option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

fn count(n: &str) -> u64 {
    n.parse().unwrap_or_else(|_| fail(format!("bad count {n}")))
}

fn report(t: Instant, n: u64) {
    println!("{:.1}", t.elapsed().as_nanos() as f64 / n as f64);
}

/// A realistic mix for replay: many processes each reading a token and connecting, plus the
/// exec/exit noise around them. Roughly 1 secret read and 1 connect per 4 events.
fn gen_events(n: u64, out: &str) {
    let f = std::fs::File::create(out).unwrap_or_else(|e| fail(format!("{out}: {e}")));
    let mut w = BufWriter::new(f);
    let base = 1_795_000_000_000_000_000i64;
    for i in 0..n {
        let pid = 1000 + (i / 4) % 50_000;
        let pod = (i / 4) % 200;
        let ts = base + i as i64 * 1_000;
        let t = chrono::DateTime::from_timestamp_nanos(ts)
            .to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let proc_ = format!(
            r#"{{"pid":{pid},"tgid":{pid},"ppid":1,"uid":1000,"euid":1000,"gid":1000,"egid":1000,"comm":"api","exe":"/app/api"}}"#
        );
        let wl = format!(
            r#"{{"kind":"pod","id":"pod:ns{pod}/api-{pod}","namespace":"ns{pod}","pod":"api-{pod}","pod_uid":"00000000-0000-4000-8000-{pod:012}","service_account":"sa{pod}","spiffe_id":"spiffe://cluster.local/ns/ns{pod}/sa/sa{pod}","cgroup_id":{}}}"#,
            10_000 + pod
        );
        let line = match i % 4 {
            0 => format!(
                r#"{{"id":"bench-{i}","ts":"{t}","node":"bench","kind":"exec","process":{proc_},"workload":{wl},"exec":{{"filename":"/app/api"}}}}"#
            ),
            1 => format!(
                r#"{{"id":"bench-{i}","ts":"{t}","node":"bench","kind":"secret_read","process":{proc_},"workload":{wl},"secret":{{"path":"/var/lib/kubelet/pods/x/volumes/kubernetes.io~projected/kube-api-access/token","opened_as":"/var/run/secrets/kubernetes.io/serviceaccount/token","dev":2049,"inode":{},"syscall":"openat","access":"read","matched":"file"}},"credential":{{"fingerprint":"hmac-sha256:{:064x}","type":"k8s_sa_token","labels":{{"namespace":"ns{pod}","service_account":"sa{pod}"}}}}}}"#,
                100_000 + pod,
                pod
            ),
            2 => format!(
                r#"{{"id":"bench-{i}","ts":"{t}","node":"bench","kind":"connect","process":{proc_},"workload":{wl},"dst":{{"ip":"10.96.0.1","port":443,"proto":"tcp","name":"kubernetes.default.svc.cluster.local"}},"result":"ok"}}"#
            ),
            _ => format!(
                r#"{{"id":"bench-{i}","ts":"{t}","node":"bench","kind":"exit","process":{proc_},"workload":{wl},"exit_code":0}}"#
            ),
        };
        writeln!(w, "{line}").unwrap_or_else(|e| fail(format!("{out}: {e}")));
    }
    w.flush().unwrap_or_else(|e| fail(format!("{out}: {e}")));
}
