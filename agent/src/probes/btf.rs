//! Kernel struct offsets from the running kernel's BTF, so one probe object serves every
//! kernel (Rust eBPF gets no CO-RE relocations).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use credwatch_common::KernelConfig;

use crate::syscalls::Syscall;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

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

    /// Every offset the probes need. A missing one is a clear error: reading the wrong field
    /// would silently produce wrong pids or inodes.
    pub fn kernel_config(&self) -> Result<KernelConfig> {
        let o = |s: &str, f: &str| self.offset(s, f);
        Ok(KernelConfig {
            task_real_parent: o("task_struct", "real_parent")?,
            task_tgid: o("task_struct", "tgid")?,
            task_cred: o("task_struct", "cred")?,
            task_files: o("task_struct", "files")?,
            task_signal: o("task_struct", "signal")?,
            task_exit_code: o("task_struct", "exit_code")?,
            cred_uid: o("cred", "uid")?,
            cred_gid: o("cred", "gid")?,
            cred_euid: o("cred", "euid")?,
            cred_egid: o("cred", "egid")?,
            cred_cap_effective: o("cred", "cap_effective")?,
            files_fdt: o("files_struct", "fdt")?,
            fdtable_max_fds: o("fdtable", "max_fds")?,
            fdtable_fd: o("fdtable", "fd")?,
            file_f_inode: o("file", "f_inode")?,
            file_f_path_dentry: o("file", "f_path.dentry")?,
            file_private_data: o("file", "private_data")?,
            file_f_flags: o("file", "f_flags")?,
            inode_i_ino: o("inode", "i_ino")?,
            inode_i_sb: o("inode", "i_sb")?,
            sb_s_dev: o("super_block", "s_dev")?,
            dentry_d_parent: o("dentry", "d_parent")?,
            dentry_d_inode: o("dentry", "d_inode")?,
            socket_type: o("socket", "type")?,
            signal_tty: o("signal_struct", "tty")?,
            tty_name: o("tty_struct", "name")?,
            regs_arg0: self.syscall_arg_offset(0)?,
            regs_arg1: self.syscall_arg_offset(1)?,
            nr_open: Syscall::Open.nr(),
            nr_openat: Syscall::Openat.nr(),
            nr_openat2: Syscall::Openat2.nr(),
            nr_creat: Syscall::Creat.nr(),
            nr_open_by_handle_at: Syscall::OpenByHandleAt.nr(),
            ..KernelConfig::default()
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this machine's BTF; skipped where the kernel has none (not a probe test).
    #[test]
    fn resolves_offsets_from_running_kernel() {
        let path = Path::new(VMLINUX_BTF);
        if !path.exists() {
            eprintln!("skipped: {VMLINUX_BTF} absent");
            return;
        }
        let btf = KernelBtf::open(path).unwrap();
        let cfg = btf.kernel_config().unwrap();
        // f_path is a struct path { vfsmount *mnt; dentry *dentry; }: dentry is 8 bytes in.
        assert_eq!(
            cfg.file_f_path_dentry,
            btf.offset("file", "f_path").unwrap() + 8
        );
        assert_ne!(cfg.task_cred, 0);
        assert!(btf.offset("task_struct", "no_such_field").is_err());
    }
}
