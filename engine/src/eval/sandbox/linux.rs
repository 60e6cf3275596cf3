//! The Linux jail: bubblewrap (`bwrap`, the sandbox Flatpak uses) with every namespace, no
//! capabilities, a file system of its own and a seccomp filter. The layers and why are in the
//! module above.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{JAIL_DIR, Limits, unix, which};
use crate::error::{Error, Result};

/// The uid and gid the jail is entered as when codelsi runs as root (Debian's `nobody`): the
/// jail's processes then own no host file and can signal no host process.
const NOBODY: u32 = 65534;

/// A jail, found once: bubblewrap, the host files node needs, the compiled filter.
#[derive(Debug)]
pub(super) struct Jail {
    bwrap: PathBuf,
    /// node and the shared libraries it loads, bound read-only where they are.
    binds: Vec<PathBuf>,
    /// The seccomp program (BPF), handed to bubblewrap on a descriptor; none on an
    /// architecture this file has no system-call numbers for.
    seccomp: Option<PathBuf>,
}

impl Jail {
    /// bubblewrap (`CODELSI_BWRAP`, else on PATH), node's files, the filter written under
    /// `root`; why not, when there is no bubblewrap.
    pub(super) fn find(node: &Path, root: &Path) -> std::result::Result<Self, String> {
        let bwrap = std::env::var_os("CODELSI_BWRAP")
            .map(PathBuf::from)
            .or_else(|| which("bwrap"))
            .ok_or(
                "bubblewrap is not installed (Debian/Ubuntu: `apt-get install bubblewrap`; \
                 Fedora: `dnf install bubblewrap`; `bash .ci/run --setup-only` installs it)",
            )?;
        let seccomp = match seccomp_program() {
            Some(program) => {
                let path = root.join("seccomp.bpf");
                std::fs::write(&path, program).map_err(|e| format!("{}: {e}", path.display()))?;
                Some(path)
            }
            None => None,
        };
        Ok(Self {
            bwrap,
            binds: node_files(node),
            seccomp,
        })
    }

    pub(super) fn has_seccomp(&self) -> bool {
        self.seccomp.is_some()
    }

    /// The command that runs `node node_args` in a fresh jail within `limits`, and the filter's
    /// file, which must stay open until the command is spawned.
    pub(super) fn command(
        &self,
        node: &Path,
        node_args: &[String],
        limits: &Limits,
    ) -> Result<(Command, Option<File>)> {
        let mut cmd = Command::new(&self.bwrap);
        cmd.env_clear();
        cmd.args([
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "jail",
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--clearenv",
            "--setenv",
            "HOME",
            JAIL_DIR,
            "--setenv",
            "TMPDIR",
            JAIL_DIR,
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            "--setenv",
            "NODE_NO_WARNINGS",
            "1",
        ]);
        for path in self.binds.iter().chain([&node.to_path_buf()]) {
            cmd.arg("--ro-bind").arg(path).arg(path);
        }
        cmd.args(["--proc", "/proc", "--dev", "/dev", "--size"])
            .arg(limits.disk_bytes.max(1 << 20).to_string())
            .args(["--tmpfs", JAIL_DIR, "--chdir", JAIL_DIR]);
        let filter = match &self.seccomp {
            Some(path) => {
                let f = File::open(path).map_err(|e| Error::io(path, e))?;
                cmd.args(["--seccomp", &unix::KEPT_FD.to_string()]);
                Some(f)
            }
            None => None,
        };
        cmd.arg("--").arg(node).args(node_args);
        // SAFETY: geteuid(2) only reads the calling process's credentials.
        if unsafe { libc::geteuid() } == 0 {
            use std::os::unix::process::CommandExt;
            cmd.uid(NOBODY).gid(NOBODY);
        }
        unix::contain(&mut cmd, limits, filter.as_ref().map(|f| f.as_raw_fd()));
        Ok((cmd, filter))
    }
}

/// node and the libraries `ldd` says it loads; where `ldd` cannot tell, the system's library
/// and program folders, and node's own installation.
fn node_files(node: &Path) -> Vec<PathBuf> {
    let listed = Command::new("ldd")
        .arg(node)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| libraries(&String::from_utf8_lossy(&o.stdout)));
    if let Some(libs) = listed {
        return libs;
    }
    let mut dirs: Vec<PathBuf> = ["/usr", "/lib", "/lib64", "/lib32", "/bin"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect();
    if let Some(prefix) = node
        .canonicalize()
        .ok()
        .and_then(|p| p.parent()?.parent().map(Path::to_path_buf))
        && !dirs.iter().any(|d| prefix.starts_with(d))
    {
        dirs.push(prefix);
    }
    dirs
}

/// The absolute paths in `ldd`'s output (`libc.so.6 => /lib/…/libc.so.6 (0x…)`, `/lib64/ld…
/// (0x…)`); `None` when a library was not found (the jail could not load node).
fn libraries(ldd: &str) -> Option<Vec<PathBuf>> {
    let mut out = Vec::new();
    for line in ldd.lines() {
        let line = line.trim();
        let path = line.split_once("=>").map_or(line, |(_, p)| p.trim());
        if path.starts_with("not found") {
            return None;
        }
        let path = path.split(" (").next().unwrap_or_default().trim();
        if path.starts_with('/') {
            out.push(PathBuf::from(path));
        }
    }
    (!out.is_empty()).then_some(out)
}

/// `AUDIT_ARCH_*` (linux/audit.h): the architecture a system call was made for.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// System calls that fail with EPERM in the jail: none is needed to run a test program, and
/// each widens what a program can reach in the kernel (debugging other processes, loading
/// code into the kernel, mounting, new namespaces, keyrings, io_uring, the clock).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const DENIED: &[libc::c_long] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_personality,
    libc::SYS_vhangup,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
];

/// The seccomp program, as bytes of `struct sock_filter` (linux/filter.h): a call made for
/// another architecture kills the process, a denied call (or, on x86-64, any call of the x32
/// ABI, whose numbers would slip past the list) fails with EPERM, everything else runs.
///
/// Written here rather than with a rules compiler such as `seccompiler`: those key rules on
/// exact call numbers, which suits an allow-list, while a deny-list must also refuse the x32
/// numbers as a range.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn seccomp_program() -> Option<Vec<u8>> {
    // `struct seccomp_data`: nr at offset 0, arch at 4.
    const LOAD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let mut prog: Vec<(u16, u8, u8, u32)> = vec![
        (LOAD, 0, 0, 4),
        (JEQ, 1, 0, AUDIT_ARCH),
        (RET, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        (LOAD, 0, 0, 0),
    ];
    let checks = DENIED.len() + usize::from(cfg!(target_arch = "x86_64"));
    // Each check jumps, when it matches, over the checks after it and the ALLOW to the ERRNO.
    let mut left = checks;
    let mut jump = |prog: &mut Vec<_>, op, k| {
        left -= 1;
        prog.push((op, (left + 1) as u8, 0, k));
    };
    if cfg!(target_arch = "x86_64") {
        jump(&mut prog, JGE, X32_SYSCALL_BIT);
    }
    for &nr in DENIED {
        jump(&mut prog, JEQ, nr as u32);
    }
    prog.push((RET, 0, 0, libc::SECCOMP_RET_ALLOW));
    prog.push((
        RET,
        0,
        0,
        libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA),
    ));
    Some(
        prog.into_iter()
            .flat_map(|(code, jt, jf, k)| {
                let mut b = [0u8; 8];
                b[..2].copy_from_slice(&code.to_ne_bytes());
                b[2] = jt;
                b[3] = jf;
                b[4..].copy_from_slice(&k.to_ne_bytes());
                b
            })
            .collect(),
    )
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn seccomp_program() -> Option<Vec<u8>> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ldd() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            libraries(out),
            Some(vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ])
        );
        assert_eq!(libraries("\tlibfoo.so => not found\n"), None);
    }

    /// Inside the jail, without node's permission model (so `/proc` can be read): the
    /// filter is in force, nothing is privileged, and only the jail's processes exist.
    #[test]
    #[ignore = "needs node (and bubblewrap): the full tier runs it, `-- --include-ignored`"]
    fn the_jail_holds() {
        let Some(node) = which("node") else {
            panic!("node is needed (`bash .ci/run --setup-only` installs it)")
        };
        let root = std::env::temp_dir().join(format!("codelsi-jail-test-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap_or_else(|e| panic!("{e}"));
        let jail = Jail::find(&node, &root).unwrap_or_else(|e| panic!("{e}"));
        let script = "const fs = require('fs');\
            const s = fs.readFileSync('/proc/self/status', 'utf8');\
            const pids = fs.readdirSync('/proc').filter((p) => /^[0-9]+$/.test(p));\
            console.log(JSON.stringify({ s, pids, root: fs.readdirSync('/') }));";
        let (mut cmd, filter) = jail
            .command(&node, &["-e".into(), script.into()], &Limits::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let out = cmd.output().unwrap_or_else(|e| panic!("{e}"));
        drop(filter);
        std::fs::remove_dir_all(&root).ok();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
        let status = v["s"].as_str().unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(field("Seccomp:"), "2", "{status}");
        assert_eq!(field("NoNewPrivs:"), "1", "{status}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
        assert!(field("Uid:").starts_with("65534"), "{status}");
        // The jail's first process and node: no host process is visible.
        assert_eq!(v["pids"].as_array().map(Vec::len), Some(2), "{v}");
        let root: Vec<&str> = v["root"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x.as_str())
            .collect();
        for host_only in ["home", "root", "etc", "tmp", "var"] {
            assert!(
                !root.contains(&host_only),
                "/{host_only} is in the jail: {root:?}"
            );
        }
    }
}
