//! URLs the pull client takes (`http[s]://HOST[:PORT][/PATH]`) and where a redirect's
//! `Location` points from one of them: pure, no I/O.

use super::HttpError;

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https://`.
    pub tls: bool,
    /// Host name or address (brackets kept for IPv6).
    pub host: String,
    /// Port (80 or 443 unless given).
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    /// The `Host` header's value: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Scheme, host and port are the same (where credentials may go).
    pub fn same_origin(&self, other: &Url) -> bool {
        self.tls == other.tls
            && self.port == other.port
            && self.host.eq_ignore_ascii_case(&other.host)
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.host_header(), self.path)
    }
}

/// Parses `http[s]://HOST[:PORT][/PATH]`.
pub fn parse_url(url: &str) -> Result<Url, HttpError> {
    let bad = |why| HttpError::Url {
        url: url.to_string(),
        why,
    };
    let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(r), _) => (true, r),
        (_, Some(r)) => (false, r),
        _ => return Err(bad("not an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest.as_bytes()[i] == b'?' => (&rest[..i], format!("/{}", &rest[i..])),
        Some(i) => (&rest[..i], rest[i..].to_string()),
        None => (rest, "/".to_string()),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("no host, or user info (not supported)"));
    }
    if path.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(bad("the path has spaces or control characters"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(']') => {
            (h, p.parse().map_err(|_| bad("the port is not a number"))?)
        }
        _ => (authority, if tls { 443 } else { 80 }),
    };
    if host.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return Err(bad("the host has spaces or control characters"));
    }
    Ok(Url {
        tls,
        host: host.to_string(),
        port,
        path,
    })
}

/// Where a redirect from `base` to `location` leads: an absolute URL, a scheme-relative
/// `//HOST/…`, an absolute path or a path relative to `base`'s directory. Never from
/// `https://` down to `http://`.
pub fn resolve_location(base: &Url, location: &str) -> Result<Url, HttpError> {
    let location = location.trim();
    let next = if location.starts_with("http://") || location.starts_with("https://") {
        parse_url(location)?
    } else if let Some(rest) = location.strip_prefix("//") {
        let scheme = if base.tls { "https" } else { "http" };
        parse_url(&format!("{scheme}://{rest}"))?
    } else if location.starts_with('/') {
        parse_url(&format!(
            "{}://{}{location}",
            scheme(base),
            base.host_header()
        ))?
    } else if location.is_empty() || location.contains("://") {
        return Err(HttpError::Url {
            url: location.to_string(),
            why: "a redirect to something that is not an http(s) URL or a path",
        });
    } else {
        let path = base.path.split('?').next().unwrap_or("/");
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        parse_url(&format!(
            "{}://{}{dir}{location}",
            scheme(base),
            base.host_header()
        ))?
    };
    if base.tls && !next.tls {
        return Err(HttpError::Url {
            url: next.to_string(),
            why: "a redirect from https:// to http:// (refused: it would drop TLS)",
        });
    }
    Ok(next)
}

fn scheme(u: &Url) -> &'static str {
    if u.tls {
        "https"
    } else {
        "http"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("http://127.0.0.1:8080/ch/manifest.json").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("127.0.0.1", 8080, "/ch/manifest.json")
        );
        assert_eq!(u.to_string(), "http://127.0.0.1:8080/ch/manifest.json");
        let u = parse_url("http://updates.example").unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        assert_eq!(u.host_header(), "updates.example");
        let u = parse_url("http://h?x=1").unwrap();
        assert_eq!(u.path, "/?x=1");
        let u = parse_url("http://[::1]:81/x").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 81));
        for bad in [
            "ftp://h/",
            "http://",
            "http://u@h/",
            "http://h:x/",
            "http://h/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let u = parse_url("https://cdn.example/c").unwrap();
        assert_eq!((u.tls, u.port, u.path.as_str()), (true, 443, "/c"));
        assert!(u.same_origin(&parse_url("https://CDN.example:443/d").unwrap()));
        assert!(!u.same_origin(&parse_url("https://cdn.example:8443/c").unwrap()));
        assert!(!u.same_origin(&parse_url("http://cdn.example:443/c").unwrap()));
    }

    #[test]
    fn redirects() {
        let base = parse_url("https://a.example/ch/manifest.json?v=1").unwrap();
        let r = |l: &str| resolve_location(&base, l).map(|u| u.to_string());
        assert_eq!(r("https://b.example/x").unwrap(), "https://b.example/x");
        assert_eq!(r("//b.example:8443/x").unwrap(), "https://b.example:8443/x");
        assert_eq!(
            r("/other/m.json").unwrap(),
            "https://a.example/other/m.json"
        );
        assert_eq!(r("m2.json").unwrap(), "https://a.example/ch/m2.json");
        assert_eq!(r("../up").unwrap(), "https://a.example/ch/../up");
        let e = r("http://a.example/ch/manifest.json").unwrap_err();
        assert!(e.to_string().contains("from https:// to http://"), "{e}");
        assert!(r("").is_err());
        assert!(r("ftp://x/y").is_err());
        let plain = parse_url("http://a.example/m").unwrap();
        assert_eq!(
            resolve_location(&plain, "https://a.example/m")
                .unwrap()
                .to_string(),
            "https://a.example/m"
        );
    }
}
