//! A small tmpfs mounted for one test, so that a real disk can be filled: the gateway's writes
//! then fail with ENOSPC, the same error a full disk gives. Needs CAP_SYS_ADMIN (root in CI).

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A mounted tmpfs; unmounted on drop.
pub struct Tmpfs {
    dir: tempfile::TempDir,
    target: CString,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on a new directory; the error says why it is not possible.
    pub fn mount(mib: u64) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let target = CString::new(dir.path().as_os_str().as_bytes()).map_err(|e| e.to_string())?;
        let options = CString::new(format!("size={mib}m,mode=0755")).map_err(|e| e.to_string())?;
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Tmpfs { dir, target })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ballast(&self) -> PathBuf {
        self.path().join("ballast")
    }

    /// Fills the free space with a ballast file, then frees `leave` bytes of it: with 0 the
    /// next write that needs space fails with ENOSPC.
    pub fn fill(&self, leave: u64) {
        let mut f = std::fs::File::create(self.ballast()).expect("ballast");
        let chunk = vec![0u8; 64 << 10];
        let mut n = 0;
        while let Ok(k) = f.write(&chunk) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        f.set_len(n.saturating_sub(leave)).expect("shrink ballast");
    }

    /// Mounts it again read-only (`true`) or writable; read-only works only while no process
    /// has a file open for writing there.
    pub fn remount(&self, read_only: bool) {
        let flags = libc::MS_REMOUNT | if read_only { libc::MS_RDONLY } else { 0 };
        // SAFETY: valid NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                self.target.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "remount: {}", std::io::Error::last_os_error());
    }

    /// Removes the ballast: the space is free again.
    pub fn drain(&self) {
        std::fs::remove_file(self.ballast()).expect("remove ballast");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: also when a process still has a file open there.
        // SAFETY: a valid NUL-terminated path.
        unsafe {
            libc::umount2(self.target.as_ptr(), libc::MNT_DETACH);
        }
    }
}
