//! Every command of docs/disaster-recovery.md, run in the runbook's order
//! on real trees (the failback over a real sshd), with the runbook's paths
//! replaced by the test's; the test fails if the document holds a command
//! it did not run.

mod common;

use common::sshd::Sshd;
use common::{dr, stderr, tree, World};
use std::collections::BTreeSet;

/// The `georep …` lines of the runbook's ```sh blocks, comments cut off.
fn runbook_commands() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/disaster-recovery.md"
    ))
    .unwrap();
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        let cmd = line.split(" #").next().unwrap().trim();
        if in_sh && cmd.starts_with("georep ") {
            out.push(cmd.to_string());
        }
    }
    out
}

struct Runner<'a> {
    w: &'a World,
    doc: Vec<String>,
    ran: BTreeSet<String>,
    subst: Vec<(String, String)>,
    extra_create: Vec<String>,
    extra_switchover: Vec<String>,
}

impl Runner<'_> {
    /// Runs the runbook's command `line` (which must be in the document).
    fn run(&mut self, line: &str) -> std::process::Output {
        assert!(
            self.doc.iter().any(|d| d == line),
            "not in the runbook: {line}"
        );
        self.ran.insert(line.to_string());
        let mut args: Vec<String> = line
            .split_whitespace()
            .skip(1)
            .map(|a| {
                let mut a = a.to_string();
                for (from, to) in &self.subst {
                    a = a.replace(from, to);
                }
                a
            })
            .collect();
        if args[0] == "create" && args.iter().any(|a| a == "--push-pem") {
            args.extend(self.extra_create.iter().cloned());
        }
        if args[0] == "switchover" && args.iter().any(|a| a == "--reverse-slave") {
            args.extend(self.extra_switchover.iter().cloned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.w.run(&args);
        assert!(
            out.status.success(),
            "{line}: {}\n{}",
            out.status,
            stderr(&out)
        );
        out
    }
}

#[test]
fn runbook_commands_all_run() {
    let doc = runbook_commands();
    assert!(doc.len() >= 15, "{doc:?}");
    let sshd = Sshd::start();
    let w = World::new();
    let (a, b) = (w.master.clone(), w.slave.clone());
    let restore = w.dir.path().join("restore");
    let mut r = Runner {
        w: &w,
        doc: doc.clone(),
        ran: BTreeSet::new(),
        subst: vec![
            ("root@siteA:/srv/store".into(), sshd.spec(&a)),
            ("/srv/store".into(), a.display().to_string()),
            ("/srv/replica".into(), b.display().to_string()),
            ("/srv/restore".into(), restore.display().to_string()),
        ],
        extra_create: vec![
            "--ssh-port".into(),
            sshd.port.to_string(),
            "--identity".into(),
            sshd.operator_key.display().to_string(),
            "--remote-georep".into(),
            common::georep_bin().display().to_string(),
        ],
        extra_switchover: Vec::new(),
    };
    w.create("s1", &["--marker", "mark"]);
    for i in 0..10 {
        let p = a.join(format!("d/f{i}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, common::mutate::data(i, 10_000)).unwrap();
        common::mark(&p);
    }
    w.sync("s1");
    // Drills.
    let st = r.run("georep status s1 --detail");
    assert!(String::from_utf8_lossy(&st.stdout).contains("slave role"));
    r.run("georep checkpoint s1 now");
    // A diverges, then is lost; B is promoted and lives on.
    std::fs::write(a.join("d/f1"), b"A's write after the last sync").unwrap();
    common::mark(&a.join("d/f1"));
    let out = r.run("georep promote /srv/replica");
    assert!(String::from_utf8_lossy(&out.stdout).contains("promoted"));
    let out = r.run("georep promote /srv/replica --json");
    let rep: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["already"], true);
    std::fs::write(b.join("d/onB"), b"written on B").unwrap();
    // A is back: failback over SSH.
    r.run("georep stop s1");
    r.run("georep create back /srv/replica root@siteA:/srv/store --failback --push-pem");
    r.run("georep sync back");
    tree::assert_same(&b, &a);
    let st = r.run("georep status back --detail");
    let st = String::from_utf8_lossy(&st.stdout).to_string();
    assert!(st.contains("promoted") && st.contains("demoted"), "{st}");
    r.run("georep start back");
    r.run("georep stop back");
    // The quarantine.
    let list = r.run("georep quarantine list /srv/store");
    assert!(String::from_utf8_lossy(&list.stdout).contains("1 divergent"));
    let id = dr::quarantines(&w, &a)[0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    r.subst.push(("ID".into(), id.clone()));
    r.subst.push(("PATH".into(), "d/f1".into()));
    let show = r.run("georep quarantine show /srv/store ID");
    assert!(String::from_utf8_lossy(&show.stdout).contains("d/f1"));
    r.run("georep quarantine restore /srv/store ID PATH --to /srv/restore");
    assert_eq!(
        std::fs::read(restore.join("d/f1")).unwrap(),
        b"A's write after the last sync"
    );
    r.run("georep quarantine discard /srv/store ID");
    assert!(dr::quarantines(&w, &a).is_empty());

    // A planned switchover, on a pair of its own.
    let w2 = World::new();
    w2.create("s1", &[]);
    std::fs::write(w2.master.join("f"), b"x").unwrap();
    w2.sync("s1");
    let mut r2 = Runner {
        w: &w2,
        doc: doc.clone(),
        ran: BTreeSet::new(),
        subst: Vec::new(),
        extra_create: Vec::new(),
        extra_switchover: Vec::new(),
    };
    r2.run("georep switchover s1 --reverse back --wait-quiet 2 --start");
    tree::assert_same(&w2.master, &w2.slave);
    w2.wait_active("back");
    let _ = w2.run(&["stop", "back"]);

    // The switchover of an SSH slave: "site B" is an sshd whose sessions
    // have a georep home of their own, and so is site A.
    let w3 = World::new();
    let home_b = w3.dir.path().join("home-b");
    std::fs::create_dir_all(&home_b).unwrap();
    std::fs::create_dir_all(&w3.slave).unwrap();
    let sshd_a = Sshd::start_with_env(&[("GEOREP_HOME", &w3.home)]);
    let sshd_b = Sshd::start_with_env(&[("GEOREP_HOME", &home_b)]);
    w3.create_ssh(&sshd_b, "s1", &[]);
    std::fs::write(w3.master.join("f"), b"x").unwrap();
    w3.sync("s1");
    let mut r3 = Runner {
        w: &w3,
        doc: doc.clone(),
        ran: BTreeSet::new(),
        subst: vec![("root@siteA:/srv/store".into(), sshd_a.spec(&w3.master))],
        extra_create: Vec::new(),
        extra_switchover: vec![
            "--identity".into(),
            sshd_b.operator_key.display().to_string(),
            "--reverse-ssh-port".into(),
            sshd_a.port.to_string(),
            "--reverse-identity".into(),
            sshd_a.operator_key.display().to_string(),
        ],
    };
    r3.run("georep switchover s1 --reverse back --reverse-slave root@siteA:/srv/store --push-pem --wait-quiet 2 --start");
    tree::assert_same(&w3.master, &w3.slave);
    let stop = w3
        .cmd(&["stop", "back"])
        .env("GEOREP_HOME", &home_b)
        .output()
        .unwrap();
    assert!(stop.status.success(), "{}", stderr(&stop));

    let ran: BTreeSet<String> = r.ran.union(&r2.ran).chain(r3.ran.iter()).cloned().collect();
    let missing: Vec<&String> = doc.iter().filter(|d| !ran.contains(*d)).collect();
    assert!(
        missing.is_empty(),
        "runbook commands no test ran: {missing:?}"
    );
}
