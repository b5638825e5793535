//! keel-agent: the in-guest update daemon. The network daemon (push over vsock, TCP and a
//! Unix socket; status; mark-good; reboot) is tracked in the agent issue; this binary
//! reserves the name and fails loudly rather than pretending to work.

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "keel-agent {} is not implemented yet",
        env!("CARGO_PKG_VERSION")
    )
}
