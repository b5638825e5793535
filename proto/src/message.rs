//! Typed requests and responses of the wire protocol (JSON inside [`crate::wire`] frames).
//!
//! Every connection starts with [`Request::Hello`] answered by [`Response::Hello`]; then the
//! client sends requests one at a time and reads one response each. A push is the only
//! exchange with more than two frames: `Push` → `Send{offset}` → data frames for exactly
//! `size - offset` bytes → `Staged` (or `Error`). See `docs/protocol.md`.

use serde::{Deserialize, Serialize};

use crate::bootstate::{Event, ImageRecord, Trial};
use crate::exec::{ExecSpec, ExitStatus, ProcInfo, WinSize, KIND_STDERR, KIND_STDIN, KIND_STDOUT};
use crate::manifest::SignedManifest;
use crate::report::BootVerity;
use crate::wire::{FrameError, KIND_DATA, KIND_MESSAGE};

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// First frame of every connection.
    Hello {
        /// [`crate::wire::PROTOCOL_VERSION`] of the client.
        protocol: u32,
        /// Free text naming the client, for the agent's log.
        client: String,
    },
    /// Asks for [`StatusReport`].
    Status,
    /// Offers an image. The agent answers `Send` (then data frames follow), `UpToDate`, or
    /// `Error` — and checks the signature before it accepts a single image byte.
    Push {
        /// The signed manifest.
        manifest: SignedManifest,
        /// Continue a partial upload of the same manifest if one is on disk.
        #[serde(default)]
        resume: bool,
        /// The client can send the manifest's chunk index and only the chunks the agent
        /// lacks (answered `send-index` instead of `send` when the agent can use it).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        delta: bool,
    },
    /// Ends the booted image's trial (Unix socket, root only).
    MarkGood,
    /// Syncs and reboots the machine (Unix socket, root only).
    Reboot,
    /// Removes the staged image and any partial upload (local root, or an authorized key).
    Unstage,
    /// Polls the pull channel now instead of at the next scheduled time (local root, or an
    /// authorized key).
    PullNow,
    /// Authenticates the session as `public_key` (base64 of its 32 raw bytes): `signature`
    /// (base64) is its ed25519 signature over [`crate::exec::auth_message`] of the hello's
    /// challenge. Answered `authenticated` or `error` (`not-authorized`).
    Auth {
        /// The client's public key, base64 of the 32 raw bytes.
        public_key: String,
        /// The signature, base64 of 64 bytes.
        signature: String,
    },
    /// Runs a process; answered `started`, then its streams, then `exited` (see
    /// [`crate::exec`]).
    Exec(ExecSpec),
    /// Writes the guest file `path` (`keelctl cp SRC :PATH`): answered `send`, then exactly
    /// `size` bytes in data frames and an empty data frame, then `done` once the file is in
    /// place (temporary file, fsync, rename).
    CopyIn {
        /// Absolute guest path.
        path: String,
        /// Permission bits.
        mode: u32,
        /// Bytes that follow.
        size: u64,
    },
    /// Reads the guest file `path` (`keelctl cp :PATH DST`): answered `sending`, then its
    /// bytes in data frames, an empty data frame, then `done`.
    CopyOut {
        /// Absolute guest path.
        path: String,
    },
    /// Watches a process started earlier: answered `started`, then its output from what is
    /// buffered on (as in an exec), then `exited`.
    Attach {
        /// Its id.
        id: u64,
    },
    /// Lists the processes (answered `processes`).
    Ps,
    /// Sends a signal to a process's group.
    Kill {
        /// Its id.
        id: u64,
        /// The signal number.
        signal: i32,
    },
    /// The process's stdin reached its end (during an exec; on a terminal, an EOF
    /// character).
    CloseStdin,
    /// The terminal of an exec with a tty changed size.
    Resize(WinSize),
    /// Sends a signal to the process's group (during an exec).
    Signal {
        /// The signal number (`SIGINT` = 2, ...).
        signal: i32,
    },
}

impl Request {
    /// The operation's name, for logs.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Status => "status",
            Request::Push { .. } => "push",
            Request::MarkGood => "mark-good",
            Request::Reboot => "reboot",
            Request::Unstage => "unstage",
            Request::PullNow => "pull-now",
            Request::Auth { .. } => "auth",
            Request::Exec(_) => "exec",
            Request::CopyIn { .. } => "copy-in",
            Request::CopyOut { .. } => "copy-out",
            Request::CloseStdin => "close-stdin",
            Request::Resize(_) => "resize",
            Request::Attach { .. } => "attach",
            Request::Ps => "ps",
            Request::Kill { .. } => "kill",
            Request::Signal { .. } => "signal",
        }
    }
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Response {
    /// Answer to `Hello`.
    Hello {
        /// The agent's protocol version.
        protocol: u32,
        /// The agent's version.
        agent: String,
        /// Largest frame the agent accepts.
        max_frame: u32,
        /// Hex of a fresh random challenge for [`Request::Auth`] (absent from agents older
        /// than key authentication).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        challenge: Option<String>,
    },
    /// The session now acts as this key.
    Authenticated {
        /// Its fingerprint ([`crate::exec::fingerprint`]).
        key: String,
    },
    /// The process of an exec runs (or, for `attach`, is watched).
    Started {
        /// Its process id in the guest.
        pid: u32,
        /// Its id for `attach`, `kill` and `ps`.
        #[serde(default)]
        id: u64,
    },
    /// Output was dropped while no client was attached (sent before the replay).
    Dropped {
        /// How many bytes.
        bytes: u64,
    },
    /// Answer to `ps`.
    Processes {
        /// Every process the agent remembers.
        processes: Vec<ProcInfo>,
    },
    /// The process of an exec ended; its output has all been sent.
    Exited(ExitStatus),
    /// A file follows (answer to `copy-out`).
    Sending {
        /// Its size.
        size: u64,
        /// Its permission bits.
        mode: u32,
    },
    /// Answer to `Status`.
    Status(Box<StatusReport>),
    /// The manifest is accepted: send the image from `offset` (0 unless resuming).
    Send {
        /// First byte the agent still needs.
        offset: u64,
    },
    /// A delta push: send the chunk index (`size` bytes in data frames, then an empty one).
    SendIndex {
        /// The index's size, as the manifest signs it.
        size: u64,
    },
    /// A delta push: send the bytes of the chunks `need` marks, in order, in data frames,
    /// then an empty one. The image is assembled from `offset` (a chunk's start).
    SendChunks {
        /// Where assembly starts: 0, or the chunk boundary a resumed upload reached.
        offset: u64,
        /// Which chunks to send ([`crate::chunks::NeedMap`], base64).
        need: String,
        /// How many chunks that is.
        chunks: u64,
        /// How many bytes that is.
        bytes: u64,
        /// Bytes the agent takes from images it holds.
        reused: u64,
    },
    /// The image was received, verified and committed on `newimg`.
    Staged {
        /// The staged image.
        image: ImageRecord,
        /// Bytes received in this connection.
        received: u64,
        /// Offset the upload resumed from (0 for a fresh upload).
        resumed_from: u64,
        /// Bytes taken from images already on the device (a delta push).
        #[serde(default)]
        reused: u64,
    },
    /// Nothing to do: this version is already booted or staged.
    UpToDate {
        /// Human-readable reason.
        message: String,
    },
    /// A control request succeeded.
    Done {
        /// What was done.
        message: String,
    },
    /// The request was refused or failed.
    Error {
        /// Machine-readable class.
        code: ErrorCode,
        /// What was wrong, for humans.
        message: String,
    },
}

/// What the agent sends when it connects out to the host (the ready announce), one frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Announce {
    /// The agent is listening.
    Ready {
        /// The agent's version.
        agent: String,
        /// The booted image, if known.
        booted: Option<ImageRecord>,
        /// Boot counter from the boot report.
        boot_count: Option<u64>,
        /// What the agent listens on.
        listening: Vec<String>,
    },
}

/// Machine-readable error classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The frame or JSON was malformed, or the request came out of order.
    BadRequest,
    /// The client speaks another protocol version.
    UnsupportedProtocol,
    /// A frame exceeded the size limit.
    FrameTooLarge,
    /// Another push is in progress, or too many connections.
    Busy,
    /// The manifest is malformed.
    BadManifest,
    /// No trusted key verifies the signature.
    BadSignature,
    /// The image is for another product.
    WrongName,
    /// The version is not above the booted or staged one.
    Downgrade,
    /// The running version is below the manifest's min_version.
    MinVersion,
    /// The image was rolled back before on this device.
    Rejected,
    /// The image does not fit on `newimg`.
    NoSpace,
    /// The stream had fewer or more bytes than the manifest declares.
    SizeMismatch,
    /// The received bytes do not hash to the manifest's digest.
    HashMismatch,
    /// A chunk index does not match its manifest or is not an index.
    BadIndex,
    /// The peer is not allowed to do this (control needs the Unix socket as root).
    NotPermitted,
    /// The request needs an authorized key (or local root), and the session has none, or
    /// the key offered is not in `authorized_keys`, or its signature is wrong.
    NotAuthorized,
    /// The request is valid but the state does not allow it (e.g. no trial to end).
    InvalidState,
    /// The process of an exec could not be started (no such program or directory).
    ExecFailed,
    /// The path does not exist (a file to copy out, a directory to copy into).
    NotFound,
    /// The peer was silent longer than the idle timeout.
    Timeout,
    /// A read, write or sync failed on the agent's side.
    Io,
    /// The agent is not configured for this (e.g. no `newimg`).
    Unavailable,
}

impl std::fmt::Display for ErrorCode {
    /// The wire name (`no-space`, `bad-signature`, ...).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_string(self).unwrap_or_default();
        f.write_str(s.trim_matches('"'))
    }
}

/// What `status` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The agent's version.
    pub agent_version: String,
    /// The booted image, from `boot.json` (None when initstage left no report).
    pub booted: Option<ImageRecord>,
    /// The image file name on `img`.
    pub image_file: String,
    /// The staged image on `newimg`, if a complete one is there.
    pub staged: Option<ImageRecord>,
    /// A partial upload on disk: (manifest version, bytes received, size).
    pub partial: Option<PartialUpload>,
    /// The trial of the booted image, if it is on trial.
    pub trial: Option<Trial>,
    /// Boots left in the trial after this one.
    pub tries_left: Option<u32>,
    /// The previous image kept as `-old`.
    pub old: Option<ImageRecord>,
    /// Free bytes on `newimg`.
    pub newimg_free: Option<u64>,
    /// Whether a push is running now.
    pub push_in_progress: bool,
    /// What initstage did this boot.
    pub boot_actions: Vec<String>,
    /// The last events of the boot state, oldest first.
    pub events: Vec<Event>,
    /// Why the boot state could not be read (absent when it was, or when there is none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_error: Option<String>,
    /// The fingerprint (`SHA256:…`) of the agent's TLS identity, when it serves TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Pull mode's state, when `[pull]` is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<PullStatus>,
    /// The last image the agent staged since it started: how its bytes came.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transfer: Option<Transfer>,
    /// The dm-verity device the booted image is read through, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityStatus>,
}

/// How a staged image's bytes came: over the link or from images already on the device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// The image's version.
    pub version: u64,
    /// `push` or `pull`.
    pub how: String,
    /// Whether only missing chunks were moved.
    pub delta: bool,
    /// Bytes that came over the link (the image's, without the index).
    pub received: u64,
    /// Bytes taken from the images the device held.
    pub reused: u64,
    /// Bytes of the chunk index fetched.
    pub index: u64,
}

/// The booted image's dm-verity device: what initstage set up and what the kernel says now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerityStatus {
    /// What initstage set up (its `boot.json`): root hash, device, what a corrupt block does.
    #[serde(flatten)]
    pub setup: BootVerity,
    /// The live table as the kernel reports it (`verity 1 7:0 7:0 4096 ...`).
    pub kernel_table: Option<String>,
    /// The target's status: `V` (verified so far) or `C` (corruption seen).
    pub kernel_status: Option<String>,
    /// Why the kernel could not be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where pull mode stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullStatus {
    /// The channel's base URL.
    pub url: String,
    /// When the last poll ended (Unix seconds).
    pub last_poll: Option<u64>,
    /// When the next one starts (Unix seconds).
    pub next_poll: Option<u64>,
    /// What the last poll did, e.g. `no change (304)`, `staged version 2`.
    pub last_result: Option<String>,
    /// Why the last failed poll failed (kept until a poll succeeds).
    pub last_error: Option<String>,
    /// Failed polls in a row.
    pub failures: u32,
}

/// An interrupted upload that a `resume` can continue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialUpload {
    /// Version of the image being received.
    pub version: u64,
    /// Bytes on disk.
    pub received: u64,
    /// Size the manifest declares.
    pub size: u64,
}

/// Why a frame body is not a valid message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    /// The frame itself was refused.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The body is empty (no kind byte).
    #[error("empty frame (no kind byte)")]
    Empty,
    /// The kind byte is unknown.
    #[error("unknown frame kind 0x{0:02x}")]
    Kind(u8),
    /// A data or stream frame arrived where a message was expected.
    #[error("data arrived where a message was expected")]
    UnexpectedData,
    /// The JSON did not parse as the expected message.
    #[error("malformed message: {0}")]
    Json(String),
}

/// A decoded frame body.
#[derive(Debug, PartialEq, Eq)]
pub enum Body<'a> {
    /// A JSON message (still to be parsed as request or response).
    Message(&'a [u8]),
    /// Image bytes.
    Data(&'a [u8]),
    /// Bytes of a process stream: its kind ([`KIND_STDIN`], [`KIND_STDOUT`],
    /// [`KIND_STDERR`]) and the bytes.
    Stream(u8, &'a [u8]),
}

/// Splits a frame body into its kind and payload.
pub fn split_body(body: &[u8]) -> Result<Body<'_>, MessageError> {
    match body.split_first() {
        None => Err(MessageError::Empty),
        Some((&KIND_MESSAGE, rest)) => Ok(Body::Message(rest)),
        Some((&KIND_DATA, rest)) => Ok(Body::Data(rest)),
        Some((&k, rest)) if k == KIND_STDIN || k == KIND_STDOUT || k == KIND_STDERR => {
            Ok(Body::Stream(k, rest))
        }
        Some((&k, _)) => Err(MessageError::Kind(k)),
    }
}

/// Parses a frame body as a request.
pub fn parse_request(body: &[u8]) -> Result<Request, MessageError> {
    match split_body(body)? {
        Body::Message(json) => {
            serde_json::from_slice(json).map_err(|e| MessageError::Json(e.to_string()))
        }
        Body::Data(_) | Body::Stream(..) => Err(MessageError::UnexpectedData),
    }
}

/// Parses a frame body as a response.
pub fn parse_response(body: &[u8]) -> Result<Response, MessageError> {
    match split_body(body)? {
        Body::Message(json) => {
            serde_json::from_slice(json).map_err(|e| MessageError::Json(e.to_string()))
        }
        Body::Data(_) | Body::Stream(..) => Err(MessageError::UnexpectedData),
    }
}

/// A whole frame (header, kind, JSON) carrying `msg`, through [`crate::wire::encode`]:
/// refused when it would exceed the frame limit.
pub fn message_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let json = serde_json::to_vec(msg).expect("messages serialize");
    crate::wire::encode(KIND_MESSAGE, &json)
}

/// The 5-byte header of a data frame carrying `len` image bytes.
pub fn data_header(len: usize) -> Result<[u8; 5], FrameError> {
    crate::wire::encode_header(KIND_DATA, len)
}

impl Response {
    /// An error response.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Response {
        Response::Error {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Decoder;

    #[test]
    fn verity_status_keeps_initstage_fields_at_its_top_level() {
        let st = VerityStatus {
            setup: BootVerity {
                root_hash: "ab".into(),
                device: "/dev/mapper/keel-root".into(),
                on_corruption: "restart_on_corruption".into(),
            },
            kernel_status: Some("V".into()),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::to_value(&st).unwrap();
        assert_eq!(v["root_hash"], "ab");
        assert_eq!(v["device"], "/dev/mapper/keel-root");
        assert_eq!(v["on_corruption"], "restart_on_corruption");
        assert_eq!(v["kernel_status"], "V");
        assert_eq!(serde_json::from_value::<VerityStatus>(v).unwrap(), st);
    }

    fn round_trip(req: Request) {
        let f = message_frame(&req).unwrap();
        let mut d = Decoder::default();
        d.push(&f);
        let body = d.next_frame().unwrap().unwrap();
        assert_eq!(parse_request(&body).unwrap(), req);
    }

    #[test]
    fn requests_round_trip() {
        round_trip(Request::Hello {
            protocol: 1,
            client: "t".into(),
        });
        round_trip(Request::Status);
        round_trip(Request::MarkGood);
        round_trip(Request::PullNow);
        round_trip(Request::Reboot);
        round_trip(Request::Exec(ExecSpec {
            argv: vec!["uname".into(), "-a".into()],
            env: vec![("A".into(), "b".into())],
            timeout_secs: Some(5),
            ..ExecSpec::default()
        }));
        round_trip(Request::Signal { signal: 2 });
        round_trip(Request::CloseStdin);
    }

    #[test]
    fn exec_wire_names() {
        let j = serde_json::to_string(&Request::Exec(ExecSpec {
            argv: vec!["true".into()],
            ..ExecSpec::default()
        }))
        .unwrap();
        assert_eq!(j, r#"{"op":"exec","argv":["true"]}"#);
        let j = serde_json::to_string(&Response::Exited(ExitStatus {
            code: Some(0),
            signal: None,
            timed_out: false,
        }))
        .unwrap();
        assert_eq!(
            j,
            r#"{"op":"exited","code":0,"signal":null,"timed_out":false}"#
        );
        assert_eq!(
            split_body(&[KIND_STDOUT, b'x']),
            Ok(Body::Stream(KIND_STDOUT, b"x"))
        );
    }

    #[test]
    fn wire_names_are_stable() {
        let f = message_frame(&Request::MarkGood).unwrap();
        assert_eq!(&f[5..], br#"{"op":"mark-good"}"#);
        let e = Response::error(ErrorCode::NoSpace, "x");
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(j, r#"{"op":"error","code":"no-space","message":"x"}"#);
    }

    #[test]
    fn bad_bodies_are_named() {
        assert_eq!(parse_request(&[]), Err(MessageError::Empty));
        assert_eq!(parse_request(&[9, 1]), Err(MessageError::Kind(9)));
        assert_eq!(
            parse_request(&[KIND_DATA, 1, 2]),
            Err(MessageError::UnexpectedData)
        );
        assert!(matches!(
            parse_request(&[KIND_MESSAGE, b'{']),
            Err(MessageError::Json(_))
        ));
        assert!(matches!(
            parse_request(b"\x01{\"op\":\"format-disk\"}"),
            Err(MessageError::Json(_))
        ));
    }

    #[test]
    fn data_header_counts_the_kind_byte() {
        assert_eq!(data_header(3).unwrap(), [0, 0, 0, 4, KIND_DATA]);
    }
}
