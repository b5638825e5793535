//! Debian's nginx, started by a test on 127.0.0.1 serving a folder as static files (a pull
//! channel), its access log read back to count what the agents asked for.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx; killed on drop.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its access log (nginx's combined format).
    pub access_log: PathBuf,
    scheme: &'static str,
}

/// A test CA and certificates for 127.0.0.1 made with `openssl`: one valid for 30 days,
/// one that expired in 2020.
#[derive(Debug, Clone)]
pub struct Certs {
    /// The CA certificate (PEM), for `[pull] ca_file`.
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub cert: PathBuf,
    /// See [`Certs::cert`].
    pub key: PathBuf,
    /// A certificate for the same key, valid only in January 2020.
    pub expired: PathBuf,
    /// A device's client certificate (`CN=device-1`) signed by the CA, and its key.
    pub client: PathBuf,
    /// See [`Certs::client`].
    pub client_key: PathBuf,
    /// A client certificate and key the CA never signed (self-signed, `CN=stranger`).
    pub stranger: PathBuf,
    /// See [`Certs::stranger`].
    pub stranger_key: PathBuf,
}

/// Runs `openssl ARGS` in `dir`, asserting it succeeds; gives its stdout.
pub(crate) fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(out.status.success(), "openssl {args:?}: {out:?}");
    out.stdout
}

impl Certs {
    /// Makes them in `dir`.
    pub fn make(dir: &Path) -> Certs {
        fs::create_dir_all(dir).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "30"]);
        a.extend(["-subj", "/CN=keel test CA"]);
        openssl(dir, &a);
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        openssl(dir, &a);
        fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        let sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"];
        let mut a = vec!["x509", "-req", "-in", "srv.csr", "-out", "srv.pem"];
        a.extend(sign);
        a.extend(["-days", "30", "-extfile", "ext.cnf"]);
        openssl(dir, &a);
        // `openssl ca` is the one that takes explicit dates.
        fs::write(dir.join("index.txt"), "").unwrap();
        fs::write(dir.join("serial"), "1000\n").unwrap();
        let d = dir.display();
        fs::write(
            dir.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = d\n[d]\ndatabase = {d}/index.txt\nnew_certs_dir = {d}\n\
                 serial = {d}/serial\ndefault_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n"
            ),
        )
        .unwrap();
        let mut a = vec!["ca", "-batch", "-config", "ca.cnf", "-cert", "ca.pem"];
        a.extend([
            "-keyfile", "ca.key", "-in", "srv.csr", "-out", "old.pem", "-notext",
        ]);
        a.extend([
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200201000000Z",
        ]);
        a.extend(["-extfile", "ext.cnf"]);
        openssl(dir, &a);
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "dev.key",
            "-out",
            "dev.csr",
            "-subj",
            "/CN=device-1",
        ]);
        openssl(dir, &a);
        fs::write(dir.join("dev.cnf"), "extendedKeyUsage=clientAuth\n").unwrap();
        let mut a = vec!["x509", "-req", "-in", "dev.csr", "-out", "dev.pem"];
        a.extend(sign);
        a.extend(["-days", "30", "-extfile", "dev.cnf"]);
        openssl(dir, &a);
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend([
            "-keyout",
            "stranger.key",
            "-out",
            "stranger.pem",
            "-days",
            "30",
        ]);
        a.extend(["-subj", "/CN=stranger"]);
        openssl(dir, &a);
        Certs {
            ca: dir.join("ca.pem"),
            cert: dir.join("srv.pem"),
            key: dir.join("srv.key"),
            expired: dir.join("old.pem"),
            client: dir.join("dev.pem"),
            client_key: dir.join("dev.key"),
            stranger: dir.join("stranger.pem"),
            stranger_key: dir.join("stranger.key"),
        }
    }
}

impl Nginx {
    /// Serves `root` on a free port of 127.0.0.1; config, logs and temp files in `dir`.
    pub fn start(root: &Path, dir: &Path) -> Nginx {
        Nginx::start_with(root, dir, None, "")
    }

    /// [`Nginx::start`] over TLS 1.3 with certificate `cert` and key `key`.
    pub fn start_tls(root: &Path, dir: &Path, cert: &Path, key: &Path) -> Nginx {
        Nginx::start_with(root, dir, Some((cert, key)), "")
    }

    /// A free port on 127.0.0.1 (for a server whose URL another's config names).
    pub fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// [`Nginx::start`], over TLS when `tls` is given, with `extra` added to the `server`
    /// block (`location`s, `return`s, `ssl_verify_client`). The access log ends each line
    /// with the client certificate's subject in quotes.
    pub fn start_with(root: &Path, dir: &Path, tls: Option<(&Path, &Path)>, extra: &str) -> Nginx {
        Nginx::start_on(Nginx::free_port(), root, dir, tls, extra)
    }

    /// [`Nginx::start_with`] on `port`.
    pub fn start_on(
        port: u16,
        root: &Path,
        dir: &Path,
        tls: Option<(&Path, &Path)>,
        extra: &str,
    ) -> Nginx {
        fs::create_dir_all(dir.join("tmp")).unwrap();
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nuser root;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  log_format keel '$remote_addr - - [$time_local] \"$request\" $status $body_bytes_sent \"$ssl_client_s_dn\"';\n  \
                 access_log {d}/access.log keel;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  \
                 fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  \
                 server {{ listen 127.0.0.1:{port}{}; root {}; {extra} }}\n}}\n",
                match tls {
                    Some((c, k)) => format!(
                        " ssl; ssl_protocols TLSv1.3; ssl_certificate {}; ssl_certificate_key {}",
                        c.display(),
                        k.display()
                    ),
                    None => String::new(),
                },
                root.display()
            ),
        )
        .unwrap();
        let child = Command::new("nginx")
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx)");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nginx did not listen: {}",
                fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            port,
            access_log: dir.join("access.log"),
            scheme: if tls.is_some() { "https" } else { "http" },
        }
    }

    /// The base URL of `path` under the root.
    pub fn url(&self, path: &str) -> String {
        format!(
            "{}://127.0.0.1:{}/{}",
            self.scheme,
            self.port,
            path.trim_start_matches('/')
        )
    }

    /// The client certificate subject of every request so far (`-` for none), in order.
    pub fn client_subjects(&self) -> Vec<String> {
        let text = fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| Some(l.split('"').nth(3)?.to_string()))
            .collect()
    }

    /// (path, status, bytes sent) of every request so far, in order.
    pub fn requests(&self) -> Vec<(String, u16, u64)> {
        let text = fs::read_to_string(&self.access_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let req = l.split('"').nth(1)?;
                let path = req.split_whitespace().nth(1)?.to_string();
                let mut after = l.split('"').nth(2)?.split_whitespace();
                let status = after.next()?.parse().ok()?;
                let bytes = after.next()?.parse().ok()?;
                Some((path, status, bytes))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
