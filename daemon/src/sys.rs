//! The daemon's only unsafe code: socket options std and nix do not wrap,
//! and adopting file descriptors handed over by systemd.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The peer's supplementary groups (SO_PEERGROUPS), as the kernel recorded
/// them when the peer connected.
pub(crate) fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * size_of::<libc::gid_t>())
            .map_err(|_| io::Error::other("group list too large"))?;
        // SAFETY: `groups` is a live, writable buffer of exactly `len` bytes and
        // the kernel writes at most `len` bytes, updating `len` to what it used
        // (or to what it needs, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let used = usize::try_from(len).unwrap_or(0) / size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(used);
            return Ok(groups);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ERANGE) && used > groups.len() && used <= 65_536 {
            groups.resize(used, 0);
            continue;
        }
        return Err(err);
    }
}

fn int_sockopt(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `value` is a writable c_int and `len` says so; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes ownership of a descriptor that systemd passed (LISTEN_FDS), after
/// checking that it is a listening stream socket of one of `domains`.
fn adopt_listener(fd: RawFd, domains: &[libc::c_int], what: &str) -> io::Result<OwnedFd> {
    let domain = int_sockopt(fd, libc::SO_DOMAIN)?;
    let kind = int_sockopt(fd, libc::SO_TYPE)?;
    let listening = int_sockopt(fd, libc::SO_ACCEPTCONN)?;
    if !domains.contains(&domain) || kind != libc::SOCK_STREAM || listening != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "file descriptor {fd} is not a listening {what} stream socket \
                 (domain {domain}, type {kind}, listening {listening})"
            ),
        ));
    }
    // SAFETY: systemd hands these descriptors to this process alone; the caller
    // adopts each at most once (the LISTEN_FDS entry is consumed), and the
    // checks above prove it is an open socket.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn adopt_unix_listener(fd: RawFd) -> io::Result<std::os::unix::net::UnixListener> {
    adopt_listener(fd, &[libc::AF_UNIX], "Unix").map(std::os::unix::net::UnixListener::from)
}

pub(crate) fn adopt_tcp_listener(fd: RawFd) -> io::Result<std::net::TcpListener> {
    adopt_listener(fd, &[libc::AF_INET, libc::AF_INET6], "TCP").map(std::net::TcpListener::from)
}

/// Closes a passed descriptor that no listener claimed, so it does not leak.
pub(crate) fn close_unclaimed(fd: RawFd) {
    // SAFETY: the descriptor was passed to this process by systemd and nothing
    // else has adopted it, so this is its only owner.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
}

/// Ignores SIGXFSZ, so a write past RLIMIT_FSIZE fails with EFBIG (and the
/// audit store degrades, fail-closed) instead of killing the process.
pub(crate) fn ignore_file_size_signal() -> io::Result<()> {
    // SAFETY: SIG_IGN installs no handler code, so nothing can run in signal
    // context; called once at start-up before other threads exist.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGXFSZ,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .map(drop)
    .map_err(io::Error::from)
}
