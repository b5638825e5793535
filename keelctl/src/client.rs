//! The blocking client: hello, requests, and a push that resumes after a cut.

use std::io::{Read, Write};
use std::time::Duration;

use keel_proto::endpoint::Endpoint;
use keel_proto::exec::{b64, sign_auth};
use keel_proto::manifest::SigningKey;
use keel_proto::message::{message_frame, parse_response, Request, Response};
use keel_proto::wire::{frame_len, PROTOCOL_VERSION};

use crate::error::{Error, Result};
use crate::known::Trust;
use crate::stream::{open, Stream};

/// Image bytes per data frame.
pub const DATA_FRAME: usize = 256 * 1024;

/// How to reach an agent.
#[derive(Debug, Clone)]
pub struct Dial {
    /// How long to keep retrying the connection (the agent or guest may not listen yet).
    pub wait: Duration,
    /// The bound on every single read and write.
    pub timeout: Duration,
    /// How the agent's key is judged on TCP (TLS).
    pub trust: Trust,
}

/// A session with an agent.
#[derive(Debug)]
pub struct Client {
    s: Stream,
    peer: String,
    /// The agent's version, from its hello.
    pub agent: String,
    /// The hello's challenge, for [`Client::authenticate`].
    challenge: Option<Vec<u8>>,
}

/// Reads one frame body (blocking).
pub fn read_frame(r: &mut impl Read, peer: &str) -> Result<Vec<u8>> {
    let mut h = [0u8; 4];
    r.read_exact(&mut h).map_err(|source| Error::Net {
        op: "read reply",
        peer: peer.to_string(),
        source,
    })?;
    let len = frame_len(h).map_err(|e| Error::Protocol {
        peer: peer.to_string(),
        detail: format!("reply: {e}"),
    })?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|source| Error::Net {
        op: "read reply",
        peer: peer.to_string(),
        source,
    })?;
    Ok(body)
}

pub use crate::push::Pushed;

impl Client {
    /// Connects and exchanges hellos.
    pub fn connect(ep: &Endpoint, dial: &Dial) -> Result<Client> {
        let s = open(ep, dial.wait, dial.timeout, &dial.trust)?;
        Client::over(s, ep.to_string(), dial.timeout)
    }

    /// Exchanges hellos over an open stream.
    pub fn over(s: Stream, peer: String, timeout: Duration) -> Result<Client> {
        s.set_timeout(Some(timeout)).map_err(|source| Error::Net {
            op: "set timeout",
            peer: peer.clone(),
            source,
        })?;
        let mut c = Client {
            s,
            peer,
            agent: String::new(),
            challenge: None,
        };
        match c.call(&Request::Hello {
            protocol: PROTOCOL_VERSION,
            client: format!("keelctl {}", env!("CARGO_PKG_VERSION")),
        })? {
            Response::Hello {
                agent, challenge, ..
            } => {
                c.agent = agent;
                c.challenge =
                    challenge.and_then(|h| keel_proto::hex::decode::<32>(&h).map(|b| b.to_vec()));
                Ok(c)
            }
            other => Err(c.unexpected(&other)),
        }
    }

    fn unexpected(&self, r: &Response) -> Error {
        match r {
            Response::Error { code, message } => Error::Refused {
                code: *code,
                message: message.clone(),
            },
            other => Error::Protocol {
                peer: self.peer.clone(),
                detail: format!("unexpected reply {other:?}"),
            },
        }
    }

    fn net(&self, op: &'static str) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Net {
            op,
            peer: self.peer.clone(),
            source,
        }
    }

    /// Reads one response.
    pub fn response(&mut self) -> Result<Response> {
        let body = read_frame(&mut self.s, &self.peer)?;
        parse_response(&body).map_err(|e| Error::Protocol {
            peer: self.peer.clone(),
            detail: e.to_string(),
        })
    }

    /// Sends a request and reads its response (an `Error` response is returned as is).
    pub fn call(&mut self, req: &Request) -> Result<Response> {
        let f = message_frame(req).map_err(|e| Error::Protocol {
            peer: self.peer.clone(),
            detail: format!("request {}: {e}", req.op()),
        })?;
        if let Err(e) = self.s.write_all(&f) {
            // The agent may have answered (busy) and closed before reading: its answer
            // explains more than the broken pipe does.
            if let Ok(r @ Response::Error { .. }) = self.response() {
                return Ok(r);
            }
            return Err(self.net("send request")(e));
        }
        self.response()
    }

    /// Sends a request; an `Error` response becomes [`Error::Refused`].
    pub fn expect(&mut self, req: &Request) -> Result<Response> {
        match self.call(req)? {
            Response::Error { code, message } => Err(Error::Refused { code, message }),
            r => Ok(r),
        }
    }

    /// Authenticates the session with `key`; returns its fingerprint as the agent names it.
    pub fn authenticate(&mut self, key: &SigningKey) -> Result<String> {
        let Some(challenge) = self.challenge.clone() else {
            return Err(Error::Protocol {
                peer: self.peer.clone(),
                detail: "the agent's hello carries no challenge: it is too old for key \
                         authentication"
                    .into(),
            });
        };
        let req = Request::Auth {
            public_key: b64(key.verifying_key().as_bytes()),
            signature: b64(&sign_auth(key, &challenge, self.s.binding())),
        };
        match self.expect(&req)? {
            Response::Authenticated { key } => Ok(key),
            other => Err(self.unexpected(&other)),
        }
    }

    /// The connection itself, for an exchange that is not request and response (an exec).
    pub fn into_stream(self) -> (Stream, String) {
        (self.s, self.peer)
    }

    /// Writes raw bytes (a frame the caller built).
    pub fn send_raw(&mut self, b: &[u8]) -> Result<()> {
        self.s.write_all(b).map_err(self.net("send"))
    }

    /// The error for a reply that does not fit: a refusal as [`Error::Refused`], anything
    /// else as a protocol error.
    pub fn unexpected_reply(&self, r: &Response) -> Error {
        self.unexpected(r)
    }

    /// A protocol error with this peer.
    pub fn protocol(&self, detail: &str) -> Error {
        Error::Protocol {
            peer: self.peer.clone(),
            detail: detail.to_string(),
        }
    }

    /// The peer's name, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The raw stream (tests write malformed frames through it).
    pub fn stream(&mut self) -> &mut Stream {
        &mut self.s
    }
}

pub use crate::push::{is_cut, push, Offer};
