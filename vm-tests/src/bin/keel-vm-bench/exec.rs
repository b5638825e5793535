//! exec over hybrid vsock: the round trip of `true` against its floor and ssh, stdout and
//! cp throughput against raw vsock streams, and the agent's RSS.

use std::fs;
use std::time::Instant;

use keel_vm_tests::*;

use crate::stats;

/// Milliseconds at the `per_mille`/1000 quantile of seconds `v`.
fn quantile_ms(v: &[f64], per_mille: usize) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[(s.len() - 1) * per_mille / 1000] * 1e3
}

/// exec over hybrid vsock in one guest: the round trip of `true` against its floor (a status
/// round trip over the same transport plus the guest's own fork/exec/wait of `true`), stdout
/// and cp throughput, and the agent's RSS idle and with 16 clients streaming at once.
pub fn bench(runs: usize, v1: &std::path::Path, dir: &std::path::Path) {
    let d = dir.join("exec");
    // Version 1 with dropbear added: the ssh baseline runs in the same guest.
    let _ = v1;
    let (v1, ssh) = ssh_image();
    let disk = Disk::new(&d, &v1, "root-squashfs.img");
    let dev = VsockDevice::start(&d);
    let ssh_port = free_port();
    let boot = Boot {
        vsock: Some(dev.vhost.clone()),
        ssh_port: Some(ssh_port),
        ..Boot::default()
    };
    let mut vm = Vm::start(&disk, "exec", &boot);
    vm.wait_for("KEEL ready version=1");
    let ep = dev.endpoint();
    let key = kit().host_key.to_str().unwrap().to_string();
    let bins = kit().bins.join("keelctl");
    // keelctl on the guest's hybrid vsock with the host key.
    let ctl = || {
        let mut c = std::process::Command::new(&bins);
        c.args(["-e", &ep, "--key", &key]);
        c
    };
    let timed = |args: &[&str]| -> f64 {
        let t = Instant::now();
        let out = ctl()
            .args(["--wait", "20"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        t.elapsed().as_secs_f64()
    };
    let n = if runs <= 1 { 20 } else { 200 };
    let exec: Vec<f64> = (0..n).map(|_| timed(&["exec", "--", "true"])).collect();
    let status: Vec<f64> = (0..n).map(|_| timed(&["status"])).collect();
    // The ssh baseline: Debian's dropbear in the guest (started by exec), Debian's dbclient
    // on the host over the forwarded TCP port, key auth, no host key check, HOME here.
    timed(&[
        "exec",
        "--detach",
        "--",
        "dropbear",
        "-F",
        "-E",
        "-s",
        "-p",
        "22",
        "-r",
        "/etc/dropbear/host-ed25519",
    ]);
    let ssh_true = || -> Option<f64> {
        let t = Instant::now();
        let out = std::process::Command::new("dbclient")
            .args(["-y", "-y", "-i"])
            .arg(&ssh.client_key)
            .args(["-p", &ssh_port.to_string(), "root@127.0.0.1", "true"])
            .env("HOME", &d)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("dbclient (apt-get install dropbear-bin)");
        out.status.success().then(|| t.elapsed().as_secs_f64())
    };
    let mut up = false;
    for _ in 0..100 {
        if ssh_true().is_some() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(
        up,
        "dropbear in the guest did not answer dbclient within 20 s"
    );
    let ssh_runs: Vec<f64> = (0..n)
        .map(|_| ssh_true().expect("ssh guest true"))
        .collect();
    // Seconds `script` takes in the guest, timed there (between two /proc/uptime reads).
    let in_guest = |script: &str| -> f64 {
        let out = ctl()
            .args(["exec", "--", "sh", "-c"])
            .arg(format!(
                "s=$(cut -d' ' -f1 /proc/uptime); {script}; e=$(cut -d' ' -f1 /proc/uptime); echo $s $e"
            ))
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut it = t
            .split_whitespace()
            .map(|x| x.parse::<f64>().unwrap_or(0.0));
        let (s, e) = (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0));
        e - s
    };
    // The guest's own fork/exec/wait of `true`, 200 times.
    let spawn_ms =
        in_guest("i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done") / 200.0 * 1e3;
    let floor_p50 = quantile_ms(&status, 500) + spawn_ms;
    let floor_p99 = quantile_ms(&status, 990) + spawn_ms;
    // Throughput: 64 MiB of stdout; cp of 24 MiB into the guest's newimg and back; each
    // measured `runs` times, keel and its baseline in turn, medians shown.
    let mib = 64.0;
    let cp_mib = 24.0;
    let t_alone = in_guest("head -c 67108864 /dev/zero > /dev/null");
    // `script` in the guest, detached, serves `bytes` on vsock `port`: seconds to read them.
    let served = |script: &str, port: u32, bytes: u64| -> f64 {
        let out = ctl()
            .args(["exec", "--detach", "--", "sh", "-c", script])
            .output()
            .unwrap();
        assert!(out.status.success(), "{script}: {out:?}");
        let t = Instant::now();
        let mut s = dev.connect(port);
        let got = std::io::copy(&mut s, &mut std::io::sink()).unwrap();
        assert_eq!(got, bytes, "{script}");
        t.elapsed().as_secs_f64()
    };
    // The raw byte stream over the same transport, both ways: keel-rawstream in the guest
    // (started by exec), the host on the hybrid socket, no protocol in between.
    let raw_out = |port: u32| -> f64 {
        served(
            &format!("keel-rawstream send {port} 67108864"),
            port,
            64 << 20,
        )
    };
    // The same writes through a pipe, relayed to a vsock socket by a second process: by
    // read/write (the least an agent does per byte) or by splice (no user copy). What a
    // pipe and a relay cost, with no protocol.
    let relayed = |mode: &str, port: u32| -> f64 {
        let script = format!("keel-rawstream write 67108864 | keel-rawstream {mode} {port}");
        served(&script, port, 64 << 20)
    };
    let zeros = vec![0u8; 256 << 10];
    // Into the guest: to memory, or into a file on newimg, fsynced (cp's disk work). Timed
    // from the connection to the guest's end (its exec returns, the count it read checked):
    // the host's EOF alone can come before the guest has read it all.
    let raw_in = |port: u32, file: Option<&str>| -> f64 {
        let p = port.to_string();
        let child = ctl()
            .args(["exec", "--", "keel-rawstream", "recv"])
            .arg(&p)
            .args(file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut s = dev.connect(port);
        let t = Instant::now();
        for _ in 0..(24 << 20) / zeros.len() {
            std::io::Write::write_all(&mut s, &zeros).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let out = child.wait_with_output().unwrap();
        let took = t.elapsed().as_secs_f64();
        assert!(out.status.success(), "rawstream recv: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            (24u64 << 20).to_string()
        );
        took
    };
    let blob = d.join("cp.bin");
    fs::write(&blob, vec![7u8; 24 << 20]).unwrap();
    let back = d.join("back.bin");
    let (mut v_out, mut v_raw_out, mut v_head) = (Vec::new(), Vec::new(), Vec::new());
    let (mut v_relay, mut v_splice, mut v_raw_file_out) = (Vec::new(), Vec::new(), Vec::new());
    let (mut v_in, mut v_raw_in, mut v_raw_file, mut v_back) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs.max(1) {
        let port = 7500 + 10 * u32::try_from(round).unwrap();
        // The producer is keel-rawstream's own writer (256 KiB writes of zeros), the same
        // code that feeds the raw stream: the ratio is keel's cost, not the producer's.
        v_out.push(timed(&[
            "exec",
            "--",
            "keel-rawstream",
            "write",
            "67108864",
        ]));
        v_raw_out.push(raw_out(port));
        v_relay.push(relayed("relay", port + 3));
        v_splice.push(relayed("splice", port + 4));
        // busybox `head -c`, as a user would write it.
        v_head.push(timed(&[
            "exec",
            "--",
            "head",
            "-c",
            "67108864",
            "/dev/zero",
        ]));
        v_raw_in.push(raw_in(port + 1, None));
        v_raw_file.push(raw_in(port + 2, Some("/run/keel/newimg/raw.bin")));
        // newimg is small: the file goes before cp needs the room.
        // (sync: ext4 reuses freed blocks once the journal committed their release)
        timed(&[
            "exec",
            "--",
            "sh",
            "-c",
            "rm /run/keel/newimg/raw.bin && sync",
        ]);
        v_in.push(timed(&[
            "cp",
            blob.to_str().unwrap(),
            ":/run/keel/newimg/cp.bin",
        ]));
        // Both read the file from the page cache (cp in's fsync may have left it cold).
        timed(&[
            "exec",
            "--",
            "sh",
            "-c",
            "cat /run/keel/newimg/cp.bin > /dev/null",
        ]);
        // cp out as a plain loop: the same file read and written to a vsock socket in turn.
        v_raw_file_out.push(served(
            &format!("keel-rawstream relay {} /run/keel/newimg/cp.bin", port + 5),
            port + 5,
            24 << 20,
        ));
        v_back.push(timed(&[
            "cp",
            ":/run/keel/newimg/cp.bin",
            back.to_str().unwrap(),
        ]));
        timed(&[
            "exec",
            "--",
            "sh",
            "-c",
            "rm /run/keel/newimg/cp.bin && sync",
        ]);
    }
    let med = |v: &[f64]| stats(v).0;
    let (t_out, t_raw_out, t_head) = (med(&v_out), med(&v_raw_out), med(&v_head));
    let (t_relay, t_splice, t_raw_file_out) = (med(&v_relay), med(&v_splice), med(&v_raw_file_out));
    let (t_in, t_raw_in, t_raw_file, t_back) =
        (med(&v_in), med(&v_raw_in), med(&v_raw_file), med(&v_back));
    // RSS of the agent, idle and with 16 clients streaming at once.
    let rss = || -> u64 {
        let out = ctl()
            .args(["exec", "--", "sh", "-c"])
            .arg("grep VmRSS /proc/$(pidof keel-agent)/status")
            .output()
            .unwrap();
        assert!(out.status.success(), "rss: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|k| k.parse().ok())
            .unwrap_or(0)
    };
    let idle = rss();
    let streams: Vec<std::process::Child> = (0..16)
        .map(|_| {
            ctl()
                .args(["exec", "--", "sh", "-c", "yes | head -c 20000000"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let busy = rss();
    for mut c in streams {
        let _ = c.wait();
    }
    vm.kill();
    println!("### exec over hybrid vsock (QEMU TCG guest, {n} runs each)\n");
    println!("| what | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| `keelctl exec -- true` (connect, hello, auth, exec, exit) | {:.1} ms | {:.1} ms |",
        quantile_ms(&exec, 500),
        quantile_ms(&exec, 990)
    );
    println!(
        "| floor: `keelctl status` round trip + the guest's own fork/exec/wait of `true` ({spawn_ms:.1} ms) | {floor_p50:.1} ms | {floor_p99:.1} ms |"
    );
    println!(
        "| baseline: `dbclient root@guest true` (Debian's dropbear in the same guest, TCP through QEMU's user network, ed25519 key) | {:.1} ms | {:.1} ms |",
        quantile_ms(&ssh_runs, 500),
        quantile_ms(&ssh_runs, 990)
    );
    println!(
        "\nexec is {:.2}× its floor at p50, {:.2}× at p99 (goal ≤ 1.5×); {:.3}× ssh at p50, {:.3}× at p99 (goal ≤ 0.1×).\n",
        quantile_ms(&exec, 500) / floor_p50,
        quantile_ms(&exec, 990) / floor_p99,
        quantile_ms(&exec, 500) / quantile_ms(&ssh_runs, 500),
        quantile_ms(&exec, 990) / quantile_ms(&ssh_runs, 990),
    );
    println!("| transfer (median of {}) | MiB/s |", runs.max(1));
    println!("|---|---|");
    println!(
        "| exec stdout, 64 MiB (`keel-rawstream write`: 256 KiB writes) | {:.1} |",
        mib / t_out
    );
    println!(
        "| baseline: raw vsock stream out of the guest, 64 MiB (`keel-rawstream send`, the same writes) | {:.1} |",
        mib / t_raw_out
    );
    println!(
        "| the same writes into a pipe, relayed to a vsock socket by read/write of 64 KiB (`keel-rawstream relay`) | {:.1} |",
        mib / t_relay
    );
    println!(
        "| the same writes into a pipe, spliced to a vsock socket (`keel-rawstream splice`) | {:.1} |",
        mib / t_splice
    );
    println!(
        "| exec stdout, 64 MiB of busybox `head -c` | {:.1} |",
        mib / t_head
    );
    println!(
        "| the same `head -c` into the guest's /dev/null, no exec | {:.1} |",
        mib / t_alone.max(1e-3)
    );
    println!(
        "| cp into the guest, 24 MiB (to newimg, fsynced) | {:.1} |",
        cp_mib / t_in
    );
    println!(
        "| baseline: raw vsock stream into the guest, 24 MiB (to memory) | {:.1} |",
        cp_mib / t_raw_in
    );
    println!(
        "| baseline: raw vsock stream into the guest, 24 MiB (to a file on newimg, fsynced) | {:.1} |",
        cp_mib / t_raw_file
    );
    println!("| cp out of the guest, 24 MiB | {:.1} |", cp_mib / t_back);
    println!(
        "| baseline: the same file (in the page cache) read and written to a vsock socket by a plain loop, 256 KiB at a time, nothing read while a write waits (`keel-rawstream relay PORT FILE`) | {:.1} |",
        cp_mib / t_raw_file_out
    );
    println!(
        "\nexec stdout is {:.2}× the pipe relayed by read/write, {:.2}× the pipe spliced; \
         cp out {:.2}× the file relayed by read/write.",
        t_relay / t_out,
        t_splice / t_out,
        t_raw_file_out / t_back
    );
    println!(
        "\nexec stdout is {:.2}× the raw stream out (goal ≥ 0.8×); with `head -c` as the \
         producer, {:.2}× what `head -c` makes alone. cp out is {:.2}× the raw stream out; cp in \
         {:.2}× the raw stream in to memory, {:.2}× the raw stream in to a file (goal ≥ 0.9×). \
         keelctl runs are timed whole, connect and auth included.\n",
        t_raw_out / t_out,
        t_alone / t_head,
        (cp_mib / t_back) / (mib / t_raw_out),
        t_raw_in / t_in,
        t_raw_file / t_in,
    );
    println!("| agent RSS | KiB |");
    println!("|---|---|");
    println!("| idle (after the runs above) | {idle} |");
    println!("| 16 clients streaming at once | {busy} |");
}
