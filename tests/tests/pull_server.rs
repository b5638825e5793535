//! Pull mode against servers that do not simply answer 200: Debian's nginx returning 500,
//! redirecting (across servers, in a loop, from https down to http), asking for a client
//! certificate; a server that accepts and never answers; a manifest published before its
//! image. The real agent and keelctl binaries; nothing staged that should not be.

use std::fs;
use std::time::{Duration, Instant};

use keel_tests::agent::*;
use keel_tests::channel::*;
use keel_tests::garage::{self, Garage};
use keel_tests::nginx::{Certs, Nginx};
use keel_tests::*;

/// A `[pull]` table for `url` polling every `interval` s with no jitter and a `timeout` s.
fn polling(url: &str, interval: u64, timeout: u64) -> String {
    format!("[pull]\nurl = {url:?}\ninterval_secs = {interval}\njitter_secs = 0\ntimeout_secs = {timeout}\n")
}

/// Waits until `f` holds, up to `secs`.
fn within(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Accepts connections on 127.0.0.1 and never answers; returns the port and a counter of
/// connections accepted.
fn hung_server() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in l.incoming().flatten() {
            n2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(s);
        }
    });
    (port, n)
}

#[test]
fn errors_hangs_and_a_late_image_back_off_and_stage_nothing() {
    if !privileged() {
        return;
    }
    with_newimg("pull-err", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let www = sb.fresh("www");
        let ch = www.join("ch");
        let v2 = image(sb, 2, 2);
        sign(sb, &v2, "2");
        publish(&v2, &ch);
        let sha2 = sha256_file(&v2);
        let nginx = Nginx::start_with(
            &www,
            &sb.fresh("nginx"),
            None,
            "location /e500/ { return 500; }",
        );

        // 500: an error that names it, backing off 1, 2, 4 s (+ up to half) under a 60 s
        // interval: at most 3 requests in 5 s, nothing staged.
        let a = start(&w, &polling(&nginx.url("e500"), 60, 5));
        std::thread::sleep(Duration::from_secs(5));
        let n500 = asked(&nginx, "/e500/manifest.json");
        assert!(
            (2..=3).contains(&n500.len()) && n500.iter().all(|&s| s == 500),
            "{n500:?}"
        );
        assert!(a.log().contains("HTTP 500"), "{}", a.log());
        let st = status(&a);
        let p = st.pull.expect("pull status");
        assert!(p.failures >= 2, "{p:?}");
        assert!(p.last_error.unwrap_or_default().contains("HTTP 500"));
        drop(a);

        // A server that accepts and never answers: each poll ends at the 1 s timeout.
        let (hung, conns) = hung_server();
        let a = start(&w, &polling(&format!("http://127.0.0.1:{hung}/ch"), 60, 1));
        wait_for(|| a.log().contains("no answer within 1 s"));
        assert!(a.log().contains("read response head"), "{}", a.log());
        assert!(conns.load(std::sync::atomic::Ordering::SeqCst) >= 1);
        drop(a);
        assert_eq!(slot(&w), (None, None));

        // The manifest published before its image: a 404 on the image that says so, no
        // storm of requests (backoff), and the image picked up once it is there.
        let late = www.join("late");
        fs::create_dir_all(late.join("images")).unwrap();
        fs::copy(ch.join("manifest.json"), late.join("manifest.json")).unwrap();
        let a = start(&w, &polling(&nginx.url("late"), 60, 5));
        let img = format!("/late/images/{sha2}");
        wait_for(|| asked(&nginx, &img).len() >= 2);
        assert!(
            a.log().contains("published before its image"),
            "{}",
            a.log()
        );
        std::thread::sleep(Duration::from_secs(2));
        let before = asked(&nginx, &img);
        assert!(
            before.len() <= 4 && before.iter().all(|&s| s == 404),
            "{before:?}"
        );
        assert_eq!(slot(&w), (None, None));
        fs::copy(
            ch.join("images").join(&sha2),
            late.join("images").join(&sha2),
        )
        .unwrap();
        // The next backed-off poll (within 8 + 4 s) fetches it.
        assert!(
            within(15, || slot(&w).0.as_deref() == Some(sha2.as_str())),
            "{}",
            a.log()
        );
        let after = asked(&nginx, &img);
        assert_eq!(after.last(), Some(&200), "{after:?}");
        assert_eq!(after.iter().filter(|&&s| s == 200).count(), 1);
    });
}

#[test]
fn redirects_are_followed_within_limits() {
    if !privileged() {
        return;
    }
    with_newimg("pull-redirect", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let www = sb.fresh("www");
        let ch = www.join("ch");
        let v2 = image(sb, 2, 2);
        sign(sb, &v2, "2");
        publish(&v2, &ch);
        let sha2 = sha256_file(&v2);
        // The "CDN" holds the images; the origin redirects image requests there (302), moved
        // channels to the new path (301), and one path to itself.
        let cdn = Nginx::start(&www, &sb.fresh("cdn"));
        let split = www.join("split");
        fs::create_dir_all(&split).unwrap();
        fs::copy(ch.join("manifest.json"), split.join("manifest.json")).unwrap();
        let origin = Nginx::start_with(
            &www,
            &sb.fresh("origin"),
            None,
            &format!(
                "rewrite ^/moved/(.*)$ /ch/$1 permanent; \
                 rewrite ^/split/images/(.*)$ http://127.0.0.1:{}/ch/images/$1 redirect; \
                 rewrite ^/loop/(.*)$ /loop/$1 redirect;",
                cdn.port
            ),
        );

        // A loop: 6 requests (the first and 5 redirects), then an error that says so.
        let a = start(&w, &polling(&origin.url("loop"), 60, 5));
        wait_for(|| a.log().contains("redirects"));
        assert!(a.log().contains("more than 5 redirects"), "{}", a.log());
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(asked(&origin, "/loop/manifest.json"), vec![302; 6]);
        drop(a);

        // A moved channel: 301 to /ch, the manifest and image from there.
        let a = start(&w, &polling(&origin.url("moved"), 60, 5));
        wait_for(|| slot(&w).0.as_deref() == Some(sha2.as_str()));
        assert!(a.log().contains("redirected"), "{}", a.log());
        assert_eq!(asked(&origin, "/moved/manifest.json"), vec![301]);
        assert_eq!(asked(&origin, &format!("/ch/images/{sha2}")), vec![200]);
        drop(a);

        // The image on another server: the origin answers 302, the CDN sends the bytes.
        let w3 = {
            let n3 = sb.fresh("newimg3");
            fs::create_dir_all(&n3).unwrap();
            world(sb, &n3, 1)
        };
        let _a = start(&w3, &polling(&origin.url("split"), 60, 5));
        wait_for(|| slot(&w3).0.as_deref() == Some(sha2.as_str()));
        assert_eq!(asked(&origin, &format!("/split/images/{sha2}")), vec![302]);
        assert_eq!(asked(&cdn, &format!("/ch/images/{sha2}")), vec![200]);
    });
}

#[test]
fn a_server_that_checks_devices_gets_the_client_certificate() {
    if !privileged() {
        return;
    }
    with_newimg("pull-mtls", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let certs = Certs::make(&sb.fresh("certs"));
        let www = sb.fresh("www");
        let ch = www.join("ch");
        let v2 = image(sb, 2, 2);
        sign(sb, &v2, "2");
        publish(&v2, &ch);
        let sha2 = sha256_file(&v2);
        let plain = Nginx::start(&www, &sb.fresh("plain"));
        let nginx = Nginx::start_with(
            &www,
            &sb.fresh("nginx"),
            Some((&certs.cert, &certs.key)),
            &format!(
                "ssl_verify_client on; ssl_client_certificate {}; \
                 rewrite ^/down/(.*)$ http://127.0.0.1:{}/ch/$1 redirect;",
                certs.ca.display(),
                plain.port
            ),
        );
        let base = pull_config(&nginx.url("ch"), Some(&certs.ca));
        let with = |cert: &std::path::Path, key: &std::path::Path| {
            format!("{base}client_cert = {cert:?}\nclient_key = {key:?}\n")
        };
        // No certificate, or one the CA never signed: nginx says 400, nothing staged.
        let a = start(&w, &base);
        wait_for(|| a.log().contains("pull failed"));
        assert!(a.log().contains("HTTP 400"), "{}", a.log());
        drop(a);
        let a = start(&w, &with(&certs.stranger, &certs.stranger_key));
        wait_for(|| a.log().contains("pull failed"));
        assert!(a.log().contains("HTTP 400"), "{}", a.log());
        drop(a);
        assert_eq!(slot(&w), (None, None));
        assert!(asked(&nginx, "/ch/manifest.json").iter().all(|&s| s == 400));

        // A key that is not the certificate's stops the agent at start, naming both files.
        let cfg = w.etc.join("agent-mismatch.toml");
        fs::write(
            &cfg,
            format!(
                "unix = \"\"\ntcp = \"127.0.0.1:0\"\nidentity = {:?}\ntrusted_keys = {:?}\nnewimg_dir = {:?}\n{}",
                w.etc.join("identity.pem"),
                w.etc.join("trusted.pem"),
                w.newimg,
                with(&certs.client, &certs.stranger_key)
            ),
        )
        .unwrap();
        let out = std::process::Command::new(bin("keel-agent"))
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("client_cert") && err.contains("stranger.key"),
            "{err}"
        );

        // A redirect from https down to http is refused, even with the right certificate.
        let dev = with(&certs.client, &certs.client_key);
        let a = start(&w, &dev.replace(&nginx.url("ch"), &nginx.url("down")));
        wait_for(|| a.log().contains("pull failed"));
        assert!(a.log().contains("from https:// to http://"), "{}", a.log());
        drop(a);
        assert!(plain.requests().is_empty(), "{:?}", plain.requests());

        // The device's certificate: staged, and nginx saw who asked.
        let a = start(&w, &dev);
        wait_for(|| slot(&w).0.as_deref() == Some(sha2.as_str()));
        assert!(a.log().contains("pull: staged version 2"), "{}", a.log());
        let last = nginx.client_subjects();
        assert_eq!(
            last.last().map(String::as_str),
            Some("CN=device-1"),
            "{last:?}"
        );
    });
}

#[test]
fn a_private_s3_bucket_is_read_with_sigv4() {
    if !privileged() {
        return;
    }
    let Some(bin) = garage::binary() else {
        return;
    };
    with_newimg("pull-s3", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let g = Garage::start(&bin, &sb.fresh("garage"));
        let ch = sb.fresh("ch");
        let v2 = image(sb, 3, 2);
        sign(sb, &v2, "2");
        publish(&v2, &ch);
        let sha2 = sha256_file(&v2);
        g.put_channel(&ch, "appliance");
        let url = g.url("appliance");
        let with = |secret: &std::path::Path| {
            format!(
                "{}[pull.s3]\naccess_key_id = {:?}\nsecret_access_key_file = {secret:?}\nregion = {:?}\n",
                pull_config(&url, None),
                g.key_id,
                garage::REGION
            )
        };
        // Anonymous, then with a wrong secret: 403 and a hint, nothing staged.
        let a = start(&w, &pull_config(&url, None));
        wait_for(|| a.log().contains("pull failed"));
        assert!(
            a.log().contains("HTTP 403") && a.log().contains("[pull.s3]"),
            "{}",
            a.log()
        );
        drop(a);
        let wrong = sb.fresh("wrong.secret");
        fs::write(&wrong, "0".repeat(64)).unwrap();
        let a = start(&w, &with(&wrong));
        wait_for(|| a.log().contains("pull failed"));
        assert!(a.log().contains("HTTP 403"), "{}", a.log());
        drop(a);
        assert_eq!(slot(&w), (None, None));
        // The bucket's key: staged byte-identical, then polls answered 304.
        let secret = sb.fresh("s3.secret");
        fs::write(&secret, format!("{}\n", g.secret)).unwrap();
        // Through a relay that cuts the first image response after 1 MiB: the ranged
        // request that resumes it is signed too.
        let relay = cutting_relay(g.port, 1 << 20);
        let a = start(
            &w,
            &with(&secret).replace(
                &url,
                &format!("http://127.0.0.1:{relay}/{}/appliance", garage::BUCKET),
            ),
        );
        wait_for(|| slot(&w).0.as_deref() == Some(sha2.as_str()));
        let log = a.log();
        let line = log
            .lines()
            .find(|l| l.contains("pull: staged version 2"))
            .unwrap_or_else(|| panic!("{log}"));
        assert!(!line.contains("resumed from 0)"), "{line}");
        wait_for(|| a.log().contains("no change (304)"));
        assert!(!a.log().contains(&g.secret), "the secret is never logged");
    });
}
