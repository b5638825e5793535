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
}

impl Nginx {
    /// Serves `root` on a free port of 127.0.0.1; config, logs and temp files in `dir`.
    pub fn start(root: &Path, dir: &Path) -> Nginx {
        fs::create_dir_all(dir.join("tmp")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nuser root;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  \
                 fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  \
                 server {{ listen 127.0.0.1:{port}; root {}; }}\n}}\n",
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
        }
    }

    /// The base URL of `path` under the root.
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
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
