//! This process's own TCP sockets, for tests of their options.

use std::os::fd::{BorrowedFd, RawFd};

/// `TCP_NODELAY` of this process's TCP socket from local port `local` to
/// peer port `peer`; `None` if there is none. A test learns its own
/// connection's ports from the server (`CLIENT INFO`,
/// `inet_client_port()`), so that other tests' sockets to the same
/// server, in the same process under `cargo test`, do not count.
pub(crate) fn nodelay_between(local: u16, peer: u16) -> Option<bool> {
    for entry in std::fs::read_dir("/proc/self/fd").expect("reading /proc/self/fd") {
        let Ok(entry) = entry else { continue };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        if !is_socket {
            continue;
        }
        // SAFETY: the descriptor was open a moment ago and is only read
        // here (getsockname, getpeername, getsockopt). If another test
        // closed it meanwhile the calls fail, or ask a descriptor opened
        // since, whose ports then do not match; either way it is skipped.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let port = |a: std::io::Result<socket2::SockAddr>| {
            a.ok().and_then(|a| a.as_socket()).map(|a| a.port())
        };
        if port(sock.local_addr()) == Some(local) && port(sock.peer_addr()) == Some(peer) {
            return sock.tcp_nodelay().ok();
        }
    }
    None
}
