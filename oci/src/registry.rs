//! A registry (distribution API v2) as `docker://HOST[:PORT]/REPO[:TAG|@sha256:…]`: anonymous,
//! basic auth (`--creds USER:PASS`), or a bearer token from the realm the registry's
//! `WWW-Authenticate` names (asked with the credentials when given). HTTPS unless
//! `--insecure`; credentials never follow a redirect to another host (blob stores behind a
//! registry). Every manifest is checked against the digest that names it, every blob is
//! streamed to a file beside the build while hashed, and used only once its digest matches.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::digest::{self, Digest};
use crate::error::{io, OciError};
use crate::layout::Resolved;
use crate::spec::{self, Descriptor, ImageConfig, Index, Manifest, Platform, MAX_DOC};

/// What `Accept` asks for manifests.
const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=…`.
    Basic,
    /// `Bearer realm=…,service=…,scope=…`.
    Bearer {
        /// Where tokens come from.
        realm: String,
        /// `service`, if given.
        service: Option<String>,
        /// `scope`, if given.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header (pure).
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = std::collections::HashMap::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (k, after) = s.split_once('=')?;
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        params.insert(k, v.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge::Bearer {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

fn b64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in input.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Percent-encodes a query value.
fn q(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// One repository of one registry.
pub struct Registry {
    agent: ureq::Agent,
    base: String,
    repo: String,
    creds: Option<(String, String)>,
    auth: Option<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("base", &self.base)
            .field("repo", &self.repo)
            .finish_non_exhaustive()
    }
}

fn net(url: &str, e: ureq::Error) -> OciError {
    OciError::Spec {
        what: url.to_string(),
        why: e.to_string(),
    }
}

impl Registry {
    /// A client for `host`/`repo`; `insecure`: plain HTTP; `creds`: `USER:PASS`.
    pub fn new(host: &str, repo: &str, insecure: bool, creds: Option<&str>) -> Registry {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .max_redirects(5)
            .user_agent(concat!("keelctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Registry {
            agent,
            base: format!("{}://{host}", if insecure { "http" } else { "https" }),
            repo: repo.to_string(),
            creds: creds
                .and_then(|c| c.split_once(':'))
                .map(|(u, p)| (u.to_string(), p.to_string())),
            auth: None,
        }
    }

    fn send(&self, url: &str, accept: &str) -> Result<ureq::http::Response<ureq::Body>, OciError> {
        let mut r = self.agent.get(url).header("Accept", accept);
        if let Some(a) = &self.auth {
            r = r.header("Authorization", a);
        }
        r.call().map_err(|e| net(url, e))
    }

    /// GETs `path` (below `/v2/REPO/`), answering one auth challenge; a non-200 is an error
    /// that names the status and, for 401/403, what to do.
    fn get(
        &mut self,
        path: &str,
        accept: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, OciError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repo);
        let mut resp = self.send(&url, accept)?;
        if resp.status() == 401 && self.auth.is_none() {
            let ch = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .and_then(parse_challenge);
            self.authenticate(&url, ch)?;
            resp = self.send(&url, accept)?;
        }
        let st = resp.status().as_u16();
        if st != 200 {
            let hint = match st {
                401 | 403 => " (credentials: --creds USER:PASS)",
                404 => " (no such repository, tag or blob)",
                _ => "",
            };
            return Err(OciError::Spec {
                what: url,
                why: format!("HTTP {st}{hint}"),
            });
        }
        Ok(resp)
    }

    fn authenticate(&mut self, url: &str, ch: Option<Challenge>) -> Result<(), OciError> {
        let basic = self
            .creds
            .as_ref()
            .map(|(u, p)| format!("Basic {}", b64(format!("{u}:{p}").as_bytes())));
        match ch {
            Some(Challenge::Basic) => {
                self.auth = Some(basic.ok_or_else(|| OciError::Spec {
                    what: url.to_string(),
                    why: "the registry wants a user and password: --creds USER:PASS".into(),
                })?);
            }
            Some(Challenge::Bearer {
                realm,
                service,
                scope,
            }) => {
                let mut t = realm.clone();
                let mut sep = if t.contains('?') { '&' } else { '?' };
                for (k, v) in [("service", service), ("scope", scope)] {
                    if let Some(v) = v {
                        t.push_str(&format!("{sep}{k}={}", q(&v)));
                        sep = '&';
                    }
                }
                let mut r = self.agent.get(&t);
                if let Some(b) = &basic {
                    r = r.header("Authorization", b);
                }
                let mut resp = r.call().map_err(|e| net(&t, e))?;
                if resp.status() != 200 {
                    return Err(OciError::Spec {
                        what: realm,
                        why: format!("token request: HTTP {}", resp.status().as_u16()),
                    });
                }
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(MAX_DOC)
                    .read_to_vec()
                    .map_err(|e| net(&t, e))?;
                let v: serde_json::Value = spec::parse("token response", &body)?;
                let tok = v
                    .get("token")
                    .or_else(|| v.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| OciError::Spec {
                        what: realm.clone(),
                        why: "no token in the answer".into(),
                    })?;
                self.auth = Some(format!("Bearer {tok}"));
            }
            None => {
                return Err(OciError::Spec {
                    what: url.to_string(),
                    why: "HTTP 401 without a challenge this client answers".into(),
                })
            }
        }
        Ok(())
    }

    /// A manifest or index by tag or digest; with a digest, its bytes must hash to it.
    fn doc(&mut self, reference: &str) -> Result<(String, Vec<u8>), OciError> {
        let mut resp = self.get(&format!("manifests/{reference}"), ACCEPT)?;
        let mt = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string();
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_DOC)
            .read_to_vec()
            .map_err(|e| net(reference, e))?;
        if reference.starts_with("sha256:") {
            digest::check(body.as_slice(), &Digest::parse(reference)?, None)?;
        }
        Ok((mt, body))
    }

    /// The image `reference` names, for `platform` when it is an index.
    pub fn resolve(&mut self, reference: &str, platform: &Platform) -> Result<Resolved, OciError> {
        let (mut mt, mut body) = self.doc(reference)?;
        let mut d = digest::of(&body);
        for _ in 0..4 {
            if spec::is_index(&mt, &body) {
                let idx: Index = spec::parse(&format!("index {reference}"), &body)?;
                let pick = spec::pick_platform(&idx, platform)?.digest()?;
                (mt, body) = self.doc(pick.as_str())?;
                d = pick;
                continue;
            }
            let manifest: Manifest = spec::parse(&format!("manifest {d}"), &body)?;
            let cfg = self.blob_bytes(&manifest.config)?;
            let config: ImageConfig =
                spec::parse(&format!("config {}", manifest.config.digest), &cfg)?;
            return Ok(Resolved {
                digest: d,
                manifest,
                config,
            });
        }
        Err(OciError::Spec {
            what: reference.to_string(),
            why: "indexes nested more than 4 deep".into(),
        })
    }

    fn blob_bytes(&mut self, desc: &Descriptor) -> Result<Vec<u8>, OciError> {
        if desc.size > MAX_DOC {
            return Err(OciError::Spec {
                what: desc.digest.clone(),
                why: "a config larger than a document may be".into(),
            });
        }
        let d = desc.digest()?;
        let mut resp = self.get(&format!("blobs/{d}"), "*/*")?;
        let b = resp
            .body_mut()
            .with_config()
            .limit(MAX_DOC)
            .read_to_vec()
            .map_err(|e| net(d.as_str(), e))?;
        digest::check(b.as_slice(), &d, Some(desc.size))?;
        Ok(b)
    }

    /// Downloads a blob into `path` (created, removed on any failure), hashing as it goes;
    /// returns it open at its start once its digest and size match.
    pub fn fetch(&mut self, desc: &Descriptor, path: &Path) -> Result<File, OciError> {
        let d = desc.digest()?;
        let r = self.fetch_inner(&d, desc.size, path);
        if r.is_err() {
            let _ = std::fs::remove_file(path);
        }
        r
    }

    fn fetch_inner(&mut self, d: &Digest, size: u64, path: &Path) -> Result<File, OciError> {
        let mut resp = self.get(&format!("blobs/{d}"), "*/*")?;
        let mut body = resp
            .body_mut()
            .with_config()
            .limit(size.saturating_add(1))
            .reader();
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io(path, "create"))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 << 10];
        let mut n = 0u64;
        loop {
            let k = body.read(&mut buf).map_err(|e| OciError::Layer {
                layer: d.to_string(),
                why: format!("download after {n} bytes: {e}"),
            })?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
            f.write_all(&buf[..k]).map_err(io(path, "write"))?;
            n += k as u64;
        }
        let actual = format!("sha256:{}", keel_hex(&h.finalize()));
        if actual != d.as_str() || n != size {
            return Err(OciError::Digest {
                digest: d.to_string(),
                actual,
                size: n,
            });
        }
        f.rewind().map_err(io(path, "seek"))?;
        Ok(f)
    }
}

fn keel_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/debian:pull".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge("Bearer realm=http://t/token"),
            Some(Challenge::Bearer {
                realm: "http://t/token".into(),
                service: None,
                scope: None
            })
        );
        assert_eq!(parse_challenge("Negotiate x"), None);
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        assert_eq!(b64(b"keel:secret"), "a2VlbDpzZWNyZXQ=");
        assert_eq!(b64(b"ab"), "YWI=");
        assert_eq!(q("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
    }
}
