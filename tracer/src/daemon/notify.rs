//! systemd's service notification (`sd_notify(3)`): one datagram per state change to the
//! socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). Without
//! the variable (not started by systemd with `Type=notify`) every call does nothing.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Where the service manager listens, if it does.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; none when unset, or (with a warning) unusable.
    pub fn from_env() -> Option<Self> {
        let name = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = name.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(abstract_name) => {
                use std::os::linux::net::SocketAddrExt as _;
                SocketAddr::from_abstract_name(abstract_name)
            }
            None => SocketAddr::from_pathname(std::path::Path::new(&name)),
        };
        let made = addr.and_then(|addr| Ok((UnixDatagram::unbound()?, addr)));
        match made {
            Ok((socket, addr)) => Some(Self { socket, addr }),
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET {}: {e}; not notifying", name.display());
                None
            }
        }
    }

    /// Sends `state` (`KEY=value` lines); a failure is a warning, never fatal.
    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::warn!("notifying the service manager: {e}");
        }
    }

    /// Attached and serving.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    /// Re-reading the configuration (SIGHUP); `ready` follows.
    pub fn reloading(&self) {
        let usec = crate::power::monotonic_ns() / 1000;
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    /// Shutting down: draining, finalising, detaching.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_each_state_as_one_datagram() {
        let dir = std::env::temp_dir().join(format!("tracer-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("notify");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let n = Notifier {
            socket: UnixDatagram::unbound().expect("socket"),
            addr: SocketAddr::from_pathname(&path).expect("address"),
        };
        n.ready("tracing 2 processes");
        n.reloading();
        n.stopping();
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        for _ in 0..3 {
            let len = listener.recv(&mut buf).expect("datagram");
            got.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
        assert_eq!(got[0], "READY=1\nSTATUS=tracing 2 processes");
        assert!(
            got[1].starts_with("RELOADING=1\nMONOTONIC_USEC="),
            "{}",
            got[1]
        );
        assert_eq!(got[2], "STOPPING=1");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
