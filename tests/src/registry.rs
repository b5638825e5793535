//! Debian's `docker-registry` (the CNCF distribution registry), started by a test on
//! 127.0.0.1 with its storage in the test's folder, anonymous or with htpasswd basic auth
//! (a bcrypt entry made by `htpasswd -B`), filled by `skopeo copy`.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::nginx::Nginx;

/// A running registry; killed on drop.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
    creds: Option<String>,
}

impl Registry {
    /// Starts one storing in `dir`; with `creds` (`USER:PASS`) every request needs them.
    pub fn start(dir: &Path, creds: Option<&str>) -> Registry {
        fs::create_dir_all(dir.join("data")).unwrap();
        let port = Nginx::free_port();
        let auth = match creds {
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
