//! Kernel struct offsets from the running kernel's BTF, so one probe object serves every
//! kernel (Rust eBPF gets no CO-RE relocations).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use credwatch_common::KernelConfig;

use crate::syscalls::Syscall;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The ia32 numbers of open, openat, openat2, creat and open_by_handle_at: a 32-bit process
/// on x86-64 opens through these, which the per-syscall tracepoints do not see.
#[cfg(target_arch = "x86_64")]
const IA32_OPENS: (i32, i32, i32, i32, i32) = (5, 295, 437, 8, 342);
#[cfg(not(target_arch = "x86_64"))]
const IA32_OPENS: (i32, i32, i32, i32, i32) = (-1, -1, -1, -1, -1);

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn open(path: &Path) -> Result<Self> {
        let btf = Btf::from_file(path).with_context(|| {
            format!(
                "cannot read kernel BTF at {} (kernel built without CONFIG_DEBUG_INFO_BTF?)",
                path.display()
            )
        })?;
        Ok(KernelBtf { btf })
    }

    /// Byte offset of `path` ("f_path.dentry") inside `struct name`, looking through
    /// anonymous structs/unions the way C does.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32> {
        let mut ty = self.struct_by_name(name)?;
        let mut total = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(field) = parts.next() {
            let (off, member_ty) = self
                .find_member(&ty, field)?
                .ok_or_else(|| anyhow!("kernel BTF: struct {name} has no member {path}"))?;
            total += off;
            if parts.peek().is_some() {
                ty = self.strip(member_ty)?;
            }
        }
        Ok(total)
    }

    fn struct_by_name(&self, name: &str) -> Result<Type> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .with_context(|| format!("kernel BTF has no type {name}"))?;
        types
            .into_iter()
            .find(|t| matches!(t, Type::Struct(s) if !s.members.is_empty()))
            .ok_or_else(|| anyhow!("kernel BTF has no struct {name}"))
    }

    /// Follows typedef/const/volatile/type tags to the underlying type.
    fn strip(&self, mut ty: Type) -> Result<Type> {
        for _ in 0..16 {
            match &ty {
                Type::Typedef(t) => ty = self.btf.resolve_chained_type(t)?,
                Type::Const(t) | Type::Volatile(t) | Type::Restrict(t) => {
                    ty = self.btf.resolve_chained_type(t)?
                }
                Type::TypeTag(t) => ty = self.btf.resolve_chained_type(t)?,
                _ => return Ok(ty),
            }
        }
        bail!("kernel BTF: type chain too deep")
    }

    /// (byte offset, member type) of `field` in a struct/union, descending into anonymous
    /// members.
    fn find_member(&self, ty: &Type, field: &str) -> Result<Option<(u32, Type)>> {
        let members = match ty {
            Type::Struct(s) | Type::Union(s) => &s.members,
            _ => return Ok(None),
        };
        for m in members {
            let name = self.btf.resolve_name(m).unwrap_or_default();
            let off = m.bit_offset() / 8;
            let mty = self.btf.resolve_chained_type(m)?;
            if name == field {
                return Ok(Some((off, mty)));
            }
            if name.is_empty() {
                let inner = self.strip(mty)?;
                if let Some((o, t)) = self.find_member(&inner, field)? {
                    return Ok(Some((off + o, t)));
                }
            }
        }
        Ok(None)
    }

    /// `offset`, or 0 where this kernel has no such field (optional offsets: the probes
    /// skip what needs them).
    fn optional(&self, name: &str, path: &str) -> u32 {
        self.offset(name, path).unwrap_or(0)
    }

    /// Every offset the probes need. A missing required one is a clear error: reading the
    /// wrong field would silently produce wrong pids or inodes.
    pub fn kernel_config(&self) -> Result<KernelConfig> {
        let o = |s: &str, f: &str| self.offset(s, f);
        // /proc/<pid>/* inodes are the `vfs_inode` member of a `struct proc_inode`, whose
        // first members name the process.
        let proc_pid_from_inode =
            o("proc_inode", "pid")? as i32 - o("proc_inode", "vfs_inode")? as i32;
        let (nr32_open, nr32_openat, nr32_openat2, nr32_creat, nr32_by_handle) = IA32_OPENS;
        Ok(KernelConfig {
            task_real_parent: o("task_struct", "real_parent")?,
            task_tgid: o("task_struct", "tgid")?,
            task_cred: o("task_struct", "cred")?,
            task_files: o("task_struct", "files")?,
            task_signal: o("task_struct", "signal")?,
            task_exit_code: o("task_struct", "exit_code")?,
            task_mm: o("task_struct", "mm")?,
            task_flags: o("task_struct", "flags")?,
            task_group_leader: o("task_struct", "group_leader")?,
            task_comm: o("task_struct", "comm")?,
            task_worker_private: self.optional("task_struct", "worker_private"),
            thread_info_status: if cfg!(target_arch = "x86_64") {
                self.optional("task_struct", "thread_info.status")
            } else {
                0
            },
            cred_uid: o("cred", "uid")?,
            cred_gid: o("cred", "gid")?,
            cred_euid: o("cred", "euid")?,
            cred_egid: o("cred", "egid")?,
            cred_cap_effective: o("cred", "cap_effective")?,
            signal_live: o("signal_struct", "live")?,
            signal_tty: o("signal_struct", "tty")?,
            tty_name: o("tty_struct", "name")?,
            mm_arg_start: o("mm_struct", "arg_start")?,
            mm_arg_end: o("mm_struct", "arg_end")?,
            mm_env_start: o("mm_struct", "env_start")?,
            mm_env_end: o("mm_struct", "env_end")?,
            files_fdt: o("files_struct", "fdt")?,
            fdtable_max_fds: o("fdtable", "max_fds")?,
            fdtable_fd: o("fdtable", "fd")?,
            file_f_inode: o("file", "f_inode")?,
            file_f_path_dentry: o("file", "f_path.dentry")?,
            file_private_data: o("file", "private_data")?,
            file_f_flags: o("file", "f_flags")?,
            file_f_op: o("file", "f_op")?,
            inode_i_ino: o("inode", "i_ino")?,
            inode_i_sb: o("inode", "i_sb")?,
            sb_s_dev: o("super_block", "s_dev")?,
            dentry_d_parent: o("dentry", "d_parent")?,
            dentry_d_inode: o("dentry", "d_inode")?,
            dentry_d_name: o("dentry", "d_name.name")?,
            socket_type: o("socket", "type")?,
            socket_sk: o("socket", "sk")?,
            sock_family: o("sock", "__sk_common.skc_family")?,
            unix_sock_peer: o("unix_sock", "peer")?,
            unix_sock_addr: o("unix_sock", "addr")?,
            unix_address_len: o("unix_address", "len")?,
            unix_address_name: o("unix_address", "name")?,
            proc_inode_pid_from_inode: proc_pid_from_inode,
            pid_numbers_nr: o("pid", "numbers")? + o("upid", "nr")?,
            io_worker_cur_work: self.optional("io_worker", "cur_work"),
            io_kiocb_work: self.optional("io_kiocb", "work"),
            io_open_file_slot: self.optional("io_open", "file_slot"),
            io_open_filename: self.optional("io_open", "filename"),
            filename_name: o("filename", "name")?,
            regs_arg0: self.syscall_arg_offset(0)?,
            regs_arg1: self.syscall_arg_offset(1)?,
            regs_nr: self.syscall_nr_offset()?,
            regs_compat_arg0: if cfg!(target_arch = "x86_64") {
                o("pt_regs", "bx")?
            } else {
                0
            },
            regs_compat_arg1: if cfg!(target_arch = "x86_64") {
                o("pt_regs", "cx")?
            } else {
                0
            },
            nr_open: Syscall::Open.nr(),
            nr_openat: Syscall::Openat.nr(),
            nr_openat2: Syscall::Openat2.nr(),
            nr_creat: Syscall::Creat.nr(),
            nr_open_by_handle_at: Syscall::OpenByHandleAt.nr(),
            nr_connect: Syscall::Connect.nr(),
            nr_sendto: Syscall::Sendto.nr(),
            nr_sendmsg: Syscall::Sendmsg.nr(),
            nr_io_uring_enter: Syscall::IoUringEnter.nr(),
            nr32_open,
            nr32_openat,
            nr32_openat2,
            nr32_creat,
            nr32_open_by_handle_at: nr32_by_handle,
            tp_iou_submit_req: u32::MAX,
            tp_iou_submit_opcode: u32::MAX,
            tp_iou_complete_req: u32::MAX,
            tp_iou_complete_res: u32::MAX,
            ..KernelConfig::default()
        })
    }

    /// Where the syscall number sits in the saved `pt_regs`.
    fn syscall_nr_offset(&self) -> Result<u32> {
        #[cfg(target_arch = "x86_64")]
        {
            self.offset("pt_regs", "orig_ax")
        }
        #[cfg(target_arch = "aarch64")]
        {
            self.offset("pt_regs", "syscallno")
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            bail!("the syscall number register is not mapped for this architecture")
        }
    }

    /// Where syscall argument `n` sits in the `pt_regs` saved at syscall entry.
    fn syscall_arg_offset(&self, n: u32) -> Result<u32> {
        #[cfg(target_arch = "x86_64")]
        {
            self.offset("pt_regs", ["di", "si"][n as usize])
        }
        #[cfg(target_arch = "aarch64")]
        {
            // x0 is overwritten by the return value; the kernel keeps the original.
            if n == 0 {
                self.offset("pt_regs", "orig_x0")
            } else {
                Ok(self.offset("pt_regs", "regs")? + 8 * n)
            }
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        {
            let _ = n;
            bail!("syscall argument registers are not mapped for this architecture")
        }
    }
}

/// Offset of field `name` in a tracepoint's record, from its tracefs `format` file (the
/// layout changes between kernels: never assumed).
pub fn tracepoint_field(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|l| {
        let l = l.trim();
        let decl = l.strip_prefix("field:")?.split(';').next()?;
        let field = decl.rsplit([' ', '*']).next()?;
        let field = field.split('[').next()?;
        if field != name {
            return None;
        }
        l.split(';')
            .find_map(|p| p.trim().strip_prefix("offset:"))?
            .trim()
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF.
    #[test]
    #[ignore = "needs kernel BTF at /sys/kernel/btf/vmlinux (cargo xtask test runs it)"]
    fn resolves_offsets_from_running_kernel() {
        let path = Path::new(VMLINUX_BTF);
        let btf = KernelBtf::open(path).unwrap();
        let cfg = btf.kernel_config().unwrap();
        // f_path is a struct path { vfsmount *mnt; dentry *dentry; }: dentry is 8 bytes in.
        assert_eq!(
            cfg.file_f_path_dentry,
            btf.offset("file", "f_path").unwrap() + 8
        );
        assert_ne!(cfg.task_cred, 0);
        assert!(btf.offset("task_struct", "no_such_field").is_err());
        assert!(
            cfg.proc_inode_pid_from_inode < 0,
            "the pid pointer precedes vfs_inode"
        );
    }

    #[test]
    fn tracepoint_fields_are_read_from_the_format() {
        let f = "name: io_uring_submit_req\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:void * req;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:u8 opcode;\toffset:32;\tsize:1;\tsigned:0;\n\tfield:__data_loc char[] op_str;\toffset:52;\tsize:4;\tsigned:0;\n";
        assert_eq!(tracepoint_field(f, "req"), Some(16));
        assert_eq!(tracepoint_field(f, "opcode"), Some(32));
        assert_eq!(tracepoint_field(f, "op_str"), Some(52));
        assert_eq!(tracepoint_field(f, "res"), None);
    }
}
