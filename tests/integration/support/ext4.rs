//! A small ext4 file system on a loop device, mounted for one test with `errors=remount-ro`, so
//! that the kernel itself can turn it unwritable under a running gateway: [`Ext4::fail`] makes
//! ext4 record an error (its `trigger_fs_error` switch), and from then on every write to it
//! fails, also through files opened before, as after an I/O error on a real flash disk. Needs
//! root, loop devices and `mkfs.ext4`/`e2fsck` (e2fsprogs).

use std::path::{Path, PathBuf};
use std::process::Command;

/// A mounted ext4 image; unmounted and detached on drop.
pub struct Ext4 {
    dir: tempfile::TempDir,
    /// The image files and the mount point.
    work: tempfile::TempDir,
    /// The loop devices attached so far (the last one is mounted).
    loops: Vec<String>,
}

/// Runs `cmd`; the error names the command and says what it printed.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Ext4 {
    /// Makes a `mib` MiB ext4 image and mounts it on a new directory; the error says why it is
    /// not possible here.
    pub fn mount(mib: u64) -> Result<Ext4, String> {
        let work = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let image = work.path().join("disk-0.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(mib << 20))
            .map_err(|e| e.to_string())?;
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image))?;
        let mut disk = Ext4 {
            dir,
            work,
            loops: Vec::new(),
        };
        disk.attach(&image)?;
        if !disk.switch().exists() {
            return Err(format!("this kernel has no {}", disk.switch().display()));
        }
        Ok(disk)
    }

    /// ext4's switch that makes the mounted file system record an error.
    fn switch(&self) -> PathBuf {
        let dev = self.loops.last().expect("attached");
        let name = Path::new(dev).file_name().expect("device name");
        Path::new("/sys/fs/ext4")
            .join(name)
            .join("trigger_fs_error")
    }

    fn attach(&mut self, image: &Path) -> Result<(), String> {
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(image))?;
        self.loops.push(dev.clone());
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "errors=remount-ro", &dev])
            .arg(self.dir.path()))?;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn image(&self, n: usize) -> PathBuf {
        self.work.path().join(format!("disk-{n}.img"))
    }

    /// Makes ext4 record an error: it stops taking writes (and, on recent kernels, reads) until
    /// it is mounted again.
    pub fn fail(&self) {
        let switch = self.switch();
        std::fs::write(&switch, "floorgate test: unwritable state directory")
            .unwrap_or_else(|e| panic!("{}: {e}", switch.display()));
    }

    /// What an operator does about it: the failed file system is detached (processes that still
    /// have files open there keep them), a checked copy of its image is mounted in its place.
    pub fn replace(&mut self) {
        let n = self.loops.len();
        // The failed file system writes nothing more, so its image is what it committed.
        run(Command::new("umount").arg("-l").arg(self.dir.path())).expect("detach");
        std::fs::copy(self.image(n - 1), self.image(n)).expect("copy the image");
        // 1: errors corrected; 0: clean. Both leave a file system that mounts.
        let fsck = Command::new("e2fsck")
            .args(["-f", "-y"])
            .arg(self.image(n))
            .output()
            .expect("e2fsck");
        assert!(
            matches!(fsck.status.code(), Some(0 | 1)),
            "e2fsck: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        self.attach(&self.image(n)).expect("mount the checked copy");
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
        for dev in &self.loops {
            let _ = Command::new("losetup").args(["-d", dev]).output();
        }
    }
}
