//! This process's own TCP sockets, for tests of their options.

use std::os::fd::{BorrowedFd, RawFd};

/// Whether any of this process's TCP sockets connected to one of `ports`
/// sends without delay (`TCP_NODELAY`); `None` when none is connected to
/// them. Other tests of the same process may have sockets to the same
/// ports, so a test asks whether its connection is among those that do,
/// not whether all do.
pub(crate) fn any_nodelay_to(ports: &[u16]) -> Option<bool> {
    let mut found = None;
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
        // SAFETY: the descriptor was open a moment ago and only read here;
        // if another test closed it meanwhile, the calls below fail (or ask
        // a descriptor opened since), and it is skipped or counted as found.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let to_port = sock
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| ports.contains(&a.port()));
        if let (true, Ok(on)) = (to_port, sock.tcp_nodelay()) {
            found = Some(found.unwrap_or(false) || on);
        }
    }
    found
}
