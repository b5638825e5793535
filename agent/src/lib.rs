//! keel-agent: the daemon in the booted device. It links only what it runs: no client, no
//! builder (those are the host crates `keelctl` and `keel-build`).
//!
//! | module | concern |
//! |---|---|
//! | [`config`] | `/etc/keel/agent.toml` |
//! | [`transport`] | listeners (TCP, Unix socket, vsock) and peers |
//! | [`tls`] | TLS 1.3 on TCP, the agent proven by its raw public key |
//! | [`identity`] | the agent's own key: made on first start, kept, `.pub` beside it |
//! | [`admission`] | which connections are served: a local and a remote pool, a per-peer cap |
//! | [`server`] | the daemon: bind, announce, accept under a limit, shut down |
//! | [`shared`] | what every connection shares: settings, keys, the push lock |
//! | [`session`] | one connection: hello, then each request authorized and dispatched |
//! | [`authz`] | who may do what: the one check before every request |
//! | [`auth`] | key authentication: the hello's challenge, the authorized keys, the `auth` check |
//! | [`exec`] | one process: prepared (pure), started in its own group, pumped by a task of its own |
//! | [`procs`] | the processes started: registry, bounded output ring for attach and replay |
//! | [`attach`] | a client watching a process: its output out, the client's input in |
//! | [`files`] | `cp` both ways: crash-safe writes, regular files only, size-capped |
//! | [`child`] | how every child starts: default signal dispositions, an empty mask |
//! | [`pty`] | pseudo-terminals for `exec` with a tty |
//! | [`users`] | `/etc/passwd` and `/etc/group` lookups for `exec --user` and an image's `User` |
//! | [`conn`] | framed reads and writes with the idle timeout |
//! | [`intake`] | a push: lock, facts, slot, admit, begin, receive, commit |
//! | [`pull`] | pull mode: poll a channel, admit its manifest as a push, fetch the image into staging |
//! | [`reboot_policy`] | when a pulled image is booted: never, at once, or in a daily window |
//! | [`http`] | the small HTTP/1.1 client pull uses: one GET per connection, bounded, timed; redirects, client certificates |
//! | [`sigv4`] | AWS Signature Version 4 for a private S3 bucket (pure) |
//! | [`delta`] | deltas: what the device holds, the plan, the image assembled in order from seeds and a chunk source |
//! | [`delta_pull`] | a delta pull: the index beside the image, the missing chunks as few merged Range GETs |
//! | [`delta_push`] | a delta push: the signed chunk index in, the need map out, the missing chunks from data frames |
//! | [`seeds`] | the images a device holds, chunked to find what a new image reuses |
//! | [`verify`] | whether a manifest may be staged (pure) |
//! | [`stage`] | receiving into `newimg` crash-safely with constant memory |
//! | [`status`] | what the device runs and holds |
//! | [`control`] | mark-good and reboot |
//! | [`notify`] | sd_notify |
//! | [`init`] | keel as a container image's PID 1: mounts, and a supervisor's decisions (pure) |
//! | [`pid1`] | PID 1's syscalls: signals, the program and the agent started, reaping, power off |
//! | [`memory`] | the heap kept small: one arena, freed pages given back when a connection ends |
//! | [`error`] | the daemon's start-up errors |
//!
//! Imports go one way: server → {tls → identity} and session → {authz, auth, exec, attach, files, intake, control, status} →
//! {procs, delta_push → delta → seeds, stage, verify, users, conn, child}; server → pull → {intake, delta_pull → delta, http → sigv4}; pid1 → {config, init, users, child}.
#![warn(missing_docs)]

pub mod admission;
pub mod attach;
pub mod auth;
pub mod authz;
pub mod child;
pub mod config;
pub mod conn;
pub mod control;
pub mod delta;
pub mod delta_pull;
pub mod delta_push;
pub mod error;
pub mod exec;
pub mod files;
pub mod http;
pub mod identity;
pub mod init;
pub mod intake;
pub mod memory;
pub mod notify;
pub mod pid1;
pub mod procs;
pub mod pty;
pub mod pull;
pub mod reboot_policy;
pub mod seeds;
pub mod server;
pub mod session;
pub mod shared;
pub mod sigv4;
pub mod stage;
pub mod status;
pub mod tls;
pub mod transport;
pub mod users;
pub mod verify;
