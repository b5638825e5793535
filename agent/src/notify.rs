//! sd_notify(3) without libsystemd: one datagram to `$NOTIFY_SOCKET`.

use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1\nSTATUS=...`) when run under systemd; a no-op otherwise.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name)
    } else {
        SocketAddr::from_pathname(&path)
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!("sd_notify {path:?}: {e}");
    }
}

/// How often to send `WATCHDOG=1` when systemd asks for it (`WatchdogSec=` sets
/// `$WATCHDOG_USEC`, for the process `$WATCHDOG_PID` names when set): half the timeout.
pub fn watchdog_interval() -> Option<std::time::Duration> {
    watchdog_interval_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] from the variables' values (pure).
pub fn watchdog_interval_from(
    usec: Option<&str>,
    pid: Option<&str>,
    me: u32,
) -> Option<std::time::Duration> {
    if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(me)) {
        return None;
    }
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    Some(std::time::Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn watchdog_interval_is_half_the_timeout_for_this_process() {
        let f = watchdog_interval_from;
        assert_eq!(f(Some("30000000"), None, 7), Some(Duration::from_secs(15)));
        assert_eq!(
            f(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(f(Some("30000000"), Some("8"), 7), None);
        assert_eq!(f(Some("0"), None, 7), None);
        assert_eq!(f(Some("x"), None, 7), None);
        assert_eq!(f(None, None, 7), None);
    }
}
