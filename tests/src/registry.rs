//! Debian's `docker-registry` (the CNCF distribution registry), started by a test on
//! 127.0.0.1 with its storage in the test's folder: anonymous, with htpasswd basic auth (a
//! bcrypt entry made by `htpasswd -B`), or with token auth — the registry verifies every
//! bearer token's RS256 signature, certificate chain, issuer, audience, expiry and access
//! claims itself; the realm is Debian's nginx behind basic auth, handing out a token minted
//! by the test with `openssl` (a token server's whole job, for one user). Filled by `skopeo
//! copy`.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::nginx::{openssl, Nginx};

/// A running registry (and its token realm); killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
    creds: Option<String>,
    /// The token realm, for [`Registry::start_token`].
    pub realm: Option<Nginx>,
}

/// The service and issuer names the token registry checks.
const SERVICE: &str = "keel-registry";
const ISSUER: &str = "keel-token-issuer";

/// base64url without padding, as JWTs are written.
fn b64url(dir: &Path, file: &str) -> String {
    let b = openssl(dir, &["base64", "-A", "-in", file]);
    String::from_utf8(b)
        .unwrap()
        .trim()
        .trim_end_matches('=')
        .replace('+', "-")
        .replace('/', "_")
}

/// A JWT as distribution's token auth wants it: RS256, the signing certificate in `x5c`,
/// `pull` and `push` on `repo`, valid for an hour. Writes `token.crt` (the registry's
/// `rootcertbundle`) in `dir`.
fn mint_token(dir: &Path, sub: &str, repo: &str) -> String {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "token.key",
            "-out",
            "token.crt",
            "-days",
            "2",
            "-subj",
            "/CN=keel-token-issuer",
        ],
    );
    let der = openssl(dir, &["x509", "-in", "token.crt", "-outform", "DER"]);
    fs::write(dir.join("token.der"), der).unwrap();
    let x5c = String::from_utf8(openssl(dir, &["base64", "-A", "-in", "token.der"])).unwrap();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c.trim()]});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss": ISSUER, "sub": sub, "aud": SERVICE, "exp": now + 3600, "nbf": now - 60,
        "iat": now - 60, "jti": format!("keel-{now}"),
        "access": [{"type": "repository", "name": repo, "actions": ["pull", "push"]}],
    });
    fs::write(dir.join("jwt.header"), header.to_string()).unwrap();
    fs::write(dir.join("jwt.claims"), claims.to_string()).unwrap();
    let input = format!(
        "{}.{}",
        b64url(dir, "jwt.header"),
        b64url(dir, "jwt.claims")
    );
    fs::write(dir.join("jwt.input"), &input).unwrap();
    let sig = openssl(dir, &["dgst", "-sha256", "-sign", "token.key", "jwt.input"]);
    fs::write(dir.join("jwt.sig"), sig).unwrap();
    format!("{input}.{}", b64url(dir, "jwt.sig"))
}

impl Registry {
    /// Starts one storing in `dir`; with `creds` (`USER:PASS`) every request needs them.
    pub fn start(dir: &Path, creds: Option<&str>) -> Registry {
        Registry::start_with(dir, creds, None)
    }

    /// Starts one with token auth: its realm (nginx on another port) answers `creds`
    /// (`USER:PASS`, checked by nginx's basic auth) with a token for `repo`, and 401
    /// without them.
    pub fn start_token(dir: &Path, creds: &str, repo: &str) -> Registry {
        let realm_dir = dir.join("realm");
        let www = realm_dir.join("www");
        fs::create_dir_all(&www).unwrap();
        let (u, p) = creds.split_once(':').unwrap();
        let token = mint_token(&realm_dir, u, repo);
        fs::write(
            www.join("token"),
            serde_json::json!({"token": token, "expires_in": 3600}).to_string(),
        )
        .unwrap();
        // nginx reads apr1 (MD5) entries itself, whatever the libc's crypt knows.
        let out = Command::new("htpasswd")
            .args(["-nbm", u, p])
            .output()
            .expect("htpasswd (apt-get install apache2-utils)");
        assert!(out.status.success(), "{out:?}");
        fs::write(realm_dir.join("htpasswd"), &out.stdout).unwrap();
        let nginx = Nginx::start_with(
            &www,
            &realm_dir,
            None,
            &format!(
                "location = /token {{ auth_basic keel; auth_basic_user_file {}; default_type application/json; }}",
                realm_dir.join("htpasswd").display()
            ),
        );
        Registry::start_with(dir, Some(creds), Some(nginx))
    }

    fn start_with(dir: &Path, creds: Option<&str>, realm: Option<Nginx>) -> Registry {
        fs::create_dir_all(dir.join("data")).unwrap();
        let port = Nginx::free_port();
        let auth = match creds {
            Some(_) if realm.is_some() => format!(
                "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                realm.as_ref().unwrap().url("token"),
                dir.join("realm/token.crt").display()
            ),
            None => String::new(),
            Some(c) => {
                let (u, p) = c.split_once(':').unwrap();
                let out = Command::new("htpasswd")
                    .args(["-Bbn", u, p])
                    .output()
                    .expect("htpasswd (apt-get install apache2-utils)");
                assert!(out.status.success(), "{out:?}");
                fs::write(dir.join("htpasswd"), &out.stdout).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: keel-test\n    path: {}\n",
                    dir.join("htpasswd").display()
                )
            }
        };
        let conf = dir.join("config.yml");
        fs::write(
            &conf,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&conf)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("docker-registry (apt-get install docker-registry)");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "docker-registry did not listen: {}",
                fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Registry {
            child,
            host: format!("127.0.0.1:{port}"),
            creds: creds.map(str::to_string),
            realm,
        }
    }

    /// `skopeo copy` of `src` (e.g. `oci:DIR:TAG`) to `REPO:TAG` here; `extra` skopeo flags.
    pub fn push(&self, src: &str, repo_tag: &str, extra: &[&str]) {
        let mut c = Command::new("skopeo");
        c.args(["copy", "-q", "--dest-tls-verify=false"]);
        if let Some(cr) = &self.creds {
            c.arg("--dest-creds").arg(cr);
        }
        c.args(extra)
            .arg(src)
            .arg(format!("docker://{}/{repo_tag}", self.host));
        let out = c.output().expect("skopeo (apt-get install skopeo)");
        assert!(out.status.success(), "skopeo copy: {out:?}");
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
