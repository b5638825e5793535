//! Pull mode (`[pull]`): the agent polls a channel ([`keel_proto::channel`], written by
//! `keelctl publish`) and stages what it finds there, through the very checks and pipeline a
//! push takes. One poll:
//!
//! 1. `GET manifest.json`, conditional on the last one's `ETag` / `Last-Modified`: a 304 (or
//!    the same manifest) ends the poll — one request, a few hundred bytes.
//! 2. The manifest is admitted exactly as a pushed one ([`crate::intake::admit`]: signature,
//!    name, version, rejected digests, space) **before any image byte is fetched**.
//! 3. `GET images/<sha256>`, with `Range` from what an earlier, cut fetch left, streamed into
//!    the staging pipeline (constant memory, hashed end to end, committed crash-safely) — or,
//!    when the manifest signs a chunk index and the device holds images to reuse, a delta
//!    ([`crate::delta_pull`]): `GET images/<sha256>.chunks`, then only the missing chunks'
//!    ranges. A delta that fails other than by a cut is fetched whole at the next poll.
//!
//! When to poll is pure ([`next_wait`]): the interval plus jitter, and after a failure an
//! exponential backoff (from [`BACKOFF_FIRST`], capped at the interval), jittered too. After
//! staging, `[pull] reboot` ([`crate::reboot_policy`]) says whether and when to reboot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_proto::channel;
use keel_proto::manifest::SignedManifest;
use keel_proto::message::{PullStatus, Response};

use crate::config::PullConfig;
use crate::delta::{Held, Prepare};
use crate::http::{self, HttpError};
use crate::reboot_policy::RebootPolicy;
use crate::shared::Shared;
use crate::stage::CHUNK;

/// The first wait after a failed poll; it doubles with each further failure.
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// Largest manifest read.
pub const MAX_MANIFEST: usize = 64 << 10;

/// How long to wait before the next poll: `interval` plus `rand` (0..=u64::MAX) scaled into
/// `jitter`; after `failures` failed polls in a row, [`BACKOFF_FIRST`] doubled per failure
/// instead (never more than the interval), plus up to half of that at random.
pub fn next_wait(interval: Duration, jitter: Duration, failures: u32, rand: u64) -> Duration {
    let frac = |d: Duration| {
        let n = u128::from(rand) * d.as_millis() / u128::from(u64::MAX);
        Duration::from_millis(u64::try_from(n).unwrap_or(u64::MAX))
    };
    if failures == 0 {
        return interval + frac(jitter);
    }
    let back = BACKOFF_FIRST
        .saturating_mul(1u32 << (failures - 1).min(20))
        .min(interval);
    back + frac(back / 2)
}

/// What a poll remembers for the next one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PollState {
    /// The last manifest's `ETag`.
    pub etag: Option<String>,
    /// The last manifest's `Last-Modified`.
    pub last_modified: Option<String>,
    /// Failed polls in a row.
    pub failures: u32,
    /// The image (digest) whose delta failed other than by a cut: fetched whole next time.
    pub full_for: Option<String>,
}

impl PollState {
    /// The conditional headers for the next manifest request.
    pub fn conditions(&self) -> Vec<(&'static str, String)> {
        let mut v = Vec::new();
        if let Some(e) = &self.etag {
            v.push(("If-None-Match", e.clone()));
        }
        if let Some(m) = &self.last_modified {
            v.push(("If-Modified-Since", m.clone()));
        }
        v
    }
}

/// How a poll ended without failing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Polled {
    /// 304: the manifest did not change.
    NotModified,
    /// A manifest the device does not take (already running it, or refused by the same
    /// checks as a push): nothing fetched.
    NotTaken(String),
    /// A new image, fetched and staged.
    Staged {
        /// Its version.
        version: u64,
        /// Bytes fetched in this poll.
        fetched: u64,
        /// Where the fetch started (bytes kept from a cut one).
        resumed_from: u64,
    },
    /// A push was running: this poll did nothing.
    Busy,
}

/// Why a poll failed (the next one backs off).
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The request failed.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The server answered with an unexpected status.
    #[error("{url}: HTTP {status}{hint}")]
    Status {
        /// What was asked.
        url: String,
        /// The status.
        status: u16,
        /// What it likely means.
        hint: &'static str,
    },
    /// The manifest is not one (bad JSON, missing fields).
    #[error("{url}: not a keel manifest: {why}")]
    Manifest {
        /// Where it came from.
        url: String,
        /// What was wrong.
        why: String,
    },
    /// Staging failed (a hash mismatch, a full disk, a cut connection).
    #[error("staging from {url}: {why}")]
    Stage {
        /// The image's URL.
        url: String,
        /// The refusal's message.
        why: String,
    },
}

/// Polls the channel once.
pub async fn poll_once(
    sh: &Arc<Shared>,
    cfg: &PullConfig,
    client: &http::Client,
    st: &mut PollState,
) -> Result<Polled, PullError> {
    let url = channel::join(&cfg.url, channel::MANIFEST);
    let resp = client.get(&url, &st.conditions()).await?;
    match resp.head.status {
        304 => return Ok(Polled::NotModified),
        200 => {}
        status => {
            return Err(PullError::Status {
                url,
                status,
                hint: match status {
                    404 => " (nothing published there yet?)",
                    401 | 403 => {
                        " (the server refuses this device: check [pull.s3] or [pull] client_cert)"
                    }
                    _ => "",
                },
            })
        }
    }
    let etag = resp.head.header("etag").map(str::to_string);
    let modified = resp.head.header("last-modified").map(str::to_string);
    let body = resp.body(MAX_MANIFEST).await?;
    let signed = SignedManifest::from_json(&body).map_err(|e| PullError::Manifest {
        url: url.clone(),
        why: e.to_string(),
    })?;
    let Ok(_guard) = sh.push.try_lock() else {
        return Ok(Polled::Busy);
    };
    // From here this manifest is known: the next poll asks only whether it changed.
    let remember = |st: &mut PollState| {
        st.etag = etag.clone();
        st.last_modified = modified.clone();
    };
    let not_taken = |st: &mut PollState, r: Response| {
        remember(st);
        Ok(Polled::NotTaken(match r {
            Response::UpToDate { message } => message,
            Response::Error { code, message } => format!("{code}: {message}"),
            other => format!("{other:?}"),
        }))
    };
    let sha = signed.manifest.sha256.to_ascii_lowercase();
    let img_url = channel::join(&cfg.url, &channel::image_path(&sha));
    // A delta of this image that failed other than by a cut is not tried again: full.
    let delta_ok = st.full_for.as_deref() != Some(sha.as_str());
    let prepared = if delta_ok {
        match prepare_delta(sh, cfg, client, &signed).await {
            Ok(p) => p,
            Err(r) => return not_taken(st, r),
        }
    } else {
        Prepare::Full
    };
    let size = signed.manifest.size;
    let (p, fetched, delta) = match prepared {
        Prepare::Delta(b) => {
            let (upload, d) = *b;
            let (ranges, plan) = crate::delta_pull::merge(
                &d.index,
                &d.plan,
                crate::delta_pull::MAX_GAP,
                crate::delta_pull::MAX_RANGES,
            );
            let d = crate::delta::Prepared { plan, ..d };
            let mut src = crate::delta_pull::Ranges::new(client, img_url.clone(), ranges);
            tracing::info!(
                "pull of version {} by delta: {} bytes in {} requests, {} bytes reused, from {}",
                signed.manifest.version,
                d.plan.bytes,
                src.requests(),
                d.plan.reused,
                upload.offset()
            );
            let mut p = upload.start();
            let got = crate::delta::receive(&mut src, &mut p, &d).await;
            let got = got.map_err(|(n, e)| (n, read_error(&img_url, e)));
            (p, got, Some((d.plan.reused, d.index_bytes)))
        }
        Prepare::Full => {
            let sh2 = sh.clone();
            let s2 = signed.clone();
            let upload =
                match tokio::task::spawn_blocking(move || crate::intake::admit(&sh2, &s2, true))
                    .await
                    .expect("admit task")
                {
                    Ok(u) => u,
                    Err(r) => return not_taken(st, r),
                };
            let offset = upload.offset();
            let mut p = upload.start();
            let got = fetch_into(client, &img_url, offset, size, &mut p).await;
            (p, got, None)
        }
    };
    let (complete, keep) = match &fetched {
        Ok(_) => (true, false),
        // A server answer that is not this image: nothing of it is kept.
        Err((_, PullError::Status { .. } | PullError::Stage { .. })) => (false, false),
        // A cut or a timeout: what arrived is kept, the next poll resumes from it.
        Err(_) => (false, true),
    };
    if delta.is_some() && !complete && !keep {
        st.full_for = Some(sha.clone());
    }
    let resumed_from = p.resumed_from();
    let finished = tokio::task::spawn_blocking(move || p.finish(complete, keep))
        .await
        .expect("finish task");
    match (fetched, finished) {
        (Ok(n), Ok(image)) => {
            remember(st);
            let (reused, index) = delta.unwrap_or((0, 0));
            sh.record(keel_proto::message::Transfer {
                version: image.version,
                how: "pull".into(),
                delta: delta.is_some(),
                received: n,
                reused,
                index,
            });
            Ok(Polled::Staged {
                version: image.version,
                fetched: n,
                resumed_from,
            })
        }
        (Err((_, e)), _) => Err(e),
        (Ok(_), Err(r)) => {
            if delta.is_some() {
                st.full_for = Some(sha);
            }
            Err(PullError::Stage {
                url: img_url,
                why: format!("{}: {}", r.code, r.message),
            })
        }
    }
}

/// A delta's read error as a poll's: a cut (kept, resumed) or a wrong answer (dropped).
fn read_error(url: &str, e: crate::conn::ReadError) -> PullError {
    use crate::conn::ReadError;
    match e {
        ReadError::Protocol(r) => PullError::Stage {
            url: url.to_string(),
            why: format!("{}: {}", r.code, r.message),
        },
        ReadError::WriterStopped => PullError::Stage {
            url: url.to_string(),
            why: "the writer stopped".into(),
        },
        other => PullError::Http(HttpError::Response {
            url: url.to_string(),
            why: other.describe(Duration::ZERO),
        }),
    }
}

/// Admits `signed` and, when the device holds its bytes or the chunks of its signed index
/// (fetched from beside the image), begins a delta. `Err`: the admission's answer.
async fn prepare_delta(
    sh: &Arc<Shared>,
    cfg: &PullConfig,
    client: &http::Client,
    signed: &SignedManifest,
) -> Result<Prepare, Response> {
    let (sh2, s2) = (sh.clone(), signed.clone());
    let held = tokio::task::spawn_blocking(move || crate::delta::look(&sh2, &s2))
        .await
        .expect("admit task")?;
    let (sh2, s2) = (sh.clone(), signed.clone());
    let r = match held {
        Held::Nothing => return Ok(Prepare::Full),
        Held::Same(path) => {
            tokio::task::spawn_blocking(move || crate::delta::begin_copy(&sh2, &s2, true, path))
                .await
                .expect("plan task")?
        }
        Held::Seeds(seeds, cref) => {
            let Some((index, n)) =
                crate::delta_pull::fetch_index(client, &cfg.url, signed, &cref).await
            else {
                return Ok(Prepare::Full);
            };
            Some(
                tokio::task::spawn_blocking(move || {
                    crate::delta::begin_from_seeds(&sh2, &s2, true, index, n, seeds)
                })
                .await
                .expect("plan task")?,
            )
        }
    };
    Ok(r.map_or(Prepare::Full, |x| Prepare::Delta(Box::new(x))))
}

/// Fetches the image from `offset` into the pipeline; returns the bytes fetched, or how many
/// came before the failure.
async fn fetch_into(
    client: &http::Client,
    url: &str,
    offset: u64,
    size: u64,
    p: &mut crate::stage::Pipeline,
) -> Result<u64, (u64, PullError)> {
    let range = [("Range", format!("bytes={offset}-"))];
    let headers: &[(&str, String)] = if offset > 0 { &range } else { &[] };
    let mut resp = client.get(url, headers).await.map_err(|e| (0, e.into()))?;
    let status = resp.head.status;
    // A server that ignores Range sends it all: the kept part is read past.
    let mut skip = match (status, resp.head.range_start()) {
        (206, Some(s)) if s == offset => 0,
        (200, _) => offset,
        _ => {
            return Err((
                0,
                PullError::Status {
                    url: url.to_string(),
                    status,
                    hint: if status == 404 {
                        " (the manifest names an image not on the server: published before its image?)"
                    } else {
                        ""
                    },
                },
            ))
        }
    };
    if resp.remaining != size - offset + skip {
        return Err((
            0,
            PullError::Stage {
                url: url.to_string(),
                why: format!(
                    "the server sends {} bytes from offset {}, the manifest makes the image {size} bytes",
                    resp.remaining,
                    offset - skip
                ),
            },
        ));
    }
    let mut got = 0u64;
    let mut cur: Option<crate::stage::Chunk> = None;
    let mut sink = vec![0u8; if skip > 0 { 64 << 10 } else { 0 }];
    while skip > 0 {
        let k = sink.len().min(usize::try_from(skip).unwrap_or(usize::MAX));
        let n = resp.read(&mut sink[..k]).await.map_err(|e| (0, e.into()))?;
        skip -= n as u64;
    }
    let stopped = |got| {
        (
            got,
            PullError::Stage {
                url: url.to_string(),
                why: "the writer stopped".into(),
            },
        )
    };
    while resp.remaining > 0 {
        if cur.is_none() {
            cur = Some(p.take().await.ok_or_else(|| stopped(got))?);
        }
        let c = cur.as_mut().expect("buffer");
        let n = match resp.read(&mut c.buf[c.len..CHUNK]).await {
            Ok(n) => n,
            Err(e) => {
                if c.len > 0 {
                    p.put(cur.take().expect("buffer"));
                }
                return Err((got, e.into()));
            }
        };
        c.len += n;
        got += n as u64;
        if c.len == CHUNK && !p.put(cur.take().expect("buffer")) {
            return Err(stopped(got));
        }
    }
    if let Some(c) = cur.take() {
        if c.len > 0 && !p.put(c) {
            return Err(stopped(got));
        }
    }
    Ok(got)
}

/// Largest secret key file read.
const MAX_SECRET: u64 = 4096;

/// The HTTP client for `cfg`'s channel: its trust roots and client identity, its timeout,
/// and the bucket's credentials (the secret read from its file). An error names the setting.
pub fn client(cfg: &PullConfig) -> Result<http::Client, String> {
    let identity = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => Some(http::ClientIdentity { cert, key }),
        _ => None,
    };
    let tls = http::tls_connector(cfg.ca_file.as_deref(), identity)?;
    let s3 = match &cfg.s3 {
        None => None,
        Some(s) => {
            let f = &s.secret_access_key_file;
            let raw = keel_sys::durable::read_regular(f, MAX_SECRET)
                .map_err(|e| format!("[pull.s3] secret_access_key_file: {e}"))?
                .ok_or_else(|| {
                    format!(
                        "[pull.s3] secret_access_key_file {}: no such file",
                        f.display()
                    )
                })?;
            let secret = String::from_utf8(raw)
                .ok()
                .and_then(|t| t.lines().next().map(|l| l.trim().to_string()))
                .filter(|l| !l.is_empty())
                .ok_or_else(|| {
                    format!(
                        "[pull.s3] secret_access_key_file {}: no secret key on its first line",
                        f.display()
                    )
                })?;
            let origin = http::parse_url(&cfg.url).map_err(|e| e.to_string())?;
            Some((
                origin,
                crate::sigv4::Credentials {
                    access_key_id: s.access_key_id.clone(),
                    secret,
                    region: s.region.clone(),
                },
            ))
        }
    };
    Ok(http::Client::new(
        tls,
        Duration::from_secs(cfg.timeout_secs),
        s3,
    ))
}

fn random() -> u64 {
    let mut b = [0u8; 8];
    let _ = keel_sys::random::fill(&mut b);
    u64::from_le_bytes(b)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reboots into the staged `version` when `policy` says (a task of its own; a newer image
/// staged meanwhile is the one booted: initstage takes whatever is staged).
fn schedule_reboot(sh: &Arc<Shared>, policy: &RebootPolicy, label: &str, version: u64) {
    let Some(delay) = policy.delay(u32::try_from(unix_now() % 86_400).unwrap_or(0)) else {
        return;
    };
    tracing::info!(
        version,
        in_secs = delay.as_secs(),
        "pull: rebooting into the staged image ([pull] reboot = {label:?})"
    );
    let cmd = sh.config.reboot_command.clone();
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let r = tokio::task::spawn_blocking(move || crate::control::reboot(cmd.as_deref()))
            .await
            .expect("reboot task");
        if let Err(r) = r {
            tracing::error!("reboot failed: {}", r.message);
        }
    });
}

/// One line for what a poll did (status and log).
pub fn describe(p: &Polled) -> String {
    match p {
        Polled::NotModified => "no change (304)".into(),
        Polled::NotTaken(why) => format!("manifest not taken: {why}"),
        Polled::Staged {
            version,
            fetched,
            resumed_from,
        } => format!(
            "staged version {version} ({fetched} bytes fetched, resumed from {resumed_from}); it is installed at the next boot"
        ),
        Polled::Busy => "a push was running: skipped".into(),
    }
}

/// Polls forever: the first poll after a random part of the jitter (a fleet that boots
/// together does not poll together), then as [`next_wait`] says, or at once on
/// `pull-now`. One log line per poll; the state in [`Shared::pull`] for `status`.
pub async fn run(sh: Arc<Shared>, cfg: PullConfig, client: http::Client) {
    let interval = Duration::from_secs(cfg.interval_secs);
    let jitter = Duration::from_secs(cfg.jitter_secs.unwrap_or(cfg.interval_secs / 10));
    let mut st = PollState::default();
    let policy = RebootPolicy::parse(&cfg.reboot).unwrap_or(RebootPolicy::Never);
    let set = |f: &dyn Fn(&mut PullStatus)| {
        // The server sets the state before it accepts a connection or starts this task.
        if let Some(p) = sh.pull.lock().expect("pull state").as_mut() {
            f(p);
        }
    };
    let mut wait = next_wait(Duration::ZERO, jitter.min(interval), 0, random());
    loop {
        set(&|p| p.next_poll = Some(unix_now() + wait.as_secs()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = sh.pull_now.notified() => tracing::info!(url = %cfg.url, "pull: polling now (pull-now)"),
        }
        let t = Instant::now();
        let r = poll_once(&sh, &cfg, &client, &mut st).await;
        let ms = t.elapsed().as_millis();
        st.failures = if r.is_ok() {
            0
        } else {
            st.failures.saturating_add(1)
        };
        if let Ok(Polled::Staged { version, .. }) = &r {
            schedule_reboot(&sh, &policy, &cfg.reboot, *version);
        }
        match &r {
            Ok(p) => {
                let what = describe(p);
                tracing::info!(url = %cfg.url, ms, "pull: {what}");
                set(&|s| {
                    s.last_result = Some(what.clone());
                    s.last_error = None;
                });
            }
            Err(e) => {
                tracing::warn!(url = %cfg.url, ms, failures = st.failures, "pull failed: {e}");
                set(&|s| {
                    s.last_result = Some("failed".into());
                    s.last_error = Some(e.to_string());
                });
            }
        }
        set(&|s| {
            s.last_poll = Some(unix_now());
            s.failures = st.failures;
        });
        wait = next_wait(interval, jitter, st.failures, random());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_jitter_and_back_off_up_to_the_interval() {
        let h = Duration::from_secs(3600);
        let j = Duration::from_secs(360);
        assert_eq!(next_wait(h, j, 0, 0), h);
        assert_eq!(next_wait(h, j, 0, u64::MAX), h + j);
        let mid = next_wait(h, j, 0, u64::MAX / 2);
        assert!(mid > h + j / 3 && mid < h + j * 2 / 3, "{mid:?}");
        assert_eq!(next_wait(h, j, 1, 0), Duration::from_secs(1));
        assert_eq!(next_wait(h, j, 4, 0), Duration::from_secs(8));
        assert_eq!(next_wait(h, j, 4, u64::MAX), Duration::from_secs(12));
        assert_eq!(next_wait(h, j, 40, 0), h);
        let short = Duration::from_secs(5);
        assert_eq!(next_wait(short, j, 10, 0), short);
    }

    #[test]
    fn conditions_come_from_the_last_manifest() {
        let mut st = PollState::default();
        assert!(st.conditions().is_empty());
        st.etag = Some("\"a\"".into());
        st.last_modified = Some("Thu, 03 Dec 2026 18:00:00 GMT".into());
        let c = st.conditions();
        assert_eq!(c[0], ("If-None-Match", "\"a\"".to_string()));
        assert_eq!(c[1].0, "If-Modified-Since");
    }
}
