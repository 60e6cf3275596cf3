//! What every unix gives a program, jailed or not: its own session and process group (so it
//! can be killed whole), rlimits, and one inherited descriptor at a known number.

use std::os::unix::io::RawFd;
use std::process::Command;

use super::Limits;

/// The descriptor number `contain` gives the kept descriptor in the child.
pub(super) const KEPT_FD: RawFd = 3;

/// Before `cmd` execs: a new session, the rlimits of `limits`, and `keep` (when given) as
/// descriptor [`KEPT_FD`], left open across exec.
pub(super) fn contain(cmd: &mut Command, limits: &Limits, keep: Option<RawFd>) {
    let (cpu, mem, disk) = (limits.cpu_secs, limits.memory_bytes, limits.disk_bytes);
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setsid, setrlimit, dup2, fcntl), allocating nothing.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let set = |res, soft: u64, hard: u64| {
                let lim = libc::rlimit {
                    rlim_cur: soft as libc::rlim_t,
                    rlim_max: hard as libc::rlim_t,
                };
                if libc::setrlimit(res, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            // CPU: the soft limit sends SIGXCPU; the hard one a second later, SIGKILL.
            set(libc::RLIMIT_CPU, cpu, cpu + 1)?;
            set(libc::RLIMIT_AS, mem, mem)?;
            set(libc::RLIMIT_FSIZE, disk, disk)?;
            set(libc::RLIMIT_CORE, 0, 0)?;
            if let Some(fd) = keep {
                if fd == KEPT_FD {
                    // dup2 onto itself keeps close-on-exec: clear it.
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(fd, KEPT_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// SIGKILL the process group `contain` made for the process `pid`; harmless when it is gone.
pub(super) fn kill_group(pid: u32) {
    // SAFETY: kill(2) on a process group we created; no memory is touched.
    unsafe { libc::kill(-(pid as libc::pid_t), libc::SIGKILL) };
}
