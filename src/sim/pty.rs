//! Pseudo-terminal pair for RTU simulation ([`Pty`]): the simulator serves on
//! the master side; clients open the slave path like a serial port.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The master side of a pseudo-terminal as a tokio stream.
///
/// A slave fd is kept open for the life of the `Pty`, so the master never sees
/// EIO / hang-up when clients close and reopen the slave path. The slave is in
/// raw mode (no echo, no CR/LF translation), which is essential: with the
/// default cooked mode every reply would be echoed back as a request and
/// 0x0D bytes would be rewritten.
#[derive(Debug)]
pub struct Pty {
    master: AsyncFd<File>,
    _slave: File,
    slave_path: PathBuf,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Pty {
    /// Opens a new pseudo-terminal; returns the master stream and the slave
    /// path (e.g. `/dev/pts/3`) for clients. Needs a tokio runtime.
    pub fn open() -> io::Result<(Pty, PathBuf)> {
        // SAFETY: plain libc call; the returned fd is checked and owned below.
        let fd = cvt(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY) })?;
        // SAFETY: `fd` is a freshly opened descriptor owned by nobody else.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = master.as_raw_fd();
        // SAFETY: `raw` is a valid open pty master for all calls below; the
        // name buffer outlives the call and its length is passed.
        let slave_path = unsafe {
            cvt(libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC))?;
            cvt(libc::grantpt(raw))?;
            cvt(libc::unlockpt(raw))?;
            let mut name = [0 as libc::c_char; 128];
            let r = libc::ptsname_r(raw, name.as_mut_ptr(), name.len());
            if r != 0 {
                return Err(io::Error::from_raw_os_error(r));
            }
            let flags = cvt(libc::fcntl(raw, libc::F_GETFL))?;
            cvt(libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
            PathBuf::from(
                std::ffi::CStr::from_ptr(name.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&slave_path)?;
        set_raw(&slave)?;
        // SAFETY: the `File` owns the master fd and keeps it open (and
        // `as_raw_fd` unchanged) until the `AsyncFd` drops it.
        let master = unsafe { AsyncFd::register(File::from(master)) }?;
        let pty = Pty {
            master,
            _slave: slave,
            slave_path: slave_path.clone(),
        };
        Ok((pty, slave_path))
    }

    /// Path of the slave side.
    pub fn slave_path(&self) -> &Path {
        &self.slave_path
    }
}

/// Puts the terminal `f` in raw mode (cfmakeraw, 8 bit, receiver on).
fn set_raw(f: &File) -> io::Result<()> {
    let fd = f.as_raw_fd();
    // SAFETY: termios is plain old data; tcgetattr fills it completely before
    // use, and `fd` is an open terminal for the duration of the calls.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        cvt(libc::tcgetattr(fd, &mut t))?;
        libc::cfmakeraw(&mut t);
        t.c_cflag |= libc::CREAD | libc::CLOCAL;
        cvt(libc::tcsetattr(fd, libc::TCSANOW, &t))?;
    }
    Ok(())
}

impl AsyncRead for Pty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.master.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|f| f.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Pty {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.master.poll_write_ready(cx))?;
            match guard.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
