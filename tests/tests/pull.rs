//! Pull mode against Debian's nginx on 127.0.0.1, the real agent and keelctl binaries: a
//! channel written by `keelctl publish`, polled by the agent with `[pull]`.

use std::fs;
use std::time::Duration;

use keel_tests::agent::*;
use keel_tests::channel::*;
use keel_tests::nginx::{Certs, Nginx};
use keel_tests::*;

#[test]
fn a_device_pulls_from_nginx_polls_cheaply_and_refuses_a_wrong_image() {
    if !privileged() {
        return;
    }
    with_newimg("pull", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let www = sb.fresh("www");
        let ch = www.join("ch");
        fs::create_dir_all(&ch).unwrap();
        let nginx = Nginx::start(&www, &sb.fresh("nginx"));
        let a = start(
            &w,
            &format!(
                "[pull]\nurl = {:?}\ninterval_secs = 1\njitter_secs = 0\ntimeout_secs = 5\n",
                nginx.url("ch")
            ),
        );
        // Nothing published: 404s, backing off (capped at the 1 s interval), nothing staged.
        std::thread::sleep(Duration::from_millis(2500));
        let early = asked(&nginx, "/ch/manifest.json");
        assert!(
            !early.is_empty() && early.len() <= 4 && early.iter().all(|&s| s == 404),
            "{early:?}"
        );
        assert!(
            a.log().contains("pull failed") && a.log().contains("HTTP 404"),
            "{}",
            a.log()
        );
        assert_eq!(slot(&w), (None, None));

        // v2 published: fetched once, staged byte-identical; then every poll is one 304.
        let v2 = image(sb, 4, 2);
        sign(sb, &v2, "2");
        let sha2 = sha256_file(&v2);
        let out = publish(&v2, &ch);
        assert!(out.contains("published demo version 2"), "{out}");
        wait_for(|| slot(&w).0.as_deref() == Some(sha2.as_str()));
        assert!(a.log().contains("pull: staged version 2"), "{}", a.log());
        let n = asked(&nginx, "/ch/manifest.json").len();
        wait_for(|| asked(&nginx, "/ch/manifest.json").len() >= n + 2);
        let polls = asked(&nginx, "/ch/manifest.json");
        assert_eq!(&polls[polls.len() - 2..], &[304, 304], "{polls:?}");
        let img2 = format!("/ch/images/{sha2}");
        assert_eq!(asked(&nginx, &img2), vec![200]);
        // status tells the channel and the last poll; pull-now is for local root or a key.
        let ep = a.unix.to_string();
        let out = keelctl(&["-e", &ep, "status", "--json"]);
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st["pull"]["url"], nginx.url("ch"), "{st}");
        assert_eq!(st["pull"]["failures"], 0, "{st}");
        assert!(st["pull"]["last_error"].is_null(), "{st}");
        let out = keelctl(&["-e", &ep, "pull-now"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("polling"),
            "{out:?}"
        );
        let tcp = keelctl(&[
            "-e",
            &a.tcp.to_string(),
            "--agent-key",
            a.identity_pub().to_str().unwrap(),
            "pull-now",
        ]);
        assert!(
            !tcp.status.success()
                && String::from_utf8_lossy(&tcp.stderr).contains("not-authorized"),
            "{tcp:?}"
        );
        let quiet: Vec<u64> = nginx
            .requests()
            .iter()
            .filter(|(p, s, _)| p == "/ch/manifest.json" && *s == 304)
            .map(|(_, _, b)| b)
            .copied()
            .collect();
        assert!(quiet.iter().all(|&b| b == 0), "{quiet:?}");

        // v3's manifest over an image of other bytes (same size): fetched, refused by its hash,
        // v2 stays staged.
        let v3 = image(sb, 4, 3);
        sign(sb, &v3, "3");
        let side = sb.fresh("side");
        publish(&v3, &side);
        let sha3 = sha256_file(&v3);
        let wrong = side.join("images").join(&sha3);
        let mut bytes = fs::read(&wrong).unwrap();
        bytes[1000] ^= 0xff;
        fs::write(&wrong, bytes).unwrap();
        fs::rename(&wrong, ch.join("images").join(&sha3)).unwrap();
        fs::rename(side.join("manifest.json"), ch.join("manifest.json")).unwrap();
        wait_for(|| a.log().contains("hash-mismatch"));
        assert_eq!(slot(&w).0.as_deref(), Some(sha2.as_str()));
        assert!(!newimg.join("root-squashfs.img.partial").exists());
    });
}

#[test]
fn a_pull_cut_mid_image_resumes_with_range() {
    if !privileged() {
        return;
    }
    with_newimg("pull-cut", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let www = sb.fresh("www");
        let ch = www.join("ch");
        let v2 = image(sb, 6, 2);
        sign(sb, &v2, "2");
        publish(&v2, &ch);
        let nginx = Nginx::start(&www, &sb.fresh("nginx"));
        let relay = cutting_relay(nginx.port, 2 << 20);
        // reboot = "staged": the agent runs reboot_command once the image is staged.
        let rebooted = sb.fresh("rebooted");
        let a = start(
            &w,
            &format!(
                "reboot_command = \"touch {}\"\n[pull]\nurl = \"http://127.0.0.1:{relay}/ch\"\ninterval_secs = 1\njitter_secs = 0\ntimeout_secs = 5\nreboot = \"staged\"\n",
                rebooted.display()
            ),
        );
        let sha2 = sha256_file(&v2);
        wait_for(|| slot(&w).0.as_deref() == Some(sha2.as_str()));
        // The cut fetch, then one ranged fetch of the rest.
        let img = format!("/ch/images/{sha2}");
        assert_eq!(
            asked(&nginx, &img),
            vec![200, 206],
            "{:?}",
            nginx.requests()
        );
        let log = a.log();
        let line = log
            .lines()
            .find(|l| l.contains("pull: staged version 2"))
            .unwrap_or_else(|| panic!("{log}"));
        // "staged version 2 (N bytes fetched, resumed from M); …"
        let num = |after: &str| -> u64 {
            let v = line.split(after).nth(1).unwrap();
            v.trim_start_matches(['(', ' '])
                .split([' ', ')'])
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        let (fetched, from) = (num("version 2"), num("resumed from"));
        assert!(from > 0 && from <= 2 << 20, "{line}");
        assert_eq!(fetched + from, 6 << 20, "{line}");
        wait_for(|| rebooted.exists());
        assert!(a.log().contains("rebooting into the staged image"), "{log}");
    });
}

#[test]
fn https_with_a_test_ca_and_certificates_refused() {
    if !privileged() {
        return;
    }
    with_newimg("pull-tls", 48, |sb, newimg| {
        let w = world(sb, newimg, 1);
        let certs = Certs::make(&sb.fresh("certs"));
        let www = sb.fresh("www");
        let ch = www.join("ch");
        let v2 = image(sb, 2, 2);
        sign(sb, &v2, "2");
        publish(&v2, &ch);
        let good = Nginx::start_tls(&www, &sb.fresh("nginx"), &certs.cert, &certs.key);
        let old = Nginx::start_tls(&www, &sb.fresh("nginx-old"), &certs.expired, &certs.key);
        // Without the test CA: an unknown issuer, nothing fetched or staged.
        let a = start(&w, &pull_config(&good.url("ch"), None));
        wait_for(|| a.log().contains("pull failed"));
        assert!(a.log().contains("UnknownIssuer"), "{}", a.log());
        drop(a);
        // With it, but an expired certificate.
        let a = start(&w, &pull_config(&old.url("ch"), Some(&certs.ca)));
        wait_for(|| a.log().contains("pull failed"));
        assert!(a.log().contains("certificate expired"), "{}", a.log());
        drop(a);
        assert!(good.requests().is_empty() && old.requests().is_empty());
        assert_eq!(slot(&w), (None, None));
        // A ca_file that holds no certificate stops the agent at start, naming it.
        let junk = sb.fresh("junk.pem");
        fs::write(&junk, "not a certificate\n").unwrap();
        let cfg = w.etc.join("agent-junk.toml");
        fs::write(
            &cfg,
            format!(
                "unix = \"\"\ntcp = \"127.0.0.1:0\"\nidentity = {:?}\ntrusted_keys = {:?}\nnewimg_dir = {:?}\n{}",
                w.etc.join("identity.pem"),
                w.etc.join("trusted.pem"),
                w.newimg,
                pull_config(&good.url("ch"), Some(&junk))
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
            !out.status.success() && err.contains("ca_file") && err.contains("junk.pem"),
            "{err}"
        );
        // The right CA and a valid certificate: staged.
        let a = start(&w, &pull_config(&good.url("ch"), Some(&certs.ca)));
        let sha2 = sha256_file(&v2);
        wait_for(|| slot(&w).0.as_deref() == Some(sha2.as_str()));
        assert!(a.log().contains("pull: staged version 2"), "{}", a.log());
    });
}

/// A fleet: 100 agents on this machine (each its own `newimg` directory and sockets) polling
/// one nginx every 2 s with 2 s of jitter. All converge on v2; the access log shows one image
/// fetch per device and, after that, polls answered 304.
#[test]
fn a_fleet_of_100_agents_converges_fetching_each_image_once() {
    if !privileged() {
        return;
    }
    const DEVICES: usize = 100;
    let mut sb = Sandbox::new("fleet");
    let www = sb.fresh("www");
    let ch = www.join("ch");
    fs::create_dir_all(&ch).unwrap();
    let nginx = Nginx::start(&www, &sb.fresh("nginx"));
    let v2 = image(&mut sb, 1, 2);
    sign(&mut sb, &v2, "2");
    let cfg = format!(
        "[pull]\nurl = {:?}\ninterval_secs = 2\njitter_secs = 2\ntimeout_secs = 10\n",
        nginx.url("ch")
    );
    let fleet: Vec<(World, Agent)> = (0..DEVICES)
        .map(|_| {
            let newimg = sb.fresh("newimg");
            fs::create_dir_all(&newimg).unwrap();
            let w = world(&mut sb, &newimg, 1);
            let a = start(&w, &cfg);
            (w, a)
        })
        .collect();
    let t = std::time::Instant::now();
    publish(&v2, &ch);
    let sha2 = sha256_file(&v2);
    wait_for(|| {
        fleet
            .iter()
            .all(|(w, _)| slot(w).0.as_deref() == Some(sha2.as_str()))
    });
    let converged = t.elapsed();
    let at_convergence = nginx.requests().len();
    // Two more rounds of polls: nothing new, so 304s only.
    std::thread::sleep(Duration::from_secs(5));
    let reqs = nginx.requests();
    let img = format!("/ch/images/{sha2}");
    let image_gets: Vec<_> = reqs.iter().filter(|(p, _, _)| *p == img).collect();
    assert_eq!(image_gets.len(), DEVICES, "one image fetch per device");
    assert!(image_gets.iter().all(|(_, s, _)| *s == 200));
    let after = &reqs[at_convergence..];
    assert!(
        after.len() >= DEVICES,
        "{} polls after convergence",
        after.len()
    );
    assert!(
        after
            .iter()
            .all(|(p, s, _)| p == "/ch/manifest.json" && *s == 304),
        "{after:?}"
    );
    let bytes: u64 = reqs.iter().map(|(_, _, b)| b).sum();
    eprintln!(
        "{DEVICES} devices converged on v2 {:.1} s after publish; nginx: {} requests, {} body bytes \
         ({} image fetches of {} bytes), {} polls after convergence, all 304",
        converged.as_secs_f64(),
        reqs.len(),
        bytes,
        image_gets.len(),
        fs::metadata(&v2).unwrap().len(),
        after.len()
    );
    drop(fleet);
    sb.finish();
}
