#!/usr/bin/python3
"""Run a credwatch binary under the restrictions of deploy/systemd/credwatch.service, without
systemd: the unit's user (a non-root uid), its ambient/bounding capabilities, no_new_privs,
LimitMEMLOCK, its SystemCallFilter (expanded by `systemd-analyze syscall-filter`, the
unit's SystemCallErrorNumber) with RestrictAddressFamilies and MemoryDenyWriteExecute as
seccomp rules too, and read-only remounts for ProtectSystem=strict, ProtectHome=read-only,
ProtectKernelTunables and ProtectControlGroups (the state dir stays writable). Then a
process of another user, started before the agent, reads a mode-0600 secret of its own, and
the agent must report that read with the reader's executable (CAP_SYS_PTRACE) and the
secret's fingerprint (CAP_DAC_READ_SEARCH).

Needs root, a kernel that runs the probes, util-linux (unshare, setpriv, prlimit), and
Debian's python3-seccomp for /usr/bin/python3. Exit status 0 when the read was reported.

    systemd_sandbox.py --unit deploy/systemd/credwatch.service --binary target/release/credwatch
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

AGENT_UID = 64991  # stands for the unit's User=; any uid without a passwd entry works
READER_UID = 65534


def unit_settings(path):
    """[Service] assignments; repeated keys accumulate, as systemd's list settings do."""
    out, section = {}, None
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            if section == "Service" and "=" in line:
                k, v = line.split("=", 1)
                out.setdefault(k.strip(), []).append(v.strip())
    return out


def syscall_groups():
    text = subprocess.run(
        ["systemd-analyze", "syscall-filter"], check=True, capture_output=True, text=True
    ).stdout
    groups, cur = {}, None
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not line.startswith(" ") and s.startswith("@"):
            cur = groups.setdefault(s, [])
        elif cur is not None:
            cur.append(s)
    return groups


def expand(names, groups, seen=None):
    seen = set() if seen is None else seen
    out = set()
    for n in names:
        if n.startswith("@"):
            if n in seen:
                continue
            seen.add(n)
            if n not in groups:
                sys.exit(f"unknown syscall group {n}")
            out |= expand(groups[n], groups, seen)
        else:
            out.add(n)
    return out


def child(args):
    """Install the seccomp filter (no_new_privs is already set by setpriv) and exec."""
    import errno

    import seccomp

    spec = json.loads(os.environ.pop("CW_SANDBOX_SECCOMP"))
    err = getattr(errno, spec["errno"])
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(err))
    special = {"socket", "mmap", "mprotect", "pkey_mprotect"}
    for name in sorted(set(spec["allow"]) - special):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            pass  # not a syscall of this architecture or unknown to libseccomp
    if "socket" in spec["allow"]:
        for fam in spec["families"]:
            f.add_rule(seccomp.ALLOW, "socket", seccomp.Arg(0, seccomp.EQ, fam))
    prot_wx = 0x2 | 0x4  # PROT_WRITE | PROT_EXEC
    if spec["mdwe"]:
        f.add_rule(seccomp.ALLOW, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, prot_wx, 0))
        f.add_rule(seccomp.ALLOW, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, prot_wx, 0x2))
        f.add_rule(seccomp.ALLOW, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, prot_wx, 0x4))
        for name in ("mprotect", "pkey_mprotect"):
            f.add_rule(seccomp.ALLOW, name, seccomp.Arg(2, seccomp.MASKED_EQ, 0x4, 0))
    else:
        for name in ("mmap", "mprotect", "pkey_mprotect"):
            f.add_rule(seccomp.ALLOW, name)
    f.load()
    os.execv(args[0], args)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--unit", required=True)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("systemd_sandbox.py needs root")
    u = unit_settings(a.unit)
    caps = " ".join(u.get("AmbientCapabilities", [])).split()
    bound = " ".join(u.get("CapabilityBoundingSet", [])).split()
    if sorted(caps) != sorted(bound):
        sys.exit(f"AmbientCapabilities {caps} != CapabilityBoundingSet {bound}")
    capspec = ",".join(["-all"] + ["+" + c.lower().removeprefix("cap_") for c in caps])
    allow = expand(" ".join(u.get("SystemCallFilter", [])).split(), syscall_groups())
    fams = {"AF_UNIX": 1, "AF_INET": 2, "AF_INET6": 10}
    want_fams = " ".join(u.get("RestrictAddressFamilies", [])).split()
    seccomp_spec = {
        "allow": sorted(allow),
        "errno": (u.get("SystemCallErrorNumber") or ["EPERM"])[-1],
        "families": [fams[x] for x in want_fams] if want_fams else list(fams.values()),
        "mdwe": (u.get("MemoryDenyWriteExecute") or ["no"])[-1] == "yes",
    }
    ro = {
        "ProtectSystem": (u.get("ProtectSystem") or ["no"])[-1] == "strict",
        "ProtectKernelTunables": (u.get("ProtectKernelTunables") or ["no"])[-1] == "yes",
        "ProtectControlGroups": (u.get("ProtectControlGroups") or ["no"])[-1] == "yes",
    }
    memlock = (u.get("LimitMEMLOCK") or ["unlimited"])[-1].replace("infinity", "unlimited")

    work = tempfile.mkdtemp(prefix="cw-sandbox-")
    os.chmod(work, 0o755)
    try:
        sec = os.path.join(work, "sec")
        os.mkdir(sec, 0o700)
        secret = os.path.join(sec, "app.key")
        with open(secret, "w") as f:
            f.write("sandbox-test-credential-0123456789\n")
        os.chmod(secret, 0o600)
        for p in (sec, secret):
            os.chown(p, READER_UID, READER_UID)
        state = os.path.join(work, "state")
        os.mkdir(state, 0o700)
        os.chown(state, AGENT_UID, AGENT_UID)
        cfg = os.path.join(work, "credwatch.toml")
        with open(cfg, "w") as f:
            f.write(
                f'[secrets]\npaths = ["{sec}/*.key"]\ncatalog = false\n'
                '[metrics]\nlisten = ""\n[detect]\nlearning_period = "0s"\n'
            )
        binary = os.path.join(work, "credwatch")
        shutil.copy(a.binary, binary)
        os.chmod(binary, 0o755)
        events = os.path.join(state, "events.jsonl")

        remounts = [f"mount --bind {state} {state}"]
        if ro["ProtectSystem"]:
            remounts.append("mount -o remount,bind,ro /")
        if ro["ProtectKernelTunables"]:
            remounts += [
                "mount --bind /proc/sys /proc/sys",
                "mount -o remount,bind,ro /proc/sys",
                "mount -o remount,bind,ro /sys",
            ]
            # Every mount under /sys but cgroups (ProtectControlGroups covers those).
            remounts.append(
                "findmnt -rn -o TARGET -R /sys | grep -v '^/sys$' | grep -v '^/sys/fs/cgroup'"
                " | while read m; do mount -o remount,bind,ro \"$m\"; done"
            )
        if ro["ProtectControlGroups"]:
            remounts.append(
                "findmnt -rn -o TARGET -R /sys/fs/cgroup"
                " | while read m; do mount -o remount,bind,ro \"$m\"; done"
            )
        # LimitMEMLOCK; where even root may not raise it (no CAP_SYS_RESOURCE, as in some
        # sandboxes) the current limit stays, which kernels >= 5.11 do not consult for BPF.
        try:
            import resource

            lim = resource.RLIM_INFINITY if memlock == "unlimited" else int(memlock)
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (lim, lim))
        except (ValueError, OSError) as e:
            print(f"sandbox: LimitMEMLOCK={memlock} not applied ({e}); keeping the current limit")
        agent = [
            "setpriv", f"--reuid={AGENT_UID}", f"--regid={AGENT_UID}", "--clear-groups",
            "--no-new-privs", f"--inh-caps={capspec}", f"--ambient-caps={capspec}",
            f"--bounding-set={capspec}", "--",
            "/usr/bin/python3", os.path.abspath(__file__), "--child",
            binary, "run", "--config", cfg, "--state-dir", state, "--events", events,
        ]
        script = " && ".join(remounts) + ' && exec "$@"'
        env = dict(os.environ, CW_SANDBOX_SECCOMP=json.dumps(seccomp_spec), CREDWATCH_LOG="info")
        delay = max(3.0, a.seconds - 4)
        reader = subprocess.Popen(
            ["setpriv", f"--reuid={READER_UID}", f"--regid={READER_UID}", "--clear-groups",
             "/bin/sh", "-c", f"sleep {delay}; read x < {secret}"]
        )
        time.sleep(0.5)
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--",
             "/bin/sh", "-c", script, "sh"] + agent,
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.time() + a.seconds
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        reader.wait(timeout=30)
        err = re.sub(r"\x1b\[[0-9;]*m", "", err)
        print(
            f"sandbox: uid {AGENT_UID}, capabilities {' '.join(caps)}, "
            f"{len(allow)} syscalls allowed, read-only: "
            + ", ".join(k for k, v in ro.items() if v)
        )
        for line in err.splitlines():
            if os.environ.get("CW_SANDBOX_VERBOSE") or re.search(r"WARN|ERROR|credwatch:|ready|attached", line):
                print("  agent:", line.strip()[:300])
        reads = []
        if os.path.exists(events):
            with open(events) as f:
                reads = [json.loads(l) for l in f if '"secret_read"' in l]
        mine = [
            e for e in reads
            if e["process"].get("uid") == READER_UID and e["secret"]["path"] == secret
        ]
        ok = bool(mine) and all(
            e["process"].get("exe") and (e.get("credential") or {}).get("fingerprint")
            for e in mine
        )
        for e in mine:
            print(
                f"  secret_read by uid {READER_UID}: exe={e['process'].get('exe')!r} "
                f"fingerprint={(e.get('credential') or {}).get('fingerprint', '')[:28]}…"
            )
        print("sandbox: " + ("ok" if ok else "FAILED: the read was not reported in full"))
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
